"""AlexNet as published (Krizhevsky, Sutskever, Hinton, NIPS 2012), in two halves.

Layer sizes (paper, section 3.5 and figure 2), input 3x224x224:
  conv1 96 x 11x11 stride 4 (padding 2) -> ReLU, LRN, max-pool 3/2     55 -> 27
  conv2 256 x 5x5, each half sees its own 48 maps -> ReLU, LRN, pool   27 -> 13
  conv3 384 x 3x3, sees both halves -> ReLU
  conv4 384 x 3x3, own half -> ReLU
  conv5 256 x 3x3, own half -> ReLU, pool                               13 -> 6
  fc6 4096, fc7 4096 (see both halves; ReLU, dropout 0.5), fc8 num_classes
60,965,224 parameters for 1000 classes; 61,260,392 with Table 2's sixth conv layer
(--extra-conv: conv6 256 x 3x3 over pool5, own half, fc6 unchanged).

Two layouts compute the same function with the same weights:
  AlexNet          one device; the halves are grouped convolutions (groups=2).
                   Its state_dict is the checkpoint format.
  TwoDeviceAlexNet each half's kernels on its own device, activations crossing
                   only into conv3 and the fully connected layers, as on the
                   paper's two GTX 580s. Converts to and from the canonical state.
Every parameter of a half is the first or second part (along dim 0) of the
canonical parameter of the same name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# (name, in_channels, out_channels, kernel, stride, padding, groups) of the canonical layers at width 1;
# groups=2: each half sees only its own half's maps (conv2, conv4, conv5 in figure 2)
CONVS = (("conv1", 3, 96, 11, 4, 2, 1), ("conv2", 96, 256, 5, 1, 2, 2), ("conv3", 256, 384, 3, 1, 1, 1),
         ("conv4", 384, 384, 3, 1, 1, 2), ("conv5", 384, 256, 3, 1, 1, 2))
# The sixth convolutional layer of Table 2's "1 CNN*" ("an extra sixth convolutional layer over the last
# pooling layer", section 6; no size given): 256 maps of 3x3, padding 1, each half on its own half's maps as
# conv4 and conv5, no pooling. It keeps pool5's 6x6x256, so fc6 is unchanged; 295,168 parameters.
CONV6 = ("conv6", 256, 256, 3, 1, 1, 2)
FC = 4096  # fc6 and fc7 units at width 1
ONE_BIASES = ("conv2", "conv4", "conv5", "conv6", "fc6", "fc7")  # paper, section 5: biases initialised to 1
# (conv6, which the paper adds in section 6 only, is initialised as its neighbours conv4 and conv5)
# Caffe's bvlc_alexnet (BVLC/caffe models/bvlc_alexnet/train_val.prototxt): the same layers' biases at 0.1,
# because 1 gave a flat loss there; fc6 and fc7 weights N(0, 0.005), every other weight N(0, 0.01).
CAFFE_BIAS, CAFFE_FC_STD = 0.1, 0.005
# The authors' released config (cuda-convnet2 layers/layers-223-1gpu.cfg): initW=0.03 in conv3, conv4 and
# conv5, 0.01 elsewhere, the biases of 1 where the paper has them. (Its fc1000 initB=-7 adds one constant
# to every logit, which the softmax ignores: left at 0 here.)
INIT_STD = {"paper": {}, "cuda-convnet2": {"conv3": 0.03, "conv4": 0.03, "conv5": 0.03, "conv6": 0.03},
            "caffe": {"fc6": CAFFE_FC_STD, "fc7": CAFFE_FC_STD}, "kaiming": {}}  # layer -> std where not 0.01
INIT_BIAS = {"paper": 1.0, "cuda-convnet2": 1.0, "caffe": CAFFE_BIAS, "kaiming": 0.0}  # in ONE_BIASES
INITS = tuple(INIT_BIAS)


@dataclass(frozen=True)
class AlexNetConfig:
    num_classes: int = 1000
    lrn_layers: str = "paper"        # "paper": after conv1 and conv2 (section 3.3); "all": after all five convs
    lrn_convention: str = "alpha/n"  # "alpha/n": k + alpha/n * sum(a^2), as the authors' code computes it
                                     # (cuda-convnet2 layer.py divides `scale` by `size`), Caffe and PyTorch;
                                     # "alpha": k + alpha * sum(a^2), the paper's printed formula (section 3.3)
    lrn_k: float = 2.0               # the paper's k (section 3.3; minDiv=2 in cuda-convnet2); Caffe's default is 1
    dropout: float = 0.5             # in fc6 and fc7 (section 4.2)
    init: str = "cuda-convnet2"      # the authors' released config (conv3-5 N(0, 0.03)), which learns at batch 128;
                                     # "paper": N(0, 0.01) weights, some biases 1 (section 5), which does not;
                                     # "caffe": bvlc_alexnet's; "kaiming": He-normal weights, zero biases
    extra_conv: bool = False         # Table 2's sixth conv layer after pool5 (CONV6)
    width: float = 1.0               # every layer's maps and units times this (1 = the paper's; fewer only
                                     # for quick runs: 1/8 trains a step ~15x faster on a CPU)
    input_size: int = 224            # the crops' side: 224 with conv1 padded by 2 (as torchvision), or 227 with
                                     # conv1 unpadded (Caffe's bvlc_alexnet, the mission's layer table); both
                                     # give conv1 55x55 maps, so every weight has the same shape

    def __post_init__(self):
        checks = {"lrn_layers": ("paper", "all"), "lrn_convention": ("alpha/n", "alpha"),
                  "init": INITS}
        for field, allowed in checks.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, not {getattr(self, field)!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), not {self.dropout}")
        if not 0 < self.width <= 1:
            raise ValueError(f"width must be in (0, 1], not {self.width}")
        if self.input_size not in CONV1_PADDING:
            raise ValueError(f"input_size must be one of {tuple(CONV1_PADDING)}, not {self.input_size}")


def _scaled(channels: int, width: float) -> int:
    """channels * width, rounded to an even number (each half gets half), at least 2."""
    return 2 * max(1, round(channels * width / 2))


# conv1's padding for each input size: (224 + 2 * 2 - 11) // 4 + 1 = 55 = (227 - 11) // 4 + 1
CONV1_PADDING = {224: 2, 227: 0}


def conv_layers(cfg: AlexNetConfig) -> list[tuple[str, int, int, int, int, int, int]]:
    """CONVS (and CONV6 with extra_conv) at the config's width, in forward order; conv1's padding
    follows the input size."""
    specs = list(CONVS) + ([CONV6] if cfg.extra_conv else [])
    w = cfg.width
    return [(name, cin if name == "conv1" else _scaled(cin, w), _scaled(cout, w), k, stride,
             CONV1_PADDING[cfg.input_size] if name == "conv1" else pad, groups)
            for name, cin, cout, k, stride, pad, groups in specs]


def fc_layers(cfg: AlexNetConfig) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of fc6, fc7, fc8: fc6 sees the last conv's 6x6 maps."""
    hidden, last = _scaled(FC, cfg.width), conv_layers(cfg)[-1][2]
    return [("fc6", last * 6 * 6, hidden), ("fc7", hidden, hidden), ("fc8", hidden, cfg.num_classes)]


