"""Our training pipeline against what a user would pick instead, on the same images and cores.

  - our DALI loader (exact per-epoch order, lighting, resumable), built once per loader;
  - (a) a plain DALI pipeline on the same shards: webdataset reader with its own shuffle, random
    crop, flip, normalize (no lighting, no exact order), decoding whole images: goal ours >= 1.1x
    (ours decodes only the crop);
  - (c) the same reader and threads decoding whole images and nothing else: the limit of any
    pipeline that decodes whole images; goal ours >= 1.0x;
  - (b) the torchvision way: ImageFolder over the original JPEGs, Resize(256), RandomCrop(224),
    RandomHorizontalFlip, ToTensor, Normalize in a DataLoader with all cores: goal ours >= 4x.
    Re-created line for line in plain PIL and NumPy, because PyPI's torchvision does not import
    beside this machine's CPU build of torch; it runs with our pillow-simd, which favours it;
  - our webdataset + pillow-simd loader (the portable fallback);
  - the cost of the shard sha256 verification (pipeline/verify.py): an epoch of our loader with a fresh
    verifier against one without, paired rounds; goal < 2 % of an epoch.
Rates are whole epochs (start-up included), best of 9 interleaved rounds; the ratios are medians
over the rounds of the ratio within a round (this machine's speed drifts by 10-30 % over
minutes); each loader's first-batch latency is printed apart.
"""
from __future__ import annotations

import glob
import os
import tempfile

import numpy as np

from tools.dev.bench.common import ROUNDS, _cpu_seconds, _epoch_timing, _interleaved, _line, _quiet, _shards, _source

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet values, for (b)


class PlainDali:
    """(a): DALI's own reader over the shards and their .idx files, built once. decode_only: (c), the same
    reader and threads decoding the whole images and nothing else: the decoder's own limit. device_id: a
    GPU's index, for nvJPEG decoding (device="mixed") and the operators after it on that GPU (the GPU check)."""

    def __init__(self, shards: str, batch: int, threads: int, decode_only: bool = False, device_id: int | None = None):
        from nvidia.dali import fn, pipeline_def, types
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
        paths = sorted(glob.glob(os.path.join(shards, "train-*.tar")))

        @pipeline_def
        def plain():
            jpg, cls = fn.readers.webdataset(paths=paths, index_paths=[p[:-4] + ".idx" for p in paths],
                                             ext=["jpg", "cls"], random_shuffle=True, initial_fill=1024,
                                             name="reader")
            images = fn.decoders.image(jpg, device="cpu" if device_id is None else "mixed", output_type=types.RGB)
            if decode_only:
                return images, fn.pad(cls, fill_value=0, shape=[4])
            out = fn.crop_mirror_normalize(images, crop=(224, 224), crop_pos_x=fn.random.uniform(range=(0, 1)),
                                           crop_pos_y=fn.random.uniform(range=(0, 1)),
                                           mirror=fn.random.coin_flip(), dtype=types.FLOAT,
                                           mean=[255 * m for m in MEAN], std=[255 * s for s in STD])
            return out, fn.pad(cls, fill_value=0, shape=[4])

        pipe = plain(batch_size=batch, num_threads=threads, device_id=device_id, seed=0, prefetch_queue_depth=2)
        pipe.build()
        self.it = DALIGenericIterator([pipe], ["images", "labels"], reader_name="reader", auto_reset=True,
                                      last_batch_policy=LastBatchPolicy.PARTIAL)

    def __iter__(self):
        for out in self.it:
            yield out[0]["images"], out[0]["labels"]


