"""tools/dev/gpu_check.sh: the offline bundle round trip and the CPU dry run (the GPU run needs a GPU)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "dev", "gpu_check.sh")


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path):
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text(FAKE_SMI.format(driver="550.54.15", cuda="12.4"))
    smi.chmod(0o755)
    r = subprocess.run([SCRIPT, "--dry-run", "--out", str(tmp_path), "--python", sys.executable], capture_output=True,
                       text=True, cwd=REPO, timeout=900, env={**os.environ, "NVIDIA_SMI": str(smi)})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.load(open(tmp_path / "gpu_check.json"))["gpu"]
    assert report["dry_run"] is True
    for crop in ("random", "center", "ten"):
        assert report["pipeline_semantics"][crop]["labels_equal"]
        assert report["pipeline_semantics"][crop]["max_abs_diff"] == 0.0  # CPU against CPU here
    for key in ("pipeline_images_per_s", "model_images_per_s", "trainer_synthetic_images_per_s",
                "trainer_dali_images_per_s", "trainer_wds_images_per_s", "dali_vs_synthetic"):
        assert report[key] > 0, key
    assert report["halves"]["one device"] < 1e-4  # float32 rounding: grouped vs separate convolutions
    assert (tmp_path / "gpu_check.txt").read_text().startswith("GPU check on cpu (dry run)")
    assert report["pipeline_first_batch_s"] > 0
    against = report["against_plain_dali"]  # the pipeline goals, measured on the device in a real check
    assert all(against[k] > 0 for k in ("ours_vs_plain", "ours_vs_decode", "ours_images_per_s", "decode_images_per_s"))
    # each section saved its results as it ended: a check stopped by a time limit keeps them
    assert report["sections_done"] == ["pipeline", "batches", "model", "trainer", "halves", "review", "recipe_study"]
    for how in ("with_ring", "without_ring"):  # CPU batches are the pipeline's copies: never changed
        assert report["batches_intact"][how] == {"batches": 4, "changed": []}
    lines = report["unexercised"]
    assert lines["two_halves_bf16"]["exit"] == 0 and lines["two_halves_bf16"]["steps"] > 0
    assert lines["rng_restore_equal"] is True and lines["neighbours"]["exit"] == 0
    assert set(report["review_ratios"]) == {"c1_lrn_cast", "c2_cudnn_benchmark", "c4_momentum_channels_last"}
    assert all(v["after_over_before"] > 0 for v in report["review_ratios"].values())
    assert report["driver"] == {"driver": "550.54.15", "cuda": "12.4"}  # the faked nvidia-smi's
    study = report["recipe_study"]["runs"]
    assert sorted(study) == ["cuda-convnet2@4", "paper"]  # the dry run's two: one at --batch-size, one at NAME@B
    assert study["cuda-convnet2@4"]["batch_size"] == 4 and study["cuda-convnet2@4"]["lr"] == pytest.approx(0.01 * 4 / 128)
    assert study["paper"]["batch_size"] == 8 and study["paper"]["lr"] == pytest.approx(0.01 * 8 / 128)
    assert (tmp_path / "init_study.png").exists() and (tmp_path / "init_study.json").exists()


@pytest.mark.slow
def test_bundle_in_transfer_folders_reassembled_from_anywhere(tmp_path):
    """The bundle's pieces travel in several folders, each under the size limit, and may land in
    different places; the install finds them all, checks every sha256 and names what is missing."""
    bundle = tmp_path / "bundle"
    r = subprocess.run([SCRIPT, "--bundle", str(bundle), "--packages", "six==1.16.0", "--skip", "",
                        "--transfer-size", "8K", "--python", sys.executable], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    folders = sorted(os.listdir(bundle))
    assert len(folders) >= 2 and all(f.startswith("transfer-") for f in folders)
    for f in folders:
        assert sum(os.path.getsize(bundle / f / x) for x in os.listdir(bundle / f)) <= 8192
        assert {"PIECES.SHA256SUMS", "WHEELS.SHA256SUMS"} <= set(os.listdir(bundle / f))
    # as the GPU node gets them: one folder per call, in places of their own
    landed = []
    for k, f in enumerate(folders):
        landed.append(tmp_path / f"call{k}" / "deep")
        shutil.copytree(bundle / f, landed[-1])
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    wheels_args = [a for d in landed for a in ("--wheels", str(d.parent))]

    # a folder that has not arrived yet is named piece by piece, and nothing is installed
    r = subprocess.run([SCRIPT, *wheels_args[:-2], "--install-only", "--python", py], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 1 and "piece(s) missing or corrupt" in r.stderr
    assert os.listdir(landed[-1])[0].split(".part-")[0] in r.stderr or "six-1.16.0" in r.stderr
    assert subprocess.run([py, "-c", "import six"], capture_output=True).returncode != 0

    r = subprocess.run([SCRIPT, *wheels_args, "--install-only", "--python", py], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert subprocess.run([py, "-c", "import six; assert six.__version__ == '1.16.0'"]).returncode == 0

    # a corrupt piece is caught before anything is installed
    piece = next(p for p in os.listdir(landed[0]) if ".part-" in p)
    with open(landed[0] / piece, "r+b") as f:
        f.write(b"corrupt")
    r = subprocess.run([SCRIPT, *wheels_args, "--install-only", "--python", py], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and "missing or corrupt" in r.stderr and piece in r.stderr


FAKE_SMI = """#!/bin/sh
cat <<'END'
+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 550.54.15              Driver Version: {driver}      CUDA Version: {cuda}     |
+-----------------------------------------------------------------------------------------+
END
"""


def _fake_smi(tmp_path, driver="550.54.15", cuda="12.4") -> str:
    path = tmp_path / "nvidia-smi"
    path.write_text(FAKE_SMI.format(driver=driver, cuda=cuda))
    path.chmod(0o755)
    return str(path)


DALI13 = "nvidia_dali_cuda130-2.4.0-py3-none-manylinux2014_x86_64.whl"
DALI12 = "nvidia_dali_cuda120-2.4.0-py3-none-manylinux2014_x86_64.whl"


@pytest.mark.parametrize("wheels, installed, cuda, needle", [
    ([DALI13], [], "12.4", "driver 550.54.15 runs CUDA 12.4; nvidia_dali_cuda130-2.4.0"),  # a CUDA-12 driver
    ([DALI13], [], "12.4", "bundle the CUDA 12 build instead (gpu_check.sh --bundle DIR --cuda 12)"),
    ([DALI12], [], "12.4", None), ([DALI12], [], "13.0", None), ([DALI13], [], "13.0", None),  # R580 runs both
    ([DALI13], ["nvidia-dali-cuda120"], "13.0", "pip uninstall nvidia-dali-cuda120 first"),
    ([], ["nvidia-dali-cuda130"], "12.4", "nvidia-dali-cuda130 needs CUDA 13"),  # the check, nothing to install
    (["six-1.16.0-py2.py3-none-any.whl"], [], "12.4", None)])
def test_the_dali_build_is_chosen_by_the_drivers_cuda_version(tmp_path, monkeypatch, wheels, installed, cuda,
                                                               needle):
    from tools.dev.bench import driver
    monkeypatch.setenv("NVIDIA_SMI", _fake_smi(tmp_path, cuda=cuda))
    info = driver.driver_info()
    assert info == {"driver": "550.54.15", "cuda": cuda}
    why = driver.refusal(wheels, installed, info)
    assert (why is None) if needle is None else (needle in why), why


def test_no_nvidia_smi_is_no_driver_and_no_refusal(tmp_path, monkeypatch):
    from tools.dev.bench import driver
    monkeypatch.setenv("NVIDIA_SMI", str(tmp_path / "absent"))
    assert driver.driver_info() is None and driver.refusal([DALI13], [], None) is None


def _fake_bundle(folder, wheel_name: str) -> None:
    """A transfer folder as --bundle writes it, holding one (empty) wheel in one piece."""
    import hashlib
    import zipfile
    folder.mkdir(parents=True)
    wheel = folder / wheel_name
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("empty.txt", "")
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    (folder / "WHEELS.SHA256SUMS").write_text(f"{digest}  {wheel_name}\n")
    wheel.rename(folder / f"{wheel_name}.part-000")
    (folder / "PIECES.SHA256SUMS").write_text(f"{digest}  {wheel_name}.part-000\n")


def test_the_node_refuses_a_dali_build_its_driver_cannot_run_in_the_projects_venv(tmp_path):
    """As on an H100 with a CUDA-12 driver and the CUDA-13 build bundled: one line naming the build to
    bundle, exit 2, nothing installed. With no .venv and no --python, the project's own .venv is made
    (seeing the node's torch) and used, never the PATH's python3."""
    repo = tmp_path / "repo"
    for sub in ("tools/dev/bench",):
        (repo / sub).mkdir(parents=True)
    for f in ("tools/__init__.py", "tools/dev/__init__.py", "tools/dev/bench/__init__.py", "tools/dev/bench/driver.py",
              "tools/dev/gpu_check.sh"):
        shutil.copy(os.path.join(REPO, f), repo / f)
    _fake_bundle(tmp_path / "landed" / "transfer-01", DALI13)
    env = {**os.environ, "NVIDIA_SMI": _fake_smi(tmp_path, cuda="12.4")}
    r = subprocess.run([str(repo / "tools/dev/gpu_check.sh"), "--wheels", str(tmp_path / "landed"), "--install-only"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"python: {repo}/.venv/bin/python" in r.stdout
    assert "gpu_check.sh: this node's driver 550.54.15 runs CUDA 12.4; nvidia_dali_cuda130-2.4.0" in r.stderr
    assert "--cuda 12" in r.stderr
    cfg = (repo / ".venv" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg  # the node's torch stays visible
    assert "installed:" not in r.stdout  # refused before pip (which would fail on this empty wheel with exit 1)
