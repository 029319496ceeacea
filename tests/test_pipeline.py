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

from conftest import tarfile_samples
from pipeline import make_loader, plan
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


def reference_batches(loader, decoded, epoch: int):
    """What the loader must yield in `epoch`, computed from plan.py and the numpy reference."""
    cfg = loader.cfg
    imgs, labels = decoded[cfg.split]
    order = loader._order(epoch)
    mean, std = loader.norm_params()
    for b in range(len(loader)):
        pairs = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
        if cfg.crop == "random":
            p = loader.params(epoch, b)
            offsets = loader.lighting_offsets(p)
            x = [plan.reference_augment(imgs[s][i], p.crop_x[j], p.crop_y[j], bool(p.flip[j]) and cfg.flip,
                                        offsets[j], mean, std) for j, (s, i) in enumerate(pairs)]
        elif cfg.crop == "center":
            x = [plan.reference_augment(imgs[s][i], 0.5, 0.5, False, np.zeros(3), mean, std) for s, i in pairs]
        else:
            x = [plan.reference_ten_crop(imgs[s][i], mean, std) for s, i in pairs]
        yield np.stack(x), np.array([labels[s][i] for s, i in pairs])


def assert_matches_reference(loader, decoded, epoch=0, max_batches=3):
    ref = reference_batches(loader, decoded, epoch)
    loader.set_epoch(epoch)
    n = 0
    for (x, y), (rx, ry) in zip(loader, ref):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        np.testing.assert_array_equal(y.cpu().numpy(), ry)
        # float32 against float64: 0-255 units agree to ~1e-4, normalized ones to ~1e-5
        tol = 5e-5 if loader.cfg.normalize in (True, "std") else 2e-3
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


def test_flip_rate_is_one_half():
    flips = np.concatenate([plan.batch_params(3, 1, 0, b, 128).flip for b in range(100)])
    assert set(np.unique(flips)) == {0, 1}
    assert abs(flips.mean() - 0.5) < 4 * 0.5 / np.sqrt(len(flips))


def test_lighting_offsets_have_the_papers_covariance(shards):
    pca = json.load(open(os.path.join(shards, "pca.json")))
    lam, vec = np.array(pca["eigenvalues"]), np.array(pca["eigenvectors"])
    alpha = np.concatenate([plan.batch_params(0, 0, 0, b, 128).alpha for b in range(300)])
    assert abs(alpha.std() - plan.LIGHTING_STD) < 0.003 and abs(alpha.mean()) < 0.003
    delta = plan.lighting_offset(alpha, lam, vec)
    expected = sum((0.1 * lam[i]) ** 2 * np.outer(vec[i], vec[i]) for i in range(3))
    np.testing.assert_allclose(np.cov(delta, rowvar=False), expected, rtol=0.06, atol=0.03 * expected.max())


def test_reference_augment_on_a_known_array():
    img = np.arange(256 * 256 * 3, dtype=np.int64).reshape(256, 256, 3) % 251
    img = img.astype(np.uint8)
    out = plan.reference_augment(img, 5 / 32, 32 / 32, True, np.array([0.01, 0, -0.01]), None, None)
    expect = img[32:256, 5:229][:, ::-1].astype(np.float64) + np.array([2.55, 0, -2.55])
    np.testing.assert_allclose(out, expect.transpose(2, 0, 1))
    ten = plan.reference_ten_crop(img, np.array([0.5] * 3), np.array([0.25] * 3))
    assert ten.shape == (10, 3, 224, 224)
    np.testing.assert_allclose(ten[1], (img[0:224, 32:256].transpose(2, 0, 1) - 127.5) / 63.75)  # top right
    np.testing.assert_allclose(ten[9], ten[4][:, :, ::-1])  # mirrored centre


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

@pytest.mark.parametrize("backend", BACKENDS)
def test_train_batches_match_reference(shards, decoded, backend):
    loader = make_loader(shards, "train", batch_size=16, backend=backend, seed=7, num_threads=2)
    assert_matches_reference(loader, decoded, epoch=0)
    assert_matches_reference(loader, decoded, epoch=3, max_batches=1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unnormalized_output_is_in_0_255_units(shards, decoded, backend):
    loader = make_loader(shards, "train", batch_size=8, backend=backend, normalize=False, lighting=False,
                         num_threads=2)
    assert_matches_reference(loader, decoded, max_batches=2)
    x, _ = next(iter(loader))
    assert x.min() >= 0 and x.max() <= 255 and x.max() > 200


@pytest.mark.parametrize("backend", BACKENDS)
def test_mean_only_normalization_is_the_papers(shards, decoded, backend):
    """normalize="mean": x - 255 * mean in 0-255 units, no division (paper, section 2)."""
    loader = make_loader(shards, "train", batch_size=8, backend=backend, normalize="mean", num_threads=2)
    assert_matches_reference(loader, decoded, max_batches=1)
    x, _ = next(iter(make_loader(shards, "val", batch_size=8, backend=backend, normalize="mean", num_threads=2)))
    assert 30 < x.std() < 120 and abs(x.mean()) < 30


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("crop", ["center", "ten"])
def test_eval_crops_match_reference(shards, decoded, backend, crop):
    loader = make_loader(shards, "val", batch_size=8, backend=backend, crop=crop, num_threads=2)
    x, _ = next(iter(loader))
    assert tuple(x.shape) == ((8, 3, 224, 224) if crop == "center" else (8, 10, 3, 224, 224))
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
    with open(path, "r+b") as f:  # keep the SOI marker, destroy the rest of the JPEG header
        f.seek(off + 2)
        f.write(b"\x00" * 200)
    m = json.load(open(os.path.join(out, "dataset.json")))
    m["splits"]["val"]["shards"][1]["sha256"] = sha256_file(path)
    atomic_write(os.path.join(out, "dataset.json"), json.dumps(m).encode())
    loader = make_loader(out, "val", batch_size=16, backend=backend, num_threads=2)
    with pytest.raises(ShardError, match=rf"val-000001\.tar: sample {entry.key} is corrupt"):
        list(loader)


def test_bad_arguments():
    with pytest.raises(ValueError, match="crop must be"):
        make_loader("unused", "val", crop="left")
    with pytest.raises(ValueError, match="lighting and flips are training augmentations"):
        make_loader("unused", "val", crop="center", lighting=True)


# ---------------------------------------------------------------- GPU (skipped without one)

@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu_pipeline(shards):
    for crop, split in (("random", "train"), ("center", "val"), ("ten", "val")):
        cpu = make_loader(shards, split, batch_size=32, crop=crop, device="cpu")
        gpu = make_loader(shards, split, batch_size=32, crop=crop, device="cuda")
        (xc, yc), (xg, yg) = next(iter(cpu)), next(iter(gpu))
        assert xg.is_cuda and yg.is_cuda and torch.equal(yc, yg.cpu())
        # nvJPEG's IDCT differs from libjpeg-turbo's by a few 0-255 levels at most
        assert (xg.cpu() - xc).abs().mean() < 0.02, crop
