"""What both loaders share: reading the shard directory, the epoch position, the state for resume."""
from __future__ import annotations

import collections
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from pipeline import plan
from pipeline.normalization import MODES, Normalization
from pipeline.shards import MANIFEST, ShardError, load_manifest, read_index, split_shards
from pipeline.verify import ShardVerifier


KEPT_SHARDS = 8  # shards whose index (and, in the DALI loader, mapping) a loader keeps: it reads them in runs


def kept(cache: collections.OrderedDict, shard: int, make, let_go=None):
    """cache[shard], made by make() on first use; the last KEPT_SHARDS used are kept, and let_go(value) is
    told of each one dropped."""
    if shard in cache:
        cache.move_to_end(shard)
        return cache[shard]
    value = cache[shard] = make()
    while len(cache) > KEPT_SHARDS:
        dropped = cache.popitem(last=False)[1]
        if let_go is not None:
            let_go(dropped)
    return value


@dataclass(frozen=True)
class LoaderConfig:
    shards_dir: str
    split: str = "train"
    batch_size: int = 128           # images per batch on this rank (paper, section 5)
    device: str = "cpu"             # "cpu", "cuda", "cuda:N"
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    crop: str = "random"            # "random" (train), "center" or "ten" (eval)
    crop_size: int = 224            # px: the crops' side (224, the paper's; 227 for conv1 unpadded: plan.py)
    normalization: Normalization | str = "mean"  # a mode, with SHARDS/pca.json's numbers: "mean" (x - 255 mean,
                                    # 0-255 units: the paper and its code, the default), "std" ((x/255 - mean) / std),
                                    # "none" (raw 0-255); or a whole Normalization (the trainer's, a checkpoint's)
    lighting: bool = True           # PCA lighting (paper, section 4.1); only with crop="random"
    flip: bool = True               # p = 0.5 horizontal flips; only with crop="random"
    shuffle: bool = True            # reshuffle every epoch (train); False: source order (eval)
    channels_last: bool = False     # NCHW shape with NHWC memory (faster convolutions on GPUs)
    num_threads: int = 0            # DALI threads / DataLoader workers; 0 = all cores
    verify: bool = True             # check each shard's sha256 against dataset.json before its samples
                                    # leave the loader (once per loader, in the background: pipeline/verify.py)
    hw_decoder_load: float = 0.65   # DALI on a GPU: the share of JPEGs sent to the hardware decoder of
                                    # A100/H100/H200 (DALI's default; the GPU check sweeps it)


@runtime_checkable
class Loader(Protocol):
    """What the trainer, evaluate and the tools rely on, whichever backend makes the batches (DALI,
    webdataset, synthetic): iterate for one epoch, again for the next; the position is state_dict()."""
    cfg: LoaderConfig
    manifest: dict              # the shard directory's dataset.json
    classes: list[str]          # class names, by index
    epoch: int                  # the epoch the next batch belongs to
    batch: int                  # the next batch's index within it

    @property
    def num_samples(self) -> int: ...     # samples this rank yields per epoch
    def __len__(self) -> int: ...         # batches per epoch on this rank
    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...  # (float images, int64 labels)
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...
    def set_epoch(self, epoch: int) -> None: ...


