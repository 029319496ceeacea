"""The data pipeline: shards -> augmented batches on the training device.

    from pipeline import make_loader
    loader = make_loader(shards_dir, split="train", batch_size=128, device="cpu")
    for images, labels in loader:   # one epoch; iterate again for the next
        ...

Two loaders with the same semantics (plan.py fixes order and augmentation):
"dali" (the default; decoding and augmentation on the GPU where there is one)
and "wds" (webdataset + pillow-simd + torch DataLoader, for machines where DALI
does not install, and the benchmark's baseline). Nothing here is imported until
a loader is made, so `import pipeline` costs nothing.
"""
from __future__ import annotations

BACKENDS = ("auto", "dali", "wds", "synthetic")


def make_loader(shards_dir: str, split: str = "train", batch_size: int = 128, device: str = "cpu",
                rank: int = 0, world_size: int = 1, seed: int = 0, crop: str | None = None,
                normalization="mean", lighting: bool | None = None, flip: bool | None = None,
                shuffle: bool | None = None, channels_last: bool = False, num_threads: int = 0,
                backend: str = "auto", verify: bool = True, crop_size: int = 224):
    """A loader over `split` of a shard directory (see pipeline/loader.py's LoaderConfig).

    Defaults follow the split: train takes random crops, flips, lighting and a new
    order every epoch; other splits the centre crop in source order. crop="ten"
    yields [B, 10, 3, 224, 224]. normalization: "mean" (x - 255 mean, 0-255 units), "std" or "none"
    (raw 0-255) with SHARDS/pca.json's numbers, or a whole pipeline.normalization.Normalization (the
    trainer's or a checkpoint's; pca.json is then not read). backend: "dali", "wds", "auto" (DALI if it imports), or
    "synthetic" (fixed random batches of the split's size, for measuring the trainer alone).
    verify: check each shard's sha256 against dataset.json before its samples leave the loader
    (once per loader, in the background; pipeline/verify.py). crop_size: the crops' side, 224 (the
    paper's) or 227 (conv1 unpadded; a model's AlexNetConfig.input_size says which).
    """
    from pipeline.loader import LoaderConfig

    train = split == "train"
    crop = crop or ("random" if train else "center")
    augment = crop == "random"
    cfg = LoaderConfig(shards_dir=shards_dir, split=split, batch_size=batch_size, device=str(device), rank=rank,
                       world_size=world_size, seed=seed, crop=crop, crop_size=crop_size, normalization=normalization,
                       lighting=augment if lighting is None else lighting,
                       flip=augment if flip is None else flip,
                       shuffle=train if shuffle is None else shuffle,
                       channels_last=channels_last, num_threads=num_threads, verify=verify)
    if backend == "auto":
        try:
            import nvidia.dali  # noqa: F401
            backend = "dali"
        except ImportError:
            backend = "wds"
    if backend == "dali":
        from pipeline.dali import DaliLoader
        return DaliLoader(cfg)
    if backend == "wds":
        from pipeline.wds import WdsLoader
        return WdsLoader(cfg)
    if backend == "synthetic":
        from pipeline.synthetic import SyntheticLoader
        return SyntheticLoader(cfg)
    raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
