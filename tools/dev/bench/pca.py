"""compute_pca against a pure decode of the same shards."""
from __future__ import annotations

import os
import tempfile

from tools.dev.bench.common import ROUNDS, _interleaved, _line, _shards


def _decode_shard(path: str) -> int:
    """The limit for compute_pca: read a shard and decode every JPEG into pixels in memory.

    Nothing more: no copy into a NumPy array (compute_pca reads Pillow's pixels in place)."""
    import io
    from PIL import Image
    from pipeline.shards import iter_tar_samples
    n = 0
    for _, sample in iter_tar_samples(path):
        Image.open(io.BytesIO(sample["jpg"])).load()
        n += 1
    return n


def bench_pca(a) -> dict:
    from multiprocessing import Pool
    from pipeline.shards import load_manifest, split_shards
    from tools import compute_pca
    images = a.images or 2048
    workers = os.cpu_count()
    print(f"compute_pca: {images} train images of 256x256, {workers} workers (rates: best of {ROUNDS} rounds, "
          "interleaved)")
    print(f"  sums in {compute_pca.KERNEL}")
    with tempfile.TemporaryDirectory() as tmp:
        out = _shards(tmp, images)
        paths = [s["path"] for s in split_shards(load_manifest(out), out, "train")]
        n = sum(_decode_shard(p) for p in paths)  # also warms the page cache

        def decode_only():
            with Pool(workers) as pool:
                assert sum(pool.map(_decode_shard, paths)) == n

        res = _interleaved(n, {"decode": decode_only,
                               "compute_pca": lambda: compute_pca.compute(out, workers, progress=False)},
                           rounds=ROUNDS)
    _line("pure decode loop over the shards (limit)", res["decode"])
    _line("compute_pca (decode + exact sums)", res["compute_pca"])
    print(f"  ratio compute_pca / pure decode:          {res['ratio:compute_pca/decode']:.2f}x  (goal >= 0.9; "
          f"median of {ROUNDS} paired rounds, range {res['range:compute_pca/decode']})")
    print(f"  same in CPU seconds per image:            {res['cpu_ratio:compute_pca/decode']:.2f}x")
    return res
