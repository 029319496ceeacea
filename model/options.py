"""The trainer's options: how to run (TrainConfig), what is learned (the recipe, model/recipes.py),
their checks and their command line. Nothing here touches a file or a device."""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import asdict, dataclass, field

from model.errors import UsageError
from model.recipes import RECIPE_FIELDS, RECIPES, Recipe, flag, resolve
from model.recipes import field_help as _f
from pipeline import BACKENDS


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
    intra_op_threads: int = _f(0, "torch's intra-op threads per process, which fix the order the CPU sums in "
                                  "(0: usable cores / processes on this node; printed, and kept in config.json)")
    verify: bool = _f(True, "check every shard's sha256 against dataset.json before its samples are used "
                            "(once per run, in the background); --no-verify skips it")
    bf16: bool = _f(True, "bf16 autocast on GPUs (ignored on the CPU, where it is slower)")
    channels_last: bool = _f(True, "NHWC memory on GPUs (faster convolutions; ignored on the CPU)")
    compile: bool = _f(False, "torch.compile the model")
    bf16_grads: bool = _f(False, "under torchrun on GPUs, all-reduce the gradients in bf16 (half the bytes; "
                                 "the sum rounds to bf16: a departure from the paper's fp32)")
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
    init_from: str = _f("", "start from another run's checkpoint (fine-tuning, Table 2's 1 CNN*): every layer whose "
                            "name and shape match is loaded, the rest (fc8 for another class count, a new conv6) "
                            "initialised by the recipe; a fresh optimizer, schedule and loader")


MAX_LOADER_THREADS = 256  # per rank; beyond it DALI's thread pool aborts ("terminate called ...", exit 134)


def resolve_recipe(cfg: TrainConfig) -> Recipe:
    try:
        recipe = resolve(cfg.recipe, cfg.overrides)
        recipe.validate()
    except KeyError as e:  # str() of a KeyError is its argument's repr, quotes and all
        raise UsageError(e.args[0]) from None
    except ValueError as e:
        raise UsageError(str(e)) from None
    return recipe


def check_run_options(cfg: TrainConfig, recipe: Recipe, world: int) -> None:
    """UsageError naming the first run option out of range (the recipe's values: Recipe.validate)."""
    if recipe.batch_size % world:
        raise UsageError(f"--batch-size {recipe.batch_size} is not divisible across {world} ranks")
    if cfg.log_every < 1:
        raise UsageError(f"--log-every must be >= 1, not {cfg.log_every}")
    if not 0 <= cfg.seed < 2 ** 63:
        raise UsageError(f"--seed must be in [0, 2^63), not {cfg.seed}")
    if not 0 <= cfg.loader_threads <= MAX_LOADER_THREADS:  # DALI aborts the process on a count it cannot start
        raise UsageError(f"--loader-threads must be in 0..{MAX_LOADER_THREADS} (0: all cores), not {cfg.loader_threads}")
    if cfg.intra_op_threads < 0:
        raise UsageError(f"--intra-op-threads must be >= 0 (0: usable cores / local processes), "
                         f"not {cfg.intra_op_threads}")
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


def _arg_type(typ):
    name = typ if isinstance(typ, str) else typ.__name__
    return {"int": int, "float": float, "str": str}[name]


def parser(description: str = "Train AlexNet on a shard directory.") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, epilog="Recipe values: "
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
