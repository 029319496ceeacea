"""Top-5 classes of images, from a checkpoint.

    python -m model.predict --checkpoint RUN/checkpoint.pt IMAGE [IMAGE ...]

Each image gets make_shards' preprocessing (shorter side to 256, central 256
square) and the evaluation's central 224 crop, normalized as the run was
(the checkpoint carries its Normalization with the class names).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from PIL import Image

from model.evaluate import load_model
from model.train import UsageError, parse_devices
from pipeline.normalization import Normalization
from pipeline.plan import crop


def preprocess(path: str, norm: Normalization) -> torch.Tensor:
    """An image file -> float32 [3, 224, 224], as the evaluation's centre crop sees a shard's image."""
    img = Image.open(path).convert("RGB")
    w, h = img.size
    side = min(w, h)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    img = np.asarray(img.resize((256, 256), Image.BICUBIC, box=box))  # as tools/make_shards.py does
    return torch.from_numpy(norm.apply(crop(img, 0.5, 0.5, flip=False)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt of model.train")
    p.add_argument("images", nargs="+", help="image files (any format Pillow reads)")
    p.add_argument("--devices", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--top", type=int, default=5, help="classes to print per image")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (bounds the memory)")
    a = p.parse_args(argv)
    if a.top < 1 or a.batch_size < 1:
        p.error("--top and --batch-size must be >= 1")
    try:
        device = parse_devices(a.devices)[0]
        model, ckpt = load_model(a.checkpoint, device)
        batch = []
        for path in a.images:
            try:
                batch.append(preprocess(path, ckpt["normalization"]))
            except OSError as e:
                raise UsageError(f"{path}: cannot read the image ({e})") from None
    except UsageError as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    with torch.no_grad():
        probs = torch.cat([torch.softmax(model(torch.stack(batch[i:i + a.batch_size]).to(device)).float(), 1).cpu()
                           for i in range(0, len(batch), a.batch_size)])
    names = ckpt["classes"]
    for path, pr in zip(a.images, probs):
        values, indices = pr.topk(min(a.top, len(names)))
        print(path)
        for v, i in zip(values.tolist(), indices.tolist()):
            print(f"  {100 * v:6.2f}%  {names[i]} ({ckpt['wnids'][i]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
