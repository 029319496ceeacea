"""Where the DALI CPU pipeline's time goes, stage by stage, against decoding whole images (bench pipeline's
(c)): the same JPEGs from the shards, fed from memory in batches of 128, on all cores, each variant a DALI
graph of its own, in interleaved rounds.

    whole       fn.decoders.image: (c), the limit of any pipeline that decodes whole images
    crop        fn.decoders.image_crop of the 224 crop: what our training graph decodes
    crop+cmn    then fn.crop_mirror_normalize to float32 CHW, mirror p = 0.5, a mean per image
                (our training graph, lighting folded into the mean)
    no mirror   the same with mirror 0 for every image
    all mirror  the same with mirror 1 for every image
    to uint8    crop_mirror_normalize writing uint8 HWC, no mirror: one pass without the float32 output

Its last line is the ceiling of `bench pipeline`'s ours / (c) that DALI's CPU operators leave: crop+cmn /
whole, before our loader's own costs (the feed from Python, the exact order). It also prints the memory
floor of a float32 batch: numpy filling 128 x 3 x 224 x 224 float32 in place, per image.
"""
from __future__ import annotations

import glob
import os
import tempfile
import time

import numpy as np

from tools.dev.bench.common import ROUNDS, _interleaved, _line, _shards

STAGES = ("whole", "crop", "crop+cmn", "no mirror", "all mirror", "to uint8")


def stage_pipeline(stage: str, feed, batch: int, threads: int):
    """A built DALI CPU pipeline that runs `stage` on feed()'s (jpegs, crop_x, crop_y, mirror, mean)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def
    def graph():
        jpg, x, y, mirror, mean = fn.external_source(source=feed, num_outputs=5, batch=True)
        if stage == "whole":
            return fn.decoders.image(jpg, device="cpu", output_type=types.RGB), x, y, mirror, mean
        crop = fn.decoders.image_crop(jpg, device="cpu", output_type=types.RGB, crop=(224, 224), crop_pos_x=x,
                                      crop_pos_y=y)
        if stage == "crop":
            return crop, mirror, mean
        if stage == "to uint8":
            return fn.crop_mirror_normalize(crop, dtype=types.UINT8, output_layout="HWC"), mirror, mean
        flips = {"crop+cmn": mirror, "no mirror": mirror * 0, "all mirror": mirror * 0 + 1}[stage]
        return (fn.crop_mirror_normalize(crop, mirror=flips, mean=mean, std=[1.0, 1.0, 1.0], dtype=types.FLOAT,
                                         output_layout="CHW"),)

    pipe = graph(batch_size=batch, num_threads=threads, device_id=None, seed=0, prefetch_queue_depth=2)
    pipe.build()
    return pipe


def bench_stages(a) -> dict:
    from pipeline.shards import iter_tar_samples
    images, batch = a.images or 2048, a.batch or 128
    cores = os.cpu_count()
    per_round = 12  # batches per variant per round
    print(f"DALI on the CPU, stage by stage: batches of {batch} JPEGs of 256x256 fed from memory, {cores} threads, "
          f"{per_round} batches per variant, {ROUNDS} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        out = _shards(tmp, images)
        jpegs = [np.frombuffer(s["jpg"], np.uint8) for path in sorted(glob.glob(os.path.join(out, "train-*.tar")))
                 for _, s in iter_tar_samples(path)]
    rng = np.random.default_rng(0)
    batches = [(jpegs[k * batch:(k + 1) * batch], rng.random(batch, np.float32), rng.random(batch, np.float32),
                rng.integers(0, 2, batch).astype(np.int32), (255 * rng.random((batch, 3))).astype(np.float32))
               for k in range(len(jpegs) // batch)]

    def feeder():
        turn = iter(range(1 << 62))
        return lambda: batches[next(turn) % len(batches)]

    pipes = {stage: stage_pipeline(stage, feeder(), batch, cores) for stage in STAGES}
    for pipe in pipes.values():  # warm-up: buffers, page cache
        for _ in range(3):
            pipe.run()

    def run(pipe):
        def go():
            for _ in range(per_round):
                pipe.run()
        return go

    res = _interleaved(per_round * batch, {stage: run(pipe) for stage, pipe in pipes.items()}, rounds=ROUNDS)
    pipes.clear()
    floor = np.empty((batch, 3, 224, 224), np.float32)
    floor.fill(0.0)  # its pages are mapped before the timing
    t0 = time.perf_counter()
    for _ in range(per_round):
        floor.fill(1.0)
    fill_us = (time.perf_counter() - t0) / (per_round * batch) * 1e6
    _line("whole", res["whole"])
    for stage in STAGES[1:]:
        ratio, spread = res[f"ratio:{stage}/whole"], res[f"range:{stage}/whole"]
        _line(stage, res[stage], extra=f"  / whole {ratio:.2f}x (range {spread})")
    print(f"  writing a float32 224x224x3 image, memory only (one thread): {fill_us:.0f} us; one image's CPU time "
          f"in the whole decode: {1e6 * cores / res['whole']:.0f} us")
    print(f"  ceiling of ours / (c) on this CPU (crop+cmn / whole): {res['ratio:crop+cmn/whole']:.2f}x")
    return {**res, "float32_fill_us": fill_us}
