"""Top-5 classes of images, from a checkpoint.

    python -m model.predict --checkpoint RUN/checkpoint.pt IMAGE [IMAGE ...]

Each image is prepared exactly as make_shards prepared the training images (the same
function, pipeline/images.py, with the options of the shards the run was trained on,
stored in the checkpoint: EXIF orientation applied, shorter side to 256, central square,
re-encoded as a JPEG) and then cut to the evaluation's central 224 crop and normalized as
the run was. So an image gives the same logits here as in model.evaluate's centre crop
had it been in the validation set. An image that cannot be read is named on stderr and
the others are still predicted; the exit status is then 1.
"""
from __future__ import annotations

import argparse
import io
import os
import stat
import sys

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from model.checkpoint import input_size, load_model
from model.devices import parse_devices
from model.errors import UsageError, command
from pipeline.images import shard_image
from pipeline.normalization import Normalization
from pipeline.plan import crop
from pipeline.shards import error_text

SHARD_OPTIONS = ("size", "keep_aspect", "quality", "resample", "draft")  # of dataset.json's preprocessing


def preprocess(path: str, norm: Normalization, preprocessing: dict | None = None, side: int = 224) -> torch.Tensor:
    """An image file -> float32 [3, side, side], as the evaluation's centre crop sees the shard image
    make_shards would make of it (`preprocessing`: dataset.json's, from the checkpoint; side: the model's
    input_size, the checkpoint's too)."""
    if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device would block the read, or never end
        raise ValueError("not a regular file")
    with open(path, "rb") as f:
        data = f.read()
    jpg, _ = shard_image(data, **{k: v for k, v in (preprocessing or {}).items() if k in SHARD_OPTIONS})
    img = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    return torch.from_numpy(norm.apply(crop(img, 0.5, 0.5, flip=False, size=side)))


@command("predict")
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
    except UsageError as e:
        print(f"predict: {e}", file=sys.stderr)
        return 2
    names, failed = ckpt["classes"], 0
    # Batch by batch: memory stays at one batch whatever the number of images.
    with tqdm(total=len(a.images), unit="img", file=sys.stderr, disable=len(a.images) <= a.batch_size,
              mininterval=1.0, dynamic_ncols=True) as bar:
        for start in range(0, len(a.images), a.batch_size):
            paths, inputs = [], []
            for path in a.images[start:start + a.batch_size]:
                try:
                    inputs.append(preprocess(path, ckpt["normalization"], ckpt.get("preprocessing"),
                                             input_size(ckpt)))
                    paths.append(path)
                except Exception as e:  # noqa: BLE001 - any unreadable file: named, the others go on
                    bar.clear()
                    print(f"predict: {path}: cannot read the image ({error_text(e)})", file=sys.stderr)
                    failed += 1
            bar.update(len(a.images[start:start + a.batch_size]))
            if not inputs:
                continue
            with torch.no_grad():
                probs = torch.softmax(model(torch.stack(inputs).to(device)).float(), 1).cpu()
            bar.clear()
            for path, pr in zip(paths, probs):
                values, indices = pr.topk(min(a.top, len(names)))
                print(path)
                for v, i in zip(values.tolist(), indices.tolist()):
                    print(f"  {100 * v:6.2f}%  {names[i]} ({ckpt['wnids'][i]})")
            sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
