"""tools/make_shards.py and tools/verify_shards.py on generated sample data (CPU, seconds)."""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from conftest import SMALL, build_shards, tarfile_samples
from pipeline.shards import iter_tar_samples, load_manifest, read_index
from tools import make_sample_data, make_shards, verify_shards
from tools.imagenet_source import SourceError, open_source

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def all_samples(out: str, split: str):
    m = load_manifest(out)
    for shard in m["splits"][split]["shards"]:
        yield from tarfile_samples(os.path.join(out, shard["file"]))


@pytest.fixture(scope="module")
def made(sources, tmp_path_factory):
    """Shards from every layout: {layout: OUT}."""
    out = {}
    for layout, (root, _) in sources.items():
        d = str(tmp_path_factory.mktemp(f"made_{layout}") / "out")
        assert build_shards(root, d, "--shard-samples", "16") == 0
        out[layout] = d
    return out


@pytest.mark.parametrize("layout", make_sample_data.ILSVRC_LAYOUTS)
def test_every_layout_labels_match_truth(made, sources, layout):
    _, truth = sources[layout]
    m = load_manifest(made[layout])
    wnids = [c["wnid"] for c in m["classes"]]
    assert wnids == sorted(w for w, _ in truth["classes"])
    assert [c["name"] for c in m["classes"]][:1] != [] and m["source"]["layout"] == layout
    for split in ("train", "val"):
        seen = {}
        for key, s in all_samples(made[layout], split):
            label = int(s["cls"])
            seen[key] = wnids[label]
            assert json.loads(s["json"])["wnid"] == wnids[label]
        assert seen == truth[split], f"{layout} {split} labels differ from the generator's truth"


def test_devkit_ids_are_not_sorted_order(sources):
    """The tars layout's meta.mat must number classes out of wnid order (as the real one does),
    so the label test above proves the mapping goes through meta.mat."""
    import scipy.io
    root, _ = sources["tars"]
    with tarfile.open(os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz")) as tf:
        meta = tf.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
    syn = scipy.io.loadmat(io.BytesIO(meta), squeeze_me=True)["synsets"]
    leaves = sorted((str(s["WNID"]), int(s["ILSVRC2012_ID"])) for s in syn if int(s["num_children"]) == 0)
    assert [i for _, i in leaves] != sorted(i for _, i in leaves)
    assert len(syn) > len(leaves)  # non-leaf synsets are present and must be ignored


def test_layouts_give_identical_images(made):
    for split in ("train", "val"):
        ref = [(k, s["jpg"], s["cls"]) for k, s in all_samples(made["folder"], split)]
        for layout in ("kaggle", "tars"):
            assert [(k, s["jpg"], s["cls"]) for k, s in all_samples(made[layout], split)] == ref


def test_format_contract(made):
    out = made["tars"]
    m = load_manifest(out)
    for field in ("format_version", "classes", "splits", "preprocessing", "seed", "skipped", "command"):
        assert field in m
    assert m["preprocessing"] == {**m["preprocessing"], "size": 256, "crop": "center", "quality": 90,
                                  "keep_aspect": False}
    n_train = SMALL["classes"] * SMALL["train_per_class"]
    assert m["splits"]["train"]["samples"] == n_train
    assert [s["file"] for s in m["splits"]["train"]["shards"]] == [f"train-{i:06d}.tar" for i in range(3)]
    for shard in m["splits"]["train"]["shards"]:
        path = os.path.join(out, shard["file"])
        with tarfile.open(path) as tf:
            names = tf.getnames()
            assert all(mem.mtime == 0 and mem.uid == 0 for mem in tf.getmembers())
        # members adjacent, in jpg/cls/json order, keys without dots
        keys = [n.split(".")[0] for n in names]
        assert names == [f"{k}.{e}" for k in keys[::3] for e in ("jpg", "cls", "json")]
        # the index is what DALI's own wds2idx writes
        ref = str(path) + ".ref.idx"
        subprocess.run([os.path.join(os.path.dirname(sys.executable), "wds2idx"), path, ref],
                       check=True, capture_output=True)
        assert open(ref).read() == open(path[:-4] + ".idx").read()
        os.remove(ref)
    # val keeps source order; train is shuffled (not in class order)
    val_keys = [k for k, _ in all_samples(out, "val")]
    assert val_keys == sorted(val_keys)
    train_labels = [int(s["cls"]) for _, s in all_samples(out, "train")]
    assert train_labels != sorted(train_labels)
    assert len(set(train_labels[:16])) >= 3  # the first shard draws from many classes


def test_quirk_files_become_rgb_256_jpegs(made, sources):
    _, truth = sources["folder"]
    out = made["folder"]
    samples = dict(all_samples(out, "train")) | dict(all_samples(out, "val"))
    # PNG named .JPEG, CMYK, grayscale, 150x100, 1200x160 (make_sample_data.quirk_for)
    quirky = ["n91000000_1000", "n91000001_1000", "n91000001_1007", "n91000002_1000", "n91000003_1000",
              "n91000004_1000"]
    for key in quirky:
        img = Image.open(io.BytesIO(samples[key]["jpg"]))
        assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (256, 256)), key
        assert "progressive" not in img.info  # baseline
    assert json.loads(samples["n91000003_1000"]["json"])["orig_size"] == [150, 100]
    assert json.loads(samples["n91000004_1000"]["json"])["orig_size"] == [1200, 160]
    # the sources really were those quirks
    src = open_source(sources["folder"][0])
    by_key = {s.key: s for s in src.splits["train"]}
    modes = {k: (Image.open(io.BytesIO(by_key[k].read())).format, Image.open(io.BytesIO(by_key[k].read())).mode)
             for k in quirky[:4]}
    assert modes == {"n91000000_1000": ("PNG", "RGB"), "n91000001_1000": ("JPEG", "CMYK"),
                     "n91000001_1007": ("JPEG", "CMYK"), "n91000002_1000": ("JPEG", "L")}
    assert verify_shards.verify(out) == []


def test_keep_aspect(sources, tmp_path):
    root, _ = sources["folder"]
    out = str(tmp_path / "ka")
    assert build_shards(root, out, "--keep-aspect", "--splits", "val") == 0
    sizes = [Image.open(io.BytesIO(s["jpg"])).size for _, s in all_samples(out, "val")]
    assert all(min(sz) == 256 for sz in sizes) and any(max(sz) > 256 for sz in sizes)
    assert load_manifest(out)["preprocessing"]["keep_aspect"] is True
    assert verify_shards.verify(out) == []


def test_byte_identical_whatever_the_workers(sources, tmp_path):
    root, _ = sources["tars"]
    a, b = tmp_path / "w1" / "out", tmp_path / "w2" / "out"
    assert make_shards.main([root, str(a), "--workers", "1", "--shard-samples", "16"]) == 0
    assert make_shards.main([root, str(b), "--workers", "2", "--shard-samples", "16"]) == 0
    files = sorted(os.listdir(a))
    assert files == sorted(os.listdir(b)) and "dataset.json" in files
    for f in files:
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


def test_seed_changes_the_shuffle(sources, tmp_path):
    root, _ = sources["folder"]
    assert build_shards(root, str(tmp_path / "s1"), "--splits", "train", "--seed", "1") == 0
    assert build_shards(root, str(tmp_path / "s2"), "--splits", "train", "--seed", "2") == 0
    k1 = [k for k, _ in all_samples(str(tmp_path / "s1"), "train")]
    k2 = [k for k, _ in all_samples(str(tmp_path / "s2"), "train")]
    assert sorted(k1) == sorted(k2) and k1 != k2


