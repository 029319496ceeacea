"""Train AlexNet on a shard directory.

    python -m model.train --shards shards/imagenet --out runs/alexnet           # --recipe paper, the default
    python -m model.train --shards ... --recipe caffe                          # Caffe's bvlc_alexnet
    python -m model.train --shards ... --devices cuda:0,cuda:1                 # the paper's two halves
    torchrun --nproc_per_node 8 -m model.train --shards ...                   # data parallel (DDP)

What a run learns is its recipe (model/recipes.py): every value there can be
overridden by its own flag, and config.json records the recipe's name and every
resolved value. The run directory gets config.json, metrics.jsonl (a JSON line per
logged step, per epoch and per warning), plot.png (redrawn every epoch), and
checkpoint.pt (written atomically at every epoch end and every --checkpoint-minutes).
`--resume` continues from checkpoint.pt: a run killed at any moment ends with
bitwise the same weights as an uninterrupted one (on the CPU).

Optimizer: the paper's rule (section 5), per parameter group,
    v <- m v - lr wd w - lr grad,   w <- w + v
with the weights at (lr, weight decay) and the biases at (bias_lr_mult * lr, decay only
with --bias-decay). PyTorch's SGD keeps b = -v / lr instead, which is the same rule at a
constant lr; at a change of lr set_lr rescales b by old/new so that v carries over as
in the paper, instead of acting at once with the new lr.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.alexnet import (AlexNetConfig, build, canonical_state, fc7_dead_share, load_canonical,
                           named_canonical_parameters)
from model.recipes import RECIPE_FIELDS, RECIPES, Recipe, flag, lr_rule, resolve
from model.recipes import field_help as _f
from pipeline import BACKENDS, make_loader
from pipeline.normalization import Normalization
from pipeline.shards import MANIFEST, ShardError, load_manifest


@dataclass
class TrainConfig:
    """How to run: where, on what, how often to log and save. What is learned is the recipe's."""
    shards: str = _f("", "shard directory with dataset.json and pca.json (required)")
    out: str = _f("runs/alexnet", "run directory")
    recipe: str = _f("paper", f"training recipe: {', '.join(RECIPES)} (model/recipes.py, README)")
    overrides: dict = field(default_factory=dict)  # recipe fields set by their own flags
    seed: int = _f(0, "seed of the weights, dropout, data order and augmentation")
    devices: str = _f("auto", "'cpu', 'cuda', 'cuda:1', or two halves 'cuda:0,cuda:1'; auto: cuda if any")
    backend: str = _f("auto", "data pipeline: 'dali', 'wds', auto (DALI where it imports); 'synthetic' to time")
    loader_threads: int = _f(0, "DALI threads / DataLoader workers per rank (0: all cores)")
    verify: bool = _f(True, "check every shard's sha256 against dataset.json before its samples are used "
                            "(once per run, in the background); --no-verify skips it")
    bf16: bool = _f(True, "bf16 autocast on GPUs (ignored on the CPU, where it is slower)")
    channels_last: bool = _f(True, "NHWC memory on GPUs (faster convolutions; ignored on the CPU)")
    compile: bool = _f(False, "torch.compile the model")
    ten_crop: bool = _f(False, "evaluate each epoch with the paper's 10 crops instead of the centre crop")
    log_every: int = _f(20, "steps per logged train loss (each log is one GPU sync)")
    checkpoint_minutes: float = _f(30.0, "minutes between checkpoints, besides every epoch end; 0 = every step")
    stall_steps: int = _f(2000, "warn if the train loss is still within 1%% of ln(classes) after this many "
                                "steps, with the share of dead fc7 units (0: never)")
    probe_every: int = _f(0, "every N steps (a multiple of --log-every), log the share of fc7 units that are 0 for "
                             "every image of a fixed val batch (metrics.jsonl 'fc7_dead'; README 'Recipes'); 0: never")
    checkpoints: bool = _f(True, "write checkpoint.pt and plot.png; --no-checkpoints for throwaway runs (a study, "
                                 "a timing), which then cannot be resumed")
    tensorboard: bool = _f(False, "also log to RUN/tensorboard")
    resume: bool = _f(False, "continue from RUN/checkpoint.pt (a new run if there is none)")


# Run options that may differ between a run and its resumption: they change no number.
# The recipe (but its epochs), the seed and the data set's identity may not.
RESUME_MAY_CHANGE_RECIPE = {"epochs"}


class UsageError(Exception):
    """A bad option or input: printed as one line, exit status 2, nothing written."""


class Diverged(Exception):
    """The training loss became non-finite: printed as one line, exit status 1."""


class RunFailed(Exception):
    """The run cannot go on (a full disk at a checkpoint, say): printed as one line, exit status 1."""


# ---------------------------------------------------------------- schedule and optimizer (plain functions)

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


