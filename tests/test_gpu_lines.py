"""The lines a GPU run goes through, run on the CPU: torch.cuda faked (is_available, device_count, and
the C call under set_device, so torch's own argument checks still run), process groups, DDP and
torch.compile recorded, the DALI loader's pipeline arguments captured before a GPU would be needed.
What only a GPU can run is listed in docs/DESIGN.md ("GPU-only lines")."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from model import devices, optim
from model.errors import UsageError
from model.alexnet import AlexNet, AlexNetConfig, TwoDeviceAlexNet
from model.recipes import resolve
from pipeline import make_loader


@pytest.fixture
def fake_gpus(monkeypatch):
    """A machine with two CUDA GPUs, as far as device selection can tell; returns the indices that
    reach the driver through torch.cuda.set_device."""
    set_to = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch._C, "_cuda_setDevice", set_to.append, raising=False)  # below torch's own checks
    return set_to


@pytest.mark.parametrize("spec, world, local_rank, expected", [
    ("auto", 1, 0, ["cuda:0"]), ("cuda", 1, 0, ["cuda:0"]), ("cuda:1", 1, 0, ["cuda:1"]),
    ("cuda:0,cuda:1", 1, 0, ["cuda:0", "cuda:1"]), ("auto", 2, 1, ["cuda:1"]), ("cuda", 2, 1, ["cuda:1"]),
    ("cpu", 1, 0, ["cpu"]),
])
def test_every_device_spec_reaches_set_device_with_an_index(fake_gpus, spec, world, local_rank, expected):
    chosen = devices.parse_devices(spec, world, local_rank)
    assert chosen == expected
    device, bf16, channels_last = devices.place(chosen, bf16=True, channels_last=True)  # the real set_device
    on_gpu = expected[0] != "cpu"
    assert fake_gpus == ([int(expected[0].split(":")[1])] if on_gpu else [])
    assert device == torch.device(expected[0]) and bf16 == on_gpu
    assert channels_last == (on_gpu and len(expected) == 1)  # the two halves stay NCHW


@pytest.mark.parametrize("spec, needle", [("cuda:2", "cuda:2 does not exist (this machine has 2 CUDA GPUs)"),
                                          ("cuda:0,cuda:1,cuda:0", "give one device, or two"),
                                          ("mps", "only cpu and cuda devices")])
def test_impossible_devices_are_usage_errors(fake_gpus, spec, needle):
    with pytest.raises(UsageError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        devices.parse_devices(spec)


def test_cuda_without_a_gpu_is_a_usage_error():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert devices.parse_devices("auto") == ["cpu"]
    with pytest.raises(UsageError, match="torch sees no CUDA GPU"):
        devices.parse_devices("cuda")


def test_two_halves_under_torchrun_are_refused(fake_gpus):
    with pytest.raises(UsageError, match="two halves runs in one process"):
        devices.parse_devices("cuda:0,cuda:1", world=2, local_rank=0)


def test_process_group_ddp_and_compile_get_the_ranks_device(monkeypatch):
    calls = {}

    class DDP:
        def __init__(self, module, device_ids=None, gradient_as_bucket_view=False):
            calls["ddp"] = device_ids
            calls["bucket_view"] = gradient_as_bucket_view
            self.module = module

        def register_comm_hook(self, state, hook):
            calls["hook"] = hook.__name__

    def compile(net, **options):
        calls["compile"] = options
        return net

    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, device_id=None: calls.update(pg=(backend, device_id)))
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel", DDP)
    monkeypatch.setattr(torch, "compile", compile)
    gpu = torch.device("cuda:1")
    devices.init_distributed(2, gpu)
    assert calls.pop("pg") == ("nccl", gpu)
    devices.init_distributed(2, torch.device("cpu"))
    assert calls.pop("pg") == ("gloo", None)
    devices.init_distributed(1, gpu)
    assert "pg" not in calls  # one process: no group
    model = torch.nn.Linear(2, 2)
    assert devices.wrap(model, 2, gpu, compile=True).module is model
    assert calls == {"ddp": [1], "bucket_view": True, "compile": {"dynamic": False}}
    calls.clear()
    devices.wrap(model, 2, gpu, compile=False, bf16_grads=True)
    assert calls == {"ddp": [1], "bucket_view": True, "hook": "bf16_compress_hook"}
    calls.clear()
    devices.wrap(model, 2, torch.device("cpu"), compile=False, bf16_grads=True)  # gloo: fp32 whatever is asked
    assert calls == {"ddp": None, "bucket_view": True}
    calls.clear()
    assert devices.wrap(model, 1, gpu, compile=False, bf16_grads=True) is model  # one process: no DDP
    assert calls == {}


def test_the_dali_loader_asks_for_the_gpu_decoder_on_the_ranks_gpu(fake_gpus, shards, monkeypatch):
    """The pipeline's arguments on a GPU device: nvJPEG ('mixed'), the device's own index, a thread
    count for a GPU, the hardware decoder's share; captured before DALI would need the GPU."""
    from pipeline import dali
    seen = {}

    class Built:
        def build(self):
            pass

    def fake_pipeline(feed, gpu, crop, shift, divisor, layout, hw_decoder_load, **kw):
        seen.update(gpu=gpu, crop=crop, layout=layout, hw_decoder_load=hw_decoder_load, **kw)
        return Built()

    monkeypatch.setattr(dali, "shard_pipeline", fake_pipeline)
    monkeypatch.setattr(dali, "DALIGenericIterator", lambda pipes, names: iter(()))
    loader = make_loader(shards, "train", batch_size=16, device="cuda:1", backend="dali", channels_last=True,
                         verify=False)
    loader._build(0, 0)
    assert seen["gpu"] is True and seen["device_id"] == 1 and seen["layout"] == "HWC"
    assert seen["hw_decoder_load"] == 0.65 and 1 <= seen["num_threads"] <= 8 and seen["batch_size"] == 16


