"""Repack ILSVRC-2012 into webdataset shards of 256x256 JPEGs, with a DALI index per shard.

    python tools/make_shards.py SRC OUT [--workers N] [--shard-samples 1024] [--quality 90] ...
    python tools/make_shards.py SRC OUT --part I/N ...    # on N nodes (I = 1..N), into one shared OUT
    python tools/make_shards.py --merge OUT               # then, once: dataset.json

SRC is any of the layouts of docs/DESIGN.md (class folders, Kaggle CLS-LOC,
or the original ILSVRC2012_img_{train,val}.tar + devkit, read in place). Each image
is decoded, its shorter side resized to --size, the central square cropped (as in
the paper, section 2), and re-encoded as an RGB baseline JPEG. Train samples are
shuffled across the whole split with --seed before they are cut into shards; val
keeps its source order. The same SRC, options and seed give byte-identical shards
and dataset.json, whatever --workers is (so --workers is not recorded).

Safety: every file is written to a temporary name and renamed when complete, and
dataset.json is written last, so a directory without it is unfinished. Rerunning
the same command into the same OUT FINISHES the job: a shard the run's journal
(OUT/_progress.jsonl) records is kept if its sha256 still matches and the source
still gives it the same samples (the same files, by path, size and modification
time); every other shard is made again, so a source changed between the runs (bad
files deleted, say) never mixes old and new samples. A rerun with other options
into an unfinished OUT is refused; an OUT that is already complete (has
dataset.json) is refused. A worker process that dies (out of memory, killed) ends
the run with exit 1; the shards finished so far are kept for the rerun.

An image that cannot be decoded fails the run, naming every such file, unless
--allow-skips is given; then each is listed in the manifest's `skipped`.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import hashlib
import itertools
import json
import os
import re
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
import multiprocessing

if __package__ in (None, ""):  # run as `python tools/make_shards.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.images import RESAMPLE, shard_image
from pipeline.shards import (FORMAT_VERSION, MANIFEST, LockHeld, ShardWriter, atomic_write, error_text, hold_lock,
                             index_name, let_go, pack_sample, sha256_file, shard_name)
from tools.imagenet_source import (LAYOUTS, LISTING_CACHE, ListingMismatch, SampleList, Source, SourceError,
                                   SourceSample, open_source)
from model.errors import sigterm_as_interrupt, stopped
from tools.workers import init_worker_signals, kill_workers, signals_held, workers_stopped_first

JOURNAL = "_progress.jsonl"


@dataclass(frozen=True)
class ShardOptions:
    """Every option that changes the output; all of them go into dataset.json."""
    size: int = 256              # px: shorter side and side of the central square crop (paper, section 2)
    keep_aspect: bool = False    # store the shorter side at `size` without the crop
    quality: int = 90            # JPEG quality 1-100 of the re-encoded images (libjpeg scale)
    resample: str = "bicubic"    # PIL filter for the resize (antialiased when downscaling)
    draft: bool = True           # JPEG DCT-domain downscale by 2/4/8 first where the source is >= 2x the target
    shard_samples: int = 1024    # samples per shard (~30 MB at 256 px, quality 90)
    seed: int = 0                # seed of the train split's global shuffle
    splits: tuple = ("train", "val")
    layout: str = "auto"
    any_class_names: bool = False  # class folders named anything, not only WordNet ids
    allow_skips: bool = False    # list undecodable images in `skipped` instead of failing
    val_fraction: float = 0.0    # the fall11 layout (no val split): the share of each class held out as val

MAX_SIZE = 4096  # px: beyond it a re-encoded image is tens of MB and a 1,024-sample shard tens of GB


# ---------------------------------------------------------------- one image

def process_image(data: bytes, opts: ShardOptions) -> tuple[bytes, tuple[int, int]]:
    """Source bytes -> (RGB baseline JPEG bytes, original (w, h)). Raises on undecodable input.
    pipeline/images.py does the work (predict calls it too, so both see an image alike)."""
    return shard_image(data, size=opts.size, keep_aspect=opts.keep_aspect, quality=opts.quality,
                       resample=opts.resample, draft=opts.draft)


_worker_opts: ShardOptions | None = None
_worker_out: str = ""
_worker_progress = None  # shared counter of images done, for the main process's progress bar


_worker_rehash = False  # --rehash: digest the source bytes of each shard too


def _init_worker(opts: ShardOptions, out: str, progress, parent: int, rehash: bool = False) -> None:
    global _worker_opts, _worker_out, _worker_progress, _worker_rehash
    _worker_opts, _worker_out, _worker_progress, _worker_rehash = opts, out, progress, rehash
    init_worker_signals(parent)


def _encode_sample(sample: SourceSample, label: int, content=None):
    """Source sample -> (its packed tar members, None) or (None, the error). Never raises.
    content: a hash that the source bytes are fed to (--rehash)."""
    try:
        data = sample.read()
        if content is not None:
            content.update(data)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", Image.DecompressionBombWarning)
            jpg, orig = process_image(data, _worker_opts)
        for w in caught:  # PIL's warning names no file: this one does
            if issubclass(w.category, Image.DecompressionBombWarning):
                print(f"make_shards: {sample.source}: warning: {w.message}", file=sys.stderr, flush=True)
    except ListingMismatch:
        raise  # not an undecodable image: the run stops (_make_shard)
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
    content = hashlib.sha256() if _worker_rehash else None
    for k, (sample, label) in enumerate(items, 1):
        try:
            packed, err = _encode_sample(sample, label, content)
        except ListingMismatch as e:
            return {"name": name, "mismatch": str(e)}
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
    return {"name": name, "shard": writer.finish(os.path.join(_worker_out, name)), "skipped": skipped,
            "content": content.hexdigest() if content is not None else None}


# ---------------------------------------------------------------- the run

def fsync_file(path: str) -> None:
    """Flush one file (or directory: its entries) to disk; OSError names the path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class WorkerDied(Exception):
    """A worker process ended without finishing its shard; the message names OUT and the shard."""


