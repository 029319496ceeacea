"""Repack ILSVRC-2012 into webdataset shards of 256x256 JPEGs, with a DALI index per shard.

    python tools/make_shards.py SRC OUT [--workers N] [--shard-samples 1024] [--quality 90] ...

SRC is any of the layouts of docs/DESIGN.md (class folders, Kaggle CLS-LOC,
or the original ILSVRC2012_img_{train,val}.tar + devkit, read in place). Each image
is decoded, its shorter side resized to --size, the central square cropped (as in
the paper, section 2), and re-encoded as an RGB baseline JPEG. Train samples are
shuffled across the whole split with --seed before they are cut into shards; val
keeps its source order. The same SRC, options and seed give byte-identical shards
and dataset.json, whatever --workers is (so --workers is not recorded).

Safety: every file is written to a temporary name and renamed when complete, and
dataset.json is written last, so a directory without it is unfinished. Rerunning
the same command into the same OUT FINISHES the job: shards already written and
verified against the run's journal (OUT/_progress.jsonl, sha256 of each) are kept,
the rest are made. A rerun with other options into an unfinished OUT is refused;
an OUT that is already complete (has dataset.json) is refused.

An image that cannot be decoded fails the run, naming every such file, unless
--allow-skips is given; then each is listed in the manifest's `skipped`.
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
import multiprocessing

if __package__ in (None, ""):  # run as `python tools/make_shards.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.shards import (FORMAT_VERSION, MANIFEST, ShardWriter, atomic_write, error_text, index_name,
                             pack_sample, sha256_file, shard_name)
from tools.imagenet_source import LAYOUTS, Source, SourceError, SourceSample, open_source

RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "box": Image.BOX}
JOURNAL = "_progress.jsonl"


@dataclass(frozen=True)
class ShardOptions:
    """Every option that changes the output; all of them go into dataset.json."""
    size: int = 256              # px: shorter side and side of the central square crop (paper, section 2)
    keep_aspect: bool = False    # store the shorter side at `size` without the crop
    quality: int = 90            # JPEG quality 1-95 of the re-encoded images (libjpeg scale)
    resample: str = "bicubic"    # PIL filter for the resize (antialiased when downscaling)
    draft: bool = True           # JPEG DCT-domain downscale by 2/4/8 first where the source is >= 2x the target
    shard_samples: int = 1024    # samples per shard (~30 MB at 256 px, quality 90)
    seed: int = 0                # seed of the train split's global shuffle
    splits: tuple = ("train", "val")
    layout: str = "auto"
    allow_skips: bool = False    # list undecodable images in `skipped` instead of failing


# ---------------------------------------------------------------- one image

def process_image(data: bytes, opts: ShardOptions) -> tuple[bytes, tuple[int, int]]:
    """Source bytes -> (RGB baseline JPEG bytes, original (w, h)). Raises on undecodable input."""
    img = Image.open(io.BytesIO(data))
    orig = img.size
    w, h = orig
    if img.format == "JPEG" and opts.draft:
        # The decoder scales by 1/2, 1/4 or 1/8 in the DCT domain only while the
        # result stays at least this size, so quality is kept and decode is faster.
        scale = opts.size / min(w, h)
        img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
    img.load()  # decode now: truncated or corrupt files raise here
    if img.mode != "RGB":  # CMYK, grayscale, palette and RGBA (PNG) sources
        img = img.convert("RGB")
    w, h = img.size
    filt = RESAMPLE[opts.resample]
    if opts.keep_aspect:
        s = opts.size / min(w, h)
        img = img.resize((max(opts.size, round(w * s)), max(opts.size, round(h * s))), filt)
    else:
        # Shorter side -> size, then the central size x size square: resize just the
        # central square of the source (same geometry, fewer output pixels).
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img = img.resize((opts.size, opts.size), filt, box=box)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=opts.quality, progressive=False, optimize=False)
    return out.getvalue(), orig


_worker_opts: ShardOptions | None = None
_worker_out: str = ""
_worker_progress = None  # shared counter of images done, for the main process's progress bar


def _init_worker(opts: ShardOptions, out: str, progress) -> None:
    global _worker_opts, _worker_out, _worker_progress
    _worker_opts, _worker_out, _worker_progress = opts, out, progress


def _encode_sample(sample: SourceSample, label: int):
    """Source sample -> (its packed tar members, None) or (None, the error). Never raises."""
    try:
        jpg, orig = process_image(sample.read(), _worker_opts)
    except Exception as e:  # noqa: BLE001 - any decoder failure is reported per file
        return None, error_text(e)
    return pack_sample(sample.key, jpg, label, {"wnid": sample.wnid, "source": sample.source,
                                                "orig_size": list(orig)}), None


def _make_shard(task: tuple[str, list]) -> dict:
    """Runs in a worker: one whole shard, written by the worker itself (tar and index).

    Workers own whole shards, so no image crosses a process boundary and the main
    process does no per-image work; a shard's bytes depend only on its samples."""
    name, items = task
    writer, skipped, failed, reported = ShardWriter(), [], [], 0
    for k, (sample, label) in enumerate(items, 1):
        packed, err = _encode_sample(sample, label)
        if err is not None:
            (skipped if _worker_opts.allow_skips else failed).append({"source": sample.source, "reason": err})
        else:
            writer.add_packed(sample.key, *packed)
        if k % 16 == 0 or k == len(items):  # the shared counter's lock: once per 16 images
            with _worker_progress.get_lock():
                _worker_progress.value += k - reported
            reported = k
    if failed:  # an incomplete shard is never written; the run fails at the end
        return {"name": name, "failed": failed}
    return {"name": name, "shard": writer.finish(os.path.join(_worker_out, name)), "skipped": skipped}


