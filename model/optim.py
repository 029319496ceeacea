"""The paper's optimizer and schedule as plain functions (section 5).

Update rule, per parameter group:
    v <- m v - lr wd w - lr grad,   w <- w + v
with the weights at (lr, weight decay) and the biases at (bias_lr_mult * lr, decay only with
--bias-decay). PyTorch's SGD keeps b = -v / lr instead, which is the same rule at a constant lr;
at a change of lr set_lr rescales b by old/new so that v carries over as in the paper, instead of
acting at once with the new lr.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from model.recipes import Recipe


def plateau_divisions(val_errors: list[float], patience: int, max_divisions: int) -> int:
    """How often the lr has been divided by 10 after these epochs' val errors."""
    best, since, divisions = math.inf, 0, 0
    for err in val_errors:
        if err < best:
            best, since = err, 0
        else:
            since += 1
            if since >= patience and divisions < max_divisions:
                divisions, since = divisions + 1, 0
    return divisions


def learning_rate(recipe: Recipe, epoch: float, val_errors: list[float]) -> float:
    """The weights' lr at (fractional) `epoch`, given the val errors of the finished epochs."""
    if recipe.schedule == "plateau":
        k = plateau_divisions(val_errors, recipe.plateau_patience, recipe.max_lr_divisions)
    else:
        k = int(epoch // recipe.step_epochs)
    lr = recipe.lr / 10 ** k
    if epoch < recipe.warmup_epochs:
        lr *= 0.1 + 0.9 * epoch / recipe.warmup_epochs
    return lr


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with two parameter groups: weights (lr, weight decay) and biases (bias_lr_mult * lr,
    weight decay only with bias_decay). Each group's "lr_mult" is what set_lr multiplies."""
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": weights, "lr_mult": 1.0, "weight_decay": recipe.weight_decay},
              {"params": biases, "lr_mult": recipe.bias_lr_mult,
               "weight_decay": recipe.weight_decay if recipe.bias_decay else 0.0}]
    return torch.optim.SGD([{**g, "lr": recipe.lr * g["lr_mult"]} for g in groups], lr=recipe.lr,
                           momentum=recipe.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The weights' lr for the next step. Momentum buffers are rescaled by old/new lr, so that the
    paper's velocity v = -lr * buffer carries over a change of lr unchanged (module docstring)."""
    for group in optimizer.param_groups:
        new = lr * group["lr_mult"]
        old = group["lr"]
        if new != old:
            bufs = [optimizer.state[p]["momentum_buffer"] for p in group["params"]
                    if optimizer.state.get(p, {}).get("momentum_buffer") is not None]
            if bufs and old > 0:
                torch._foreach_mul_(bufs, old / new)
            group["lr"] = new


def train_step(net, optimizer, images, labels, lr: float, bf16: bool, pad_to: int = 0) -> torch.Tensor:
    """One SGD step on the batch mean of the cross-entropy; returns the loss (detached, no sync).
    pad_to: a smaller (last) batch runs padded to this many images, and only its own rows enter the
    loss, so the gradient is the unpadded batch's (no layer mixes images) and a compiled model sees
    one batch shape: no recompilation, no dynamic-shape graph."""
    set_lr(optimizer, lr)
    n = len(labels)
    if n < pad_to:
        images = torch.cat([images, images[:1].expand(pad_to - n, *images.shape[1:])])
    with torch.autocast(device_type=labels.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(net(images)[:n], labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()