def learning_rate(recipe: Recipe, epoch: float, val_errors: list[float]) -> float:
    """The weights' lr at (fractional) `epoch`, given the val errors of the finished epochs."""
    if recipe.schedule == "plateau":
        k = plateau_divisions(val_errors, recipe.plateau_patience, recipe.max_lr_divisions)
    else:
        k = int(epoch // recipe.step_epochs)
    lr = recipe.lr / 10 ** k
    if epoch < recipe.warmup_epochs:
        lr *= 0.1 + 0.9 * epoch / recipe.warmup_epochs
    return lr


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.SGD:
    """SGD with two parameter groups: weights (lr, weight decay) and biases (bias_lr_mult * lr,
    weight decay only with bias_decay). Each group's "lr_mult" is what set_lr multiplies."""
    weights = [p for n, p in model.named_parameters() if not n.endswith("bias")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups = [{"params": weights, "lr_mult": 1.0, "weight_decay": recipe.weight_decay},
              {"params": biases, "lr_mult": recipe.bias_lr_mult,
               "weight_decay": recipe.weight_decay if recipe.bias_decay else 0.0}]
    return torch.optim.SGD([{**g, "lr": recipe.lr * g["lr_mult"]} for g in groups], lr=recipe.lr,
                           momentum=recipe.momentum)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The weights' lr for the next step. Momentum buffers are rescaled by old/new lr, so that the
    paper's velocity v = -lr * buffer carries over a change of lr unchanged (module docstring)."""
    for group in optimizer.param_groups:
        new = lr * group["lr_mult"]
        old = group["lr"]
        if new != old:
            bufs = [optimizer.state[p]["momentum_buffer"] for p in group["params"]
                    if optimizer.state.get(p, {}).get("momentum_buffer") is not None]
            if bufs and old > 0:
                torch._foreach_mul_(bufs, old / new)
            group["lr"] = new


def train_step(net, optimizer, images, labels, lr: float, bf16: bool, pad_to: int = 0) -> torch.Tensor:
    """One SGD step on the batch mean of the cross-entropy; returns the loss (detached, no sync).
    pad_to: a smaller (last) batch runs padded to this many images, and only its own rows enter the
    loss, so the gradient is the unpadded batch's (no layer mixes images) and a compiled model sees
    one batch shape: no recompilation, no dynamic-shape graph."""
    set_lr(optimizer, lr)
    n = len(labels)
    if n < pad_to:
        images = torch.cat([images, images[:1].expand(pad_to - n, *images.shape[1:])])
    with torch.autocast(device_type=labels.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = F.cross_entropy(net(images)[:n], labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# ---------------------------------------------------------------- set-up

def parse_devices(spec: str, world: int = 1, local_rank: int = 0) -> list[str]:
    """The devices of this process, each with its index ('cuda' alone names no GPU, and
    torch.cuda.set_device refuses it): 'auto' is cuda:0 where torch sees a GPU, else cpu; under
    torchrun (world > 1) a CUDA device is this rank's, cuda:LOCAL_RANK."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    devices = [d.strip() for d in spec.split(",") if d.strip()]
    if not 1 <= len(devices) <= 2:
        raise UsageError(f"--devices {spec}: give one device, or two for the paper's two halves")
    if world > 1 and len(devices) == 2:
        raise UsageError("--devices with two halves runs in one process; use torchrun with one device per rank")
    for i, d in enumerate(devices):
        try:
            dev = torch.device(d)
        except RuntimeError:
            raise UsageError(f"--devices {spec}: {d!r} is not a device") from None
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise UsageError(f"--devices {spec}: torch sees no CUDA GPU here (--devices cpu, or a CUDA build "
                                 "of torch)")
            index = local_rank if world > 1 else (dev.index or 0)
            if index >= torch.cuda.device_count():
                raise UsageError(f"--devices {spec}: cuda:{index} does not exist (this machine has "
                                 f"{torch.cuda.device_count()} CUDA GPUs)")
            devices[i] = f"cuda:{index}"
        elif dev.type != "cpu":
            raise UsageError(f"--devices {spec}: {d!r}: only cpu and cuda devices are supported")
    return devices


def place(devices: list[str], cfg: TrainConfig) -> tuple[torch.device, bool, bool]:
    """(the main device, bf16, channels-last); makes a CUDA main device the current one, so that
    collectives and current_device() use this rank's GPU, not cuda:0."""
    device = torch.device(devices[0])
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
    return device, cfg.bf16 and on_gpu, cfg.channels_last and on_gpu and len(devices) == 1


def init_distributed(world: int, device: torch.device) -> None:
    """The process group of a torchrun run: NCCL bound to this rank's GPU, gloo on the CPU."""
    if world > 1:
        on_gpu = device.type == "cuda"
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo", device_id=device if on_gpu else None)


def wrap(model: torch.nn.Module, world: int, device: torch.device, compile: bool) -> torch.nn.Module:
    """What the steps call: DDP (its device the rank's GPU) and/or torch.compile around the model."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None)
    return torch.compile(net, dynamic=False) if compile else net  # one shape: train_step pads the last batch


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def dataset_id(shards: str) -> str:
    """The shard set's identity: sha256 of its dataset.json (which holds every shard's sha256),
    whatever path it is reached by."""
    with open(os.path.join(shards, MANIFEST), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _tensors(obj, prefix: str = ""):
    """(path, tensor) of every tensor in a nested dict/list, in a fixed order."""
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            yield from _tensors(obj[k], f"{prefix}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}/{i}")


def _without_tensors(obj):
    """The checkpoint's structure and every value that is not a tensor (names, numbers, the
    normalization, class names), tensors replaced by a marker: what the digest covers besides them."""
    if isinstance(obj, torch.Tensor):
        return "<tensor>"
    if isinstance(obj, dict):
        return {str(k): _without_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_without_tensors(v) for v in obj]
    return obj


def checkpoint_digest(ckpt: dict) -> str:
    """sha256 over everything the checkpoint holds: every tensor's name, shape, dtype and bytes (the
    weights, the momentum, the RNG states), and every other value (the normalization's numbers, the
    class names, the recipe), so that a flipped byte anywhere is found before it is used."""
    h = hashlib.sha256()
    rest = {k: v for k, v in ckpt.items() if k != "digest"}
    for name, t in _tensors(rest):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, not a copy
    # repr keeps a float's every bit (json would too), and sort_keys an order that pickling does not change
    h.update(json.dumps(_without_tensors(rest), sort_keys=True, default=repr).encode())
    return h.hexdigest()


def load_checkpoint(path: str) -> dict:
    """The checkpoint at `path`, its digest verified; UsageError (one line) on anything else."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        digest = ckpt["digest"]
    except Exception as e:  # noqa: BLE001 - an unreadable or foreign file gets the same one-line answer
        raise UsageError(f"{path}: not a readable checkpoint of model.train ({type(e).__name__}: {e})") from None
    if checkpoint_digest(ckpt) != digest:
        raise UsageError(f"{path}: corrupt: its contents do not match the checksum stored with them")
    return ckpt


def save_atomic(obj, path: str) -> None:
    """Written to a temporary name and renamed: a crash or a full disk leaves the old file whole
    and no temporary file behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except RuntimeError as e:  # torch's zip writer reports a full disk as "file write failed" / "unexpected pos"
        full = shutil.disk_usage(os.path.dirname(os.path.abspath(path))).free < (16 << 20)  # before tmp goes
        raise OSError(errno.ENOSPC if full else errno.EIO,
                      os.strerror(errno.ENOSPC) if full else str(e).strip().splitlines()[0][:200], path) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def optimizer_state(optimizer: torch.optim.Optimizer, model) -> dict:
    """SGD's momentum buffers by canonical parameter name (they load into either model layout),
    and each group's current lr (the scale the buffers were accumulated at)."""
    momentum = {}
    for name, params in named_canonical_parameters(model):
        bufs = [optimizer.state.get(p, {}).get("momentum_buffer") for p in params]
        if all(b is not None for b in bufs):
            momentum[name] = torch.cat([b.detach().cpu() for b in bufs])
    return {"momentum": momentum, "lr": [g["lr"] for g in optimizer.param_groups]}


def load_optimizer_state(optimizer: torch.optim.Optimizer, model, state: dict) -> None:
    for name, params in named_canonical_parameters(model):
        buf = state["momentum"].get(name)
        if buf is None:
            continue
        for p, piece in zip(params, torch.split(buf, [p.shape[0] for p in params])):  # halves: rows of dim 0
            optimizer.state[p]["momentum_buffer"] = piece.to(p.device).clone()
    for group, lr in zip(optimizer.param_groups, state.get("lr", [])):
        group["lr"] = lr


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restores what this machine can hold: a checkpoint from a machine with more (or fewer) GPUs
    restores the generators of the GPUs both have."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available():
        for i, s in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ---------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, loader, device, bf16: bool, progress: bool = False) -> torch.Tensor:
    """[loss sum, top-1 right, top-5 right, samples] over this rank's part of the split (the caller
    reduces). Ten crops: the softmax outputs of the crops are averaged (section 4.1)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top-1 right, top-5 right
    samples = 0  # counted on the host: no device sync per batch
    # A with-block: the bar ends its line even when the loader raises, so the error gets a line of its own.
    with tqdm(loader, total=len(loader), desc="evaluate", unit="batch", disable=not progress,
              dynamic_ncols=True, mininterval=1.0, file=sys.stderr) as batches:
        for images, labels in batches:
            labels = labels.to(device)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
                if images.dim() == 5:
                    b, n = images.shape[:2]
                    probs = F.softmax(model(images.flatten(0, 1)).float(), 1).view(b, n, -1).mean(1)
                else:
                    probs = F.softmax(model(images).float(), 1)
            top5 = probs.topk(min(5, probs.shape[1]), 1).indices
            sums += torch.stack([F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum").double(),
                                 (top5[:, 0] == labels).sum().double(),
                                 (top5 == labels[:, None]).any(1).sum().double()])
            samples += len(labels)
    model.train()
    return torch.cat([sums, torch.tensor([float(samples)], dtype=torch.float64, device=device)])


def summarize(sums: torch.Tensor, num_classes: int) -> dict:
    """Mean loss and errors. Top-5 error is None (n/a) with 5 classes or fewer, where it is 0 by construction."""
    loss, right1, right5, n = sums.tolist()
    return {"val_loss": loss / n, "val_top1_error": 1 - right1 / n,
            "val_top5_error": 1 - right5 / n if num_classes > 5 else None, "val_samples": int(n)}


def percent(error: float | None) -> str:
    return "n/a" if error is None else f"{100 * error:.1f}%"


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
    if all(e["val_top5_error"] is not None for e in epochs):  # n/a with 5 classes or fewer
        ax[1].plot(x, [100 * e["val_top5_error"] for e in epochs], "o-", label="top-5")
    ax[1].set(title="validation error (%)", xlabel="epoch", ylim=(0, 100))
    ax[2].semilogy(x, [e["lr"] for e in epochs], "o-")
    ax[2].set(title="learning rate (weights)", xlabel="epoch")
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
        if resume_at is None:
            if os.path.exists(path):
                os.remove(path)
            return
        if os.path.exists(path):
            epoch, step = resume_at
            kept, bad = [], 0
            with open(path) as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except ValueError:  # a line half-written when the run was killed
                        record = None
                    if isinstance(record, dict) and "step" in record and "kind" in record:
                        kept.append(record)
                    elif line.strip():
                        bad += 1
            if bad:
                print(f"train: {path}: dropped {bad} unreadable line(s), as a killed run leaves them",
                      file=sys.stderr, flush=True)
            kept = [r for r in kept if r["step"] <= step and not (r["kind"] == "epoch" and r["epoch"] >= epoch)]
            with open(path, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            self.epochs = [r for r in kept if r["kind"] == "epoch"]

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if record["kind"] == "epoch":
            self.epochs.append(record)


class LossGuard:
    """Non-finite losses, noticed without a GPU sync per step: each step marks the first bad step
    on the device, and check() (at every log and before every checkpoint) raises Diverged."""

    def __init__(self, device: torch.device, world: int):
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.world = world
        self.lrs: dict[int, float] = {}  # step -> lr since the last check, to name the bad step's lr

    def record(self, loss: torch.Tensor, step: int, lr: float) -> None:
        bad = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)
        self.lrs[step] = lr

    def check(self) -> None:
        first = self.first_bad.clone()
        if self.world > 1:  # every rank stops at the same check, or the others would hang
            torch.distributed.all_reduce(first, torch.distributed.ReduceOp.MAX)
        bad = int(first.item())
        if bad >= 0:
            raise Diverged(f"the training loss is not finite at step {bad} (lr {self.lrs.get(bad, float('nan')):g})")
        self.lrs.clear()


def at_chance(loss: float, num_classes: int) -> bool:
    """`loss` within 1 % of ln(C), the loss of a uniform guess."""
    chance = math.log(num_classes)
    return abs(loss - chance) <= 0.01 * chance


def stall_warning(loss: float, num_classes: int, step: int, recipe_name: str, init: str,
                  fc7_dead: float | None = None) -> str | None:
    """A warning if `loss` is still at chance, naming the share of dead fc7 units where measured."""
    if not at_chance(loss, num_classes):
        return None
    dead = "" if fc7_dead is None else (
        f"; {100 * fc7_dead:.1f} % of fc7's units are dead (0 for every image of a val batch)"
        + (", the failure of the paper's init that README 'Recipes' documents" if fc7_dead >= 0.5 else ""))
    others = ", ".join(f"--init {i}" for i in ("cuda-convnet2", "caffe", "kaiming") if i != init)
    return (f"train loss {loss:.3f} is still at chance (ln {num_classes} = {math.log(num_classes):.3f}) after "
            f"{step} steps of --recipe {recipe_name} (--init {init}){dead}: this run may not learn; consider "
            f"{others} (README: 'Recipes')")


# ---------------------------------------------------------------- the run

@dataclass
class Run:
    """Everything one training process holds; made by setup(), advanced by train_epoch()."""
    cfg: TrainConfig
    recipe: Recipe
    rank: int
    world: int
    devices: list[str]
    device: torch.device
    bf16: bool
    channels_last: bool
    model_cfg: AlexNetConfig
    model: torch.nn.Module          # the module itself (canonical state, evaluation)
    net: torch.nn.Module            # what the steps call: DDP and/or compiled around the model
    optimizer: torch.optim.Optimizer
    norm: Normalization
    train_loader: object
    val_loader: object
    ckpt_path: str
    dataset: str                    # dataset_id of the shards
    val_errors: list[float]
    start_epoch: int
    step: int
    metrics: Metrics | None = None  # rank 0 only
    tb: object = None
    stall_checked: bool = False
    probe: torch.Tensor | None = None  # a fixed val batch for the fc7 probe (made when first needed)
    saved_step: int | None = None   # the step of the checkpoint on disk, if any
    lock: int | None = None         # OUT/.lock's file descriptor, held (flock) by rank 0 while it runs

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def num_classes(self) -> int:
        return self.model_cfg.num_classes


def resolve_recipe(cfg: TrainConfig) -> Recipe:
    try:
        recipe = resolve(cfg.recipe, cfg.overrides)
        recipe.validate()
    except KeyError as e:  # str() of a KeyError is its argument's repr, quotes and all
        raise UsageError(e.args[0]) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    return recipe


def _load_checkpoint(cfg: TrainConfig, recipe: Recipe, ckpt_path: str, dataset: str) -> dict | None:
    if not os.path.exists(ckpt_path):
        if cfg.resume:
            print(f"train: --resume: no {ckpt_path} yet, so this is a new run", file=sys.stderr, flush=True)
        return None
    if not cfg.resume:
        raise UsageError(f"{ckpt_path} exists: pass --resume to continue that run, or choose another --out")
    checkpoint = load_checkpoint(ckpt_path)
    saved_recipe, saved_name = checkpoint["recipe"], checkpoint["recipe_name"]
    differ = sorted(k for k, v in asdict(recipe).items()
                    if k not in RESUME_MAY_CHANGE_RECIPE and saved_recipe.get(k) != v)
    differ += ["recipe"] * (saved_name != cfg.recipe) + ["seed"] * (checkpoint["config"]["seed"] != cfg.seed)
    if differ:
        raise UsageError(f"{ckpt_path}: was made with other settings ({', '.join(differ)}); resume with the same ones")
    if checkpoint["dataset"] != dataset:
        raise UsageError(f"{ckpt_path}: was trained on another shard set (its dataset.json differs from "
                         f"{os.path.join(cfg.shards, MANIFEST)})")
    return checkpoint


def setup(cfg: TrainConfig) -> Run:
    """Check the options, build loaders, model and optimizer, and load the checkpoint when resuming.
    Writes nothing until every check has passed."""
    recipe = resolve_recipe(cfg)
    rank, world, local_rank = distributed()
    devices = parse_devices(cfg.devices, world, local_rank)
    if recipe.batch_size % world:
        raise UsageError(f"--batch-size {recipe.batch_size} is not divisible across {world} ranks")
    check_run_options(cfg)
    if cfg.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {cfg.backend!r}")
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None
    if cfg.probe_every < 0 or cfg.probe_every % cfg.log_every:
        raise UsageError(f"--probe-every must be 0 or a multiple of --log-every ({cfg.log_every}), "
                         f"not {cfg.probe_every}")
    device, bf16, channels_last = place(devices, cfg)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    try:
        dataset = dataset_id(cfg.shards)
        splits = load_manifest(cfg.shards)["splits"]
    except OSError:
        raise UsageError(f"{cfg.shards}: no such shard directory (no {MANIFEST})") from None
    except ShardError as e:
        raise UsageError(str(e)) from None
    missing = [s for s in ("train", "val") if s not in splits]
    if missing:  # before any advice about pca.json, which is computed from the train split
        raise UsageError(f"{cfg.shards}: has no {missing[0]} split (made with --splits "
                         f"{','.join(splits)}); training needs train and val")
    checkpoint = _load_checkpoint(cfg, recipe, ckpt_path, dataset)

    try:
        pca_changed = False
        if checkpoint is not None:  # the numbers the run was trained with, whatever pca.json says now
            norm = Normalization.from_dict(checkpoint["normalization"])
            try:
                pca_changed = norm != Normalization.from_shards(cfg.shards, norm.mode, norm.train_scale)
            except (ShardError, FileNotFoundError):  # missing, damaged or another set's: not used anyway
                pca_changed = True
        else:
            norm = Normalization.from_shards(cfg.shards, recipe.input_norm, recipe.train_scale)
        loader_args = dict(device=str(device), rank=rank, world_size=world, seed=cfg.seed, backend=cfg.backend,
                           num_threads=cfg.loader_threads, normalization=norm, verify=cfg.verify)
        train_loader = make_loader(cfg.shards, "train", batch_size=recipe.batch_size // world,
                                   channels_last=channels_last, lighting=recipe.lighting, **loader_args)
        val_loader = make_loader(cfg.shards, "val", batch_size=max(1, recipe.batch_size // world),
                                 crop="ten" if cfg.ten_crop else "center", **loader_args)
    except (ShardError, FileNotFoundError) as e:
        raise UsageError(str(e)) from None
    num_classes = len(train_loader.manifest["classes"])

    init_distributed(world, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in either layout
    model_cfg = recipe.model_config(num_classes)
    model = build(model_cfg, devices)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, recipe)
    run = Run(cfg=cfg, recipe=recipe, rank=rank, world=world, devices=devices, device=device, bf16=bf16,
              channels_last=channels_last, model_cfg=model_cfg, model=model, net=model, optimizer=optimizer,
              norm=norm, train_loader=train_loader, val_loader=val_loader, ckpt_path=ckpt_path, dataset=dataset,
              val_errors=[], start_epoch=0, step=0)
    if checkpoint is not None:
        load_canonical(model, checkpoint["model"])
        load_optimizer_state(optimizer, model, checkpoint["optimizer"])
        run.val_errors = list(checkpoint["scheduler"]["val_errors"])
        run.start_epoch, run.step = checkpoint["epoch"], checkpoint["step"]
        run.saved_step = run.step
        try:
            train_loader.load_state_dict(checkpoint["loader"])
        except ValueError as e:  # another world size or batch: the position means nothing here
            raise UsageError(f"{ckpt_path}: cannot resume here: {e} (resume with the same number of ranks "
                             "and --batch-size)") from None
        rngs = checkpoint["rng"]
        set_rng_state(rngs[rank] if rank < len(rngs) else rngs[0])
        run.stall_checked = checkpoint.get("stall_checked", False)
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)  # dropout masks differ across ranks
    run.net = wrap(model, world, device, cfg.compile)

    if run.main:
        open_run_dir(run, resume_at=(run.start_epoch, run.step) if checkpoint is not None else None)
        if pca_changed:
            print(f"train: {cfg.shards}/pca.json is missing or differs from the one this run started with; "
                  "the run keeps its own (stored in the checkpoint)", file=sys.stderr, flush=True)
        print(f"AlexNet, recipe {cfg.recipe} ({recipe.init} init, input {recipe.input_norm}, "
              f"bias lr x{recipe.bias_lr_mult:g}, lighting {'on' if recipe.lighting else 'off'}) on "
              f"{'+'.join(devices)} x {world} rank(s), {num_classes} classes, {train_loader.num_samples * world} "
              f"train images/epoch, batch {recipe.batch_size}, {lr_rule(cfg.recipe, cfg.overrides)} "
              f"({recipe.schedule}), "
              f"loader {type(train_loader).__name__} -> {cfg.out}", flush=True)
    return run


def acquire_lock(out: str) -> int:
    """OUT/.lock, held with flock(2) for the run's life, with this process's pid inside for people:
    a second live run into the same OUT is refused; a lock file left by a run that died is taken
    over, whatever pid it names (the kernel releases a dead process's lock, and a reused pid cannot
    pass for a run). Returns the lock's file descriptor (release_lock closes it)."""
    path = os.path.join(out, ".lock")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise UsageError(f"{out}: in use by another run (pid {holder}, {path}); wait for it or choose another --out")
    left = os.read(fd, 64).decode(errors="replace").strip()
    if left:
        print(f"train: {path}: taking over the lock left by pid {left}, which no longer holds it",
              file=sys.stderr, flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def release_lock(out: str, fd: int) -> None:
    """Removes OUT/.lock, then lets go of it (in that order: no window where another run could take
    the file and then lose it to the removal)."""
    try:
        os.remove(os.path.join(out, ".lock"))
    except FileNotFoundError:
        pass
    os.close(fd)


def check_run_options(cfg: TrainConfig) -> None:
    """UsageError naming the first run option out of range (the recipe's values: Recipe.validate)."""
    if cfg.log_every < 1:
        raise UsageError(f"--log-every must be >= 1, not {cfg.log_every}")
    if not 0 <= cfg.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2^63), not {cfg.seed}")
    if cfg.loader_threads < 0:
        raise UsageError(f"--loader-threads must be >= 0 (0: all cores), not {cfg.loader_threads}")
    if not (math.isfinite(cfg.checkpoint_minutes) and cfg.checkpoint_minutes >= 0):
        raise UsageError(f"--checkpoint-minutes must be a finite number >= 0, not {cfg.checkpoint_minutes}")
    if cfg.stall_steps < 0:
        raise UsageError(f"--stall-steps must be >= 0, not {cfg.stall_steps}")