class ShardRun:
    def __init__(self, src: Source, out: str, opts: ShardOptions, workers: int, command: list[str],
                 rehash: bool = False, part: tuple[int, int] | None = None):
        self.src, self.out, self.opts, self.workers, self.command = src, out, opts, workers, command
        self.rehash = rehash  # compare the source files' contents with the journal's, not their size and mtime
        self.part = part      # (i, N): make only the shards at plan positions k with k % N == i - 1
        self.records: dict[str, list[dict]] = {}
        self.skipped: list[dict] = []
        self.failed: list[tuple[str, str]] = []
        self.journal_path = os.path.join(out, part_journal(*part) if part else JOURNAL)

    # The journal lets a rerun keep the shards that are already complete: each record holds the shard's
    # sha256 and the identity of the source files it was made from (its plan digest), so a shard is kept
    # only if its bytes are intact and the source still gives it exactly the same samples.
    def _load_journal(self, plan_digests: dict[str, str]) -> dict[str, dict]:
        # --allow-skips changes no shard that gets written (a shard with an undecodable
        # image is not written without it), so the suggested rerun with it may finish this OUT.
        header = {"options": {k: v for k, v in asdict(self.opts).items() if k != "allow_skips"}}
        if not os.path.exists(self.journal_path):
            atomic_write(self.journal_path, (json.dumps(header, sort_keys=True) + "\n").encode())
            return {}
        with open(self.journal_path, encoding="utf-8") as f:
            text = f.read()
        lines, records = text.split("\n"), []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError:
                if n == len(lines):  # the last line, without its newline: cut off by a kill; remade below
                    print(f"make_shards: {self.journal_path}:{n}: ignoring a half-written last line "
                          "(that shard is made again)", file=sys.stderr)
                    continue
                raise SourceError(f"{self.journal_path}:{n}: not a journal line (edited or damaged); "
                                  f"remove {self.out} and run again") from None
        if not records or not isinstance(records[0], dict) or \
                records[0].get("options") != json.loads(json.dumps(header["options"])):
            if self.part:  # the other parts may be fine: only this one's journal need go
                raise SourceError(f"{self.journal_path}: part {self.part[0]}/{self.part[1]} was begun with other "
                                  f"options ({_options_text(records[0]) if records and isinstance(records[0], dict) else '?'}); "
                                  "rerun it with those, or remove this journal to make the part again with these")
            raise SourceError(f"{self.journal_path}: {self.out} holds an unfinished run with other options; "
                              "rerun that command, or remove the directory")
        done, changed = {}, 0
        for n, rec in enumerate(records[1:], 2):
            if isinstance(rec, dict) and "done" in rec:  # a finished part's last line: written again at its end
                continue
            try:
                name = rec["shard"]["file"]
                int(rec["shard"]["bytes"]), str(rec["shard"]["sha256"])
            except (TypeError, KeyError, ValueError):
                raise SourceError(f"{self.journal_path}:{n}: not a journal record (edited or damaged); "
                                  f"remove {self.out} and run again") from None
            if rec.get("plan") != plan_digests.get(name) or (self.rehash and rec.get("content") != self._content(name)):
                changed += 1  # the source no longer gives this shard's samples: made again
                continue
            path = os.path.join(self.out, name)
            if (os.path.exists(path) and os.path.exists(index_name(path))
                    and os.path.getsize(path) == rec["shard"]["bytes"] and sha256_file(path) == rec["shard"]["sha256"]):
                done[name] = rec
        if changed:
            how = "by content (--rehash)" if self.rehash else "by path, size and modification time; --rehash compares contents"
            print(f"make_shards: the source changed since the unfinished run in {self.out} ({how}): {changed} of its "
                  f"{len(records) - 1} shards no longer match it and are made again", file=sys.stderr)
        # The journal from here on holds only what is kept, so no stale or half line is ever read again.
        atomic_write(self.journal_path, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                for r in [records[0], *done.values()]).encode())
        return done

    def _items(self, name: str) -> list:
        """(SourceSample, label) of a planned shard's samples, in order."""
        split, idx = self._where[name]
        samples = self.src.splits[split]
        return [(x, self.src.label(x.wnid)) for x in (samples[i] for i in idx.tolist())]

    def _content(self, name: str) -> str:
        """sha256 over the source bytes of one planned shard's samples, in order (what a --rehash
        worker records while it makes the shard)."""
        h = hashlib.sha256()
        for sample, _ in self._items(name):
            h.update(sample.read())
        return h.hexdigest()

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

    def _plan_digests(self, plan) -> dict[str, str]:
        """shard file -> sha256 of what it is made from: each sample's key, label, source path, and the
        size and modification time of the file that holds its bytes (a tar member: its byte range and
        the tar's). A file deleted, added, renamed or replaced changes the digest of every shard it
        touches (and, through the train shuffle, usually of all train shards)."""
        stamps: dict[str, str] = {}

        def stamp(path: str) -> str:
            if path not in stamps:
                st = os.stat(path)
                stamps[path] = f"{st.st_size}:{st.st_mtime_ns}"
            return stamps[path]

        digests = {}
        for split, name, idx in plan:
            h = hashlib.sha256()
            for i in idx:
                s = self.src.splits[split][i]
                h.update(f"{s.key}\t{self.src.label(s.wnid)}\t{s.source}\t{s.offset}:{s.size}\t"
                         f"{stamp(s.path)}\n".encode())
            digests[name] = h.hexdigest()
        return digests

    def _lock(self) -> None:
        """Hold <journal>.lock (flock) for the run's life: the same part, or the same OUT, made by two
        processes at once would interleave one journal. The kernel lets go when the process dies."""
        path = lock_name(self.journal_path)
        try:
            self._lock_fd = hold_lock(path)[0]
        except LockHeld as e:
            what = f"part {self.part[0]}/{self.part[1]} of {self.out}" if self.part else self.out
            raise SourceError(f"{path}: another make_shards (pid {e.args[0] or '?'}) is making {what} now; wait for "
                              "it, or stop it first") from None

    def _unlock(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            let_go(lock_name(self.journal_path), self._lock_fd)
            self._lock_fd = None

    def listing_digest(self) -> str:
        """sha256 of the whole listing every part plans from: each sample's split, key, class, source and
        byte range, and the size and mtime of each tar holding samples. Parts that planned from different
        listings (an image deleted, a tar replaced between them) would merge into duplicates and gaps.
        A plain image file is named, not stat'ed (a stat per image per part would cost more than the rest)."""
        h, tars = hashlib.sha256(), set()
        for split in self.opts.splits:
            samples = self.src.splits[split]
            if isinstance(samples, SampleList):  # its columns: seconds at Fall 2011's size
                samples.fingerprint(h)
                tars.add(samples.path)
                continue
            for x in samples:
                h.update(f"{split}\t{x.key}\t{x.wnid}\t{x.source}\t{x.offset}:{x.size}\n".encode())
                if x.size >= 0:
                    tars.add(x.path)
        for path in sorted(tars):
            st = os.stat(path)
            h.update(f"{path}\t{st.st_size}:{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def run(self) -> int:
        os.makedirs(self.out, exist_ok=True)
        self._lock()
        try:
            return self._run()
        finally:
            self._unlock()

    def _run(self) -> int:
        full_plan = self._plan()
        plan = [entry for k, entry in enumerate(full_plan) if self.part is None or k % self.part[1] == self.part[0] - 1]
        mine = {name for _, name, _ in plan}
        for tmp in glob.glob(os.path.join(self.out, "*.tmp-*")):  # partial files of a killed run (this part's:
            if self.part is None or os.path.basename(tmp).split(".tmp-")[0].rsplit(".", 1)[0] + ".tar" in mine:
                os.remove(tmp)  # other parts may be writing theirs into the same OUT right now)
        try:
            digests = self._plan_digests(plan)
        except OSError as e:  # a source file gone between listing and now
            raise SourceError(f"{e.filename}: cannot read ({e.strerror})") from None
        self._where = {name: (split, idx) for split, name, idx in plan}  # a shard's samples, made when it is sent
        done = self._load_journal(digests)
        todo = [name for _, name, _ in plan if name not in done]
        records = {name: done[name] for _, name, _ in plan if name in done}
        t0 = time.time()
        progress = multiprocessing.Value("q", 0)
        bar = tqdm(total=sum(len(self._where[name][1]) for name in todo), unit="img", dynamic_ncols=True,
                   mininterval=1.0, file=sys.stderr)
        # Each finished shard is flushed to disk by a thread of this (otherwise idle) process
        # while the workers go on: by the manifest, nothing is left to wait for. (One os.sync()
        # at the end cost ~1 % of a run here, and on a shared machine syncs everyone's files.)
        # The pool's tasks first: the executor forks its workers at the first submit, and that must
        # come before the syncer starts a thread (a fork copies no threads, only the locks they hold).
        # A ProcessPoolExecutor, not a multiprocessing.Pool: when a worker dies (the OOM killer, a
        # SIGKILL, a crash in a decoder) the Pool replaces it and its shard's result never comes, so
        # the run hangs for good; the executor fails every pending shard at once instead.
        with ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("fork"),
                                 initializer=_init_worker,
                                 initargs=(self.opts, self.out, progress, os.getpid(), self.rehash)) as pool, \
                ThreadPoolExecutor(1) as syncer:
            # A few shards in flight a worker, each's samples made as it is sent: submitting every shard at
            # once held every sample of the run (as objects, pickled) in this process until it was done.
            tasks = ((name, self._items(name)) for name in todo)
            window = 2 * self.workers
            with workers_stopped_first(pool):
                try:  # the first submissions too: a Ctrl-C among them must stop the workers, not wait for them
                    pending = _submit(pool, itertools.islice(tasks, window))
                    flushed = [syncer.submit(self._flush, name) for name in records]  # kept from an earlier run
                    made = self._collect(pending, records, digests, syncer, flushed, bar, progress,
                                         lambda: _submit(pool, itertools.islice(tasks, 1)))
                except (KeyboardInterrupt, SourceError):  # the workers ignore SIGINT: stop them now, not after
                    bar.close()                           # their shards
                    kill_workers(pool)
                    raise
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
                what = "cannot encode" if reason.startswith("EncodeError") else "cannot decode"
                print(f"make_shards: {os.path.join(self.src.root, source)}: {what} ({reason})", file=sys.stderr)
            print(f"make_shards: {len(self.failed)} undecodable image(s); no dataset.json written. "
                  "Rerun with --allow-skips to list them in the manifest's `skipped` and go on.", file=sys.stderr)
            return 1
        if self.part is not None:
            self._finish_part(full_plan, elapsed, made)
            return 0
        empty = [split for split in self.opts.splits if not sum(r["samples"] for r in self.records[split])]
        if empty:
            print(f"make_shards: split {empty[0]} has no images ({len(self.skipped)} skipped); no dataset.json "
                  f"written. Leave it out with --splits if that is what you want.", file=sys.stderr)
            return 1
        self._write_manifest()
        self._summary(elapsed, made)
        return 0

    def _finish_part(self, full_plan, elapsed: float, made: int) -> None:
        """A part's last journal line: what --merge needs to write dataset.json without the source."""
        done = {"done": {"part": list(self.part), "plan": {split: [name for sp, name, _ in full_plan if sp == split]
                                                           for split in self.opts.splits},
                         "classes": self.src.classes, "unused": self.src.unused, "layout": self.src.layout,
                         "listing": self.listing_digest(),
                         "root": self.src.root, "command": self.command}}
        with open(self.journal_path, "a", encoding="utf-8") as f:  # every shard is flushed already (run() waited for it)
            f.write(json.dumps(done, sort_keys=True) + "\n")
        n = sum(r["samples"] for recs in self.records.values() for r in recs)
        i, parts = self.part
        print(f"part {i}/{parts}: {n} images in {sum(len(r) for r in self.records.values())} shards "
              f"({made} made in {elapsed:.1f} s); when every part is done: tools/make_shards.py --merge {self.out}")

    def _collect(self, pending, records, digests, syncer, flushed, bar, progress, send_next) -> int:
        """Waits for the shards, journals each as it is done, sends the next in its place (send_next) and
        schedules its flush; returns the number of images made."""
        made = 0
        while pending:
            finished, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            bar.update(progress.value - bar.n)
            for future in finished:
                name = pending.pop(future)
                try:
                    res = future.result()
                    pending.update(send_next())
                except BrokenProcessPool:
                    bar.close()
                    raise WorkerDied(f"{self.out}: a worker process died while making {name} (killed: out "
                                     f"of memory?); the {len(records)} shards finished are kept and "
                                     "the same command finishes the job") from None
                if "mismatch" in res:
                    raise SourceError(f"{res['mismatch']}: the listing is stale or wrong; remove "
                                      f"{os.path.join(self.out, LISTING_CACHE.format('*'))} (a listing cache) and "
                                      "run again")
                if "failed" in res:
                    self.failed += [(f["source"], f["reason"]) for f in res["failed"]]
                    continue
                flushed.append(syncer.submit(self._flush, res["name"]))
                rec = {"shard": res["shard"], "skipped": res["skipped"], "plan": digests[res["name"]],
                       "content": res["content"]}
                with open(self.journal_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec, sort_keys=True) + "\n")
                records[res["name"]] = rec
                made += res["shard"]["samples"]
        return made

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
            "unused": self.src.unused,
            "command": self.command,
        }
        self._remove_stale(manifest)
        fsync_file(self.out)  # the shards' renames (directory entries) too
        atomic_write(os.path.join(self.out, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True).encode() + b"\n")
        if os.path.exists(self.journal_path):  # a merge of parts has none (it removes theirs)
            os.remove(self.journal_path)
        for cache in glob.glob(os.path.join(self.out, LISTING_CACHE.format("*"))):  # a finished OUT needs no listing
            os.remove(cache)

    def _remove_stale(self, manifest: dict) -> None:
        """Shards (and their .idx) of an earlier run that this manifest does not list: a source that
        shrank leaves a last shard or two behind, which a consumer that globs train-*.tar would read."""
        listed = {s["file"] for sp in manifest["splits"].values() for s in sp["shards"]}
        listed |= {index_name(f) for f in listed}
        stale = sorted(f for split in ("train", "val") for f in os.listdir(self.out)
                       if re.fullmatch(rf"{split}-\d{{6}}\.(tar|idx)", f) and f not in listed)
        for f in stale:
            os.remove(os.path.join(self.out, f))
        if stale:
            print(f"make_shards: removed {len(stale)} file(s) of an earlier run that this one does not make: "
                  f"{', '.join(stale[:4])}{' ...' if len(stale) > 4 else ''}", file=sys.stderr)

    def _summary(self, elapsed: float, made: int) -> None:
        total = 0
        for split, recs in self.records.items():
            n = sum(r["samples"] for r in recs)
            total += n
            mb = sum(r["bytes"] for r in recs) / 1e6
            print(f"{split:5s}: {n} images in {len(recs)} shards, {mb:.1f} MB")
        print(f"skipped: {len(self.skipped)}" + (" (listed in dataset.json)" if self.skipped else ""))
        unused = self.src.unused
        print(f"not used: {len(unused)}" + (" (listed in dataset.json's `unused`): " + "; ".join(
            f"{u['source']} ({u['reason']})" for u in unused[:3]) + (" ..." if len(unused) > 3 else "") if unused else ""))
        kept = f", {total - made} kept from the unfinished run" if made < total else ""
        print(f"done in {elapsed:.1f} s: {made} images made ({made / max(elapsed, 1e-9):.0f} img/s){kept} "
              f"-> {os.path.join(self.out, MANIFEST)}")