def test_the_dali_feed_passes_whole_arrays(shards):
    """Per-sample arguments as arrays with the batch first: DALI slices them in C++ instead of
    making a tensor per sample from Python scalars."""
    loader = make_loader(shards, "train", batch_size=16, backend="dali", verify=False)
    jpgs, labels, crop_x, crop_y, mirror, mean = loader._feed()
    assert len(jpgs) == 16 and labels.shape == (16,)
    for arr, dtype, shape in ((crop_x, np.float32, (16,)), (crop_y, np.float32, (16,)), (mirror, np.int32, (16,)),
                              (mean, np.float32, (16, 3))):
        assert isinstance(arr, np.ndarray) and arr.dtype == dtype and arr.shape == shape


def test_a_padded_last_batch_gives_the_unpadded_step():
    """train_step(pad_to=B): one batch shape for torch.compile, and exactly the partial batch's update."""
    cfg = AlexNetConfig(num_classes=10, dropout=0.0)
    x, y = torch.randn(3, 3, 224, 224) * 50, torch.tensor([1, 4, 7])
    weights = []
    for pad_to in (0, 8):
        torch.manual_seed(0)
        model = AlexNet(cfg=cfg)
        shapes = []
        model.conv1.register_forward_pre_hook(lambda m, i: shapes.append(i[0].shape[0]))
        opt = optim.make_optimizer(model, resolve("paper", {}))
        loss = optim.train_step(model, opt, x, y, 0.01, bf16=False, pad_to=pad_to)
        assert shapes == [8 if pad_to else 3]
        weights.append((loss, [p.detach().clone() for p in model.parameters()]))
    (l0, w0), (l1, w1) = weights
    assert torch.allclose(l0, l1, rtol=1e-5)
    for a, b in zip(w0, w1):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_the_two_halves_copy_the_cast_input_under_autocast():
    """Under bf16 autocast the input crosses to the second half's device as bf16 (half the bytes)."""
    model = TwoDeviceAlexNet(AlexNetConfig(num_classes=10), ("cpu", "cpu"))
    seen = []
    model.halves[1].conv1.register_forward_pre_hook(lambda m, i: seen.append(i[0].dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 3, 224, 224))
    assert seen == [torch.bfloat16]


@pytest.mark.parametrize("shift, ok", [(0.9, True), (1.5, False)])
def test_the_decoder_check_tolerates_a_grey_level_on_average(shift, ok):
    """nvJPEG against libjpeg-turbo: a mean difference up to one grey level passes, more does not; the
    maximum is reported."""
    from tools.dev.bench.gpu import decoder_agreement
    cpu = torch.zeros(2, 3, 224, 224)
    gpu = cpu + shift
    gpu[0, 0, 0, 0] = 4.0
    result = decoder_agreement(cpu, gpu)
    assert result["ok"] is ok and result["max_abs_diff"] == 4.0
    assert result["mean_abs_diff"] == pytest.approx(shift, abs=1e-4)


