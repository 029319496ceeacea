"""What the benchmarks share: generated data, timing (paired rounds, CPU seconds), rates of
the loaders, the trainer and a bare training loop."""
from __future__ import annotations

import json
import os
import resource
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _line(name: str, rate: float, unit: str = "img/s", extra: str = "") -> None:
    print(f"  {name:44s} {rate:10.1f} {unit}{extra}", flush=True)


def _source(tmp: str, images: int, classes: int = 10) -> str:
    from tools import make_sample_data
    root = os.path.join(tmp, "src")
    if not os.path.exists(root):
        make_sample_data.generate(root, "folder", classes=classes, train_per_class=max(1, images // classes),
                                  val_per_class=1, seed=0, quirks=False)
    return root


def _shards(tmp: str, images: int) -> str:
    from tools import make_shards
    out = os.path.join(tmp, "shards")
    if not os.path.exists(os.path.join(out, "dataset.json")):
        assert _quiet(make_shards.main, [_source(tmp, images), out, "--shard-samples", "256"]) == 0
    return out


ROUNDS = 9  # paired rounds for the ratios with a goal: enough that the median rides out this machine's drift


def _interleaved(n: int, runs: dict, rounds: int = 3) -> dict:
    """Images/s of each contender, best of `rounds`, taking turns so drift hits all alike.

    Also `ratio:<a>/<b>` for every pair: the median over rounds of the ratio within
    one round, which cancels drift slower than a round (this machine's speed wanders
    by 10-30 % over minutes), with `range:<a>/<b>`; and `cpu_ratio:<a>/<b>`, the same
    for CPU seconds (all processes) instead of wall-clock: what the work costs, apart
    from waiting (on this VM it varies from run to run about as much as the wall-clock)."""
    times, cpu = {k: [] for k in runs}, {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            c0 = _cpu_seconds()
            t0 = time.perf_counter()
            run()
            times[k].append(time.perf_counter() - t0)
            cpu[k].append(_cpu_seconds() - c0)
    out = {k: n / min(t) for k, t in times.items()}
    for a in runs:
        for b in runs:
            if a != b:
                paired = sorted(tb / ta for ta, tb in zip(times[a], times[b]))
                out[f"ratio:{a}/{b}"] = float(np.median(paired))
                out[f"range:{a}/{b}"] = f"{paired[0]:.2f}-{paired[-1]:.2f}"
                out[f"cpu_ratio:{a}/{b}"] = float(np.median([cb / ca for ca, cb in zip(cpu[a], cpu[b])]))
    return out


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (pool workers, once joined)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _best_rate(n: int, run, repeats: int = 3) -> float:
    """Images/s of the fastest of `repeats` runs: the least disturbed by the rest of the machine."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return n / best


def _quiet(fn, *args):
    with open(os.devnull, "w") as null:
        old_out, old_err, sys.stdout, sys.stderr = sys.stdout, sys.stderr, null, null
        try:
            return fn(*args)
        finally:
            sys.stdout, sys.stderr = old_out, old_err


def _epoch_rate(loader) -> float:
    t0 = time.perf_counter()
    n = sum(len(y) for _, y in loader)
    return n / (time.perf_counter() - t0)


def _epoch_timing(loader) -> tuple[float, float]:
    """(images/s after the first batch, seconds to the first batch): the rate without the epoch's
    start-up (pipeline construction, first decode), and that start-up alone."""
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    t1 = time.perf_counter()
    n = sum(len(y) for _, y in it)
    return n / max(time.perf_counter() - t1, 1e-9), t1 - t0


def _trainer_rate(out: str, run: str, backend: str, batch: int, device: str = "cpu", epochs: int = 1,
                  width: float = 1.0) -> float:
    """model.train's images/s over its training loop alone (not evaluation): the mean over its epochs
    after the first (which includes start-up and, with --compile, compilation). width < 1: a smaller
    model (a rehearsal's, which checks the plumbing, not the rate)."""
    from model import train
    assert _quiet(train.main, ["--shards", out, "--out", run, "--epochs", str(epochs), "--batch-size", str(batch),
                               "--init", "kaiming", "--devices", device, "--backend", backend, "--no-checkpoints",
                               "--log-every", "1000", "--width", str(width)]) == 0
    with open(os.path.join(run, "metrics.jsonl")) as f:
        rates = [r["images_per_s"] for r in map(json.loads, f) if r["kind"] == "epoch"]
    return float(np.mean(rates[1:] or rates))


def _model_rate(dev: str, batch: int, steps: int, compiled: bool, warmup: int | None = None) -> float:
    """A bare PyTorch training loop (the baseline for the trainer): AlexNet, SGD, one fixed batch.
    On a GPU with bf16 autocast and channels-last, as the trainer; warm-up steps are not timed."""
    import torch
    from model.alexnet import AlexNet, AlexNetConfig
    torch.manual_seed(0)
    gpu = dev != "cpu"
    model = AlexNet(cfg=AlexNetConfig(num_classes=10, init="kaiming")).to(dev)
    x = torch.randn(batch, 3, 224, 224, device=dev)
    if gpu:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    net = torch.compile(model) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    y = torch.randint(0, 10, (batch,), device=dev)
    return _step_rate(net, x, y, opt, steps, warmup if warmup is not None else (3 if not compiled else 5))


def _step_rate(net, x, y, opt, steps: int, warmup: int) -> float:
    """Images/s of plain SGD steps on one fixed batch (bf16 autocast on a GPU), after warm-up steps (and
    compilation) that are not timed; one sync at the start and one at the end."""
    import torch
    import torch.nn.functional as F
    gpu = x.device.type == "cuda"

    def step():
        with torch.autocast(device_type="cuda" if gpu else "cpu", dtype=torch.bfloat16, enabled=gpu):
            loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    step().item()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()
    return steps * len(x) / (time.perf_counter() - t0)
