"""The portable loader: webdataset + pillow-simd + torch DataLoader, with DALI's semantics.

For machines where DALI does not install (macOS, aarch64) and as the benchmark's
baseline. Order, augmentation parameters and crop geometry come from plan.py and
pixel values from normalization.py, as in the DALI loader, so both yield the same
batches up to JPEG decoder rounding (the tests hold both to tests/reference.py).

DataLoader workers each build whole batches (worker k takes batches k, k+W, ...)
and the DataLoader hands them out round-robin, so the order is deterministic.
A worker reads a shard with webdataset into memory once (a shard is ~30 MB) and
takes its samples in the plan's order.
"""
from __future__ import annotations

import io
import os

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from pipeline import plan
from pipeline.loader import LoaderConfig, ShardLoader
from pipeline.shards import ShardError, error_text


class _EpochBatches(torch.utils.data.IterableDataset):
    def __init__(self, loader: "WdsLoader", epoch: int, start: int, order: np.ndarray):
        self.loader, self.epoch, self.start, self.order = loader, epoch, start, order
        self._cache: dict[int, dict] = {}

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

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        bs = self.loader.cfg.batch_size
        n_batches = -(-len(self.order) // bs)
        for b in range(worker, n_batches, workers):
            yield self._batch(b, self.order[b * bs:(b + 1) * bs])

    def _batch(self, b: int, pairs: np.ndarray):
        ld, cfg = self.loader, self.loader.cfg
        images, labels = [], []
        if cfg.crop == "random":
            p = ld.params(self.epoch, self.start + b)
            lights = ld.lighting_offsets(p) if cfg.lighting else [None] * len(pairs)
        for j, (shard, i) in enumerate(pairs):
            key = ld.entries[shard][i].key
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
                images.append(ld.norm.apply(plan.crop(img, p.crop_x[j], p.crop_y[j], flip), lights[j]))
            elif cfg.crop == "center":
                images.append(ld.norm.apply(plan.crop(img, 0.5, 0.5, False)))
            else:  # the paper's ten crops: corners and centre, then the same mirrored
                images.append(np.stack([ld.norm.apply(plan.crop(img, x, y, flip)) for flip in (False, True)
                                        for x, y in plan.TEN_CROP_POSITIONS]))
        x = torch.from_numpy(np.stack(images))
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.tensor(labels, dtype=torch.int64)


class WdsLoader(ShardLoader):
    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        self.workers = cfg.num_threads or (os.cpu_count() or 1)

    def _epoch_batches(self, epoch: int, start: int, order: np.ndarray):
        if len(order) == 0:
            return
        ds = _EpochBatches(self, epoch, start, order)
        dl = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=self.workers,
                                         pin_memory=self.device.type == "cuda", prefetch_factor=2,
                                         persistent_workers=False)
        bs = self.cfg.batch_size
        for k, (images, labels) in enumerate(dl):
            # The workers read the shards on their own; a batch leaves only once its shards are verified.
            self.verified(order[k * bs:(k + 1) * bs])
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
