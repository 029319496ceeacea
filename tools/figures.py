"""What the figure tools share (show_filters, show_predictions, neighbours): the checks made before
any work, and writing a PNG under a temporary name."""
from __future__ import annotations

import os

from model.errors import UsageError
from pipeline.shards import check_writable


def check_out(path: str, image: bool = True) -> None:
    """UsageError unless `path` can be written: its directory exists and is writable, and it is not a
    directory (checked before the work, not after it)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; give a file name")
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: its directory {folder} does not exist")
    try:  # a real write: root passes os.access on a read-only mount
        check_writable(path)
    except OSError as e:
        raise UsageError(f"{path}: cannot write into {folder} ({e.strerror})") from None
    if image:
        from matplotlib.backend_bases import FigureCanvasBase
        kind = image_format(path)
        if kind not in FigureCanvasBase.get_supported_filetypes():
            raise UsageError(f"{path}: .{kind} is not an image format this can write (png, jpg, pdf, svg, ...)")


def image_format(path: str) -> str:
    """The format a figure is written in: its file's extension (png where it has none)."""
    return os.path.splitext(path)[1][1:].lower() or "png"


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
    """The figure at `path` in the format its extension names, written under a temporary name and renamed: no half-drawn file."""
    import matplotlib.pyplot as plt
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        fig.savefig(tmp, dpi=dpi, format=image_format(path))  # JPEG bytes for out.jpg, not PNG under its name
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
