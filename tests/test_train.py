"""model/train.py, evaluate.py, predict.py end to end on tiny generated shards (CPU)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from model import evaluate, predict, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--batch-size", "8", "--init", "kaiming", "--loader-threads", "2", "--devices", "cpu"]


def run_args(shards, out, *extra):
    return ["--shards", shards, "--out", out, *TINY, *extra]


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    assert train.main(run_args(tiny_shards, out, "--epochs", "2", "--log-every", "2")) == 0
    return out


def test_run_leaves_its_evidence(finished_run, tiny_shards):
    out = finished_run
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "metrics.jsonl", "plot.png"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["config"]["batch_size"] == 8 and cfg["config"]["lr"] == 0.01 and cfg["commit"]
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in lines if r["kind"] == "step"]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8] and [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        for k in ("epoch", "step", "lr", "train_loss", "val_loss", "val_top1_error", "val_top5_error", "images_per_s"):
            assert isinstance(r[k], (int, float)), k
        assert r["train_samples"] == 32 and r["val_samples"] == 16
    assert open(os.path.join(out, "plot.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    for k in ("model", "optimizer", "scheduler", "epoch", "step", "loader", "config", "classes"):
        assert k in ckpt
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8 and ckpt["loader"] == {**ckpt["loader"], "epoch": 2, "batch": 0}
    assert len(ckpt["classes"]) == 4 and set(ckpt["optimizer"]["momentum"]) == set(ckpt["model"])


def test_evaluate_and_predict(finished_run, tiny_shards, capsys, tmp_path):
    ckpt = os.path.join(finished_run, "checkpoint.pt")
    report = str(tmp_path / "eval.json")
    assert evaluate.main(["--checkpoint", ckpt, "--shards", tiny_shards, "--devices", "cpu", "--json", report]) == 0
    center = json.load(open(report))
    last = [json.loads(x) for x in open(os.path.join(finished_run, "metrics.jsonl"))][-1]
    assert center["val_top1_error"] == pytest.approx(last["val_top1_error"])  # the same number as the run's
    assert evaluate.main(["--checkpoint", ckpt, "--shards", tiny_shards, "--devices", "cpu", "--ten-crop"]) == 0
    assert "ten crop, 16 val images" in capsys.readouterr().out
    from PIL import Image
    img_path = str(tmp_path / "x.jpg")
    Image.new("RGB", (300, 200), (200, 30, 30)).save(img_path)
    assert predict.main(["--checkpoint", ckpt, img_path]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == img_path and len(out) == 5 and all("%" in line for line in out[1:])
    probs = [float(line.split("%")[0]) for line in out[1:]]
    assert probs == sorted(probs, reverse=True) and 99.0 < sum(probs) <= 100.01


def _train_cmd(shards, out):
    return [sys.executable, "-m", "model.train", *run_args(shards, out, "--epochs", "2", "--checkpoint-minutes", "0",
                                                              "--log-every", "1")]


@pytest.mark.slow
def test_sigkill_and_resume_end_with_bitwise_the_same_weights(tiny_shards, tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(_train_cmd(tiny_shards, ref), check=True, capture_output=True, cwd=REPO)
    proc = subprocess.Popen(_train_cmd(tiny_shards, killed), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = os.path.join(killed, "checkpoint.pt")
    deadline = time.time() + 120
    while time.time() < deadline and not os.path.exists(ckpt):
        time.sleep(0.05)
    time.sleep(1.5)  # somewhere in the middle: a step, a checkpoint being written, an evaluation
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(ckpt, weights_only=False)
    assert state["step"] < 8, "the run finished before the kill; nothing was tested"
    r = subprocess.run(_train_cmd(tiny_shards, killed) + ["--resume"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    a = torch.load(os.path.join(ref, "checkpoint.pt"), weights_only=False)
    b = torch.load(ckpt, weights_only=False)
    assert a["step"] == b["step"] == 8
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["optimizer"]["momentum"][k], b["optimizer"]["momentum"][k]), k
    # the resumed run's metrics have each epoch once, like the uninterrupted one's
    records = [json.loads(x) for x in open(os.path.join(killed, "metrics.jsonl"))]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [0, 1]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 9))


@pytest.mark.slow
def test_ddp_two_gloo_processes(tiny_shards, tmp_path):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "model.train", *run_args(tiny_shards, out, "--epochs", "1", "--log-every", "1")]
    cmd[cmd.index("--loader-threads") + 1] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(os.path.join(out, "config.json")))["world_size"] == 2
    epoch = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))][-1]
    # 32 images over 2 ranks at 4 per rank and step: 4 steps, every image read once
    assert epoch["step"] == 4 and epoch["train_samples"] == 32 and epoch["val_samples"] == 16


@pytest.mark.parametrize("case", ["no_shards", "no_pca", "no_gpu", "indivisible", "existing", "other_options"])
def test_bad_input_one_line_nothing_overwritten(tiny_shards, finished_run, tmp_path, capsys, monkeypatch, case):
    out, shards, extra = str(tmp_path / "out"), tiny_shards, []
    if case == "no_shards":
        shards, needle = str(tmp_path / "nowhere"), "no such shard directory"
    elif case == "no_pca":
        shards = str(tmp_path / "s")
        shutil.copytree(tiny_shards, shards)
        os.remove(os.path.join(shards, "pca.json"))
        needle = "pca.json: missing"
    elif case == "no_gpu":
        extra, needle = ["--devices", "cuda:7"], "cuda:7 does not exist"
    elif case == "indivisible":
        monkeypatch.setenv("WORLD_SIZE", "3")
        needle = "--batch-size 8 is not divisible across 3 ranks"
    elif case in ("existing", "other_options"):
        out = str(tmp_path / "copy")
        shutil.copytree(finished_run, out)
        extra = ["--resume", "--lr", "0.1"] if case == "other_options" else []
        needle = "pass --resume" if case == "existing" else "was made with other options (lr)"
    before = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} if os.path.isdir(out) else {}
    capsys.readouterr()
    assert train.main(run_args(shards, out, "--epochs", "1", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    after = {f: open(os.path.join(out, f), "rb").read() for f in os.listdir(out)} if os.path.isdir(out) else {}
    assert after == before


def test_checkpoint_of_other_class_count_is_refused(finished_run, shards, capsys):
    ckpt = os.path.join(finished_run, "checkpoint.pt")
    assert evaluate.main(["--checkpoint", ckpt, "--shards", shards, "--devices", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has 4 classes, the shards have 10" in err[0]
