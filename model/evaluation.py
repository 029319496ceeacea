"""The evaluation loop and its figures: top-1 and top-5 error, centre crop or the paper's ten crops."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def evaluate(model, loader, device, bf16: bool, progress: bool = False) -> torch.Tensor:
    """[loss sum, top-1 right, top-5 right, samples] over this rank's part of the split (the caller
    reduces). Ten crops: the softmax outputs of the crops are averaged (section 4.1)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 right, top-5 right
    samples = 0  # counted on the host: no device sync per batch
    # A with-block: the bar ends its line even when the loader raises, so the error gets a line of its own.
    with tqdm(loader, total=len(loader), desc="evaluate", unit="batch", disable=not progress,
              dynamic_ncols=True, mininterval=1.0, file=sys.stderr) as batches:
        for images, labels in batches:
            labels = labels.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                if images.dim() == 5:
                    b, n = images.shape[:2]
                    probs = F.softmax(model(images.flatten(0, 1)).float(), 1).view(b, n, -1).mean(1)
                else:
                    probs = F.softmax(model(images).float(), 1)
            top5 = probs.topk(min(5, probs.shape[1]), 1).indices
            sums += torch.stack([F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double(),
                                 (top5[:, 0] == labels).sum().double(),
                                 (top5 == labels[:, None]).any(1).sum().double()])
            samples += len(labels)
    model.train()
    return torch.cat([sums, torch.tensor([float(samples)], dtype=torch.float64, device=device)])


def summarize(sums: torch.Tensor, num_classes: int) -> dict:
    """Mean loss and errors. Top-5 error is None (n/a) with 5 classes or fewer, where it is 0 by construction."""
    loss, right1, right5, n = sums.tolist()
    return {"val_loss": loss / n, "val_top1_error": 1 - right1 / n,
            "val_top5_error": 1 - right5 / n if num_classes > 5 else None, "val_samples": int(n)}


def percent(error: float | None) -> str:
    return "n/a" if error is None else f"{100 * error:.1f}%"
