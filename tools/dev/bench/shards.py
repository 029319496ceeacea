"""make_shards against a naive loop, 1 and 2 workers, and pillow-simd against stock Pillow."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time

from tools.dev.bench.common import REPO, ROUNDS, _interleaved, _line, _quiet, _source


def naive_loop(src: str, draft: bool = True) -> tuple[int, float]:
    """The baseline: one process, a plain loop doing make_shards' per-image work."""
    from tools.imagenet_source import open_source
    from tools.make_shards import ShardOptions, process_image
    samples = open_source(src, ("train",)).splits["train"]
    opts = ShardOptions(draft=draft)
    t0 = time.perf_counter()
    for s in samples:
        process_image(s.read(), opts)
    return len(samples), time.perf_counter() - t0


def shardwriter_loop(src: str, out: str, shard_samples: int) -> None:
    """(c) what a user would write instead: a plain loop into webdataset's own ShardWriter, with
    the same per-image work (decode, resize, centre crop, re-encode) and the same shard size.
    Not deterministic across runs the way make_shards is (no global shuffle, no fixed mtimes)."""
    import json

    import webdataset as wds
    from tools.imagenet_source import open_source
    from tools.make_shards import ShardOptions, process_image
    opts = ShardOptions()
    source = open_source(src, ("train",))
    os.makedirs(out)
    with wds.ShardWriter(os.path.join(out, "train-%06d.tar"), maxcount=shard_samples, verbose=0) as sink:
        for s in source.splits["train"]:
            jpg, orig = process_image(s.read(), opts)
            sink.write({"__key__": s.key, "jpg": jpg, "cls": str(source.label(s.wnid)).encode(),
                        "json": json.dumps({"wnid": s.wnid, "source": s.source, "orig_size": orig}).encode()})


def _naive_part(src: str, part: int, parts: int) -> None:
    from tools.imagenet_source import open_source
    from tools.make_shards import ShardOptions, process_image
    opts = ShardOptions()
    for s in open_source(src, ("train",)).splits["train"][part::parts]:
        process_image(s.read(), opts)


