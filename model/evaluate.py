"""Top-1 and top-5 error of a checkpoint on a shard directory's validation split.

    python -m model.evaluate --checkpoint RUN/checkpoint.pt --shards DIR [--ten-crop] [--json FILE]
    python -m model.evaluate --checkpoint A.pt B.pt C.pt --shards DIR --ten-crop    # an ensemble

Centre crop by default; --ten-crop averages the softmax of the paper's 10 crops
(the 4 corners and the centre, each also mirrored; section 4.1). The input is
normalized with the values stored in the checkpoint, never with the shard
directory's pca.json, so a finished model's error does not change with that file
(and val-only shards need none).

Several checkpoints make an ensemble (Table 2's "5 CNNs", "7 CNNs*"): their softmax
outputs over the same crops are averaged ("averaging the predictions", section 6),
one model on the device at a time, the per-image sums on the host. Each model's own
errors are printed beside the ensemble's. The models must have the shards' classes
and the same input normalization; anything else is refused before any work.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from model.checkpoint import check_classes, input_size, load_checkpoint, load_model
from model.devices import parse_devices
from model.errors import UsageError, command
from model.evaluation import Ensemble, batch_probs, open_manifest, open_val, percent, summarize
from pipeline import BACKENDS
from pipeline.normalization import Normalization
from pipeline.shards import ShardError, atomic_write, check_writable


# What decides an evaluation batch's numbers (no lighting, so neither the eigenbasis nor the training
# scale): models trained with other lighting may be averaged, models that see other inputs may not.
EVAL_INPUT = ("mode", "mean", "std")


def check_ensemble(paths: list[str], shards: str) -> tuple[dict, dict]:
    """Every checkpoint's digest, its classes against the shards' and its normalization against the
    first's, one checkpoint in memory at a time; UsageError naming the first that differs. Returns
    the first checkpoint (without its tensors) and the shards' manifest."""
    first = manifest = None
    seen = {}  # digest -> the first path naming it: one model under two names (./A, a link) would weigh twice
    for path in paths:
        if not os.path.exists(path):
            raise UsageError(f"{path}: no such checkpoint")
        ckpt = load_checkpoint(path)
        if ckpt["digest"] in seen:
            raise UsageError(f"{path}: is the same checkpoint as {seen[ckpt['digest']]} (the same digest); it "
                             "would weigh twice in the ensemble")
        seen[ckpt["digest"]] = path
        if manifest is None:  # after the first checkpoint's own check: a damaged file is named first
            manifest = open_manifest(shards)
        check_classes(path, ckpt, manifest, shards)
        ckpt = {k: v for k, v in ckpt.items() if k not in ("model", "optimizer")}
        if first is None:
            first = ckpt
            continue
        if input_size(ckpt) != input_size(first):
            raise UsageError(f"{path}: takes {input_size(ckpt)} crops, {paths[0]} takes {input_size(first)}; an "
                             "ensemble's models must see the same crops")
        differ = [k for k in EVAL_INPUT if ckpt["normalization"][k] != first["normalization"][k]]
        if differ:
            raise UsageError(f"{path}: was trained with another input normalization than {paths[0]} "
                             f"({', '.join(differ)} differ); an ensemble's models must see the same input")
    return first, manifest


def check_ensemble_memory(models: int, manifest: dict) -> None:
    """UsageError, before any work, where an ensemble's [N, C] float32 sum would take more than half of this
    machine's memory (Fall 2011's val split against its 21,841 classes: hundreds of GB)."""
    if models < 2:
        return
    need = manifest["splits"]["val"]["samples"] * len(manifest["classes"]) * 4
    have = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > have / 2:
        raise UsageError(f"an ensemble over {manifest['splits']['val']['samples']:,} val images x "
                         f"{len(manifest['classes']):,} classes sums {need / 2**30:.1f} GiB of softmax outputs on the "
                         f"host, more than half of this machine's {have / 2**30:.0f} GiB; evaluate on a smaller val "
                         "split, or each model alone")


def evaluate_models(paths: list[str], loader, device: str, num_classes: int, crop: str) -> tuple[Ensemble, list]:
    """Each checkpoint over the loader's split, one model on the device at a time: the Ensemble of their
    softmax outputs and each model's own figures (printed as it ends)."""
    dev = torch.device(device)
    ensemble, models = Ensemble(loader.num_samples, num_classes, len(paths)), []
    for k, path in enumerate(paths):
        model, ckpt = load_model(path, device)
        if dev.type == "cuda":  # as the trainer runs it on one GPU, and as the loader delivers the centre crop
            model = model.to(memory_format=torch.channels_last)
        ensemble.start_model()
        desc = f"model {k + 1}/{len(paths)}" if len(paths) > 1 else "evaluate"
        for probs, labels in batch_probs(model, loader, dev, bf16=dev.type == "cuda", progress=True, desc=desc):
            ensemble.add(probs, labels)
        del model
        result = summarize(ensemble.models[-1], num_classes)
        result.update({"checkpoint": path, "epoch": ckpt["epoch"], "step": ckpt["step"]})
        models.append(result)
        print(f"{path} (epoch {ckpt['epoch']}, step {ckpt['step']}), {crop} crop, {result['val_samples']} val "
              f"images: top-1 error {percent(result['val_top1_error'])}, top-5 error "
              f"{percent(result['val_top5_error'])}", flush=True)
    return ensemble, models


@command("evaluate", "no result written")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, nargs="+",
                   help="RUN/checkpoint.pt of model.train; several: their softmax outputs averaged (an ensemble)")
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
        if a.json:
            try:  # a real write: root passes os.access on a read-only mount
                check_writable(a.json)
            except OSError as e:
                raise UsageError(f"--json {a.json}: cannot write there ({e.strerror})") from None
        device = parse_devices(a.devices)[0]
        first, manifest = check_ensemble(a.checkpoint, a.shards)
        check_ensemble_memory(len(a.checkpoint), manifest)
        loader = open_val(a.shards, batch_size=a.batch_size, device=device, crop="ten" if a.ten_crop else "center",
                          backend=a.backend, normalization=Normalization.from_dict(first["normalization"]),
                          verify=a.verify, channels_last=device.startswith("cuda"), crop_size=input_size(first))
    except UsageError as e:
        print(f"evaluate: {e}", file=sys.stderr)
        return 2
    crop = "ten" if a.ten_crop else "center"
    num_classes = len(manifest["classes"])
    try:
        ensemble, models = evaluate_models(a.checkpoint, loader, device, num_classes, crop)
    except ShardError as e:  # a shard that fails its sha256 or decode: named, no result written
        print(f"evaluate: {e}", file=sys.stderr)
        return 1
    result = summarize(ensemble.ensemble_sums(), num_classes) if len(models) > 1 else dict(models[0])
    result.update({"crop": crop, "models": models})
    chance = 1 - 1 / num_classes
    if len(models) > 1:
        print(f"ensemble of {len(models)} (softmax averaged), {crop} crop, {result['val_samples']} val images: "
              f"top-1 error {percent(result['val_top1_error'])}, top-5 error {percent(result['val_top5_error'])}")
    print(f"(chance: {100 * chance:.1f}% top-1)")
    if a.json:  # an OSError here (the disk filled meanwhile) is one line (command)
        atomic_write(a.json, json.dumps(result, indent=1).encode(), fsync=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
