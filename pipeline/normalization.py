"""What the loaders do to pixel values, in one place: pca.json plus the recipe -> numbers.

Contract version 2 (docs/DESIGN.md), per image, in 0-255 units:

    light = 255 * gain * sum_i alpha_i * sqrt(eigenvalue_i) * eigenvector_i,   alpha_i ~ N(0, 0.1^2)
    out   = (crop + light - shift) / divisor * (train_scale if the batch has lighting else 1)

    mode       shift        divisor
    "mean"     255 * mean   1            the paper's and its code's input: 0-255 minus the mean
    "std"      255 * mean   255 * std    (x/255 - mean) / std, the modern convention
    "none"     0            1            raw 0-255

Lighting uses standard deviations (sqrt of the eigenvalues), as the authors' code
does (cuda-convnet2 convdata.py: N(0, 1) draws times `color_stdevs`, times the
coefficient 0.1), and that code then scales training batches by 1/(1 + 0.1)
(`add_color_noise`), which is the paper recipe's train_scale.

The trainer builds one Normalization from pca.json and the recipe, passes it to
both loaders, and stores it in the checkpoint; evaluate and predict take it from
the checkpoint, so a finished model never depends on a shard directory's pca.json.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.shards import MANIFEST, PCA_FILE, ShardError

MODES = ("mean", "std", "none")


def check_pca(pca: dict) -> None:
    """ValueError unless pca.json's numbers can be pixel statistics in [0, 1] units: 3 finite means in
    [0, 1], 3 standard deviations in (0, 1], 3 eigenvalues in [0, 1] (a variance of [0, 1] values is
    at most 1/4 per channel; rounding may leave tiny negatives), 3 eigenvectors of 3 finite values."""
    if not isinstance(pca, dict):
        raise ValueError("not a JSON object")
    def vector(key, low, high, low_open=False):
        v = pca[key]
        if not (isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) for x in v)):
            raise ValueError(f"{key} must be 3 numbers, not {v!r:.60}")
        if not all(math.isfinite(x) and (low < x if low_open else low <= x) and x <= high for x in v):
            raise ValueError(f"{key} {v} is out of range ({'(' if low_open else '['}{low}, {high}])")
    vector("mean", 0.0, 1.0)
    vector("std", 0.0, 1.0, low_open=True)
    vector("eigenvalues", -1e-9, 1.0)
    vecs = pca["eigenvectors"]
    if not (isinstance(vecs, list) and len(vecs) == 3 and all(isinstance(v, list) and len(v) == 3 and
            all(isinstance(x, (int, float)) and math.isfinite(x) for x in v) for v in vecs)):
        raise ValueError("eigenvectors must be 3 vectors of 3 finite numbers")


@dataclass(frozen=True)
class Normalization:
    mode: str = "mean"                                   # "mean", "std" or "none" (table above)
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)            # per channel, RGB, [0, 1] units (pca.json)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)             # per channel, RGB, [0, 1] units (pca.json)
    eigenvalues: tuple[float, ...] = (0.0, 0.0, 0.0)     # RGB covariance, descending, [0, 1]^2 units
    eigenvectors: tuple[tuple[float, ...], ...] = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0))
    train_scale: float = 1.0                             # times batches with lighting (paper recipe: 1/1.1)
    lighting_gain: float = 1.0                           # times the lighting; 1 = the paper; > 1 only to look

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"the normalization mode must be one of {MODES}, not {self.mode!r}")
        if not (math.isfinite(self.train_scale) and self.train_scale > 0):
            raise ValueError(f"train_scale must be finite and > 0, not {self.train_scale}")

    @classmethod
    def from_pca(cls, pca: dict, mode: str = "mean", train_scale: float = 1.0) -> "Normalization":
        return cls(mode=mode, mean=tuple(map(float, pca["mean"])), std=tuple(map(float, pca["std"])),
                   eigenvalues=tuple(map(float, pca["eigenvalues"])),
                   eigenvectors=tuple(tuple(map(float, v)) for v in pca["eigenvectors"]), train_scale=train_scale)

    @classmethod
    def from_shards(cls, shards_dir: str, mode: str = "mean", train_scale: float = 1.0) -> "Normalization":
        """From SHARDS/pca.json, checked: FileNotFoundError naming the file and the command that makes
        it; ShardError for a file that is damaged, holds impossible numbers, or was computed from
        another shard set (its source.sha256 is not this dataset.json's)."""
        path = os.path.join(shards_dir, PCA_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: missing: run tools/compute_pca.py {shards_dir}")
        redo = f"rerun tools/compute_pca.py {shards_dir}"
        try:
            with open(path, encoding="utf-8") as f:
                pca = json.load(f)
            check_pca(pca)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ShardError(f"{path}: {e if not isinstance(e, KeyError) else f'no {e}'}; {redo}") from None
        with open(os.path.join(shards_dir, MANIFEST), "rb") as f:
            manifest_sha = hashlib.sha256(f.read()).hexdigest()
        source = pca.get("source", {}).get("sha256") if isinstance(pca.get("source"), dict) else None
        if source != manifest_sha:
            raise ShardError(f"{path}: was computed from another shard set (its source.sha256 is not that of "
                             f"{os.path.join(shards_dir, MANIFEST)}); {redo}")
        return cls.from_pca(pca, mode, train_scale)

    @classmethod
    def from_dict(cls, d: dict) -> "Normalization":
        return cls(**{**d, "eigenvectors": tuple(tuple(v) for v in d["eigenvectors"]),
                      **{k: tuple(d[k]) for k in ("mean", "std", "eigenvalues")}})

    def as_dict(self) -> dict:
        return asdict(self)

    # -- the numbers the loaders apply ---------------------------------------
    def shift_divisor(self, lit: bool) -> tuple[np.ndarray, np.ndarray]:
        """(shift, divisor), float64 [3] in 0-255 units: out = (x + light - shift) / divisor.
        `lit`: the batch gets lighting, so the training scale applies (divisor / train_scale)."""
        shift = 255.0 * np.asarray(self.mean, np.float64) if self.mode != "none" else np.zeros(3)
        divisor = 255.0 * np.asarray(self.std, np.float64) if self.mode == "std" else np.ones(3)
        return shift, divisor / (self.train_scale if lit else 1.0)

    def lighting(self, alpha: np.ndarray) -> np.ndarray:
        """[B, 3] alphas (~N(0, 0.1^2)) -> [B, 3] RGB offsets in 0-255 units (contract v2)."""
        stdevs = np.sqrt(np.maximum(np.asarray(self.eigenvalues, np.float64), 0.0))  # tiny negatives: rounding
        return 255.0 * self.lighting_gain * (np.asarray(alpha, np.float64) * stdevs) @ np.asarray(self.eigenvectors)

    def apply(self, crop: np.ndarray, light: np.ndarray | None = None) -> np.ndarray:
        """uint8 HWC crop (already cropped and flipped) -> float32 CHW, as the loaders output it.
        `light`: this image's [3] offset in 0-255 units, or None for an unlit (eval) image."""
        shift, divisor = self.shift_divisor(lit=light is not None)
        offset = (light if light is not None else 0.0) - shift
        out = (crop.astype(np.float32) + offset.astype(np.float32)) / divisor.astype(np.float32)
        return np.ascontiguousarray(out.transpose(2, 0, 1))

    def unapply(self, images: np.ndarray, lit: bool) -> np.ndarray:
        """Loader output [..., 3, H, W] back to 0-255 pixels, lighting included (for looking at a batch)."""
        shift, divisor = self.shift_divisor(lit)
        return images * divisor[:, None, None] + shift[:, None, None]
