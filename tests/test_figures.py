"""The paper's figures from a checkpoint (section 6.1): show_filters (figure 3), show_predictions and
neighbours (figure 4). Oracles by hand: colour shares of kernels set by hand, top-5 lists of hand-built
probabilities, nearest neighbours by brute force in float64."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from model import checkpoint, train
from tools import neighbours, show_filters, show_predictions


@pytest.fixture(scope="module")
def small_run(tiny_shards, tmp_path_factory):
    """A checkpoint of 1 epoch at width 1/8 on the tiny shards (4 classes)."""
    out = str(tmp_path_factory.mktemp("figures") / "run")
    assert train.main(["--shards", tiny_shards, "--out", out, "--epochs", "1", "--batch-size", "8",
                       "--loader-threads", "2", "--devices", "cpu", "--width", "0.125"]) == 0
    return os.path.join(out, "checkpoint.pt")


def _resealed(ckpt: dict, path: str) -> str:
    ckpt["digest"] = checkpoint.checkpoint_digest(ckpt)
    torch.save(ckpt, path)
    return path


def test_colour_share_by_hand():
    g = np.random.default_rng(0).normal(size=(11, 11))
    grey = np.stack([g, g, g])[None]                     # R = G = B: luminance only
    red = np.stack([g, 0 * g, 0 * g])[None]              # one channel: 2/3 of its energy off the grey axis
    opponent = np.stack([g, -g, 0 * g])[None]            # R - G: mean 0, all of it off the axis
    np.testing.assert_allclose(show_filters.colour_share(np.concatenate([grey, red, opponent])), [0, 2 / 3, 1],
                               atol=1e-12)
    assert show_filters.colour_share(5 * red)[0] == pytest.approx(2 / 3)  # scale-free


def test_show_filters_orders_the_halves_by_colour(small_run, tmp_path, capsys):
    """The paper's size (96 kernels): half 1 set grey, half 2 set to single-channel colours by hand; the
    printed shares are 0 and 2/3, and the PNG is the figure's size."""
    from model.alexnet import AlexNet, AlexNetConfig
    ckpt = torch.load(small_run, weights_only=False)
    model = AlexNet(cfg=AlexNetConfig(num_classes=4)).state_dict()
    g = torch.randn(96, 1, 11, 11, dtype=torch.float64)
    conv1 = g.expand(96, 3, 11, 11).clone()
    for j in range(48, 96):  # the second half: one channel each (R, G, B in turn)
        conv1[j, [c for c in range(3) if c != j % 3]] = 0
    model["conv1.weight"] = conv1.float()
    ckpt["model"], ckpt["model_config"] = model, {**ckpt["model_config"], "width": 1.0}
    path = _resealed(ckpt, str(tmp_path / "set.pt"))
    out = str(tmp_path / "filters.png")
    assert show_filters.main([path, out]) == 0
    printed = capsys.readouterr().out
    assert "half 1 (GPU 1): mean colour share 0.000" in printed
    assert "half 2 (GPU 2): mean colour share 0.667" in printed
    # figsize (2 * 8 * 0.62 + 0.6, 6 * 0.62 + 1.0) inches at 90 dpi: 946.8 x 424.8 pixels
    width, height = Image.open(out).size
    assert abs(width - 946.8) < 1 and abs(height - 424.8) < 1


def test_top5_rows_by_hand():
    names = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
    probs = np.array([[0.05, 0.40, 0.10, 0.20, 0.15, 0.06, 0.04],    # true: dog, 2nd
                      [0.70, 0.01, 0.02, 0.03, 0.04, 0.05, 0.15],    # true: ant, 1st
                      [0.30, 0.25, 0.20, 0.15, 0.06, 0.03, 0.01]])   # true: gnu, not in the five
    rows = show_predictions.top5_rows(probs, np.array([3, 0, 6]), names)
    assert [r["true"] for r in rows] == ["dog", "ant", "gnu"]
    assert [n for n, _ in rows[0]["top5"]] == ["bee", "dog", "eel", "cat", "fox"] and rows[0]["true_rank"] == 1
    assert [n for n, _ in rows[1]["top5"]] == ["ant", "gnu", "fox", "eel", "dog"] and rows[1]["true_rank"] == 0
    assert [p for _, p in rows[2]["top5"]] == [0.30, 0.25, 0.20, 0.15, 0.06] and rows[2]["true_rank"] is None


def test_show_predictions_draws_the_first_val_images(small_run, tiny_shards, tmp_path, capsys):
    out = str(tmp_path / "pred.png")
    assert show_predictions.main([small_run, tiny_shards, out, "--n", "4"]) == 0
    assert Image.open(out).format == "PNG" and "of 4 top-1 right" in capsys.readouterr().out


