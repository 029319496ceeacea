"""The rows of the paper's Table 2 as commands: ensembles (5 CNNs, 7 CNNs*), fine-tuning from another
run's checkpoint with a sixth conv layer (1 CNN*). Oracles by hand."""
from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from model import checkpoint, evaluate, train
from model.evaluation import Ensemble, summarize

TINY = ["--batch-size", "8", "--loader-threads", "2", "--devices", "cpu", "--width", "0.125", "--epochs", "1"]


def test_ensemble_by_hand_right_where_every_model_is_wrong():
    """Two models, 6 classes, 3 images (labels 1, 0, 5). Image 0: model A says 0, model B says 2, their
    average says 1, the truth. Errors worked out by hand from the table below."""
    a = torch.tensor([[0.50, 0.45, 0.05, 0.00, 0.00, 0.00],
                      [0.60, 0.10, 0.10, 0.10, 0.10, 0.00],
                      [0.30, 0.20, 0.20, 0.20, 0.10, 0.00]])
    b = torch.tensor([[0.05, 0.45, 0.50, 0.00, 0.00, 0.00],
                      [0.20, 0.50, 0.10, 0.10, 0.10, 0.00],
                      [0.00, 0.20, 0.20, 0.20, 0.10, 0.30]])
    labels = torch.tensor([1, 0, 5])
    ens = Ensemble(3, 6)
    for probs in (a, b):
        ens.start_model()
        ens.add(probs[:2], labels[:2])  # in two batches, as a loader gives them
        ens.add(probs[2:], labels[2:])
    per_model = [summarize(s, 6) for s in ens.models]
    # A: top-1 right on image 1 only; top-5 right on 0 and 1 (image 2's class 5 has probability 0)
    assert per_model[0]["val_top1_error"] == pytest.approx(2 / 3) and per_model[0]["val_top5_error"] == pytest.approx(1 / 3)
    # B: top-1 right on image 2 only; top-5 right everywhere
    assert per_model[1]["val_top1_error"] == pytest.approx(2 / 3) and per_model[1]["val_top5_error"] == 0
    # the average: [.275 .45 .275 0 0 0] -> 1 (right, both models wrong); [.4 .3 .1 .1 .1 0] -> 0 (right);
    # [.15 .2 .2 .2 .1 .15] -> not 5 (wrong), class 5 among the top five (only class 4 is lower)
    both = summarize(ens.ensemble_sums(), 6)
    assert both["val_top1_error"] == pytest.approx(1 / 3) and both["val_top5_error"] == 0
    assert both["val_loss"] == pytest.approx(-(math.log(0.45) + math.log(0.40) + math.log(0.15)) / 3, rel=1e-6)
    assert both["val_samples"] == 3


@pytest.fixture(scope="module")
def runs(tiny_shards, shards, tmp_path_factory):
    """Two runs on the 4-class tiny set (seeds 0 and 1); a 'pre-training' run with the sixth conv layer
    on the 10-class set; its fine-tuning on the 4-class set (--init-from, as 1 CNN*)."""
    root = tmp_path_factory.mktemp("table2")
    paths = {}
    for name, data, extra in [("a", tiny_shards, ["--seed", "0"]), ("b", tiny_shards, ["--seed", "1"]),
                              ("pre", shards, ["--extra-conv", "--batch-size", "32"])]:
        out = str(root / name)
        assert train.main(["--shards", data, "--out", out, *TINY, *extra]) == 0
        paths[name] = os.path.join(out, "checkpoint.pt")
    out = str(root / "fine")
    assert train.main(["--shards", tiny_shards, "--out", out, *TINY, "--extra-conv", "--init-from", paths["pre"],
                       "--init", "paper", "--epochs", "1"]) == 0
    paths["fine"] = os.path.join(out, "checkpoint.pt")
    paths["fine_config"] = os.path.join(out, "config.json")
    return paths