def _bare_processes(src: str, parts: int) -> None:
    """The naive loop split over `parts` plain processes: what the cores give with no machinery."""
    from multiprocessing import Process
    procs = [Process(target=_naive_part, args=(src, i, parts)) for i in range(parts)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()


def bench_parts(a, parts: int) -> dict:
    """--parts N: N single-worker parts run side by side (processes, as N nodes would, into one OUT) and
    then --merge, against one N-worker run: the cost of splitting a run (goal >= 0.95x)."""
    import shutil
    import sys
    from tools import make_shards
    images = a.images or 1600
    print(f"make_shards in {parts} parts of 1 worker, side by side, against one run of {parts} workers: "
          f"{images} generated images (best of {ROUNDS} rounds)")
    with tempfile.TemporaryDirectory() as tmp:
        src = _source(tmp, images)
        made = []
        script = os.path.join(REPO, "tools", "make_shards.py")
        common = ["--splits", "train", "--shard-samples", str(max(1, images // 16))]

        def in_parts():
            made.append(os.path.join(tmp, f"out-{len(made)}"))
            procs = [subprocess.Popen([sys.executable, script, src, made[-1], *common, "--workers", "1",
                                       "--part", f"{i}/{parts}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                     for i in range(1, parts + 1)]
            assert all(p.wait() == 0 for p in procs)
            assert _quiet(make_shards.main, ["--merge", made[-1]]) == 0
            shutil.rmtree(made[-1])

        def one_run():
            made.append(os.path.join(tmp, f"out-{len(made)}"))
            assert subprocess.run([sys.executable, script, src, made[-1], *common, "--workers", str(parts)],
                                  capture_output=True).returncode == 0
            shutil.rmtree(made[-1])

        one_run()  # the page cache
        res = _interleaved(images, {"parts": in_parts, "one": one_run}, rounds=ROUNDS)
    _line(f"{parts} parts of 1 worker + --merge", res["parts"])
    _line(f"one run, {parts} workers", res["one"])
    print(f"  ratio parts / one run: {res['ratio:parts/one']:.2f}x  (goal >= 0.95; range {res['range:parts/one']})")
    return res


def bench_shards(a) -> dict:
    import shutil
    from tools import make_shards
    if getattr(a, "parts", None):
        return bench_parts(a, a.parts)
    from tools.imagenet_source import open_source
    images = a.images or 1600  # enough that fixed costs (pool start, the manifest) weigh as little as they can here
    print(f"make_shards: {images} generated source images of about 500x375 px, on {os.cpu_count()} cores "
          f"(rates: best of {ROUNDS} rounds)")
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = _source(tmp, images)
        n = len(open_source(src, ("train",)).splits["train"])
        naive_loop(src)  # warm the page cache so every contender reads from memory
        out = os.path.join(tmp, "out")

        runs_made = []

        def shards_cmd(w):
            def run():  # a fresh OUT each time: deleting the last one is not make_shards' work
                runs_made.append(f"{out}-{len(runs_made)}")
                # 16 shards: workers own whole shards (1,251 of them for ImageNet's train split)
                assert _quiet(make_shards.main, [src, runs_made[-1], "--splits", "train", "--workers", str(w),
                                                 "--shard-samples", str(max(1, n // 16))]) == 0
            return run

        def shardwriter():
            runs_made.append(f"{out}-{len(runs_made)}")
            shardwriter_loop(src, runs_made[-1], max(1, n // 16))

        # In this order every compared pair runs back to back within a round (drift cancels best).
        contenders = {
            "naive_no_draft": ("naive loop without JPEG draft mode", lambda: naive_loop(src, draft=False)),
            "naive": ("naive loop, 1 process (baseline)", lambda: naive_loop(src)),
            "workers1": ("make_shards --workers 1 (whole command)", shards_cmd(1)),
            "shardwriter": ("(c) webdataset ShardWriter, plain loop", shardwriter),
            "workers2": ("make_shards --workers 2 (whole command)", shards_cmd(2)),
            "bare2": ("ceiling: naive loop over 2 bare processes", lambda: _bare_processes(src, 2)),
        }
        res.update(_interleaved(n, {k: fn for k, (_, fn) in contenders.items()}, rounds=ROUNDS))
        for d in runs_made:
            shutil.rmtree(d)
        for k, (label, _) in contenders.items():
            _line(label, res[k])
        if a.stock_python:
            code = ("import sys; sys.path.insert(0, %r); from tools.dev.bench.shards import naive_loop; "
                    "from tools.dev.bench.common import _best_rate; "
                    "naive_loop(%r); import PIL; print(_best_rate(%d, lambda: naive_loop(%r)), PIL.__version__)"
                    ) % (REPO, src, n, src)
            out = subprocess.run([a.stock_python, "-c", code], capture_output=True, text=True, check=True).stdout.split()
            res["naive_stock_pillow"] = float(out[0])
            _line(f"naive loop under stock Pillow {out[1]}", res["naive_stock_pillow"])
    print(f"  (ratios: median over {ROUNDS} rounds of the ratio within a round)")
    print(f"  ratio make_shards 1 worker / naive loop:  {res['ratio:workers1/naive']:.2f}x  (goal >= 0.9; "
          f"range {res['range:workers1/naive']})")
    print(f"  same in CPU seconds per image:            {res['cpu_ratio:workers1/naive']:.2f}x")
    print(f"  ratio make_shards 1 worker / ShardWriter: {res['ratio:workers1/shardwriter']:.2f}x  (goal >= 1.0; "
          f"range {res['range:workers1/shardwriter']}; only make_shards is deterministic)")
    print(f"  ratio 2 workers / 1 worker:               {res['ratio:workers2/workers1']:.2f}x  (goal >= 1.8; "
          f"range {res['range:workers2/workers1']})")
    print(f"  ratio 2 workers / 2 bare processes:       {res['ratio:workers2/bare2']:.2f}x  "
          f"(this machine's 2-core ceiling is {res['ratio:bare2/naive']:.2f}x the naive loop)")
    print(f"  ratio JPEG draft mode on / off (naive):   {res['ratio:naive/naive_no_draft']:.2f}x")
    if "naive_stock_pillow" in res:
        print(f"  ratio pillow-simd / stock Pillow (naive): {res['naive'] / res['naive_stock_pillow']:.2f}x")
    return res