def _submit(pool, tasks) -> dict:
    """{future: shard name} of each (name, items) task, submitted with Ctrl-C and SIGTERM held back."""
    with signals_held():
        return {pool.submit(_make_shard, task): task[0] for task in tasks}


def lock_name(journal: str) -> str:
    """The lock file of a run or part beside its journal: _progress[.part-I-of-N].lock."""
    return journal.rsplit(".", 1)[0] + ".lock"


def part_journal(i: int, parts: int) -> str:
    return f"_progress.part-{i}-of-{parts}.jsonl"


def merge(out: str) -> int:
    """dataset.json from the journals of every part (--part i/N) in OUT, once each part is complete and
    all were made with the same options from the same source listing; exit 2 naming what is missing."""
    journals = sorted(glob.glob(os.path.join(out, "_progress.part-*-of-*.jsonl")))
    if os.path.exists(os.path.join(out, MANIFEST)):
        raise SourceError(f"{os.path.join(out, MANIFEST)}: {out} is already complete")
    if not journals:
        raise SourceError(f"{out}: no part journals (_progress.part-I-of-N.jsonl): run the parts first")
    counts = {int(re.search(r"-of-(\d+)\.jsonl$", j).group(1)) for j in journals}
    if len(counts) != 1:
        raise SourceError(f"{out}: holds parts of runs split {' and '.join(map(str, sorted(counts)))} ways; "
                          "remove the directory and run the parts again")
    parts = counts.pop()
    loaded, missing = {}, []
    for i in range(1, parts + 1):
        path = os.path.join(out, part_journal(i, parts))
        lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []
        try:
            records = [json.loads(line) for line in lines if line.strip()]
        except ValueError:  # a half-written line: the part was killed
            records = []
        if not records or not isinstance(records[-1], dict) or "done" not in records[-1]:
            missing.append(i)
            continue
        loaded[i] = (records[0], records[1:-1], records[-1]["done"])
    if missing:
        raise SourceError(f"{out}: part{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))} of {parts} "
                          "not finished (no complete journal); run "
                          + " and ".join(f"--part {i}/{parts}" for i in missing) + " with the same options")
    header, _, first = loaded[1]
    for i, (h, _, d) in loaded.items():
        journal = os.path.join(out, part_journal(i, parts))
        if h != header:
            raise SourceError(f"{journal}: part {i} was made with other options than part 1; remove this journal "
                              f"and run --part {i}/{parts} again with part 1's options ({_options_text(header)})")
        if d["plan"] != first["plan"] or d["classes"] != first["classes"] or d.get("listing") != first.get("listing"):
            raise SourceError(f"{journal}: part {i} was planned from another listing of the source than part 1 (it "
                              f"changed between them); run every part again with the source as it is now (each "
                              "keeps the shards that still match it), then --merge")
    by_name = {}
    for i, (_, recs, _) in loaded.items():
        for r in recs:
            path = os.path.join(out, r["shard"]["file"])
            for need in (path, index_name(path)):  # a shard without its DALI index is as unusable as none
                if not os.path.exists(need) or (need == path and os.path.getsize(path) != r["shard"]["bytes"]):
                    raise SourceError(f"{need}: missing or of another size than part {i}'s journal says; run "
                                      f"--part {i}/{parts} again (it remakes only what is missing)")
            by_name[r["shard"]["file"]] = r
    opts = ShardOptions(**{**header["options"], "splits": tuple(header["options"]["splits"])})
    src = Source(first["root"], first["layout"], [tuple(c) for c in first["classes"]], unused=first["unused"])
    run = ShardRun(src, out, opts, 1, first["command"])
    absent = [name for names in first["plan"].values() for name in names if name not in by_name]
    if absent:
        raise SourceError(f"{out}: the parts' journals lack {len(absent)} planned shard(s) ({absent[0]}, ...); a "
                          "part had undecodable images: rerun it with --allow-skips, or fix the source")
    for split, names in first["plan"].items():
        run.records[split] = [by_name[n]["shard"] for n in names]
        run.skipped += [x for n in names for x in by_name[n]["skipped"]]
    empty = [split for split in opts.splits if not sum(r["samples"] for r in run.records[split])]
    if empty:
        raise SourceError(f"{out}: split {empty[0]} has no images; no dataset.json written")
    run._write_manifest()
    for j in journals:
        os.remove(j)
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock_name(j))
    for split, recs in run.records.items():
        print(f"{split:5s}: {sum(r['samples'] for r in recs)} images in {len(recs)} shards")
    print(f"merged {parts} parts -> {os.path.join(out, MANIFEST)}")
    return 0


