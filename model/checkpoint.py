"""Checkpoints and the run directory's lock: save, load and verify (a sha256 over everything a
checkpoint holds), the momentum by canonical parameter name, the RNG states, a model from a checkpoint
and the check that a shard set has its classes. Used by train, evaluate, predict and the figure tools."""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import sys

import torch

from model.alexnet import AlexNetConfig, build, load_canonical, named_canonical_parameters
from model.errors import UsageError
from pipeline.normalization import Normalization
from pipeline.shards import MANIFEST, LockHeld, hold_lock, let_go

# Recipe values that may differ between a run and its resumption (they change no number already
# computed); every other value, the seed and the shard set may not.
RESUME_MAY_CHANGE_RECIPE = {"epochs"}


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
            # in the parameter's own memory format: NCHW buffers beside channels-last weights take SGD off its
            # _foreach fast path for every later step
            optimizer.state[p]["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format
                                                                      ).copy_(piece)
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


def acquire_lock(out: str) -> int:
    """OUT/.lock, held with flock(2) for the run's life, with this process's pid inside for people:
    a second live run into the same OUT is refused; a lock file left by a run that died is taken
    over, whatever pid it names (the kernel releases a dead process's lock, and a reused pid cannot
    pass for a run). Returns the lock's file descriptor (release_lock closes it)."""
    path = os.path.join(out, ".lock")
    try:
        fd, left = hold_lock(path)
    except LockHeld as e:
        raise UsageError(f"{out}: in use by another run (pid {e.args[0] or 'unknown'}, {path}); wait for it or "
                         "choose another --out") from None
    if left:
        print(f"train: {path}: taking over the lock left by pid {left}, which no longer holds it",
              file=sys.stderr, flush=True)
    return fd


