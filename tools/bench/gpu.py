"""The GPU check (tools/gpu_check.sh): pipeline semantics and rate, model throughput, the trainer
end to end, the two halves, and the recipe study."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

from tools.bench.common import (_epoch_rate, _epoch_timing, _line, _model_rate, _quiet, _shards,
                                _trainer_rate)


def alexnet_train_flops(num_classes: int = 1000) -> float:
    """FLOPs of one training image: 3x the forward pass (backward = 2x forward), multiply-adds as 2."""
    fwd, hw = 0, {"conv1": 55, "conv2": 27, "conv3": 13, "conv4": 13, "conv5": 13}
    from model.alexnet import CONVS
    for name, cin, cout, k, _, _, groups in CONVS:
        fwd += 2 * cout * (cin // groups) * k * k * hw[name] ** 2
    fwd += 2 * (9216 * 4096 + 4096 * 4096 + 4096 * num_classes)
    return 3.0 * fwd


def bench_gpu(a) -> dict:
    """The GPU check: pipeline semantics and rate, model throughput, end to end, the two halves."""
    import torch
    from pipeline import make_loader
    from tools import compute_pca
    dry = a.dry_run
    if not dry and not torch.cuda.is_available():
        print("gpu check: torch sees no CUDA GPU (use --dry-run to rehearse on the CPU)")
        sys.exit(1)
    dev = "cpu" if dry else "cuda"
    images, batch = (a.images or (32 if dry else 3072)), (a.batch or (8 if dry else 256))
    steps = a.steps or (2 if dry else 40)
    report = {"device": "cpu (dry run)" if dry else torch.cuda.get_device_name(), "dry_run": dry,
              "torch": torch.__version__, "images": images, "batch": batch, "date": time.strftime("%Y-%m-%d")}
    try:
        import nvidia.dali
        report["dali"] = nvidia.dali.__version__
    except ImportError:  # the check is about DALI: never fall back to the webdataset loader silently
        print("gpu check: DALI is not installed here (pip install nvidia-dali-cuda130, or tools/gpu_check.sh "
              "--wheels BUNDLE on an offline node)")
        sys.exit(1)
    print(f"GPU check on {report['device']}: torch {report['torch']}, DALI {report['dali']}, "
          f"{images} generated images, batch {batch}")
    with tempfile.TemporaryDirectory() as tmp:
        out = _shards(tmp, images)
        _quiet(compute_pca.main, [out, "--quiet"])

        # 1. the DALI pipeline on the device against the CPU pipeline, same seed: same batches
        print("1. DALI pipeline on the device vs on the CPU (first batch, same seed)")
        sem = {}
        for crop, split in (("random", "train"), ("center", "val"), ("ten", "val")):
            kw = dict(split=split, batch_size=min(batch, 32), crop=crop, seed=5, backend="dali")
            xc, yc = next(iter(make_loader(out, device="cpu", **kw)))
            xg, yg = next(iter(make_loader(out, device=dev, **kw)))
            diff = (xg.float().cpu() - xc).abs()
            sem[crop] = {"labels_equal": bool(torch.equal(yc, yg.cpu())), "mean_abs_diff": diff.mean().item(),
                         "max_abs_diff": diff.max().item(), "on_device": str(xg.device)}
            ok = sem[crop]["labels_equal"] and sem[crop]["mean_abs_diff"] < 0.02
            print(f"   {crop:6s}: labels equal {sem[crop]['labels_equal']}, mean |diff| "
                  f"{sem[crop]['mean_abs_diff']:.2e}, max {sem[crop]['max_abs_diff']:.2e} (normalized units) "
                  f"{'OK' if ok else 'MISMATCH'}")
        report["pipeline_semantics"] = sem
        loader = make_loader(out, "train", batch_size=batch, device=dev, backend="dali")
        _epoch_rate(loader)  # warm-up epoch
        timings = [_epoch_timing(loader) for _ in range(2)]
        report["pipeline_images_per_s"] = max(t[0] for t in timings)  # without each epoch's start-up
        report["pipeline_first_batch_s"] = min(t[1] for t in timings)
        _line("   DALI training pipeline", report["pipeline_images_per_s"],
              extra=f"  (after the first batch; first batch {report['pipeline_first_batch_s']:.2f} s)")

        # 2. the model alone, synthetic batches: bf16 autocast, channels-last, with/without torch.compile
        print("2. AlexNet training step on synthetic batches")
        flops = alexnet_train_flops(10)
        report["train_flops_per_image"] = flops
        for compiled in ((False,) if dry else (False, True)):
            rate = _model_rate(dev, batch, steps, compiled)
            key = "model_compiled_images_per_s" if compiled else "model_images_per_s"
            report[key] = rate
            peak = a.peak_tflops * 1e12
            _line(f"   {'torch.compile' if compiled else 'eager'} bf16 channels-last", rate,
                  extra=f"  ({100 * rate * flops / peak:.1f}% of {a.peak_tflops:.0f} TFLOP/s)" if not dry else "")

        report["lrn_channels_last"] = _lrn_times(dev, batch)
        lt = report["lrn_channels_last"]
        print(f"   LRN after conv1, channels-last, fwd+bwd: NHWC view {1e3 * lt['nhwc_view_s']:.2f} ms, "
              f"fold into the batch (copies) {1e3 * lt['fold_s']:.2f} ms: {lt['fold_s'] / lt['nhwc_view_s']:.2f}x")

        # 3. end to end: the trainer with DALI, with synthetic batches, with the webdataset loader
        print("3. model.train end to end (images/s of the training loop, second epoch)")
        for backend in ("synthetic", "dali", "wds"):
            run = os.path.join(tmp, f"run-{backend}")
            report[f"trainer_{backend}_images_per_s"] = _trainer_rate(out, run, backend, batch, dev, epochs=2)
            _line(f"   {backend}", report[f"trainer_{backend}_images_per_s"])
        syn = report["trainer_synthetic_images_per_s"]
        report["dali_vs_synthetic"] = report["trainer_dali_images_per_s"] / syn
        report["wds_vs_synthetic"] = report["trainer_wds_images_per_s"] / syn
        print(f"   DALI / synthetic {report['dali_vs_synthetic']:.2f}x (goal >= 0.9), "
              f"webdataset / synthetic {report['wds_vs_synthetic']:.2f}x")

    # 4. the two-halves layout computes the grouped layout's function
    print("4. two halves vs grouped layout (same weights, eval mode)")
    report["halves"] = {}
    pairs = [("one device", (dev, dev))]
    if not dry and torch.cuda.device_count() >= 2:
        pairs.append(("two GPUs", ("cuda:0", "cuda:1")))
    for label, devices in pairs:
        report["halves"][label] = _halves_diff(devices)
        print(f"   {label}: max |logit diff| {report['halves'][label]:.2e}")

    # 5. the recipe study (tools/init_study.py) on the generated 100-class set: which recipes leave chance
    if a.study_steps != 0:
        with tempfile.TemporaryDirectory() as tmp:
            report["recipe_study"] = _recipe_study(tmp, dev, dry, a)
    return report


def _recipe_study(tmp: str, dev: str, dry: bool, a) -> dict:
    """tools/init_study.py on the 100-class sample set (4 classes in a dry run); its plot and numbers
    are copied next to the --json report (the runs' checkpoints stay in the temporary directory)."""
    from tools import compute_pca, init_study, make_sample_data, make_shards
    classes, per_class, batch = (4, 8, 8) if dry else (100, 40, 128)
    steps = a.study_steps or (2 if dry else 2000)
    src, shards, runs = (os.path.join(tmp, d) for d in ("study-src", "study-shards", "study-runs"))
    print(f"5. recipe study: {classes} classes x {per_class} images, batch {batch}, >= {steps} steps per recipe")
    make_sample_data.generate(src, "folder", classes=classes, train_per_class=per_class, val_per_class=5, seed=0,
                              quirks=False)
    _quiet(make_shards.main, [src, shards, "--shard-samples", "256"])
    _quiet(compute_pca.main, [shards, "--quiet"])
    t0 = time.perf_counter()
    _quiet(init_study.main, [shards, "--steps", str(steps), "--batch-size", str(batch), "--devices", dev,
                             "--out", runs])
    with open(os.path.join(runs, "init_study.json")) as f:
        study = json.load(f)
    if a.json:
        import shutil
        for name in ("init_study.png", "init_study.json"):
            shutil.copy(os.path.join(runs, name), os.path.join(os.path.dirname(os.path.abspath(a.json)), name))
    summary = {name: {"first4": r["first4"], "last10": r["last10"], "val_top1_error": r["val_top1_error"],
                      "exit": r["exit"]} for name, r in study["runs"].items()}
    for name, r in summary.items():
        print(f"   {name:12s} loss first 4 steps {r['first4']:7.3f}, last 10 {r['last10']:7.3f}, "
              f"val top-1 error {100 * r['val_top1_error'][-1]:.1f}% after {len(r['val_top1_error'])} epochs")
    print(f"   ({time.perf_counter() - t0:.0f} s; chance: loss {math.log(classes):.3f})")
    return {"setup": study["setup"], "runs": summary, "seconds": time.perf_counter() - t0}


def _lrn_times(dev: str, batch: int, reps: int = 10) -> dict:
    """Seconds of conv1's LRN (fwd+bwd, bf16 on a GPU) on channels-last activations: the model's NHWC
    path against folding the halves into the batch, which copies to NCHW and back."""
    import torch
    from model.alexnet import AlexNet
    model = AlexNet(num_classes=10).to(dev)
    dtype = torch.bfloat16 if dev != "cpu" else torch.float32
    x0 = torch.randn(batch, 96, 55, 55, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)

    def fold(x):
        n, c, h, w = x.shape
        return model.lrn(x.reshape(n * 2, c // 2, h, w)).reshape(n, c, h, w)

    def timed(f):
        best = float("inf")
        for _ in range(reps):
            x = x0.clone().requires_grad_(True)
            if dev != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            f(x).float().sum().backward()
            if dev != "cpu":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best
    return {"nhwc_view_s": timed(model.half_lrn), "fold_s": timed(fold)}


def _halves_diff(devices) -> float:
    import torch
    from model.alexnet import AlexNet, AlexNetConfig, TwoDeviceAlexNet, canonical_state, load_canonical
    torch.manual_seed(0)
    cfg = AlexNetConfig(num_classes=1000)
    grouped = AlexNet(cfg=cfg).to(devices[0]).eval()
    split = TwoDeviceAlexNet(cfg, devices).eval()
    load_canonical(split, canonical_state(grouped))
    x = torch.randn(8, 3, 224, 224, device=devices[0])
    with torch.no_grad():
        return (split(x) - grouped(x)).abs().max().item()
