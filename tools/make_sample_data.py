"""Generate a small, synthetic, ImageNet-like source tree in any of the three layouts.

    python -m tools.make_sample_data OUT [--layout folder|kaggle|tars] [--classes 10]

The images are SYNTHETIC: each class is a combination of a shape or texture (disc,
ring, stripes, checker, ...), a colour and, past 100 classes, a fill style (solid or
outline), drawn at a random position and scale on a noisy background with a few
small distractor shapes of other colours (clutter). Each colour is shared by 10
classes and each shape by 10, so neither the mean colour of an image nor its shape
alone names the class; only the combination does. Nothing here is ImageNet data. The wnids are made up
(n91000000, n91000001, ...) and the class names say "synthetic".

The tree carries the quirks of real ILSVRC-2012 that break naive tools: a PNG
named .JPEG, CMYK JPEGs, grayscale JPEGs, an image far smaller than 256 px and one
with an extreme aspect ratio. In the `tars` layout the devkit's meta.mat numbers
the classes (ILSVRC2012_ID) in an order that is NOT the sorted-wnid order, and has
non-leaf synsets too, as the real one does.

Output is deterministic for a given --seed.
"""
from __future__ import annotations

import argparse
import csv
import io
import os
import sys
import tarfile
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

ILSVRC_LAYOUTS = ("folder", "kaggle", "tars")  # ILSVRC-2012's: train and val splits
LAYOUTS = ILSVRC_LAYOUTS + ("fall11-tar", "fall11-tars", "fall11-folders")
# fall11-*: the ImageNet Fall 2011 release's distributions, every image of a synset in one place (no val
# split; make_shards holds one out with --val-fraction): fall11_whole.tar (a tar per synset inside),
# one <wnid>.tar per synset, or one <wnid>/ folder per synset; with words.txt. The val images are not used.
SHAPES = ("disc", "square", "triangle", "ring", "cross", "hstripes", "vstripes", "checker", "diamond", "dots")
# One hue per class, spread around the colour wheel (RGB, 0-255).
COLOURS = (
    (220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30), (200, 60, 200),
    (30, 200, 210), (240, 130, 20), (120, 60, 20), (250, 250, 250), (20, 20, 20),
)


@dataclass(frozen=True)
class SampleClass:
    wnid: str
    name: str
    shape: str
    colour: tuple[int, int, int]
    outline: bool = False  # drawn as an outline instead of filled (classes 100-199, 300-399, ...)