def test_nearest_in_blocks_is_brute_force():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(203, 16)).astype(np.float16)
    queries = rng.normal(size=(5, 16)).astype(np.float32)
    d = ((queries[:, None, :].astype(np.float64) - feats[None].astype(np.float64)) ** 2).sum(-1)
    order = np.argsort(d, 1)[:, :4]
    gaps = np.diff(np.sort(d, 1)[:, :5], axis=1)
    # float32 distances are good to ~1e-7 of their size: gaps 100x that leave the order defined
    assert gaps.min() > 1e-5 * d.max(), "near-ties in the data: the order would not be defined"
    dist, idx = neighbours.nearest(torch.from_numpy(queries), feats, k=4, block=37)  # 6 blocks, the last partial
    np.testing.assert_array_equal(idx.numpy(), order)
    np.testing.assert_allclose(dist.numpy(), np.take_along_axis(d, order, 1), rtol=1e-4)


def test_features_are_stored_reused_and_rebuilt(small_run, tiny_shards, tmp_path, capsys):
    feats = str(tmp_path / "fc7.f16")
    args = [tiny_shards, str(tmp_path / "nn.png"), "--queries", "2", "--k", "3", "--max-train", "20",
            "--features", feats]
    assert neighbours.main([small_run, *args]) == 0
    err = capsys.readouterr().err
    assert "20 x 512 x 2 bytes" in err and "reusing" not in err
    header = neighbours.read_header(feats)
    assert header["count"] == 20 and header["checkpoint_digest"] == torch.load(small_run, weights_only=False)["digest"]
    assert os.path.getsize(feats) == neighbours.HEADER_BYTES + 20 * 512 * 2
    stored = np.array(neighbours.open_features(feats, header))
    assert neighbours.main([small_run, *args]) == 0
    assert "reusing" in capsys.readouterr().err
    # 4,000 bytes of rows overwritten (the header intact): found by the rows' sha256, made again, as before
    with open(feats, "r+b") as f:
        f.seek(neighbours.HEADER_BYTES + 1000)
        f.write(b"\x7f" * 4000)
    assert neighbours.main([small_run, *args]) == 0
    assert "rebuilding: its rows do not match their sha256: damaged" in capsys.readouterr().err
    np.testing.assert_array_equal(np.array(neighbours.open_features(feats, neighbours.read_header(feats))), stored)
    # another checkpoint (one weight changed): the features are made again, and differ
    ckpt = torch.load(small_run, weights_only=False)
    ckpt["model"]["fc7.weight"][0] += 1.0
    other = _resealed(ckpt, str(tmp_path / "other.pt"))
    assert neighbours.main([other, *args]) == 0
    assert "rebuilding" in capsys.readouterr().err
    assert neighbours.read_header(feats)["checkpoint_digest"] == ckpt["digest"]
    assert not np.array_equal(np.array(neighbours.open_features(feats, neighbours.read_header(feats))), stored)
    assert Image.open(tmp_path / "nn.png").format == "PNG"


@pytest.mark.parametrize("tool, case", [(t, c) for t in ("show_filters", "show_predictions", "neighbours")
                                        for c in ("corrupt", "other_classes", "unwritable")
                                        if (t, c) != ("show_filters", "other_classes")])  # it reads no shards
