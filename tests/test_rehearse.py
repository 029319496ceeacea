"""tools/dev/rehearse: ImageNet's shape at a tiny scale, end to end (slow), and its arithmetic by hand."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tools.dev import rehearse

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["make_shards", "make_shards part 1/4", "make_shards part 2/4", "make_shards part 3/4", "make_shards part 4/4",
          "make_shards --merge", "verify_shards", "compute_pca", "loader epoch (DALI, CPU)", "train (30 steps)",
          "train --resume (30 more)", "evaluate (val, centre)", "show_predictions", "neighbours (features)"]


def test_ilsvrc_and_fall11_shapes_by_hand():
    full = rehearse.ilsvrc_counts(1.0)
    assert len(full) == 1000 and sum(full) == 1_281_256 and max(full) == 1300 and min(full) == 732
    assert rehearse.ilsvrc_counts(0.001) == [1] * 1000  # 1.3 and 0.73 round to 1: at least one a class
    fall = rehearse.fall11_counts(1.0)
    assert len(fall) == 21_841 and 1 <= min(fall) and max(fall) <= 3000
    assert abs(sum(fall) - 14_197_122) / 14_197_122 < 0.05


def test_growth_is_the_exponent_of_wall_time_in_images():
    def result(images, walls):
        return {"images": images, "stages": [{"stage": f"s{k}", "ok": True, "wall_s": w} for k, w in enumerate(walls)]}
    got = rehearse.growth([result(1000, [1.0, 1.0, 2.0]), result(10000, [10.0, 100.0, 2.0])])
    assert got == {"s0": 1.0, "s1": 2.0, "s2": 0.0}  # linear, quadratic, constant


@pytest.mark.slow
def test_a_tiny_rehearsal_runs_every_stage_and_tables_it(tmp_path):
    out = str(tmp_path / "reh")
    r = subprocess.run([sys.executable, "-m", "tools.dev.rehearse", out, "--scale", "0.001", "--shard-counts", "6"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.load(open(os.path.join(out, "rehearsal.json")))
    (scale,) = report["scales"]
    assert scale["images"] == 1000 and scale["classes"] == 1000 and scale["val_images"] == 1000
    assert [s["stage"] for s in scale["stages"]] == STAGES and all(s["ok"] for s in scale["stages"])
    loader = next(s for s in scale["stages"] if s["stage"].startswith("loader"))
    assert loader["images"] == 1000 and loader["first_batch_s"] > 0
    assert all(s["wall_s"] > 0 and s["peak_rss_mb"] > 0 for s in scale["stages"])
    counted = report["shard_counts"][0]
    assert counted["shards"] == 6 and counted["first_batch_s"] > 0 and counted["ok"]
    assert counted["merge_wall_s"] > 0 and counted["verify_wall_s"] > 0
    md = open(os.path.join(out, "rehearsal.md")).read()
    assert all(f"| {stage} |" in md for stage in STAGES)
    assert sorted(os.listdir(out)) == ["rehearsal.json", "rehearsal.log", "rehearsal.md"]  # the scratch data is gone


def test_memory_slope_is_bytes_an_image_between_the_scales():
    def result(images, val, mbs):
        return {"images": images, "val_images": val,
                "stages": [{"stage": f"s{k}", "ok": True, "peak_process_rss_mb": m} for k, m in enumerate(mbs)]}
    got = rehearse.memory_slopes([result(9_000, 1_000, [100.0, 50.0]), result(90_000, 10_000, [100.0 + 90_000 * 100 / 2**20, 50.0])])
    assert got == {"s0": 100.0, "s1": 0.0}  # 100 bytes a listed image (train and val); flat