def make_classes(count: int) -> list[SampleClass]:
    """Class i: shape i % 10, colour (i % 10 + i // 10) % 10, outline if (i // 100) is odd. The first
    100 classes are the 100 (shape, colour) pairs, each once; 200 classes add the outline style
    (beyond 200, appearances repeat)."""
    classes = []
    for i in range(count):
        shape, colour = SHAPES[i % 10], COLOURS[(i % 10 + i // 10) % 10]
        outline = (i // 100) % 2 == 1
        classes.append(SampleClass(wnid=f"n91{i:06d}", name=f"synthetic {shape} {i}", shape=shape,
                                   colour=colour, outline=outline))
    return classes


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, r: int, colour, outline: bool,
                rng: np.random.Generator) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    width = max(2, r // 6)
    fill = dict(outline=colour, width=width) if outline else dict(fill=colour)
    s = shape
    if s == "disc":
        draw.ellipse(box, **fill)
    elif s == "square":
        draw.rectangle(box, **fill)
    elif s == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], **fill)
    elif s == "ring":
        draw.ellipse(box, outline=colour, width=max(3, r // (8 if outline else 4)))
    elif s == "cross":
        t = max(3, r // 3)
        for rect in ((cx - r, cy - t, cx + r, cy + t), (cx - t, cy - r, cx + t, cy + r)):
            draw.rectangle(rect, **fill)
    elif s in ("hstripes", "vstripes"):
        step = max(4, r // 4)
        for k in range(-r, r, 2 * step):
            rect = (cx - r, cy + k, cx + r, cy + k + step) if s == "hstripes" else (cx + k, cy - r, cx + k + step, cy + r)
            draw.rectangle(rect, **fill)
    elif s == "checker":
        step = max(4, r // 3)
        for i, y in enumerate(range(cy - r, cy + r, step)):
            for j, x in enumerate(range(cx - r, cx + r, step)):
                if (i + j) % 2 == 0:
                    draw.rectangle((x, y, x + step - 1, y + step - 1), **fill)
    elif s == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], **fill)
    elif s == "dots":
        d = max(3, r // 5)
        for _ in range(12):
            x, y = rng.integers(cx - r, cx + r), rng.integers(cy - r, cy + r)
            draw.ellipse((x - d, y - d, x + d, y + d), **fill)


def draw_image(cls: SampleClass, rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """One RGB picture: clutter, then the class's shape in its colour, on a noisy background."""
    w, h = size
    base = rng.integers(60, 196, size=3)
    noise = rng.normal(0, 18, size=(h // 4 + 1, w // 4 + 1, 3))
    cells = np.clip(base + noise, 0, 255).astype(np.uint8)  # 4x4-pixel cells, scaled up after rounding:
    background = cells.repeat(4, axis=0).repeat(4, axis=1)[:h, :w]  # the same pixels, a quarter of the time
    img = Image.fromarray(background, "RGB")
    draw = ImageDraw.Draw(img)
    side = min(w, h)
    for _ in range(int(rng.integers(0, 3))):  # clutter: small shapes of any shape and colour
        rc = max(3, int(side * rng.uniform(0.05, 0.12)))
        _draw_shape(draw, SHAPES[int(rng.integers(len(SHAPES)))], int(rng.uniform(0, w)), int(rng.uniform(0, h)),
                    rc, COLOURS[int(rng.integers(len(COLOURS)))], False, rng)
    r = int(side * rng.uniform(0.22, 0.4))
    cx = int(rng.uniform(r, w - r)) if w > 2 * r else w // 2
    cy = int(rng.uniform(r, h - r)) if h > 2 * r else h // 2
    jitter = rng.integers(-25, 26, size=3)
    colour = tuple(int(c) for c in np.clip(np.array(cls.colour) + jitter, 0, 255))
    _draw_shape(draw, cls.shape, cx, cy, r, colour, cls.outline, rng)
    return img


def encode(img: Image.Image, kind: str) -> bytes:
    """Bytes of the file as it will sit on disk; `kind` picks the real-ImageNet quirk."""
    buf = io.BytesIO()
    if kind == "png":  # ILSVRC train has one PNG named .JPEG
        img.save(buf, "PNG")
    elif kind == "cmyk":  # ... and 22 CMYK JPEGs
        img.convert("CMYK").save(buf, "JPEG", quality=90)
    elif kind == "gray":  # ... and grayscale JPEGs in both splits
        img.convert("L").save(buf, "JPEG", quality=90)
    else:
        img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


# (split, class index, image index within that class) -> (quirk, forced size)
def quirk_for(split: str, c: int, j: int) -> tuple[str, tuple[int, int] | None]:
    if split == "train" and j == 0:
        return {0: ("png", None), 1: ("cmyk", None), 2: ("gray", None),
                3: ("jpeg", (150, 100)), 4: ("jpeg", (1200, 160))}.get(c, ("jpeg", None))
    if split == "train" and j == 1 and c == 1:
        return ("cmyk", None)
    if split == "val" and j == 0:
        return {0: ("gray", None), 1: ("jpeg", (180, 120)), 2: ("cmyk", None)}.get(c, ("jpeg", None))
    return ("jpeg", None)


def generate(out: str, layout: str = "folder", classes: int = 10, train_per_class: int = 100,
             val_per_class: int = 20, seed: int = 0, quirks: bool = True) -> dict:
    """Write the tree under `out`; returns the truth: {split: {file stem: wnid}} and the classes."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    rng = np.random.default_rng(seed)
    cls_list = make_classes(classes)

    def image_bytes(split: str, c: int, j: int) -> bytes:
        kind, forced = quirk_for(split, c, j) if quirks else ("jpeg", None)
        size = forced or (int(rng.integers(400, 640)), int(rng.integers(300, 480)))
        return encode(draw_image(cls_list[c], rng, size), kind)

    train = {c: [(f"{cls_list[c].wnid}_{1000 + 7 * j}", image_bytes("train", c, j))
                 for j in range(train_per_class)] for c in range(classes)}
    # Val images are numbered across classes in a shuffled order, as in ILSVRC2012.
    val_pairs = [(c, j) for c in range(classes) for j in range(val_per_class)]
    order = rng.permutation(len(val_pairs))
    val = [(f"ILSVRC2012_val_{n + 1:08d}", val_pairs[i][0], image_bytes("val", *val_pairs[i]))
           for n, i in enumerate(order)]

    os.makedirs(out, exist_ok=True)
    writer = {"folder": _write_folder, "kaggle": _write_kaggle, "tars": _write_tars, "fall11-tar": _write_fall11,
              "fall11-tars": _write_fall11, "fall11-folders": _write_fall11}[layout]
    if layout.startswith("fall11"):
        _write_fall11(out, cls_list, train, layout)
        val = []
    else:
        writer(out, cls_list, train, val, rng)
    with open(os.path.join(out, "SYNTHETIC_README.txt"), "w", encoding="utf-8") as f:
        f.write("Synthetic sample data made by tools/make_sample_data.py. NOT ImageNet: coloured shapes "
                "on noise, in the ImageNet layout '%s', for demos and tests.\n" % layout)
    return {
        "classes": [(c.wnid, c.name) for c in cls_list],
        "train": {stem: cls_list[c].wnid for c in train for stem, _ in train[c]},
        "val": {stem: cls_list[c].wnid for stem, c, _ in val},
    }


def _write_fall11(out, cls_list, train, layout):
    with open(os.path.join(out, "words.txt"), "w", encoding="utf-8") as f:  # as the release's: wnid, tab, comma-separated names
        f.writelines(f"{c.wnid}\t{c.name}, {c.name} (synthetic)\n" for c in cls_list)
    outer = tarfile.open(os.path.join(out, "fall11_whole.tar"), "w") if layout == "fall11-tar" else None
    for c, items in train.items():
        wnid = cls_list[c].wnid
        if layout == "fall11-folders":
            for stem, data in items:
                _write_file(os.path.join(out, wnid, stem + ".JPEG"), data)
            continue
        inner = io.BytesIO()
        with tarfile.open(fileobj=inner, mode="w") as tf:
            for stem, data in items:
                _tar_add(tf, stem + ".JPEG", data)
        if outer is not None:
            _tar_add(outer, wnid + ".tar", inner.getvalue())
        else:
            _write_file(os.path.join(out, wnid + ".tar"), inner.getvalue())
    if outer is not None:
        outer.close()


def _write_file(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _write_folder(out, cls_list, train, val, rng):
    for c, items in train.items():
        for stem, data in items:
            _write_file(os.path.join(out, "train", cls_list[c].wnid, stem + ".JPEG"), data)
    for stem, c, data in val:
        _write_file(os.path.join(out, "val", cls_list[c].wnid, stem + ".JPEG"), data)
    _write_synset_mapping(out, cls_list)  # class names, as many folder copies of ImageNet carry


def _write_synset_mapping(out, cls_list):
    with open(os.path.join(out, "LOC_synset_mapping.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{c.wnid} {c.name}\n" for c in cls_list)


def _write_kaggle(out, cls_list, train, val, rng):
    root = os.path.join(out, "ILSVRC", "Data", "CLS-LOC")
    for c, items in train.items():
        for stem, data in items:
            _write_file(os.path.join(root, "train", cls_list[c].wnid, stem + ".JPEG"), data)
    for stem, c, data in val:
        _write_file(os.path.join(root, "val", stem + ".JPEG"), data)
    _write_synset_mapping(out, cls_list)
    rows = [(stem, f"{cls_list[c].wnid} 10 20 200 220 {cls_list[c].wnid} 30 40 100 120 ") for stem, c, _ in val]
    rows = [rows[i] for i in rng.permutation(len(rows))]  # the real CSV is not in file order
    with open(os.path.join(out, "LOC_val_solution.csv"), "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "PredictionString"])
        w.writerows(rows)


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1335830400, 0o644  # fixed mtime: deterministic
    tf.addfile(info, io.BytesIO(data))


def _write_tars(out, cls_list, train, val, rng):
    with tarfile.open(os.path.join(out, "ILSVRC2012_img_train.tar"), "w") as outer:
        for c, items in train.items():
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tf:
                for stem, data in items:
                    _tar_add(tf, stem + ".JPEG", data)
            _tar_add(outer, cls_list[c].wnid + ".tar", inner.getvalue())
    with tarfile.open(os.path.join(out, "ILSVRC2012_img_val.tar"), "w") as tf:
        for stem, _, data in sorted(val):
            _tar_add(tf, stem + ".JPEG", data)
    # Devkit: meta.mat numbers the leaf synsets 1..C in a non-sorted order, then
    # non-leaf synsets after them, like the real file (1860 synsets, 1000 leaves).
    ids = rng.permutation(len(cls_list)) + 1
    if len(ids) > 1 and np.all(np.diff(ids) > 0):
        ids = ids[::-1].copy()
    meta = _meta_mat_bytes(cls_list, ids)
    gt = "".join(f"{ids[c]}\n" for _, c, _ in sorted(val))
    with tarfile.open(os.path.join(out, "ILSVRC2012_devkit_t12.tar.gz"), "w:gz") as tf:
        _tar_add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", meta)
        _tar_add(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt.encode())


def _meta_mat_bytes(cls_list, ids) -> bytes:
    import scipy.io

    fields = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]
    n_leaf = len(cls_list)
    records = []
    for c, cls in enumerate(cls_list):
        records.append((int(ids[c]), cls.wnid, cls.name, "synthetic class", 0, np.zeros((1, 0)), 0, 100))
    # Two non-leaf synsets whose wnids sort before the leaves: a reader that takes
    # "the first C synsets" or sorted wnids without looking at num_children is wrong.
    for k in range(2):
        records.append((n_leaf + 1 + k, f"n90{k:06d}", f"synthetic group {k}", "non-leaf", n_leaf,
                        np.arange(1, n_leaf + 1, dtype=np.float64)[None], 1, 0))
    arr = np.empty((len(records), 1), dtype=[(f, "O") for f in fields])
    for i, rec in enumerate(records):
        arr[i, 0] = rec
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"synsets": arr})
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="directory to create")
    p.add_argument("--layout", choices=LAYOUTS, default="folder")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train-per-class", type=int, default=100)
    p.add_argument("--val-per-class", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-quirks", action="store_true", help="plain RGB JPEGs only")
    a = p.parse_args(argv)
    if a.classes < 1 or a.classes > 1000 or a.train_per_class < 1 or a.val_per_class < 1:
        p.error("--classes must be in 1..1000 and the per-class counts at least 1")
    if os.path.isdir(a.out) and os.listdir(a.out):  # two data sets mixed in one tree would look like one
        print(f"make_sample_data: {a.out}: not empty; choose a new directory or remove it", file=sys.stderr)
        return 2
    generate(a.out, a.layout, a.classes, a.train_per_class, a.val_per_class, a.seed, not a.no_quirks)
    n = a.classes * (a.train_per_class + a.val_per_class)
    print(f"wrote {n} synthetic images ({a.classes} classes) in the '{a.layout}' layout to {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
