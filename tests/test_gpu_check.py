"""tools/gpu_check.sh: the offline bundle round trip and the CPU dry run (the GPU run needs a GPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tools", "gpu_check.sh")


@pytest.mark.slow
def test_dry_run_runs_every_section(tmp_path):
    r = subprocess.run([SCRIPT, "--dry-run", "--out", str(tmp_path), "--python", sys.executable],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.load(open(tmp_path / "gpu_check.json"))["gpu"]
    assert report["dry_run"] is True
    for crop in ("random", "center", "ten"):
        assert report["pipeline_semantics"][crop]["labels_equal"]
        assert report["pipeline_semantics"][crop]["max_abs_diff"] == 0.0  # CPU against CPU here
    for key in ("pipeline_images_per_s", "model_images_per_s", "trainer_synthetic_images_per_s",
                "trainer_dali_images_per_s", "trainer_wds_images_per_s", "dali_vs_synthetic"):
        assert report[key] > 0, key
    assert report["halves"]["one device"] == 0.0
    assert (tmp_path / "gpu_check.txt").read_text().startswith("GPU check on cpu (dry run)")


@pytest.mark.slow
def test_bundle_split_reassemble_checksum_install(tmp_path):
    bundle = tmp_path / "bundle"
    r = subprocess.run([SCRIPT, "--bundle", str(bundle), "--packages", "six==1.16.0", "--piece-size", "4K",
                        "--python", sys.executable], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    pieces = sorted(os.listdir(bundle / "pieces"))
    assert len(pieces) >= 3 and all(os.path.getsize(bundle / "pieces" / p) <= 4096 for p in pieces)
    assert (bundle / "PIECES.SHA256SUMS").exists() and (bundle / "WHEELS.SHA256SUMS").exists()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    r = subprocess.run([SCRIPT, "--wheels", str(bundle), "--install-only", "--python", py],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert subprocess.run([py, "-c", "import six; assert six.__version__ == '1.16.0'"]).returncode == 0

    # a corrupt piece is caught before anything is installed
    with open(bundle / "pieces" / pieces[1], "r+b") as f:
        f.write(b"corrupt")
    r = subprocess.run([SCRIPT, "--wheels", str(bundle), "--install-only", "--python", py],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and "missing or corrupt" in r.stderr
