"""The training loop's guards: a non-finite loss stops the run, a loss still at chance warns."""
from __future__ import annotations

import math
import sys

import torch

from model.alexnet import fc7_dead_share
from model.errors import Diverged
from pipeline import make_loader


class LossGuard:
    """Non-finite losses, noticed without a GPU sync per step: each step marks the first bad step
    on the device, and check() (at every log and before every checkpoint) raises Diverged."""

    def __init__(self, device: torch.device, world: int):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.world = world
        self.lrs: dict[int, float] = {}  # step -> lr since the last check, to name the bad step's lr

    def record(self, loss: torch.Tensor, step: int, lr: float) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.lrs[step] = lr

    def check(self) -> None:
        first = self.first_bad.clone()
        if self.world > 1:  # every rank stops at the same check, or the others would hang
            torch.distributed.all_reduce(first, torch.distributed.ReduceOp.MAX)
        bad = int(first.item())
        if bad >= 0:
            raise Diverged(f"the training loss is not finite at step {bad} (lr {self.lrs.get(bad, float('nan')):g})")
        self.lrs.clear()


def at_chance(loss: float, num_classes: int) -> bool:
    """`loss` within 1 % of ln(C), the loss of a uniform guess."""
    chance = math.log(num_classes)
    return abs(loss - chance) <= 0.01 * chance


def stall_warning(loss: float, num_classes: int, step: int, recipe_name: str, init: str,
                  fc7_dead: float | None = None) -> str | None:
    """A warning if `loss` is still at chance, naming the share of dead fc7 units where measured."""
    if not at_chance(loss, num_classes):
        return None
    dead = "" if fc7_dead is None else (
        f"; {100 * fc7_dead:.1f} % of fc7's units are dead (0 for every image of a val batch)"
        + (", the failure of the paper's init that README 'Recipes' documents" if fc7_dead >= 0.5 else ""))
    others = ", ".join(f"--init {i}" for i in ("cuda-convnet2", "caffe", "kaiming") if i != init)
    return (f"train loss {loss:.3f} is still at chance (ln {num_classes} = {math.log(num_classes):.3f}) after "
            f"{step} steps of --recipe {recipe_name} (--init {init}){dead}: this run may not learn; consider "
            f"{others} (README: 'Recipes')")


def fc7_dead_now(run) -> float:
    """The share of dead fc7 units on a fixed val batch (the first 64 centre crops), eval mode: no
    dropout, and no random number drawn, so a run with probes trains exactly as one without."""
    if run.probe is None:
        loader = make_loader(run.cfg.shards, "val", batch_size=64, device=str(run.device), crop="center",
                             backend=run.cfg.backend, normalization=run.norm, verify=run.cfg.verify,
                             num_threads=run.cfg.loader_threads, crop_size=run.model_cfg.input_size)
        run.probe = next(iter(loader))[0]
    return fc7_dead_share(run.model, run.probe)


def check_stall(run, epoch: int, avg: float) -> None:
    """Once, at the first log step at or past --stall-steps (every rank decides alike); `run` is model.train's Run."""
    if run.stall_checked or not run.cfg.stall_steps or run.step < run.cfg.stall_steps:
        return
    run.stall_checked = True
    if not (run.main and at_chance(avg, run.num_classes)):
        return
    warning = stall_warning(avg, run.num_classes, run.step, run.cfg.recipe, run.recipe.init, fc7_dead_now(run))
    if warning:
        print(f"\ntrain: warning: {warning}", file=sys.stderr, flush=True)
        run.metrics.log({"kind": "warning", "epoch": epoch, "step": run.step, "warning": "stall",
                         "train_loss": avg, "message": warning})