def _edit_devkit(root: str, member: str, edit) -> None:
    """Rewrites the devkit tarball with edit(bytes) applied to the member whose name ends in `member`."""
    dk = os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz")
    with tarfile.open(dk) as tf:
        members = {m.name: tf.extractfile(m).read() for m in tf}
    name = next(n for n in members if n.endswith(member))
    members[name] = edit(members[name])
    with tarfile.open(dk, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


def _copy_source(sources, tmp_path, layout="folder"):
    root = str(tmp_path / "src")
    shutil.copytree(sources[layout][0], root)
    return root


def test_truncated_image_fails_naming_it(sources, tmp_path, capsys):
    root = _copy_source(sources, tmp_path)
    bad = os.path.join(root, "train", "n91000003", "n91000003_1007.JPEG")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    out = str(tmp_path / "out")
    assert build_shards(root, out) == 1
    err = capsys.readouterr().err
    assert bad in err and "cannot decode" in err
    assert not os.path.exists(os.path.join(out, "dataset.json"))
    # with --allow-skips the file is listed, not dropped silently
    assert build_shards(root, out, "--allow-skips") == 0
    m = load_manifest(out)
    assert [s["source"] for s in m["skipped"]] == ["train/n91000003/n91000003_1007.JPEG"]
    assert m["splits"]["train"]["samples"] == SMALL["classes"] * SMALL["train_per_class"] - 1
    assert verify_shards.verify(out) == []


@pytest.mark.parametrize("case", ["missing", "unknown", "empty_class", "kaggle_gt", "devkit_gt", "complete_out",
                                  "kaggle_conflict", "class_name", "fifo", "junk_meta"])
def test_bad_input_one_line_error(sources, tmp_path, capsys, case):
    out = str(tmp_path / "out")
    if case == "missing":
        root, needle = str(tmp_path / "nope"), "no such directory"
    elif case == "unknown":
        root = str(tmp_path / "empty")
        os.makedirs(root)
        needle = "unknown layout"
    elif case == "empty_class":
        root = _copy_source(sources, tmp_path)
        os.makedirs(os.path.join(root, "train", "n91000099"))
        needle = "empty class folder"
    elif case == "kaggle_gt":
        root = _copy_source(sources, tmp_path, "kaggle")
        csv_path = os.path.join(root, "LOC_val_solution.csv")
        lines = open(csv_path).read().splitlines()
        open(csv_path, "w").write("\n".join(lines[:-1]) + "\n")
        needle = "no label for 1 val file"
    elif case == "devkit_gt":
        root = _copy_source(sources, tmp_path, "tars")
        _edit_devkit(root, "data/ILSVRC2012_validation_ground_truth.txt",
                     lambda gt: b"\n".join(gt.split(b"\n")[:-3]) + b"\n")
        needle = "validation ground truth has"
    elif case == "kaggle_conflict":  # a second, different label for the same image used to win silently
        root = _copy_source(sources, tmp_path, "kaggle")
        csv_path = os.path.join(root, "LOC_val_solution.csv")
        lines = open(csv_path).read().splitlines()
        image, labels = lines[1].split(",")
        other = next(ln.split(",")[1].split()[0] for ln in lines[2:] if ln.split(",")[1].split()[0] != labels.split()[0])
        open(csv_path, "a").write(f"{image},{other} 1 2 3 4\n")
        needle = f"LOC_val_solution.csv:{len(lines) + 1}: labels {image} {other}, but line 2 labelled it"
    elif case == "class_name":  # 'cat' used to become a class
        root = _copy_source(sources, tmp_path)
        shutil.copytree(os.path.join(root, "train", "n91000000"), os.path.join(root, "train", "cat"))
        needle = "train/cat: class folder name is not a WordNet id"
    elif case == "fifo":  # a named pipe used to hang the run at 84 %
        root = _copy_source(sources, tmp_path)
        os.mkfifo(os.path.join(root, "train", "n91000001", "pipe.JPEG"))
        needle = "pipe.JPEG: not a regular file"
    elif case == "junk_meta":
        root = _copy_source(sources, tmp_path, "tars")
        _edit_devkit(root, "data/meta.mat", lambda meta: b"MATLAB 5.0 MAT-file" + bytes(range(256)) * 4)
        needle = "data/meta.mat is not the devkit's synset table"
    else:
        root = sources["folder"][0]
        assert build_shards(root, out, "--splits", "val") == 0
        capsys.readouterr()
        needle = "already complete"
    rc = build_shards(root, out)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and needle in err[0], err
    if case != "complete_out":
        assert not os.path.exists(os.path.join(out, "dataset.json"))


# make_shards with 30 ms more per image (the workers are forked, so they inherit the slower function): the
# 60 images of the small sources take over a second, and a signal sent after the first shards lands mid-run.
SLOWED = ("import sys, time; sys.path.insert(0, {repo!r}); from tools import make_shards; "
          "fast = make_shards.process_image; "
          "make_shards.process_image = lambda *a, **k: (time.sleep(0.03), fast(*a, **k))[1]; "
          "sys.exit(make_shards.main(sys.argv[1:]))")


def default_signals() -> None:
    """SIGINT as a terminal gives it, whatever this suite inherited (a shell without job control starts
    background jobs with SIGINT ignored, and so would the child be)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start_make_shards(root: str, out: str, workers: int, shard_samples: int, wait_for_shards: int):
    """make_shards (slowed) as a process, once it has written `wait_for_shards` train shards: (process, the
    command of an ordinary run with the same options)."""
    args = [root, out, "--workers", str(workers), "--shard-samples", str(shard_samples)]
    cmd = [sys.executable, os.path.join(REPO, "tools", "make_shards.py"), *args]
    proc = subprocess.Popen([sys.executable, "-c", SLOWED.format(repo=REPO), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=REPO, preexec_fn=default_signals)
    deadline = time.time() + 60
    while time.time() < deadline and len(glob.glob(os.path.join(out, "train-*.tar"))) < wait_for_shards:
        time.sleep(0.02)
    return proc, cmd


@pytest.mark.slow
def test_interrupted_run_leaves_nothing_complete_and_rerun_finishes(sources, tmp_path):
    root, _ = sources["folder"]
    out = str(tmp_path / "out")
    proc, cmd = _start_make_shards(root, out, workers=1, shard_samples=2, wait_for_shards=3)
    proc.send_signal(signal.SIGKILL)
    try:  # its output pipes close only when every worker is gone too
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        raise AssertionError("a worker outlived the killed make_shards (an orphan holding its pipes)") from None
    assert not os.path.exists(os.path.join(out, "dataset.json"))
    n_before = len(glob.glob(os.path.join(out, "train-*.tar")))
    assert 3 <= n_before < SMALL["classes"] * SMALL["train_per_class"] // 2, "kill came too late to test anything"
    # every tar that exists is complete: it reads to the end and its index matches
    for tar in glob.glob(os.path.join(out, "*.tar")):
        assert len(list(iter_tar_samples(tar))) == len(read_index(tar[:-4] + ".idx")) == 2
    # the rerun finishes the job, and the result equals an uninterrupted run's
    assert subprocess.run(cmd, capture_output=True, cwd=REPO).returncode == 0
    ref = str(tmp_path / "ref" / "out")
    assert subprocess.run(cmd[:3] + [ref] + cmd[4:], capture_output=True, cwd=REPO).returncode == 0
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for f in os.listdir(ref):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(ref, f), "rb").read(), f
    # other options into an unfinished directory are refused
    os.remove(os.path.join(out, "dataset.json"))
    open(os.path.join(out, "_progress.jsonl"), "w").write('{"options": {}, "source": "x"}\n')
    r = subprocess.run(cmd + ["--quality", "50"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 2 and "unfinished run with other options" in r.stderr


def test_verify_reports_problems(made, tmp_path):
    out = str(tmp_path / "bad")
    shutil.copytree(made["folder"], out)
    with open(os.path.join(out, "train-000001.tar"), "r+b") as f:
        f.seek(3000)
        f.write(b"garbage")
    os.remove(os.path.join(out, "val-000000.idx"))
    problems = verify_shards.verify(out)
    assert any("train-000001.tar: size or sha256 differs" in p for p in problems)
    assert any("val-000000.idx: missing" in p for p in problems)
    assert verify_shards.verify(str(tmp_path / "nothing"))[0].endswith("no such shard directory")
    # a shard path that is a directory: one line, no traceback
    os.remove(os.path.join(out, "train-000002.tar"))
    os.makedirs(os.path.join(out, "train-000002.tar"))
    assert f"{out}/train-000002.tar: cannot read (Is a directory)" in verify_shards.verify(out)
    # an empty split is a problem, not "OK"
    m = json.load(open(os.path.join(out, "dataset.json")))
    m["splits"]["val"] = {"samples": 0, "shards": []}
    open(os.path.join(out, "dataset.json"), "w").write(json.dumps(m))
    assert f"{out}/dataset.json: split val has no samples" in verify_shards.verify(out)
    # a manifest without its preprocessing record: one line (it used to be a KeyError)
    del m["preprocessing"]
    open(os.path.join(out, "dataset.json"), "w").write(json.dumps(m))
    assert verify_shards.verify(out) == [f"{out}/dataset.json: no 'preprocessing' dict (not written by make_shards, "
                                         "or damaged)"]


def test_source_reader_reads_tars_in_place(sources):
    root, truth = sources["tars"]
    src = open_source(root)
    s = src.splits["train"][0]
    assert s.path.endswith("ILSVRC2012_img_train.tar") and s.size > 0
    assert Image.open(io.BytesIO(s.read())).size[0] > 0
    assert not any(n.endswith(".JPEG") for n in os.listdir(root))  # nothing was extracted
    with pytest.raises(SourceError, match="unknown layout 'x'"):
        open_source(root, layout="x")


def test_dali_and_webdataset_read_the_shards(made):
    out = made["folder"]
    m = load_manifest(out)
    paths = [os.path.join(out, s["file"]) for s in m["splits"]["val"]["shards"]]
    expected = [(k, int(s["cls"])) for k, s in all_samples(out, "val")]

    import webdataset as wds
    ds = wds.WebDataset(paths, shardshuffle=False).decode("rgb8").to_tuple("__key__", "jpg", "cls")
    got = [(k, c) for k, img, c in ds]
    assert got == expected
    assert next(iter(ds))[1].shape == (256, 256, 3)

    from nvidia.dali import fn, pipeline_def
    @pipeline_def(batch_size=len(expected), num_threads=1, device_id=None)
    def pipe():
        jpg, cls = fn.readers.webdataset(paths=paths, index_paths=[p[:-4] + ".idx" for p in paths],
                                         ext=["jpg", "cls"], missing_component_behavior="error")
        return fn.decoders.image(jpg, device="cpu"), cls
    p = pipe()
    p.build()
    imgs, cls = p.run()
    assert [int(bytes(np.array(cls[i]))) for i in range(len(expected))] == [c for _, c in expected]
    assert np.array(imgs[0]).shape == (256, 256, 3)


def test_ustar_header_is_tarfiles():
    """The template header must be byte for byte what tarfile writes (shards stay as they were)."""
    from pipeline.shards import ustar_header
    for name, size in (("n01440764_10026.jpg", 123456), ("ILSVRC2012_val_00000001.json", 0), ("k.cls", 3)):
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, 0, 0o644
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    with pytest.raises(ValueError, match="too long"):
        ustar_header("x" * 100, 1)


def test_shard_reader_agrees_with_tarfile(made):
    """pipeline.shards' own tar reader gives what the standard library's tarfile gives."""
    for split in ("train", "val"):
        for shard in load_manifest(made["folder"])["splits"][split]["shards"]:
            path = os.path.join(made["folder"], shard["file"])
            assert list(iter_tar_samples(path)) == list(tarfile_samples(path))


@pytest.mark.parametrize("case", ["cut_in_member", "cut_at_member", "bad_checksum", "pax_header"])
def test_shard_reader_rejects_what_is_not_a_whole_ustar_shard(tmp_path, case):
    from pipeline.shards import ShardError, ShardWriter
    path = str(tmp_path / "train-000000.tar")
    w = ShardWriter()
    for i in range(3):
        w.add(f"k{i}", b"\xff\xd8" + bytes(range(256)) * 3, i, {"i": i})
    w.finish(path)
    data = bytearray(open(path, "rb").read())
    if case == "cut_in_member":
        data = data[:1000]
    elif case == "cut_at_member":
        data = data[:read_index(path[:-4] + ".idx")[1].members[0][1] - 512]  # just before sample 1's header
    elif case == "bad_checksum":
        data[1] ^= 1  # a byte of the first member's name
    else:  # a pax extended header, as tarfile writes for a name over 100 bytes
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
            info = tarfile.TarInfo("x" * 120 + ".jpg")
            info.size = 1
            tf.addfile(info, io.BytesIO(b"x"))
        data = bytearray(buf.getvalue())
    open(path, "wb").write(bytes(data))
    expected = {"cut_in_member": "truncated: member", "cut_at_member": "truncated: no end-of-archive",
                "bad_checksum": "checksum mismatch at byte 0", "pax_header": "unsupported tar entry type b'x'"}[case]
    with pytest.raises(ShardError, match=expected) as e:
        list(iter_tar_samples(path))
    assert str(e.value).startswith(path + ": ")


def test_every_shard_is_on_disk_before_the_manifest(sources, tmp_path, monkeypatch):
    """Each tar, its index and OUT's entries are fsynced before dataset.json exists."""
    out = str(tmp_path / "out")
    synced = []
    real = make_shards.fsync_file
    monkeypatch.setattr(make_shards, "fsync_file",
                        lambda path: (synced.append((path, os.path.exists(os.path.join(out, "dataset.json")))),
                                      real(path)))
    assert build_shards(sources["folder"][0], out) == 0
    assert not any(manifest_there for _, manifest_there in synced)
    files = {os.path.basename(p) for p, _ in synced}
    for tar in glob.glob(os.path.join(out, "*.tar")):
        assert os.path.basename(tar) in files and os.path.basename(tar)[:-4] + ".idx" in files
    assert out in {p for p, _ in synced}


def test_write_error_is_one_line_and_leaves_no_manifest(sources, tmp_path, monkeypatch, capsys):
    import errno
    out = str(tmp_path / "out")

    def failing(path):
        raise OSError(errno.EIO, "Input/output error", path)
    monkeypatch.setattr(make_shards, "fsync_file", failing)
    assert build_shards(sources["folder"][0], out) == 1  # a fault, not a usage error (README: exit statuses)
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"make_shards: {out}/") and err[-1].endswith("Input/output error"), err[-1]
    assert not os.path.exists(os.path.join(out, "dataset.json"))


