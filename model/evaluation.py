"""The evaluation loop and its figures: top-1 and top-5 error, centre crop or the paper's ten crops."""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from tqdm import tqdm


def open_manifest(shards: str) -> dict:
    """SHARDS/dataset.json, or UsageError in one line (no such directory, a damaged manifest)."""
    from model.errors import UsageError
    from pipeline.shards import ShardError, load_manifest
    try:
        return load_manifest(shards)
    except OSError:
        raise UsageError(f"{shards}: no such shard directory (no dataset.json)") from None
    except ShardError as e:
        raise UsageError(str(e)) from None


def open_val(shards: str, **loader_args):
    """make_loader over SHARDS' val split, refused in one line (UsageError) where the shards are damaged
    or the split has no images: before any work."""
    from model.errors import UsageError
    from pipeline import make_loader
    from pipeline.shards import ShardError
    try:
        loader = make_loader(shards, "val", **loader_args)
    except ShardError as e:
        raise UsageError(str(e)) from None
    if loader.num_samples == 0:
        raise UsageError(f"{shards}: the val split has no images")
    return loader


def score(probs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[loss sum, top-1 right, top-5 right] (float64) of a batch of probabilities [B, C] against labels [B]."""
    top5 = probs.topk(min(5, probs.shape[1]), 1).indices
    return torch.stack([F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double(),
                        (top5[:, 0] == labels).sum().double(), (top5 == labels[:, None]).any(1).sum().double()])


@torch.no_grad()
def batch_probs(model, loader, device, bf16: bool, progress: bool = False, desc: str = "evaluate"):
    """(softmax probabilities [B, C] float32, labels [B]) per batch, on `device`, in eval mode. Ten crops:
    the softmax outputs of the crops are averaged (section 4.1)."""
    model.eval()
    # A with-block: the bar ends its line even when the loader raises, so the error gets a line of its own.
    with tqdm(loader, total=len(loader), desc=desc, unit="batch", disable=not progress,
              dynamic_ncols=True, mininterval=1.0, file=sys.stderr) as batches:
        for images, labels in batches:
            labels = labels.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                if images.dim() == 5:
                    b, n = images.shape[:2]
                    probs = F.softmax(model(images.flatten(0, 1)).float(), 1).view(b, n, -1).mean(1)
                else:
                    probs = F.softmax(model(images).float(), 1)
            yield probs, labels


def evaluate(model, loader, device, bf16: bool, progress: bool = False) -> torch.Tensor:
    """[loss sum, top-1 right, top-5 right, samples] over this rank's part of the split (the caller
    reduces)."""
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 right, top-5 right
    samples = 0  # counted on the host: no device sync per batch
    for probs, labels in batch_probs(model, loader, device, bf16, progress):
        sums += score(probs, labels)
        samples += len(labels)
    model.train()
    return torch.cat([sums, torch.tensor([float(samples)], dtype=torch.float64, device=device)])


class Ensemble:
    """Several models on one split, one model at a time (section 6: "averaging the predictions"): each
    model's own sums, and the sums of the models' averaged softmax outputs. Memory: one [N, C] float32
    sum on the host for an ensemble (ILSVRC-2012 val: 50,000 x 1,000 x 4 bytes = 200 MB), whatever the number
    of models; none for one model, whose sums are all it needs (Fall 2011's half for testing, 7.1M images x
    21,841 classes, would be 620 GB)."""

    def __init__(self, samples: int, num_classes: int, models: int = 2):
        self.total = torch.zeros(samples, num_classes, dtype=torch.float32) if models > 1 else None
        self.labels = torch.full((samples,), -1, dtype=torch.int64)
        self.models: list[torch.Tensor] = []  # per model: [loss sum, top-1 right, top-5 right, samples]

    def start_model(self) -> None:
        self.models.append(torch.zeros(4, dtype=torch.float64))
        self._at = 0

    def add(self, probs: torch.Tensor, labels: torch.Tensor) -> None:
        """The current model's next batch, in the split's order (the same for every model)."""
        probs, labels = probs.float().cpu(), labels.cpu()
        rows = slice(self._at, self._at + len(labels))
        if len(self.models) == 1:
            self.labels[rows] = labels
        elif not torch.equal(self.labels[rows], labels):  # the loader's order is fixed: this is a bug, not input
            raise RuntimeError(f"model {len(self.models)} saw other labels than model 1 at samples {rows}")
        self.models[-1] += torch.cat([score(probs, labels), torch.tensor([float(len(labels))], dtype=torch.float64)])
        if self.total is not None:
            self.total[rows] += probs
        self._at += len(labels)

    def ensemble_sums(self) -> torch.Tensor:
        n = self._at
        return torch.cat([score(self.total[:n] / len(self.models), self.labels[:n]),
                          torch.tensor([float(n)], dtype=torch.float64)])


def summarize(sums: torch.Tensor, num_classes: int) -> dict:
    """Mean loss and errors. Top-5 error is None (n/a) with 5 classes or fewer, where it is 0 by construction."""
    loss, right1, right5, n = sums.tolist()
    return {"val_loss": loss / n, "val_top1_error": 1 - right1 / n,
            "val_top5_error": 1 - right5 / n if num_classes > 5 else None, "val_samples": int(n)}


def percent(error: float | None) -> str:
    return "n/a" if error is None else f"{100 * error:.1f}%"
