"""The portable loader: webdataset + pillow-simd + torch DataLoader, with DALI's semantics.

For machines where DALI does not install (macOS, aarch64) and as the benchmark's
baseline. Order, augmentation parameters and crop geometry come from plan.py and
pixel values from normalization.py, as in the DALI loader, so both yield the same
batches up to JPEG decoder rounding (the tests hold both to tests/reference.py).

DataLoader workers each build whole batches: the main process hands out positions
(epoch, batch) in order and the DataLoader returns the batches in that order, so it
is deterministic. The workers persist across epochs (forking one per core on every
rank at every epoch start cost seconds), and there are usable cores / processes on
this node of them, not one per core on every rank. A worker reads a shard with
webdataset into memory once (a shard is ~30 MB) and takes its samples in the plan's
order.
"""
from __future__ import annotations

import io
import weakref

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline import plan
from pipeline.loader import LoaderConfig, ShardLoader, cores_per_process
from pipeline.shards import ShardError, error_text


class _LoaderRef:
    """A weak reference to the loader for what its DataLoader holds (dataset, sampler): a strong one made a
    cycle loader -> DataLoader -> dataset -> loader, which only the garbage collector breaks, and it tore
    the worker queues down before the workers heard to stop (each then waited 5 s and was killed). Forked
    workers find the loader in their copy of memory; a pickled copy (spawn) takes the loader itself."""

    @property
    def loader(self) -> "WdsLoader":
        return self._strong if self._ref is None else self._ref()

    def _set(self, loader) -> None:
        self._ref, self._strong = weakref.ref(loader), None

    def __getstate__(self):
        return {**self.__dict__, "_ref": None, "_strong": self.loader}


class _Batches(_LoaderRef, torch.utils.data.Dataset):
    """(epoch, batch k) -> that batch, computed in a worker from the plan."""

    def __init__(self, loader: "WdsLoader"):
        self._set(loader)
        self._cache: dict[int, dict] = {}
        self._orders: dict[int, np.ndarray] = {}  # this epoch's order and the last (in each worker)

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
            self._orders[epoch] = self.loader._order(epoch)
        return self._orders[epoch]

    def __getitem__(self, position: tuple[int, int]):
        epoch, k = position
        bs = self.loader.cfg.batch_size
        return self._batch(epoch, k, self._order(epoch)[k * bs:(k + 1) * bs])

    def __len__(self):
        return len(self.loader)

    def _shard(self, shard: int) -> dict:
        if shard not in self._cache:
            path = self.loader.shards[shard]["path"]
            self._cache.clear()  # one shard at a time per worker: memory stays ~30 MB
            try:
                # No splitters: plan.py already gave this worker its batches, and a worker
                # must read every shard those batches touch (webdataset would split the URLs).
                ds = wds.WebDataset(path, shardshuffle=False, empty_check=False, nodesplitter=None,
                                    workersplitter=None)
                self._cache[shard] = {s["__key__"]: s for s in ds}
            except Exception as e:  # noqa: BLE001 - tar errors surface with their shard named
                raise ShardError(f"{path}: unreadable or truncated tar ({e})") from None
        return self._cache[shard]

    def _batch(self, epoch: int, k: int, pairs: np.ndarray):
        ld, cfg = self.loader, self.loader.cfg
        images, labels, side = [], [], self.loader.cfg.crop_size
        if cfg.crop == "random":
            p = ld.params(epoch, k)
            lights = ld.lighting_offsets(p) if cfg.lighting else [None] * len(pairs)
        for j, (shard, i) in enumerate(pairs):
            key = ld.shard_entries(shard)[i].key
            sample = self._shard(shard).get(key)
            path = ld.shards[shard]["path"]
            if sample is None:
                raise ShardError(f"{path}: sample {key} is in the index but not in the tar")
            try:
                img = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
                labels.append(int(sample["cls"]))
            except Exception as e:  # noqa: BLE001
                raise ShardError(f"{path}: sample {key} is corrupt ({error_text(e)})") from None
            if cfg.crop == "random":
                flip = bool(p.flip[j]) and cfg.flip
                images.append(ld.norm.apply(plan.crop(img, p.crop_x[j], p.crop_y[j], flip, side), lights[j]))
            elif cfg.crop == "center":
                images.append(ld.norm.apply(plan.crop(img, 0.5, 0.5, False, side)))
            else:  # the paper's ten crops: corners and centre, then the same mirrored
                images.append(np.stack([ld.norm.apply(plan.crop(img, x, y, flip, side)) for flip in (False, True)
                                        for x, y in plan.TEN_CROP_POSITIONS]))
        x = torch.from_numpy(np.stack(images))
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.tensor(labels, dtype=torch.int64)


class _Positions(_LoaderRef, torch.utils.data.Sampler):
    """The (epoch, batch) positions of the loader's current pass, read when the DataLoader starts it."""

    def __init__(self, loader: "WdsLoader"):
        self._set(loader)

    def __iter__(self):
        epoch, start = self.loader._span
        return iter([(epoch, k) for k in range(start, len(self.loader))])

    def __len__(self):
        return len(self.loader) - self.loader._span[1]


class WdsLoader(ShardLoader):
    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        self.workers = cfg.num_threads or cores_per_process()
        self._span = (0, 0)  # (epoch, first batch) of the pass in progress
        self._dl = None      # one DataLoader, its workers kept from epoch to epoch

    def _epoch_batches(self, epoch: int, start: int, order: np.ndarray):
        if len(order) == 0:
            return
        self._span = (epoch, start)
        if self._dl is None:
            self._dl = torch.utils.data.DataLoader(_Batches(self), batch_size=None, sampler=_Positions(self),
                                                   num_workers=self.workers, pin_memory=self.device.type == "cuda",
                                                   prefetch_factor=2, persistent_workers=True)
        bs = self.cfg.batch_size
        for k, (images, labels) in enumerate(self._dl):
            # The workers read the shards on their own; a batch leaves only once its shards are verified.
            self.verified(order[k * bs:(k + 1) * bs])
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
