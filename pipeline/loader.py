"""What both loaders share: reading the shard directory, the epoch position, the state for resume."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from pipeline import plan
from pipeline.shards import PCA_FILE, ShardError, load_manifest, read_index, split_shards


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
    normalize: bool | str = True    # True/"std": (x - mean) / std, pca.json's values (DESIGN.md);
                                    # "mean": x - mean in 0-255 units (the paper, section 2); False: 0-255 units
    lighting: bool = True           # PCA lighting (paper, section 4.1); only with crop="random"
    flip: bool = True               # p = 0.5 horizontal flips; only with crop="random"
    shuffle: bool = True            # reshuffle every epoch (train); False: source order (eval)
    channels_last: bool = False     # NCHW shape with NHWC memory (faster convolutions on GPUs)
    num_threads: int = 0            # DALI threads / DataLoader workers; 0 = all cores


class ShardLoader:
    """Iterate for one epoch; iterate again for the next. `state_dict()` is the position."""

    def __init__(self, cfg: LoaderConfig):
        if cfg.crop not in ("random", "center", "ten"):
            raise ValueError(f"crop must be 'random', 'center' or 'ten', not {cfg.crop!r}")
        if cfg.batch_size < 1 or not 0 <= cfg.rank < cfg.world_size:
            raise ValueError(f"need batch_size >= 1 and 0 <= rank < world_size (got {cfg.batch_size}, "
                             f"{cfg.rank}, {cfg.world_size})")
        if cfg.normalize not in (True, False, "std", "mean"):
            raise ValueError(f"normalize must be True, False, 'std' or 'mean', not {cfg.normalize!r}")
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
        self.entries = [read_index(s["index"]) for s in self.shards]
        for s, entries in zip(self.shards, self.entries):
            end = max((off + size for e in entries for _, off, size in e.members), default=0)
            if len(entries) != s["samples"] or os.path.getsize(s["path"]) < end:
                raise ShardError(f"{s['path']}: truncated or does not match its index "
                                 f"({len(entries)} indexed, manifest says {s['samples']})")
        self.counts = [len(e) for e in self.entries]
        self.size = self.manifest["preprocessing"]["size"]
        pca_path = os.path.join(cfg.shards_dir, PCA_FILE)
        if not os.path.exists(pca_path):
            raise ShardError(f"{pca_path}: missing: run tools/compute_pca.py {cfg.shards_dir}")
        with open(pca_path) as f:
            self.pca = json.load(f)
        self.mean = np.array(self.pca["mean"], np.float64)
        self.std = np.array(self.pca["std"], np.float64)
        self.epoch, self.batch = 0, 0  # the next batch to yield
        self.device = torch.device(cfg.device)
        self.classes = [c["name"] for c in self.manifest["classes"]]

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
        for k, batch in enumerate(self._epoch_batches(epoch, start, order)):
            self.batch = start + k + 1  # counted as consumed once handed out: a checkpoint after the step
            yield batch
        if self.batch < n_batches and len(order) > 0:
            raise RuntimeError(f"{self.cfg.shards_dir}: epoch {epoch} ended after {self.batch} of {n_batches} batches")
        self.epoch, self.batch = epoch + 1, 0

    def _epoch_batches(self, epoch: int, start: int, order: np.ndarray):
        raise NotImplementedError

    def norm_params(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """(mean, std) in [0, 1] units for plan.reference_augment; (None, None) for 0-255 output.
        "mean" divides by 255 * (1/255) = 1: mean subtraction alone, in 0-255 units."""
        if self.cfg.normalize in (True, "std"):
            return self.mean, self.std
        if self.cfg.normalize == "mean":
            return self.mean, np.full(3, 1 / 255)
        return None, None

    # -- shared augmentation inputs -----------------------------------------
    def params(self, epoch: int, batch: int) -> plan.BatchParams:
        return plan.batch_params(self.cfg.seed, epoch, self.cfg.rank, batch, self.cfg.batch_size,
                                 free=self.size - plan.CROP)

    def lighting_offsets(self, p: plan.BatchParams) -> np.ndarray:
        """[B, 3] RGB offsets in [0, 1] units (zeros without lighting)."""
        if not self.cfg.lighting:
            return np.zeros((len(p.alpha), 3))
        return plan.lighting_offset(p.alpha, self.pca["eigenvalues"], self.pca["eigenvectors"])

    def channels(self, images: torch.Tensor) -> torch.Tensor:
        """NHWC-stored output -> NCHW shape; kept channels-last in memory when asked."""
        perm = (0, 3, 1, 2) if images.dim() == 4 else (0, 1, 4, 2, 3)
        out = images.permute(*perm)
        return out if self.cfg.channels_last else out.contiguous()
