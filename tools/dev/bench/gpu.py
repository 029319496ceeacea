"""The GPU check (tools/dev/gpu_check.sh): pipeline semantics and rate, model throughput, the trainer
end to end, the two halves, and the recipe study."""
from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time

from tools.dev.bench.common import (_epoch_rate, _epoch_timing, _interleaved, _line, _model_rate, _quiet, _shards,
                                    _trainer_rate)
from tools.dev.bench.gpu_review import batches_intact, review_ratios, unexercised_lines

# nvJPEG (GPU) and libjpeg-turbo (CPU) may round the IDCT and the chroma upsampling differently: DALI's
# own decoder tests accept a mean difference of about one grey level, and a maximum of a few levels.
DECODER_MEAN_TOLERANCE = 1.0  # grey levels (0-255 units: the pipeline's default normalization="mean")
HW_DECODER_LOADS = (0.0, 0.35, 0.65, 0.9)  # shares of JPEGs for the hardware decoder, swept on a GPU


def decoder_agreement(x_cpu, x_gpu) -> dict:
    """The GPU pipeline's batch against the CPU pipeline's, in 0-255 units: mean and max |diff| and
    whether the mean is within DECODER_MEAN_TOLERANCE."""
    diff = (x_gpu.float().cpu() - x_cpu.float().cpu()).abs()
    mean, worst = diff.mean().item(), diff.max().item()
    return {"mean_abs_diff": mean, "max_abs_diff": worst, "ok": mean <= DECODER_MEAN_TOLERANCE}


class Report(dict):
    """The check's results, rewritten to --json (atomically) as each section ends: a check stopped by
    a time limit keeps what it measured."""

    def __init__(self, path: str | None, **items):
        super().__init__(**items)
        self.path = path

    def save(self, section: str) -> None:
        self.setdefault("sections_done", []).append(section)
        if self.path:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump({"gpu": self}, f, indent=1)
            os.replace(tmp, self.path)


