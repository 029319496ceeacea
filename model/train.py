"""Train AlexNet on a shard directory.

    python -m model.train --shards shards/imagenet --out runs/alexnet
    python -m model.train --shards ... --devices cuda:0,cuda:1     # the paper's two halves
    torchrun --nproc_per_node 8 -m model.train --shards ...       # data parallel (DDP)

The run directory gets config.json, metrics.jsonl (a JSON line per logged step
and per epoch), plot.png (redrawn every epoch), and checkpoint.pt (written
atomically at every epoch end and every --checkpoint-minutes). `--resume`
continues from checkpoint.pt: with the same command, a run killed at any moment
ends with bitwise the same weights as an uninterrupted one (on the CPU).

Optimizer: PyTorch's SGD, g = grad + wd * w; v = m * v + g; w -= lr * v. With a
constant learning rate this is the paper's rule (section 5: v <- 0.9 v - 0.0005 e w
- e grad; w <- w + v) with v_paper = -lr * v; they differ only in how momentum
carries across a change of lr. Weight decay applies to every parameter, as there.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.alexnet import AlexNetConfig, build, canonical_state, load_canonical, named_canonical_parameters
from pipeline import make_loader
from pipeline.shards import ShardError


@dataclass
class TrainConfig:
    shards: str = ""                  # shard directory with dataset.json and pca.json
    out: str = "runs/alexnet"         # run directory
    epochs: int = 90                  # passes over the training set ("roughly 90 cycles", section 5)
    batch_size: int = 128             # images per step, over all ranks (section 5)
    lr: float = 0.01                  # initial learning rate (section 5)
    momentum: float = 0.9             # (section 5)
    weight_decay: float = 5e-4        # on every parameter (section 5)
    schedule: str = "plateau"         # "plateau": lr / 10 when the val error stops improving (section 5); "step"
    plateau_patience: int = 2         # epochs without a new best val error before lr / 10 (the paper gives none)
    max_lr_divisions: int = 3         # the paper divided the lr 3 times before stopping (section 5)
    step_epochs: int = 30             # "step": lr / 10 every this many epochs (the common 90-epoch recipe)
    warmup_epochs: float = 0.0        # linear ramp from lr/10 to lr over this many epochs (not in the paper)
    init: str = "paper"               # "paper" (section 5) or "kaiming" (learns faster from scratch)
    lrn_layers: str = "paper"         # LRN after conv1, conv2 ("paper", section 3.3) or after all five ("all")
    lrn_convention: str = "paper"     # "paper": k + alpha*sum; "mean": k + alpha/n*sum (Caffe, PyTorch)
    dropout: float = 0.5              # fc6, fc7 (section 4.2)
    input_norm: str = "std"           # "std": (x - mean) / std (DESIGN.md); "mean": x - mean in 0-255 units, the
                                      # paper's only preprocessing (section 2), which its init needs (README)
    seed: int = 0                     # weights, dropout, data order and augmentation
    devices: str = "auto"             # "cpu", "cuda", "cuda:1", or two halves "cuda:0,cuda:1"; auto: cuda if any
    backend: str = "auto"             # data pipeline: "dali", "wds", auto (DALI where it imports); "synthetic" to time
    loader_threads: int = 0           # DALI threads / DataLoader workers per rank (0: all cores)
    bf16: bool = True                 # bf16 autocast on GPUs (ignored on the CPU, where it is slower)
    channels_last: bool = True        # NHWC memory on GPUs (faster convolutions; ignored on the CPU)
    compile: bool = False             # torch.compile the model
    ten_crop: bool = False            # evaluate each epoch with the paper's 10 crops instead of the centre crop
    log_every: int = 20               # steps per logged train loss (each log is one GPU sync)
    checkpoint_minutes: float = 30.0  # also at every epoch end; 0 = after every step
    tensorboard: bool = False         # also log to RUN/tensorboard
    resume: bool = False              # continue from RUN/checkpoint.pt


# Fields that may differ between a run and its resumption (they change no number).
RESUME_MAY_CHANGE = {"resume", "out", "epochs", "log_every", "checkpoint_minutes", "tensorboard", "loader_threads"}


class UsageError(Exception):
    """A bad option or input: printed as one line, exit status 2, nothing written."""


# ---------------------------------------------------------------- schedule (plain functions)

def plateau_divisions(val_errors: list[float], patience: int, max_divisions: int) -> int:
    """How often the lr has been divided by 10 after these epochs' val errors."""
    best, since, divisions = math.inf, 0, 0
    for err in val_errors:
        if err < best:
            best, since = err, 0
        else:
            since += 1
            if since >= patience and divisions < max_divisions:
                divisions, since = divisions + 1, 0
    return divisions