def test_sample_classes_differ_only_in_combination():
    """Each of 100 classes is its own (shape, colour) pair, each colour is shared by 10 classes and
    each shape by 10; past 100, the outline style makes 200 distinct appearances."""
    classes = make_sample_data.make_classes(100)
    assert len({(c.shape, c.colour) for c in classes}) == 100
    for key in ("shape", "colour"):
        counts = {}
        for c in classes:
            counts[getattr(c, key)] = counts.get(getattr(c, key), 0) + 1
        assert sorted(counts.values()) == [10] * 10, key
    assert len({(c.shape, c.colour, c.outline) for c in make_sample_data.make_classes(200)}) == 200


def test_a_channel_mean_does_not_give_the_class_away():
    """A nearest-centroid classifier on each image's mean RGB, 100 classes: 3 % measured (chance 1 %).
    Were colour to name the class, it would approach 100 %; 10 % is what colour alone could reach."""
    rng = np.random.default_rng(0)
    classes = make_sample_data.make_classes(100)
    feats = np.array([np.asarray(make_sample_data.draw_image(c, rng, (160, 120)), np.float64).reshape(-1, 3).mean(0)
                      for c in classes for _ in range(6)])
    labels = np.repeat(np.arange(100), 6)
    train = np.arange(len(labels)) % 6 < 4
    centroids = np.stack([feats[train & (labels == c)].mean(0) for c in range(100)])
    pred = np.argmin(((feats[~train][:, None] - centroids[None]) ** 2).sum(-1), 1)
    assert (pred == labels[~train]).mean() < 0.10


@pytest.mark.parametrize("size", [(600, 300), (300, 600), (150, 100)])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_resize_and_centre_crop_geometry_on_a_gradient(size, axis):
    """A lossless grey source that ramps along `axis` from 0 to 255 across the central square: the
    stored 256 image must be that square, scaled: output pixel j samples source coordinate
    c0 + (j + 0.5) s - 0.5 with s = side / 256, so it reads 255 (j + 0.5) / 256 - 0.5 / side * 255,
    about j + 0.5 (1 grey level per pixel: a one-pixel shift moves the mean error by 1)."""
    w, h = size
    side = min(w, h)
    c0 = ((w if axis == "x" else h) - side) / 2
    coord = np.arange(w if axis == "x" else h, dtype=np.float64)
    ramp = np.clip(255 * (coord - c0) / (side - 1), 0, 255)
    grey = np.broadcast_to(ramp[None, :] if axis == "x" else ramp[:, None], (h, w))
    buf = io.BytesIO()
    Image.fromarray(grey.round().astype(np.uint8), "L").save(buf, "PNG")
    data, orig = make_shards.process_image(buf.getvalue(), make_shards.ShardOptions(quality=95))
    out = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float64)[..., 0]
    assert orig == (w, h) and out.shape == (256, 256)
    j = np.arange(256)
    expected = 255 * ((j + 0.5) * side / 256 - 0.5) / (side - 1)
    expected = expected[None, :] if axis == "x" else expected[:, None]
    inner = slice(8, 248)  # the filter's support reaches past the box near its edges
    err = out[inner, inner] - np.broadcast_to(expected, (256, 256))[inner, inner]
    assert abs(err.mean()) < 0.3 and np.abs(err).max() < 2.5, (err.mean(), np.abs(err).max())


def test_skipped_reasons_are_the_same_in_two_identical_runs(sources, tmp_path):
    """An unidentifiable file under --allow-skips: PIL's message named its in-memory file by address
    ('<_io.BytesIO object at 0x...>'), so two identical runs wrote different manifests."""
    root = _copy_source(sources, tmp_path)
    bad = os.path.join(root, "train", "n91000002", "n91000002_1014.JPEG")
    open(bad, "wb").write(b"not an image at all" * 10)
    reasons = []
    for k in range(2):
        out = str(tmp_path / f"out{k}")
        assert build_shards(root, out, "--allow-skips") == 0
        reasons.append(load_manifest(out)["skipped"])
    assert reasons[0] == reasons[1] and "0x" not in reasons[0][0]["reason"], reasons
    assert reasons[0][0]["reason"].startswith("UnidentifiedImageError: cannot identify image file")


