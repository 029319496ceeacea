"""What each rank reads, in which order, with which augmentation: plain functions of the seed.

Both loaders (DALI and webdataset) take their sample order, their random
augmentation parameters and the crop geometry from here; what happens to pixel
values is pipeline/normalization.py's. The tests hold both loaders to a float64
reference of their own (tests/reference.py).

Order. Train: every epoch, a seeded permutation of the shard order and of the
samples inside each shard (shards are already a global shuffle of the split,
made by make_shards). The epoch's sequence is cut into one contiguous part per
rank: disjoint, and with several ranks cut to the same whole number of batches
(DDP needs equal counts; the few samples left over differ every epoch). Eval:
source order, cut into near-equal parts, every sample exactly once over all ranks.

Augmentation parameters are drawn per batch from numpy's generator seeded with
(seed, epoch, rank, batch): nothing to checkpoint, and a resumed run draws the
same parameters as an uninterrupted one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CROP = 224          # px, the paper's crop of the 256 px images (section 2)
CROP_SIZES = (224, 227)  # 227: Caffe's bvlc_alexnet and the mission's layer table (conv1 unpadded)
LIGHTING_STD = 0.1  # std of the lighting alphas (paper, section 4.1; cuda-convnet2 color_noise=0.1)
TEN_CROP_POSITIONS = ((0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0), (0.5, 0.5))  # corners, centre: (x, y) in [0, 1]


@dataclass(frozen=True)
class Run:
    """A stretch of one rank's epoch that comes from one shard: samples in this order."""
    shard: int
    samples: np.ndarray  # indices into the shard's index entries


def _rank_slice(n: int, *, rank: int, world_size: int, batch_size: int, shuffle: bool) -> tuple[int, int]:
    if shuffle and world_size > 1:
        per = (n // world_size) // batch_size * batch_size  # equal whole batches on every rank
        return rank * per, (rank + 1) * per
    return n * rank // world_size, n * (rank + 1) // world_size


def rank_order(counts: list[int], *, epoch: int, seed: int, rank: int, world_size: int,
               batch_size: int, shuffle: bool) -> np.ndarray:
    """(shard, sample) pairs this rank reads in `epoch`, as an (n, 2) int64 array."""
    if shuffle:
        rng = np.random.default_rng([seed, epoch])
        parts = [np.stack([np.full(counts[s], s), rng.permutation(counts[s])], 1)
                 for s in rng.permutation(len(counts))]
    else:
        parts = [np.stack([np.full(c, s), np.arange(c)], 1) for s, c in enumerate(counts)]
    seq = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    start, stop = _rank_slice(len(seq), rank=rank, world_size=world_size, batch_size=batch_size, shuffle=shuffle)
    return seq[start:stop]


def batches_per_epoch(counts: list[int], *, rank: int, world_size: int, batch_size: int, shuffle: bool) -> int:
    start, stop = _rank_slice(sum(counts), rank=rank, world_size=world_size, batch_size=batch_size, shuffle=shuffle)
    return -(-(stop - start) // batch_size)


def runs(order: np.ndarray) -> list[Run]:
    """Cut an order into runs of consecutive samples from the same shard."""
    if len(order) == 0:
        return []
    cuts = np.flatnonzero(np.diff(order[:, 0])) + 1
    return [Run(int(p[0, 0]), p[:, 1]) for p in np.split(order, cuts)]


@dataclass(frozen=True)
class BatchParams:
    """Random augmentation of one batch. Crop positions are fractions of the free range
    (size - 224): for 256 px images, offset k in 0..32 is k / 32 exactly."""
    crop_x: np.ndarray   # float32 [B]
    crop_y: np.ndarray   # float32 [B]
    flip: np.ndarray     # int32 [B], 1 = mirror horizontally
    alpha: np.ndarray    # float32 [B, 3], lighting alphas ~ N(0, 0.1^2)


def batch_params(seed: int, epoch: int, rank: int, batch: int, batch_size: int, free: int = 32) -> BatchParams:
    """Uniform over all free+1 integer crop offsets (paper: 'random 224x224 patches'), p=0.5 flips."""
    rng = np.random.default_rng([seed, epoch, rank, batch, 1])
    return BatchParams(
        crop_x=(rng.integers(0, free + 1, batch_size) / free).astype(np.float32),
        crop_y=(rng.integers(0, free + 1, batch_size) / free).astype(np.float32),
        flip=rng.integers(0, 2, batch_size).astype(np.int32),
        alpha=rng.normal(0.0, LIGHTING_STD, (batch_size, 3)).astype(np.float32),
    )


def crop_offset(position: float, size: int, crop: int = CROP) -> int:
    """Pixel offset of a crop at fractional `position` of the free range (as DALI's crop_pos)."""
    return int(np.floor(position * (size - crop) + 0.5))


def crop(img: np.ndarray, x: float, y: float, flip: bool, size: int = CROP) -> np.ndarray:
    """The size x size crop (224, or 227) at fractional position (x, y) of an HWC image, mirrored if `flip`
    (a view)."""
    h, w, _ = img.shape
    x0, y0 = crop_offset(x, w, size), crop_offset(y, h, size)
    out = img[y0:y0 + size, x0:x0 + size]
    return out[:, ::-1] if flip else out
