"""Figure 3 of the paper from any checkpoint: the 96 conv1 kernels, the two halves as two blocks of 48.

    python -m tools.show_filters RUN/checkpoint.pt OUT.png

Each 11x11x3 kernel is shown scaled to its own range (its minimum black, its
maximum white), as in the paper. The first block is the first half of conv1
(the paper's GPU 1), the second block the second half (GPU 2): the grouped
layout's channels 0-47 and 48-95, the same kernels in the two-device layout.

The paper observes that GPU 1's kernels are largely colour-agnostic and GPU 2's
largely colour-specific (section 6.1). To check that without looking, the tool
prints each half's mean colour share: for one kernel w[c, y, x] (c = R, G, B),

    colour share = sum_{c,y,x} (w[c,y,x] - g[y,x])^2 / sum_{c,y,x} w[c,y,x]^2,   g[y,x] = mean_c w[c,y,x]

the share of the kernel's energy that is off the grey axis (R = G = B). It is 0
for a kernel that weighs the three channels alike (it sees only luminance), 2/3
for one that sees a single channel, and at most 1 (opponent colours, R - G). It
does not depend on the kernel's scale.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from model.errors import UsageError, command
from tools.figures import check_out, open_model, save


def colour_share(kernels: np.ndarray) -> np.ndarray:
    """[N] colour shares (module docstring) of [N, 3, H, W] kernels, in float64."""
    w = np.asarray(kernels, np.float64)
    grey = w.mean(axis=1, keepdims=True)
    energy = (w ** 2).sum(axis=(1, 2, 3))
    return ((w - grey) ** 2).sum(axis=(1, 2, 3)) / np.maximum(energy, 1e-300)


def kernel_tile(kernel: np.ndarray) -> np.ndarray:
    """One [3, H, W] kernel -> an [H, W, 3] image in [0, 1], scaled to its own range."""
    k = np.asarray(kernel, np.float64).transpose(1, 2, 0)
    low, high = k.min(), k.max()
    return (k - low) / (high - low) if high > low else np.full_like(k, 0.5)


def draw(kernels: np.ndarray, path: str, title: str, shares: tuple[float, float]) -> None:
    """The two halves as two labelled blocks of 6 x 8 kernels (more rows for a wider conv1)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    half = len(kernels) // 2
    columns = 8
    rows = -(-half // columns)
    fig = plt.figure(figsize=(2 * columns * 0.62 + 0.6, rows * 0.62 + 1.0))
    grids = fig.add_gridspec(1, 2, wspace=0.08, left=0.02, right=0.98, top=1 - 0.7 / (rows * 0.62 + 1.0), bottom=0.02)
    for h in range(2):
        inner = grids[h].subgridspec(rows, columns, wspace=0.08, hspace=0.08)
        for j in range(rows * columns):
            ax = fig.add_subplot(inner[j // columns, j % columns])
            ax.axis("off")
            if j < half:
                ax.imshow(kernel_tile(kernels[h * half + j]), interpolation="nearest")
            if j == columns // 2 - 1:
                ax.set_title(f"half {h + 1} (the paper's GPU {h + 1}): mean colour share {shares[h]:.3f}",
                             fontsize=8, loc="left")
    fig.suptitle(title, fontsize=9)
    save(fig, path)


@command("show_filters")
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="RUN/checkpoint.pt of model.train")
    p.add_argument("out", help="PNG file to write")
    a = p.parse_args(argv)
    try:
        check_out(a.out)
        model, ckpt, _ = open_model(a.checkpoint, None)
    except UsageError as e:
        print(f"show_filters: {e}", file=sys.stderr)
        return 2
    kernels = ckpt["model"]["conv1.weight"].double().numpy()  # [96, 3, 11, 11], the canonical layout
    half = len(kernels) // 2
    shares = colour_share(kernels)
    means = (float(shares[:half].mean()), float(shares[half:].mean()))
    draw(kernels, a.out, f"conv1 kernels of {a.checkpoint} (step {ckpt['step']}), each scaled to its own range",
         means)
    print(f"half 1 (GPU 1): mean colour share {means[0]:.3f}")
    print(f"half 2 (GPU 2): mean colour share {means[1]:.3f}")
    print(f"({'half 2' if means[1] > means[0] else 'half 1'} is the more colour-specific; 0 = grey, "
          f"2/3 = one channel) -> {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
