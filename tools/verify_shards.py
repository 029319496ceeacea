"""Check a shard directory against its manifest and report every problem.

    python tools/verify_shards.py OUT [--quick]

Checks: dataset.json is readable and of format version 1; every shard named there
exists with its size and sha256; its DALI index is present and matches the tar;
sample counts add up; every sample has .jpg/.cls/.json, a key without dots, a
label in range that agrees with its wnid, and a JPEG that decodes to RGB at the
manifest's size (--quick skips the decoding). Exit 0 when clean, 1 otherwise.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from PIL import Image
from tqdm import tqdm

from model.errors import command
from pipeline.shards import (MANIFEST, ShardError, index_name, index_text, iter_tar_samples, load_manifest,
                             member_at, read_index, split_shards)


def verify(out: str, decode: bool = True, progress: bool = False) -> list[str]:
    """Every problem found, one line each, naming the file; [] when the directory is sound."""
    try:
        manifest = load_manifest(out)
    except ShardError as e:
        return [str(e)]
    problems = []
    total = sum(info["samples"] for info in manifest["splits"].values())
    bar = tqdm(total=total, unit="img", disable=not progress, file=sys.stderr, mininterval=1.0, dynamic_ncols=True)
    wnid_of = {c["index"]: c["wnid"] for c in manifest["classes"]}
    size = manifest["preprocessing"]["size"]
    keep_aspect = manifest["preprocessing"].get("keep_aspect", False)
    for split, info in manifest["splits"].items():
        count = 0
        keys = set()
        for shard in split_shards(manifest, out, split):
            path = shard["path"]
            if not os.path.exists(path):
                problems.append(f"{path}: missing")
                continue
            bar.set_postfix_str(shard["file"], refresh=False)
            try:
                with open(path, "rb") as f:
                    data = f.read()  # once, for the checksum, the index and the samples
            except OSError as e:  # a directory, no permission, an I/O error
                problems.append(f"{path}: cannot read ({e.strerror})")
                continue
            if len(data) != shard["bytes"] or hashlib.sha256(data).hexdigest() != shard["sha256"]:
                problems.append(f"{path}: size or sha256 differs from {MANIFEST}")
                continue
            problems += _check_index(shard["index"], path, data)
            try:
                n = 0
                for key, sample in iter_tar_samples(path, data):
                    n += 1
                    bar.update()
                    problems += _check_sample(path, key, sample, wnid_of, size, keep_aspect, decode)
                    if key in keys:
                        problems.append(f"{path}: key {key} appears twice in split {split}")
                    keys.add(key)
            except ShardError as e:
                problems.append(str(e))
                continue
            if n != shard["samples"]:
                problems.append(f"{path}: {n} samples, {MANIFEST} says {shard['samples']}")
            count += n
        if count != info["samples"]:
            problems.append(f"{os.path.join(out, MANIFEST)}: split {split} has {count} samples, manifest says {info['samples']}")
        elif info["samples"] == 0:
            problems.append(f"{os.path.join(out, MANIFEST)}: split {split} has no samples")
    bar.close()
    listed = {s["file"] for info in manifest["splits"].values() for s in info["shards"]}
    listed |= {index_name(f) for f in listed}
    for name in sorted(os.listdir(out)):  # a consumer that globs train-*.tar would read a stray shard too
        if re.fullmatch(r"(train|val)-\d{6}\.(tar|idx)", name) and name not in listed:
            problems.append(f"{os.path.join(out, name)}: a shard file that {MANIFEST} does not list (of another "
                            "run?); remove it")
    return problems


def _check_index(idx_path: str, tar_path: str, data: bytes) -> list[str]:
    """The index must be the one DALI's wds2idx would write for this tar (`data`: its bytes)."""
    if not os.path.exists(idx_path):
        return [f"{idx_path}: missing (DALI needs it)"]
    try:
        entries = read_index(idx_path)
    except ShardError as e:
        return [str(e)]
    for e in entries:
        for ext, off, size in e.members:
            name, _ = member_at(data, off)  # the ustar header before the data names the member
            if name != f"{e.key}.{ext}" or off + size > len(data):
                return [f"{idx_path}: entry for {e.key}.{ext} does not point at that member of {tar_path}"]
    with open(idx_path, encoding="utf-8") as f:
        if f.read() != index_text(entries):
            return [f"{idx_path}: not in canonical form"]
    return []


def _check_sample(path, key, sample, wnid_of, size, keep_aspect, decode) -> list[str]:
    where = f"{path}: {key}"
    if "." in key:
        return [f"{where}: key contains a dot"]
    missing = [e for e in ("jpg", "cls", "json") if e not in sample]
    if missing:
        return [f"{where}: lacks .{', .'.join(missing)}"]
    problems = []
    try:
        label = int(sample["cls"].decode("ascii"))
        meta = json.loads(sample["json"])
    except (ValueError, UnicodeDecodeError):
        return [f"{where}: .cls is not an ASCII integer or .json is not JSON"]
    if label not in wnid_of:
        problems.append(f"{where}: label {label} out of range 0..{len(wnid_of) - 1}")
    elif meta.get("wnid") != wnid_of[label]:
        problems.append(f"{where}: label {label} is {wnid_of[label]} but .json says {meta.get('wnid')}")
    if decode:
        try:
            img = Image.open(io.BytesIO(sample["jpg"]))
            img.load()
            ok = img.format == "JPEG" and img.mode == "RGB" and (
                min(img.size) == size if keep_aspect else img.size == (size, size))
            if not ok:
                problems.append(f"{where}: {img.format} {img.mode} {img.size[0]}x{img.size[1]}, "
                                f"expected an RGB JPEG of {size} px")
        except Exception as e:  # noqa: BLE001
            problems.append(f"{where}: .jpg does not decode ({e})")
    return problems


@command("verify_shards")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="shard directory")
    p.add_argument("--quick", action="store_true", help="skip decoding the JPEGs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    problems = verify(a.out, decode=not a.quick, progress=not a.quiet)
    for line in problems:
        print(line)
    if problems:
        print(f"verify_shards: {len(problems)} problem(s) in {a.out}", file=sys.stderr)
        return 1
    m = load_manifest(a.out)
    print(f"{a.out}: OK (" + ", ".join(f"{s} {v['samples']} samples in {len(v['shards'])} shards"
                                       for s, v in m["splits"].items()) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
