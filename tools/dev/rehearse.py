"""ImageNet at its real size, rehearsed: every stage on an ImageNet-shaped synthetic source, each cost measured.

    python -m tools.dev.rehearse OUT --scale 0.01 0.1          # ILSVRC-2012's shape, two scales, and the growth
    python -m tools.dev.rehearse OUT --scale 0.001 --fall11    # Fall 2011's 21,841 synsets (fall11_whole.tar)
    python -m tools.dev.rehearse OUT --shard-counts 1252 13900  # the loader's first batch at that many shards

The source has ILSVRC-2012's 1,000 classes with per-class counts of its shape (1,300 images for most, 732 to
1,300 for the last 66; 1,281,256 in all against the real 1,281,167) times S, at least one a class, and 50
validation images a class times S, in the original download's layout: ILSVRC2012_img_train.tar of 1,000
per-class tars, ILSVRC2012_img_val.tar and the devkit. With --fall11, fall11_whole.tar of 21,841 per-synset
tars (about 650 images a synset on average, 1 to 3,000, times S) and words.txt. The images are small (16 to
80 px a side, every aspect ratio between 1:3 and 3:1), drawn from a pool of 997, and the pool holds a CMYK
JPEG, a grayscale JPEG and a PNG named .JPEG, as ImageNet does.

Then every stage runs as its own process, as a user runs it: make_shards (--workers 2; and in 4 parts, then
--merge), verify_shards, compute_pca, one epoch of the DALI training loader alone (CPU), model.train at
--width 0.125 for a fixed number of steps with a checkpoint every few seconds (stopped by SIGTERM, as a
scheduler stops it), its --resume (stopped alike), model.evaluate on the whole val split, show_predictions and
neighbours' feature pass over the training split. For each: wall and CPU seconds, the peak resident memory of
the process and its children (summed, sampled every 0.1 s), the bytes it left in OUT, and the loader's time to
its first batch. The table goes to OUT/rehearsal.json and OUT/rehearsal.md; with two scales or more, each
stage's exponent of wall time against the number of images (1.0: linear).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ILSVRC_CLASSES, ILSVRC_VAL_PER_CLASS = 1000, 50
FALL11_SYNSETS = 21841
POOL = 997  # distinct source images, reused in turn: what is measured is the pipeline, not their variety
TRAIN_STEPS = 30  # steps of each of the two training stages (the run, and its resume)


# ---------------------------------------------------------------- the source

def ilsvrc_counts(scale: float) -> list[int]:
    """Training images per class: ILSVRC-2012's shape (1,300 for 934 classes, 732..1,300 evenly for the last
    66: 1,281,256), times scale, at least 1."""
    full = [1300] * (ILSVRC_CLASSES - 66) + np.linspace(732, 1300, 66).round().astype(int).tolist()
    return [max(1, round(n * scale)) for n in full]


def fall11_counts(scale: float) -> list[int]:
    """Images per synset of a Fall-2011-shaped release: 1 to 3,000, about 650 on average (14.2M over 21,841),
    a fixed lognormal draw, times scale, at least 1."""
    draw = np.random.default_rng(2011).lognormal(mean=6.0, sigma=0.9, size=FALL11_SYNSETS)
    draw = np.clip(draw * (14_197_122 / draw.sum()), 1, 3000)
    return [max(1, round(n * scale)) for n in draw]


def image_pool(seed: int = 0) -> list[bytes]:
    """POOL small encoded images of varied sizes and aspect ratios; among them a CMYK JPEG, a grayscale JPEG
    and a PNG (named .JPEG where it is used)."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    pool = []
    for k in range(POOL):
        w, h = (int(v) for v in rng.integers(16, 81, 2))
        if max(w, h) > 3 * min(w, h):
            h = max(h, w // 3) if w > h else h
            w = max(w, h // 3) if h > w else w
        pixels = (rng.random((h, w, 3)) * 64 + rng.integers(0, 192, 3)).astype(np.uint8)
        img, buf = Image.fromarray(pixels), io.BytesIO()
        if k == 1:
            img.convert("CMYK").save(buf, "JPEG", quality=85)
        elif k == 2:
            img.convert("L").save(buf, "JPEG", quality=85)
        elif k == 3:
            img.save(buf, "PNG")
        else:
            img.save(buf, "JPEG", quality=85)
        pool.append(buf.getvalue())
    return pool


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 1335830400, 0o644
    tf.addfile(info, io.BytesIO(data))


def _tar_of_tars(path: str, wnids: list[str], counts: list[int], pool: list[bytes]) -> None:
    with tarfile.open(path, "w") as outer:
        k = 0
        for wnid, n in zip(wnids, counts):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode="w") as tf:
                for i in range(n):
                    _add(tf, f"{wnid}_{i}.JPEG", pool[k % POOL])
                    k += 1
            _add(outer, f"{wnid}.tar", inner.getvalue())


def build_source(root: str, scale: float, fall11: bool) -> dict:
    """The synthetic source in ImageNet's download layout; returns its counts."""
    from tools.make_sample_data import _meta_mat_bytes
    os.makedirs(root, exist_ok=True)
    pool = image_pool()
    if fall11:
        wnids, counts = [f"n{c + 1:08d}" for c in range(FALL11_SYNSETS)], fall11_counts(scale)
        _tar_of_tars(os.path.join(root, "fall11_whole.tar"), wnids, counts, pool)
        with open(os.path.join(root, "words.txt"), "w", encoding="utf-8") as f:
            f.writelines(f"{w}\tsynset {c}, synthetic\n" for c, w in enumerate(wnids))
        return {"classes": len(wnids), "images": sum(counts)}
    wnids, counts = [f"n{c + 1:08d}" for c in range(ILSVRC_CLASSES)], ilsvrc_counts(scale)
    _tar_of_tars(os.path.join(root, "ILSVRC2012_img_train.tar"), wnids, counts, pool)
    per_val = max(1, round(ILSVRC_VAL_PER_CLASS * scale))
    labels = [c for c in range(ILSVRC_CLASSES) for _ in range(per_val)]
    np.random.default_rng(1).shuffle(labels)
    with tarfile.open(os.path.join(root, "ILSVRC2012_img_val.tar"), "w") as tf:
        for n in range(len(labels)):
            _add(tf, f"ILSVRC2012_val_{n + 1:08d}.JPEG", pool[(7919 * n) % POOL])
    ids = np.arange(ILSVRC_CLASSES)[::-1] + 1  # meta.mat's IDs, not in wnid order, as the real file's

    class Cls:
        def __init__(self, wnid):
            self.wnid, self.name = wnid, f"synthetic {wnid}"
    meta = _meta_mat_bytes([Cls(w) for w in wnids], ids)
    gt = "".join(f"{ids[c]}\n" for c in labels)
    with tarfile.open(os.path.join(root, "ILSVRC2012_devkit_t12.tar.gz"), "w:gz") as tf:
        _add(tf, "ILSVRC2012_devkit_t12/data/meta.mat", meta)
        _add(tf, "ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt", gt.encode())
    return {"classes": ILSVRC_CLASSES, "images": sum(counts), "val_images": len(labels)}


# ---------------------------------------------------------------- measuring a stage

def _tree_rss(pid: int) -> tuple[int, int]:
    """(bytes resident in process `pid` and every descendant, summed; the most any one of them holds), from
    /proc. The sum counts pages a forked worker shares with its parent twice; the largest is per process."""
    children: dict[int, list[int]] = {}
    rss = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        rss[int(entry)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    total, largest, todo = 0, 0, [pid]
    while todo:
        p = todo.pop()
        total += rss.get(p, 0)
        largest = max(largest, rss.get(p, 0))
        todo += children.get(p, [])
    return total, largest


def _dir_bytes(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(base, f))
            except OSError:
                pass
    return total


def run_stage(name: str, cmd: list[str], out: str, stop_when=None, log=None) -> dict:
    """Runs one stage as its own process; its measurements. stop_when(): True once the stage should be sent
    SIGTERM (a training run stopped after its steps, as a scheduler would)."""
    before = _dir_bytes(out)
    usage0 = os.times()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, peak_one, lines, stopped = 0, 0, [], False

    def read():
        for line in proc.stdout:
            lines.append(line)
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    while proc.poll() is None:
        tree, one = _tree_rss(proc.pid)
        peak, peak_one = max(peak, tree), max(peak_one, one)
        if stop_when is not None and not stopped and stop_when():
            proc.send_signal(signal.SIGTERM)
            stopped = True
        time.sleep(0.1)
    reader.join()
    wall = time.perf_counter() - t0
    usage1 = os.times()
    cpu = (usage1.children_user - usage0.children_user) + (usage1.children_system - usage0.children_system)
    text = "".join(lines)
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"$ {' '.join(cmd)}\n{text}\n")
    ok = proc.returncode == 0 or (stopped and proc.returncode == 143)
    result = {"stage": name, "exit": proc.returncode, "ok": ok, "wall_s": round(wall, 3), "cpu_s": round(cpu, 3),
              "peak_rss_mb": round(peak / 2**20, 1), "peak_process_rss_mb": round(peak_one / 2**20, 1),
              "bytes_written": _dir_bytes(out) - before}
    for line in lines:
        if line.startswith("REHEARSAL "):
            result.update(json.loads(line[len("REHEARSAL "):]))
    if not ok:
        result["tail"] = text[-1500:]
    return result


LOADER_EPOCH = """
import json, sys, time
from pipeline import make_loader
t0 = time.perf_counter()
loader = make_loader(sys.argv[1], "train", batch_size=128, backend="dali", device="cpu", verify=True)
it = iter(loader)
next(it)
first = time.perf_counter() - t0
n = 128 + (sum(len(y) for _, y in it) if sys.argv[2:] != ["first"] else 0)
print("REHEARSAL " + json.dumps({"first_batch_s": round(first, 3), "images": n}))
"""


def _steps_done(run: str) -> int:
    try:
        with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as f:
            return max([json.loads(line).get("step", 0) for line in f if line.strip()] or [0])
    except (OSError, ValueError):
        return 0


def rehearse(out: str, scale: float, fall11: bool, log: str, listing_only: bool = False) -> dict:
    """Every stage at one scale; the source and outputs under OUT/s<scale>, removed at the end but the table.
    listing_only: make_shards --part 1/1000 alone (the listing, the plan and 1/1000 of the shards), for the
    listing's memory and time at sizes whose every stage would take hours here."""
    py = sys.executable
    base = os.path.join(out, f"{'fall11-' if fall11 else ''}s{scale:g}")
    src, shards, parts, run = (os.path.join(base, d) for d in ("src", "shards", "parts", "run"))
    t0 = time.perf_counter()
    counts = build_source(src, scale, fall11)
    print(f"rehearsal at S = {scale:g}: {counts['images']} training images in {counts['classes']} classes "
          f"({time.perf_counter() - t0:.0f} s to make the source)", flush=True)
    ms = [py, os.path.join("tools", "make_shards.py"), src]
    extra = ["--val-fraction", "0.5"] if fall11 else []
    rows = []

    def stage(name, cmd, stop_when=None):
        r = run_stage(name, cmd, base, stop_when, log)
        rows.append(r)
        print(f"  {name:24s} {'ok ' if r['ok'] else 'FAILED'} {r['wall_s']:8.1f} s wall {r['cpu_s']:8.1f} s CPU "
              f"{r['peak_rss_mb']:8.1f} MB peak {r['bytes_written'] / 2**20:9.1f} MB written"
              + (f", first batch {r['first_batch_s']:.2f} s" if "first_batch_s" in r else ""), flush=True)
        return r

    if listing_only:
        r = stage("make_shards --part 1/1000", [*ms, shards, "--workers", "1", "--part", "1/1000", *extra])
        listed = counts["images"] + counts.get("val_images", 0)
        r["bytes_per_listed_image"] = round(r["peak_process_rss_mb"] * 2**20 / listed, 1)
        shutil.rmtree(base, ignore_errors=True)
        return {"scale": scale, "fall11": fall11, **counts, "checkpoint_mb": None, "stages": rows}
    stage("make_shards", [*ms, shards, "--workers", "2", *extra])
    for i in range(1, 5):
        stage(f"make_shards part {i}/4", [*ms, parts, "--workers", "2", "--part", f"{i}/4", *extra])
    stage("make_shards --merge", [py, os.path.join("tools", "make_shards.py"), "--merge", parts])
    shutil.rmtree(parts, ignore_errors=True)
    stage("verify_shards", [py, os.path.join("tools", "verify_shards.py"), shards])
    stage("compute_pca", [py, os.path.join("tools", "compute_pca.py"), shards, "--workers", "2", "--quiet"])
    stage("loader epoch (DALI, CPU)", [py, "-c", LOADER_EPOCH, shards])
    train = [py, "-m", "model.train", "--shards", shards, "--out", run, "--devices", "cpu", "--width", "0.125",
             "--batch-size", "128", "--log-every", "5", "--checkpoint-minutes", "0.05", "--no-verify"]
    stage("train (30 steps)", train, stop_when=lambda: _steps_done(run) >= TRAIN_STEPS)
    stage("train --resume (30 more)", [*train, "--resume"], stop_when=lambda: _steps_done(run) >= 2 * TRAIN_STEPS)
    ckpt = os.path.join(run, "checkpoint.pt")
    stage("evaluate (val, centre)", [py, "-m", "model.evaluate", "--checkpoint", ckpt, "--shards", shards,
                                     "--devices", "cpu"])
    stage("show_predictions", [py, "-m", "tools.show_predictions", ckpt, shards, os.path.join(base, "pred.png")])
    stage("neighbours (features)", [py, "-m", "tools.neighbours", ckpt, shards, os.path.join(base, "nn.png"),
                                    "--devices", "cpu"])
    checkpoint_mb = os.path.getsize(ckpt) / 2**20 if os.path.exists(ckpt) else None
    shutil.rmtree(base, ignore_errors=True)
    return {"scale": scale, "fall11": fall11, **counts, "checkpoint_mb": checkpoint_mb, "stages": rows}


def shard_count_first_batch(out: str, shards_wanted: int, log: str) -> dict:
    """The loader's first batch over a shard set of `shards_wanted` shards (one image each): its start-up
    cost in the shard count, apart from any pixel."""
    py = sys.executable
    base = os.path.join(out, f"shards{shards_wanted}")
    src = os.path.join(base, "src")
    os.makedirs(os.path.join(src, "train", "n00000001"), exist_ok=True)
    os.makedirs(os.path.join(src, "val", "n00000001"), exist_ok=True)
    pool = image_pool()
    for k in range(shards_wanted):
        with open(os.path.join(src, "train", "n00000001", f"n00000001_{k}.JPEG"), "wb") as f:
            f.write(pool[4 + k % (POOL - 4)])
    with open(os.path.join(src, "val", "n00000001", "ILSVRC2012_val_00000001.JPEG"), "wb") as f:
        f.write(pool[4])
    shards, parts = os.path.join(base, "shards"), os.path.join(base, "parts")
    ms = [py, os.path.join("tools", "make_shards.py")]
    made = run_stage("make_shards", [*ms, src, shards, "--workers", "2", "--shard-samples", "1"], base, log=log)
    for i in range(1, 5):  # the bookkeeping that grows with the shard count: journals, then the merge
        run_stage("part", [*ms, src, parts, "--workers", "2", "--shard-samples", "1", "--part", f"{i}/4"], base, log=log)
    merged = run_stage("merge", [*ms, "--merge", parts], base, log=log)
    verified = run_stage("verify_shards", [py, os.path.join("tools", "verify_shards.py"), shards], base, log=log)
    run_stage("compute_pca", [py, os.path.join("tools", "compute_pca.py"), shards, "--quiet"], base, log=log)
    first = run_stage("loader first batch", [py, "-c", LOADER_EPOCH, shards, "first"], base, log=log)
    shutil.rmtree(base, ignore_errors=True)
    return {"shards": shards_wanted, "make_shards_wall_s": made["wall_s"], "first_batch_s": first.get("first_batch_s"),
            "loader_process_wall_s": first["wall_s"], "merge_wall_s": merged["wall_s"],
            "verify_wall_s": verified["wall_s"], "ok": all(r["ok"] for r in (made, merged, verified, first))}


BOOKKEEPING = """
import json, os, sys, tempfile, time
import numpy as np, torch
from pipeline import plan
from model.alexnet import AlexNet, AlexNetConfig
from model.checkpoint import checkpoint_digest, load_checkpoint, save_atomic
out = {}
for name, counts in (("ilsvrc", [1024] * 1251 + [143]), ("fall11", [1024] * 13864 + [482])):
    t0 = time.perf_counter()
    order = plan.rank_order(counts, epoch=3, seed=0, rank=0, world_size=1, batch_size=128, shuffle=True)
    out[f"{name}_epoch_order_s"] = round(time.perf_counter() - t0, 3)
    out[f"{name}_epoch_order_mb"] = round(order.nbytes / 2**20, 1)
for classes in (1000, 21841):
    model = AlexNet(cfg=AlexNetConfig(num_classes=classes))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ckpt = {"model": state, "optimizer": {"momentum": {k: torch.zeros_like(v) for k, v in state.items()}}}
    t0 = time.perf_counter()
    ckpt["digest"] = checkpoint_digest(ckpt)
    path = os.path.join(sys.argv[1], f"ckpt{classes}.pt")
    save_atomic(ckpt, path)
    t1 = time.perf_counter()
    load_checkpoint(path)
    t2 = time.perf_counter()
    out[f"checkpoint{classes}_mb"] = round(os.path.getsize(path) / 2**20, 1)
    out[f"checkpoint{classes}_save_s"], out[f"checkpoint{classes}_load_s"] = round(t1 - t0, 2), round(t2 - t1, 2)
    os.remove(path)
print("REHEARSAL " + json.dumps(out))
"""


def bookkeeping(out: str, log: str) -> dict:
    """What does not depend on the pixels, at full size: a training epoch's order over ILSVRC-2012's 1,252
    shards and Fall 2011's 13,865, and a full-width checkpoint (1,000 and 21,841 classes) written with its
    digest and read back verified."""
    base = os.path.join(out, "bookkeeping")
    os.makedirs(base, exist_ok=True)
    r = run_stage("bookkeeping", [sys.executable, "-c", BOOKKEEPING, base], base, log=log)
    shutil.rmtree(base, ignore_errors=True)
    return r


def growth(results: list[dict]) -> dict:
    """Each stage's exponent of wall time against the training images, between the smallest and the largest
    scale: log(t2 / t1) / log(n2 / n1); 1.0 is linear."""
    if len(results) < 2:
        return {}
    a, b = results[0], results[-1]
    out = {}
    for ra, rb in zip(a["stages"], b["stages"]):
        if ra["ok"] and rb["ok"] and ra["wall_s"] > 0 and rb["wall_s"] > 0:
            out[ra["stage"]] = round(math.log(rb["wall_s"] / ra["wall_s"]) / math.log(b["images"] / a["images"]), 3)
    return out


def memory_slopes(results: list[dict]) -> dict:
    """Each stage's peak resident memory of its largest process per listed image, between the smallest and
    the largest scale: (peak2 - peak1) / (images2 - images1), in bytes; the baselines cancel."""
    if len(results) < 2:
        return {}
    a, b = results[0], results[-1]
    listed = [r["images"] + r.get("val_images", 0) for r in (a, b)]
    return {ra["stage"]: round((rb["peak_process_rss_mb"] - ra["peak_process_rss_mb"]) * 2**20 / (listed[1] - listed[0]), 1)
            for ra, rb in zip(a["stages"], b["stages"]) if ra["ok"] and rb["ok"]}


def table(report: dict) -> str:
    lines = []
    for r in report["scales"]:
        lines += [f"### S = {r['scale']:g}{' (Fall 2011 shape)' if r['fall11'] else ''}: {r['images']:,} training "
                  f"images, {r['classes']:,} classes", "",
                  "| stage | exit | wall s | CPU s | peak RSS MB, all processes (largest one) | MB written | first batch s |",
                  "|---|---|---|---|---|---|---|"]
        for s in r["stages"]:
            per = f" ({s['bytes_per_listed_image']} B a listed image)" if "bytes_per_listed_image" in s else ""
            lines.append(f"| {s['stage']} | {s['exit']} | {s['wall_s']:.1f} | {s['cpu_s']:.1f} | {s['peak_rss_mb']:.0f} "
                         f"({s['peak_process_rss_mb']:.0f}){per} "
                         f"| {s['bytes_written'] / 2**20:.1f} | {s.get('first_batch_s', '')} |")
        lines.append("")
    if report.get("growth"):
        lines += ["### Growth between the smallest and the largest scale", "",
                  "| stage | exponent of wall time in images (1.0 linear) | peak RSS of its largest process, bytes an image |",
                  "|---|---|---|"]
        lines += [f"| {k} | {v:.2f} | {report['memory_slopes'].get(k, '')} |" for k, v in report["growth"].items()] + [""]
    if report.get("shard_counts"):
        lines += ["### Against the shard count (one image a shard)", "",
                  "| shards | loader's first batch s | merge of 4 parts s | verify_shards s |", "|---|---|---|---|"]
        lines += [f"| {r['shards']:,} | {r['first_batch_s']} | {r['merge_wall_s']} | {r['verify_wall_s']} |"
                  for r in report["shard_counts"]] + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="working directory (sources and shards are made and removed inside it)")
    p.add_argument("--scale", type=float, nargs="*", default=[], help="fractions of ImageNet's image counts")
    p.add_argument("--fall11", action="store_true", help="Fall 2011's shape: fall11_whole.tar, 21,841 synsets")
    p.add_argument("--listing-only", action="store_true",
                   help="only make_shards --part 1/1000 at each scale: the listing's memory and time")
    p.add_argument("--bookkeeping", action="store_true",
                   help="also time a full-size epoch order and full-width checkpoints (no data needed)")
    p.add_argument("--shard-counts", type=int, nargs="*", default=[],
                   help="also time the loader's first batch over shard sets of these many shards")
    a = p.parse_args(argv)
    if not a.scale and not a.shard_counts and not a.bookkeeping:
        p.error("give --scale S [S ...], --shard-counts N [N ...] and/or --bookkeeping")
    if any(not 0 < s <= 1 for s in a.scale) or any(n < 1 for n in a.shard_counts):
        p.error("--scale takes fractions in (0, 1], --shard-counts positive counts")
    os.makedirs(a.out, exist_ok=True)
    log = os.path.join(a.out, "rehearsal.log")
    report = {"date": time.strftime("%Y-%m-%d"), "cores": len(os.sched_getaffinity(0)), "scales": [],
              "shard_counts": []}
    for s in sorted(a.scale):
        report["scales"].append(rehearse(a.out, s, a.fall11, log, a.listing_only))
    report["growth"] = growth(report["scales"])
    report["memory_slopes"] = memory_slopes(report["scales"])
    for n in a.shard_counts:
        report["shard_counts"].append(shard_count_first_batch(a.out, n, log))
        print(f"  {n} shards: first batch in {report['shard_counts'][-1]['first_batch_s']} s", flush=True)
    if a.bookkeeping:
        report["bookkeeping"] = bookkeeping(a.out, log)
        print(f"  bookkeeping: {report['bookkeeping']}", flush=True)
    with open(os.path.join(a.out, "rehearsal.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(a.out, "rehearsal.md"), "w", encoding="utf-8") as f:
        f.write(table(report))
    print(table(report))
    failed = [s["stage"] for r in report["scales"] for s in r["stages"] if not s["ok"]]
    failed += [f"{r['shards']} shards" for r in report["shard_counts"] if not r["ok"]]
    failed += ["bookkeeping"] * (a.bookkeeping and not report["bookkeeping"]["ok"])
    if failed:
        print(f"rehearse: failed: {', '.join(failed)} (see {log})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