def test_init_from_loads_every_matching_layer_and_initialises_the_rest(runs, tiny_shards, tmp_path):
    """The 10-class parent with conv6 into a 4-class child with conv6: every layer but fc8 is the
    parent's exactly (checked before any step, with --epochs 1 and lr 0); fc8 follows --init paper."""
    out = str(tmp_path / "child")
    assert train.main(["--shards", tiny_shards, "--out", out, *TINY, "--extra-conv", "--init-from", runs["pre"],
                       "--init", "paper", "--lr", "1e-30", "--momentum", "0", "--weight-decay", "0"]) == 0
    parent = torch.load(runs["pre"], weights_only=False)["model"]
    child = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    for k in child:
        if not k.startswith("fc8"):
            assert torch.equal(child[k], parent[k]), k  # lr 1e-30: a step moves nothing in float32
    assert child["fc8.weight"].shape == (4, 512) and parent["fc8.weight"].shape == (10, 512)
    # biases 0 (moved by ~1e-30 by the one step), weights N(0, 0.01): the recipe's init, not the parent's
    assert child["fc8.bias"].abs().max() < 1e-20 and abs(child["fc8.weight"].std().item() - 0.01) < 0.002
    record = json.load(open(os.path.join(out, "config.json")))["init_from"]
    assert record["loaded"] == ["conv1", "conv2", "conv3", "conv4", "conv5", "conv6", "fc6", "fc7"]
    assert record["initialised"] == ["fc8"] and record["parent_classes"] == 10
    assert record["digest"] == torch.load(runs["pre"], weights_only=False)["digest"]


def test_fine_tuned_model_joins_the_ensemble(runs, tiny_shards, tmp_path, capsys):
    """7 CNNs* in small: the fine-tuned model (1K classes after fine-tuning: here the tiny set's 4) is
    averaged with the others; each model's own line and the ensemble's; --json has every figure."""
    report = str(tmp_path / "ens.json")
    assert evaluate.main(["--checkpoint", runs["a"], runs["b"], runs["fine"], "--shards", tiny_shards,
                          "--devices", "cpu", "--json", report]) == 0
    out = capsys.readouterr().out
    assert out.count("val images: top-1 error") == 4 and "ensemble of 3 (softmax averaged)" in out
    result = json.load(open(report))
    assert [m["checkpoint"] for m in result["models"]] == [runs["a"], runs["b"], runs["fine"]]
    assert result["val_samples"] == 16 and all(m["val_samples"] == 16 for m in result["models"])
    single = str(tmp_path / "one.json")
    assert evaluate.main(["--checkpoint", runs["a"], "--shards", tiny_shards, "--devices", "cpu",
                          "--json", single]) == 0
    assert json.load(open(single))["val_top1_error"] == result["models"][0]["val_top1_error"]


def test_ensemble_refuses_other_classes_or_inputs_before_any_work(runs, tiny_shards, tmp_path, capsys):
    other_norm = str(tmp_path / "std.pt")
    ckpt = torch.load(runs["b"], weights_only=False)
    ckpt["normalization"]["mode"] = "std"
    ckpt["digest"] = checkpoint.checkpoint_digest(ckpt)
    torch.save(ckpt, other_norm)
    link, copy = str(tmp_path / "link.pt"), str(tmp_path / "copy.pt")
    os.symlink(runs["a"], link)
    shutil.copy(runs["a"], copy)
    dotted = os.path.join(os.path.dirname(runs["a"]), ".", os.path.basename(runs["a"]))
    cases = [([runs["a"], runs["pre"]], "has 10 classes, the shards have 4"),
             ([runs["a"], other_norm], "was trained with another input normalization than"),
             # one model under two names would weigh twice: by its digest, not its path's string
             ([runs["a"], runs["a"]], "is the same checkpoint as"), ([runs["a"], dotted], "is the same checkpoint as"),
             ([runs["a"], link], "is the same checkpoint as"), ([runs["b"], copy, runs["a"]], "is the same checkpoint as")]
    for paths, needle in cases:
        report = str(tmp_path / "never.json")
        assert evaluate.main(["--checkpoint", *paths, "--shards", tiny_shards, "--devices", "cpu",
                              "--json", report]) == 2
        captured = capsys.readouterr()
        err = [line for line in captured.err.splitlines() if line.startswith("evaluate: ")]
        assert len(err) == 1 and needle in err[0], err
        assert "val images" not in captured.out and not os.path.exists(report)  # refused before any work


