"""A loader of fixed random batches with a real split's length and classes: no decoding at all.

For measuring the trainer and the model without the pipeline (tools/dev/bench/train.py,
tools/dev/gpu_check.sh); `--backend synthetic` in the trainer. Not for learning anything.
"""
from __future__ import annotations

import torch

from pipeline.loader import LoaderConfig, ShardLoader


class SyntheticLoader(ShardLoader):
    reads_shards = False

    def __init__(self, cfg: LoaderConfig):
        super().__init__(cfg)
        g = torch.Generator().manual_seed(cfg.seed)
        side = cfg.crop_size
        shape = (cfg.batch_size, 10, 3, side, side) if cfg.crop == "ten" else (cfg.batch_size, 3, side, side)
        images = torch.randn(shape, generator=g)
        if cfg.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        self._images = images.to(self.device)
        self._labels = torch.randint(0, len(self.manifest["classes"]), (cfg.batch_size,), generator=g).to(self.device)

    def _epoch_batches(self, epoch, start, order):
        bs = self.cfg.batch_size
        for b in range(-(-len(order) // bs)):
            n = min(bs, len(order) - b * bs)
            yield self._images[:n], self._labels[:n]