def make_lrn(cfg: AlexNetConfig) -> nn.Module:
    # b = a / (k + alpha' * sum_{n neighbours} a^2)^beta with n=5, alpha=1e-4, beta=0.75 (section 3.3).
    # PyTorch's LocalResponseNorm computes alpha' = alpha/n, so the printed formula needs alpha*n there.
    size, alpha = 5, 1e-4
    return nn.LocalResponseNorm(size, alpha=alpha * size if cfg.lrn_convention == "alpha" else alpha,
                                beta=0.75, k=cfg.lrn_k)


def _lrn_after(cfg: AlexNetConfig) -> set[str]:
    return {"conv1", "conv2"} if cfg.lrn_layers == "paper" else {c[0] for c in conv_layers(cfg)}


POOL_AFTER = ("conv1", "conv2", "conv5")  # overlapping max-pooling, 3x3 stride 2 (section 3.4)


def conv_block(x: torch.Tensor, conv: nn.Module, lrn, name: str, lrn_after: set[str]) -> torch.Tensor:
    """One convolution as the paper orders it, for either layout: conv -> ReLU -> LRN (where the
    config puts it; section 3.3: 'after applying the ReLU') -> max-pool (after conv1, conv2, conv5)."""
    x = F.relu(conv(x), inplace=True)
    if name in lrn_after:
        # Under bf16 autocast LRN's pow and sum run (and return) float32: back to the convolution's dtype,
        # so that pooling and the next convolution's input cast do not run on float32 (one cast here).
        x = lrn(x).to(x.dtype)
    if name in POOL_AFTER:
        x = F.max_pool2d(x, 3, 2)
    return x