class FolderDataset:
    """(b): torchvision's ImageFolder + Resize(256) + RandomCrop(224) + RandomHorizontalFlip + ToTensor
    + Normalize, written out in PIL and NumPy."""

    def __init__(self, root: str):
        classes = sorted(os.listdir(os.path.join(root, "train")))
        self.items = [(path, c) for c, wnid in enumerate(classes)
                      for path in sorted(glob.glob(os.path.join(root, "train", wnid, "*.JPEG")))]
        self.mean = np.array(MEAN, np.float32)[:, None, None]
        self.std = np.array(STD, np.float32)[:, None, None]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        import torch
        from PIL import Image
        path, label = self.items[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")                       # ImageFolder's loader
        w, h = img.size                                              # Resize(256): shorter side, bilinear
        short, long = (w, h) if w <= h else (h, w)
        size = (256, int(256 * long / short)) if w <= h else (int(256 * long / short), 256)
        img = img.resize(size, Image.BILINEAR)
        x0 = int(torch.randint(0, size[0] - 224 + 1, ()))            # RandomCrop(224)
        y0 = int(torch.randint(0, size[1] - 224 + 1, ()))
        img = img.crop((x0, y0, x0 + 224, y0 + 224))
        if torch.rand(()) < 0.5:                                      # RandomHorizontalFlip
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        x = np.asarray(img, np.float32).transpose(2, 0, 1) / 255     # ToTensor
        return torch.from_numpy((x - self.mean) / self.std), label   # Normalize


def bench_pipeline(a) -> dict:
    import torch
    from pipeline import make_loader
    from tools import compute_pca
    images, batch = a.images or 2048, a.batch or 128
    cores = os.cpu_count()
    print(f"training pipeline (random crop, flip, lighting, normalize): {images} images of 256x256, "
          f"batch {batch}, {cores} cores, one epoch each, {ROUNDS} interleaved rounds")
    with tempfile.TemporaryDirectory() as tmp:
        out = _shards(tmp, images)
        _quiet(compute_pca.main, [out, "--quiet"])
        folder = torch.utils.data.DataLoader(FolderDataset(_source(tmp, images)), batch_size=batch, shuffle=True,
                                             num_workers=cores)
        loaders = {"ours": make_loader(out, "train", batch_size=batch, backend="dali", num_threads=cores),
                   "plain": PlainDali(out, batch, cores), "decode": PlainDali(out, batch, cores, decode_only=True),
                   "folder": folder,
                   "wds": make_loader(out, "train", batch_size=batch, backend="wds", num_threads=cores)}
        for loader in loaders.values():  # one epoch each first: start-up and page cache out of the rounds
            sum(len(y) for _, y in loader)
        res = _interleaved(images, {k: (lambda ld=ld: sum(len(y) for _, y in ld)) for k, ld in loaders.items()},
                           rounds=ROUNDS)
        best = {k: res[k] for k in loaders}
        first = {k: min(_epoch_timing(loaders[k])[1] for _ in range(2)) for k in ("ours", "plain")}
        loaders.clear()  # their threads and memory go before the next measurement
        verify = bench_verify(out, images, batch, cores)
        feed = bench_feed(out, batch)  # while the shards exist (the temporary directory goes below)
    _line("ours: DALI on the CPU (exact order, lighting)", best["ours"],
          extra=f"  first batch {1000 * first['ours']:.0f} ms")
    _line("(a) plain DALI pipeline, reader shuffle", best["plain"],
          extra=f"  first batch {1000 * first['plain']:.0f} ms")
    _line("(c) DALI decoding whole images, nothing else", best["decode"])
    _line("(b) ImageFolder + transforms, DataLoader", best["folder"])
    _line("webdataset + pillow-simd + DataLoader", best["wds"])
    for other, label, goal in (("plain", "(a) plain DALI", "1.1"), ("decode", "(c) decoding whole images", "1.0"),
                               ("folder", "(b) the torchvision way", "4"), ("wds", "webdataset loader", "2.5")):
        print(f"  ours / {label + ':':34s} {res[f'ratio:ours/{other}']:.2f}x  (goal >= {goal}; "
              f"range {res[f'range:ours/{other}']})")
    _print_verify(verify)
    print(f"  the DALI feed, per batch of {batch} (the loader's _feed and DALI taking its outputs, no decoding):\n"
          f"    per-sample arguments as arrays {1000 * feed['arrays_s']:.2f} ms, as lists of NumPy scalars (before) "
          f"{1000 * feed['lists_s']:.2f} ms: {feed['lists_s'] / feed['arrays_s']:.1f}x")
    return {**res, "first_batch_s": first["ours"], "plain_first_batch_s": first["plain"], **verify,
            "feed_arrays_s": feed["arrays_s"], "feed_lists_s": feed["lists_s"]}


def bench_feed(out: str, batch: int, batches: int = 30, rounds: int = 5) -> dict:
    """Seconds per batch of what the training thread spends to hand DALI a batch: our loader's _feed
    and DALI's ingestion of its six outputs, in a pipeline that does nothing else. "lists" converts the
    per-sample arguments as the feed did before (a list of NumPy scalars or vectors per argument)."""
    import time

    from nvidia.dali import fn, pipeline_def

    from pipeline import make_loader
    loader = make_loader(out, "train", batch_size=batch, backend="dali", verify=False)

    def source(as_lists: bool):
        def feed():
            jpgs, labels, *args = loader._feed()
            return (jpgs, labels, *[list(a) for a in args]) if as_lists else (jpgs, labels, *args)
        return feed

    best = {}
    for _ in range(rounds):
        for name, as_lists in (("arrays_s", False), ("lists_s", True)):
            @pipeline_def
            def only_feed(src=source(as_lists)):
                return tuple(fn.external_source(source=src, num_outputs=6, batch=True))
            pipe = only_feed(batch_size=batch, num_threads=1, device_id=None, prefetch_queue_depth=1)
            pipe.build()
            pipe.run()  # the first batch builds the buffers
            t0 = time.perf_counter()
            for _ in range(batches):
                pipe.run()
            best[name] = min(best.get(name, float("inf")), (time.perf_counter() - t0) / batches)
            del pipe
    return best


def bench_verify(out: str, images: int, batch: int, cores: int, rounds: int = 15) -> dict:
    """What verifying every shard's sha256 adds to the epoch that does it: a run's first (later epochs
    only look the result up). Each round makes a fresh loader of each kind and runs one epoch with it,
    as a run starts; the rounds differ by the verification alone. Two measures: the paired wall-clock
    ratio (this machine's drift makes it wander by several %), and the hashing thread's own CPU time
    against the CPU time of an epoch without it (exact, and what the check costs where the CPU is the
    bottleneck)."""
    from pipeline import make_loader
    stats = {"hash_s": 0.0, "hash_cpu_s": 0.0, "wait_s": 0.0, "epochs": 0}

    def first_epoch(verify: bool) -> None:
        loader = make_loader(out, "train", batch_size=batch, backend="dali", num_threads=cores, verify=verify)
        sum(len(y) for _, y in loader)
        if verify:
            v = loader.verifier
            stats["hash_s"] += v.hash_seconds
            stats["hash_cpu_s"] += v.hash_cpu_seconds
            stats["wait_s"] += v.wait_seconds
            stats["epochs"] += 1

    first_epoch(True)
    first_epoch(False)
    plain_cpu = []

    def unverified() -> None:
        c0 = _cpu_seconds()
        first_epoch(False)
        plain_cpu.append(_cpu_seconds() - c0)

    res = _interleaved(images, {"verify": lambda: first_epoch(True), "no_verify": unverified}, rounds=rounds)
    n = stats["epochs"]
    shards = make_loader(out, "train", batch_size=batch, backend="dali", verify=False)
    nbytes = sum(s["bytes"] for s in shards.shards)
    per_image = nbytes / shards.num_samples
    cpu_share = stats["hash_cpu_s"] / n / float(np.median(plain_cpu))
    return {"verify_cost": res["ratio:no_verify/verify"] - 1, "verify_range": res["range:no_verify/verify"],
            "verify_cpu_share": cpu_share, "verify_hash_MBps": nbytes * n / max(stats["hash_cpu_s"], 1e-9) / 1e6,
            "verify_wait_s": stats["wait_s"] / n, "bytes_per_image": per_image, "verify_rounds": rounds,
            # the CPU share at ImageNet's JPEGs (~30 KB at 256 px, quality 90: ~30 MB a 1,024-sample shard)
            # if decoding them took no longer than these smaller synthetic ones: an upper bound
            "verify_cpu_share_30KB": cpu_share * 30e3 / per_image}


def _print_verify(v: dict) -> None:
    print(f"  shard sha256 verification (once per run, background thread), {v['verify_rounds']} paired rounds:\n"
          f"    first epoch, wall clock: {100 * v['verify_cost']:+.1f} % (rounds {v['verify_range']})\n"
          f"    hashing CPU time / the epoch's CPU time: {100 * v['verify_cpu_share']:.1f} % (goal < 2 %); "
          f"{v['verify_hash_MBps']:.0f} MB per CPU second, {v['bytes_per_image'] / 1e3:.1f} KB/image; the reader "
          f"waited {1000 * v['verify_wait_s']:.0f} ms an epoch (the first shard)\n"
          f"    at ImageNet's ~30 KB/image with this decode time (an upper bound): "
          f"{100 * v['verify_cpu_share_30KB']:.1f} % of the CPU")
