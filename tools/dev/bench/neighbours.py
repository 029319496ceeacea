"""tools/neighbours.py's search: exact nearest fc7 neighbours in blocks, against a plain torch.cdist +
topk over all the features at once, on the CPU.

Both read the same float16 feature file (a memory map, in the page cache after a warm-up) and return
the k nearest of each query. The baseline converts every feature to float32 at once (cdist needs them
in one tensor) and makes the whole [queries, N] distance matrix; the blocked search holds one block.
Each round runs each method in a fresh forked process, so that its peak memory can be told apart:
the process's high-water mark (VmHWM) minus its memory when it started, which counts the file's
pages each method maps (the whole file, for both) besides what it allocates. Goal: blocked >= 1.0x the
baseline's speed at equal results, with memory bounded by the block.
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time

import numpy as np

from tools.dev.bench.common import ROUNDS


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _run(method: str, path: str, shape: tuple, queries: np.ndarray, k: int, block: int, conn) -> None:
    import torch

    from tools.neighbours import nearest
    torch.set_num_threads(os.cpu_count() or 1)
    start_kb = _status_kb("VmRSS")
    features = np.memmap(path, dtype=np.float16, mode="r", shape=shape)
    q = torch.from_numpy(queries)
    t0 = time.perf_counter()
    if method == "blocked":
        _, idx = nearest(q, features, k, block)
    else:
        everything = torch.from_numpy(np.asarray(features, dtype=np.float32))
        idx = torch.cdist(q, everything).topk(k, 1, largest=False, sorted=True).indices
    seconds = time.perf_counter() - t0
    conn.send((seconds, (_status_kb("VmHWM") - start_kb) / 1024, idx.numpy()))
    conn.close()


def _timed(method: str, *args) -> tuple[float, float, np.ndarray]:
    ctx = multiprocessing.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_run, args=(method, *args, there))
    proc.start()
    result = here.recv()
    proc.join()
    return result


def bench_neighbours(a) -> dict:
    n, dim, queries, k = (a.images or 50_000), 4096, 64, 6
    block = 8192
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "features.f16")
        features = np.memmap(path, dtype=np.float16, mode="w+", shape=(n, dim))
        for start in range(0, n, 8192):  # ReLU features: non-negative, many zeros
            features[start:start + 8192] = np.maximum(rng.normal(size=(min(8192, n - start), dim)), 0)
        features.flush()
        del features
        q = np.maximum(rng.normal(size=(queries, dim)), 0).astype(np.float32)
        print(f"nearest fc7 neighbours: {queries} queries, k {k}, {n} features of {dim} (float16 file, "
              f"{n * dim * 2 / 1e9:.2f} GB), block {block}, {ROUNDS // 3} paired rounds")
        args = (path, (n, dim), q, k, block)
        _timed("blocked", *args)  # warm-up: the file into the page cache
        times = {"blocked": [], "cdist": []}
        peaks = {"blocked": [], "cdist": []}
        same = True
        for _ in range(max(1, ROUNDS // 3)):
            results = {}
            for method in ("blocked", "cdist"):
                seconds, peak_mb, idx = _timed(method, *args)
                times[method].append(seconds)
                peaks[method].append(peak_mb)
                results[method] = idx
            same &= bool(np.array_equal(results["blocked"], results["cdist"]))
    ratios = sorted(c / b for b, c in zip(times["blocked"], times["cdist"]))
    out = {"features": n, "dim": dim, "queries": queries, "k": k, "block": block,
           "blocked_s": min(times["blocked"]), "cdist_s": min(times["cdist"]),
           "ratio": ratios[len(ratios) // 2], "range": [ratios[0], ratios[-1]],
           "blocked_peak_mb": max(peaks["blocked"]), "cdist_peak_mb": max(peaks["cdist"]), "same_results": same}
    print(f"  blocked search     {out['blocked_s']:.3f} s, peak +{out['blocked_peak_mb']:.0f} MB "
          f"(the mapped file's {n * dim * 2 / 2**20:.0f} MB and one float32 block of {block * dim * 4 / 2**20:.0f} MB)")
    print(f"  cdist + topk       {out['cdist_s']:.3f} s, peak +{out['cdist_peak_mb']:.0f} MB "
          f"(the mapped file's {n * dim * 2 / 2**20:.0f} MB, every feature as float32: {n * dim * 4 / 2**20:.0f} MB, "
          f"and cdist's own copy)")
    print(f"  blocked / cdist speed: {out['ratio']:.2f}x (rounds {ratios[0]:.2f}-{ratios[-1]:.2f}; goal >= 1.0), "
          f"same neighbours: {'yes' if same else 'NO'}")
    return out