def init_weights(model: nn.Module, cfg: AlexNetConfig) -> None:
    """Paper (section 5): weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7, else 0.
    "cuda-convnet2": conv3-5 weights N(0, 0.03). "caffe": biases 0.1 and fc6/fc7 weights N(0, 0.005).
    "kaiming": He-normal, biases 0."""
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Conv2d, nn.Linear)):
            continue
        layer = name.split(".")[-1]
        if cfg.init == "kaiming" and layer != "fc8":
            nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
        else:
            nn.init.normal_(mod.weight, 0.0, INIT_STD[cfg.init].get(layer, 0.01))
        nn.init.constant_(mod.bias, INIT_BIAS[cfg.init] if layer in ONE_BIASES else 0.0)


def check_input(x: torch.Tensor, cfg: AlexNetConfig) -> None:
    """UsageError unless the images are the model's crops: a 224 model fed 227 crops (or the reverse) would
    run, with other conv1 maps than it learned, or fail deep inside fc6."""
    if tuple(x.shape[-2:]) != (cfg.input_size, cfg.input_size):
        from model.errors import UsageError
        raise UsageError(f"the images are {x.shape[-2]}x{x.shape[-1]}, and this model takes {cfg.input_size}x"
                         f"{cfg.input_size} crops (its input_size); load its crops from the checkpoint")


