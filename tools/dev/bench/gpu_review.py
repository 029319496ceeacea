"""The GPU check's sections for the GPU review's findings: the zero-copy batches under a host that runs
ahead (B1), the lines no other section runs (two halves training in bf16 with and without torch.compile,
a CUDA RNG restore, neighbours on the device), and each speed fix against its former self, as a ratio
measured in the same process (C1 LRN's cast, C2 cudnn.benchmark, C4 momentum buffers' memory format).
C3 (loader workers per rank) and C6 (DDP's gradients) need several ranks, C5's gain is one conversion per
evaluation batch: none of them is timed here, and the README says so."""
from __future__ import annotations

import json
import os

from tools.dev.bench.common import _quiet, _step_rate

GPU_SLEEP_CYCLES = 50_000_000  # torch.cuda._sleep: ~25-50 ms of a GPU's time, so the host runs steps ahead


def batches_intact(out: str, batch: int, dev: str, n: int = 12) -> dict:
    """Each training batch hashed on the device twice, before and after a GPU sleep that lets the host run
    ahead and drop its reference; any batch whose second hash differs was overwritten while still queued
    for reading. With the loader's BatchRing, and without it (the race this guards against, if DALI's
    executor reuses the memory)."""
    import torch
    from pipeline import make_loader
    gpu = dev != "cpu"
    result = {}
    for ring in (True, False):
        loader = make_loader(out, "train", batch_size=batch, device=dev, backend="dali", verify=False)
        if not ring:
            loader._ring = None
        pairs = []
        for k, (images, _) in enumerate(loader):
            if k == n:
                break
            weights = torch.arange(1, images.numel() + 1, device=images.device, dtype=torch.float64)
            first = (images.double().flatten() * weights).sum()  # position-weighted: a moved pixel shows
            if gpu:
                torch.cuda._sleep(GPU_SLEEP_CYCLES)
            second = (images.double().flatten() * weights).sum()
            pairs.append((first, second))
            del images, weights  # the consumer's last reference, dropped while its work is queued
        if gpu:
            torch.cuda.synchronize()
        changed = [k for k, (a, b) in enumerate(pairs) if a.item() != b.item()]
        result["with_ring" if ring else "without_ring"] = {"batches": len(pairs), "changed": changed}
        del loader
    return result


def unexercised_lines(tmp: str, out: str, dev: str, batch: int, dry: bool) -> dict:
    """Two halves training steps in bf16 (with and without torch.compile; one GPU holds both halves where
    there is one), a CUDA RNG restore, and neighbours on the device. An error is recorded, not raised:
    the check goes on to its other sections."""
    import torch
    from model import train
    from model.checkpoint import rng_state, set_rng_state
    from tools import neighbours
    gpu = dev != "cpu"
    two = (f"{dev}:0,{dev}:{1 if torch.cuda.device_count() > 1 else 0}" if gpu else "cpu,cpu")
    result = {"two_halves_devices": two}
    ckpt = None
    for compiled in ((False,) if dry else (False, True)):
        run = os.path.join(tmp, f"halves-{'compiled' if compiled else 'eager'}")
        key = f"two_halves_bf16{'_compiled' if compiled else ''}"
        try:
            rc = _quiet(train.main, ["--shards", out, "--out", run, "--epochs", "1", "--batch-size", str(batch),
                                     "--devices", two, "--width", "0.25", "--log-every", "1"]
                        + ["--compile"] * compiled)
            with open(os.path.join(run, "metrics.jsonl")) as f:
                losses = [r for r in map(json.loads, f) if r["kind"] == "step"]
            result[key] = {"exit": rc, "steps": len(losses), "last_loss": losses[-1]["train_loss"] if losses else None}
            if rc == 0 and not compiled:
                ckpt = os.path.join(run, "checkpoint.pt")
        except Exception as e:  # noqa: BLE001 - recorded for the next reader of gpu_check.json
            result[key] = {"error": f"{type(e).__name__}: {e}"[:500]}
    state = rng_state()
    a = torch.rand(4, device=dev)
    set_rng_state(state)
    result["rng_restore_equal"] = bool(torch.equal(a, torch.rand(4, device=dev)))
    if ckpt:
        feats = os.path.join(tmp, "fc7.f16")
        try:
            rc = _quiet(neighbours.main, [ckpt, out, os.path.join(tmp, "nn.png"), "--devices", dev,
                                          "--max-train", "256", "--features", feats])
            result["neighbours"] = {"exit": rc, "features_bytes": os.path.getsize(feats) if rc == 0 else None}
        except Exception as e:  # noqa: BLE001
            result["neighbours"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    return result


def review_ratios(dev: str, batch: int, steps: int, rounds: int = 3) -> dict:
    """After / before of each fix that one device can time, in paired rounds (best of each round):
    C1 a training step with LRN's output cast back against without, C2 with cudnn.benchmark against
    without, C4 an SGD step with channels-last momentum buffers against NCHW ones."""
    import torch
    import torch.nn.functional as F
    from model import alexnet
    from model.alexnet import AlexNet, AlexNetConfig
    gpu = dev != "cpu"

    def step_rate(model, x, y, opt, n=steps):
        return _step_rate(model, x, y, opt, n, warmup=1)

    def setup():
        torch.manual_seed(0)
        model = AlexNet(cfg=AlexNetConfig(num_classes=1000, init="kaiming")).to(dev)
        x = torch.randn(batch, 3, 224, 224, device=dev)
        if gpu:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return model, x, torch.randint(0, 1000, (batch,), device=dev), opt

    def no_cast_block(x, conv, lrn, name, lrn_after):  # conv_block as it was before C1
        x = F.relu(conv(x), inplace=True)
        if name in lrn_after:
            x = lrn(x)
        if name in alexnet.POOL_AFTER:
            x = F.max_pool2d(x, 3, 2)
        return x

    def with_block(block):
        def run():
            real = alexnet.conv_block
            alexnet.conv_block = block
            try:
                return step_rate(*setup())
            finally:
                alexnet.conv_block = real
        return run

    def with_benchmark(on):
        def run():
            old = torch.backends.cudnn.benchmark
            torch.backends.cudnn.benchmark = on
            try:
                return step_rate(*setup())
            finally:
                torch.backends.cudnn.benchmark = old
        return run

    def with_buffers(channels_last):
        def run():
            model, x, y, opt = setup()
            step_rate(model, x, y, opt, n=1)  # buffers exist
            for p in model.parameters():
                buf = opt.state[p]["momentum_buffer"]
                opt.state[p]["momentum_buffer"] = (torch.empty_like(p).copy_(buf) if channels_last
                                                   else buf.contiguous())
            return step_rate(model, x, y, opt)
        return run

    pairs = {"c1_lrn_cast": (with_block(alexnet.conv_block), with_block(no_cast_block)),
             "c2_cudnn_benchmark": (with_benchmark(True), with_benchmark(False)),
             "c4_momentum_channels_last": (with_buffers(True), with_buffers(False))}
    out = {}
    for name, (after, before) in pairs.items():
        ratios = []
        for _ in range(rounds):
            ratios.append(after() / before())
        ratios.sort()
        out[name] = {"after_over_before": ratios[len(ratios) // 2], "rounds": [round(r, 3) for r in ratios]}
    return out

