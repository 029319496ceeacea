"""Draw one batch as the model sees it, de-normalized back to pixels: check a pipeline by eye.

    python -m tools.show_batch SHARDS OUT.png [--split train|val] [--crop random|center|ten]
                               [--exaggerate K] [--recipe paper] [--checkpoint RUN/checkpoint.pt]

Each tile is labelled with its class name, its crop offset (x, y in pixels of the
256 px image), whether it is mirrored, and its lighting offset in grey levels (R, G,
B; 0-255 units). The lighting of the paper is small (about 12 grey levels at 1 sigma
on ImageNet's first component): --exaggerate K multiplies it so that it shows. The
normalization is the recipe's (pca.json + --recipe), or a checkpoint's with
--checkpoint, exactly as the trainer's loaders apply it.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import replace

import numpy as np

from pipeline import make_loader, plan
from pipeline.normalization import Normalization
from pipeline.shards import ShardError, load_manifest
from model.errors import command


def batch_tiles(shards: str, split: str = "train", crop: str = "random", batch_size: int = 16,
                norm: Normalization | None = None, lighting: bool = True, seed: int = 0,
                backend: str = "auto", side: int = 224) -> list[tuple[np.ndarray, str]]:
    """[(uint8 HWC tile, caption)] of the first batch of epoch 0, as the loader yields it."""
    norm = norm or Normalization.from_shards(shards)
    random = crop == "random"
    lit = random and lighting
    loader = make_loader(shards, split, batch_size=batch_size, crop=crop, normalization=norm, lighting=lit,
                         flip=random, seed=seed, backend=backend, num_threads=2, crop_size=side)
    images, labels = next(iter(loader))
    pixels = np.clip(norm.unapply(images.double().cpu().numpy(), lit=lit), 0, 255).round().astype(np.uint8)
    names = loader.classes
    if random:
        p = loader.params(0, 0)
        lights = loader.lighting_offsets(p)
    tiles = []
    for j, label in enumerate(labels.tolist()):
        if crop == "ten":  # one tile per crop: corners and centre, then mirrored
            for k in range(10):
                x, y = plan.TEN_CROP_POSITIONS[k % 5]
                tiles.append((pixels[j, k].transpose(1, 2, 0), f"{names[label]}\n"
                              f"crop {_offset(x, y, loader.size, side)}{' flip' if k >= 5 else ''}"))
            continue
        if random:
            caption = (f"{names[label]}\ncrop {_offset(p.crop_x[j], p.crop_y[j], loader.size, side)}"
                       f"{' flip' if p.flip[j] else ''}\nlight {_grey(lights[j]) if lit else 'off'}")
        else:
            caption = f"{names[label]}\ncrop {_offset(0.5, 0.5, loader.size, side)}"
        tiles.append((pixels[j].transpose(1, 2, 0), caption))
    return tiles


def _offset(x: float, y: float, size: int, side: int) -> str:
    return f"({plan.crop_offset(x, size, side)}, {plan.crop_offset(y, size, side)})"


def _grey(rgb) -> str:
    return "(" + ", ".join(f"{v:+.1f}" for v in rgb) + ")"


def draw(tiles: list[tuple[np.ndarray, str]], path: str, title: str, columns: int = 8) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = -(-len(tiles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.1 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, caption) in zip(axes.flat, tiles):
        ax.imshow(img)
        ax.set_title(caption, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)  # no half-drawn OUT.png


@command("show_batch")
def main(argv=None) -> int:
    from model.recipes import RECIPES
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("shards", help="shard directory")
    p.add_argument("out", help="PNG file to write")
    p.add_argument("--split", choices=("train", "val"), default="train")
    p.add_argument("--crop", choices=("random", "center", "ten"), default=None,
                   help="default: random for train, center for val")
    p.add_argument("--exaggerate", type=float, default=1.0, help="lighting times this (1 = as trained)")
    p.add_argument("--batch-size", type=int, default=16, help="images in the grid (ten crops: 10 tiles each)")
    p.add_argument("--recipe", choices=tuple(RECIPES), default="paper", help="normalization and lighting of")
    p.add_argument("--checkpoint", help="take the normalization from this checkpoint instead")
    p.add_argument("--seed", type=int, default=0, help="the trainer's --seed: the same batch it starts with")
    p.add_argument("--backend", default="auto", help="dali, wds or auto")
    a = p.parse_args(argv)
    crop = a.crop or ("random" if a.split == "train" else "center")
    if not 1 <= a.batch_size <= 1024 or not (math.isfinite(a.exaggerate) and a.exaggerate >= 0):
        p.error("--batch-size must be in 1..1024 and --exaggerate a finite number >= 0")
    if not 0 <= a.seed < 2 ** 63:
        p.error(f"--seed must be in [0, 2^63), not {a.seed}")
    from tools.figures import check_out
    from model.errors import UsageError
    try:  # before drawing: the directory exists, can be written (a real write) and the format is known
        check_out(a.out)
    except UsageError as e:
        p.error(str(e))
    lighting = RECIPES[a.recipe].lighting
    try:
        load_manifest(a.shards)  # "no such shard directory" before any advice about pca.json
        if a.checkpoint:
            from model.checkpoint import load_model
            from model.errors import UsageError
            try:
                ckpt = load_model(a.checkpoint, "cpu")[1]
            except UsageError as e:
                raise ShardError(str(e)) from None
            from model.checkpoint import input_size
            norm, lighting, side = ckpt["normalization"], ckpt["recipe"]["lighting"], input_size(ckpt)
        else:
            recipe = RECIPES[a.recipe]
            norm = Normalization.from_shards(a.shards, recipe.input_norm, recipe.train_scale)
            side = recipe.input_size
        norm = replace(norm, lighting_gain=a.exaggerate)
        tiles = batch_tiles(a.shards, a.split, crop, a.batch_size, norm, lighting, a.seed, a.backend, side)
    except (ShardError, FileNotFoundError) as e:
        print(f"show_batch: {e}", file=sys.stderr)
        return 2
    title = (f"{a.shards} {a.split}, {side}px crop {crop}, first batch of epoch 0 (seed {a.seed}); input '{norm.mode}'"
             f"{f', lit batches x{norm.train_scale:.3f}' if norm.train_scale != 1 else ''}; "
             f"lighting x{a.exaggerate:g}; shown de-normalized to 0-255")
    draw(tiles, a.out, title, columns=10 if crop == "ten" else 8)
    print(f"wrote {a.out}: {len(tiles)} tiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