def learning_rate(cfg: TrainConfig, epoch: float, val_errors: list[float]) -> float:
    """lr at (fractional) `epoch`, given the val errors of the finished epochs."""
    if cfg.schedule == "plateau":
        k = plateau_divisions(val_errors, cfg.plateau_patience, cfg.max_lr_divisions)
    else:
        k = int(epoch // cfg.step_epochs)
    lr = cfg.lr / 10 ** k
    if epoch < cfg.warmup_epochs:
        lr *= 0.1 + 0.9 * epoch / cfg.warmup_epochs
    return lr


# ---------------------------------------------------------------- set-up

def parse_devices(spec: str) -> list[str]:
    if spec == "auto":
        return ["cuda"] if torch.cuda.is_available() else ["cpu"]
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not 1 <= len(devices) <= 2:
        raise UsageError(f"--devices {spec}: give one device, or two for the paper's two halves")
    for d in devices:
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise UsageError(f"--devices {spec}: {d!r} is not a device") from None
        if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"--devices {spec}: {d} does not exist (this machine has "
                             f"{torch.cuda.device_count()} CUDA GPUs)")
    return devices


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def optimizer_state(optimizer: torch.optim.Optimizer, model) -> dict:
    """SGD's momentum buffers by canonical parameter name: loads into either model layout."""
    momentum = {}
    for name, params in named_canonical_parameters(model):
        bufs = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
        if all(b is not None for b in bufs):
            momentum[name] = torch.cat([b.detach().cpu() for b in bufs])
    return {"momentum": momentum}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model, state: dict) -> None:
    for name, params in named_canonical_parameters(model):
        buf = state["momentum"].get(name)
        if buf is None:
            continue
        for p, piece in zip(params, torch.split(buf, [p.shape[0] for p in params])):  # halves: rows of dim 0
            optimizer.state[p]["momentum_buffer"] = piece.to(p.device).clone()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, loader, device, bf16: bool) -> dict:
    """Loss and top-1/top-5 error over this rank's part of the split (sums; the caller reduces)."""
    model.eval()
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top-1 right, top-5 right, samples
    for images, labels in loader:
        labels = labels.to(device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            if images.dim() == 5:  # ten crops: average the softmax outputs (section 4.1)
                b, n = images.shape[:2]
                probs = F.softmax(model(images.flatten(0, 1)).float(), 1).view(b, n, -1).mean(1)
            else:
                probs = F.softmax(model(images).float(), 1)
        top5 = probs.topk(min(5, probs.shape[1]), 1).indices
        sums += torch.stack([F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double(),
                             (top5[:, 0] == labels).sum().double(),
                             (top5 == labels[:, None]).any(1).sum().double(),
                             torch.tensor(float(len(labels)), device=device, dtype=torch.float64)])
    model.train()
    return sums


def summarize(sums: torch.Tensor) -> dict:
    loss, right1, right5, n = sums.tolist()
    return {"val_loss": loss / n, "val_top1_error": 1 - right1 / n, "val_top5_error": 1 - right5 / n,
            "val_samples": int(n)}


# ---------------------------------------------------------------- evidence

def draw_plot(path: str, epochs: list[dict]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = [e["epoch"] + 1 for e in epochs]
    fig, ax = plt.subplots(1, 3, figsize=(14, 4))
    ax[0].plot(x, [e["train_loss"] for e in epochs], "o-", label="train")
    ax[0].plot(x, [e["val_loss"] for e in epochs], "o-", label="val")
    ax[0].set(title="loss (cross-entropy)", xlabel="epoch")
    ax[1].plot(x, [100 * e["val_top1_error"] for e in epochs], "o-", label="top-1")
    ax[1].plot(x, [100 * e["val_top5_error"] for e in epochs], "o-", label="top-5")
    ax[1].set(title="validation error (%)", xlabel="epoch", ylim=(0, 100))
    ax[2].semilogy(x, [e["lr"] for e in epochs], "o-")
    ax[2].set(title="learning rate", xlabel="epoch")
    for a in ax[:2]:
        a.legend()
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)


class Metrics:
    """RUN/metrics.jsonl, one JSON object per line; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: str, resume_at: tuple[int, int] | None):
        self.path = path
        self.epochs: list[dict] = []
        if resume_at is not None and os.path.exists(path):
            epoch, step = resume_at
            with open(path) as f:
                kept = [json.loads(line) for line in f if line.strip()]
            kept = [r for r in kept if r["step"] <= step and not (r["kind"] == "epoch" and r["epoch"] >= epoch)]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self.epochs = [r for r in kept if r["kind"] == "epoch"]

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["kind"] == "epoch":
            self.epochs.append(record)


# ---------------------------------------------------------------- the run

def train(cfg: TrainConfig) -> dict:
    rank, world, local_rank = distributed()
    devices = parse_devices(cfg.devices)
    if world > 1:
        if len(devices) == 2:
            raise UsageError("--devices with two halves runs in one process; use torchrun with one device per rank")
        if devices[0].startswith("cuda"):
            devices = [f"cuda:{local_rank}"]
    if cfg.batch_size % world:
        raise UsageError(f"--batch-size {cfg.batch_size} is not divisible across {world} ranks")
    for field, allowed in (("schedule", ("plateau", "step")), ("input_norm", ("std", "mean"))):
        if getattr(cfg, field) not in allowed:
            raise UsageError(f"--{field} must be one of {allowed}")
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    device = torch.device(devices[0])
    on_gpu = device.type == "cuda"
    bf16, channels_last = cfg.bf16 and on_gpu, cfg.channels_last and on_gpu and len(devices) == 1
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")

    checkpoint = None
    if os.path.exists(ckpt_path):
        if not cfg.resume:
            raise UsageError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = checkpoint["config"]
        differ = sorted(k for k, v in asdict(cfg).items() if k not in RESUME_MAY_CHANGE and saved.get(k) != v)
        if differ:
            raise UsageError(f"{ckpt_path}: was made with other options ({', '.join(differ)}); "
                             "resume with the same options")

    try:
        loader_args = dict(device=str(device), rank=rank, world_size=world, seed=cfg.seed, backend=cfg.backend,
                           num_threads=cfg.loader_threads, normalize=True if cfg.input_norm == "std" else "mean")
        train_loader = make_loader(cfg.shards, "train", batch_size=cfg.batch_size // world,
                                   channels_last=channels_last, **loader_args)
        val_loader = make_loader(cfg.shards, "val", batch_size=max(1, cfg.batch_size // world),
                                 crop="ten" if cfg.ten_crop else "center", **loader_args)
    except ShardError as e:
        raise UsageError(str(e)) from None
    manifest = train_loader.manifest
    num_classes = len(manifest["classes"])
    if checkpoint is not None and checkpoint["num_classes"] != num_classes:
        raise UsageError(f"{ckpt_path}: has {checkpoint['num_classes']} classes, {cfg.shards} has {num_classes}")

    if world > 1:
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo")
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    model_cfg = AlexNetConfig(num_classes=num_classes, lrn_layers=cfg.lrn_layers,
                              lrn_convention=cfg.lrn_convention, dropout=cfg.dropout, init=cfg.init)
    model = build(model_cfg, devices)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    val_errors: list[float] = []
    start_epoch, step = 0, 0
    if checkpoint is not None:
        load_canonical(model, checkpoint["model"])
        load_optimizer_state(optimizer, model, checkpoint["optimizer"])
        val_errors = list(checkpoint["scheduler"]["val_errors"])
        start_epoch, step = checkpoint["epoch"], checkpoint["step"]
        train_loader.load_state_dict(checkpoint["loader"])
        set_rng_state(checkpoint["rng"][rank] if rank < len(checkpoint["rng"]) else checkpoint["rng"][0])
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)  # dropout masks differ across ranks
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if on_gpu else None)
    if cfg.compile:
        net = torch.compile(net)

    main = rank == 0
    if main:
        os.makedirs(cfg.out, exist_ok=True)
        run_info = {"config": asdict(cfg), "model": asdict(model_cfg), "world_size": world, "devices": devices,
                    "commit": git_commit(), "torch": torch.__version__, "argv": sys.argv,
                    "loader": type(train_loader).__name__, "bf16": bf16, "channels_last": channels_last}
        with open(os.path.join(cfg.out, "config.json"), "w") as f:
            json.dump(run_info, f, indent=1)
        metrics = Metrics(os.path.join(cfg.out, "metrics.jsonl"), (start_epoch, step) if checkpoint is not None else None)
        if checkpoint is None and os.path.exists(metrics.path):
            os.remove(metrics.path)
        tb = None
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
        print(f"AlexNet ({model_cfg.init} init, LRN {model_cfg.lrn_layers}/{model_cfg.lrn_convention}, "
              f"input {cfg.input_norm}-normalized) on "
              f"{'+'.join(devices)} x {world} rank(s), {num_classes} classes, {train_loader.num_samples * world} "
              f"train images/epoch, batch {cfg.batch_size}, lr {cfg.lr} ({cfg.schedule}), "
              f"loader {type(train_loader).__name__} -> {cfg.out}", flush=True)

    def save_checkpoint(epoch: int) -> None:
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            torch.distributed.all_gather_object(rngs, rng_state())
        if main:
            save_atomic({"model": canonical_state(model), "optimizer": optimizer_state(optimizer, model),
                         "scheduler": {"val_errors": val_errors}, "epoch": epoch, "step": step,
                         "loader": train_loader.state_dict(), "rng": rngs, "config": asdict(cfg),
                         "model_config": asdict(model_cfg), "num_classes": num_classes,
                         "classes": [c["name"] for c in manifest["classes"]],
                         "wnids": [c["wnid"] for c in manifest["classes"]],
                         "normalize": {"mean": train_loader.pca["mean"], "std": train_loader.pca["std"],
                                       "mode": cfg.input_norm},
                         "shards": os.path.abspath(cfg.shards)}, ckpt_path)

    steps_per_epoch = len(train_loader)
    last_ckpt = time.monotonic()
    result = {}
    for epoch in range(start_epoch, cfg.epochs):
        assert train_loader.epoch == epoch, (train_loader.epoch, epoch)  # the checkpoint keeps them together
        epoch_loss = torch.zeros((), device=device)
        window_loss, window_n, epoch_n = torch.zeros((), device=device), 0, 0
        t_epoch = t_window = time.perf_counter()
        done_before = train_loader.batch
        bar = tqdm(total=steps_per_epoch, initial=done_before, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not main, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
        for images, labels in train_loader:
            lr = learning_rate(cfg, epoch + train_loader.batch / steps_per_epoch, val_errors)
            for group in optimizer.param_groups:
                group["lr"] = lr
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(net(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            epoch_loss += loss.detach()
            window_loss += loss.detach()
            window_n += 1
            epoch_n += len(labels)
            bar.update(1)
            if step % cfg.log_every == 0:
                avg = (window_loss / window_n).item()  # the only GPU sync, once per log_every steps
                rate = window_n * cfg.batch_size / (time.perf_counter() - t_window)
                if main:
                    bar.set_postfix(loss=f"{avg:.3f}", lr=f"{lr:.2g}", img_s=f"{rate:.0f}")
                    metrics.log({"kind": "step", "epoch": epoch, "step": step, "lr": lr, "train_loss": avg,
                                 "images_per_s": rate})
                    if tb:
                        tb.add_scalar("train/loss", avg, step)
                        tb.add_scalar("train/lr", lr, step)
                window_loss, window_n, t_window = torch.zeros((), device=device), 0, time.perf_counter()
            if cfg.checkpoint_minutes == 0 or time.monotonic() - last_ckpt >= 60 * cfg.checkpoint_minutes:
                save_checkpoint(epoch)
                last_ckpt = time.monotonic()
        bar.close()
        train_time = time.perf_counter() - t_epoch
        steps_done = steps_per_epoch - done_before
        sums = evaluate(model, val_loader, device, bf16)
        samples = torch.tensor(float(epoch_n), device=device)
        if world > 1:
            for t in (sums, epoch_loss, samples):
                torch.distributed.all_reduce(t)
        ev = summarize(sums)
        val_errors.append(ev["val_top1_error"])
        result = {"kind": "epoch", "epoch": epoch, "step": step,
                  "lr": learning_rate(cfg, epoch, val_errors[:-1]),  # the lr of this epoch (after warm-up)
                  "train_loss": epoch_loss.item() / max(1, steps_done) / world,
                  **ev, "images_per_s": samples.item() / max(train_time, 1e-9),
                  "train_samples": int(samples.item()),  # over all ranks, this run of the epoch
                  "steps": steps_done, "epoch_seconds": time.perf_counter() - t_epoch}
        if main:  # logged before the checkpoint: a resume drops it again if the checkpoint never came
            metrics.log(result)
        save_checkpoint(epoch + 1)
        last_ckpt = time.monotonic()
        if main:
            draw_plot(os.path.join(cfg.out, "plot.png"), metrics.epochs)
            if tb:
                for k in ("val_loss", "val_top1_error", "val_top5_error", "train_loss"):
                    tb.add_scalar(f"epoch/{k}", result[k], epoch + 1)
            print(f"epoch {epoch + 1}: train loss {result['train_loss']:.3f}, val loss {ev['val_loss']:.3f}, "
                  f"top-1 error {100 * ev['val_top1_error']:.1f}%, top-5 error {100 * ev['val_top5_error']:.1f}% "
                  f"({ev['val_samples']} images), {result['images_per_s']:.0f} img/s", flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    return result


def config_from_args(argv=None) -> TrainConfig:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            p.add_argument(flag, type=typ, default=f.default, required=f.name == "shards")
    return TrainConfig(**vars(p.parse_args(argv)))


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    try:
        train(cfg)
    except UsageError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
