"""pipeline/: the loaders' semantics, held to plan.py's numpy reference (CPU; GPU tests marked)."""
from __future__ import annotations

import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import reference
from conftest import tarfile_samples
from pipeline import make_loader, plan
from pipeline.normalization import Normalization
from pipeline.shards import ShardError, atomic_write, iter_tar_samples, load_manifest, sha256_file

BACKENDS = ["dali", "wds"]


@pytest.fixture(scope="module")
def decoded(shards):
    """{split: [[uint8 HWC image of each sample in shard order] per shard]}, labels alike."""
    m = load_manifest(shards)
    out = {}
    for split in ("train", "val"):
        imgs, labels = [], []
        for shard in m["splits"][split]["shards"]:
            samples = list(tarfile_samples(os.path.join(shards, shard["file"])))
            imgs.append([np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")) for _, s in samples])
            labels.append([int(s["cls"]) for _, s in samples])
        out[split] = (imgs, labels)
    return out


def pca_of(shards) -> dict:
    return json.load(open(os.path.join(shards, "pca.json")))


def reference_batches(loader, decoded, epoch: int, mode: str, train_scale: float = 1.0):
    """What the loader must yield in `epoch`: plan.py's order and draws, tests/reference.py's math."""
    cfg = loader.cfg
    pca = pca_of(cfg.shards_dir)
    imgs, labels = decoded[cfg.split]
    order = loader._order(epoch)
    side = cfg.crop_size
    free = 256 - side  # 32 for 224 crops, 29 for 227
    for b in range(len(loader)):
        pairs = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        if cfg.crop == "random":
            p = plan.batch_params(cfg.seed, epoch, cfg.rank, b, cfg.batch_size, free=free)
            x = [reference.augment(imgs[s][i], round(free * float(p.crop_x[j])), round(free * float(p.crop_y[j])),
                                   bool(p.flip[j]) and cfg.flip,
                                   reference.lighting(p.alpha[j], pca) if cfg.lighting else None, mode, pca,
                                   train_scale, crop=side)
                 for j, (s, i) in enumerate(pairs)]
        elif cfg.crop == "center":
            c = reference.CENTRE_256[side]
            x = [reference.augment(imgs[s][i], c, c, False, None, mode, pca, crop=side) for s, i in pairs]
        else:
            x = [reference.ten_crop(imgs[s][i], mode, pca, crop=side) for s, i in pairs]
        yield np.stack(x), np.array([labels[s][i] for s, i in pairs])


def assert_matches_reference(loader, decoded, epoch=0, max_batches=3, mode="mean", train_scale=1.0):
    ref = reference_batches(loader, decoded, epoch, mode, train_scale)
    loader.set_epoch(epoch)
    n = 0
    for (x, y), (rx, ry) in zip(loader, ref):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_array_equal(y.cpu().numpy(), ry)
        # float32 against float64: 0-255 units agree to ~1e-4, std-normalized ones to ~1e-5
        tol = 5e-5 if mode == "std" else 2e-3
        np.testing.assert_allclose(x.cpu().numpy(), rx, atol=tol, rtol=0)
        n += 1
        if n == max_batches:
            break
    assert n > 0


# ---------------------------------------------------------------- the math, on plain arrays

def test_crop_offsets_cover_all_33_positions_uniformly():
    xs = np.concatenate([plan.batch_params(0, 0, 0, b, 128).crop_x for b in range(200)])
    offsets = np.array([plan.crop_offset(x, 256) for x in xs])
    counts = np.bincount(offsets, minlength=33)
    assert len(counts) == 33 and counts.min() > 0
    expected = len(offsets) / 33
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 70  # 32 degrees of freedom: P(chi2 > 70) < 1e-4 for a uniform draw
    assert {plan.crop_offset(k / 32, 256) for k in range(33)} == set(range(33))  # k/32 is exact


def test_227_crops_draw_every_offset_0_to_29(shards):
    """227 crops of the 256 images: 30 offsets a side (256 - 227 = 29), each drawn, and nothing beyond."""
    loader = make_loader(shards, "train", batch_size=128, backend="wds", crop_size=227, verify=False)
    xs = np.concatenate([loader.params(0, b).crop_x for b in range(100)])
    offsets = np.array([plan.crop_offset(float(x), 256, 227) for x in xs])
    assert set(offsets.tolist()) == set(range(30))
    assert np.allclose(xs * 29, np.round(xs * 29), atol=1e-4)  # k / 29: whole offsets, as DALI's window takes them


def test_flip_rate_is_one_half():
    flips = np.concatenate([plan.batch_params(3, 1, 0, b, 128).flip for b in range(100)])
    assert set(np.unique(flips)) == {0, 1}
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(len(flips))


def test_lighting_draws_are_independent_normals_of_std_0_1():
    alpha = np.concatenate([plan.batch_params(0, e, 0, b, 128).alpha for e in range(3) for b in range(100)])
    n = len(alpha)  # 38,400 images x 3 components
    assert abs(alpha.std() - 0.1) < 4 * 0.1 / np.sqrt(2 * alpha.size) and abs(alpha.mean()) < 4 * 0.1 / np.sqrt(alpha.size)
    # independence across images and across components: |r| < 4.5 / sqrt(n) (false alarm ~1e-5 each)
    for c in range(3):
        assert abs(np.corrcoef(alpha[1:, c], alpha[:-1, c])[0, 1]) < 4.5 / np.sqrt(n)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert abs(np.corrcoef(alpha[:, a], alpha[:, b])[0, 1]) < 4.5 / np.sqrt(n)


def test_reference_augment_on_a_known_array():
    """The oracle itself, on an image whose pixel values encode their coordinates."""
    yy, xx = np.mgrid[0:256, 0:256]
    img = np.stack([yy, xx, (yy + xx) % 256], -1).astype(np.uint8)
    pca = {"mean": [0.5, 0.25, 0.0], "std": [0.25, 0.5, 1.0], "eigenvalues": [0.04, 0.01, 0.0],
           "eigenvectors": [[1, 0, 0], [0, 1, 0], [0, 0, 1]]}
    np.testing.assert_allclose(reference.lighting([0.1, -0.2, 0.3], pca), [255 * 0.1 * 0.2, -255 * 0.2 * 0.1, 0])
    out = reference.augment(img, 5, 32, True, None, "none", pca)
    assert out[0, 0, 0] == 32 and out[1, 0, 0] == 5 + 223 and out[1, 0, 223] == 5  # row 32; mirrored columns
    out = reference.augment(img, 0, 0, False, [10.0, 0, 0], "mean", pca, train_scale=0.5)
    assert out[0, 3, 0] == pytest.approx((3 + 10 - 127.5) * 0.5) and out[1, 0, 7] == pytest.approx((7 - 63.75) * 0.5)
    out = reference.augment(img, 0, 0, False, None, "std", pca)
    assert out[0, 100, 0] == pytest.approx((100 / 255 - 0.5) / 0.25)


def test_lighting_in_loader_output_is_0_1_sqrt_lambda_along_each_eigenvector(shards):
    """The DALI loader's real output: lit minus unlit images of the same crops is one RGB offset per
    image, whose projection on eigenvector i has std 0.1 * sqrt(lambda_i) * 255 (contract v2, not the
    paper's literal 'times lambda'), independently from image to image."""
    pca = pca_of(shards)
    kw = dict(batch_size=100, normalization="none", num_threads=2, seed=5)
    lit = list(make_loader(shards, "train", lighting=True, **kw))
    unlit = list(make_loader(shards, "train", lighting=False, **kw))
    offsets = np.concatenate([(a - b).double().mean((2, 3)).numpy() for (a, _), (b, _) in zip(lit, unlit)])
    spread = np.concatenate([(a - b).double().std((2, 3)).numpy() for (a, _), (b, _) in zip(lit, unlit)])
    assert len(offsets) == 600 and spread.max() < 1e-3  # the same offset on every pixel of an image
    vectors = np.array(pca["eigenvectors"], np.float64)
    n = len(offsets)
    for i in range(3):
        proj = offsets @ vectors[i]
        expected = 0.1 * np.sqrt(pca["eigenvalues"][i]) * 255
        # the sample std of n normals is within 4.5 / sqrt(2n) of sigma (relative) but with odds ~1e-5
        assert abs(proj.std() / expected - 1) < 4.5 / np.sqrt(2 * n), (i, proj.std(), expected)
        assert abs(np.corrcoef(proj[1:], proj[:-1])[0, 1]) < 4.5 / np.sqrt(n)  # independent across images
    assert 10 < 0.1 * np.sqrt(0.2175) * 255 < 13  # on ImageNet: ~12 grey levels (DESIGN.md), not 5.5


def test_rank_orders_are_disjoint_exactly_once_and_reshuffled():
    counts = [64, 64, 64, 17]
    n = sum(counts)
    one = plan.rank_order(counts, epoch=0, seed=0, rank=0, world_size=1, batch_size=16, shuffle=True)
    assert len({tuple(p) for p in one}) == n  # one rank: every sample once
    two = plan.rank_order(counts, epoch=1, seed=0, rank=0, world_size=1, batch_size=16, shuffle=True)
    assert not np.array_equal(one, two)  # a new order each epoch
    same = plan.rank_order(counts, epoch=1, seed=0, rank=0, world_size=1, batch_size=16, shuffle=True)
    assert np.array_equal(two, same)  # fixed by the seed
    for world in (2, 3):
        parts = [plan.rank_order(counts, epoch=0, seed=0, rank=r, world_size=world, batch_size=16, shuffle=True)
                 for r in range(world)]
        seen = [tuple(p) for part in parts for p in part]
        assert len(seen) == len(set(seen))  # disjoint
        assert len({len(p) for p in parts}) == 1 and len(parts[0]) % 16 == 0  # equal whole batches
        assert n - len(seen) < world * 16  # fewer than ranks x batch wait for the next epoch
        evals = [plan.rank_order(counts, epoch=0, seed=0, rank=r, world_size=world, batch_size=16, shuffle=False)
                 for r in range(world)]
        assert sorted(tuple(p) for e in evals for p in e) == sorted((s, i) for s, c in enumerate(counts)
                                                                    for i in range(c))


# ---------------------------------------------------------------- the loaders

@pytest.mark.parametrize("side", [224, 227])
@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_match_reference(shards, decoded, backend, side):
    loader = make_loader(shards, "train", batch_size=16, backend=backend, seed=7, num_threads=2, crop_size=side)
    assert_matches_reference(loader, decoded, epoch=0)
    assert_matches_reference(loader, decoded, epoch=3, max_batches=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalized_output_is_in_0_255_units(shards, decoded, backend):
    loader = make_loader(shards, "train", batch_size=8, backend=backend, normalization="none", lighting=False,
                         num_threads=2)
    assert_matches_reference(loader, decoded, max_batches=2, mode="none")
    x, _ = next(iter(loader))
    assert x.min() >= 0 and x.max() <= 255 and x.max() > 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_only_normalization_is_the_default(shards, decoded, backend):
    """normalization="mean" (the default): x - 255 * mean in 0-255 units, no division (cuda-convnet2
    convdata.py); "std" the option; a Normalization with the paper's 1/1.1 scales lit batches."""
    loader = make_loader(shards, "train", batch_size=8, backend=backend, num_threads=2)
    assert_matches_reference(loader, decoded, max_batches=1, mode="mean")
    loader = make_loader(shards, "train", batch_size=8, backend=backend, normalization="std", num_threads=2)
    assert_matches_reference(loader, decoded, max_batches=1, mode="std")
    norm = Normalization.from_pca(pca_of(shards), "mean", train_scale=1 / 1.1)
    loader = make_loader(shards, "train", batch_size=8, backend=backend, normalization=norm, num_threads=2)
    assert_matches_reference(loader, decoded, max_batches=1, mode="mean", train_scale=1 / 1.1)
    val = make_loader(shards, "val", batch_size=8, backend=backend, normalization=norm, num_threads=2)
    assert_matches_reference(val, decoded, max_batches=1, mode="mean")  # no scale without lighting
    x, _ = next(iter(make_loader(shards, "val", batch_size=8, backend=backend, normalization="mean", num_threads=2)))
    assert 30 < x.std() < 120 and abs(x.mean()) < 30


@pytest.mark.parametrize("side", [224, 227])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("crop", ["center", "ten"])
def test_eval_crops_match_reference(shards, decoded, backend, crop, side):
    loader = make_loader(shards, "val", batch_size=8, backend=backend, crop=crop, num_threads=2, crop_size=side)
    x, _ = next(iter(loader))
    assert tuple(x.shape) == ((8, 3, side, side) if crop == "center" else (8, 10, 3, side, side))
    assert_matches_reference(loader, decoded, max_batches=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_sees_every_sample_once_across_ranks(shards, backend):
    m = load_manifest(shards)
    expected = sorted(int(s["cls"]) for sh in m["splits"]["val"]["shards"]
                      for _, s in iter_tar_samples(os.path.join(shards, sh["file"])))
    got, first_images = [], []
    for rank in range(3):
        loader = make_loader(shards, "val", batch_size=32, rank=rank, world_size=3, backend=backend, num_threads=2)
        batches = list(loader)
        assert len(batches) == len(loader)
        got += [int(v) for _, y in batches for v in y]
        first_images.append(batches[0][0][0])
    assert sorted(got) == expected
    assert not torch.equal(first_images[0], first_images[1])


def test_dali_train_ranks_are_disjoint_with_equal_batches(shards, decoded):
    lens = []
    for rank in range(2):
        loader = make_loader(shards, "train", batch_size=32, rank=rank, world_size=2, num_threads=2)
        batches = list(loader)
        lens.append((len(batches), len(loader)))
        assert all(len(y) == 32 for _, y in batches)
        # the content is what plan.py gives this rank (disjointness is proved on the plan above)
        assert_matches_reference(loader, decoded, max_batches=1)
    assert lens[0] == lens[1] and lens[0][0] == lens[0][1] == 600 // 2 // 32


def test_one_rank_sees_every_training_sample_once_per_epoch(shards, decoded):
    loader = make_loader(shards, "train", batch_size=64, num_threads=2, lighting=False, flip=False)
    labels = [int(v) for _, y in loader for v in y]
    assert len(labels) == 600 and loader.epoch == 1
    assert sorted(labels) == sorted(v for shard in decoded["train"][1] for v in shard)
    again = [int(v) for _, y in loader for v in y]
    assert sorted(again) == sorted(labels) and again != labels  # epoch 2: same samples, new order


def test_same_seed_same_batches_other_seed_other_batches(shards):
    def first(seed):
        return next(iter(make_loader(shards, "train", batch_size=16, seed=seed, num_threads=2)))
    a, b, c = first(1), first(1), first(2)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_mid_epoch_gives_the_same_following_batches(shards, backend):
    full = make_loader(shards, "train", batch_size=32, backend=backend, num_threads=2)
    list(full)  # epoch 0
    it = iter(full)
    for _ in range(5):
        next(it)
    state = dict(full.state_dict())
    assert state["epoch"] == 1 and state["batch"] == 5
    rest = list(it)
    resumed = make_loader(shards, "train", batch_size=32, backend=backend, num_threads=2)
    resumed.load_state_dict(state)
    again = list(resumed)
    assert len(again) == len(rest) == len(full) - 5
    for (x, y), (rx, ry) in zip(again, rest):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict()["epoch"] == 2


def test_channels_last_output(shards):
    a = next(iter(make_loader(shards, "train", batch_size=8, num_threads=2)))[0]
    b = next(iter(make_loader(shards, "train", batch_size=8, num_threads=2, channels_last=True)))[0]
    assert b.shape == a.shape and b.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b)


def test_loaders_agree_with_each_other(shards):
    a = next(iter(make_loader(shards, "train", batch_size=16, backend="dali", num_threads=2)))
    b = next(iter(make_loader(shards, "train", batch_size=16, backend="wds", num_threads=2)))
    assert torch.equal(a[1], b[1])
    assert (a[0] - b[0]).abs().max() < 1e-4


# ---------------------------------------------------------------- bad input

def _copy(shards, tmp_path):
    out = str(tmp_path / "s")
    shutil.copytree(shards, out)
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["no_manifest", "no_pca", "no_shard", "no_index", "truncated"])
def test_bad_directory_is_named(shards, tmp_path, backend, case):
    out = _copy(shards, tmp_path)
    target = {"no_manifest": "dataset.json", "no_pca": "pca.json", "no_shard": "train-000003.tar",
              "no_index": "train-000003.idx", "truncated": "train-000003.tar"}[case]
    path = os.path.join(out, target)
    if case == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])
    else:
        os.remove(path)
    with pytest.raises(ShardError, match=path.replace(".", r"\.")):
        make_loader(out, "train", batch_size=8, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_corrupt_jpeg_met_while_reading_names_shard_and_key(shards, tmp_path, backend):
    out = _copy(shards, tmp_path)
    path = os.path.join(out, "val-000001.tar")
    from pipeline.shards import read_index
    entry = read_index(path[:-4] + ".idx")[3]
    off, size = entry.member("jpg")
    with open(path, "r+b") as f:  # keep the SOI marker and the next marker's 0xff, destroy the rest of the header
        f.seek(off + 3)
        f.write(b"\x00" * 200)
    m = json.load(open(os.path.join(out, "dataset.json")))
    m["splits"]["val"]["shards"][1]["sha256"] = sha256_file(path)
    atomic_write(os.path.join(out, "dataset.json"), json.dumps(m).encode())
    pca = pca_of(out)  # pca.json names the dataset.json it belongs to: the one just written
    pca["source"]["sha256"] = sha256_file(os.path.join(out, "dataset.json"))
    atomic_write(os.path.join(out, "pca.json"), json.dumps(pca).encode())
    loader = make_loader(out, "val", batch_size=16, backend=backend, num_threads=2)
    with pytest.raises(ShardError, match=rf"val-000001\.tar: sample {entry.key} is corrupt"):
        list(loader)


def _tamper(out: str, shard_file: str, sample: int, how: str) -> str:
    """Change one sample of a shard in place, keeping the tar well formed; returns the sample's key."""
    from pipeline.shards import read_index
    path = os.path.join(out, shard_file)
    entry = read_index(path[:-4] + ".idx")[sample]
    with open(path, "r+b") as f:
        if how == "flip_jpeg":  # 64 bytes inside the entropy-coded data: decodes, wrong pixels
            off, size = entry.member("jpg")
            f.seek(off + size // 2)
            block = f.read(64)
            f.seek(off + size // 2)
            f.write(bytes(b ^ 0x5A for b in block))
        elif how == "relabel":  # another class, same length: no reader can tell
            off, size = entry.member("cls")
            f.seek(off)
            label = int(f.read(size))
            f.seek(off)
            f.write(str((label + 1) % 10).encode())
        elif how == "zero_soi":
            off, _ = entry.member("jpg")
            f.seek(off)
            f.write(b"\0\0")
    return entry.key


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["flip_jpeg", "relabel"])
def test_a_tampered_shard_never_reaches_the_model(shards, tmp_path, backend, how):
    """64 flipped JPEG bytes, or a relabelled .cls member, decode and train without complaint; the
    loader must refuse the shard by its sha256 before yielding any batch that holds its samples."""
    out = _copy(shards, tmp_path)
    _tamper(out, "train-000002.tar", 5, how)
    loader = make_loader(out, "train", batch_size=16, backend=backend, num_threads=2)
    order = loader._order(0)
    first_bad_batch = int(np.flatnonzero(order[:, 0] == 2)[0]) // 16
    yielded = 0
    with pytest.raises(ShardError, match=r"train-000002\.tar: sha256 differs from dataset\.json"):
        for _ in loader:
            yielded += 1
    assert yielded <= first_bad_batch
    # --no-verify is the escape: the same shards then load (and would train on the change)
    unchecked = make_loader(out, "train", batch_size=16, backend=backend, num_threads=2, verify=False)
    assert sum(len(y) for _, y in unchecked) == unchecked.num_samples


def test_verification_runs_once_per_loader_and_ahead_of_the_reader(shards):
    loader = make_loader(shards, "train", batch_size=16, backend="wds", num_threads=2)
    v = loader.verifier
    for _ in range(2):
        for _ in loader:
            pass
    assert sorted(v._done) == list(range(len(loader.shards))) and all(p is None for p in v._done.values())
    hashed = v.hash_seconds
    loader.set_epoch(5)
    for _ in loader:  # another epoch, another order: nothing is hashed again
        pass
    assert v.hash_seconds == hashed and not v._pending
    unverified = make_loader(shards, "train", batch_size=16, backend="wds", verify=False)
    assert unverified.verifier is None


def test_dali_refuses_a_jpeg_without_its_start_marker_even_unverified(shards, tmp_path):
    """A zeroed SOI marker crashed DALI's process (exit 139) before the feed checked it."""
    out = _copy(shards, tmp_path)
    key = _tamper(out, "val-000000.tar", 3, "zero_soi")
    loader = make_loader(out, "val", batch_size=16, backend="dali", num_threads=2, verify=False)
    with pytest.raises(ShardError, match=rf"val-000000\.tar: sample {key}: \.jpg is not a JPEG"):
        list(loader)


def test_dali_errors_not_about_the_data_are_not_blamed_on_the_shards(shards, monkeypatch):
    """Only reader and decoder errors trigger the rescan of the epoch's shards; any other error (here
    a CUDA out-of-memory message, as DALI would raise it) comes through unchanged, at once."""
    import pipeline.dali as dali

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("Critical error in pipeline:\nError in GPU operator `nvidia.dali.fn.crop_mirror_normalize`"
                           "\nencountered:\n\nCUDA error: out of memory")

    def no_rescan(*args):
        raise AssertionError("rescanned the shards")
    monkeypatch.setattr(dali, "DALIGenericIterator", out_of_memory)
    monkeypatch.setattr(dali.DaliLoader, "_diagnose", no_rescan)
    with pytest.raises(RuntimeError, match="out of memory"):
        list(make_loader(shards, "val", batch_size=16, backend="dali", num_threads=2))
    assert dali.dali_reason(RuntimeError("Critical error\nencountered:\n\nnvImageCodec failure: '#3'\nmore")) \
        == "nvImageCodec failure: '#3'"


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop must be"):
        make_loader("unused", "val", crop="left")
    with pytest.raises(ValueError, match="lighting and flips are training augmentations"):
        make_loader("unused", "val", crop="center", lighting=True)
    # one vocabulary for the normalization mode: the old booleans are not a mode
    for bad in (False, True, "standard"):
        with pytest.raises(ValueError, match="normalization must be one of mean, std, none or a Normalization"):
            make_loader("unused", "val", normalization=bad)


# ---------------------------------------------------------------- GPU (skipped without one)

@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu_pipeline(shards):
    for crop, split in (("random", "train"), ("center", "val"), ("ten", "val")):
        cpu = make_loader(shards, split, batch_size=32, crop=crop, device="cpu")
        gpu = make_loader(shards, split, batch_size=32, crop=crop, device="cuda")
        (xc, yc), (xg, yg) = next(iter(cpu)), next(iter(gpu))
        assert xg.is_cuda and yg.is_cuda and torch.equal(yc, yg.cpu())
        # nvJPEG's IDCT and upsampling may round differently from libjpeg-turbo's: DALI's own decoder
        # tests accept about one grey level on average (these are 0-255 units, normalization="mean")
        assert (xg.cpu() - xc).abs().mean() <= 1.0, crop


# ---------------------------------------------------------------- tools/show_batch.py

def test_show_batch_tiles_are_the_batch_as_the_model_sees_it(shards, decoded, tmp_path, capsys):
    from tools import show_batch
    pca = pca_of(shards)
    names = [c["name"] for c in load_manifest(shards)["classes"]]
    imgs, labels = decoded["val"]
    tiles = show_batch.batch_tiles(shards, "val", "center", batch_size=4)
    for j, (tile, caption) in enumerate(tiles):  # val: source order, so shard 0's first four
        assert np.abs(tile.astype(int) - imgs[0][j][16:240, 16:240]).max() <= 1
        assert caption.splitlines() == [names[labels[0][j]], "crop (16, 16)"]
    # random crops: de-normalized, they are the pixels plus the lighting, at the caption's offset
    norm = Normalization.from_pca(pca, "mean", train_scale=1 / 1.1)
    tiles = show_batch.batch_tiles(shards, "train", "random", batch_size=6, norm=norm)
    loader = make_loader(shards, "train", batch_size=6, num_threads=2)
    p = plan.batch_params(0, 0, 0, 0, 6)
    train_imgs, train_labels = decoded["train"]
    for j, ((s, i), (tile, caption)) in enumerate(zip(loader._order(0)[:6], tiles)):
        left, top = round(32 * float(p.crop_x[j])), round(32 * float(p.crop_y[j]))
        light = reference.lighting(p.alpha[j], pca)
        expected = np.clip(reference.augment(train_imgs[s][i], left, top, bool(p.flip[j]), light, "none", pca), 0, 255)
        assert np.abs(tile.astype(float) - expected.transpose(1, 2, 0)).max() <= 1.0
        lines = caption.splitlines()
        assert lines[0] == names[train_labels[s][i]] and lines[1].startswith(f"crop ({left}, {top})")
        assert lines[1].endswith(" flip") == bool(p.flip[j])
        assert lines[2] == "light (" + ", ".join(f"{v:+.1f}" for v in light) + ")"
    out = str(tmp_path / "grid.png")
    assert show_batch.main([shards, out, "--exaggerate", "5"]) == 0
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n" and "16 tiles" in capsys.readouterr().out
    no_pca = _copy(shards, tmp_path)
    os.remove(os.path.join(no_pca, "pca.json"))
    assert show_batch.main([no_pca, str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pca.json: missing" in err[0] and not os.path.exists(tmp_path / "x.png")


@pytest.mark.parametrize("side, positions", [
    (224, [(0, 0), (32, 0), (0, 32), (32, 32), (16, 16)]),   # corners at 0 and 256 - 224 = 32, centre at 16
    (227, [(0, 0), (29, 0), (0, 29), (29, 29), (15, 15)])])  # 256 - 227 = 29; the centre's 14.5 rounds to 15
@pytest.mark.parametrize("backend", BACKENDS)
def test_ten_crops_and_centre_crop_of_a_coordinate_image(tmp_path, backend, side, positions):
    """One 256 x 256 image whose red channel is x and green is y (0-255), through make_shards (q95)
    and the loader: each crop's corner pixels name where the crop was taken, and the mirrored
    crops read x from right to left. Positions by hand."""
    from tools import compute_pca, make_shards
    src = tmp_path / "src"
    for split in ("train", "val"):
        (src / split / "n00000001").mkdir(parents=True)
    yy, xx = np.mgrid[0:256, 0:256]
    img = Image.fromarray(np.stack([xx, yy, np.full_like(xx, 128)], -1).astype(np.uint8))
    img.save(src / "train" / "n00000001" / "n00000001_1.JPEG", "PNG")  # a PNG named .JPEG, as ImageNet has
    img.save(src / "val" / "n00000001" / "ILSVRC2012_val_00000001.JPEG", "PNG")
    out = str(tmp_path / "shards")
    assert make_shards.main([str(src), out, "--quality", "95", "--workers", "1"]) == 0
    assert compute_pca.main([out, "--quiet"]) == 0
    for crop, where in (("ten", positions), ("center", positions[4:])):
        x, _ = next(iter(make_loader(out, "val", batch_size=1, crop=crop, normalization="none", backend=backend,
                                     num_threads=1, crop_size=side)))
        crops = x[0].numpy() if crop == "ten" else x.numpy()
        assert len(crops) == (10 if crop == "ten" else 1)
        for k, c in enumerate(crops):
            left, top = where[k % 5]
            mirrored = k >= 5
            red, green = c[0], c[1]
            assert red.shape == (side, side)
            first_col, last_col = (left + side - 1, left) if mirrored else (left, left + side - 1)
            assert abs(red[:, 0].mean() - first_col) < 3 and abs(red[:, -1].mean() - last_col) < 3, (crop, k)
            assert abs(green[0].mean() - top) < 3 and abs(green[-1].mean() - (top + side - 1)) < 3, (crop, k)


def test_a_rotated_index_label_column_is_refused(shards, tmp_path):
    """The .idx files carry no checksum: rotating the .cls offsets of a val index by one sample used
    to give every image its neighbour's label (exit 0). The DALI loader checks each entry against the
    verified tar's own headers and names the shard."""
    out = _copy(shards, tmp_path)
    idx = os.path.join(out, "val-000000.idx")
    header, *lines = open(idx).read().splitlines()
    rows = [line.split() for line in lines]
    cls = [(r[5], r[6]) for r in rows]  # "jpg off size name cls off size name ...": the cls offset and size
    for r, (off, size) in zip(rows, cls[1:] + cls[:1]):
        r[5], r[6] = off, size
    open(idx, "w").write("\n".join([header, *(" ".join(r) for r in rows)]) + "\n")
    loader = make_loader(out, "val", batch_size=16, backend="dali", num_threads=2)
    with pytest.raises(ShardError, match=r"val-000000\.tar: its \.idx does not match the shard at sample "):
        next(iter(loader))


@pytest.mark.parametrize("args, needle", [
    (["--exaggerate", "nan"], "--exaggerate a finite number >= 0"),
    (["OUT_IN_MISSING_DIR"], "b.png: its directory"),
    (["--seed", "-1"], "--seed must be in [0, 2^63)"),
])
def test_show_batch_refuses_before_drawing(shards, tmp_path, capsys, args, needle):
    from tools import show_batch
    out = str(tmp_path / "no" / "dir" / "b.png") if args == ["OUT_IN_MISSING_DIR"] else str(tmp_path / "b.png")
    with pytest.raises(SystemExit) as e:
        show_batch.main([shards, out, *[a for a in args if a != "OUT_IN_MISSING_DIR"]])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not os.path.exists(out)


def test_show_batch_on_a_missing_directory_does_not_advise_compute_pca(tmp_path, capsys):
    from tools import show_batch
    assert show_batch.main([str(tmp_path / "nowhere"), str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"show_batch: {tmp_path / 'nowhere'}: no such shard directory"]


@pytest.mark.parametrize("backend", ["dali", "wds", "synthetic"])
def test_every_backend_satisfies_the_loader_protocol(shards, backend):
    from pipeline.loader import Loader
    loader = make_loader(shards, "val", batch_size=8, backend=backend, verify=False)
    assert isinstance(loader, Loader)
    assert len(loader) == -(-loader.num_samples // 8) and loader.manifest["format_version"] == 1
    assert (loader.epoch, loader.batch) == (0, 0) and len(loader.classes) == 10


def test_training_and_centre_crops_decode_only_the_crop(shards, monkeypatch):
    """The DALI graph asks the decoder for the 224 region (fn.decoders.image_crop) for random and centre
    crops, and for the whole image only for the ten crops (which cover it); the crop oracles above
    check the pixels."""
    from nvidia.dali import fn
    calls = []
    for name in ("image", "image_crop"):
        original = getattr(fn.decoders, name)

        def record(*args, _name=name, _original=original, **kw):
            calls.append((_name, kw.get("crop")))
            return _original(*args, **kw)
        monkeypatch.setattr(fn.decoders, name, record)
    seen = {}
    for crop in ("random", "center", "ten"):
        calls.clear()
        split = "train" if crop == "random" else "val"
        next(iter(make_loader(shards, split, batch_size=4, crop=crop, backend="dali", num_threads=2)))
        seen[crop] = list(calls)
    assert seen["random"] == [("image_crop", (224, 224))]
    assert seen["center"] == [("image_crop", (224, 224))]
    assert seen["ten"] == [("image", None)]


def test_a_loader_keeps_a_few_shards_open_and_parses_indexes_as_it_reads(sources, tmp_path, monkeypatch):
    """At 1,252 shards the DALI loader held a mapping (a file descriptor) per shard it had read, past the usual
    limit of 1,024 open files within an epoch, and every loader parsed every .idx before its first batch
    (seconds at 1,252 shards, a minute at Fall 2011's 13,900, and hundreds of bytes an image kept). 20 shards
    here: an epoch leaves at most 8 mapped and 8 parsed, and a loader parses none before it reads."""
    from conftest import build_shards
    from pipeline import loader as loader_module
    root = sources["folder"][0]
    out = str(tmp_path / "small-shards")
    assert build_shards(root, out, "--shard-samples", "2") == 0
    parsed = []
    real = loader_module.read_index
    monkeypatch.setattr(loader_module, "read_index", lambda path: (parsed.append(path), real(path))[1])
    fds = len(os.listdir("/proc/self/fd"))
    for backend in BACKENDS:
        parsed.clear()
        ld = make_loader(out, "train", batch_size=4, backend=backend, normalization=Normalization(mode="none"),
                         lighting=False,
                         num_threads=1, verify=False)
        assert len(ld.shards) == 20 and parsed == []
        assert sum(len(y) for _, y in ld) == 40
        assert len(ld._entries) <= 8
        if backend == "dali":
            assert len(ld._maps) <= 8 and len(parsed) >= 20  # each shard parsed once it was read
            assert len(os.listdir("/proc/self/fd")) - fds < 20
        del ld
