"""Measure how AlexNet's initialisations start: the paper's init, its variants, and Kaiming.

    python -m tools.init_study SHARDS [--epochs 3] [--out runs/init_study] [--diagnose-only]

First a diagnosis in seconds: for one real batch at initialisation, how much of
the logits depends on the image, and the size of conv1's gradient, under the
pipeline's std normalisation and under the paper's mean subtraction alone.
Then it trains each variant with the same data, seed and batch on SHARDS
(model.train), prints the training loss and the validation error per epoch,
and draws OUT/init_study.png. On a GPU and real ImageNet use --epochs 5 or more.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

VARIANTS = {
    "paper": [],                                        # N(0, 0.01), biases 1, LRN k + alpha*sum (section 3.3)
    "paper, LRN alpha/n": ["--lrn-convention", "mean"],  # the Caffe/PyTorch reading of the LRN formula
    "paper, LRN all five": ["--lrn-layers", "all"],
    "paper, 1-epoch warm-up": ["--warmup-epochs", "1"],
    "paper, mean-only input": ["--input-norm", "mean"],  # the paper's preprocessing (section 2): 0-255 units
    "kaiming": ["--init", "kaiming"],
}


def diagnose(shards: str) -> None:
    """Signal at init: the spread of the logits across images (eval mode), relative to their size."""
    import torch
    import torch.nn.functional as F
    from model.alexnet import AlexNet, AlexNetConfig
    from pipeline import make_loader
    loader = make_loader(shards, "train", batch_size=64, lighting=False, num_threads=1)
    x, y = next(iter(loader))
    std = torch.tensor(loader.std, dtype=torch.float32).view(1, 3, 1, 1)
    inputs = {"(x - mean) / std": x, "x - mean, 0-255 (paper)": x * std * 255}
    print("init     input                      logit spread across images / logit size   |conv1 grad|")
    for init in ("paper", "kaiming"):
        for name, inp in inputs.items():
            torch.manual_seed(0)
            model = AlexNet(AlexNetConfig(num_classes=len(loader.classes), init=init)).eval()
            out = model(inp)
            F.cross_entropy(out, y).backward()
            spread = (out.std(0).mean() / out.abs().mean()).item()
            print(f"{init:8s} {name:26s} {spread:10.2e}                              "
                  f"{model.conv1.weight.grad.norm().item():.2e}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("shards")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--devices", default="auto")
    p.add_argument("--out", default="runs/init_study")
    p.add_argument("--diagnose-only", action="store_true", help="only the signal-at-init table")
    a = p.parse_args(argv)
    diagnose(a.shards)
    if a.diagnose_only:
        return 0
    from model import train
    curves = {}
    for name, extra in VARIANTS.items():
        run = os.path.join(a.out, name.replace(" ", "_").replace(",", "").replace("/", "-"))
        shutil.rmtree(run, ignore_errors=True)
        print(f"--- {name}", flush=True)
        rc = train.main(["--shards", a.shards, "--out", run, "--epochs", str(a.epochs), "--batch-size",
                         str(a.batch_size), "--devices", a.devices, "--log-every", "4", *extra])
        if rc:
            return rc
        with open(os.path.join(run, "metrics.jsonl")) as f:
            curves[name] = [json.loads(line) for line in f]
    print("\nvariant                    train loss (first -> last logged)   val top-1 error per epoch")
    for name, recs in curves.items():
        steps = [r["train_loss"] for r in recs if r["kind"] == "step"]
        errs = " ".join(f"{100 * r['val_top1_error']:5.1f}%" for r in recs if r["kind"] == "epoch")
        print(f"{name:26s} {steps[0]:6.3f} -> {steps[-1]:6.3f}                    {errs}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, recs in curves.items():
        pts = [(r["step"], r["train_loss"]) for r in recs if r["kind"] == "step"]
        ax.plot(*zip(*pts), label=name)
    ax.set(xlabel="step", ylabel="training loss", title="AlexNet initialisations: the start of training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(a.out, "init_study.png"), dpi=80)
    print(f"plot: {os.path.join(a.out, 'init_study.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