def test_sizes_below_the_training_crop_and_non_empty_sample_dirs_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        make_shards.main([str(tmp_path), str(tmp_path / "out"), "--size", "200"])
    assert e.value.code == 2 and "--size in 224..4096" in capsys.readouterr().err
    (tmp_path / "sample").mkdir()
    (tmp_path / "sample" / "x").write_text("mine")
    assert make_sample_data.main([str(tmp_path / "sample"), "--classes", "2"]) == 2
    assert "not empty" in capsys.readouterr().err and os.listdir(tmp_path / "sample") == ["x"]


# ---------------------------------------------------------------- reruns of an unfinished OUT

def _same_dirs(out: str, ref: str) -> None:
    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))
    for f in os.listdir(ref):
        assert open(os.path.join(out, f), "rb").read() == open(os.path.join(ref, f), "rb").read(), f


def _truncate(path: str) -> bytes:
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    return data


def test_a_file_deleted_after_a_failed_run_is_never_mixed_in(sources, tmp_path, capsys):
    """The natural path after a decode failure: the run fails naming the file, the user deletes it and
    reruns. Before, the rerun kept the train shards of the first run (cut from another shuffle) and
    exited 0 with duplicates, missing samples and the deleted file's. Now every shard whose source
    files differ is made again: the result equals a fresh run on the changed source."""
    root = _copy_source(sources, tmp_path)
    bad = os.path.join(root, "train", "n91000003", "n91000003_1007.JPEG")
    _truncate(bad)
    out = str(tmp_path / "out")
    assert build_shards(root, out, "--shard-samples", "4") == 1
    assert len(glob.glob(os.path.join(out, "train-*.tar"))) > 0  # shards of the failed run, journaled
    os.remove(bad)
    capsys.readouterr()
    assert build_shards(root, out, "--shard-samples", "4") == 0
    captured = capsys.readouterr()
    assert "the source changed since the unfinished run" in captured.err
    ref = str(tmp_path / "ref")
    assert build_shards(root, ref, "--shard-samples", "4") == 0
    _same_dirs(out, ref)
    # the rate counts the images this run made (all train shards: the shuffle changed), not the val it kept
    made = SMALL["classes"] * SMALL["train_per_class"] - 1
    kept = SMALL["classes"] * SMALL["val_per_class"]
    assert f": {made} images made (" in captured.out and f", {kept} kept from the unfinished run" in captured.out


def test_a_file_replaced_under_the_same_name_remakes_its_shard(sources, tmp_path, capsys):
    """Same file set, one train image replaced by another picture (size and mtime differ): only the
    shard holding it is made again, and the result equals a fresh run."""
    root = _copy_source(sources, tmp_path)
    bad_val = os.path.join(root, "val", "n91000001", sorted(os.listdir(os.path.join(root, "val", "n91000001")))[0])
    original = _truncate(bad_val)  # the first run fails in val, after every train shard is done
    out = str(tmp_path / "out")
    assert build_shards(root, out, "--shard-samples", "4") == 1
    open(bad_val, "wb").write(original)
    replaced = os.path.join(root, "train", "n91000002", "n91000002_1014.JPEG")
    Image.new("RGB", (300, 280), (200, 30, 90)).save(replaced, "JPEG")
    capsys.readouterr()
    assert build_shards(root, out, "--shard-samples", "4") == 0
    assert "1 of its" in capsys.readouterr().err  # one train shard changed; the other journaled ones are kept
    ref = str(tmp_path / "ref")
    assert build_shards(root, ref, "--shard-samples", "4") == 0
    _same_dirs(out, ref)


def test_a_half_written_journal_line_is_dropped_and_the_run_finishes(sources, tmp_path, capsys):
    """A kill while the journal's last line was being written: before, the rerun died in a traceback."""
    root = _copy_source(sources, tmp_path)
    bad_val = os.path.join(root, "val", "n91000001", sorted(os.listdir(os.path.join(root, "val", "n91000001")))[0])
    original = _truncate(bad_val)
    out = str(tmp_path / "out")
    assert build_shards(root, out, "--shard-samples", "4") == 1
    open(bad_val, "wb").write(original)
    journal = os.path.join(out, "_progress.jsonl")
    lines = open(journal).read().splitlines(keepends=True)
    with open(journal, "a") as f:
        f.write('{"plan": "0123", "shard": {"by')
    capsys.readouterr()
    assert build_shards(root, out, "--shard-samples", "4") == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "_progress.jsonl:" in err and "half-written last line" in err
    ref = str(tmp_path / "ref")
    assert build_shards(root, ref, "--shard-samples", "4") == 0
    _same_dirs(out, ref)
    # a damaged line that is not the last is refused with one line
    os.remove(os.path.join(out, "dataset.json"))
    open(journal, "w").write("".join([lines[0], "not json\n", *lines[1:]]))
    capsys.readouterr()
    assert build_shards(root, out, "--shard-samples", "4") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("make_shards: ")]
    assert len(err) == 1 and "_progress.jsonl:2: not a journal line" in err[0], err
    # valid JSON of the wrong shape: one line too (it used to be a TypeError)
    open(journal, "w").write("".join([lines[0], "[1, 2, 3]\n", *lines[1:]]))
    capsys.readouterr()
    assert build_shards(root, out, "--shard-samples", "4") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("make_shards: ")]
    assert len(err) == 1 and "_progress.jsonl:2: not a journal record" in err[0], err