class ShardLoader:
    """Iterate for one epoch; iterate again for the next. `state_dict()` is the position."""

    reads_shards = True  # False: a loader that yields no shard's samples (nothing to verify)

    def __init__(self, cfg: LoaderConfig):
        if cfg.crop not in ("random", "center", "ten"):
            raise ValueError(f"crop must be 'random', 'center' or 'ten', not {cfg.crop!r}")
        if cfg.crop_size not in plan.CROP_SIZES:
            raise ValueError(f"crop_size must be one of {plan.CROP_SIZES}, not {cfg.crop_size}")
        if cfg.batch_size < 1 or not 0 <= cfg.rank < cfg.world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size (got {cfg.batch_size}, "
                             f"{cfg.rank}, {cfg.world_size})")
        if not isinstance(cfg.normalization, Normalization) and cfg.normalization not in MODES:
            raise ValueError(f"normalization must be one of {', '.join(MODES)} or a Normalization, "
                             f"not {cfg.normalization!r}")
        if cfg.crop != "random" and (cfg.lighting or cfg.flip):
            raise ValueError("lighting and flips are training augmentations: pass lighting=False, flip=False "
                             f"with crop={cfg.crop!r}")
        self.cfg = cfg
        self.manifest = load_manifest(cfg.shards_dir)
        self.shards = split_shards(self.manifest, cfg.shards_dir, cfg.split)
        for s in self.shards:
            for path in (s["path"], s["index"]):
                if not os.path.exists(path):
                    raise ShardError(f"{path}: missing ({cfg.split} shard of {cfg.shards_dir})")
            if "bytes" in s and os.path.getsize(s["path"]) != s["bytes"]:  # a stat a shard, not a parse
                raise ShardError(f"{s['path']}: truncated or of another size than {MANIFEST} says "
                                 f"({os.path.getsize(s['path'])} bytes, not {s['bytes']})")
        # Each shard's index is parsed when the loader first reads that shard, and only a few are kept:
        # parsing all of them up front cost seconds at 1,252 shards (a minute at Fall 2011's 13,900) before
        # the first batch, and hundreds of bytes an image for the loader's life.
        self._entries: collections.OrderedDict[int, list] = collections.OrderedDict()
        self.counts = [int(s["samples"]) for s in self.shards]
        self.size = self.manifest["preprocessing"]["size"]
        if self.size < cfg.crop_size:  # --size 224 shards hold no 227 crop
            raise ShardError(f"{cfg.shards_dir}: its images are {self.size} px, smaller than the {cfg.crop_size} "
                             "crops asked for")
        self.norm = cfg.normalization
        if not isinstance(self.norm, Normalization):
            try:
                self.norm = Normalization.from_shards(cfg.shards_dir, cfg.normalization)
            except FileNotFoundError as e:
                raise ShardError(str(e)) from None
        self.epoch, self.batch = 0, 0  # the next batch to yield
        self.device = torch.device(cfg.device)
        self.classes = [c["name"] for c in self.manifest["classes"]]
        self.verifier = None
        if cfg.verify and self.reads_shards:
            self.verifier = ShardVerifier(self.shards)
            weakref.finalize(self, self.verifier.close)  # a dropped loader stops its thread
            # Start now, in the first epoch's order: the first shards are verified while the caller
            # builds its model. A resume (load_state_dict) or another epoch reschedules in __iter__.
            self._schedule_verification(self._order(0))

    # -- the position -------------------------------------------------------
    def __len__(self) -> int:
        c = self.cfg
        return plan.batches_per_epoch(self.counts, rank=c.rank, world_size=c.world_size,
                                      batch_size=c.batch_size, shuffle=c.shuffle)

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return len(self._order(0))

    def state_dict(self) -> dict:
        c = self.cfg
        return {"epoch": self.epoch, "batch": self.batch, "seed": c.seed, "rank": c.rank,
                "world_size": c.world_size, "batch_size": c.batch_size, "split": c.split}

    def load_state_dict(self, state: dict) -> None:
        c = self.cfg
        for k in ("seed", "world_size", "batch_size", "split"):
            if state[k] != getattr(c, k):
                raise ValueError(f"loader state is for {k}={state[k]!r}, this loader has {getattr(c, k)!r}")
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])

    def shard_entries(self, shard: int) -> list:
        """The index entries of one shard (pipeline/shards.py IndexEntry), parsed on first use and checked
        against the manifest and the tar's size; the last KEPT_SHARDS are kept."""
        return kept(self._entries, shard, lambda: self._read_entries(shard))

    def _read_entries(self, shard: int) -> list:
        s = self.shards[shard]
        entries = read_index(s["index"])
        end = max((off + size for e in entries for _, off, size in e.members), default=0)
        if len(entries) != s["samples"] or os.path.getsize(s["path"]) < end:
            raise ShardError(f"{s['path']}: truncated or does not match its index "
                             f"({len(entries)} indexed, manifest says {s['samples']})")
        return entries

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.batch = epoch, 0

    def _order(self, epoch: int) -> np.ndarray:
        c = self.cfg
        return plan.rank_order(self.counts, epoch=epoch, seed=c.seed, rank=c.rank, world_size=c.world_size,
                               batch_size=c.batch_size, shuffle=c.shuffle)

    def __iter__(self):
        epoch, start = self.epoch, self.batch
        order = self._order(epoch)[start * self.cfg.batch_size:]
        n_batches = len(self)
        self._schedule_verification(order)
        for k, batch in enumerate(self._epoch_batches(epoch, start, order)):
            self.batch = start + k + 1  # counted as consumed once handed out: a checkpoint after the step
            yield batch
        if self.batch < n_batches and len(order) > 0:
            raise RuntimeError(f"{self.cfg.shards_dir}: epoch {epoch} ended after {self.batch} of {n_batches} batches")
        self.epoch, self.batch = epoch + 1, 0

    def _epoch_batches(self, epoch: int, start: int, order: np.ndarray):
        raise NotImplementedError

    def _schedule_verification(self, order: np.ndarray) -> None:
        """Queue the shards of `order` ((shard, sample) pairs) in the order it first reads them."""
        if self.verifier is not None and len(order):
            first = np.unique(order[:, 0], return_index=True)[1]
            self.verifier.schedule(order[np.sort(first), 0])

    def verified(self, pairs: np.ndarray) -> None:
        """Returns once every shard of these (shard, sample) pairs is verified; ShardError names one
        that is not. The backends call it before a batch's samples leave the loader."""
        if self.verifier is not None:
            for shard in np.unique(pairs[:, 0]):
                self.verifier.wait(int(shard))

    # -- shared augmentation inputs -----------------------------------------
    def params(self, epoch: int, batch: int) -> plan.BatchParams:
        return plan.batch_params(self.cfg.seed, epoch, self.cfg.rank, batch, self.cfg.batch_size,
                                 free=self.size - self.cfg.crop_size)

    def lighting_offsets(self, p: plan.BatchParams) -> np.ndarray:
        """[B, 3] RGB offsets in 0-255 units (zeros without lighting)."""
        if not self.cfg.lighting:
            return np.zeros((len(p.alpha), 3))
        return self.norm.lighting(p.alpha)

    def channels(self, images: torch.Tensor) -> torch.Tensor:
        """NHWC-stored output -> NCHW shape; kept channels-last in memory when asked."""
        perm = (0, 3, 1, 2) if images.dim() == 4 else (0, 1, 4, 2, 3)
        out = images.permute(*perm)
        return out if self.cfg.channels_last else out.contiguous()


