"""Train each recipe on the same data, seed and image budget, and show which ones leave chance.

    python -m tools.dev.init_study SHARDS [--epochs 3] [--batch-size 128] [--out runs/init_study]
        [--variants paper,cuda-convnet2,caffe,kaiming,cuda-convnet2@32] [--probe-every 4] [--reuse]

Variants (model/recipes.py, README "Recipes"), each the paper recipe but for what it names:
  paper          the paper's init (section 5): N(0, 0.01), biases 1 in conv2, conv4, conv5, fc6, fc7
  cuda-convnet2  the authors' released init (layers-223-1gpu.cfg): conv3-5 N(0, 0.03)
  caffe          Caffe's bvlc_alexnet recipe whole (biases 0.1, fc6/fc7 N(0, 0.005), LRN k=1, no lighting)
  kaiming        He init (and so (x/255 - mean)/std input)
  old-default    this project's first default: paper init, std input, biases at the weights' lr and
                 decayed, the printed LRN formula, no 1/1.1 scale
NAME@B runs a variant at batch B instead of --batch-size. Every variant runs in the paper's
regime: its recipe's step per image (lr scaled with the batch, model/recipes.py resolve), a
constant lr (the schedule is not under study), the same epochs, seed and data. The runs
are model.train's own (--no-checkpoints), with the fc7 probe every --probe-every steps: the
share of fc7 units that are 0 for every image of a fixed val batch. First a diagnosis at
initialisation, in seconds. OUT/init_study.json holds every number, OUT/init_study.png the
loss and dead-unit curves.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

VARIANTS = {
    "paper": ["--init", "paper"],
    "cuda-convnet2": ["--init", "cuda-convnet2"],
    "caffe": ["--recipe", "caffe"],
    "kaiming": ["--init", "kaiming"],
    "old-default": ["--init", "paper", "--input-norm", "std", "--bias-lr-mult", "1", "--bias-decay",
                    "--lrn-convention", "alpha", "--train-scale", "1"],
}
DEFAULT_VARIANTS = "paper,cuda-convnet2,caffe,kaiming,cuda-convnet2@32"
WINDOW = 20  # steps of the running mean that decides "leaves chance"


def parse_variant(spec: str, batch_size: int) -> tuple[str, int]:
    """'name' or 'name@batch' -> (name, batch)."""
    name, _, batch = spec.partition("@")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r} (of: {', '.join(VARIANTS)})")
    if batch and not (batch.isdigit() and int(batch) > 0):
        raise ValueError(f"{spec!r}: the batch after @ must be a positive integer")
    return name, int(batch) if batch else batch_size


def leaves_chance_at(losses: list[float], num_classes: int, window: int = WINDOW) -> int | None:
    """The first step from which the `window`-step running mean of the loss stays more than 1 %
    below ln(C) to the end; None if it never does."""
    limit = 0.99 * math.log(num_classes)
    means = [sum(losses[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(losses))]
    first = None
    for i, m in enumerate(means):
        if m < limit:
            first = i + 1 if first is None else first
        else:
            first = None
    return first


def diagnose(shards: str, names: list[str], batch_size: int) -> dict:
    """At init, on one real batch (eval mode): fc7's mean output, how much of it depends on the
    image (std across images / mean), the logits' spread across images relative to their size,
    and the loss."""
    import torch
    import torch.nn.functional as F

    from model import options
    from model.alexnet import AlexNet
    from pipeline import make_loader
    from pipeline.normalization import Normalization
    out = {}
    print("variant        fc7 mean   fc7 image-dependence   logit spread / size   loss at init")
    for name in names:
        cfg = options.config_from_args(["--shards", shards, *VARIANTS[name]])
        recipe = options.resolve_recipe(cfg)
        norm = Normalization.from_shards(shards, recipe.input_norm, recipe.train_scale)
        loader = make_loader(shards, "train", batch_size=batch_size, normalization=norm, lighting=False,
                             num_threads=2)
        x, y = next(iter(loader))
        torch.manual_seed(0)
        model = AlexNet(cfg=recipe.model_config(len(loader.classes))).eval()
        with torch.no_grad():
            h7 = model.hidden(x)
            logits = model.fc8(h7)
        row = {"fc7_mean": h7.mean().item(), "fc7_image_dependence": (h7.std(0).mean() / h7.mean()).item(),
               "logit_spread": (logits.std(0).mean() / logits.abs().mean()).item(),
               "loss_at_init": F.cross_entropy(logits, y).item()}
        out[name] = row
        print(f"{name:13s} {row['fc7_mean']:9.3g} {row['fc7_image_dependence']:17.2e} {row['logit_spread']:20.2e} "
              f"{row['loss_at_init']:14.3f}")
    return out


def run_variant(shards: str, spec: str, name: str, batch: int, a, num_classes: int) -> dict:
    """One model.train run of a variant (or its finished run, with --reuse); its numbers."""
    from model import train
    run = os.path.join(a.out, spec.replace("@", "-b"))
    metrics = os.path.join(run, "metrics.jsonl")
    args = ["--shards", shards, "--out", run, "--epochs", str(a.epochs), "--batch-size", str(batch),
            "--schedule", "step", "--step-epochs", "100000", "--devices", a.devices, "--log-every", "1",
            "--probe-every", str(a.probe_every), "--stall-steps", "0", "--no-checkpoints", "--width", str(a.width),
            *VARIANTS[name]]
    records = []
    if a.reuse and os.path.exists(metrics):
        with open(metrics, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    if sum(r["kind"] == "epoch" for r in records) != a.epochs:
        shutil.rmtree(run, ignore_errors=True)
        print(f"--- {spec}: python -m model.train {' '.join(args)}", flush=True)
        rc = train.main(args)
        with open(metrics, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
    else:
        rc = 0
        print(f"--- {spec}: reusing {run}", flush=True)
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    steps = [r for r in records if r["kind"] == "step"]
    losses = [r["train_loss"] for r in steps]
    epochs = [r for r in records if r["kind"] == "epoch"]
    return {"variant": name, "batch_size": batch, "lr": config["lr"]["weights"], "lr_rule": config["lr"]["rule"],
            "exit": rc, "losses": losses,
            "fc7_dead": {r["step"]: r["fc7_dead"] for r in steps if "fc7_dead" in r},
            "first4": sum(losses[:4]) / max(1, len(losses[:4])), "peak": max(losses, default=float("nan")),
            "last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
            "leaves_chance_at_step": leaves_chance_at(losses, num_classes),
            "val": [{k: e[k] for k in ("step", "val_loss", "val_top1_error", "val_top5_error")} for e in epochs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("shards")
    p.add_argument("--epochs", type=int, default=3, help="passes over the training set, for every variant")
    p.add_argument("--batch-size", type=int, default=128, help="the paper's; NAME@B overrides it per variant")
    p.add_argument("--probe-every", type=int, default=4, help="steps between fc7 probes")
    p.add_argument("--devices", default="auto")
    p.add_argument("--out", default="runs/init_study")
    p.add_argument("--variants", default=DEFAULT_VARIANTS, help="comma-separated NAME or NAME@BATCH, of: "
                   + ", ".join(VARIANTS))
    p.add_argument("--width", type=float, default=1.0, help="the model's width (1 = the paper's; the GPU check's "
                   "dry run rehearses at 1/8)")
    p.add_argument("--reuse", action="store_true", help="keep the finished runs of earlier calls into --out")
    p.add_argument("--diagnose-only", action="store_true", help="only the table at initialisation")
    a = p.parse_args(argv)
    specs = [v.strip() for v in a.variants.split(",") if v.strip()]
    try:
        parsed = [parse_variant(v, a.batch_size) for v in specs]
    except ValueError as e:
        p.error(str(e))
    if a.epochs < 1 or a.batch_size < 1 or a.probe_every < 1:
        p.error("--epochs, --batch-size and --probe-every must be >= 1")
    os.makedirs(a.out, exist_ok=True)
    from pipeline.shards import load_manifest
    manifest = load_manifest(a.shards)
    num_classes, train_images = len(manifest["classes"]), manifest["splits"]["train"]["samples"]
    names = list(dict.fromkeys(n for n, _ in parsed))
    report = {"diagnosis": diagnose(a.shards, names, min(a.batch_size, 64))}
    if a.diagnose_only:
        return 0
    print(f"\n{len(specs)} runs x {a.epochs} epochs of {train_images} images, each at its recipe's step per image "
          f"and a constant lr; chance: loss ln {num_classes} = {math.log(num_classes):.3f}, "
          f"top-1 error {100 * (1 - 1 / num_classes):.1f}%", flush=True)
    runs = {spec: run_variant(a.shards, spec, name, batch, a, num_classes) for spec, (name, batch) in zip(specs, parsed)}
    report["runs"] = runs
    report["setup"] = {"shards": a.shards, "epochs": a.epochs, "train_images": train_images,
                       "num_classes": num_classes, "probe_every": a.probe_every, "width": a.width, "window": WINDOW}
    print_table(runs, num_classes)
    with open(os.path.join(a.out, "init_study.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    draw(runs, num_classes, os.path.join(a.out, "init_study.png"))
    print(f"numbers: {os.path.join(a.out, 'init_study.json')}; plot: {os.path.join(a.out, 'init_study.png')}")
    return 0


def print_table(runs: dict, num_classes: int) -> None:
    print(f"\nvariant            batch  lr       first 4 (peak)   last 10   leaves chance   val top-1 error per "
          f"epoch   (chance: loss {math.log(num_classes):.3f})")
    for spec, r in runs.items():
        errs = " ".join(f"{100 * e['val_top1_error']:5.1f}%" for e in r["val"])
        left = "never" if r["leaves_chance_at_step"] is None else f"step {r['leaves_chance_at_step']}"
        print(f"{spec:18s} {r['batch_size']:5d}  {r['lr']:<8.4g} {r['first4']:6.3f} ({r['peak']:6.3f})  "
              f"{r['last10']:7.3f}   {left:13s}   {errs}" + ("" if r["exit"] == 0 else f"   (stopped: exit {r['exit']})"))
    probes = sorted({s for r in runs.values() for s in r["fc7_dead"]})
    if probes:
        print("\nfc7 units dead (0 for every image of a val batch), by images seen:")
        for spec, r in runs.items():
            seen = {r["batch_size"] * int(s): d for s, d in r["fc7_dead"].items()}
            # the probe nearest to each of six image counts spread over the run, the same for every batch
            targets = [round(max(seen) * k / 6) for k in range(1, 7)]
            row = " ".join(f"{n:>6d}:{100 * seen[n]:5.1f}%" for n in
                           dict.fromkeys(min(seen, key=lambda n: abs(n - t)) for t in targets))
            print(f"{spec:18s} {row}")


def draw(runs: dict, num_classes: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    for spec, r in runs.items():
        losses, b = r["losses"], r["batch_size"]
        k = max(1, 10 * 128 // b)  # a running mean over ~1,280 images: single steps are noisy
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(losses))]
        line, = ax.plot([b * (i + 1) for i in range(len(losses))], smooth, label=f"{spec} (lr {r['lr']:.3g})")
        bx.plot([b * int(s) for s in r["fc7_dead"]], [100 * d for d in r["fc7_dead"].values()], color=line.get_color(),
                label=spec)
    ax.axhline(math.log(num_classes), color="grey", ls="--", lw=1, label=f"chance, ln {num_classes}")
    ax.set(xlabel="training images seen", ylabel="training loss (running mean over ~1,280 images)",
           title="AlexNet inits in the paper's regime: the loss", ylim=(0, 2 * math.log(num_classes)))
    bx.set(xlabel="training images seen", ylabel="% of fc7 units dead on a val batch",
           title="fc7 units that output 0 for every image", ylim=(0, 100))
    for x in (ax, bx):
        x.grid(alpha=0.3)
        x.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