@pytest.mark.slow
def test_a_worker_killed_with_sigkill_ends_the_run_instead_of_hanging(sources, tmp_path):
    """multiprocessing.Pool replaced a killed worker and waited for its shard forever."""
    root, _ = sources["folder"]
    out = str(tmp_path / "out")
    proc, cmd = _start_make_shards(root, out, workers=2, shard_samples=1, wait_for_shards=2)
    workers = [int(p) for p in open(f"/proc/{proc.pid}/task/{proc.pid}/children").read().split()]
    assert workers, "no worker processes to kill"
    os.kill(workers[0], signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("make_shards hung after its worker was killed")
    lines = [line for line in err.splitlines() if line.startswith("make_shards: ")]
    assert proc.returncode == 1 and len(lines) == 1 and "a worker process died while making" in lines[0], err
    assert not os.path.exists(os.path.join(out, "dataset.json"))
    assert subprocess.run(cmd, capture_output=True, cwd=REPO).returncode == 0  # the rerun finishes


def test_any_file_name_gives_keys_both_formats_take(tmp_path):
    """Spaces broke the .idx lines (make_shards exited 0, then verify_shards and train failed), a name
    over ~96 bytes crashed make_shards (ustar names hold 100), dots were refused. Every name now gets a
    safe key, and the sample's .json keeps where it came from."""
    root = str(tmp_path / "src")
    make_sample_data.generate(root, "folder", classes=2, train_per_class=6, val_per_class=2, seed=3, quirks=False)
    folder = os.path.join(root, "train", sorted(os.listdir(os.path.join(root, "train")))[0])
    files = sorted(os.listdir(folder))
    odd = ["my photo 1.JPEG", "a.b.c.JPEG", "x" * 150 + ".JPEG", "café crème.jpg", "n1_ok-plain.JPEG"]
    for name, new in zip(files, odd):
        os.rename(os.path.join(folder, name), os.path.join(folder, new))
    out = str(tmp_path / "out")
    assert build_shards(root, out, "--shard-samples", "4") == 0
    assert verify_shards.verify(out) == []
    keys = {json.loads(s["json"])["source"]: k for k, s in all_samples(out, "train")}
    wnid = os.path.basename(folder)
    for name in odd:
        key = keys[os.path.join("train", wnid, name)]
        assert len(key.encode()) <= 64 and all(c.isascii() and (c.isalnum() or c in "_-") for c in key), key
    assert keys[os.path.join("train", wnid, "n1_ok-plain.JPEG")] == "n1_ok-plain"  # plain stems stay as they are
    assert len(set(keys.values())) == len(keys) == 12
    from pipeline import make_loader
    from tools import compute_pca
    assert compute_pca.main([out, "--quiet"]) == 0
    for backend in ("dali", "wds"):
        assert sum(len(y) for _, y in make_loader(out, "train", batch_size=4, backend=backend, num_threads=2)) == 12


def test_exif_orientation_and_16_bit_pngs_as_a_viewer_shows_them_in_shards_and_predict(tmp_path):
    """A JPEG stored 300x200 (left half red, right half blue) with EXIF orientation 6 ('rotate 90
    clockwise to show'): shown upright it is 200x300 with red on top, blue below. A 16-bit grayscale
    PNG with halves at 10000 and 50000 of 65535: 8-bit values 10000*255/65535 = 38.9 and 194.5 (PIL's
    convert("RGB") clipped both to 255). make_shards and predict must both see exactly that."""
    from model.predict import preprocess
    from pipeline.normalization import Normalization
    root = str(tmp_path / "src")
    make_sample_data.generate(root, "folder", classes=2, train_per_class=2, val_per_class=1, seed=4, quirks=False)
    folder = os.path.join(root, "train", sorted(os.listdir(os.path.join(root, "train")))[0])
    stored = np.zeros((200, 300, 3), np.uint8)
    stored[:, :150] = (220, 20, 20)
    stored[:, 150:] = (20, 20, 220)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(os.path.join(folder, "exif6.JPEG"), quality=95, exif=exif.tobytes())
    gray = np.zeros((200, 300), np.uint16)
    gray[:, :150], gray[:, 150:] = 10000, 50000
    Image.fromarray(gray).save(os.path.join(folder, "gray16.png"))
    assert Image.open(os.path.join(folder, "gray16.png")).mode.startswith("I")  # a 16-bit PNG indeed
    out = str(tmp_path / "out")
    assert build_shards(root, out) == 0
    shard = {json.loads(s["json"])["source"].rsplit("/", 1)[1]: np.asarray(Image.open(io.BytesIO(s["jpg"])))
             for _, s in all_samples(out, "train")}
    raw = Normalization(mode="none")
    for name, pixels in (("exif6.JPEG", shard["exif6.JPEG"]), ("gray16.png", shard["gray16.png"])):
        seen = preprocess(os.path.join(folder, name), raw).numpy().transpose(1, 2, 0)  # the centre 224
        np.testing.assert_array_equal(seen, pixels[16:240, 16:240].astype(np.float32))  # the same pixels
    upright = shard["exif6.JPEG"].astype(float)
    assert np.abs(upright[:100, 100:156] - (220, 20, 20)).max() < 12   # top: red
    assert np.abs(upright[156:, 100:156] - (20, 20, 220)).max() < 12   # bottom: blue
    g = shard["gray16.png"].astype(float)  # the central square of 200x300 is columns 50-250: halves at 128
    assert np.abs(g[:, :100] - 38.9).max() < 2 and np.abs(g[:, 156:] - 194.5).max() < 2


def test_verify_shards_shows_progress(made, capsys):
    assert verify_shards.main([made["folder"]]) == 0
    err = capsys.readouterr().err
    assert "100%" in err and "img" in err  # the bar's last state: every sample checked
    assert verify_shards.main([made["folder"], "--quiet"]) == 0
    assert "%" not in capsys.readouterr().err


@pytest.mark.parametrize("flags, needle", [
    (["--splits", "train,train"], "--splits takes train, val or train,val (each once)"),
    (["--seed", "-1"], "--seed must be in [0, 2^63), not -1"),
    (["--seed", str(2 ** 64)], "--seed must be in [0, 2^63)"),
    (["--size", "40000"], "--size in 224..4096"),
])
def test_bad_options_are_refused_before_out_exists(sources, tmp_path, capsys, flags, needle):
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as e:
        make_shards.main([sources["folder"][0], out, *flags])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not os.path.exists(out)


def test_what_is_not_used_is_named_and_hidden_folders_are_no_classes(sources, tmp_path, capsys):
    """.ipynb_checkpoints is no class; a .gif, a .txt and an image outside the class folders are
    not used, and each is named in the summary and in dataset.json's `unused`."""
    root = _copy_source(sources, tmp_path)
    os.makedirs(os.path.join(root, "train", ".ipynb_checkpoints"))
    shutil.copy(os.path.join(root, "train", "n91000000", sorted(os.listdir(os.path.join(root, "train", "n91000000")))[0]),
                os.path.join(root, "train", "stray.JPEG"))
    open(os.path.join(root, "train", "n91000001", "anim.gif"), "wb").write(b"GIF89a")
    open(os.path.join(root, "val", "n91000002", "notes.txt"), "w").write("x")
    out = str(tmp_path / "out")
    assert build_shards(root, out) == 0
    m = load_manifest(out)
    assert [c["wnid"] for c in m["classes"]] == [f"n9100000{i}" for i in range(SMALL["classes"])]
    assert sorted(u["source"] for u in m["unused"]) == ["train/.ipynb_checkpoints", "train/n91000001/anim.gif",
                                                         "train/stray.JPEG", "val/n91000002/notes.txt"]
    assert "not used: 4 (listed in dataset.json's `unused`)" in capsys.readouterr().out
    # and with --any-class-names, folder names of any kind are classes
    for split in ("train", "val"):
        os.rename(os.path.join(root, split, "n91000000"), os.path.join(root, split, "Bird Photos"))
    out2 = str(tmp_path / "out2")
    assert build_shards(root, out2, "--any-class-names") == 0
    assert load_manifest(out2)["classes"][0]["wnid"] == "Bird Photos"


def test_a_rerun_after_the_source_shrank_leaves_no_stale_shard(sources, tmp_path, capsys):
    """An unfinished run made 3 train shards; the source then lost images, so the rerun makes 2: the
    third is removed, and no train-*.tar is left that the manifest does not list."""
    root = _copy_source(sources, tmp_path)
    bad = os.path.join(root, "train", "n91000003", "n91000003_1007.JPEG")
    data = open(bad, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    out = str(tmp_path / "out")
    assert build_shards(root, out, "--shard-samples", "16") == 1  # fails, keeps the shards it made
    before = sorted(glob.glob(os.path.join(out, "train-*.tar")))
    for wnid in ("n91000003", "n91000004"):
        shutil.rmtree(os.path.join(root, "train", wnid))
        shutil.rmtree(os.path.join(root, "val", wnid))
    assert build_shards(root, out, "--shard-samples", "16") == 0
    listed = {s["file"] for s in load_manifest(out)["splits"]["train"]["shards"]}
    on_disk = {os.path.basename(p) for p in glob.glob(os.path.join(out, "train-*.tar"))}
    assert on_disk == listed == {"train-000000.tar", "train-000001.tar"}
    assert os.path.join(out, "train-000002.tar") in before  # made by the first run, not by the second
    assert {p[:-4] + ".idx" for p in on_disk} == {os.path.basename(p) for p in glob.glob(os.path.join(out, "train-*.idx"))}
    assert "removed" in capsys.readouterr().err


def test_a_split_with_no_images_is_an_error(sources, tmp_path, capsys):
    """Every val image undecodable, --allow-skips: exit 1 and no dataset.json (it used to say 'val: 0
    images' and exit 0)."""
    root = _copy_source(sources, tmp_path)
    for path in glob.glob(os.path.join(root, "val", "*", "*")):
        open(path, "wb").write(b"not an image")
    out = str(tmp_path / "out")
    assert build_shards(root, out, "--allow-skips") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("make_shards: ")]
    assert err == [f"make_shards: split val has no images ({SMALL['classes'] * SMALL['val_per_class']} skipped); "
                   "no dataset.json written. Leave it out with --splits if that is what you want."]
    assert not os.path.exists(os.path.join(out, "dataset.json"))


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_the_rerun_finishes(sources, tmp_path):
    root = _copy_source(sources, tmp_path)
    out = str(tmp_path / "out")
    proc, cmd = _start_make_shards(root, out, workers=2, shard_samples=2, wait_for_shards=1)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    lines = [ln for ln in stderr.splitlines() if ln.strip() and "%|" not in ln and not ln.startswith("source:")]
    assert proc.returncode == 130 and "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert lines == [f"make_shards: interrupted; the shards finished are kept in {out}, and the same command "
                     "finishes the job"], lines
    assert subprocess.run(cmd, capture_output=True, cwd=REPO, timeout=120).returncode == 0