def test_init_from_refuses_a_bad_parent(runs, tiny_shards, tmp_path, capsys):
    corrupt = str(tmp_path / "bad.pt")
    blob = bytearray(open(runs["a"], "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(corrupt, "wb").write(blob)
    unrelated = str(tmp_path / "unrelated.pt")
    ckpt = torch.load(runs["a"], weights_only=False)
    ckpt["model"] = {f"other.{k}": v for k, v in ckpt["model"].items()}
    ckpt["digest"] = checkpoint.checkpoint_digest(ckpt)
    torch.save(ckpt, unrelated)
    for parent, needle in [(corrupt, "bad.pt"), (unrelated, "has no layer of this model's shape")]:
        out = str(tmp_path / "never")
        assert train.main(["--shards", tiny_shards, "--out", out, *TINY, "--init-from", parent]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
        assert len(err) == 1 and needle in err[0], err
        assert not os.path.exists(out)  # nothing written


@pytest.mark.parametrize("edit, needle", [({"size": 320}, "made with size 256; {shards} has size 320"),
                                          ({"keep_aspect": True}, "made with keep_aspect False; {shards} has keep_aspect True")])
def test_evaluate_refuses_shards_made_another_way_than_the_training_ones(runs, tiny_shards, tmp_path, capsys, edit,
                                                                         needle):
    """A model trained on 256-px centre squares sees crops of another scale on 320-px or uncropped shards:
    its error there says nothing. The checkpoint keeps how its shards were made."""
    shards = str(tmp_path / "other")
    shutil.copytree(tiny_shards, shards)
    manifest_path = os.path.join(shards, "dataset.json")
    manifest = json.load(open(manifest_path))
    manifest["preprocessing"].update(edit)
    open(manifest_path, "w").write(json.dumps(manifest))
    assert evaluate.main(["--checkpoint", runs["a"], "--shards", shards, "--devices", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate: ")]
    assert len(err) == 1 and needle.format(shards=shards) in err[0], err


def _relabelled_shards(tiny_shards: str, out: str, wnids: list[str]) -> str:
    """A copy of the tiny shards whose classes carry other wnids (the images and labels unchanged), with
    its pca.json re-pointed at the new dataset.json."""
    import hashlib
    shutil.copytree(tiny_shards, out)
    manifest_path, pca_path = os.path.join(out, "dataset.json"), os.path.join(out, "pca.json")
    manifest = json.load(open(manifest_path))
    for c, w in zip(manifest["classes"], wnids):
        c["wnid"] = w
    blob = json.dumps(manifest).encode()
    open(manifest_path, "wb").write(blob)
    pca = json.load(open(pca_path))
    pca["source"]["sha256"] = hashlib.sha256(blob).hexdigest()
    open(pca_path, "w").write(json.dumps(pca))
    return out


def test_init_from_fc8_rows_follow_the_wnids(runs, tiny_shards, tmp_path, capsys):
    """A parent of the same class count but other classes: its fc8 rows used to land on whatever class had
    the same index. Child classes (by wnid): the parent's 1, 0, 2 and a new one -> rows 1, 0, 2, initialised."""
    parent = torch.load(runs["a"], weights_only=False)
    w = parent["wnids"]
    shards = _relabelled_shards(tiny_shards, str(tmp_path / "s"), [w[1], w[0], w[2], "n99999999"])
    out = str(tmp_path / "child")
    assert train.main(["--shards", shards, "--out", out, *TINY, "--init-from", runs["a"], "--epochs", "1",
                       "--lr", "1e-30", "--momentum", "0", "--weight-decay", "0"]) == 0
    child = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]
    for k in ("fc8.weight", "fc8.bias"):
        for i, j in ((0, 1), (1, 0), (2, 2)):
            assert torch.equal(child[k][i], parent["model"][k][j]), (k, i)
        assert not torch.equal(child[k][3], parent["model"][k][3])
    record = json.load(open(os.path.join(out, "config.json")))["init_from"]
    assert record["fc8_rows"] == {"by": "wnid", "from_parent": 3, "initialised": 1}
    assert "fc8" in record["initialised"] and "fc8" not in record["loaded"]
    assert "fc8 rows follow the wnids, 3 from the parent and 1 initialised" in capsys.readouterr().err


def test_init_from_refuses_a_parent_of_another_input_normalization(runs, tiny_shards, tmp_path, capsys):
    ckpt = torch.load(runs["a"], weights_only=False)
    ckpt["normalization"]["mode"] = "std"
    ckpt["digest"] = checkpoint.checkpoint_digest(ckpt)
    parent = str(tmp_path / "std.pt")
    torch.save(ckpt, parent)
    out = str(tmp_path / "never")
    assert train.main(["--shards", tiny_shards, "--out", out, *TINY, "--init-from", parent]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert len(err) == 1 and "was trained on input 'std', this run's recipe gives 'mean'; pass --input-norm std" \
        in err[0], err
    assert not os.path.exists(out)


def test_a_resumed_fine_tuning_keeps_its_record_and_refuses_another_parent(runs, tiny_shards, tmp_path, capsys):
    out = str(tmp_path / "fine")
    shutil.copytree(os.path.dirname(runs["fine"]), out)
    args = ["--shards", tiny_shards, "--out", out, *TINY, "--extra-conv", "--init", "paper", "--resume"]
    assert train.main([*args, "--epochs", "2", "--init-from", runs["a"]]) == 2  # not the parent it started from
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train: ")]
    assert len(err) == 1 and f"--resume continues a run that started from {os.path.abspath(runs['pre'])}" in err[0]
    assert train.main([*args, "--epochs", "2", "--init-from", runs["pre"]]) == 0  # the same command, repeated
    record = json.load(open(os.path.join(out, "config.json")))["init_from"]
    assert record == json.load(open(runs["fine_config"]))["init_from"]
    assert train.main([*args, "--epochs", "3"]) == 0  # without --init-from: the record stays too
    assert json.load(open(os.path.join(out, "config.json")))["init_from"] == record


def test_the_layer_table_trains_and_everything_that_loads_it_takes_227_crops(tiny_shards, tmp_path):
    """--recipe layer-table: 227 input, conv1 unpadded, LRN after all five convolutions. evaluate, predict,
    show_predictions and neighbours take the checkpoint's 227 crops without being told (a 224 crop would be
    refused by the model's input check); a 224 model fed 227 crops is one line."""
    from model import predict
    from tools import neighbours, show_predictions
    out = str(tmp_path / "table")
    assert train.main(["--shards", tiny_shards, "--out", out, *TINY, "--recipe", "layer-table", "--epochs", "1"]) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    assert config["recipe"]["input_size"] == 227 and config["model"]["input_size"] == 227
    assert config["model"]["lrn_layers"] == "all"
    ckpt = os.path.join(out, "checkpoint.pt")
    assert evaluate.main(["--checkpoint", ckpt, "--shards", tiny_shards, "--devices", "cpu", "--ten-crop"]) == 0
    image = os.path.join(tmp_path, "x.png")
    from PIL import Image
    Image.new("RGB", (300, 280), (90, 140, 30)).save(image)
    assert predict.main(["--checkpoint", ckpt, image]) == 0
    assert show_predictions.main([ckpt, tiny_shards, str(tmp_path / "p.png"), "--n", "4"]) == 0
    assert neighbours.main([ckpt, tiny_shards, str(tmp_path / "n.png"), "--queries", "2", "--k", "2",
                            "--features", str(tmp_path / "f.f16")]) == 0


def test_a_224_model_fed_227_crops_is_refused_in_one_line(runs, tiny_shards, monkeypatch, capsys):
    monkeypatch.setattr(evaluate, "input_size", lambda ckpt: 227)  # a loader forced to 227, whatever the model
    assert evaluate.main(["--checkpoint", runs["a"], "--shards", tiny_shards, "--devices", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate: ") and "%|" not in line]
    assert len(err) == 1 and "the images are 227x227, and this model takes 224x224 crops" in err[0], err


def test_one_model_keeps_no_n_by_c_sum_and_a_too_large_ensemble_is_refused_first(runs, tiny_shards, monkeypatch,
                                                                                 capsys):
    """A 21,841-class model on Fall 2011's val split would have allocated 7.1M x 21,841 float32 (620 GB) for
    the ensemble's sum even alone; an ensemble that large is refused before any work."""
    assert Ensemble(50_000, 21_841, models=1).total is None
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 0 if name == "SC_PHYS_PAGES" else real(name))  # no memory at all
    assert evaluate.main(["--checkpoint", runs["a"], runs["b"], "--shards", tiny_shards, "--devices", "cpu"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("evaluate: ")]
    assert len(err) == 1 and "an ensemble over 16 val images x 4 classes sums" in err[0], err
    assert evaluate.main(["--checkpoint", runs["a"], "--shards", tiny_shards, "--devices", "cpu"]) == 0  # one: fine
