"""model/train.py, evaluate.py, predict.py end to end on tiny generated shards (CPU)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from model import checkpoint, evaluate, evaluation, guards, options, predict, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# width 1/8: the trainer's mechanics at ~15x less compute a step (the full size is test_model's, and the
# full-disk test's, which needs the 460 MB checkpoint)
TINY = ["--batch-size", "8", "--loader-threads", "2", "--devices", "cpu", "--width", "0.125"]


def run_args(shards, out, *extra):
    return ["--shards", shards, "--out", out, *TINY, *extra]


def messages(stderr: str, prog: str) -> list[str]:
    """The program's own lines on stderr ('prog: ...'), without progress-bar redraws (which also start
    with a program-like name, and split into lines at their carriage returns)."""
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: ") and "%|" not in line]


@pytest.fixture(scope="module")
def finished_run(tiny_shards, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "r")
    assert train.main(run_args(tiny_shards, out, "--epochs", "2", "--log-every", "2")) == 0
    return out


def test_run_leaves_its_evidence(finished_run, tiny_shards):
    out = finished_run
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.json", "metrics.jsonl", "plot.png"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    # the paper's 0.01 at 128 images a step, kept per image at batch 8: 0.01 * 8 / 128
    assert cfg["recipe"]["name"] == "paper" and cfg["recipe"]["batch_size"] == 8 and cfg["recipe"]["lr"] == 0.000625
    assert cfg["lr"] == {"weights": 0.000625, "rule": "lr 0.000625 = 0.01 (recipe paper, at batch 128) x 8/128: "
                                                      "the same step per image at batch 8"}
    assert cfg["overridden"] == ["batch_size", "epochs", "width"] and cfg["commit"]
    assert cfg["normalization"]["mode"] == "mean" and cfg["normalization"]["train_scale"] == pytest.approx(1 / 1.1)
    lines = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in lines if r["kind"] == "step"]
    epochs = [r for r in lines if r["kind"] == "epoch"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8] and [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        for k in ("epoch", "step", "lr", "train_loss", "val_loss", "val_top1_error", "images_per_s"):
            assert isinstance(r[k], (int, float)), k
        assert r["val_top5_error"] is None  # 4 classes: n/a
        assert r["train_samples"] == 32 and r["val_samples"] == 16
    assert open(os.path.join(out, "plot.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    for k in ("model", "optimizer", "scheduler", "epoch", "step", "loader", "config", "classes", "recipe",
              "normalization", "dataset"):
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


def _train_cmd(shards, out, epochs=2):
    return [sys.executable, "-m", "model.train", *run_args(shards, out, "--epochs", str(epochs),
                                                              "--checkpoint-minutes", "0", "--log-every", "1")]


def default_signals() -> None:
    """In a child about to be signalled: SIGINT and SIGTERM as a terminal gives them. A suite started in
    the background by a shell without job control ignores SIGINT, and its children inherit that."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _wait_for_step(out: str, step: int, timeout: float = 120) -> None:
    """Returns once the run in `out` has logged `step` (every step is logged and checkpointed here)."""
    metrics, deadline = os.path.join(out, "metrics.jsonl"), time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(metrics) and f'"step": {step},' in open(metrics).read():
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached step {step}")


@pytest.mark.slow
def test_sigkill_and_resume_end_with_bitwise_the_same_weights(tiny_shards, tmp_path):
    ref, killed = str(tmp_path / "ref"), str(tmp_path / "killed")
    subprocess.run(_train_cmd(tiny_shards, ref), check=True, capture_output=True, cwd=REPO)
    proc = subprocess.Popen(_train_cmd(tiny_shards, killed), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpt = os.path.join(killed, "checkpoint.pt")
    _wait_for_step(killed, 3)  # then somewhere in the middle: a step, a checkpoint being written
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


@pytest.mark.slow
def test_two_nodes_end_with_the_weights_of_two_ranks_on_one(tiny_shards, tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 1 with a c10d rendezvous on localhost: two "nodes" as two
    torchrun processes, gloo on the CPU. The run finishes, and its weights are bitwise those of the same
    run as 2 ranks on one node (same seed, so the same data slices, dropout masks and sums).
    Bitwise needs the same intra-op thread count in every process: the CPU's convolutions sum in an order
    that depends on it. torchrun sets OMP_NUM_THREADS=1 only with --nproc_per_node > 1, so without the
    pin the one-node run computes with 1 thread and each "node" with all cores (on a 2-core machine the
    weights then differ in the last bits). The pin is the trainer's own flag, as a user would give it."""
    import socket
    runs = {}
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for name, launcher in [("one", ["--standalone", "--nproc_per_node", "2"]),
                           ("two", ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
                                    "--rdzv_endpoint", f"localhost:{port}", "--rdzv_id", "two-nodes-test"])]:
        out = str(tmp_path / name)
        cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "model.train",
               *run_args(tiny_shards, out, "--epochs", "1")]
        cmd[cmd.index("--loader-threads") + 1] = "1"
        cmd += ["--intra-op-threads", "1"]
        nodes = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2 if name == "two" else 1)]
        for node in nodes:
            _, err = node.communicate(timeout=600)
            assert node.returncode == 0, err[-3000:]
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["world_size"] == 2 and config["intra_op_threads"] == 1
        runs[name] = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert runs["one"]["step"] == runs["two"]["step"] == 4
    for k, v in runs["one"]["model"].items():
        assert torch.equal(v, runs["two"]["model"][k]), k