def test_a_file_changed_in_place_with_its_size_and_mtime_kept_needs_rehash(sources, tmp_path, capsys):
    """Bytes rewritten in place, size and mtime put back (touch -r): by path, size and mtime nothing
    changed, and the shard is kept (the documented choice); with --rehash on both runs, the contents
    are compared and only that shard is made again, which then equals a fresh run's."""
    root = _copy_source(sources, tmp_path)
    bad_val = os.path.join(root, "val", "n91000001", sorted(os.listdir(os.path.join(root, "val", "n91000001")))[0])
    original = _truncate(bad_val)
    changed = os.path.join(root, "train", "n91000002", "n91000002_1014.JPEG")
    for rehash in ([], ["--rehash"]):
        out = str(tmp_path / f"out{len(rehash)}")
        open(bad_val, "wb").write(original[: len(original) // 2])
        assert build_shards(root, out, "--shard-samples", "4", *rehash) == 1  # fails in val; train is done
        open(bad_val, "wb").write(original)
        data, st = open(changed, "rb").read(), os.stat(changed)
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x10  # inside the entropy-coded data: still a JPEG, other pixels
        open(changed, "wb").write(bytes(flipped))
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))
        capsys.readouterr()
        assert build_shards(root, out, "--shard-samples", "4", *rehash) == 0
        err = capsys.readouterr().err
        if rehash:
            assert "by content (--rehash)): 1 of its" in err
            ref = str(tmp_path / "ref")
            assert build_shards(root, ref, "--shard-samples", "4") == 0
            _same_dirs(out, ref)
        else:
            assert "source changed" not in err  # kept: size and mtime say unchanged
        open(changed, "wb").write(data)
        os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_an_image_too_wide_to_store_says_encode_not_decode(sources, tmp_path, capsys):
    """--keep-aspect on a 30000x10 panorama: 256 px high makes it 768,000 px wide, past JPEG's 65,535; it
    decodes fine, so the line says it cannot be encoded (it used to say 'cannot decode')."""
    root = _copy_source(sources, tmp_path)
    wide = os.path.join(root, "train", "n91000000", "n91000000_wide.JPEG")
    Image.new("RGB", (30000, 10), (10, 200, 30)).save(wide, "PNG")
    assert build_shards(root, str(tmp_path / "out"), "--keep-aspect") == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("make_shards: ")]
    assert err[0].startswith(f"make_shards: {wide}: cannot encode (EncodeError: the 768000x256 result cannot be "
                             "written as a JPEG"), err


def test_a_decompression_bomb_warning_names_the_file(tmp_path, capfd, monkeypatch):
    """PIL warns of an image with more pixels than MAX_IMAGE_PIXELS without naming it; make_shards
    names it. (The limit is lowered here; the forked workers inherit it.)"""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 15_000)
    root = tmp_path / "src"
    for split in ("train", "val"):
        for c in ("n00000001", "n00000002"):
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (100, 100), (200, 20, 20)).save(root / split / c / f"{c}_{split}_1.JPEG", "JPEG")
    big = root / "train" / "n00000001" / "n00000001_big.JPEG"
    Image.new("RGB", (150, 150), (20, 20, 200)).save(big, "JPEG")  # 22,500 px: a warning, not yet an error
    assert build_shards(str(root), str(tmp_path / "out")) == 0
    err = capfd.readouterr().err
    assert "make_shards: train/n00000001/n00000001_big.JPEG: warning: Image size (22500 pixels) exceeds limit" in err


# ---------------------------------------------------------------- the Fall 2011 release (ImageNet-21K)

FALL11 = ("fall11-tar", "fall11-tars", "fall11-folders")


@pytest.fixture(scope="module")
def fall11_sources(tmp_path_factory):
    """The same 4 synsets (7, 7, 7, 7 images) in the release's three distributions."""
    out = {}
    for layout in FALL11:
        root = str(tmp_path_factory.mktemp(layout))
        out[layout] = (root, make_sample_data.generate(root, layout, classes=4, train_per_class=7, val_per_class=1,
                                                       seed=3, quirks=False))
    return out


def _keys_by_split(out: str) -> dict:
    manifest = load_manifest(out)
    return {split: [key for s in info["shards"] for key, _ in tarfile_samples(os.path.join(out, s["file"]))]
            for split, info in manifest["splits"].items()}


@pytest.mark.parametrize("fraction, per_class", [(0.5, 4), (0.3, 2)])  # round(7 x F), halves up: 3.5 -> 4, 2.1 -> 2
def test_fall11_every_image_once_and_the_val_fraction_exact_per_class(fall11_sources, tmp_path, fraction, per_class):
    digests, samples = {}, {}
    for layout in FALL11:
        root, truth = fall11_sources[layout]
        for workers in ("1", "2"):
            out = str(tmp_path / f"{layout}-{workers}")
            assert make_shards.main([root, out, "--val-fraction", str(fraction), "--workers", workers,
                                     "--shard-samples", "3"]) == 0
            keys = _keys_by_split(out)
            assert sorted(keys["train"] + keys["val"]) == sorted(truth["train"])  # every image exactly once
            assert not set(keys["train"]) & set(keys["val"])
            val_per_class = {}
            for key in keys["val"]:
                val_per_class[truth["train"][key]] = val_per_class.get(truth["train"][key], 0) + 1
            assert val_per_class == {wnid: per_class for wnid, _ in truth["classes"]}
            manifest = load_manifest(out)
            assert manifest["options"]["val_fraction"] == fraction and manifest["options"]["seed"] == 0
            assert [c["name"] for c in manifest["classes"]] == [name for _, name in truth["classes"]]  # words.txt
            digests[(layout, workers)] = [s["sha256"] for split in ("train", "val")
                                          for s in manifest["splits"][split]["shards"]]
            samples[layout] = [(key, sample["jpg"], sample["cls"]) for split in ("train", "val")
                               for s in manifest["splits"][split]["shards"]
                               for key, sample in tarfile_samples(os.path.join(out, s["file"]))]
        assert digests[(layout, "1")] == digests[(layout, "2")]  # byte-identical whatever the workers
    # the same samples in the same shards whatever the distribution (each sample's .json names its own source)
    assert samples["fall11-tar"] == samples["fall11-tars"] == samples["fall11-folders"]
    rerun = str(tmp_path / "rerun")
    assert make_shards.main([fall11_sources["fall11-tar"][0], rerun, "--val-fraction", str(fraction),
                             "--shard-samples", "3", "--workers", "2"]) == 0
    assert [s["sha256"] for split in ("train", "val") for s in load_manifest(rerun)["splits"][split]["shards"]] \
        == digests[("fall11-tar", "1")]


def test_held_out_is_the_class_own_draw():
    """The val images of a class depend on the seed and the class only, and their count is round(F n)."""
    from tools.imagenet_source import held_out
    a = held_out(10, 0.5, 0, "n01440764")
    assert len(a) == 5 and a == held_out(10, 0.5, 0, "n01440764")
    assert a != held_out(10, 0.5, 1, "n01440764") or a != held_out(10, 0.5, 2, "n01440764")
    assert len(held_out(3, 0.5, 0, "n01440764")) == 2 and len(held_out(1, 0.4, 0, "n01440764")) == 0


@pytest.mark.parametrize("args, needle", [
    (["--val-fraction", "1.0"], "--val-fraction must be in (0, 1)"),
    (["--val-fraction", "-0.1"], "--val-fraction must be in (0, 1)"),
    (["--val-fraction", "nan"], "--val-fraction must be in (0, 1)"),
])
def test_fall11_bad_val_fraction_is_refused(fall11_sources, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit) as e:
        make_shards.main([fall11_sources["fall11-tars"][0], str(tmp_path / "out"), *args])
    assert e.value.code == 2 and needle in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_fall11_without_a_val_fraction_and_a_val_fraction_elsewhere_are_refused(fall11_sources, sources, tmp_path,
                                                                                 capsys):
    cases = [([fall11_sources["fall11-folders"][0]], "the Fall 2011 release has no validation split: give --val-fraction"),
             ([sources["folder"][0], "--val-fraction", "0.5"], "--val-fraction is for the Fall 2011 release"),
             ([str(tmp_path)], "unknown layout")]
    for argv, needle in cases:
        out = str(tmp_path / "out")
        assert make_shards.main([argv[0], out, *argv[1:]]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("make_shards: ")]
        assert len(err) == 1 and needle in err[0], err
        assert not os.path.exists(os.path.join(out, "dataset.json"))


# ---------------------------------------------------------------- make_shards in parts (several nodes)

def _part(root, out, i, n, *extra):
    return make_shards.main([root, out, "--shard-samples", "4", "--workers", "1", "--part", f"{i}/{n}", *extra])


def test_any_number_of_parts_gives_one_nodes_shards_byte_for_byte(sources, tmp_path):
    root = sources["folder"][0]
    one = str(tmp_path / "one")
    assert build_shards(root, one, "--shard-samples", "4") == 0
    for n in (1, 2, 3, 4):
        out = str(tmp_path / f"parts{n}")
        for i in range(n, 0, -1):  # in any order, as nodes finish
            assert _part(root, out, i, n) == 0
            assert not os.path.exists(os.path.join(out, "dataset.json"))  # only --merge writes it
        assert make_shards.main(["--merge", out]) == 0
        _same_dirs(out, one)  # every shard, index and dataset.json, byte for byte
        assert not glob.glob(os.path.join(out, "_progress*"))