def release_lock(out: str, fd: int) -> None:
    """Removes OUT/.lock, then lets go of it (in that order: no window where another run could take
    the file and then lose it to the removal)."""
    let_go(os.path.join(out, ".lock"), fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        return True
    return True


def checkpoint_to_resume(path: str, resume: bool, recipe_name: str, recipe: dict, seed: int, dataset: str,
                         shards: str) -> dict | None:
    """The checkpoint a run continues from (None: a new run), verified and made with the same recipe
    (but its epochs), seed and shard set; UsageError in one line otherwise, or if one exists and
    --resume was not given."""
    if not os.path.exists(path):
        if resume:
            print(f"train: --resume: no {path} yet, so this is a new run", file=sys.stderr, flush=True)
        return None
    if not resume:
        raise UsageError(f"{path} exists: pass --resume to continue that run, or choose another --out")
    checkpoint = load_checkpoint(path)
    saved_recipe, saved_name = checkpoint["recipe"], checkpoint["recipe_name"]
    differ = sorted(k for k, v in recipe.items() if k not in RESUME_MAY_CHANGE_RECIPE and saved_recipe.get(k) != v)
    follows = ""
    if "batch_size" in differ:  # lr_batch is always the batch, and lr follows it by the step-per-image rule
        old, new = saved_recipe["batch_size"], recipe["batch_size"]
        derived = ["lr_batch"] + ["lr"] * math.isclose(recipe["lr"] * old, saved_recipe["lr"] * new, rel_tol=1e-12)
        differ = [k for k in differ if k not in derived]
        follows = f" ({' and '.join(sorted(derived))} follow{'s' * (len(derived) == 1)} the batch)"
    said = [f"{k} {saved_recipe.get(k)}, now {recipe[k]}" for k in differ]
    said += [f"recipe {saved_name}, now {recipe_name}"] * (saved_name != recipe_name)
    said += [f"seed {checkpoint['config']['seed']}, now {seed}"] * (checkpoint["config"]["seed"] != seed)
    if said:
        raise UsageError(f"{path}: was made with other settings ({'; '.join(said)}{follows}); resume with the "
                         "same ones")
    if checkpoint["dataset"] != dataset:
        raise UsageError(f"{path}: was trained on another shard set (its dataset.json differs from "
                         f"{os.path.join(shards, MANIFEST)})")
    return checkpoint


def load_model(path: str, device: str):
    """(model in eval mode on `device`, checkpoint dict); UsageError on a file that is no checkpoint."""
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such checkpoint")
    ckpt = load_checkpoint(path)
    try:
        model_cfg = AlexNetConfig(**ckpt["model_config"])
        ckpt["normalization"] = Normalization.from_dict(ckpt["normalization"])
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
        raise UsageError(f"{path}: not a checkpoint of model.train ({type(e).__name__}: {e})") from None
    model = build(model_cfg, [device])
    load_canonical(model, ckpt["model"])
    return model.eval(), ckpt


def check_classes(path: str, ckpt: dict, manifest: dict, shards: str) -> None:
    """UsageError unless the shards' classes are the checkpoint's, wnid for wnid and in the same order
    (the same count is not enough: a renamed class folder gives the same count)."""
    wnids = [c["wnid"] for c in manifest["classes"]]
    if ckpt["num_classes"] != len(wnids):
        raise UsageError(f"{path}: has {ckpt['num_classes']} classes, the shards have {len(wnids)}")
    if ckpt["wnids"] != wnids:
        i = next(i for i, (a, b) in enumerate(zip(ckpt["wnids"], wnids)) if a != b)
        raise UsageError(f"{path}: was trained on other classes than {shards} has (class {i}: "
                         f"{ckpt['wnids'][i]} in the checkpoint, {wnids[i]} in the shards)")
    trained, here = ckpt.get("preprocessing") or {}, manifest.get("preprocessing") or {}
    differ = [k for k in PREPROCESSING_SEEN if k in trained and trained[k] != here.get(k)]
    if differ:  # a 320-px or uncropped image gives the model crops of another scale than it learned
        raise UsageError(f"{path}: was trained on shards made with "
                         f"{', '.join(f'{k} {trained[k]}' for k in differ)}; {shards} has "
                         f"{', '.join(f'{k} {here.get(k)}' for k in differ)}: make the shards as the training ones "
                         "were (make_shards.py --size, --keep-aspect)")


def input_size(ckpt: dict) -> int:
    """The side of the crops a checkpoint's model takes: 224, or 227 (conv1 unpadded); 224 for checkpoints
    written before the choice existed."""
    return int(ckpt.get("model_config", {}).get("input_size", 224))


# What make_shards did to an image that changes what a crop of it shows (not quality or the resize filter).
PREPROCESSING_SEEN = ("size", "keep_aspect")


def load_matching(model, parent: dict, path: str, wnids: list[str] | None = None) -> dict:
    """Into `model`, every canonical tensor of the checkpoint `parent` whose name and shape match; the
    rest keep their initialisation. fc8's rows are classes: where its shape matches but the classes
    differ (wnids renamed or reordered), each row comes from the parent's row of the same wnid, and a class
    the parent lacks keeps its initialised row. Returns config.json's record of it (by layer); UsageError
    if no layer matches."""
    from model.alexnet import canonical_state, load_canonical
    own, theirs = canonical_state(model), parent["model"]
    loaded = {k for k, v in own.items() if k in theirs and tuple(theirs[k].shape) == tuple(v.shape)}
    layers = sorted({k.rsplit(".", 1)[0] for k in own})
    kept = [layer for layer in layers if all(k in loaded for k in own if k.rsplit(".", 1)[0] == layer)]
    if not kept:
        raise UsageError(f"{path}: has no layer of this model's shape; nothing to start from")
    state = {**own, **{k: theirs[k] for k in loaded if k.rsplit(".", 1)[0] in kept}}
    record = {"path": os.path.abspath(path), "digest": parent["digest"], "loaded": kept,
              "initialised": [layer for layer in layers if layer not in kept],
              "parent_classes": len(parent.get("wnids", [])), "parent_step": parent.get("step")}
    parent_wnids = parent.get("wnids")
    if "fc8" in kept and wnids is not None and parent_wnids is not None and list(parent_wnids) != list(wnids):
        row_of = {w: j for j, w in enumerate(parent_wnids)}
        rows = [(i, row_of[w]) for i, w in enumerate(wnids) if w in row_of]
        for k in ("fc8.weight", "fc8.bias"):
            t = own[k].clone()
            for i, j in rows:
                t[i] = theirs[k][j]
            state[k] = t
        record["fc8_rows"] = {"by": "wnid", "from_parent": len(rows), "initialised": len(wnids) - len(rows)}
        if len(rows) < len(wnids):
            record["loaded"] = [layer for layer in kept if layer != "fc8"]
            record["initialised"] = sorted(record["initialised"] + ["fc8"])
    load_canonical(model, state)
    return record