def test_the_dali_loader_holds_each_gpu_batch_until_the_gpu_has_read_it(fake_gpus, shards, monkeypatch):
    """DALI's zero-copy batches (issue: a possible use-after-free): a batch the consumer has dropped stays
    alive until the event recorded after its step reports done; with 8 held the oldest is waited for."""
    import gc
    import itertools
    import weakref
    from pipeline import dali
    events = []

    class FakeEvent:  # the consumer's stream, as far as the ring can tell
        def __init__(self):
            self.recorded = self.done = False
            events.append(self)

        def record(self):
            self.recorded = True

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    class Built:
        def build(self):
            pass

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(dali, "shard_pipeline", lambda *a, **k: Built())
    monkeypatch.setattr(dali, "DALIGenericIterator", lambda pipes, names: (
        [{"images": torch.full((2, 3, 4, 4), float(k)), "labels": torch.tensor([k, k])}] for k in itertools.count()))
    loader = make_loader(shards, "train", batch_size=16, device="cuda:0", backend="dali", verify=False)
    refs, it = [], iter(loader)
    for k in range(3):
        images, _ = next(it)
        refs.append(weakref.ref(images))
        del images
    gc.collect()
    # batches 0 and 1: their steps queued (the consumer asked for more), their events not done: still held
    assert [r() is not None for r in refs] == [True, True, True] and len(events) == 2 and all(e.recorded for e in events)
    events[0].done = True
    next(it)  # the ring looks at the oldest event when the next batch is asked for
    gc.collect()
    assert refs[0]() is None and refs[1]() is not None and refs[2]() is not None
    for _ in range(12):  # nothing completes: the ring waits for the oldest beyond 8 held
        next(it)
    assert len(loader._ring.held) == 8 and sum(e.done for e in events) == len(events) - 8


@pytest.mark.parametrize("layout", ["grouped", "two_halves"])
def test_lrn_keeps_the_convolutions_dtype_under_bf16_autocast(layout):
    """Autocast runs LRN's pow and sum in float32 and returns float32 (CUDA and CPU alike): without a cast
    back, conv1's and conv2's LRN, pooling and the next input cast ran in float32 on every GPU step."""
    from model.alexnet import conv_block
    cfg = AlexNetConfig(num_classes=10, width=0.125)
    model = AlexNet(cfg=cfg) if layout == "grouped" else TwoDeviceAlexNet(cfg, ["cpu", "cpu"])
    x = torch.randn(2, 3, 224, 224)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if layout == "grouped":
            out = conv_block(x, model.conv1, model.half_lrn, "conv1", model.lrn_after)
        else:
            half = model.halves[0]
            out = conv_block(x, half.conv1, half.lrn, "conv1", model.lrn_after)
        assert out.dtype == torch.bfloat16
        assert model(x).dtype == torch.bfloat16


def test_place_lets_cudnn_pick_its_fastest_algorithms_on_a_gpu_only(fake_gpus, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)  # restored after the test
    devices.place(["cpu"])
    assert torch.backends.cudnn.benchmark is False
    devices.place(["cuda:1"])
    assert torch.backends.cudnn.benchmark is True and fake_gpus == [1]


@pytest.mark.parametrize("local_world, expected", [("1", 8), ("4", 2), ("16", 1)])
def test_loader_workers_are_the_ranks_share_of_the_cores(shards, monkeypatch, local_world, expected):
    """Under torchrun each rank started one DataLoader worker (or DALI thread) per core: 8x oversubscribed
    at 8 ranks. Now usable cores (affinity) / processes on this node."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    assert make_loader(shards, "train", batch_size=16, backend="wds", verify=False).workers == expected
    assert make_loader(shards, "train", batch_size=16, backend="dali", verify=False).threads == expected


def test_the_wds_loaders_workers_persist_across_epochs(shards):
    """One DataLoader for the loader's life: the same worker processes serve every epoch (they were forked
    anew at each epoch start), and a pass left midway and started again yields the right batches."""
    loader = make_loader(shards, "train", batch_size=64, backend="wds", num_threads=2, verify=False)
    seen = []
    for _ in range(2):
        for _ in loader:
            pass
        seen.append([w.pid for w in loader._dl._iterator._workers])
    assert seen[0] == seen[1] and len(seen[0]) == 2
    fresh = make_loader(shards, "train", batch_size=64, backend="wds", num_threads=2, verify=False)
    fresh.set_epoch(2)
    expected = [y for _, y in fresh]
    loader.set_epoch(2)
    it = iter(loader)
    next(it)
    del it  # left after one batch
    loader.set_epoch(2)
    assert all(torch.equal(a, b) for a, b in zip((y for _, y in loader), expected))


def test_the_trainers_val_loader_delivers_the_models_memory_format(tiny_shards, tmp_path, monkeypatch):
    """On one GPU the model is channels-last; the val loader was NCHW beside it (a conversion per batch in
    every evaluation). place() decides channels-last for both; here it says yes on the CPU."""
    from model import train
    real, asked = train.make_loader, {}
    monkeypatch.setattr(train, "place", lambda devices, bf16, cl: (torch.device("cpu"), False, True))
    monkeypatch.setattr(train, "make_loader", lambda shards, split, **kw: (asked.__setitem__(split, kw), real(shards, split, **kw))[1])
    assert train.main(["--shards", tiny_shards, "--out", str(tmp_path / "r"), "--batch-size", "8", "--devices", "cpu",
                       "--width", "0.125", "--epochs", "1", "--no-checkpoints", "--loader-threads", "2"]) == 0
    assert asked["train"]["channels_last"] is True and asked["val"]["channels_last"] is True