def test_merge_names_missing_and_inconsistent_parts(sources, tmp_path, capsys):
    root = sources["folder"][0]
    out = str(tmp_path / "out")
    assert _part(root, out, 1, 3) == 0 and _part(root, out, 3, 3) == 0
    capsys.readouterr()
    assert make_shards.main(["--merge", out]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("make_shards: ")]
    assert len(err) == 1 and "part 2 of 3 not finished" in err[0] and "--part 2/3" in err[0], err
    assert not os.path.exists(os.path.join(out, "dataset.json"))
    # part 2 with other options: named
    assert make_shards.main([root, out, "--shard-samples", "4", "--workers", "1", "--part", "2/3", "--quality", "80"]) == 0
    capsys.readouterr()
    assert make_shards.main(["--merge", out]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("make_shards: ")]
    assert len(err) == 1 and "part 2 was made with other options" in err[0], err
    # part 2 made again with part 1's options (its odd journal removed first): the merge goes through
    os.remove(os.path.join(out, make_shards.part_journal(2, 3)))
    assert _part(root, out, 2, 3) == 0
    assert make_shards.main(["--merge", out]) == 0


def test_a_killed_part_reruns_only_its_own_shards(sources, tmp_path, capsys):
    """A part rerun keeps what its journal records (the others' shards are not its business); a part
    whose last line is missing (killed before it finished) is reported as not finished by --merge."""
    root = sources["folder"][0]
    out = str(tmp_path / "out")
    assert _part(root, out, 1, 2) == 0 and _part(root, out, 2, 2) == 0
    journal = os.path.join(out, make_shards.part_journal(2, 2))
    lines = open(journal).read().splitlines(keepends=True)
    open(journal, "w").write("".join(lines[:-2]))  # killed: its last shard and its end line lost
    capsys.readouterr()
    assert make_shards.main(["--merge", out]) == 2
    assert "part 2 of 2 not finished" in capsys.readouterr().err
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out) if f.endswith(".tar")}
    assert _part(root, out, 2, 2) == 0  # only the lost shard is made again:
    after = {f: os.path.getmtime(os.path.join(out, f)) for f in before}
    assert sum(before[f] != after[f] for f in before) == 1
    assert make_shards.main(["--merge", out]) == 0


def test_a_tar_of_tars_listing_is_read_again_only_while_the_tar_is_unchanged(fall11_sources, tmp_path, monkeypatch):
    """With a cache directory, the listing of fall11_whole.tar (or ILSVRC2012_img_train.tar) is written
    there and read back instead of the tar's headers, sample for sample the same; a tar with another
    mtime or size is listed again, and a damaged cache is listed over."""
    from tools import imagenet_source
    root = str(tmp_path / "src")
    shutil.copytree(fall11_sources["fall11-tar"][0], root)  # its tar's mtime changes below
    tar, cache_dir = os.path.join(root, "fall11_whole.tar"), str(tmp_path / "cache")

    def listing(cache=True):
        return open_source(root, layout="fall11", val_fraction=0.5, seed=0, cache_dir=cache_dir if cache else None)

    headers = listing(cache=False)
    first = listing()
    caches = glob.glob(os.path.join(cache_dir, "_listing-*.npz"))
    assert first.cached == [] and len(caches) == 1 and first.splits == headers.splits

    def no_headers(*args, **kwargs):
        raise AssertionError("read the tar's headers")
    monkeypatch.setattr(imagenet_source.tarfile, "open", no_headers)
    again = listing()
    assert again.cached == caches and again.classes == headers.classes
    assert again.splits == headers.splits and sum(map(len, again.splits.values())) == 28
    st = os.stat(tar)
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the same bytes, another mtime
    with pytest.raises(AssertionError, match="read the tar's headers"):
        listing()
    monkeypatch.undo()
    os.utime(tar, ns=(st.st_atime_ns, st.st_mtime_ns))
    with open(caches[0], "r+b") as f:  # damaged: listed from the headers again, and rewritten
        f.seek(100)
        f.write(b"\0" * 200)
    damaged = listing()
    assert damaged.cached == [] and damaged.splits == headers.splits
    assert listing().cached == caches


def test_parts_of_a_tar_of_tars_share_its_listing_and_leave_none_behind(fall11_sources, tmp_path, capsys):
    root = fall11_sources["fall11-tar"][0]
    one = str(tmp_path / "one")
    assert make_shards.main([root, one, "--val-fraction", "0.5", "--shard-samples", "4", "--workers", "1"]) == 0
    out = str(tmp_path / "parts")
    capsys.readouterr()
    for i in (1, 2):
        assert _part(root, out, i, 2, "--val-fraction", "0.5") == 0
        read = "listing read from" in capsys.readouterr().err
        assert read == (i == 2)  # part 1 listed the headers, part 2 read its listing
    assert glob.glob(os.path.join(out, "_listing-*.npz"))
    assert make_shards.main(["--merge", out]) == 0
    _same_dirs(out, one)  # byte for byte
    assert not glob.glob(os.path.join(out, "_listing-*")) and not glob.glob(os.path.join(one, "_listing-*"))


def test_an_ascii_locale_and_a_path_with_spaces_give_the_same_shards(sources, made, tmp_path):
    """The suite and a user's shell may run under LC_ALL=C without UTF-8 coercion (an old cluster image, a
    minimal container): the class-name files are UTF-8 whatever the locale says. Before every text file was
    opened as UTF-8, a name with an accent was a UnicodeDecodeError there."""
    root = str(tmp_path / "source with spaces")
    shutil.copytree(sources["folder"][0], root)
    mapping = os.path.join(root, "LOC_synset_mapping.txt")
    lines = open(mapping, encoding="utf-8").read().splitlines()
    lines[0] = lines[0].split(" ")[0] + " café, crème brûlée"
    open(mapping, "w", encoding="utf-8").write("\n".join(lines) + "\n")
    out = str(tmp_path / "out dir")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONCOERCECLOCALE": "0", "PYTHONUTF8": "0"}
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "make_shards.py"), root, out,
                           "--workers", "2", "--shard-samples", "16"], cwd=REPO, env=env, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got, reference = load_manifest(out), load_manifest(made["folder"])
    assert got["classes"][0]["name"] == "café, crème brûlée"
    assert got["classes"][1:] == reference["classes"][1:]
    assert [s["sha256"] for s in got["splits"]["train"]["shards"]] == \
        [s["sha256"] for s in reference["splits"]["train"]["shards"]]


# ---------------------------------------------------------------- reliability round 4 (parts, caches, fall11)

def _one_line(capsys, prog="make_shards"):
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith(f"{prog}: ")]
    assert len(err) == 1, err
    return err[0]


def test_merge_refuses_parts_planned_from_different_listings(sources, tmp_path, capsys):
    """An image deleted between part 1 and part 2: each part's shards are sound, but merged they would
    hold some images twice and miss others. --merge refuses; the parts rerun against the source as it
    is now merge into what one node makes of it."""
    root = _copy_source(sources, tmp_path)
    out = str(tmp_path / "out")
    assert _part(root, out, 1, 2) == 0
    os.remove(os.path.join(root, "train", "n91000002", "n91000002_1014.JPEG"))
    assert _part(root, out, 2, 2) == 0
    capsys.readouterr()
    assert make_shards.main(["--merge", out]) == 2
    line = _one_line(capsys)
    assert "part 2 was planned from another listing of the source than part 1" in line, line
    assert not os.path.exists(os.path.join(out, "dataset.json"))
    assert _part(root, out, 1, 2) == 0 and make_shards.main(["--merge", out]) == 0
    one = str(tmp_path / "one")
    assert build_shards(root, one, "--shard-samples", "4") == 0
    _same_dirs(out, one)


def test_merge_refuses_parts_of_a_tar_replaced_between_them(fall11_sources, tmp_path, capsys):
    root = str(tmp_path / "src")
    shutil.copytree(fall11_sources["fall11-tar"][0], root)
    out = str(tmp_path / "out")
    assert _part(root, out, 1, 2, "--val-fraction", "0.5") == 0
    tar = os.path.join(root, "fall11_whole.tar")
    os.utime(tar, ns=(os.stat(tar).st_atime_ns, os.stat(tar).st_mtime_ns + 10**9))  # the same bytes, rewritten
    assert _part(root, out, 2, 2, "--val-fraction", "0.5") == 0
    capsys.readouterr()
    assert make_shards.main(["--merge", out]) == 2
    assert "planned from another listing" in _one_line(capsys)


