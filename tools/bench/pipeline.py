"""The DALI loader against the webdataset + pillow-simd loader on the same shards."""
from __future__ import annotations

import os
import tempfile

from tools.bench.common import _epoch_rate, _line, _quiet, _shards

def bench_pipeline(a) -> dict:
    from pipeline import make_loader
    from tools import compute_pca
    images, batch = a.images or 2048, a.batch or 128
    cores = os.cpu_count()
    print(f"training pipeline (random crop, flip, lighting, normalize): {images} images of 256x256, "
          f"batch {batch}, {cores} cores, one epoch each, best of 2 (interleaved)")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = _shards(tmp, images)
        _quiet(compute_pca.main, [out, "--quiet"])
        loaders = {b: make_loader(out, "train", batch_size=batch, backend=b, num_threads=cores)
                   for b in ("wds", "dali")}
        best = {b: 0.0 for b in loaders}
        for _ in range(2):
            for b, loader in loaders.items():
                best[b] = max(best[b], _epoch_rate(loader))
    res = {"wds": best["wds"], "dali_cpu": best["dali"]}
    _line("webdataset + pillow-simd + DataLoader (baseline)", res["wds"])
    _line("DALI on the CPU", res["dali_cpu"])
    print(f"  ratio DALI CPU / webdataset loader:       {res['dali_cpu'] / res['wds']:.2f}x  (goal >= 2.5)")
    return res