def open_run_dir(run: Run, resume_at: tuple[int, int] | None) -> None:
    """The last step of set-up, once every check has passed: take OUT's lock, remove what runs killed
    while writing a checkpoint left (checkpoint.pt.tmp-<pid> of a pid no longer alive), write
    config.json, open metrics.jsonl. The lock is let go again if any of it fails."""
    cfg = run.cfg
    try:
        os.makedirs(cfg.out, exist_ok=True)
        run.lock = acquire_lock(cfg.out)
    except OSError as e:
        raise UsageError(f"{cfg.out}: cannot write the run directory ({e.strerror})") from None
    try:
        for name in os.listdir(cfg.out):
            stem, _, pid = name.rpartition(".tmp-")
            if stem and pid.isdigit() and not _alive(int(pid)):
                os.remove(os.path.join(cfg.out, name))
                print(f"train: removed {os.path.join(cfg.out, name)}, left by a run killed while writing it",
                      file=sys.stderr, flush=True)
        _write_config(run)
        run.metrics = Metrics(os.path.join(cfg.out, "metrics.jsonl"), resume_at)
        if cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            run.tb = SummaryWriter(os.path.join(cfg.out, "tensorboard"))
    except BaseException as e:
        release_lock(cfg.out, run.lock)
        run.lock = None
        if isinstance(e, OSError):
            raise UsageError(f"{cfg.out}: cannot write the run directory ({e.strerror})") from None
        raise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def _write_config(run: Run) -> None:
    cfg = run.cfg
    info = {"recipe": {"name": cfg.recipe, **asdict(run.recipe)},
            "config": {k: v for k, v in asdict(cfg).items() if k != "overrides"},
            "overridden": sorted(k for k, v in cfg.overrides.items() if v is not None),
            "lr": {"weights": run.recipe.lr, "rule": lr_rule(cfg.recipe, cfg.overrides)},
            "model": asdict(run.model_cfg), "normalization": run.norm.as_dict(), "world_size": run.world,
            "devices": run.devices, "commit": git_commit(), "torch": torch.__version__, "argv": sys.argv,
            "dataset": run.dataset, "loader": type(run.train_loader).__name__, "bf16": run.bf16,
            "channels_last": run.channels_last}
    tmp = os.path.join(cfg.out, "config.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(cfg.out, "config.json"))


def save_checkpoint(run: Run, epoch: int) -> None:
    """Every rank calls this at the same step (collectives inside). Never writes non-finite weights."""
    if not run.cfg.checkpoints:
        return
    rngs = [rng_state()]
    if run.world > 1:
        rngs = [None] * run.world
        torch.distributed.all_gather_object(rngs, rng_state())
    if not run.main:
        return
    state = canonical_state(run.model)
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise Diverged(f"the weights are not finite at step {run.step}")
    manifest = run.train_loader.manifest
    ckpt = {"model": state, "optimizer": optimizer_state(run.optimizer, run.model),
                 "scheduler": {"val_errors": run.val_errors}, "epoch": epoch, "step": run.step,
                 "loader": run.train_loader.state_dict(), "rng": rngs, "config": asdict(run.cfg),
                 "recipe_name": run.cfg.recipe, "recipe": asdict(run.recipe),
                 "model_config": asdict(run.model_cfg), "num_classes": run.num_classes,
                 "classes": [c["name"] for c in manifest["classes"]],
                 "wnids": [c["wnid"] for c in manifest["classes"]],
                 "normalization": run.norm.as_dict(), "dataset": run.dataset, "stall_checked": run.stall_checked,
                 "preprocessing": manifest["preprocessing"],  # predict prepares an image as make_shards did
                 "shards": os.path.abspath(run.cfg.shards)}
    ckpt["digest"] = checkpoint_digest(ckpt)
    try:
        save_atomic(ckpt, run.ckpt_path)
    except OSError as e:
        kept = f"the one of step {run.saved_step} is kept" if run.saved_step is not None else "none was written"
        raise RunFailed(f"{run.ckpt_path}: cannot write the checkpoint ({e.strerror or e}) at step {run.step}; "
                        f"{kept}, and --resume continues from it") from None
    run.saved_step = run.step


def _checkpoint_due(run: Run, last_ckpt: float) -> bool:
    """The same answer on every rank: by step count, or by rank 0's clock at a log step, broadcast."""
    cfg = run.cfg
    if not cfg.checkpoints:
        return False
    if cfg.checkpoint_minutes == 0:
        return True
    if run.step % cfg.log_every:
        return False
    due = torch.tensor(time.monotonic() - last_ckpt >= 60 * cfg.checkpoint_minutes, device=run.device)
    if run.world > 1:
        torch.distributed.broadcast(due, 0)
    return bool(due.item())  # a sync, but only at log steps, which sync anyway


def fc7_dead_now(run: Run) -> float:
    """The share of dead fc7 units on a fixed val batch (the first 64 centre crops), eval mode: no
    dropout, and no random number drawn, so a run with probes trains exactly as one without."""
    if run.probe is None:
        loader = make_loader(run.cfg.shards, "val", batch_size=64, device=str(run.device), crop="center",
                             backend=run.cfg.backend, normalization=run.norm, verify=run.cfg.verify,
                             num_threads=run.cfg.loader_threads)
        run.probe = next(iter(loader))[0]
    return fc7_dead_share(run.model, run.probe)


def _log_window(run: Run, epoch: int, lr: float, avg: float, rate: float, bar) -> None:
    if not run.main:
        return
    bar.set_postfix(loss=f"{avg:.3f}", lr=f"{lr:.2g}", img_s=f"{rate:.0f}")
    record = {"kind": "step", "epoch": epoch, "step": run.step, "lr": lr, "train_loss": avg, "images_per_s": rate}
    if run.cfg.probe_every and run.step % run.cfg.probe_every == 0:
        record["fc7_dead"] = fc7_dead_now(run)
    run.metrics.log(record)
    if run.tb:
        run.tb.add_scalar("train/loss", avg, run.step)
        run.tb.add_scalar("train/lr", lr, run.step)


def _check_stall(run: Run, epoch: int, avg: float) -> None:
    """Once, at the first log step at or past --stall-steps (every rank decides alike)."""
    if run.stall_checked or not run.cfg.stall_steps or run.step < run.cfg.stall_steps:
        return
    run.stall_checked = True
    if not (run.main and at_chance(avg, run.num_classes)):
        return
    warning = stall_warning(avg, run.num_classes, run.step, run.cfg.recipe, run.recipe.init, fc7_dead_now(run))
    if warning:
        print(f"\ntrain: warning: {warning}", file=sys.stderr, flush=True)
        run.metrics.log({"kind": "warning", "epoch": epoch, "step": run.step, "warning": "stall",
                         "train_loss": avg, "message": warning})


def train_epoch(run: Run, epoch: int) -> dict:
    """One pass over this rank's part of the training split, from the loader's position."""
    cfg, loader = run.cfg, run.train_loader
    assert loader.epoch == epoch, (loader.epoch, epoch)  # the checkpoint keeps them together
    steps_per_epoch = len(loader)
    guard = LossGuard(run.device, run.world)
    epoch_loss = torch.zeros((), device=run.device)
    window_loss, window_n, window_images, epoch_images = torch.zeros((), device=run.device), 0, 0, 0
    t_epoch = t_window = time.perf_counter()
    last_ckpt = time.monotonic()
    done_before = loader.batch
    with tqdm(total=steps_per_epoch, initial=done_before, desc=f"epoch {epoch + 1}/{run.recipe.epochs}",
              disable=not run.main, unit="step", dynamic_ncols=True, mininterval=1.0, file=sys.stderr) as bar:
        for images, labels in loader:
            lr = learning_rate(run.recipe, epoch + loader.batch / steps_per_epoch, run.val_errors)
            labels = labels.to(run.device, non_blocking=True)
            loss = train_step(run.net, run.optimizer, images, labels, lr, run.bf16,
                              pad_to=loader.cfg.batch_size if cfg.compile else 0)
            run.step += 1
            guard.record(loss, run.step, lr)
            epoch_loss += loss
            window_loss += loss
            window_n += 1
            window_images += len(labels)  # a partial last batch counts what it holds
            epoch_images += len(labels)
            bar.update(1)
            if run.step % cfg.log_every == 0:
                guard.check()
                avg = (window_loss / window_n).item()  # the only GPU sync, once per log_every steps
                rate = window_images * run.world / (time.perf_counter() - t_window)
                _log_window(run, epoch, lr, avg, rate, bar)
                _check_stall(run, epoch, avg)
                window_loss, window_n, window_images = torch.zeros((), device=run.device), 0, 0
                t_window = time.perf_counter()
            if _checkpoint_due(run, last_ckpt):
                if run.step % cfg.log_every:  # a log step has checked already (a sync, an all-reduce)
                    guard.check()
                save_checkpoint(run, epoch)
                last_ckpt = time.monotonic()
    guard.check()
    steps_done = steps_per_epoch - done_before
    train_time = time.perf_counter() - t_epoch
    samples = torch.tensor(float(epoch_images), device=run.device)
    if run.world > 1:
        for t in (epoch_loss, samples):
            torch.distributed.all_reduce(t)
    return {"train_loss": epoch_loss.item() / max(1, steps_done) / run.world,
            "images_per_s": samples.item() / max(train_time, 1e-9),
            "train_samples": int(samples.item()),  # over all ranks, this run of the epoch
            "steps": steps_done, "t_start": t_epoch}


def end_epoch(run: Run, epoch: int, stats: dict) -> dict:
    """Evaluate, log, checkpoint and plot after an epoch; returns the epoch's metrics record."""
    sums = evaluate(run.model, run.val_loader, run.device, run.bf16, progress=run.main)
    if run.world > 1:
        torch.distributed.all_reduce(sums)
    ev = summarize(sums, run.num_classes)
    run.val_errors.append(ev["val_top1_error"])
    t_start = stats.pop("t_start")
    result = {"kind": "epoch", "epoch": epoch, "step": run.step,
              "lr": learning_rate(run.recipe, epoch, run.val_errors[:-1]),  # this epoch's lr (after warm-up)
              **stats, **ev, "epoch_seconds": time.perf_counter() - t_start}
    if run.main:  # logged before the checkpoint: a resume drops it again if the checkpoint never came
        run.metrics.log(result)
    save_checkpoint(run, epoch + 1)
    if run.main and run.cfg.checkpoints:
        draw_plot(os.path.join(run.cfg.out, "plot.png"), run.metrics.epochs)
        if run.tb:
            for k in ("val_loss", "val_top1_error", "val_top5_error", "train_loss"):
                if result[k] is not None:
                    run.tb.add_scalar(f"epoch/{k}", result[k], epoch + 1)
        print(f"epoch {epoch + 1}: train loss {result['train_loss']:.3f}, val loss {ev['val_loss']:.3f}, "
              f"top-1 error {percent(ev['val_top1_error'])}, top-5 error {percent(ev['val_top5_error'])} "
              f"({ev['val_samples']} images), {result['images_per_s']:.0f} img/s", flush=True)
    return result


def train(cfg: TrainConfig) -> dict:
    """The whole run; returns the last epoch's metrics record."""
    run = setup(cfg)
    result = {}
    try:
        for epoch in range(run.start_epoch, run.recipe.epochs):
            result = end_epoch(run, epoch, train_epoch(run, epoch))
    except Diverged as e:
        kept = (f"{run.ckpt_path} keeps the last good state (step {run.saved_step})" if run.saved_step is not None
                else "no checkpoint was written")
        raise Diverged(f"{e}: stopped; {kept}. Try a lower --lr or another --recipe") from None
    finally:
        if run.world > 1:
            torch.distributed.destroy_process_group()
        if run.lock is not None:
            release_lock(cfg.out, run.lock)
    return result


# ---------------------------------------------------------------- command line

def _arg_type(typ):
    name = typ if isinstance(typ, str) else typ.__name__
    return {"int": int, "float": float, "str": str}[name]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="Recipe values: "
                                + "; ".join(f"{n}: {', '.join(f'{k}={v}' for k, v in asdict(r).items())}"
                                            for n, r in RECIPES.items()))
    for f in dataclasses.fields(TrainConfig):
        if f.name == "overrides":
            continue
        dest = "--" + flag(f.name)
        if f.type in ("bool", bool):
            p.add_argument(dest, action=argparse.BooleanOptionalAction, default=f.default,
                           help=f"{f.metadata['help']} (default: {f.default})")
        else:
            p.add_argument(dest, type=_arg_type(f.type), default=f.default, required=f.name == "shards",
                           help=f.metadata["help"] + ("" if f.name == "shards" else f" (default: {f.default})"))
    g = p.add_argument_group("recipe values (default: the recipe's; see model/recipes.py)")
    for f in dataclasses.fields(Recipe):
        dest = "--" + flag(f.name)
        paper, caffe = getattr(RECIPES["paper"], f.name), getattr(RECIPES["caffe"], f.name)
        shown = f"paper {paper:.4g}, caffe {caffe:.4g}" if isinstance(paper, float) else f"paper {paper}, caffe {caffe}"
        if f.type in ("bool", bool):
            g.add_argument(dest, action=argparse.BooleanOptionalAction, default=None,
                           help=f"{f.metadata['help']} ({shown})")
        else:
            g.add_argument(dest, type=_arg_type(f.type), default=None, help=f"{f.metadata['help']} ({shown})")
    return p


def config_from_args(argv=None) -> TrainConfig:
    args = vars(parser().parse_args(argv))
    overrides = {k: args.pop(k) for k in RECIPE_FIELDS}
    return TrainConfig(**args, overrides=overrides)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption, `kill`): stopped as Ctrl-C stops a run."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv=None) -> int:
    cfg = config_from_args(argv)
    in_main = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main else None
    try:
        return _run(cfg)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _run(cfg: TrainConfig) -> int:
    """train(cfg), with every way it can stop as one line and an exit status."""
    try:
        train(cfg)
    except UsageError as e:
        print(f"train: {e}", file=sys.stderr)
        return 2
    except (Diverged, ShardError, RunFailed) as e:  # a bad shard met mid-run: named, the last checkpoint kept
        print(f"train: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # writing the run directory mid-run (metrics, plot): one line, not a traceback
        print(f"train: {e.filename or cfg.out}: {e.strerror or e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        how, status = ("terminated (SIGTERM)", 143) if isinstance(e, Terminated) else ("interrupted", 130)
        print(f"\ntrain: {how}; --resume continues from the last checkpoint in {cfg.out}", file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    sys.exit(main())