def _options_text(header: dict) -> str:
    o = header.get("options", {})
    return ", ".join(f"{k} {o[k]}" for k in ("shard_samples", "size", "quality", "seed", "splits", "val_fraction")
                     if k in o)


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
    p.add_argument("--quality", type=int, default=d.quality,
                   help="JPEG quality 1-100 (default: 90; above 95 the files grow with little gain)")
    p.add_argument("--resample", choices=sorted(RESAMPLE), default=d.resample, help="resize filter (default: bicubic)")
    p.add_argument("--no-draft", action="store_true", help="decode JPEGs at full size before resizing")
    p.add_argument("--seed", type=int, default=d.seed, help="train shuffle seed (default: 0)")
    p.add_argument("--allow-skips", action="store_true", help="list undecodable images in dataset.json and go on")
    p.add_argument("--rehash", action="store_true",
                   help="on a rerun, keep a shard only if its source files' contents are unchanged (hashes them: "
                        "reads the source twice); by default a file counts as unchanged by path, size and mtime")
    p.add_argument("--val-fraction", type=float, default=None,
                   help="the Fall 2011 release only (it has no val split): hold out this share of each class as "
                        "val, chosen by --seed (0.5: the paper's half for training, half for testing)")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="make only part I of N of the shards (every node computes the same plan; run I = 1..N "
                        "anywhere, into the same OUT), then --merge OUT writes dataset.json")
    p.add_argument("--any-class-names", action="store_true",
                   help="take class folders of any name as classes (default: WordNet ids like n01440764 only)")
    a = p.parse_args(argv)
    splits = tuple(s for s in a.splits.split(",") if s)
    if not splits or any(s not in ("train", "val") for s in splits) or len(set(splits)) != len(splits):
        p.error(f"--splits takes train, val or train,val (each once), not {a.splits!r}")
    if a.workers < 1 or a.shard_samples < 1 or not 224 <= a.size <= MAX_SIZE or not 1 <= a.quality <= 100:
        p.error(f"--workers and --shard-samples must be >= 1, --size in 224..{MAX_SIZE} (224: the training crop), "
                "--quality in 1..100")
    if not 0 <= a.seed < 2 ** 63:
        p.error(f"--seed must be in [0, 2^63), not {a.seed}")
    if a.part is not None:
        m = re.fullmatch(r"(\d+)/(\d+)", a.part)
        if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
            p.error(f"--part takes I/N with 1 <= I <= N, not {a.part!r}")
        a.part = (int(m.group(1)), int(m.group(2)))
    if a.val_fraction is not None and not 0 < a.val_fraction < 1:  # NaN fails this too; 0 holds out nothing
        p.error(f"--val-fraction must be in (0, 1), not {a.val_fraction} (0.5: the paper's half for testing)")
    opts = ShardOptions(size=a.size, keep_aspect=a.keep_aspect, quality=a.quality, resample=a.resample,
                        draft=not a.no_draft, shard_samples=a.shard_samples, seed=a.seed, splits=splits,
                        layout=a.layout, any_class_names=a.any_class_names, allow_skips=a.allow_skips,
                        val_fraction=a.val_fraction or 0.0)
    return a, opts


