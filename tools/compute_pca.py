"""Compute the RGB PCA eigenbasis of the training pixels, for the paper's lighting augmentation.

    python tools/compute_pca.py OUT [--workers N] [--max-images N]

Reads OUT/dataset.json and the train shards (each checked against its sha256),
and writes OUT/pca.json (docs/DESIGN.md): per-channel mean and std, the 3x3
RGB covariance, its eigenvalues (descending) and unit eigenvectors, with pixels
scaled to [0, 1]; `pixels`, `images`, and `source` (the sha256 of dataset.json).

Exact: every pixel of every counted image goes into integer sums of x and of the
products x_c * x_d (uint32 per block of 65,536 pixels, Python ints beyond); per-shard
partial sums are combined as integers, and the result does not depend on
--workers or shard order. Only the final division rounds. The sums run in a small
C kernel (tools/_rgbsums.c, built at install), or in NumPy where it was not built.

Sign convention: an eigenvector is defined up to sign; each is stored with the
component of largest magnitude positive, so the file is deterministic.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
import multiprocessing
import operator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image
from tqdm import tqdm

from model.errors import command
from pipeline.normalization import check_pca
from pipeline.shards import (MANIFEST, PCA_FILE, ShardError, atomic_write, check_writable, iter_tar_samples,
                             load_manifest, split_shards)
from tools.workers import init_worker_signals, kill_workers, signals_held, workers_stopped_first

# fb.resnet.torch's widely used ImageNet constants (pixels in [0, 1]); eigenvectors as columns there,
# stored here as rows (one per eigenvalue) to match pca.json.
REFERENCE = {
    "eigenvalues": [0.2175, 0.0188, 0.0045],
    "eigenvectors": [[-0.5675, -0.5808, -0.5836], [0.7192, -0.0045, -0.6948], [0.4009, -0.8140, 0.4203]],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


EXACT_BLOCK = 65536  # pixels: 65536 * 255 * 255 < 2^32, so uint32 sums of 8-bit products cannot overflow

try:  # the C kernel (setup.py builds it at install; optional where there is no compiler)
    from tools import _rgbsums
except ImportError:
    _rgbsums = None
KERNEL = "C (tools/_rgbsums.c)" if _rgbsums else "NumPy (tools._rgbsums was not built: ~0.35 ms more per image)"


SUMS = ("pixels", "r", "g", "b", "rr", "rg", "rb", "gg", "gb", "bb")  # the exact integer sums, in order
_PRODUCTS = ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))  # (channel, channel) of rr rg rb gg gb bb


def image_sums(img: Image.Image) -> tuple[int, ...]:
    """The SUMS of an RGB image: its pixel count, the sums of R, G, B and of their six products.

    With the C kernel: 0.015-0.025 ms for 256x256 here, beside a ~0.4-0.5 ms decode. It reads
    the decoded pixels in place through Pillow's Arrow export (np.asarray would copy
    them first: 0.06 ms); an image Pillow cannot export that way is read as an array.
    """
    if _rgbsums is None:
        return image_sums_numpy(img)
    try:
        return _rgbsums.sums_arrow(*img.__arrow_c_array__())
    except (AttributeError, ValueError):  # Pillow < 11.2, or an image in several memory blocks
        return _rgbsums.sums_buffer(np.ascontiguousarray(img), 3)


def image_sums_numpy(img: Image.Image) -> tuple[int, ...]:
    """image_sums without the C kernel: one uint32 Gram matrix per block of pixels.

    Rows R, G, B and a row of ones, so G = P P^T holds the sums of products (3x3),
    the sums (last row) and the pixel count, all exact integers. 0.35 ms for 256x256
    here. Measured alternatives, all exact and slower: float64 planes with einsum or
    np.dot, 1.8 ms (OpenBLAS's threads run 8x slower in forked workers); an
    (N,3)^T (N,3) matmul 0.36 ms; PIL histograms of the bands and of |x_c - x_d|
    0.56-0.76 ms; torch float64 matmul 0.55 ms; DALI arithmetic on the CPU ~4 ms.
    """
    x = np.asarray(img).reshape(-1, 3)
    gram = np.zeros((4, 4), np.int64)
    for start in range(0, x.shape[0], EXACT_BLOCK):
        block = x[start:start + EXACT_BLOCK]
        p = np.ones((4, block.shape[0]), np.uint32)
        p[:3] = block.T
        gram += np.einsum("ij,kj->ik", p, p).astype(np.int64)
    return (x.shape[0], *(int(v) for v in gram[3, :3]), *(int(gram[i, j]) for i, j in _PRODUCTS))


def shard_sums(task: tuple[str, str, int]) -> tuple:
    """(images, SUMS) over the first `limit` samples of one shard, or ('error', message)."""
    path, sha256, limit = task
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return ("error", f"{path}: cannot read ({e.strerror})")
    if hashlib.sha256(data).hexdigest() != sha256:
        return ("error", f"{path}: sha256 differs from {MANIFEST} (corrupt or replaced shard)")
    images, totals = 0, (0,) * len(SUMS)  # Python ints: exact at any size
    try:
        for key, sample in iter_tar_samples(path, data):
            if images >= limit:
                break
            img = Image.open(io.BytesIO(sample["jpg"]))
            img.load()
            if img.mode != "RGB":
                return ("error", f"{path}: {key}.jpg is {img.mode}, not RGB")
            totals = tuple(map(operator.add, totals, image_sums(img)))
            images += 1
    except ShardError as e:
        return ("error", str(e))
    except (KeyError, OSError) as e:  # no .jpg member, or JPEG bytes PIL cannot decode
        return ("error", f"{path}: unreadable sample {key} ({e})")
    return images, totals


def pca_from_sums(sums) -> dict:
    """Mean, std, covariance and eigenbasis in [0, 1] units from exact integer SUMS (population covariance)."""
    n, s1, s2 = int(sums[0]), [int(v) for v in sums[1:4]], [[0] * 3 for _ in range(3)]
    for (i, j), v in zip(_PRODUCTS, sums[4:]):
        s2[i][j] = s2[j][i] = int(v)
    # n^2 * 255^2 * cov = n * S2 - S1 S1^T, exactly in Python integers; one rounding at the end.
    cov = np.array([[(n * s2[i][j] - s1[i] * s1[j]) / (n * n * 255 * 255) for j in range(3)] for i in range(3)])
    mean = np.array(s1, dtype=np.float64) / (n * 255)
    values, vectors = np.linalg.eigh(cov)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order].T  # rows: eigenvectors[i] belongs to values[i]
    for v in vectors:
        if v[np.argmax(np.abs(v))] < 0:
            v *= -1
    return {
        "mean": mean.tolist(),
        "std": np.sqrt(np.diag(cov)).tolist(),
        "covariance": cov.tolist(),
        "eigenvalues": values.tolist(),
        "eigenvectors": vectors.tolist(),
    }


class WorkerDied(Exception):
    """A worker process ended without its result; the message names OUT."""


def compute(out: str, workers: int, max_images: int | None = None, progress: bool = True) -> dict:
    manifest = load_manifest(out)
    shards = split_shards(manifest, out, "train")
    missing = [s["path"] for s in shards if not os.path.exists(s["path"])]
    if missing:
        raise ShardError(f"{missing[0]}: missing train shard ({len(missing)} missing)")
    # --max-images: the first N samples in shard order. Train shards are a global
    # shuffle, so this is a uniform random subset, and the same one every time.
    tasks, left = [], max_images if max_images is not None else sum(s["samples"] for s in shards)
    for s in shards:
        if left <= 0:
            break
        tasks.append((s["path"], s["sha256"], min(left, s["samples"])))
        left -= s["samples"]
    images, totals = 0, (0,) * len(SUMS)
    bar = tqdm(total=sum(t[2] for t in tasks), unit="img", desc="pca", disable=not progress, file=sys.stderr,
               mininterval=1.0, dynamic_ncols=True)
    # A ProcessPoolExecutor, not a multiprocessing.Pool: a worker killed (out of memory, SIGKILL) fails
    # the run at once, where the Pool replaced it and waited for good for its shard's result.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                             initializer=init_worker_signals, initargs=(os.getpid(),)) as pool:
        futures = []
        with workers_stopped_first(pool):
            try:  # the submissions too: a Ctrl-C among them must stop the workers, not wait for their shards
                with signals_held():
                    futures += [pool.submit(shard_sums, t) for t in tasks]
                for future in as_completed(futures):
                    r = future.result()
                    if r[0] == "error":
                        raise ShardError(r[1])
                    images, totals = images + r[0], tuple(map(operator.add, totals, r[1]))
                    bar.update(r[0])
            except BrokenProcessPool:
                bar.close()
                raise WorkerDied(f"{out}: a worker process died (killed: out of memory?); no {PCA_FILE} "
                                 "written") from None
            except (KeyboardInterrupt, ShardError):  # the workers ignore SIGINT: stop them now, not after their shards
                bar.close()
                kill_workers(pool)
                raise
            finally:
                for f in futures:
                    f.cancel()
    bar.close()
    if images == 0:
        raise ShardError(f"{os.path.join(out, MANIFEST)}: no training images to count")
    with open(os.path.join(out, MANIFEST), "rb") as f:
        source = hashlib.sha256(f.read()).hexdigest()
    result = pca_from_sums(totals)
    try:  # the loader's own check: a file it would refuse is never written
        check_pca(result)
    except ValueError as e:
        raise ShardError(f"{out}: the training pixels give no usable PCA ({e}; a channel with one value in every "
                         f"pixel?); no {PCA_FILE} written: the lighting augmentation needs varied images") from None
    result.update({"pixels": int(totals[0]), "images": images, "max_images": max_images,
                   "source": {"file": MANIFEST, "sha256": source}, "units": "RGB in [0, 1]",
                   "sign_convention": "largest-magnitude component of each eigenvector is positive"})
    return result


def compare_with_reference(result: dict) -> str:
    """Side by side with fb.resnet.torch's ImageNet constants (sign-free cosine for eigenvectors)."""
    lines = ["                  this data                    fb.resnet.torch ImageNet",
             f"  eigenvalues  {_fmt(result['eigenvalues'])}   {_fmt(REFERENCE['eigenvalues'])}",
             f"  mean         {_fmt(result['mean'])}   {_fmt(REFERENCE['mean'])}",
             f"  std          {_fmt(result['std'])}   {_fmt(REFERENCE['std'])}"]
    cos = [abs(float(np.dot(a, b))) for a, b in zip(result["eigenvectors"], REFERENCE["eigenvectors"])]
    lines.append(f"  |cos| between eigenvectors i: {_fmt(cos)}  (1.0 = same direction)")
    lines.append("  On real ImageNet the two columns agree closely; the synthetic sample data differs.")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "[" + ", ".join(f"{x:7.4f}" for x in v) + "]"


@command("compute_pca", f"no {PCA_FILE} written; the same command starts again")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="shard directory made by make_shards.py")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores)")
    p.add_argument("--max-images", type=int, default=None, help="count only the first N training images")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    a = p.parse_args(argv)
    if a.workers < 1 or (a.max_images is not None and a.max_images < 1):
        p.error("--workers and --max-images must be >= 1")
    t0 = time.time()
    path = os.path.join(a.out, PCA_FILE)
    try:
        if os.path.isdir(a.out):  # before the pass over every image, not after
            check_writable(path)
        result = compute(a.out, a.workers, a.max_images, progress=not a.quiet)
        atomic_write(path, json.dumps(result, indent=1, sort_keys=True).encode() + b"\n")
    except ShardError as e:
        print(f"compute_pca: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"compute_pca: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a read-only or full filesystem: one line, and no temporary file left
        print(f"compute_pca: {e.filename or path}: cannot write ({e.strerror or e}); no {PCA_FILE} written",
              file=sys.stderr)
        return 1
    if not a.quiet:
        dt = time.time() - t0
        print(f"{result['images']} images, {result['pixels']} pixels in {dt:.1f} s "
              f"({result['images'] / max(dt, 1e-9):.0f} img/s; sums in {KERNEL}) -> {path}")
        print(compare_with_reference(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