class BatchRing:
    """Keeps each yielded GPU batch alive until the GPU has run everything the consumer queued on it.

    DALI's dynamic executor hands its own output buffer to torch without a copy (DLPack), and takes the
    memory back when the last reference dies. The training loop never syncs per step, so the host can
    queue several steps ahead of the GPU and drop batch k's last reference while step k's kernels still
    wait to read it; nothing orders DALI's reuse of that memory after them (cross-stream deallocation is
    unsolved in DLPack). So the loader holds a reference itself: when the consumer asks for the next
    batch (its step on this one is queued by then), an event is recorded on the consumer's stream, and
    the batch is let go only once that event has completed. Cost: an event record per batch and a
    non-blocking query of the oldest; the host waits only when `limit` batches are still held (the GPU
    is then `limit` steps behind, and the host gains nothing by running further ahead).

    make_event: () -> an object with record() and query() and synchronize() (torch.cuda.Event; a fake
    in the CPU tests)."""

    def __init__(self, make_event, limit: int = 8):
        self.make_event, self.limit = make_event, limit
        self.held: list[tuple[object, object]] = []  # (batch, its event), oldest first

    def release_after_use(self, batch) -> None:
        """Call when the consumer is done queueing work on `batch` (it asks for the next one)."""
        event = self.make_event()
        event.record()  # on the current stream: after every kernel queued so far, the ones reading `batch`
        self.held.append((batch, event))
        while self.held and self.held[0][1].query():
            self.held.pop(0)
        while len(self.held) > self.limit:  # the GPU is far behind: wait for the oldest
            self.held[0][1].synchronize()
            self.held.pop(0)

    def clear(self) -> None:
        """Wait for every held batch's event and let them all go (a pipeline rebuilt, a loader closed)."""
        for _, event in self.held:
            event.synchronize()
        self.held.clear()


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a scheduler or taskset narrows), not
    the machine's count."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # macOS, Windows: no affinity call
        return os.cpu_count() or 1


def local_processes() -> int:
    """The processes torchrun started on this node (LOCAL_WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def cores_per_process(cores: int | None = None, local_world: int | None = None) -> int:
    """This process's share of the cores it may use: usable cores / processes on this node, at least 1.
    One loader thread or worker per core on every rank oversubscribes a node by the rank count (8x at 8
    ranks); the trainer's intra-op threads take the same share (model/devices.py)."""
    cores = usable_cores() if cores is None else cores
    local_world = local_processes() if local_world is None else local_world
    return max(1, cores // max(1, local_world))