def canonical_command(src: str, opts: ShardOptions) -> list[str]:
    """The command that reproduces this output (OUT is the directory holding the manifest)."""
    cmd = ["tools/make_shards.py", src, "OUT", "--layout", opts.layout, "--splits", ",".join(opts.splits),
           "--shard-samples", str(opts.shard_samples), "--size", str(opts.size), "--quality", str(opts.quality),
           "--resample", opts.resample, "--seed", str(opts.seed)]
    cmd += ["--keep-aspect"] * opts.keep_aspect + ["--no-draft"] * (not opts.draft)
    cmd += ["--any-class-names"] * opts.any_class_names
    cmd += ["--val-fraction", repr(opts.val_fraction)] * bool(opts.val_fraction)
    return cmd + ["--allow-skips"] * opts.allow_skips


def main(argv: list[str] | None = None) -> int:
    with sigterm_as_interrupt():
        return _main(sys.argv[1:] if argv is None else argv)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--merge"]:
        if len(argv) != 2:
            print("make_shards: --merge takes the output directory alone: make_shards.py --merge OUT", file=sys.stderr)
            return 2
        try:
            return merge(argv[1])
        except SourceError as e:
            print(f"make_shards: {e}", file=sys.stderr)
            return 2
    a, opts = parse_args(argv)
    if os.path.exists(os.path.join(a.out, MANIFEST)):
        print(f"make_shards: {os.path.join(a.out, MANIFEST)}: {a.out} is already complete; "
              "choose another OUT or remove it", file=sys.stderr)
        return 2
    try:
        # The listing of a tar of tars is kept in OUT until dataset.json is written: a part, or a rerun,
        # reads it instead of every tar header (--rehash trusts no size and mtime, so lists them again).
        src = open_source(a.src, opts.splits, opts.layout, opts.any_class_names, opts.val_fraction, opts.seed,
                          cache_dir=None if a.rehash else a.out)
        print(f"source: {a.src} ({src.layout} layout), {len(src.classes)} classes, "
              + ", ".join(f"{s} {len(v)} images" for s, v in src.splits.items())
              + "".join(f"; listing read from {c}" for c in src.cached), file=sys.stderr)
        return ShardRun(src, a.out, opts, a.workers, canonical_command(a.src, opts), rehash=a.rehash,
                        part=a.part).run()
    except SourceError as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 2
    except WorkerDied as e:
        print(f"make_shards: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # writing OUT: disk full, no permission, an I/O error while flushing: a fault, not usage
        print(f"make_shards: {e.filename or a.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        return stopped("make_shards", e, f"the shards finished are kept in {a.out}, and the same command "
                                         "finishes the job")


if __name__ == "__main__":
    sys.exit(main())
