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

This module is the run: set-up (check, build, restore, open the run directory), the
loop and the command line. The rest of model/ has one job a file: alexnet (the
network), recipes (what is learned), options (how to run, and the flags), optim (the
paper's update rule and schedule), guards (a non-finite loss, a loss at chance),
devices (GPU set-up), checkpoint (save, load, verify, lock), evaluation (the loop and
its errors), evidence (config.json, metrics.jsonl, plot.png), errors. evaluate and
predict use those rooms, never this module.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from model.alexnet import AlexNetConfig, build, canonical_state, load_canonical
from model.checkpoint import (acquire_lock, checkpoint_digest, checkpoint_to_resume, dataset_id,
                              load_checkpoint, load_matching, load_optimizer_state, optimizer_state, pid_alive,
                              release_lock, rng_state, save_atomic, set_rng_state)
from model.devices import distributed, init_distributed, intra_op_threads, parse_devices, place, wrap
from model.errors import Diverged, RunFailed, UsageError, sigterm_as_interrupt, stopped
from model.evaluation import evaluate, percent, summarize
from model.evidence import Metrics, draw_plot, log_window, write_config
from model.guards import LossGuard, check_stall
from model.optim import learning_rate, make_optimizer, train_step
from model.options import TrainConfig, check_run_options, config_from_args, resolve_recipe
from model.recipes import Recipe, lr_rule
from pipeline import make_loader
from pipeline.loader import Loader
from pipeline.normalization import Normalization
from pipeline.shards import MANIFEST, ShardError, load_manifest


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
    init_from: dict | None = None   # --init-from: the parent checkpoint and which layers came from it
    threads: int = 0                # torch's intra-op threads in this process (set by setup)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def num_classes(self) -> int:
        return self.model_cfg.num_classes


def setup(cfg: TrainConfig) -> Run:
    """check -> build -> restore -> open the run directory. Nothing is written before the last step,
    so a refused run leaves OUT as it was."""
    recipe = resolve_recipe(cfg)
    rank, world, local_rank = distributed()
    devices = parse_devices(cfg.devices, world, local_rank)
    check_run_options(cfg, recipe, world)
    threads, threads_why = intra_op_threads(cfg.intra_op_threads)
    torch.set_num_threads(threads)  # before any tensor work: the same sums in the same order on any launcher
    dataset = check_shards(cfg.shards)
    ckpt_path = os.path.join(cfg.out, "checkpoint.pt")
    checkpoint = checkpoint_to_resume(ckpt_path, cfg.resume, cfg.recipe, asdict(recipe), cfg.seed, dataset,
                                      cfg.shards)
    if checkpoint is not None:
        check_resumed_parent(cfg, checkpoint, ckpt_path)
    parent = load_checkpoint(cfg.init_from) if cfg.init_from and checkpoint is None else None
    if parent is not None:
        check_parent_input(cfg.init_from, parent, recipe)
    run, pca_changed = build_run(cfg, recipe, rank, world, devices, dataset, ckpt_path, checkpoint)
    run.threads = threads
    if parent is not None:  # a new run from another run's weights: the matching layers, the rest as initialised
        wnids = [c["wnid"] for c in run.train_loader.manifest["classes"]]
        run.init_from = load_matching(run.model, parent, cfg.init_from, wnids)
        del parent
        rows = run.init_from.get("fc8_rows")
        if rows and run.main:
            print(f"train: --init-from {cfg.init_from}: its classes differ from these shards': fc8 rows follow the "
                  f"wnids, {rows['from_parent']} from the parent and {rows['initialised']} initialised",
                  file=sys.stderr, flush=True)
    if checkpoint is not None:
        restore(run, checkpoint)
    else:
        torch.manual_seed(cfg.seed + 1000 * rank)  # dropout masks differ across ranks
    run.net = wrap(run.model, world, run.device, cfg.compile, cfg.bf16_grads)
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
              f"{type(run.train_loader).__name__}, {threads} intra-op thread(s) a process ({threads_why}) "
              f"-> {cfg.out}", flush=True)
    return run


def check_resumed_parent(cfg: TrainConfig, checkpoint: dict, ckpt_path: str) -> None:
    """--init-from on a resume must name the parent the run started from (a scheduler repeats the whole
    command); any other parent is refused: a resumed run's weights are the checkpoint's, not a parent's."""
    record = checkpoint.get("init_from")
    if cfg.init_from and (record is None or not _same_parent(cfg.init_from, record)):
        started = f"started from {record['path']}" if record else "did not start from --init-from"
        raise UsageError(f"{ckpt_path}: --resume continues a run that {started}; --init-from {cfg.init_from} "
                         "cannot apply to it (drop --init-from, or choose another --out for a new run)")


def _same_parent(path: str, record: dict) -> bool:
    """PATH is the parent in RECORD: the same file under any name (a link, ./x), or a file of its digest."""
    try:
        if os.path.samefile(path, record["path"]):
            return True
    except OSError:  # one of them is gone or unreadable: the digest decides
        pass
    return os.path.exists(path) and load_checkpoint(path)["digest"] == record["digest"]


def check_parent_input(path: str, parent: dict, recipe: Recipe) -> None:
    """A parent trained on inputs of another normalization would start from weights tuned to another input
    scale (0-255 minus the mean against unit variance: ~60x): refused, as an ensemble of such models is."""
    mode = parent.get("normalization", {}).get("mode")
    if mode is not None and mode != recipe.input_norm:
        raise UsageError(f"{path}: was trained on input '{mode}', this run's recipe gives '{recipe.input_norm}'; "
                         f"pass --input-norm {mode} to fine-tune it on the inputs it learned from")


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
                           num_threads=cfg.loader_threads, normalization=norm, verify=cfg.verify,
                           crop_size=recipe.input_size)  # the model's input: 224, or 227 with conv1 unpadded
        train_loader = make_loader(cfg.shards, "train", batch_size=recipe.batch_size // world,
                                   channels_last=channels_last, lighting=recipe.lighting, **loader_args)
        val_loader = make_loader(cfg.shards, "val", batch_size=max(1, recipe.batch_size // world),
                                 crop="ten" if cfg.ten_crop else "center", channels_last=channels_last,
                                 **loader_args)  # in the model's memory format: no conversion per batch
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
    run.init_from = checkpoint.get("init_from")  # a fine-tuned run stays one in config.json after a resume


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
        write_config(run)
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
                 "init_from": run.init_from,
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
                log_window(run, epoch, lr, avg, rate, bar)
                check_stall(run, epoch, avg)
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
    """The whole run; returns the last epoch's metrics record. The caller's intra-op thread count is
    restored at the end (tests and studies call this in one process)."""
    caller_threads = torch.get_num_threads()
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(caller_threads)


def _train(cfg: TrainConfig) -> dict:
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

def main(argv=None) -> int:
    cfg = config_from_args(argv)
    with sigterm_as_interrupt():
        return _run(cfg)


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
        return stopped("train", e, f"--resume continues from the last checkpoint in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