# The study's budget on one H200 (README "GPU check"): 5 runs x 20 epochs x 4,000 images = 400k images at
# ~4-8k img/s through DALI and the model at batch 128 (~2k at batch 32), plus a 500-image evaluation per epoch.
STUDY_EPOCHS = 20


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
    from tools.dev.bench.driver import driver_info
    report = Report(a.json, device="cpu (dry run)" if dry else torch.cuda.get_device_name(), dry_run=dry,
                    torch=torch.__version__, images=images, batch=batch, date=time.strftime("%Y-%m-%d"),
                    driver=driver_info(),  # {"driver", "cuda"} from nvidia-smi, or None
                    torch_cuda=torch.version.cuda)
    try:
        import nvidia.dali
        report["dali"] = nvidia.dali.__version__
    except ImportError:  # the check is about DALI: never fall back to the webdataset loader silently
        print("gpu check: DALI is not installed here (pip install nvidia-dali-cuda130, or tools/dev/gpu_check.sh "
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
            sem[crop] = {"labels_equal": bool(torch.equal(yc, yg.cpu())), **decoder_agreement(xc, xg),
                         "on_device": str(xg.device)}
            ok = sem[crop]["labels_equal"] and sem[crop]["ok"]
            print(f"   {crop:6s}: labels equal {sem[crop]['labels_equal']}, |diff| mean "
                  f"{sem[crop]['mean_abs_diff']:.3f}, max {sem[crop]['max_abs_diff']:.1f} grey levels (tolerance: "
                  f"mean <= {DECODER_MEAN_TOLERANCE}) {'OK' if ok else 'MISMATCH'}")
        report["pipeline_semantics"] = sem
        # the first batch of a fresh loader: the pipeline's construction and first decode, nothing prefetched
        first = []
        for _ in range(2):
            fresh = make_loader(out, "train", batch_size=batch, device=dev, backend="dali", verify=False)
            t0 = time.perf_counter()
            next(iter(fresh))
            first.append(time.perf_counter() - t0)
            del fresh
        report["pipeline_first_batch_s"] = min(first)
        report["hw_decoder_load"] = {}
        for load in (HW_DECODER_LOADS if not dry else HW_DECODER_LOADS[-1:]):
            loader = _dali_loader(out, batch, dev, load)
            _epoch_rate(loader)  # warm-up epoch
            report["hw_decoder_load"][str(load)] = max(_epoch_timing(loader)[0] for _ in range(2))
            _line(f"   DALI training pipeline, hw_decoder_load {load}", report["hw_decoder_load"][str(load)],
                  extra="  (after each epoch's first batch)")
            del loader
        report["pipeline_images_per_s"] = max(report["hw_decoder_load"].values())
        print(f"   first batch of a fresh loader: {report['pipeline_first_batch_s']:.2f} s")
        report["against_plain_dali"] = _against_plain_dali(out, batch, dev, rounds=1 if dry else 5)
        report.save("pipeline")

        # 1b. DALI's zero-copy batches while the host runs ahead of a busy GPU (the review's B1)
        print("1b. training batches hashed before and after a GPU sleep (the host runs ahead, drops them)")
        report["batches_intact"] = batches_intact(out, min(batch, 64), dev, n=4 if dry else 12)
        for how, r in report["batches_intact"].items():
            print(f"   {how.replace('_', ' ')}: {len(r['changed'])} of {r['batches']} batches changed while queued"
                  f"{'  <- DALI reused memory still being read' if r['changed'] else ''}")
        report.save("batches")

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
        report.save("model")
        lt = report["lrn_channels_last"]
        print(f"   LRN after conv1, channels-last, fwd+bwd: NHWC view {1e3 * lt['nhwc_view_s']:.2f} ms, "
              f"fold into the batch (copies) {1e3 * lt['fold_s']:.2f} ms: {lt['fold_s'] / lt['nhwc_view_s']:.2f}x")

        # 3. end to end: the trainer with DALI, with synthetic batches, with the webdataset loader
        print("3. model.train end to end (images/s of the training loop, mean of epochs 2-4)")
        for backend in ("synthetic", "dali", "wds"):
            run = os.path.join(tmp, f"run-{backend}")
            report[f"trainer_{backend}_images_per_s"] = _trainer_rate(out, run, backend, batch, dev, epochs=2 if dry else 4,
                                                                      width=0.125 if dry else 1.0)
            _line(f"   {backend}", report[f"trainer_{backend}_images_per_s"])
        syn = report["trainer_synthetic_images_per_s"]
        report["dali_vs_synthetic"] = report["trainer_dali_images_per_s"] / syn
        report["wds_vs_synthetic"] = report["trainer_wds_images_per_s"] / syn
        print(f"   DALI / synthetic {report['dali_vs_synthetic']:.2f}x (goal >= 0.9), "
              f"webdataset / synthetic {report['wds_vs_synthetic']:.2f}x")
        report.save("trainer")

    # 4. the two-halves layout computes the grouped layout's function
    print("4. two halves vs grouped layout (same weights, eval mode)")
    report["halves"] = {}
    pairs = [("one device", (dev, dev))]
    if not dry and torch.cuda.device_count() >= 2:
        pairs.append(("two GPUs", ("cuda:0", "cuda:1")))
    for label, devices in pairs:
        report["halves"][label] = _halves_diff(devices)
        print(f"   {label}: max |logit diff| {report['halves'][label]:.2e}")
    report.save("halves")

    # 4b. the review's unexercised lines, and its speed fixes against their former selves
    print("4b. two halves in bf16 (eager, compiled), CUDA RNG restore, neighbours on the device; C1, C2, C4")
    with tempfile.TemporaryDirectory() as tmp:
        out = _shards(tmp, min(images, 512))
        _quiet(compute_pca.main, [out, "--quiet"])
        report["unexercised"] = unexercised_lines(tmp, out, dev, min(batch, 64), dry)
    for k, v in report["unexercised"].items():
        print(f"   {k}: {v}")
    report["review_ratios"] = review_ratios(dev, 8 if dry else 128, 2 if dry else 20, rounds=1 if dry else 3)
    for k, v in report["review_ratios"].items():
        print(f"   {k}: after / before {v['after_over_before']:.3f}x (rounds {v['rounds']})")
    report.save("review")

    # 5. the recipe study (tools/dev/init_study.py) on the generated 100-class set: which recipes leave chance
    if a.study_epochs != 0:
        with tempfile.TemporaryDirectory() as tmp:
            report["recipe_study"] = _recipe_study(tmp, dev, dry, a)
        report.save("recipe_study")
    return report


def _against_plain_dali(out: str, batch: int, dev: str, rounds: int) -> dict:
    """bench pipeline's goals on the device: our training loader (region-of-interest decoding) against
    (a) a plain DALI pipeline (whole images, random crop, flip, normalize) and (c) whole images decoded
    and nothing else, the same reader threads, in paired rounds of one epoch each."""
    import torch
    from pipeline import make_loader
    from tools.dev.bench.pipeline import PlainDali
    gpu = dev != "cpu"
    threads = min(os.cpu_count() or 1, 8)  # our loader's default on a GPU
    device_id = 0 if gpu else None
    loaders = {"ours": make_loader(out, "train", batch_size=batch, device=dev, backend="dali", num_threads=threads,
                                   verify=False),
               "plain": PlainDali(out, batch, threads, device_id=device_id),
               "decode": PlainDali(out, batch, threads, decode_only=True, device_id=device_id)}

    def epoch(loader):
        def run():
            n = sum(len(y) for _, y in loader)
            if gpu:
                torch.cuda.synchronize()
            return n
        return run

    images = epoch(loaders["ours"])()  # warm-up epochs; ours' count is the train split's
    for name in ("plain", "decode"):
        epoch(loaders[name])()
    res = _interleaved(images, {k: epoch(ld) for k, ld in loaders.items()}, rounds=rounds)
    result = {"ours_images_per_s": res["ours"], "plain_images_per_s": res["plain"],
              "decode_images_per_s": res["decode"],
              "ours_vs_plain": res["ratio:ours/plain"], "ours_vs_plain_range": res["range:ours/plain"],
              "ours_vs_decode": res["ratio:ours/decode"], "ours_vs_decode_range": res["range:ours/decode"]}
    print(f"   ours / (a) plain DALI (whole images, crop, flip, normalize): {result['ours_vs_plain']:.2f}x "
          f"(goal >= 1.1; rounds {result['ours_vs_plain_range']})\n"
          f"   ours / (c) whole images decoded, nothing else: {result['ours_vs_decode']:.2f}x "
          f"(goal >= 1.0; rounds {result['ours_vs_decode_range']})")
    return result


def _dali_loader(out: str, batch: int, dev: str, hw_decoder_load: float):
    """The DALI training loader with another hw_decoder_load (a LoaderConfig field make_loader leaves
    at its default)."""
    import dataclasses

    from pipeline import make_loader
    from pipeline.dali import DaliLoader
    cfg = make_loader(out, "train", batch_size=batch, device=dev, backend="dali", verify=False).cfg
    return DaliLoader(dataclasses.replace(cfg, hw_decoder_load=hw_decoder_load))


def _recipe_study(tmp: str, dev: str, dry: bool, a) -> dict:
    """tools/dev/init_study.py on the 100-class sample set (4 classes in a dry run), without checkpoints or
    plots; its plot and numbers are copied next to the --json report."""
    from tools import compute_pca, make_sample_data, make_shards
    from tools.dev import init_study
    classes, per_class, batch = (4, 8, 8) if dry else (100, 40, 128)
    epochs = a.study_epochs or (1 if dry else STUDY_EPOCHS)
    src, shards, runs = (os.path.join(tmp, d) for d in ("study-src", "study-shards", "study-runs"))
    print(f"5. recipe study: {classes} classes x {per_class} images, batch {batch}, {epochs} epochs per variant")
    make_sample_data.generate(src, "folder", classes=classes, train_per_class=per_class, val_per_class=5, seed=0,
                              quirks=False)
    _quiet(make_shards.main, [src, shards, "--shard-samples", "256"])
    _quiet(compute_pca.main, [shards, "--quiet"])
    t0 = time.perf_counter()
    _quiet(init_study.main, [shards, "--epochs", str(epochs), "--batch-size", str(batch), "--devices", dev,
                             "--out", runs] + (["--variants", "paper,cuda-convnet2@4",  # the dry run: one variant each way
                                                "--probe-every", "2", "--width", "0.125"] if dry else []))
    with open(os.path.join(runs, "init_study.json")) as f:
        study = json.load(f)
    if a.json:
        import shutil
        for name in ("init_study.png", "init_study.json"):
            shutil.copy(os.path.join(runs, name), os.path.join(os.path.dirname(os.path.abspath(a.json)), name))
    summary = {name: {k: r[k] for k in ("batch_size", "lr", "first4", "peak", "last10", "leaves_chance_at_step",
                                        "val", "exit")} for name, r in study["runs"].items()}
    for name, r in summary.items():
        print(f"   {name:18s} lr {r['lr']:.4g}, loss first 4 steps {r['first4']:7.3f}, last 10 {r['last10']:7.3f}, "
              f"leaves chance at step {r['leaves_chance_at_step']}, val top-1 error "
              f"{100 * r['val'][-1]['val_top1_error']:.1f}% after {len(r['val'])} epochs")
    print(f"   ({time.perf_counter() - t0:.0f} s; chance: loss {math.log(classes):.3f})")
    return {"setup": study["setup"], "runs": summary, "seconds": time.perf_counter() - t0}


def _lrn_times(dev: str, batch: int, reps: int = 10) -> dict:
    """Seconds of conv1's LRN (fwd+bwd; on a GPU under bf16 autocast on bf16 activations, as in
    training) on channels-last activations: the model's NHWC path against folding the halves into
    the batch, which copies to NCHW and back."""
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
            with torch.autocast(device_type="cuda" if dev != "cpu" else "cpu", dtype=torch.bfloat16,
                                enabled=dev != "cpu"):
                y = f(x)
            y.float().sum().backward()
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
