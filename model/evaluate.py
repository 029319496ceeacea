"""Top-1 and top-5 error of a checkpoint on a shard directory's validation split.

    python -m model.evaluate --checkpoint RUN/checkpoint.pt --shards DIR [--ten-crop] [--json FILE]

Centre crop by default; --ten-crop averages the softmax of the paper's 10 crops
(the 4 corners and the centre, each also mirrored; section 4.1). The input is
normalized with the values stored in the checkpoint, never with the shard
directory's pca.json, so a finished model's error does not change with that file
(and val-only shards need none).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from model.checkpoint import check_classes, load_model
from model.devices import parse_devices
from model.errors import UsageError
from model.evaluation import evaluate, percent, summarize
from pipeline import BACKENDS, make_loader
from pipeline.shards import ShardError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="RUN/checkpoint.pt of model.train")
    p.add_argument("--shards", required=True, help="shard directory with a val split (pca.json not needed)")
    p.add_argument("--ten-crop", action="store_true", help="the paper's 10 crops (softmax averaged), not the centre")
    p.add_argument("--devices", default="auto", help="cpu, cuda, cuda:N; auto: cuda if any")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (ten crops: x10 forward passes)")
    p.add_argument("--backend", default="auto", help="data pipeline: dali, wds or auto")
    p.add_argument("--json", help="also write the result to this JSON file")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking each shard's sha256 against dataset.json before it is used")
    a = p.parse_args(argv)
    try:
        if a.json and not os.path.isdir(os.path.dirname(os.path.abspath(a.json))):
            raise UsageError(f"--json {a.json}: its directory does not exist")  # before, not after, the work
        if a.json and os.path.isdir(a.json):
            raise UsageError(f"--json {a.json}: is a directory; give a file name")
        if a.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, not {a.batch_size}")
        if a.backend not in BACKENDS or a.backend == "synthetic":  # synthetic batches measure nothing
            raise UsageError(f"--backend must be one of dali, wds, auto, not {a.backend!r}")
        device = parse_devices(a.devices)[0]
        model, ckpt = load_model(a.checkpoint, device)
        try:
            loader = make_loader(a.shards, "val", batch_size=a.batch_size, device=device,
                                 crop="ten" if a.ten_crop else "center", backend=a.backend,
                                 normalization=ckpt["normalization"], verify=a.verify)
        except ShardError as e:
            raise UsageError(str(e)) from None
        check_classes(a.checkpoint, ckpt, loader.manifest, a.shards)
        if loader.num_samples == 0:
            raise UsageError(f"{a.shards}: the val split has no images")
    except UsageError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    dev = torch.device(device)
    try:
        sums = evaluate(model, loader, dev, bf16=dev.type == "cuda", progress=True)
    except ShardError as e:  # a shard that fails its sha256 or decode: named, no result written
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    result = summarize(sums, ckpt["num_classes"])
    result.update({"crop": "ten" if a.ten_crop else "center", "checkpoint": a.checkpoint,
                   "epoch": ckpt["epoch"], "step": ckpt["step"]})
    chance = 1 - 1 / len(loader.manifest["classes"])
    print(f"{a.checkpoint} (epoch {ckpt['epoch']}, step {ckpt['step']}), {result['crop']} crop, "
          f"{result['val_samples']} val images: top-1 error {percent(result['val_top1_error'])}, "
          f"top-5 error {percent(result['val_top5_error'])} (chance: {100 * chance:.1f}% top-1)")
    if a.json:
        tmp = f"{a.json}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
