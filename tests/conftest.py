"""Shared fixtures: small generated ImageNet-like sources and the shards made from them.

Session-scoped, so the suite generates each dataset once (a few seconds in all).
"""
from __future__ import annotations

import os
import subprocess
import tarfile

import pytest
import torch

from tools import make_sample_data, make_shards

# Small but with every quirk: 5 classes cover the PNG, CMYK, grayscale, tiny and
# panorama files of make_sample_data.quirk_for.
SMALL = dict(classes=5, train_per_class=8, val_per_class=4, seed=0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def sources(tmp_path_factory):
    """{layout: (root, truth)} for ILSVRC-2012's three layouts, same images in each."""
    out = {}
    for layout in make_sample_data.ILSVRC_LAYOUTS:
        root = str(tmp_path_factory.mktemp(f"src_{layout}"))
        out[layout] = (root, make_sample_data.generate(root, layout, **SMALL))
    return out


def tarfile_samples(path: str):
    """(key, {ext: bytes}) of a shard read with the standard library's tarfile: a reader
    independent of pipeline.shards, so tests of what we write do not trust our own reader."""
    key, sample = None, {}
    with tarfile.open(path, "r:") as tf:
        for m in tf:
            if not m.isfile():
                continue
            k, _, ext = m.name.partition(".")
            if k != key and key is not None:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tf.extractfile(m).read()
    if key is not None:
        yield key, sample


def build_shards(src: str, out: str, *extra: str) -> int:
    return make_shards.main([src, out, "--workers", "2", *extra])


@pytest.fixture(scope="session")
def shards(tmp_path_factory):
    """A shard directory of 10 classes (60 train, 20 val images each) with pca.json."""
    root = str(tmp_path_factory.mktemp("src_shards"))
    make_sample_data.generate(root, "folder", classes=10, train_per_class=60, val_per_class=20, seed=1)
    out = str(tmp_path_factory.mktemp("shards") / "sample")
    assert build_shards(root, out, "--shard-samples", "64") == 0
    from tools import compute_pca
    assert compute_pca.main([out, "--workers", "2"]) == 0
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    """4 classes, 8 train and 4 val images each: for trainer tests, where AlexNet costs ~0.5 s a step."""
    root = str(tmp_path_factory.mktemp("src_tiny"))
    make_sample_data.generate(root, "folder", classes=4, train_per_class=8, val_per_class=4, seed=2, quirks=False)
    out = str(tmp_path_factory.mktemp("tiny") / "shards")
    assert build_shards(root, out, "--shard-samples", "16") == 0
    from tools import compute_pca
    assert compute_pca.main([out, "--quiet"]) == 0
    return out


@pytest.fixture
def small_filesystem(tmp_path):
    """A real 300 MB filesystem (tmpfs): full disks and read-only mounts as a user meets them, root or
    not (root passes every permission check, so a chmod proves nothing there); skipped where this process
    may not mount one (it needs root)."""
    mount = tmp_path / "small"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({r.stderr.decode().strip() or r.returncode})")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def make_read_only(mount: str) -> None:
    """small_filesystem remounted read-only: EROFS for every writer, root included."""
    subprocess.run(["mount", "-o", "remount,ro", mount], check=True, capture_output=True)


def fill_up(mount: str) -> None:
    """Fill a small_filesystem to its last byte (a file that grows until ENOSPC)."""
    with open(os.path.join(mount, "filler"), "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
