"""tools/compute_pca.py against references computed independently here (CPU, seconds)."""
from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import fill_up, make_read_only, tarfile_samples
from pipeline.shards import MANIFEST, ShardWriter, atomic_write, load_manifest, shard_name
from tools import compute_pca


def decoded_train_pixels(out: str, limit: int | None = None) -> np.ndarray:
    """All counted train pixels as an (N, 3) uint8 array, decoded here independently."""
    rows = []
    for shard in load_manifest(out)["splits"]["train"]["shards"]:
        for _, s in tarfile_samples(os.path.join(out, shard["file"])):
            if limit is not None and len(rows) >= limit:
                break
            rows.append(np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("RGB")).reshape(-1, 3))
    return np.concatenate(rows)


def exact_moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and population covariance in [0, 1] units from exact integer sums. The sums of products are
    taken by float64 matrix products (about a second for 4e7 pixels, against 14 s for int64 columns):
    every partial sum is an integer below n * 255^2 < 2^53, which float64 holds exactly, so no order of
    summation rounds."""
    n = x.shape[0]
    assert n * 255 * 255 < 2 ** 53
    sums, gram = np.zeros(3), np.zeros((3, 3))
    for start in range(0, n, 1 << 20):  # in blocks: a float64 copy of all 4e7 pixels would be 1 GB
        block = x[start:start + (1 << 20)].astype(np.float64)
        sums += block.sum(0)
        gram += block.T @ block
    s1 = [int(v) for v in sums]
    s2 = [[int(gram[i, j]) for j in range(3)] for i in range(3)]
    mean = np.array([v / (n * 255) for v in s1])
    cov = np.array([[(n * s2[i][j] - s1[i] * s1[j]) / (n * n * 255 * 255) for j in range(3)] for i in range(3)])
    return mean, cov


def test_matches_numpy_reference(shards):
    pca = json.load(open(os.path.join(shards, "pca.json")))
    x = decoded_train_pixels(shards)
    assert pca["pixels"] == x.shape[0] and pca["images"] == load_manifest(shards)["splits"]["train"]["samples"]
    # exact reference: agreement to the last bits of float64
    mean, cov = exact_moments(x)
    np.testing.assert_allclose(pca["mean"], mean, rtol=1e-15)
    np.testing.assert_allclose(pca["covariance"], cov, rtol=1e-15)
    np.testing.assert_allclose(pca["std"], np.sqrt(np.diag(cov)), rtol=1e-15)
    # the reference's own formula against numpy's float64 statistics (their own rounding), on a tenth
    # of the pixels (np.cov over all 4e7 takes 7 s); then numpy's mean of all of them (no 1 GB float copy)
    part = x[::10]
    part_mean, part_cov = exact_moments(part)
    np.testing.assert_allclose(part_mean, (part / 255.0).mean(0), rtol=1e-9)
    np.testing.assert_allclose(part_cov, np.cov(part / 255.0, rowvar=False, bias=True), rtol=1e-9)
    np.testing.assert_allclose(pca["mean"], x.mean(0, dtype=np.float64) / 255, rtol=1e-9)
    values, vectors = np.linalg.eigh(cov)
    np.testing.assert_allclose(pca["eigenvalues"], values[::-1], rtol=1e-9)
    for mine, ref in zip(pca["eigenvectors"], vectors[:, ::-1].T):
        assert abs(np.dot(mine, ref)) == pytest.approx(1.0, abs=1e-9)
        assert np.linalg.norm(mine) == pytest.approx(1.0, abs=1e-12)
        assert max(mine, key=abs) > 0  # the documented sign convention
    # each eigenvector really is one: C v = lambda v
    c = np.array(pca["covariance"])
    for lam, v in zip(pca["eigenvalues"], pca["eigenvectors"]):
        np.testing.assert_allclose(c @ v, lam * np.array(v), atol=1e-12)
    with open(os.path.join(shards, MANIFEST), "rb") as f:
        import hashlib
        assert pca["source"]["sha256"] == hashlib.sha256(f.read()).hexdigest()


def _flat_colour_shards(out: str, colours: np.ndarray) -> None:
    """A shard directory whose train images are flat colours (JPEG keeps a flat block flat)."""
    os.makedirs(out)
    writer = ShardWriter()
    for i, c in enumerate(colours):
        buf = io.BytesIO()
        Image.new("RGB", (64, 64), tuple(int(v) for v in c)).save(buf, "JPEG", quality=95)
        writer.add(f"s{i:05d}", buf.getvalue(), 0, {"wnid": "n00000000"})
    rec = writer.finish(os.path.join(out, shard_name("train", 0)))
    manifest = {"format_version": 1, "classes": [{"index": 0, "wnid": "n00000000", "name": "flat"}],
                "splits": {"train": {"samples": len(colours), "shards": [rec]}},
                "preprocessing": {"size": 64}, "seed": 0, "skipped": [], "command": []}
    atomic_write(os.path.join(out, MANIFEST), json.dumps(manifest).encode())


def test_known_gaussian_covariance_gives_expected_eigenbasis(tmp_path):
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    lam = np.array([0.02, 0.005, 0.001])  # [0, 1] units, well separated
    sigma = q @ np.diag(lam) @ q.T
    colours = np.clip(np.round((0.5 + rng.multivariate_normal(np.zeros(3), sigma, size=600)) * 255), 0, 255)
    out = str(tmp_path / "flat")
    _flat_colour_shards(out, colours)
    assert compute_pca.main([out, "--workers", "1", "--quiet"]) == 0
    pca = json.load(open(os.path.join(out, "pca.json")))
    # statistical agreement with the generating Gaussian (600 draws: ~6% on eigenvalues)
    np.testing.assert_allclose(pca["eigenvalues"], lam, rtol=0.2)
    for v, ref in zip(pca["eigenvectors"], q[:, np.argsort(lam)[::-1]].T):
        assert abs(np.dot(v, ref)) > 0.97
    np.testing.assert_allclose(pca["mean"], 0.5, atol=0.02)


def test_same_result_for_one_and_two_workers(shards, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(shards, out)
    os.remove(os.path.join(out, "pca.json"))
    assert compute_pca.main([out, "--workers", "1", "--quiet"]) == 0
    one = json.load(open(os.path.join(out, "pca.json")))
    assert compute_pca.main([out, "--workers", "2", "--quiet"]) == 0
    two = json.load(open(os.path.join(out, "pca.json")))
    assert one == two == json.load(open(os.path.join(shards, "pca.json")))


def test_max_images_is_a_recorded_deterministic_subset(shards, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(shards, out)
    assert compute_pca.main([out, "--max-images", "100", "--quiet"]) == 0
    pca = json.load(open(os.path.join(out, "pca.json")))
    assert pca["images"] == 100 and pca["max_images"] == 100
    mean, cov = exact_moments(decoded_train_pixels(out, limit=100))
    np.testing.assert_allclose(pca["mean"], mean, rtol=1e-15)
    np.testing.assert_allclose(pca["covariance"], cov, rtol=1e-15)


@pytest.mark.parametrize("case", ["no_manifest", "missing_shard", "checksum", "corrupt_jpeg"])
def test_bad_input(shards, tmp_path, capsys, case):
    out = str(tmp_path / "bad")
    shutil.copytree(shards, out)
    os.remove(os.path.join(out, "pca.json"))
    if case == "no_manifest":
        os.remove(os.path.join(out, MANIFEST))
        needle = f"{out}/dataset.json: missing"
    elif case == "missing_shard":
        os.remove(os.path.join(out, "train-000002.tar"))
        needle = f"{out}/train-000002.tar: missing train shard"
    elif case == "checksum":
        with open(os.path.join(out, "train-000001.tar"), "r+b") as f:
            f.seek(5000)
            f.write(b"xx")
        needle = f"{out}/train-000001.tar: sha256 differs"
    else:  # a JPEG that does not decode, with a manifest that agrees with the bytes
        from pipeline.shards import sha256_file
        path = os.path.join(out, "train-000000.tar")
        data = bytearray(open(path, "rb").read())
        data[1024:1536] = b"\0" * 512  # into the first JPEG's entropy-coded data... and header
        open(path, "wb").write(bytes(data))
        m = json.load(open(os.path.join(out, MANIFEST)))
        m["splits"]["train"]["shards"][0]["sha256"] = sha256_file(path)
        atomic_write(os.path.join(out, MANIFEST), json.dumps(m).encode())
        needle = f"{out}/train-000000.tar: "
    assert compute_pca.main([out, "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not os.path.exists(os.path.join(out, "pca.json"))


def _reference_sums(arr: np.ndarray) -> tuple[int, ...]:
    x = arr.reshape(-1, 3).astype(np.int64)
    products = [int(x[:, i] @ x[:, j]) for i, j in ((0, 0), (0, 1), (0, 2), (1, 1), (1, 2), (2, 2))]
    return (x.shape[0], *(int(v) for v in x.sum(0)), *products)


@pytest.mark.parametrize("kernel", ["C, Arrow", "C, RGB buffer", "C, RGBX buffer", "NumPy"])
def test_image_sums_exact_in_every_kernel_and_beyond_one_uint32_block(kernel):
    """Every path to the sums is exact, including images above 65,536 pixels (--keep-aspect
    shards), which are summed in blocks, and the worst case of all-255 pixels."""
    rng = np.random.default_rng(0)
    worst = np.full((300, 400, 3), 255, np.uint8)  # 120,000 pixels of the largest products
    noisy = rng.integers(0, 256, (257, 391, 3), dtype=np.uint8)
    small = rng.integers(0, 256, (7, 5, 3), dtype=np.uint8)
    for arr in (worst, noisy, small):
        img = Image.fromarray(arr, "RGB")
        if kernel == "NumPy":
            got = compute_pca.image_sums_numpy(img)
        else:
            assert compute_pca._rgbsums is not None, "the C kernel was not built (see setup.py)"
            if kernel == "C, Arrow":
                got = compute_pca._rgbsums.sums_arrow(*img.__arrow_c_array__())
            elif kernel == "C, RGB buffer":
                got = compute_pca._rgbsums.sums_buffer(arr, 3)
            else:
                rgbx = np.concatenate([arr, rng.integers(0, 256, arr.shape[:2] + (1,), dtype=np.uint8)], axis=2)
                got = compute_pca._rgbsums.sums_buffer(rgbx, 4)
        assert tuple(got) == _reference_sums(arr)
    assert compute_pca.image_sums(Image.fromarray(noisy, "RGB")) == _reference_sums(noisy)


def test_c_kernel_rejects_what_is_not_whole_pixels():
    with pytest.raises(ValueError, match="not whole pixels"):
        compute_pca._rgbsums.sums_buffer(b"\0" * 10, 3)
    with pytest.raises(ValueError, match="not whole pixels"):
        compute_pca._rgbsums.sums_buffer(b"\0" * 12, 2)
    with pytest.raises(ValueError, match="not 4 x uint8"):
        compute_pca._rgbsums.sums_arrow(*Image.new("L", (4, 4)).__arrow_c_array__())


def _killed_worker(task):
    """A worker that dies as the OOM killer would end it."""
    import signal
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_killed_worker_ends_the_run_in_one_line(shards, tmp_path, capsys, monkeypatch):
    """It used to hang for good (multiprocessing.Pool waits for a result that never comes)."""
    out = str(tmp_path / "s")
    shutil.copytree(shards, out)
    os.remove(os.path.join(out, "pca.json"))
    monkeypatch.setattr(compute_pca, "shard_sums", _killed_worker)  # the forked workers inherit it
    assert compute_pca.main([out, "--workers", "2", "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"compute_pca: {out}: a worker process died (killed: out of memory?); no pca.json written"]
    assert not os.path.exists(os.path.join(out, "pca.json"))


SLOW_PCA = """import sys, time
sys.path.insert(0, {repo!r})
from tools import compute_pca
real = compute_pca.shard_sums
def slow(task):
    time.sleep(60)
    return real(task)
