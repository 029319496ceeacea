"""What a run leaves to look at: metrics.jsonl (one JSON object per line) and plot.png."""
from __future__ import annotations

import json
import os
import sys


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
            with open(path) as f:
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
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self.epochs = [r for r in kept if r["kind"] == "epoch"]

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["kind"] == "epoch":
            self.epochs.append(record)