# ---------------------------------------------------------------- the run

def fsync_file(path: str) -> None:
    """Flush one file (or directory: its entries) to disk; OSError names the path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardRun:
    def __init__(self, src: Source, out: str, opts: ShardOptions, workers: int, command: list[str]):
        self.src, self.out, self.opts, self.workers, self.command = src, out, opts, workers, command
        self.records: dict[str, list[dict]] = {}
        self.skipped: list[dict] = []
        self.failed: list[tuple[str, str]] = []
        self.journal_path = os.path.join(out, JOURNAL)

    # The journal lets a rerun keep the shards that are already complete.
    def _load_journal(self) -> dict[str, dict]:
        # --allow-skips changes no shard that gets written (a shard with an undecodable
        # image is not written without it), so the suggested rerun with it may finish this OUT.
        options = {k: v for k, v in asdict(self.opts).items() if k != "allow_skips"}
        header = {"options": options, "source": os.path.abspath(self.src.root)}
        if not os.path.exists(self.journal_path):
            atomic_write(self.journal_path, (json.dumps(header, sort_keys=True) + "\n").encode())
            return {}
        with open(self.journal_path) as f:
            lines = [json.loads(line) for line in f if line.strip()]
        if not lines or json.loads(json.dumps(lines[0])) != json.loads(json.dumps(header)):
            raise SourceError(f"{self.journal_path}: {self.out} holds an unfinished run with other options or "
                              "another source; rerun that command, or remove the directory")
        done = {}
        for rec in lines[1:]:
            path = os.path.join(self.out, rec["shard"]["file"])
            if (os.path.exists(path) and os.path.exists(index_name(path))
                    and os.path.getsize(path) == rec["shard"]["bytes"] and sha256_file(path) == rec["shard"]["sha256"]):
                done[rec["shard"]["file"]] = rec
        return done

    def _plan(self) -> list[tuple[str, str, np.ndarray]]:
        """(split, shard file, sample indices) for every shard of the run."""
        plan = []
        for split in self.opts.splits:
            n = len(self.src.splits[split])
            order = np.arange(n)
            if split == "train":  # one global shuffle, so every shard is a random draw of all classes
                order = np.random.default_rng(self.opts.seed).permutation(n)
            per = self.opts.shard_samples
            plan += [(split, shard_name(split, k), order[i: i + per]) for k, i in enumerate(range(0, n, per))]
        return plan

    def run(self) -> int:
        os.makedirs(self.out, exist_ok=True)
        for tmp in glob.glob(os.path.join(self.out, "*.tmp-*")):  # partial files of a killed run
            os.remove(tmp)
        done = self._load_journal()
        plan = self._plan()
        todo = [(name, [(self.src.splits[split][i], self.src.label(self.src.splits[split][i].wnid)) for i in idx])
                for split, name, idx in plan if name not in done]
        records = {name: done[name] for _, name, _ in plan if name in done}
        t0 = time.time()
        progress = multiprocessing.Value("q", 0)
        bar = tqdm(total=sum(len(items) for _, items in todo), unit="img", dynamic_ncols=True, mininterval=1.0,
                   file=sys.stderr)
        # Each finished shard is flushed to disk by a thread of this (otherwise idle) process
        # while the workers go on: by the manifest, nothing is left to wait for. (One os.sync()
        # at the end cost ~1 % of a run here, and on a shared machine syncs everyone's files.)
        # The pool first: its workers are forked before the syncer starts a thread.
        with multiprocessing.Pool(self.workers, initializer=_init_worker,
                                  initargs=(self.opts, self.out, progress)) as pool, ThreadPoolExecutor(1) as syncer:
            flushed = [syncer.submit(self._flush, name) for name in records]  # kept from an earlier run
            pending = [pool.apply_async(_make_shard, (task,)) for task in todo]
            while pending:
                pending[0].wait(0.5)
                bar.update(progress.value - bar.n)
                for r in [r for r in pending if r.ready()]:
                    pending.remove(r)
                    res = r.get()
                    if "failed" in res:
                        self.failed += [(f["source"], f["reason"]) for f in res["failed"]]
                        continue
                    flushed.append(syncer.submit(self._flush, res["name"]))
                    rec = {"shard": res["shard"], "skipped": res["skipped"]}
                    with open(self.journal_path, "a") as f:
                        f.write(json.dumps(rec, sort_keys=True) + "\n")
                    records[res["name"]] = rec
        bar.update(progress.value - bar.n)
        bar.close()
        for f in flushed:  # every shard on disk before the manifest says the directory is complete
            f.result()
        for split in self.opts.splits:
            names = [name for sp, name, _ in plan if sp == split and name in records]
            self.records[split] = [records[n]["shard"] for n in names]
            self.skipped += [s for n in names for s in records[n]["skipped"]]
        elapsed = time.time() - t0
        if self.failed:
            for source, reason in sorted(self.failed):
                print(f"make_shards: {os.path.join(self.src.root, source)}: cannot decode ({reason})", file=sys.stderr)
            print(f"make_shards: {len(self.failed)} undecodable image(s); no dataset.json written. "
                  "Rerun with --allow-skips to list them in the manifest's `skipped` and go on.", file=sys.stderr)
            return 1
        self._write_manifest()
        self._summary(elapsed)
        return 0

    def _flush(self, name: str) -> None:
        tar = os.path.join(self.out, name)
        for path in (tar, index_name(tar)):
            fsync_file(path)

    def _write_manifest(self) -> None:
        manifest = {
            "format_version": FORMAT_VERSION,
            "classes": [{"index": i, "wnid": w, "name": n} for i, (w, n) in enumerate(self.src.classes)],
            "splits": {split: {"samples": sum(r["samples"] for r in recs), "shards": recs}
                       for split, recs in self.records.items()},
            "preprocessing": {"size": self.opts.size, "crop": "none" if self.opts.keep_aspect else "center",
                              "quality": self.opts.quality, "resample": self.opts.resample,
                              "keep_aspect": self.opts.keep_aspect, "draft": self.opts.draft,
                              "subsampling": "4:2:0", "progressive": False, "pil": _pil_version()},
            "seed": self.opts.seed,
            "options": asdict(self.opts),
            "source": {"layout": self.src.layout, "path": self.src.root},
            "skipped": sorted(self.skipped, key=lambda s: s["source"]),
            "command": self.command,
        }
        fsync_file(self.out)  # the shards' renames (directory entries) too
        atomic_write(os.path.join(self.out, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
        os.remove(self.journal_path)

    def _summary(self, elapsed: float) -> None:
        total = 0
        for split, recs in self.records.items():
            n = sum(r["samples"] for r in recs)
            total += n
            mb = sum(r["bytes"] for r in recs) / 1e6
            print(f"{split:5s}: {n} images in {len(recs)} shards, {mb:.1f} MB")
        print(f"skipped: {len(self.skipped)}" + (" (listed in dataset.json)" if self.skipped else ""))
        print(f"done in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f} img/s) -> {os.path.join(self.out, MANIFEST)}")


def _pil_version() -> str:
    import PIL
    return PIL.__version__


def parse_args(argv):
    p = argparse.ArgumentParser(prog="make_shards.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = ShardOptions()
    p.add_argument("src", help="ILSVRC-2012 source directory")
    p.add_argument("out", help="output shard directory")
    p.add_argument("--layout", choices=("auto",) + LAYOUTS, default=d.layout, help="source layout (default: detect)")
    p.add_argument("--splits", default=",".join(d.splits), help="comma-separated splits (default: train,val)")
    p.add_argument("--workers", type=int, default=os.cpu_count(), help="processes (default: all cores; not recorded)")
    p.add_argument("--shard-samples", type=int, default=d.shard_samples, help="samples per shard (default: 1024)")
    p.add_argument("--size", type=int, default=d.size, help="px, shorter side and crop (default: 256)")
    p.add_argument("--keep-aspect", action="store_true", help="keep the aspect ratio: no central crop")
    p.add_argument("--quality", type=int, default=d.quality, help="JPEG quality 1-95 (default: 90)")
    p.add_argument("--resample", choices=sorted(RESAMPLE), default=d.resample, help="resize filter (default: bicubic)")
    p.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size before resizing")
    p.add_argument("--seed", type=int, default=d.seed, help="train shuffle seed (default: 0)")
    p.add_argument("--allow-skips", action="store_true", help="list undecodable images in dataset.json and go on")
    a = p.parse_args(argv)
    splits = tuple(s for s in a.splits.split(",") if s)
    if not splits or any(s not in ("train", "val") for s in splits):
        p.error("--splits takes train, val or train,val")
    if a.workers < 1 or a.shard_samples < 1 or a.size < 224 or not 1 <= a.quality <= 100:
        p.error("--workers and --shard-samples must be >= 1, --size >= 224 (the training crop), "
                "--quality in 1..100")
    opts = ShardOptions(size=a.size, keep_aspect=a.keep_aspect, quality=a.quality, resample=a.resample,
                        draft=not a.no_draft, shard_samples=a.shard_samples, seed=a.seed, splits=splits,
                        layout=a.layout, allow_skips=a.allow_skips)
    return a, opts


def canonical_command(src: str, opts: ShardOptions) -> list[str]:
    """The command that reproduces this output (OUT is the directory holding the manifest)."""
    cmd = ["tools/make_shards.py", src, "OUT", "--layout", opts.layout, "--splits", ",".join(opts.splits),
           "--shard-samples", str(opts.shard_samples), "--size", str(opts.size), "--quality", str(opts.quality),
           "--resample", opts.resample, "--seed", str(opts.seed)]
    cmd += ["--keep-aspect"] * opts.keep_aspect + ["--no-draft"] * (not opts.draft)
    return cmd + ["--allow-skips"] * opts.allow_skips


def main(argv: list[str] | None = None) -> int:
    a, opts = parse_args(argv)
    if os.path.exists(os.path.join(a.out, MANIFEST)):
        print(f"make_shards: {os.path.join(a.out, MANIFEST)}: {a.out} is already complete; "
              "choose another OUT or remove it", file=sys.stderr)
        return 2
    try:
        src = open_source(a.src, opts.splits, opts.layout)
        print(f"source: {a.src} ({src.layout} layout), {len(src.classes)} classes, "
              + ", ".join(f"{s} {len(v)} images" for s, v in src.splits.items()), file=sys.stderr)
        return ShardRun(src, a.out, opts, a.workers, canonical_command(a.src, opts)).run()
    except SourceError as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # writing OUT: disk full, no permission, an I/O error while flushing
        print(f"make_shards: {e.filename or a.out}: {e.strerror or e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