compute_pca.shard_sums = slow  # the forked workers inherit it
sys.exit(compute_pca.main(sys.argv[1:]))
"""


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


@pytest.mark.parametrize("sig, status, said", [(signal.SIGTERM, 143, "terminated (SIGTERM)"),
                                               (signal.SIGINT, 130, "interrupted")])
def test_a_signal_stops_compute_pca_and_its_workers_in_one_line(shards, tmp_path, sig, status, said):
    """SIGTERM to the main process alone (a scheduler, `kill PID`) used to leave its pool's workers running
    as orphans; Ctrl-C ended in a traceback. Now: one line, 143 or 130, no worker left, no pca.json."""
    out = str(tmp_path / "s")
    shutil.copytree(shards, out)
    os.remove(os.path.join(out, "pca.json"))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PCA.format(repo=repo), out, "--workers", "2", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 30
    while time.time() < deadline and len(_children(proc.pid)) < 2:
        time.sleep(0.01)
    workers = _children(proc.pid)
    assert len(workers) >= 2, "the workers never started"
    proc.send_signal(sig)  # at once: while the shards may still be being submitted (that hung, waiting for them)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == status, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"compute_pca: {said}; no pca.json written; the same command starts again"], err
    deadline = time.time() + 5
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.05)
    assert not [w for w in workers if os.path.exists(f"/proc/{w}")], "a worker outlived compute_pca"
    assert not os.path.exists(os.path.join(out, "pca.json"))


@pytest.mark.parametrize("how", ["read_only", "full"])
def test_a_read_only_or_full_filesystem_is_one_line_and_leaves_no_temporary(shards, small_filesystem, capsys, how):
    out = os.path.join(small_filesystem, "s")
    shutil.copytree(shards, out)
    os.remove(os.path.join(out, "pca.json"))
    if how == "read_only":
        make_read_only(small_filesystem)
        needle = f"compute_pca: {out}: cannot write (Read-only file system); no pca.json written"
    else:
        fill_up(small_filesystem)
        needle = f"compute_pca: {out}/pca.json: cannot write (No space left on device); no pca.json written"
    assert compute_pca.main([out, "--quiet", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
    assert not [f for f in os.listdir(out) if f.startswith("pca.json")]


def test_one_colour_in_every_pixel_is_refused_not_written(tmp_path, capsys):
    """std 0: the loader refuses such a pca.json and says to rerun compute_pca, which wrote it again."""
    out = str(tmp_path / "flat")
    _flat_colour_shards(out, np.array([[120, 120, 120]] * 8))
    assert compute_pca.main([out, "--quiet", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the training pixels give no usable PCA (std" in err[0], err
    assert not os.path.exists(os.path.join(out, "pca.json"))
