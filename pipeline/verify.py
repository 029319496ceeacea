"""Shard integrity in the loaders: every shard's sha256 checked against dataset.json once per loader.

A flipped byte in a JPEG or a relabelled `.cls` member gives no decoder error: it
trains. So before a shard's samples leave a loader, its bytes are hashed and
compared with the sha256 make_shards recorded. Hashing costs ~20 us per 256 px
image (sha256 at ~1.2 GB per CPU second, 25-30 KB per image), 2.3-2.5 % of the CPU
time of an epoch of the CPU pipeline (tools.dev.bench pipeline): too much to do in the
reader's line, so one background thread hashes the shards
in the order the epoch will read them, a few shards ahead of the reader (on a
data set larger than memory, a shard hashed far ahead would be read from disk
twice; just ahead, the hash is what brings it into the page cache for the
decoder). hashlib and file reads release the GIL, so the thread overlaps the
pipeline. The reader waits only for a shard that is not verified yet; after the
first epoch every shard is, and the check costs a dictionary lookup per batch.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time

from pipeline.shards import MANIFEST, ShardError

AHEAD = 2  # shards verified that no reader has asked for yet: how far the thread runs ahead


def shard_problem(shard: dict) -> str | None:
    """What is wrong with one shard's bytes against its manifest record (`path`, `bytes`, `sha256`), or None."""
    path = shard["path"]
    try:
        size = os.path.getsize(path)
        if size != shard["bytes"]:
            return f"{path}: {size} bytes, {MANIFEST} says {shard['bytes']}"
        h = hashlib.sha256()
        if size:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                h.update(data)  # one call: the GIL is released for the whole shard, not retaken per chunk
    except (OSError, ValueError) as e:
        return f"{path}: cannot read ({getattr(e, 'strerror', None) or e})"
    if h.hexdigest() != shard["sha256"]:
        return f"{path}: sha256 differs from {MANIFEST}"
    return None


class ShardVerifier:
    """Verifies shards on a background thread, in the order `schedule` gives; `wait(shard)` returns once
    that shard is verified and raises ShardError (naming it) if it is not sound."""

    def __init__(self, shards: list[dict], ahead: int = AHEAD):
        self._shards, self._ahead = shards, ahead
        self._done: dict[int, str | None] = {}  # shard -> None (sound) or what is wrong
        self._pending: list[int] = []            # shards to verify, in the order they will be read
        self._asked: set[int] = set()            # shards a reader has waited for
        self._unasked_done = 0                   # verified shards no reader has asked for yet
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._current: int | None = None         # the shard being hashed
        self.hash_seconds = 0.0                  # time the thread spent hashing
        self.hash_cpu_seconds = 0.0              # CPU time it used doing so (its own thread's)
        self.wait_seconds = 0.0                  # time readers spent waiting for it

    def schedule(self, shards) -> None:
        """Verify these shards (in the order a reader will first use them) before any other pending one."""
        with self._cond:
            first = [s for s in dict.fromkeys(int(s) for s in shards) if s not in self._done]
            chosen = set(first)
            self._pending = first + [s for s in self._pending if s not in chosen]
            self._start()
            self._cond.notify_all()

    def wait(self, shard: int) -> None:
        if shard in self._asked and shard in self._done:  # after the first epoch: no lock, no wait
            problem = self._done[shard]
        else:
            t0 = time.perf_counter()
            with self._cond:
                if shard not in self._asked:
                    self._asked.add(shard)
                    self._unasked_done -= shard in self._done
                if shard not in self._done:
                    if shard in self._pending:  # needed now: next in line
                        self._pending.remove(shard)
                    if shard != self._current:
                        self._pending.insert(0, shard)
                    self._start()
                    self._cond.notify_all()
                    self._cond.wait_for(lambda: shard in self._done)
                problem = self._done[shard]
            self.wait_seconds += time.perf_counter() - t0
        if problem is not None:
            raise ShardError(f"{problem}: the shard is corrupt or was changed after make_shards "
                             "(tools/verify_shards.py lists every problem; --no-verify skips this check)")

    def close(self) -> None:
        """Stop the thread (after the shard it is hashing, if any)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _start(self) -> None:  # under the lock
        if self._thread is None and self._pending and not self._closed:
            # A daemon: a loader dropped mid-epoch must not keep the process alive.
            self._thread = threading.Thread(target=self._work, name="shard-verifier", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or not self._pending or self._unasked_done < self._ahead
                                    or self._pending[0] in self._asked)
                if self._closed or not self._pending:  # all done: the thread ends; schedule starts another
                    self._thread = None
                    return
                shard = self._current = self._pending.pop(0)
            t0, c0 = time.perf_counter(), time.thread_time()
            problem = shard_problem(self._shards[shard])
            with self._cond:
                self.hash_seconds += time.perf_counter() - t0
                self.hash_cpu_seconds += time.thread_time() - c0
                self._done[shard] = problem
                self._current = None
                self._unasked_done += shard not in self._asked
                self._cond.notify_all()
