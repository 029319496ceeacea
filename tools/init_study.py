"""Train each recipe on the same data, seed and step budget, and show which ones leave chance.

    python -m tools.init_study SHARDS [--steps 300] [--batch-size 64] [--out runs/init_study]
                               [--variants paper,caffe,kaiming,old-default] [--diagnose-only] [--trace STEPS]

Variants (model/recipes.py, README "Recipes"):
  paper         the default recipe: paper init, 0-255 input minus the mean, bias lr x2, no bias decay,
                lighting in standard deviations, lit batches x 1/1.1, LRN alpha/n
  caffe         Caffe's bvlc_alexnet (biases 0.1, fc6/fc7 N(0, 0.005), LRN k=1, no lighting)
  kaiming       the paper recipe with He init (and so (x/255 - mean)/std input)
  old-default   this project's default before the recipes: paper init, std input, biases at the
                weights' lr and decayed, the printed LRN formula, no 1/1.1 scale
Every variant runs with the same batch size and a constant lr (the schedule is not under
study), so only what the variants name differs. First a diagnosis at initialisation, in
seconds: how strongly fc7's output and the logits depend on the image, per variant.
Then the runs: the mean loss of the first 4 steps, of the last 10, and the val top-1
error after each epoch; OUT/init_study.png draws the loss curves, OUT/init_study.json
holds the numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys

VARIANTS = {
    "paper": [],
    "caffe": ["--recipe", "caffe"],
    "kaiming": ["--init", "kaiming"],
    "old-default": ["--input-norm", "std", "--bias-lr-mult", "1", "--bias-decay", "--lrn-convention", "alpha",
                    "--train-scale", "1"],
}


def diagnose(shards: str, names: list[str], batch_size: int) -> dict:
    """At init, on one real batch (eval mode): fc7's mean output, how much of it depends on the
    image (std across images / mean), the logits' spread across images relative to their size,
    and the loss."""
    import torch
    import torch.nn.functional as F

    from model import train
    from model.alexnet import AlexNet
    from pipeline import make_loader
    from pipeline.normalization import Normalization
    out = {}
    print("variant       fc7 mean   fc7 image-dependence   logit spread / size   loss at init")
    for name in names:
        cfg = train.config_from_args(["--shards", shards, *VARIANTS[name]])
        recipe = train.resolve_recipe(cfg)
        norm = Normalization.from_shards(shards, recipe.input_norm, recipe.train_scale)
        loader = make_loader(shards, "train", batch_size=batch_size, normalization=norm, lighting=False,
                             num_threads=2)
        x, y = next(iter(loader))
        torch.manual_seed(0)
        model = AlexNet(cfg=recipe.model_config(len(loader.classes))).eval()
        with torch.no_grad():
            h = torch.flatten(model.features(x), 1)
            h7 = F.relu(model.fc7(F.relu(model.fc6(h))))
            logits = model.fc8(h7)
        row = {"fc7_mean": h7.mean().item(), "fc7_image_dependence": (h7.std(0).mean() / h7.mean()).item(),
               "logit_spread": (logits.std(0).mean() / logits.abs().mean()).item(),
               "loss_at_init": F.cross_entropy(logits, y).item()}
        out[name] = row
        print(f"{name:12s} {row['fc7_mean']:9.3g} {row['fc7_image_dependence']:17.2e} {row['logit_spread']:20.2e} "
              f"{row['loss_at_init']:14.3f}")
    return out


def trace(shards: str, names: list[str], steps: int, batch_size: int, lr: float) -> dict:
    """The first `steps` steps of each variant, with the trainer's own optimizer and step, and at each
    step: the loss, and on a fixed batch of val images in eval mode, the share of fc7 units that are
    zero for every image (dead), how much fc7's output depends on the image (std across images /
    mean), and the logits' spread across images relative to their size.
    Shows where the signal goes when a variant stays at chance."""
    import torch
    import torch.nn.functional as F

    from model import train
    from model.alexnet import AlexNet
    from pipeline import make_loader
    from pipeline.normalization import Normalization
    out = {}
    for name in names:
        cfg = train.config_from_args(["--shards", shards, "--lr", str(lr), *VARIANTS[name]])
        recipe = train.resolve_recipe(cfg)
        norm = Normalization.from_shards(shards, recipe.input_norm, recipe.train_scale)
        loader = make_loader(shards, "train", batch_size=batch_size, normalization=norm, lighting=recipe.lighting,
                             num_threads=2)
        torch.manual_seed(0)
        model = AlexNet(cfg=recipe.model_config(len(loader.classes)))
        optimizer = train.make_optimizer(model, recipe)
        seen = {}
        model.fc7.register_forward_hook(lambda m, i, o: seen.__setitem__("fc7", F.relu(o.detach())))
        model.fc8.register_forward_hook(lambda m, i, o: seen.__setitem__("fc8", o.detach()))
        probe, _ = next(iter(make_loader(shards, "val", batch_size=batch_size, normalization=norm, num_threads=2)))
        rows, step = [], 0
        while step < steps:
            for x, y in loader:
                loss = train.train_step(model, optimizer, x, y, recipe.lr, bf16=False)
                with torch.no_grad():  # the probe: fixed val images, eval mode (no dropout noise)
                    model.eval()
                    model(probe)
                    model.train()
                h7, logits = seen["fc7"], seen["fc8"]
                rows.append({"step": step + 1, "loss": loss.item(), "fc7_dead": (h7.amax(0) == 0).float().mean().item(),
                             "fc7_image_dependence": (h7.std(0).mean() / h7.mean().clamp_min(1e-12)).item(),
                             "logit_spread": (logits.std(0).mean() / logits.abs().mean()).item()})
                step += 1
                if step == steps:
                    break
        out[name] = rows
        print(f"\n{name}: step   loss    fc7 dead   fc7 image-dependence   logit spread / size")
        for r in rows:
            if r["step"] in (1, 2, 3, 4, 5, 6, 8, 10, 15, 20, 30, 40, 60, 80, 100) or r["step"] == steps:
                print(f"{'':12s}{r['step']:4d} {r['loss']:7.3f} {100 * r['fc7_dead']:8.1f}% "
                      f"{r['fc7_image_dependence']:17.2e} {r['logit_spread']:20.2e}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("shards")
    p.add_argument("--steps", type=int, default=300, help="at least this many steps per variant (whole epochs)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01, help="constant, for every variant")
    p.add_argument("--devices", default="auto")
    p.add_argument("--out", default="runs/init_study")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, of: " + ", ".join(VARIANTS))
    p.add_argument("--diagnose-only", action="store_true", help="only the table at initialisation")
    p.add_argument("--trace", type=int, default=0, metavar="STEPS",
                   help="only follow each variant's first STEPS steps (loss, dead fc7 units, image dependence)")
    a = p.parse_args(argv)
    names = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown or a.steps < 1 or a.batch_size < 1:
        p.error(f"unknown variants {unknown}" if unknown else "--steps and --batch-size must be >= 1")
    os.makedirs(a.out, exist_ok=True)
    if a.trace:
        with open(os.path.join(a.out, "trace.json"), "w") as f:
            json.dump(trace(a.shards, names, a.trace, a.batch_size, a.lr), f)
        return 0
    report = {"diagnosis": diagnose(a.shards, names, min(a.batch_size, 64))}
    if a.diagnose_only:
        return 0
    from model import train
    from pipeline.shards import load_manifest
    train_images = load_manifest(a.shards)["splits"]["train"]["samples"]
    steps_per_epoch = -(-train_images // a.batch_size)
    epochs = -(-a.steps // steps_per_epoch)
    num_classes = len(load_manifest(a.shards)["classes"])
    print(f"\n{len(names)} variants x {epochs} epochs of {steps_per_epoch} steps (batch {a.batch_size}, "
          f"constant lr {a.lr}); chance: loss ln {num_classes} = {math.log(num_classes):.3f}, "
          f"top-1 error {100 * (1 - 1 / num_classes):.1f}%", flush=True)
    runs = {}
    for name in names:
        run = os.path.join(a.out, name)
        shutil.rmtree(run, ignore_errors=True)
        print(f"--- {name}", flush=True)
        rc = train.main(["--shards", a.shards, "--out", run, "--epochs", str(epochs), "--batch-size",
                         str(a.batch_size), "--lr", str(a.lr), "--schedule", "step", "--step-epochs", "100000",
                         "--devices", a.devices, "--log-every", "1", "--stall-steps", "0", *VARIANTS[name]])
        with open(os.path.join(run, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        losses = [r["train_loss"] for r in records if r["kind"] == "step"]
        runs[name] = {"exit": rc, "losses": losses, "first4": sum(losses[:4]) / max(1, len(losses[:4])),
                      "last10": sum(losses[-10:]) / max(1, len(losses[-10:])),
                      "val_top1_error": [r["val_top1_error"] for r in records if r["kind"] == "epoch"]}
    report["runs"] = runs
    report["setup"] = {"shards": a.shards, "steps_per_epoch": steps_per_epoch, "epochs": epochs,
                       "batch_size": a.batch_size, "lr": a.lr, "num_classes": num_classes}
    print(f"\nvariant       first 4 steps   last 10 steps   val top-1 error per epoch    (chance: loss "
          f"{math.log(num_classes):.3f})")
    for name, r in runs.items():
        errs = " ".join(f"{100 * e:5.1f}%" for e in r["val_top1_error"])
        print(f"{name:12s} {r['first4']:14.3f} {r['last10']:15.3f}   {errs}"
              + ("" if r["exit"] == 0 else f"   (stopped: exit {r['exit']})"))
    with open(os.path.join(a.out, "init_study.json"), "w") as f:
        json.dump(report, f, indent=1)
    draw(runs, num_classes, os.path.join(a.out, "init_study.png"))
    print(f"plot: {os.path.join(a.out, 'init_study.png')}")
    return 0


def draw(runs: dict, num_classes: int, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, r in runs.items():
        losses = r["losses"]
        k = 10  # a 10-step running mean: single steps are noisy at this batch size
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / (i + 1 - max(0, i - k + 1)) for i in range(len(losses))]
        ax.plot(range(1, len(losses) + 1), smooth, label=name)
    ax.axhline(math.log(num_classes), color="grey", ls="--", lw=1, label=f"chance, ln {num_classes}")
    ax.set(xlabel="step", ylabel="training loss (10-step mean)", title="AlexNet recipes: the start of training",
           ylim=(0, 2 * math.log(num_classes)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
