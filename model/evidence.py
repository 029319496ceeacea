"""What a run leaves to look at: metrics.jsonl (one JSON object per line) and plot.png."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import torch

from model.guards import fc7_dead_now
from model.recipes import lr_rule


def git_commit() -> str:
    """The commit this code was run from (config.json's 'commit'), or 'unknown' outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def write_json(path: str, obj) -> None:
    """Written to a temporary name and renamed: a reader never sees half a file."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def draw_plot(path: str, epochs: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [e["epoch"] + 1 for e in epochs]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(x, [e["train_loss"] for e in epochs], "o-", label="train")
    ax[0].plot(x, [e["val_loss"] for e in epochs], "o-", label="val")
    ax[0].set(title="loss (cross-entropy)", xlabel="epoch")
    ax[1].plot(x, [100 * e["val_top1_error"] for e in epochs], "o-", label="top-1")
    if all(e["val_top5_error"] is not None for e in epochs):  # n/a with 5 classes or fewer
        ax[1].plot(x, [100 * e["val_top5_error"] for e in epochs], "o-", label="top-5")
    ax[1].set(title="validation error (%)", xlabel="epoch", ylim=(0, 100))
    ax[2].semilogy(x, [e["lr"] for e in epochs], "o-")
    ax[2].set(title="learning rate (weights)", xlabel="epoch")
    for a in ax[:2]:
        a.legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


class Metrics:
    """RUN/metrics.jsonl, one JSON object per line; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: str, resume_at: tuple[int, int] | None):
        self.path = path
        self.epochs: list[dict] = []
        if resume_at is None:
            if os.path.exists(path):
                os.remove(path)
            return
        if os.path.exists(path):
            epoch, step = resume_at
            kept, bad = [], 0
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line half-written when the run was killed
                        record = None
                    if isinstance(record, dict) and "step" in record and "kind" in record:
                        kept.append(record)
                    elif line.strip():
                        bad += 1
            if bad:
                print(f"train: {path}: dropped {bad} unreadable line(s), as a killed run leaves them",
                      file=sys.stderr, flush=True)
            kept = [r for r in kept if r["step"] <= step and not (r["kind"] == "epoch" and r["epoch"] >= epoch)]
            with open(path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self.epochs = [r for r in kept if r["kind"] == "epoch"]

    def log(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if record["kind"] == "epoch":
            self.epochs.append(record)


def write_config(run) -> None:
    """OUT/config.json: everything a run was made with (`run` is model.train's Run)."""
    cfg = run.cfg
    write_json(os.path.join(cfg.out, "config.json"), {
        "recipe": {"name": cfg.recipe, **asdict(run.recipe)},
        "config": {k: v for k, v in asdict(cfg).items() if k != "overrides"},
        "overridden": sorted(k for k, v in cfg.overrides.items() if v is not None),
        "lr": {"weights": run.recipe.lr, "rule": lr_rule(cfg.recipe, cfg.overrides)},
        "model": asdict(run.model_cfg), "normalization": run.norm.as_dict(), "world_size": run.world,
        "devices": run.devices, "intra_op_threads": run.threads, "commit": git_commit(), "torch": torch.__version__, "argv": sys.argv,
        "dataset": run.dataset, "loader": type(run.train_loader).__name__, "bf16": run.bf16,
        "channels_last": run.channels_last, "init_from": run.init_from})


def log_window(run, epoch: int, lr: float, avg: float, rate: float, bar) -> None:
    """A logged step: the progress bar, metrics.jsonl (with the fc7 probe when due), TensorBoard."""
    if not run.main:
        return
    bar.set_postfix(loss=f"{avg:.3f}", lr=f"{lr:.2g}", img_s=f"{rate:.0f}")
    record = {"kind": "step", "epoch": epoch, "step": run.step, "lr": lr, "train_loss": avg, "images_per_s": rate}
    if run.cfg.probe_every and run.step % run.cfg.probe_every == 0:
        record["fc7_dead"] = fc7_dead_now(run)
    run.metrics.log(record)
    if run.tb:
        run.tb.add_scalar("train/loss", avg, run.step)
        run.tb.add_scalar("train/lr", lr, run.step)