PCA_CASES = {  # pca.json edits, and the line that must name them
    "pca_huge": (lambda p: {**p, "eigenvalues": [1e30, 1.0, 0.5]}, "eigenvalues [1e+30, 1.0, 0.5] is out of range"),
    "pca_short": (lambda p: {**p, "mean": p["mean"][:2]}, "mean must be 3 numbers"),
    "pca_nan": (lambda p: {**p, "std": [float("nan"), 0.2, 0.2]}, "std [nan, 0.2, 0.2] is out of range"),
    "pca_other_set": (lambda p: {**p, "source": {"file": "dataset.json", "sha256": "0" * 64}},
                      "was computed from another shard set"),
}


@pytest.mark.parametrize("extra, said", [
    (["--batch-size", "16"], "(batch_size 8, now 16 (lr and lr_batch follow the batch))"),
    (["--batch-size", "16", "--lr", "0.000625"], "(batch_size 8, now 16 (lr_batch follows the batch))"),
    (["--batch-size", "16", "--lr", "0.5"], "(batch_size 8, now 16; lr 0.000625, now 0.5 (lr_batch follows the batch))")])
def test_a_resume_with_another_batch_names_what_the_user_changed(finished_run, tmp_path, tiny_shards, capsys, extra,
                                                                  said):
    """lr and lr_batch follow the batch by the recipe's rule: naming them as changed too (when --lr was given
    the same) sent users looking for a change they had not made."""
    out = str(tmp_path / "copy")
    shutil.copytree(finished_run, out)
    capsys.readouterr()
    assert train.main(run_args(tiny_shards, out, "--resume", *[a for a in extra if a != "--batch-size" and a != "16"],
                               "--batch-size", "16")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert len(err) == 1 and f"was made with other settings {said}; resume with the same ones" in err[0], err


@pytest.mark.parametrize("case", ["no_shards", "no_pca", "no_gpu", "indivisible", "existing", "other_options",
                                  "pca_truncated", "val_only", *PCA_CASES])
def test_bad_input_one_line_nothing_overwritten(tiny_shards, finished_run, tmp_path, capsys, monkeypatch, case):
    out, shards, extra = str(tmp_path / "out"), tiny_shards, []
    if case.startswith("pca") or case == "val_only":
        shards = str(tmp_path / "s")
        shutil.copytree(tiny_shards, shards)
        pca_path, manifest_path = os.path.join(shards, "pca.json"), os.path.join(shards, "dataset.json")
    if case in PCA_CASES:
        edit, needle = PCA_CASES[case]
        edited = json.dumps(edit(json.load(open(pca_path))))
        open(pca_path, "w").write(edited)
    elif case == "pca_truncated":
        text = open(pca_path).read()
        open(pca_path, "w").write(text[: len(text) // 2])
        needle = "pca.json: Expecting"
    elif case == "val_only":  # the advice used to be "run compute_pca", which needs a train split
        m = json.load(open(manifest_path))
        del m["splits"]["train"]
        open(manifest_path, "w").write(json.dumps(m))
        needle = "has no train split (made with --splits val)"
    elif case == "no_shards":
        shards, needle = str(tmp_path / "nowhere"), "no such shard directory"
    elif case == "no_pca":
        shards = str(tmp_path / "s")
        shutil.copytree(tiny_shards, shards)
        os.remove(os.path.join(shards, "pca.json"))
        needle = "pca.json: missing"
    elif case == "no_gpu":
        extra = ["--devices", "cuda:7"]
        needle = "cuda:7 does not exist" if torch.cuda.is_available() else "torch sees no CUDA GPU here"
    elif case == "indivisible":
        monkeypatch.setenv("WORLD_SIZE", "3")
        needle = "--batch-size 8 is not divisible across 3 ranks"
    elif case in ("existing", "other_options"):
        out = str(tmp_path / "copy")
        shutil.copytree(finished_run, out)
        extra = ["--resume", "--lr", "0.1"] if case == "other_options" else []
        needle = "pass --resume" if case == "existing" else "was made with other settings (lr 0.000625, now 0.1)"
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


@pytest.mark.parametrize("flag, local_world, expected", [([], "1", 3), ([], "2", 1), (["--intra-op-threads", "2"], "1", 2)])
def test_the_trainer_sets_its_intra_op_threads_whatever_the_launcher_left(tiny_shards, tmp_path, monkeypatch, capsys,
                                                                          flag, local_world, expected):
    """torchrun leaves OMP_NUM_THREADS=1 behind with several processes a node and nothing with one: the
    trainer overrides either. Here the launcher's leftover is 1 thread, the process may use 3 cores (faked
    affinity), and LOCAL_WORLD_SIZE is torchrun's processes on this node: 3 // 1 = 3, 3 // 2 = 1, or the flag."""
    from model import devices, optim
    monkeypatch.setattr(devices, "usable_cores", lambda: 3)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    seen, real_step = [], optim.train_step
    monkeypatch.setattr(train, "train_step", lambda *a, **k: (seen.append(torch.get_num_threads()), real_step(*a, **k))[1])
    caller = torch.get_num_threads()
    torch.set_num_threads(1)  # what torchrun's OMP_NUM_THREADS=1 gives a worker
    try:
        out = str(tmp_path / "r")
        assert train.main(run_args(tiny_shards, out, "--epochs", "1", "--no-checkpoints", *flag)) == 0
        assert torch.get_num_threads() == 1  # the caller's count is given back
    finally:
        torch.set_num_threads(caller)
    assert set(seen) == {expected}
    assert json.load(open(os.path.join(out, "config.json")))["intra_op_threads"] == expected
    assert f"{expected} intra-op thread(s) a process" in capsys.readouterr().out


@pytest.mark.parametrize("requested, cores, local_world, expected", [(0, 16, 8, 2), (0, 2, 2, 1), (0, 1, 4, 1),
                                                                       (0, 7, 2, 3), (5, 2, 2, 5)])
def test_intra_op_threads_are_the_process_share_of_the_cores(requested, cores, local_world, expected):
    from model.devices import intra_op_threads
    assert intra_op_threads(requested, cores, local_world)[0] == expected


def test_recipe_values_flags_override_and_config_records_all(tiny_shards, tmp_path):
    from model.recipes import RECIPES
    out = str(tmp_path / "caffe")
    assert train.main(run_args(tiny_shards, out, "--recipe", "caffe", "--epochs", "1", "--lr", "0.02")) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    expected = {**dataclasses.asdict(RECIPES["caffe"]), "lr": 0.02, "lr_batch": 8, "batch_size": 8, "epochs": 1,
                "width": 0.125}
    assert cfg["recipe"] == {"name": "caffe", **expected}
    assert cfg["lr"] == {"weights": 0.02, "rule": "lr 0.02 as given by --lr, at batch 8"}
    assert cfg["overridden"] == ["batch_size", "epochs", "lr", "width"]
    assert cfg["model"]["init"] == "caffe" and cfg["model"]["lrn_k"] == 1.0 and cfg["model"]["width"] == 0.125
    assert cfg["normalization"]["train_scale"] == 1.0  # no lighting in caffe's recipe, so no 1/1.1
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["optimizer"]["lr"] == [0.02, 0.04]  # weights, biases (x2) after the step schedule's epoch 0


def test_non_finite_loss_stops_at_once_and_keeps_the_last_good_checkpoint(tiny_shards, tmp_path, capsys):
    out = str(tmp_path / "nan")
    rc = train.main(run_args(tiny_shards, out, "--epochs", "3", "--lr", "1e4", "--checkpoint-minutes", "0",
                             "--log-every", "100", "--init", "kaiming", "--input-norm", "std"))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "the training loss is not finite at step" in err[-1] and "(lr 10000)" in err[-1], err[-3:]
    assert len(err[-1].split("train: ")) == 2  # one line of its own, not inside the progress bar
    bad_step = int(err[-1].split("at step ")[1].split()[0])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == bad_step - 1  # saved after every step, up to the last good one
    assert f"keeps the last good state (step {bad_step - 1})" in err[-1]
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_stall_warning_on_console_and_in_metrics(tiny_shards, tmp_path, capsys):
    assert guards.stall_warning(1.3863, 4, 2000, "paper", "paper") is not None  # ln 4 = 1.3863
    assert guards.stall_warning(1.3863 * 1.011, 4, 2000, "paper", "paper") is None  # beyond 1 %
    assert "--init caffe" in guards.stall_warning(6.9, 1000, 2000, "paper", "paper")
    out = str(tmp_path / "stall")
    # lr 1e-12: nothing moves; Caffe's init without dropout starts within 1 % of ln 4 on these shards
    assert train.main(run_args(tiny_shards, out, "--epochs", "1", "--lr", "1e-12", "--stall-steps", "2",
                               "--log-every", "2", "--init", "caffe", "--dropout", "0")) == 0
    err = capsys.readouterr().err
    records = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    warnings = [r for r in records if r["kind"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["step"] == 2 and "still at chance" in warnings[0]["message"]
    assert "warning: train loss" in err and "--init cuda-convnet2" in warnings[0]["message"]  # inits that learn
    assert "% of fc7's units are dead" in warnings[0]["message"]  # measured on a val batch
    out = str(tmp_path / "no-stall")
    assert train.main(run_args(tiny_shards, out, "--epochs", "1", "--lr", "1e-12", "--stall-steps", "6",
                               "--log-every", "2", "--init", "caffe", "--dropout", "0")) == 0
    assert not [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == "warning"]


def test_train_evaluate_and_predict_give_the_same_logits(finished_run, tiny_shards, tmp_path):
    """One checkpoint, one validation image: the trainer's own val loader, model.evaluate's loader
    and model.predict given the image's source file (which it prepares as make_shards did) must
    give the same logits."""
    from conftest import tarfile_samples
    from pipeline import make_loader
    from pipeline.shards import load_manifest
    ckpt_path = os.path.join(finished_run, "checkpoint.pt")
    model, ckpt = checkpoint.load_model(ckpt_path, "cpu")
    manifest = load_manifest(tiny_shards)
    _, sample = next(tarfile_samples(os.path.join(tiny_shards, manifest["splits"]["val"]["shards"][0]["file"])))
    image = os.path.join(manifest["source"]["path"], json.loads(sample["json"])["source"])
    with torch.no_grad():
        by_predict = model(predict.preprocess(image, ckpt["normalization"], ckpt["preprocessing"])[None])[0]
        x, _ = next(iter(make_loader(tiny_shards, "val", batch_size=4, normalization=ckpt["normalization"])))
        by_evaluate = model(x[:1])[0]
        cfg = options.config_from_args(run_args(tiny_shards, finished_run, "--epochs", "2", "--resume"))
        run = train.setup(cfg)
        run.model.eval()
        by_train = run.model(next(iter(run.val_loader))[0][:1])[0]
    checkpoint.release_lock(finished_run, run.lock)  # setup() took it; train() would have let it go
    torch.testing.assert_close(by_evaluate, by_predict, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_train, by_evaluate, rtol=0, atol=0)


def test_evaluate_uses_the_checkpoints_normalization_not_pca_json(finished_run, tiny_shards, tmp_path):
    ckpt = os.path.join(finished_run, "checkpoint.pt")
    shards = str(tmp_path / "s")
    shutil.copytree(tiny_shards, shards)
    reports = []
    for change in ("none", "edited", "removed"):
        pca_path = os.path.join(shards, "pca.json")
        if change == "edited":
            pca = json.load(open(pca_path))
            pca["mean"] = [0.0, 0.0, 0.0]
            json.dump(pca, open(pca_path, "w"))
        elif change == "removed":
            os.remove(pca_path)
        report = str(tmp_path / f"{change}.json")
        assert evaluate.main(["--checkpoint", ckpt, "--shards", shards, "--devices", "cpu", "--json", report]) == 0
        reports.append(json.load(open(report)))
    assert reports[0]["val_loss"] == reports[1]["val_loss"] == reports[2]["val_loss"]


@pytest.mark.slow
def test_ddp_checkpoints_by_the_clock_over_several_epochs_do_not_hang(tiny_shards, tmp_path):
    """2 gloo ranks, a checkpoint interval near the step time: each rank deciding by its own clock
    paired the checkpoint's all_gather with DDP's all-reduce. With 1.2 s (0.02 min) and 1.8 s the
    code before the fix hung (killed after 240 s); it now finishes in ~45 s."""
    out = str(tmp_path / "ddp-ckpt")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "model.train", *run_args(tiny_shards, out, "--epochs", "3", "--log-every", "1",
                                    "--checkpoint-minutes", "0.02")]
    cmd[cmd.index("--loader-threads") + 1] = "1"
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    epochs = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl")) if '"epoch"' in x]
    assert [e["epoch"] for e in epochs if e["kind"] == "epoch"] == [0, 1, 2]
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["step"] == 12  # 4 steps an epoch


class _TableModel(torch.nn.Module):
    """Logits looked up by an id written in each input's first pixel: a model with known outputs."""

    def __init__(self, table):
        super().__init__()
        self.table = torch.as_tensor(table, dtype=torch.float32)

    def forward(self, x):
        return self.table[x[:, 0, 0, 0].long()]


@pytest.mark.parametrize("crops", [1, 10])
def test_evaluation_on_hand_built_logits(crops):
    """12 classes, 7 images; with ten crops the softmax outputs (not the logits) are averaged.
    Expected top-1, top-5 and loss computed here by hand in float64."""
    import reference
    rng = np.random.default_rng(3)
    n, classes = 7, 12
    logits = rng.normal(0, 3, (n * crops, classes))
    labels = np.array([0, 5, 11, 3, 3, 8, 1])
    boost = np.repeat([6.0, 6.0, 0.0, 2.5, 0.0, 2.0, -3.0], crops)  # some right, some top-5 only, some wrong
    logits[np.arange(n * crops), np.repeat(labels, crops)] += boost
    probs = reference.softmax(logits).reshape(n, crops, classes).mean(1)
    ranked = np.argsort(-probs, 1)
    expect_top1 = np.mean(ranked[:, 0] != labels)
    expect_top5 = np.mean([labels[i] not in ranked[i, :5] for i in range(n)])
    expect_loss = -np.mean(np.log(probs[np.arange(n), labels]))
    ids = torch.arange(n * crops, dtype=torch.float32)
    images = ids.view(n, crops, 1, 1, 1).expand(n, crops, 3, 2, 2).clone()
    if crops == 1:
        images = images[:, 0]
    batches = [(images[:4], torch.as_tensor(labels[:4])), (images[4:], torch.as_tensor(labels[4:]))]
    sums = evaluation.evaluate(_TableModel(logits), batches, torch.device("cpu"), bf16=False)
    result = evaluation.summarize(sums, classes)
    assert result["val_samples"] == n
    assert result["val_top1_error"] == pytest.approx(expect_top1, abs=1e-12)
    assert result["val_top5_error"] == pytest.approx(expect_top5, abs=1e-12)
    assert result["val_loss"] == pytest.approx(expect_loss, rel=1e-5)
    assert 0 < expect_top5 < expect_top1 < 1  # the case is not degenerate: both errors are informative


def test_rng_restore_from_a_machine_with_more_gpus(monkeypatch):
    """A checkpoint holds one CUDA generator state per GPU of the machine that wrote it; restoring on a
    machine with fewer restores the GPUs both have (torch.cuda.set_rng_state_all raised IndexError)."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((device, state)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: (_ for _ in ()).throw(IndexError()))
    cpu = torch.get_rng_state()
    checkpoint.set_rng_state({"torch": cpu, "cuda": [torch.tensor([1], dtype=torch.uint8)] * 8})
    assert [d for d, _ in restored] == [0]
    restored.clear()
    checkpoint.set_rng_state({"torch": cpu})  # a checkpoint from a CPU-only machine
    assert restored == []


def test_a_corrupted_checkpoint_is_refused_with_one_line(finished_run, tiny_shards, tmp_path, capsys):
    """4 KB flipped in the middle of checkpoint.pt (inside the tensors' bytes): resume, evaluate and
    predict refuse it, naming the file; before the checksum, it loaded and trained on garbage."""
    out = str(tmp_path / "corrupt")
    shutil.copytree(finished_run, out)
    ckpt = os.path.join(out, "checkpoint.pt")
    with open(ckpt, "r+b") as f:
        f.seek(os.path.getsize(ckpt) // 2)
        block = f.read(4096)
        f.seek(-4096, os.SEEK_CUR)
        f.write(bytes(b ^ 0xFF for b in block))
    before = open(ckpt, "rb").read()
    capsys.readouterr()
    assert train.main(run_args(tiny_shards, out, "--epochs", "3", "--resume")) == 2
    assert evaluate.main(["--checkpoint", ckpt, "--shards", "unused", "--devices", "cpu"]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert len(errs) == 2 and all(f"{ckpt}: corrupt" in e for e in errs), errs
    assert open(ckpt, "rb").read() == before


def test_a_second_live_run_into_the_same_out_is_refused_and_a_stale_lock_taken_over(tiny_shards, tmp_path,
                                                                                    capsys):
    out = str(tmp_path / "locked")
    os.makedirs(out)
    lock = os.path.join(out, ".lock")
    # a live run: holds the lock (flock) on OUT/.lock, its pid inside
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({lock!r}, os.O_CREAT | os.O_RDWR)\nfcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "os.write(fd, f'{os.getpid()}\\n'.encode())\nprint('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        assert train.main(run_args(tiny_shards, out, "--epochs", "1")) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"in use by another run (pid {holder.pid}" in err[0]
        assert sorted(os.listdir(out)) == [".lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    # a dead run's lock file naming a live process that is no run (a reused pid): taken over
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        open(lock, "w").write(f"{sleeper.pid}\n")
        assert train.main(run_args(tiny_shards, out, "--epochs", "1")) == 0
        assert f"taking over the lock left by pid {sleeper.pid}" in capsys.readouterr().err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not os.path.exists(lock)  # released at the end


def test_evaluate_refuses_a_missing_json_directory_before_evaluating(finished_run, tiny_shards, tmp_path, capsys,
                                                                     monkeypatch):
    monkeypatch.setattr(evaluate, "batch_probs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated")))
    report = str(tmp_path / "no" / "such" / "dir" / "eval.json")
    assert evaluate.main(["--checkpoint", os.path.join(finished_run, "checkpoint.pt"), "--shards", tiny_shards,
                          "--devices", "cpu", "--json", report]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "its directory does not exist" in err[0]


def test_top5_error_is_na_with_five_classes_or_fewer(finished_run, tiny_shards, capsys):
    """4 classes: top-5 error would be 0 by construction, so it is reported as n/a (None in JSON)."""
    last = [json.loads(x) for x in open(os.path.join(finished_run, "metrics.jsonl"))][-1]
    assert last["val_top5_error"] is None
    assert evaluate.main(["--checkpoint", os.path.join(finished_run, "checkpoint.pt"), "--shards", tiny_shards,
                          "--devices", "cpu"]) == 0
    assert "top-5 error n/a" in capsys.readouterr().out


def test_a_relabelled_shard_stops_training_and_evaluation_with_one_line(finished_run, tiny_shards, tmp_path,
                                                                        capsys):
    """A .cls member changed after make_shards (same length, so every reader accepts it): train and
    evaluate stop with exit 1 and one line naming the shard; before, both ran on the wrong labels."""
    shards = str(tmp_path / "shards")
    shutil.copytree(tiny_shards, shards)
    for split, shard in (("train", "train-000001.tar"), ("val", "val-000000.tar")):
        path = os.path.join(shards, shard)
        data = bytearray(open(path, "rb").read())
        name_at = data.index(b".cls\0")  # in the first .cls member's 512-byte header; its data follows
        off = name_at - name_at % 512 + 512
        data[off] = ord("0") + (data[off] - ord("0") + 1) % 4  # labels 0-3: one digit
        open(path, "wb").write(bytes(data))
    capsys.readouterr()
    out = str(tmp_path / "run")
    assert train.main(run_args(shards, out, "--epochs", "1")) == 1
    err = messages(capsys.readouterr().err, "train")
    assert len(err) == 1 and "train-000001.tar: sha256 differs from dataset.json" in err[0], err
    assert evaluate.main(["--checkpoint", os.path.join(finished_run, "checkpoint.pt"), "--shards", shards,
                          "--devices", "cpu"]) == 1
    err = messages(capsys.readouterr().err, "evaluate")
    assert len(err) == 1 and "val-000000.tar: sha256 differs from dataset.json" in err[0], err


def test_predict_shows_progress_names_an_unreadable_image_and_predicts_the_rest(finished_run, tmp_path, capsys):
    from PIL import Image
    good = [str(tmp_path / f"{k}.png") for k in range(3)]
    for k, path in enumerate(good):
        Image.new("RGB", (260 + k, 240), (40 * k, 90, 200)).save(path)
    bad = str(tmp_path / "bad.jpg")
    open(bad, "wb").write(b"\xff\xd8\xff not really a jpeg")
    fifo = str(tmp_path / "pipe.jpg")  # reading a named pipe used to hang predict for good
    os.mkfifo(fifo)
    ckpt = os.path.join(finished_run, "checkpoint.pt")
    assert predict.main(["--checkpoint", ckpt, "--batch-size", "2", good[0], bad, fifo, *good[1:]]) == 1
    captured = capsys.readouterr()
    assert [line for line in captured.out.splitlines() if not line.startswith(" ")] == good  # in order
    lines = messages(captured.err, "predict")
    assert len(lines) == 2 and lines[0].startswith(f"predict: {bad}: cannot read the image")
    assert lines[1] == f"predict: {fifo}: cannot read the image (ValueError: not a regular file)", lines
    assert "100%" in captured.err and "5/5" in captured.err  # the progress bar, over every image


@pytest.mark.parametrize("flags, needle", [
    (["--init", "nope"], "--init must be one of paper, cuda-convnet2, caffe, kaiming, not 'nope'"),
    (["--warmup-epochs", "nan"], "--warmup-epochs must be a finite number, not nan"),
    (["--weight-decay", "nan"], "--weight-decay must be a finite number, not nan"),
    (["--lrn-k", "nan"], "--lrn-k must be a finite number, not nan"),
    (["--lr", "inf"], "--lr must be a finite number, not inf"),
    (["--seed", "-1"], "--seed must be in [0, 2^63), not -1"),
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2^63)"),
    (["--loader-threads", "-1"], "--loader-threads must be in 0..256"),
    (["--loader-threads", "100000"], "--loader-threads must be in 0..256 (0: all cores), not 100000"),
    (["--intra-op-threads", "-1"], "--intra-op-threads must be >= 0"),
    (["--batch-size", "1000000000"], "--batch-size 1000000000: more than 65536 images per step"),
    (["--checkpoint-minutes", "nan"], "--checkpoint-minutes must be a finite number >= 0, not nan"),
    (["--probe-every", "3", "--log-every", "2"], "--probe-every must be 0 or a multiple of --log-every (2)"),
    (["--lrn-convention", "alpha*n"], "--lrn-convention must be one of alpha/n, alpha, not 'alpha*n'"),
    (["--lrn-layers", "some"], "--lrn-layers must be one of paper, all, not 'some'"),
    (["--backend", "opencv"], "--backend must be one of auto, dali, wds, synthetic, not 'opencv'"),
    (["--batch-size", "0"], "--batch-size must be > 0, not 0"),
    (["--lr", "0"], "--lr must be > 0, not 0.0"),
    (["--lr", "-0.01"], "--lr must be > 0, not -0.01"),
    (["--dropout", "1"], "--dropout must be in [0, 1), not 1.0"),
    (["--dropout", "-0.5"], "--dropout must be in [0, 1), not -0.5"),
    (["--epochs", "0"], "--epochs must be > 0, not 0"),
    (["--recipe", "alexnet-v2"], "alexnet-v2"),
    (["--out", "/sys/alexnet-run"], "/sys/alexnet-run: cannot write the run directory"),  # not writable, even by root
])
def test_bad_options_are_one_line_before_anything_is_written(tiny_shards, tmp_path, capsys, flags, needle):
    out = str(tmp_path / "out")
    assert train.main(run_args(tiny_shards, out, *flags)) == 2
    err = messages(capsys.readouterr().err, "train")
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(out)


def test_a_full_disk_at_a_checkpoint_stops_in_one_line_and_leaves_no_temporary_file(tiny_shards, tmp_path,
                                                                                  capsys, monkeypatch):
    """ENOSPC halfway through writing the checkpoint: before, a traceback and a checkpoint.pt.tmp-PID
    of the checkpoint's size were left behind."""
    out = str(tmp_path / "out")
    real_save, calls = torch.save, []

    def save_until_the_disk_fills(obj, path):
        calls.append(path)
        if len(calls) == 1:
            return real_save(obj, path)  # the first checkpoint goes through
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)  # part of it, then the disk is full
        raise OSError(28, "No space left on device", path)
    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    assert train.main(run_args(tiny_shards, out, "--epochs", "2", "--checkpoint-minutes", "0")) == 1
    err = messages(capsys.readouterr().err, "train")
    assert len(err) == 1 and "checkpoint.pt: cannot write the checkpoint (No space left on device) at step 2" \
        in err[0] and "the one of step 1 is kept" in err[0], err
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    assert checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 1


@pytest.mark.slow  # trains end to end
def test_a_really_full_disk_at_a_checkpoint_is_one_line(tiny_shards, small_filesystem, capsys):
    """torch.save on a full filesystem raises a RuntimeError from its zip writer ('unexpected pos'),
    not the OSError a test can inject: one line naming the checkpoint, exit 1, no temporary left."""
    out = os.path.join(small_filesystem, "run")
    assert train.main(run_args(tiny_shards, out, "--epochs", "1", "--width", "1")) == 1  # the full size
    err = messages(capsys.readouterr().err, "train")
    assert len(err) == 1 and f"{out}/checkpoint.pt: cannot write the checkpoint (No space left on device) at " \
        "step 4; none was written" in err[0], err
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl"]


@pytest.mark.slow
@pytest.mark.parametrize("sig, status, said", [(signal.SIGINT, 130, "interrupted"),
                                               (signal.SIGTERM, 143, "terminated (SIGTERM)")])
def test_sigint_and_sigterm_exit_with_one_line_and_keep_the_checkpoint(tiny_shards, tmp_path, sig, status, said):
    """Ctrl-C, or a scheduler's preemption (SIGTERM), during training: one line saying how to go on, no
    traceback, the lock released. (That a resumed run ends as an uninterrupted one is the SIGKILL test's.)"""
    out = str(tmp_path / "run")
    # 40 epochs (~50 s at width 1/8): the signal comes at step 2, long before the end
    proc = subprocess.Popen(_train_cmd(tiny_shards, out, epochs=40), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    _wait_for_step(out, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err
    lines = messages(err, "train")
    assert len(lines) == 1 and f"{said}; --resume continues from the last checkpoint" in lines[0], err
    assert not os.path.exists(os.path.join(out, ".lock"))
    assert checkpoint.load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] >= 1  # what --resume continues from


@pytest.mark.slow  # trains end to end
def test_no_checkpoints_leaves_the_evidence_but_no_checkpoint_or_plot(tiny_shards, tmp_path):
    """--no-checkpoints (studies, timings): config.json and metrics.jsonl, with the fc7 probe at
    --probe-every; no checkpoint.pt, no plot.png."""
    out = str(tmp_path / "light")
    assert train.main(run_args(tiny_shards, out, "--epochs", "1", "--no-checkpoints", "--log-every", "2",
                               "--probe-every", "2")) == 0
    assert sorted(os.listdir(out)) == ["config.json", "metrics.jsonl"]
    steps = [r for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4] and all(0 <= r["fc7_dead"] <= 1 for r in steps)


@pytest.mark.parametrize("what", ["mean", "class_name"])
def test_a_flipped_byte_outside_the_tensors_is_refused(finished_run, tiny_shards, tmp_path, capsys, what):
    """The normalization's numbers and the class names are pickled beside the tensors: one byte of
    either, changed in the file, is found (before, a changed mean moved the error with exit 0)."""
    import struct
    out = str(tmp_path / what)
    shutil.copytree(finished_run, out)
    ckpt = os.path.join(out, "checkpoint.pt")
    data = bytearray(open(ckpt, "rb").read())
    saved = torch.load(ckpt, weights_only=False)
    if what == "mean":
        needle = struct.pack(">d", saved["normalization"]["mean"][0])  # pickle's BINFLOAT, big-endian
        at = data.index(needle) + 1
    else:
        needle = saved["classes"][0].encode()
        at = data.index(needle)
    assert data.count(needle) == 1
    data[at] ^= 0x01
    open(ckpt, "wb").write(bytes(data))
    changed = torch.load(ckpt, weights_only=False)  # still loads: only the digest can tell
    assert changed["normalization"] != saved["normalization"] or changed["classes"] != saved["classes"]
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", ckpt, "--shards", tiny_shards, "--devices", "cpu"]) == 2
    assert predict.main(["--checkpoint", ckpt, os.path.join(REPO, "README.md")]) == 2
    errs = capsys.readouterr().err.strip().splitlines()
    assert [e for e in errs if f"{ckpt}: corrupt" in e] == errs and len(errs) == 2, errs


@pytest.mark.slow  # trains end to end
def test_a_resume_without_pca_json_keeps_the_checkpoints_numbers(finished_run, tiny_shards, tmp_path, capsys):
    """pca.json gone (or another set's) at --resume: the run goes on with the normalization stored in its
    checkpoint, says so in one line, and leaves no lock (it used to exit 1 after writing, lock left)."""
    shards, out = str(tmp_path / "s"), str(tmp_path / "run")
    shutil.copytree(tiny_shards, shards)
    shutil.copytree(finished_run, out)
    os.remove(os.path.join(shards, "pca.json"))
    capsys.readouterr()
    assert train.main(run_args(shards, out, "--epochs", "3", "--resume")) == 0
    notes = messages(capsys.readouterr().err, "train")
    assert notes == [f"train: {shards}/pca.json is missing or differs from the one this run started with; the run "
                     "keeps its own (stored in the checkpoint)"]
    assert not os.path.exists(os.path.join(out, ".lock"))
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["epoch"] == 3


@pytest.mark.slow  # trains end to end
def test_a_half_written_metrics_line_and_a_killed_checkpoint_write_are_cleaned_up(finished_run, tiny_shards,
                                                                                tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(finished_run, out)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"kind": "step", "epo')  # killed mid-line
    stale = os.path.join(out, "checkpoint.pt.tmp-999999999")  # no such pid
    open(stale, "wb").write(b"x" * 1000)
    capsys.readouterr()
    assert train.main(run_args(tiny_shards, out, "--epochs", "3", "--resume")) == 0
    notes = messages(capsys.readouterr().err, "train")
    assert notes == [f"train: removed {stale}, left by a run killed while writing it",
                     f"train: {out}/metrics.jsonl: dropped 1 unreadable line(s), as a killed run leaves them"]
    assert all(json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")))
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_resuming_a_two_rank_run_in_one_process_is_one_line(finished_run, tiny_shards, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(finished_run, out)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    ckpt = torch.load(ckpt_path, weights_only=False)
    ckpt["loader"]["world_size"] = 2
    ckpt["digest"] = checkpoint.checkpoint_digest(ckpt)
    torch.save(ckpt, ckpt_path)
    before = sorted(os.listdir(out))
    capsys.readouterr()
    assert train.main(run_args(tiny_shards, out, "--epochs", "3", "--resume")) == 2
    err = messages(capsys.readouterr().err, "train")
    assert len(err) == 1 and "cannot resume here: loader state is for world_size=2" in err[0], err
    assert sorted(os.listdir(out)) == before


def test_evaluate_refuses_shards_of_other_classes_with_the_same_count(finished_run, tiny_shards, tmp_path, capsys):
    """A class folder renamed to another wnid: the same number of classes, other classes. It used to be
    evaluated with exit 0."""
    shards = str(tmp_path / "s")
    shutil.copytree(tiny_shards, shards)
    path = os.path.join(shards, "dataset.json")
    m = json.load(open(path))
    old = m["classes"][2]["wnid"]
    m["classes"][2]["wnid"] = "n01440764"
    open(path, "w").write(json.dumps(m))
    capsys.readouterr()
    ckpt = os.path.join(finished_run, "checkpoint.pt")
    assert evaluate.main(["--checkpoint", ckpt, "--shards", shards, "--devices", "cpu"]) == 2
    err = messages(capsys.readouterr().err, "evaluate")
    assert err == [f"evaluate: {ckpt}: was trained on other classes than {shards} has (class 2: {old} in the "
                   "checkpoint, n01440764 in the shards)"]


@pytest.mark.parametrize("case", ["json_dir", "synthetic", "empty_val"])
def test_evaluate_refuses_before_it_evaluates(finished_run, tiny_shards, tmp_path, capsys, monkeypatch, case):
    monkeypatch.setattr(evaluate, "batch_probs", lambda *a, **k: (_ for _ in ()).throw(AssertionError("evaluated")))
    args, shards = [], tiny_shards
    if case == "json_dir":  # it used to fail after the work, leaving DIR.tmp-<pid>
        args, needle = ["--json", str(tmp_path)], f"--json {tmp_path}: is a directory"
    elif case == "synthetic":  # it used to print 'val images: top-1 error ...' of random batches
        args, needle = ["--backend", "synthetic"], "--backend must be one of dali, wds, auto, not 'synthetic'"
    else:  # it used to divide by zero
        shards = str(tmp_path / "s")
        shutil.copytree(tiny_shards, shards)
        m = json.load(open(os.path.join(shards, "dataset.json")))
        m["splits"]["val"] = {"samples": 0, "shards": []}
        open(os.path.join(shards, "dataset.json"), "w").write(json.dumps(m))
        needle = "the val split has no images"
    assert evaluate.main(["--checkpoint", os.path.join(finished_run, "checkpoint.pt"), "--shards", shards,
                          "--devices", "cpu", *args]) == 2
    err = messages(capsys.readouterr().err, "evaluate")
    assert len(err) == 1 and needle in err[0], err
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]