def test_a_wrong_listing_cache_is_refused_not_trusted(fall11_sources, tmp_path, capsys):
    """Two entries of the cached listing swapped (offset and size): an image would be packed under the
    other's name and class. Each member's tar header is read with its bytes and must agree."""
    root = fall11_sources["fall11-tar"][0]
    out = str(tmp_path / "out")
    assert _part(root, out, 1, 2, "--val-fraction", "0.5") == 0
    cache = glob.glob(os.path.join(out, "_listing-*.npz"))[0]
    with np.load(cache) as z:
        columns = {k: z[k] for k in z.files}
    last = len(columns["offsets"]) - 1  # the first synset's first image and the last synset's last
    for k in ("offsets", "sizes"):
        columns[k][[0, last]] = columns[k][[last, 0]]
    with open(cache, "wb") as f:
        np.savez(f, **columns)
    capsys.readouterr()
    assert _part(root, out, 2, 2, "--val-fraction", "0.5", "--allow-skips") == 2  # never skipped as undecodable
    line = _one_line(capsys)
    assert "the listing says" in line and "but the tar has the header of" in line and "_listing-*.npz" in line, line
    os.remove(cache)
    assert _part(root, out, 2, 2, "--val-fraction", "0.5") == 0  # listed from the headers again


def test_synset_tars_beside_fall11_whole_tar_are_named_as_unused(fall11_sources, tmp_path, capsys):
    root = str(tmp_path / "src")
    shutil.copytree(fall11_sources["fall11-tar"][0], root)
    shutil.copy(os.path.join(fall11_sources["fall11-tars"][0], sorted(
        f for f in os.listdir(fall11_sources["fall11-tars"][0]) if f.endswith(".tar"))[0]), os.path.join(root, "n99999999.tar"))
    out = str(tmp_path / "out")
    assert make_shards.main([root, out, "--val-fraction", "0.5", "--workers", "1"]) == 0
    unused = load_manifest(out)["unused"]
    assert unused == [{"source": "n99999999.tar", "reason": "beside fall11_whole.tar, which is read instead"}]
    assert "not used: 1" in capsys.readouterr().out


def test_a_val_fraction_never_holds_out_a_whole_class_and_words_txt_missing_is_said(tmp_path, capsys):
    """A synset of 1 image at --val-fraction 0.5 (round(0.5) = 1 of 1) keeps its image for training,
    and says so; without words.txt the names are the wnids, and that is said too."""
    root = tmp_path / "src"
    for wnid, n in (("n00000001", 1), ("n00000002", 4)):
        os.makedirs(root / wnid)
        for k in range(n):
            Image.new("RGB", (64, 64), (10 * k, 100, 200)).save(root / wnid / f"{wnid}_{k}.JPEG", "JPEG")
    out = str(tmp_path / "out")
    assert make_shards.main([str(root), out, "--val-fraction", "0.5", "--workers", "1", "--layout", "fall11"]) == 0
    keys = _keys_by_split(out)
    assert sorted(k for k in keys["train"] if k.startswith("n00000001")) == ["n00000001_0"]
    assert len([k for k in keys["val"] if k.startswith("n00000002")]) == 2
    err = capsys.readouterr().err
    assert "1 synset(s) too small for --val-fraction 0.5 to leave an image for training keep one (n00000001: 1 image(s))" in err
    assert "words.txt: not found; the class names are the wnids" in err
    assert [c["name"] for c in load_manifest(out)["classes"]] == ["n00000001", "n00000002"]


def test_the_same_part_twice_at_once_is_refused_in_one_line(sources, tmp_path, capsys):
    import fcntl
    root, out = sources["folder"][0], str(tmp_path / "out")
    os.makedirs(out)
    with open(os.path.join(out, "_progress.part-1-of-2.lock"), "w") as held:  # a live part 1 holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write("4242\n")
        held.flush()
        assert _part(root, out, 1, 2) == 2
        line = _one_line(capsys)
        assert "another make_shards (pid 4242) is making part 1/2" in line, line
        assert _part(root, out, 2, 2) == 0  # another part is not held up
    assert _part(root, out, 1, 2) == 0 and make_shards.main(["--merge", out]) == 0
    assert not glob.glob(os.path.join(out, "_progress*"))


def test_merge_advice_works_and_a_missing_index_is_refused(sources, tmp_path, capsys):
    root, out = sources["folder"][0], str(tmp_path / "out")
    assert _part(root, out, 1, 2) == 0
    assert make_shards.main([root, out, "--shard-samples", "4", "--workers", "1", "--part", "2/2", "--quality", "80"]) == 0
    capsys.readouterr()
    assert make_shards.main(["--merge", out]) == 2
    line = _one_line(capsys)
    journal = os.path.join(out, make_shards.part_journal(2, 2))
    assert f"{journal}: part 2 was made with other options than part 1; remove this journal" in line, line
    assert _part(root, out, 2, 2) == 2  # rerunning it without removing the journal: says what works
    assert "remove this journal to make the part again with these" in _one_line(capsys)
    os.remove(journal)
    assert _part(root, out, 2, 2) == 0
    idx = sorted(glob.glob(os.path.join(out, "train-*.idx")))[1]
    os.remove(idx)
    capsys.readouterr()
    assert make_shards.main(["--merge", out]) == 2
    assert f"{idx}: missing" in _one_line(capsys)
    assert not os.path.exists(os.path.join(out, "dataset.json"))
    assert _part(root, out, 2, 2) == 0 and _part(root, out, 1, 2) == 0  # the part that lost it remakes it
    assert make_shards.main(["--merge", out]) == 0 and os.path.exists(idx)


@pytest.mark.parametrize("args, needle", [(["--val-fraction", "0"], "--val-fraction must be in (0, 1), not 0.0"),
                                          (["--quality", "101"], "--quality in 1..100")])
def test_option_messages_say_what_was_given(sources, tmp_path, capsys, args, needle):
    with pytest.raises(SystemExit):
        make_shards.main([sources["folder"][0], str(tmp_path / "out"), *args])
    assert needle in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_shards.main(["--help"])
    assert "JPEG quality 1-100" in capsys.readouterr().out


def test_sigterm_ends_make_shards_with_143_and_one_line(sources, tmp_path):
    root = sources["folder"][0]
    out = str(tmp_path / "out")
    proc, _ = _start_make_shards(root, out, workers=1, shard_samples=2, wait_for_shards=2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "make_shards: terminated (SIGTERM); the shards finished are kept" in err and "Traceback" not in err


def test_verify_names_a_stray_shard_the_manifest_does_not_list(made, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(made["folder"], out)
    shutil.copy(os.path.join(out, "train-000000.tar"), os.path.join(out, "train-000099.tar"))
    assert verify_shards.verify(out) == [f"{out}/train-000099.tar: a shard file that dataset.json does not list "
                                         "(of another run?); remove it"]


LISTING_RSS = """import os, resource, sys
sys.path.insert(0, {repo!r})
import numpy  # noqa: F401 - before the baseline
from tools.imagenet_source import open_source
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
src = open_source(sys.argv[1], layout="fall11", val_fraction=0.5, seed=0)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024, sum(len(v) for v in src.splits.values()))
"""


def _bare_fall11_tar(root: str, synsets: int, per_synset: int) -> None:
    """fall11_whole.tar of per-synset tars of 1-byte members: only the listing is measured, nothing decoded."""
    os.makedirs(root)
    member = tarfile.TarInfo("x")
    member.size = 1
    with tarfile.open(os.path.join(root, "fall11_whole.tar"), "w") as outer:
        for c in range(synsets):
            wnid, buf = f"n{c + 1:08d}", io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for k in range(per_synset):
                    member.name = f"{wnid}_{k}.JPEG"
                    inner.addfile(member, io.BytesIO(b"x"))
            info = tarfile.TarInfo(f"{wnid}.tar")
            info.size = buf.tell()
            buf.seek(0)
            outer.addfile(info, buf)


def test_the_listing_of_a_tar_of_tars_costs_under_200_bytes_an_image(tmp_path):
    """Peak resident memory of listing fall11_whole.tar at two sizes, as a slope (the process's own
    baseline cancels): it was ~430 bytes an image (SourceSample objects; ~7 GB in every part at Fall 2011's
    14.2M images), and is ~90 with the listing held as columns. 200 leaves room for any allocator."""
    sizes = {}
    for per in (20, 100):
        root = str(tmp_path / f"src{per}")
        _bare_fall11_tar(root, 1000, per)
        out = subprocess.run([sys.executable, "-c", LISTING_RSS.format(repo=REPO), root], capture_output=True,
                             text=True, check=True).stdout.split()
        sizes[int(out[1])] = int(out[0])
    (n1, m1), (n2, m2) = sorted(sizes.items())
    assert (n1, n2) == (20000, 100000)
    slope = (m2 - m1) / (n2 - n1)
    assert slope < 200, f"{slope:.0f} bytes an image"
