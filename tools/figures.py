"""What the figure tools share (show_filters, show_predictions, neighbours): the checks made before
any work, and writing a PNG under a temporary name."""
from __future__ import annotations

import os

from model.errors import UsageError


def check_out(path: str) -> None:
    """UsageError unless `path` can be written: its directory exists and is writable, and it is not a
    directory (checked before the work, not after it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: its directory {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{path}: cannot write into {folder} (permission denied)")


def open_model(checkpoint: str, shards: str | None, device: str = "cpu"):
    """(model in eval mode, checkpoint, the shards' manifest or None): the checkpoint's digest checked,
    and the shards' classes the checkpoint's, wnid for wnid (UsageError in one line otherwise)."""
    from model.checkpoint import check_classes, load_model
    from model.evaluation import open_manifest
    model, ckpt = load_model(checkpoint, device)
    manifest = None
    if shards is not None:
        manifest = open_manifest(shards)
        check_classes(checkpoint, ckpt, manifest, shards)
    return model, ckpt, manifest


def save(fig, path: str, dpi: int = 90) -> None:
    """The figure as PNG at `path`, written under a temporary name and renamed: no half-drawn file."""
    import matplotlib.pyplot as plt
    tmp = f"{path}.tmp-{os.getpid()}.png"
    try:
        fig.savefig(tmp, dpi=dpi)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