def test_figure_tools_refuse_in_one_line(tool, case, small_run, tiny_shards, shards, tmp_path, capsys):
    module = {"show_filters": show_filters, "show_predictions": show_predictions, "neighbours": neighbours}[tool]
    ckpt, data, out = small_run, tiny_shards, str(tmp_path / "x.png")
    if case == "corrupt":
        ckpt = str(tmp_path / "bad.pt")
        blob = bytearray(open(small_run, "rb").read())
        blob[len(blob) // 2] ^= 0xFF
        open(ckpt, "wb").write(blob)
    elif case == "other_classes":
        data = shards  # 10 classes against the checkpoint's 4
    else:
        out = str(tmp_path / "missing" / "x.png")
    argv = [ckpt, out] if tool == "show_filters" else [ckpt, data, out]
    assert module.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{tool}: ")]
    needle = {"corrupt": "bad.pt", "other_classes": "has 4 classes, the shards have 10",
              "unwritable": "does not exist"}[case]
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(out)


def test_the_figure_shows_the_queried_images_with_their_classes(small_run, tiny_shards, tmp_path, monkeypatch):
    """Each row's query image is the val image its class names: the first val images of the shard, read
    here with the standard library's tarfile and PIL, centre-cropped (a figure once showed the second
    batch's images beside the first batch's labels and neighbours)."""
    import io
    import json as json_
    from conftest import tarfile_samples
    drawn = {}
    monkeypatch.setattr(neighbours, "draw", lambda rows, path, title: drawn.setdefault("rows", rows))
    assert neighbours.main([small_run, tiny_shards, str(tmp_path / "nn.png"), "--queries", "5", "--k", "2",
                            "--features", str(tmp_path / "f.f16")]) == 0
    manifest = json_.load(open(os.path.join(tiny_shards, "dataset.json")))
    names = [c["name"] for c in manifest["classes"]]
    first_shard = os.path.join(tiny_shards, manifest["splits"]["val"]["shards"][0]["file"])
    for (query, caption, _), (_, sample) in zip(drawn["rows"], tarfile_samples(first_shard)):
        image = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"), np.float64)[16:240, 16:240]
        assert caption == names[int(sample["cls"])]
        assert np.abs(query.astype(np.float64) - image).mean() < 2.0  # two JPEG decoders, ~1 grey level apart
    assert len(drawn["rows"]) == 5


def _flipped_shards(tiny_shards: str, tmp_path, split: str) -> str:
    """A copy of the tiny shards with one byte of a shard flipped (its sha256 then differs)."""
    import shutil
    out = str(tmp_path / f"flipped-{split}")
    shutil.copytree(tiny_shards, out)
    path = os.path.join(out, f"{split}-000000.tar")
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    return out


@pytest.mark.parametrize("tool", ["show_predictions", "neighbours"])
def test_a_damaged_shard_met_mid_work_is_one_line(small_run, tiny_shards, tmp_path, capsys, tool):
    """It was a ShardError traceback of ~60 lines (evaluate and show_batch gave one line)."""
    split = "val" if tool == "show_predictions" else "train"
    shards = _flipped_shards(tiny_shards, tmp_path, split)
    main = {"show_predictions": show_predictions.main, "neighbours": neighbours.main}[tool]
    args = [small_run, shards, str(tmp_path / "x.png")]
    if tool == "neighbours":
        args += ["--features", str(tmp_path / "f.f16")]
    assert main(args) == 1
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if f"{split}-000000.tar" in line]
    assert "Traceback" not in stderr and len(err) == 1 and err[0].startswith(f"{tool}: ") and "sha256" in err[0], err
    assert not os.path.exists(str(tmp_path / "x.png"))


def test_show_filters_writes_the_format_its_file_names(small_run, tmp_path):
    """out.jpg used to get PNG bytes under its name."""
    for name, magic in (("f.jpg", b"\xff\xd8\xff"), ("f.png", b"\x89PNG")):
        out = str(tmp_path / name)
        assert show_filters.main([small_run, out]) == 0
        assert open(out, "rb").read(len(magic)) == magic, name
    assert show_filters.main([small_run, str(tmp_path / "f.xyz")]) == 2


def test_figure_and_json_outputs_on_a_read_only_mount_are_refused_before_the_work(small_run, tiny_shards,
                                                                                     small_filesystem, capsys):
    """On a read-only filesystem even root cannot write: asked first, by a real write, not after an
    evaluation or a drawing (os.access says yes to root there)."""
    from conftest import make_read_only
    from model import evaluate
    from tools import show_batch
    make_read_only(small_filesystem)
    assert evaluate.main(["--checkpoint", small_run, "--shards", tiny_shards, "--devices", "cpu",
                          "--json", os.path.join(small_filesystem, "x.json")]) == 2
    captured = capsys.readouterr()
    assert "cannot write there (Read-only file system)" in captured.err and "val images" not in captured.out
    with pytest.raises(SystemExit) as e:
        show_batch.main([tiny_shards, os.path.join(small_filesystem, "x.png")])
    assert e.value.code == 2 and "(Read-only file system)" in capsys.readouterr().err
    assert show_predictions.main([small_run, tiny_shards, os.path.join(small_filesystem, "x.png")]) == 2
    assert "(Read-only file system)" in capsys.readouterr().err


@pytest.mark.parametrize("stop, status, said", [(KeyboardInterrupt, 130, "interrupted"),
                                                ("terminated", 143, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_during_evaluate_is_one_line_and_not_exit_0(small_run, tiny_shards, tmp_path, capsys,
                                                                      monkeypatch, stop, status, said):
    from model import errors, evaluate
    exc = errors.Terminated if stop == "terminated" else KeyboardInterrupt

    def interrupted(*args, **kwargs):
        raise exc()
        yield  # a generator, as batch_probs is

    monkeypatch.setattr(evaluate, "batch_probs", interrupted)
    report = str(tmp_path / "r.json")
    assert evaluate.main(["--checkpoint", small_run, "--shards", tiny_shards, "--devices", "cpu",
                          "--json", report]) == status
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [f"evaluate: {said}; no result written"], err
    assert not os.path.exists(report)
