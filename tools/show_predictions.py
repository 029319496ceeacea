"""Figure 4 (left) of the paper from any checkpoint: validation images with the model's top-5 labels.

    python -m tools.show_predictions RUN/checkpoint.pt SHARDS OUT.png [--n 8]

The first N validation images (source order, centre crop, eval mode, the
checkpoint's normalization), each with its five most probable classes as bars of
their softmax probability, most probable on top. The true class is written under
the image; its bar, where it is among the five, is red (the paper's figure marks
it the same way). Class names come from the shard manifest, which must hold the
checkpoint's classes.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from model.errors import UsageError, command
from tools.figures import check_out, open_model, save


def top5_rows(probs: np.ndarray, labels: np.ndarray, names: list[str]) -> list[dict]:
    """Per image: its true class name, its top-5 (name, probability) pairs in descending probability,
    and the rank of the true class among them (None if it is not there)."""
    rows = []
    for p, label in zip(np.asarray(probs, np.float64), np.asarray(labels)):
        order = np.argsort(-p, kind="stable")[:min(5, len(p))]
        rank = next((r for r, c in enumerate(order) if c == label), None)
        rows.append({"true": names[int(label)], "top5": [(names[int(c)], float(p[c])) for c in order],
                     "true_rank": rank})
    return rows


@torch.no_grad()
def predict_first(model, loader, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(float images [n, 3, H, W] as the loader gives them, softmax [n, C], labels [n]) of the first n."""
    images, probs, labels = [], [], []
    for x, y in loader:
        images.append(x)
        probs.append(torch.softmax(model(x).float(), 1))
        labels.append(y)
        if sum(len(t) for t in labels) >= n:
            break
    return (torch.cat(images)[:n].numpy(), torch.cat(probs)[:n].numpy(), torch.cat(labels)[:n].numpy())


def draw(pixels: np.ndarray, rows: list[dict], path: str, title: str, columns: int = 4) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    n = len(rows)
    grid_rows = -(-n // columns)
    fig, axes = plt.subplots(2 * grid_rows, columns, figsize=(3.2 * columns, 4.6 * grid_rows), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.6] * grid_rows})
    for ax in axes.flat:
        ax.axis("off")
    for i, (img, row) in enumerate(zip(pixels, rows)):
        top, bars = axes[2 * (i // columns), i % columns], axes[2 * (i // columns) + 1, i % columns]
        top.imshow(img)
        top.set_title(row["true"], fontsize=8)
        names = [name for name, _ in row["top5"]][::-1]
        values = [prob for _, prob in row["top5"]][::-1]
        colours = ["tab:red" if len(names) - 1 - k == row["true_rank"] else "tab:blue" for k in range(len(names))]
        bars.axis("on")
        bars.barh(range(len(names)), values, color=colours)
        bars.set_yticks(range(len(names)), [name[:22] for name in names], fontsize=7)
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save(fig, path)


@command("show_predictions")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="RUN/checkpoint.pt of model.train")
    p.add_argument("shards", help="shard directory with a val split of the checkpoint's classes")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--n", type=int, default=8, help="validation images to show (the first ones)")
    p.add_argument("--backend", default="auto", help="data pipeline: dali, wds or auto")
    a = p.parse_args(argv)
    from model.evaluation import open_val
    try:
        if not 1 <= a.n <= 256:
            raise UsageError(f"--n must be in 1..256, not {a.n}")
        check_out(a.out)
        model, ckpt, _ = open_model(a.checkpoint, a.shards)
        norm = ckpt["normalization"]
        from model.checkpoint import input_size
        loader = open_val(a.shards, batch_size=min(a.n, 64), crop="center", normalization=norm, backend=a.backend,
                          crop_size=input_size(ckpt),
                          num_threads=2)
    except UsageError as e:
        print(f"show_predictions: {e}", file=sys.stderr)
        return 2
    images, probs, labels = predict_first(model, loader, a.n)
    pixels = np.clip(norm.unapply(images.astype(np.float64), lit=False), 0, 255).round().astype(np.uint8)
    rows = top5_rows(probs, labels, loader.classes)
    draw(pixels.transpose(0, 2, 3, 1), rows, a.out,
         f"{a.checkpoint} (step {ckpt['step']}) on the first {len(rows)} val images of {a.shards}, centre crop; "
         "red: the true class")
    right = sum(r["true_rank"] == 0 for r in rows)
    print(f"{right} of {len(rows)} top-1 right, {sum(r['true_rank'] is not None for r in rows)} top-5 -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
