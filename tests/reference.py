"""The augmentation math written out from the contract (docs/DESIGN.md), in float64.

The tests' oracle: nothing in the product imports this, and it imports nothing of
the product's math (pipeline/normalization.py, the loaders). Only the sample order
and the random draws come from plan.py, which the tests check on their own.
"""
from __future__ import annotations

import math

import numpy as np

CROP = 224
# (x, y) of the ten crops' top-left corners in a 256 x 256 image: the four corners, the centre; for 224
# crops (free range 32) and 227 crops (free range 29: the centre 14.5 rounds half up, as DALI's window does).
TEN_CORNERS_256 = {224: ((0, 0), (32, 0), (0, 32), (32, 32), (16, 16)),
                   227: ((0, 0), (29, 0), (0, 29), (29, 29), (15, 15))}
CENTRE_256 = {224: 16, 227: 15}


def lighting(alpha, pca: dict) -> np.ndarray:
    """One image's RGB offset in 0-255 units: 255 * sum_i alpha_i * sqrt(lambda_i) * p_i."""
    out = np.zeros(3)
    for i in range(3):
        out += alpha[i] * math.sqrt(max(pca["eigenvalues"][i], 0.0)) * np.array(pca["eigenvectors"][i], np.float64)
    return 255.0 * out


def normalize(x: np.ndarray, mode: str, pca: dict) -> np.ndarray:
    """0-255 float64 HWC -> the contract's units."""
    mean, std = np.array(pca["mean"], np.float64), np.array(pca["std"], np.float64)
    if mode == "mean":
        return x - 255.0 * mean
    if mode == "std":
        return (x / 255.0 - mean) / std
    return x


def augment(img: np.ndarray, left: int, top: int, flip: bool, light, mode: str, pca: dict,
            train_scale: float = 1.0, crop: int = CROP) -> np.ndarray:
    """uint8 HWC image -> float64 CHW: crop at pixel (left, top), mirror, add `light` (0-255
    units, None for none), normalize; batches with lighting are then times train_scale."""
    x = img[top:top + crop, left:left + crop].astype(np.float64)
    if flip:
        x = x[:, ::-1]
    if light is not None:
        x = x + np.asarray(light, np.float64)
    x = normalize(x, mode, pca)
    if light is not None:
        x = x * train_scale
    return x.transpose(2, 0, 1)


def ten_crop(img: np.ndarray, mode: str, pca: dict, crop: int = CROP) -> np.ndarray:
    """[10, 3, crop, crop] of a 256 x 256 image: corners and centre, then the same five mirrored."""
    return np.stack([augment(img, x, y, flip, None, mode, pca, crop=crop) for flip in (False, True)
                     for x, y in TEN_CORNERS_256[crop]])


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)
