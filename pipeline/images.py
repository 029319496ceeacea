"""One image file -> the 256 px RGB JPEG a shard stores: make_shards and predict both call this.

Decoding follows what a person sees in an image viewer:
  - EXIF orientation is applied (a phone photo stored sideways with an 'rotate 90' tag is
    used upright). cuda-convnet2's make-data.py ignores the tag (it predates PIL applying it);
    a handful of ILSVRC-2012 images carry one. A departure, listed in the README.
  - 16-bit channels (16-bit grayscale PNGs) are scaled to 8 bits, not clipped: PIL's
    convert("RGB") of such an image turns everything above 255 of 65535 into white.
  - every other mode (CMYK, grayscale, palette, alpha) is converted to RGB; alpha is dropped.
Then the shorter side is resized to `size` and the central square cropped (the paper,
section 2), and the result re-encoded as a baseline 4:2:0 JPEG.
"""
from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageOps

ORIENTATION = 0x0112  # the EXIF tag: 1 upright, 2-8 mirrored and/or rotated
RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS, "box": Image.BOX}


def open_rgb(data: bytes, size: int | None = None, draft: bool = True) -> tuple[Image.Image, tuple[int, int]]:
    """Source bytes -> (8-bit RGB image, upright; the stored (w, h)). Raises on undecodable input.

    size: the shorter side the caller will resize to. JPEGs at least twice as large are decoded
    at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's draft mode) while they stay at least that
    large: quality is kept and decoding is faster."""
    img = Image.open(io.BytesIO(data))
    stored = img.size
    if img.format == "JPEG" and draft and size:
        w, h = stored
        scale = size / min(w, h)
        img.draft(None, (math.ceil(w * scale), math.ceil(h * scale)))
    img.load()  # decode now: truncated or corrupt files raise here
    if img.getexif().get(ORIENTATION, 1) != 1:  # checked first: exif_transpose copies even an upright image
        img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I"):  # 16-bit grayscale ("I;16", "I;16B", "I"): 0-65535 -> 0-255, rounded
        img = Image.fromarray(np.rint(np.asarray(img, np.float64) * (255 / 65535)).clip(0, 255).astype(np.uint8))
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, stored


def shard_image(data: bytes, size: int = 256, keep_aspect: bool = False, quality: int = 90,
                resample: str = "bicubic", draft: bool = True) -> tuple[bytes, tuple[int, int]]:
    """Source bytes -> (the shard's JPEG bytes, the stored (w, h)). The defaults are make_shards'."""
    img, stored = open_rgb(data, size, draft)
    w, h = img.size
    filt = RESAMPLE[resample]
    if keep_aspect:
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), filt)
    else:
        # Shorter side -> size, then the central size x size square: resize just the
        # central square of the source (same geometry, fewer output pixels).
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img = img.resize((size, size), filt, box=box)
    out = io.BytesIO()
    try:
        img.save(out, "JPEG", quality=quality, progressive=False, optimize=False)  # no EXIF is carried over
    except (OSError, ValueError) as e:  # JPEG sides stop at 65,535 px: --keep-aspect on a panorama
        raise EncodeError(f"the {img.size[0]}x{img.size[1]} result cannot be written as a JPEG ({e})") from None
    return out.getvalue(), stored


class EncodeError(Exception):
    """The image decoded, but its resized result cannot be stored as a JPEG."""
