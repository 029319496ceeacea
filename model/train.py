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

This module is the run: its options, set-up (check, build, restore, open the run
directory), the loop and its guards, and the command line. The rest of model/ has one
job a file: alexnet (the network), recipes (what is learned), optim (the paper's
update rule and schedule), devices (GPU set-up), checkpoint (save, load, verify, lock),
evaluation (the loop and its errors), evidence (metrics.jsonl, plot.png), errors.
evaluate and predict use those rooms, never this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from model.alexnet import AlexNetConfig, build, canonical_state, fc7_dead_share, load_canonical
from model.checkpoint import (acquire_lock, checkpoint_digest, dataset_id, load_checkpoint,
                              load_optimizer_state, optimizer_state, pid_alive, release_lock, rng_state, save_atomic,
                              set_rng_state)
from model.devices import distributed, init_distributed, parse_devices, place, wrap
from model.errors import Diverged, RunFailed, UsageError
from model.evaluation import evaluate, percent, summarize
from model.evidence import Metrics, draw_plot
from model.optim import learning_rate, make_optimizer, train_step
from model.recipes import RECIPE_FIELDS, RECIPES, Recipe, flag, lr_rule, resolve
from model.recipes import field_help as _f
from pipeline import BACKENDS, make_loader
from pipeline.loader import Loader
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


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
    train_loader: Loader
    val_loader: Loader
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
    """check -> build -> restore -> open the run directory. Nothing is written before the last step,
    so a refused run leaves OUT as it was."""
    recipe = resolve_recipe(cfg)
    rank, world, local_rank = distributed()
    devices = parse_devices(cfg.devices, world, local_rank)
    check_run_options(cfg, recipe, world)
    dataset = check_shards(cfg.shards)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    checkpoint = _load_checkpoint(cfg, recipe, ckpt_path, dataset)
    run, pca_changed = build_run(cfg, recipe, rank, world, devices, dataset, ckpt_path, checkpoint)
    if checkpoint is not None:
        restore(run, checkpoint)
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)  # dropout masks differ across ranks
    run.net = wrap(run.model, world, run.device, cfg.compile)
    if run.main:
        open_run_dir(run, resume_at=(run.start_epoch, run.step) if checkpoint is not None else None)
        if pca_changed:
            print(f"train: {cfg.shards}/pca.json is missing or differs from the one this run started with; "
                  "the run keeps its own (stored in the checkpoint)", file=sys.stderr, flush=True)
        print(f"AlexNet, recipe {cfg.recipe} ({recipe.init} init, input {recipe.input_norm}, "
              f"bias lr x{recipe.bias_lr_mult:g}, lighting {'on' if recipe.lighting else 'off'}) on "
              f"{'+'.join(devices)} x {world} rank(s), {run.num_classes} classes, "
              f"{run.train_loader.num_samples * world} train images/epoch, batch {recipe.batch_size}, "
              f"{lr_rule(cfg.recipe, cfg.overrides)} ({recipe.schedule}), loader "
              f"{type(run.train_loader).__name__} -> {cfg.out}", flush=True)
    return run


def check_run_options(cfg: TrainConfig, recipe: Recipe, world: int) -> None:
    """UsageError naming the first run option out of range (the recipe's values: Recipe.validate)."""
    if recipe.batch_size % world:
        raise UsageError(f"--batch-size {recipe.batch_size} is not divisible across {world} ranks")
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
    if cfg.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {cfg.backend!r}")
    if cfg.probe_every < 0 or cfg.probe_every % cfg.log_every:
        raise UsageError(f"--probe-every must be 0 or a multiple of --log-every ({cfg.log_every}), "
                         f"not {cfg.probe_every}")
    if cfg.tensorboard:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs the tensorboard package (pip install tensorboard)") from None


def check_shards(shards: str) -> str:
    """The shard set's identity (dataset_id), once it is known to hold a train and a val split."""
    try:
        dataset = dataset_id(shards)
        splits = load_manifest(shards)["splits"]
    except OSError:
        raise UsageError(f"{shards}: no such shard directory (no {MANIFEST})") from None
    except ShardError as e:
        raise UsageError(str(e)) from None
    missing = [s for s in ("train", "val") if s not in splits]
    if missing:  # before any advice about pca.json, which is computed from the train split
        raise UsageError(f"{shards}: has no {missing[0]} split (made with --splits {','.join(splits)}); "
                         "training needs train and val")
    return dataset


def build_run(cfg: TrainConfig, recipe: Recipe, rank: int, world: int, devices: list[str], dataset: str,
              ckpt_path: str, checkpoint: dict | None) -> tuple[Run, bool]:
    """The loaders, the model (initialised from the seed) and the optimizer; and whether pca.json
    differs from the normalization a resumed run keeps."""
    device, bf16, channels_last = place(devices, cfg.bf16, cfg.channels_last)
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
    init_distributed(world, device)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank and in either layout
    model_cfg = recipe.model_config(len(train_loader.manifest["classes"]))
    model = build(model_cfg, devices)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    run = Run(cfg=cfg, recipe=recipe, rank=rank, world=world, devices=devices, device=device, bf16=bf16,
              channels_last=channels_last, model_cfg=model_cfg, model=model, net=model,
              optimizer=make_optimizer(model, recipe), norm=norm, train_loader=train_loader, val_loader=val_loader,
              ckpt_path=ckpt_path, dataset=dataset, val_errors=[], start_epoch=0, step=0)
    return run, pca_changed


def restore(run: Run, checkpoint: dict) -> None:
    """A resumed run's weights, momentum, schedule, position and random generators."""
    load_canonical(run.model, checkpoint["model"])
    load_optimizer_state(run.optimizer, run.model, checkpoint["optimizer"])
    run.val_errors = list(checkpoint["scheduler"]["val_errors"])
    run.start_epoch, run.step = checkpoint["epoch"], checkpoint["step"]
    run.saved_step = run.step
    try:
        run.train_loader.load_state_dict(checkpoint["loader"])
    except ValueError as e:  # another world size or batch: the position means nothing here
        raise UsageError(f"{run.ckpt_path}: cannot resume here: {e} (resume with the same number of ranks "
                         "and --batch-size)") from None
    rngs = checkpoint["rng"]
    set_rng_state(rngs[run.rank] if run.rank < len(rngs) else rngs[0])
    run.stall_checked = checkpoint.get("stall_checked", False)


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
            if stem and pid.isdigit() and not pid_alive(int(pid)):
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