class AlexNet(nn.Module):
    """The grouped, one-device layout. forward: float [N, 3, S, S] -> logits [N, num_classes], S its input_size
    (224, or 227 with conv1 unpadded)."""

    def __init__(self, num_classes: int = 1000, cfg: AlexNetConfig | None = None, **options):
        """AlexNet(num_classes=1000, init="caffe", ...) as torchvision's constructors, or AlexNet(cfg=config)."""
        super().__init__()
        cfg = cfg or AlexNetConfig(num_classes=num_classes, **options)
        self.cfg = cfg
        self.convs = [spec[0] for spec in conv_layers(cfg)]
        for name, cin, cout, k, s, p, g in conv_layers(cfg):
            setattr(self, name, nn.Conv2d(cin, cout, k, s, p, groups=g))
        for name, fin, fout in fc_layers(cfg):
            setattr(self, name, nn.Linear(fin, fout))
        self.lrn = make_lrn(cfg)
        self.lrn_after = _lrn_after(cfg)
        init_weights(self, cfg)

    def half_lrn(self, x: torch.Tensor) -> torch.Tensor:
        """LRN within each half: on the paper's GPUs the 'adjacent kernel maps' of the sum are
        the same GPU's, so the halves never normalise each other. NCHW: the halves are folded
        into the batch for PyTorch's LRN. Channels-last: the same sum over a view of the NHWC
        memory, which a fold into the batch would copy to NCHW and back (two transposes)."""
        n, c, h, w = x.shape
        if not x.is_contiguous(memory_format=torch.channels_last) or x.is_contiguous():
            return self.lrn(x.reshape(n * 2, c // 2, h, w)).reshape(n, c, h, w)
        lrn = self.lrn
        v = x.permute(0, 2, 3, 1).view(n, h, w, 2, c // 2)  # NHWC memory as it lies: no copy
        sq = F.pad(v * v, (lrn.size // 2, (lrn.size - 1) // 2))
        window = sq.unfold(-1, lrn.size, 1).sum(-1)  # sum of squares of the `size` neighbours in the half
        out = v / (lrn.k + lrn.alpha / lrn.size * window) ** lrn.beta  # PyTorch's LRN: alpha times the mean
        return out.view(n, h, w, c).permute(0, 3, 1, 2)  # NCHW shape, NHWC memory

    def features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.cfg)
        for name in self.convs:
            x = conv_block(x, getattr(self, name), self.half_lrn, name, self.lrn_after)
        return x

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """fc7's output after ReLU (and dropout in training): the 4096-d 'last hidden layer' of section 6.1."""
        x = torch.flatten(self.features(x), 1)
        p = self.cfg.dropout
        x = F.dropout(F.relu(self.fc6(x), inplace=True), p, self.training)
        return F.dropout(F.relu(self.fc7(x), inplace=True), p, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc8(self.hidden(x))


class AlexNetHalf(nn.Module):
    """One GPU's half: half of every layer's kernels (fc8: the first or last part of the classes)."""

    def __init__(self, cfg: AlexNetConfig, fc8_out: int):
        super().__init__()
        for name, cin, cout, k, s, p, g in conv_layers(cfg):
            # groups=2: its own half's maps in; groups=1: both halves' (the image, for conv1)
            setattr(self, name, nn.Conv2d(cin // g, cout // 2, k, s, p))
        for name, fin, fout in fc_layers(cfg):  # input: both halves' units
            setattr(self, name, nn.Linear(fin, fc8_out if name == "fc8" else fout // 2))
        self.lrn = make_lrn(cfg)


class TwoDeviceAlexNet(nn.Module):
    """The paper's layout: half 0 on devices[0], half 1 on devices[1]; logits come back on devices[0]."""

    def __init__(self, cfg: AlexNetConfig, devices: tuple[str, str]):
        super().__init__()
        self.cfg = cfg
        self.devices = [torch.device(d) for d in devices]
        n0 = (cfg.num_classes + 1) // 2
        # The grouped layout's draws, split: one seed gives the same weights in either layout, and
        # leaves the generator where the grouped layout leaves it (the halves' own default init runs
        # on a forked generator). All on the CPU, before the halves move to their devices.
        canonical = AlexNet(cfg=cfg).state_dict()
        with torch.random.fork_rng(devices=[]):
            self.halves = nn.ModuleList([AlexNetHalf(cfg, n0), AlexNetHalf(cfg, cfg.num_classes - n0)])
        self.lrn_after = _lrn_after(cfg)
        self.convs = [(spec[0], spec[6]) for spec in conv_layers(cfg)]  # (name, groups)
        self.load_canonical_state_dict(canonical)
        for half, device in zip(self.halves, self.devices):
            half.to(device)

    def _both(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two halves' maps concatenated, once on each device (the GPUs talk only here)."""
        d0, d1 = self.devices
        return torch.cat([a, b.to(d0, non_blocking=True)], 1), torch.cat([a.to(d1, non_blocking=True), b], 1)

    def _conv(self, name: str, xs):
        return [conv_block(x, getattr(half, name), half.lrn, name, self.lrn_after) for half, x in zip(self.halves, xs)]

    def _hidden_both(self, x: torch.Tensor) -> list[torch.Tensor]:
        """fc7's whole output (both halves' units), once on each device."""
        check_input(x, self.cfg)
        if torch.is_autocast_enabled(x.device.type):  # conv1 would cast it anyway: copy half the bytes
            x = x.to(torch.get_autocast_dtype(x.device.type))
        xs = [x.to(d, non_blocking=True) for d in self.devices]
        for name, groups in self.convs:
            if groups == 1 and name != "conv1":  # conv3 sees both halves' maps: the GPUs talk
                xs = self._both(*xs)
            xs = self._conv(name, xs)
        xs = self._both(*(torch.flatten(t, 1) for t in xs))
        p = self.cfg.dropout
        for layer in ("fc6", "fc7"):
            xs = [F.dropout(F.relu(getattr(h, layer)(t), inplace=True), p, self.training)
                  for h, t in zip(self.halves, xs)]
            xs = self._both(*xs)
        return xs

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """fc7's output after ReLU, on devices[0] (AlexNet.hidden)."""
        return self._hidden_both(x)[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = (h.fc8(t) for h, t in zip(self.halves, self._hidden_both(x)))
        return torch.cat([a, b.to(self.devices[0])], 1)

    # -- the canonical (grouped) parameter format ---------------------------
    def canonical_state_dict(self) -> dict[str, torch.Tensor]:
        return join_halves({k: v for k, v in self.halves[0].state_dict().items()},
                           {k: v for k, v in self.halves[1].state_dict().items()})

    def load_canonical_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        first, second = split_halves(state, {k: v.shape[0] for k, v in self.halves[0].state_dict().items()})
        self.halves[0].load_state_dict(first)
        self.halves[1].load_state_dict(second)


def join_halves(first: dict, second: dict) -> dict:
    """Canonical tensors from the two halves' tensors of the same names (cat along dim 0)."""
    return {k: torch.cat([first[k].cpu(), second[k].cpu()], 0) for k in first if k in second}


def split_halves(state: dict, first_sizes: dict) -> tuple[dict, dict]:
    """The two halves' tensors from canonical ones; first_sizes: rows of each tensor in half 0."""
    first, second = {}, {}
    for k, n in first_sizes.items():
        if k not in state:
            continue
        first[k], second[k] = state[k][:n].clone(), state[k][n:].clone()
    return first, second


def build(cfg: AlexNetConfig, devices: list[str]) -> nn.Module:
    """AlexNet on one device, or TwoDeviceAlexNet over two; initialised on the CPU either way."""
    if len(devices) == 1:
        return AlexNet(cfg=cfg).to(devices[0])
    if len(devices) == 2:
        return TwoDeviceAlexNet(cfg, (devices[0], devices[1]))
    raise ValueError(f"AlexNet runs on one device or two halves, not on {len(devices)} devices")


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and/or torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def canonical_state(model: nn.Module) -> dict[str, torch.Tensor]:
    model = unwrap(model)
    if isinstance(model, TwoDeviceAlexNet):
        return model.canonical_state_dict()
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def load_canonical(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    model = unwrap(model)
    if isinstance(model, TwoDeviceAlexNet):
        model.load_canonical_state_dict(state)
    else:
        model.load_state_dict(state)


def named_canonical_parameters(model: nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """(canonical name, [its parameter, or the two halves' parameters]) in a fixed order."""
    model = unwrap(model)
    if isinstance(model, TwoDeviceAlexNet):
        p0, p1 = dict(model.halves[0].named_parameters()), dict(model.halves[1].named_parameters())
        return [(k, [p0[k], p1[k]]) for k in p0]
    return [(k, [p]) for k, p in model.named_parameters()]


@torch.no_grad()
def fc7_dead_share(model: nn.Module, images: torch.Tensor) -> float:
    """The share of fc7's units that output 0 for every one of `images` (eval mode): a dead ReLU gets
    no gradient, so a net whose fc7 is mostly dead can learn little more than the class prior."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    try:
        h = model.hidden(images)
    finally:
        model.train(was_training)
    return (h.amax(0) <= 0).float().mean().item()
