"""Which devices a process trains on, and the GPU set-up around them, as functions a CPU test runs
with a faked torch.cuda (tests/test_gpu_lines.py; docs/DESIGN.md "GPU-only lines")."""
from __future__ import annotations

import os

import torch

from model.errors import UsageError
from pipeline.loader import cores_per_process, local_processes, usable_cores


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


def place(devices: list[str], bf16: bool = True, channels_last: bool = True) -> tuple[torch.device, bool, bool]:
    """(the main device, bf16 and channels-last where asked and on a GPU; channels-last only for one
    device); makes a CUDA main device the current one, so that
    collectives and current_device() use this rank's GPU, not cuda:0."""
    device = torch.device(devices[0])
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.set_device(device)
        # Every shape is fixed (one batch, one crop; train_step pads the last batch under --compile): cuDNN
        # times its algorithms once per shape and keeps the fastest (typically 5-20 % on fixed-shape convnets;
        # the grouped convolutions and conv1's 3-channel NHWC input are where its heuristics miss).
        torch.backends.cudnn.benchmark = True
    return device, bf16 and on_gpu, channels_last and on_gpu and len(devices) == 1


def init_distributed(world: int, device: torch.device) -> None:
    """The process group of a torchrun run: NCCL bound to this rank's GPU, gloo on the CPU."""
    if world > 1:
        on_gpu = device.type == "cuda"
        torch.distributed.init_process_group("nccl" if on_gpu else "gloo", device_id=device if on_gpu else None)


def wrap(model: torch.nn.Module, world: int, device: torch.device, compile: bool,
         bf16_grads: bool = False) -> torch.nn.Module:
    """What the steps call: DDP (its device the rank's GPU) and/or torch.compile around the model.
    DDP's gradients are views of its all-reduce buckets (no copy in and out of them: ~244 MB a step at full
    width); bf16_grads on a GPU all-reduces them in bf16 (DDP's bf16_compress_hook: half the bytes, the
    sum rounded to bf16, so a departure from the fp32 sum; off by default)."""
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                        else None, gradient_as_bucket_view=True)
        if bf16_grads and device.type == "cuda":
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
            net.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return torch.compile(net, dynamic=False) if compile else net  # one shape: train_step pads the last batch


def intra_op_threads(requested: int, cores: int | None = None, local_world: int | None = None) -> tuple[int, str]:
    """(torch's intra-op thread count for this process, why). Chosen here, never left to the launcher:
    torchrun sets OMP_NUM_THREADS=1 only when it starts more than one process a node, so the same run
    would sum its convolutions in another order (other last bits) as 2 ranks on one node and as 2 nodes
    of 1. 0 asks for this process's share of the cores: usable cores // processes on this node."""
    if requested:
        return requested, "--intra-op-threads"
    cores = usable_cores() if cores is None else cores
    local_world = local_processes() if local_world is None else local_world
    return cores_per_process(cores, local_world), f"{cores} usable cores / {local_world} process(es) on this node"


def distributed() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
