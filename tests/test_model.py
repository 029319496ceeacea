"""model/alexnet.py and the trainer's plain functions (CPU, seconds)."""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from model.alexnet import (AlexNet, AlexNetConfig, TwoDeviceAlexNet, canonical_state, load_canonical, make_lrn)
from model.recipes import RECIPES, Recipe
from model.checkpoint import load_optimizer_state, optimizer_state
from model.optim import (learning_rate, make_optimizer, plateau_divisions,
                         train_step)


def test_parameter_count_and_shapes():
    model = AlexNet()
    assert sum(p.numel() for p in model.parameters()) == 60_965_224
    assert [getattr(model, f"conv{i}").out_channels for i in range(1, 6)] == [96, 256, 384, 384, 256]
    assert [getattr(model, f"conv{i}").groups for i in range(1, 6)] == [1, 2, 1, 2, 2]
    assert model.conv1.kernel_size == (11, 11) and model.conv1.stride == (4, 4) and model.conv1.padding == (2, 2)
    x = torch.randn(2, 3, 224, 224)
    assert model.features(x).shape == (2, 256, 6, 6)
    assert AlexNet(cfg=AlexNetConfig(num_classes=10))(x).shape == (2, 10)


def test_the_sixth_conv_layer_and_the_width_by_hand():
    """--extra-conv (Table 2's 1 CNN*): conv6 256 x 3x3 over pool5, each half on its own 128 maps:
    256 * 128 * 9 + 256 = 295,168 parameters more, pool5's 6x6x256 kept, so fc6 is unchanged."""
    six = AlexNet(cfg=AlexNetConfig(extra_conv=True, init="paper"))
    assert sum(p.numel() for p in six.parameters()) == 60_965_224 + 295_168
    assert (six.conv6.in_channels, six.conv6.out_channels, six.conv6.groups, six.conv6.padding) == (256, 256, 2, (1, 1))
    assert six.fc6.in_features == 9216 and torch.all(six.conv6.bias == 1.0)  # biases 1, as conv4 and conv5
    x = torch.randn(2, 3, 224, 224)
    assert six.features(x).shape == (2, 256, 6, 6) and six(x).shape == (2, 1000)
    # width 1/8, 10 classes: maps 12, 32, 48, 48, 32 and 512 units, counted by hand layer by layer
    small = AlexNet(cfg=AlexNetConfig(num_classes=10, width=0.125))
    by_hand = (12 * 3 * 121 + 12) + (32 * 6 * 25 + 32) + (48 * 32 * 9 + 48) + (48 * 24 * 9 + 48) + \
              (32 * 24 * 9 + 32) + (1152 * 512 + 512) + (512 * 512 + 512) + (512 * 10 + 10)
    assert sum(p.numel() for p in small.parameters()) == by_hand == 898_554


def test_paper_init():
    torch.manual_seed(0)
    model = AlexNet(init="paper")
    for name, mod in model.named_children():
        if not hasattr(mod, "weight"):
            continue
        assert abs(mod.weight.std().item() - 0.01) < 0.0005 and abs(mod.weight.mean().item()) < 0.001, name
        expected_bias = 1.0 if name in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(mod.bias == expected_bias), name
    kaiming = AlexNet(cfg=AlexNetConfig(init="kaiming"))
    assert kaiming.conv1.weight.std().item() == pytest.approx((2 / (3 * 121)) ** 0.5, rel=0.05)
    assert torch.all(kaiming.conv2.bias == 0)


def test_lrn_follows_the_papers_formula():
    a = torch.randn(1, 12, 3, 3) * 20
    k, n, alpha, beta = 2.0, 5, 1e-4, 0.75
    sq = torch.stack([(a[:, max(0, i - n // 2): min(12, i + n // 2 + 1)] ** 2).sum(1) for i in range(12)], 1)
    expected = a / (k + alpha * sq) ** beta  # paper, section 3.3: no division by n
    torch.testing.assert_close(make_lrn(AlexNetConfig(lrn_convention="alpha"))(a), expected, rtol=1e-5, atol=1e-6)
    code = a / (k + alpha / n * sq) ** beta  # cuda-convnet2 layer.py divides scale by size: the default
    torch.testing.assert_close(make_lrn(AlexNetConfig())(a), code, rtol=1e-5, atol=1e-6)
    caffe = a / (1.0 + alpha / n * sq) ** beta
    torch.testing.assert_close(make_lrn(AlexNetConfig(lrn_k=1.0))(a), caffe, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cfg", [AlexNetConfig(num_classes=7),  # the paper's size; the others at 1/4 (cheaper)
                                 AlexNetConfig(num_classes=10, lrn_layers="all", width=0.25),
                                 AlexNetConfig(num_classes=5, extra_conv=True, width=0.25)],
                         ids=["paper", "lrn-all", "extra-conv"])
def test_two_layouts_compute_the_same_function(cfg):
    torch.manual_seed(1)
    grouped = AlexNet(cfg=cfg).eval()
    split = TwoDeviceAlexNet(cfg, ("cpu", "cpu")).eval()  # two "devices", both the CPU here
    load_canonical(split, canonical_state(grouped))
    x = torch.randn(3, 3, 224, 224)
    torch.testing.assert_close(split(x), grouped(x), rtol=1e-4, atol=1e-5)
    # and back: the split model's canonical state loads into the grouped layout unchanged
    state = canonical_state(split)
    assert list(state) == list(grouped.state_dict())
    assert all(torch.equal(state[k], v) for k, v in grouped.state_dict().items())
    # gradients agree too; in float64, where max-pool near-ties cannot flip between layouts
    grouped, split, x = grouped.double(), split.double(), x.double()
    for m in (grouped, split):
        m.zero_grad()
        F.cross_entropy(m(x), torch.tensor([0, 1, 2])).backward()
    g_split = {k: torch.cat([p0.grad, p1.grad]) for (k, p0), (_, p1) in
               zip(split.halves[0].named_parameters(), split.halves[1].named_parameters())}
    for k, p in grouped.named_parameters():
        torch.testing.assert_close(g_split[k], p.grad, rtol=0, atol=1e-9 * p.grad.abs().max().item())


def _tiny_model():
    torch.manual_seed(2)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                               torch.nn.Linear(4 * 4 * 4, 3)).double()


@pytest.mark.parametrize("name", ["paper", "caffe"])
def test_trainer_step_is_the_papers_update_rule(name):
    """model.train's own optimizer and step against the paper's rule (section 5) written out:
    v <- m v - lr_g wd_g w - lr_g grad;  w <- w + v, with the recipe's groups (biases: 2 lr, no decay),
    for three steps across an lr division by 10, where the paper's v carries over unchanged."""
    recipe = RECIPES[name]
    model, ref = _tiny_model(), _tiny_model()
    optimizer = make_optimizer(model, recipe)
    x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 1, 0])
    velocity = {k: torch.zeros_like(p) for k, p in ref.named_parameters()}
    for lr in (0.1, 0.1, 0.01):
        train_step(model, optimizer, x, y, lr, bf16=False)
        ref.zero_grad()
        logits = ref(x)
        loss = -(logits.log_softmax(1)[torch.arange(5), y]).mean()  # the batch mean of the cross-entropy
        loss.backward()
        with torch.no_grad():
            for k, p in ref.named_parameters():
                is_bias = k.endswith("bias")
                lr_g = lr * (2.0 if is_bias else 1.0)
                wd_g = 0.0 if is_bias else 5e-4
                velocity[k] = 0.9 * velocity[k] - lr_g * wd_g * p - lr_g * p.grad
                p += velocity[k]
        for (k, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=f"{k} after lr {lr}")


def test_optimizer_groups_have_the_recipes_values():
    model = AlexNet(num_classes=10)
    groups = make_optimizer(model, RECIPES["paper"]).param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    weights, biases = groups
    assert all(names[id(p)].endswith("weight") for p in weights["params"]) and len(weights["params"]) == 8
    assert all(names[id(p)].endswith("bias") for p in biases["params"]) and len(biases["params"]) == 8
    assert (weights["lr"], weights["weight_decay"], weights["momentum"]) == (0.01, 5e-4, 0.9)
    assert (biases["lr"], biases["weight_decay"]) == (0.02, 0.0)
    decayed = make_optimizer(model, Recipe(bias_decay=True, bias_lr_mult=1.0)).param_groups[1]
    assert (decayed["lr"], decayed["weight_decay"]) == (0.01, 5e-4)


def test_overfits_one_batch():
    torch.manual_seed(3)
    # 1/4 of the width (6x cheaper); with fewer units summed into each output it takes a larger step
    model = AlexNet(cfg=AlexNetConfig(num_classes=4, init="kaiming", dropout=0.0, width=0.25))
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9)
    x, y = torch.randn(8, 3, 224, 224), torch.arange(8) % 4
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_plateau_schedule():
    assert plateau_divisions([0.9, 0.8, 0.7], patience=2, max_divisions=3) == 0
    assert plateau_divisions([0.9, 0.8, 0.8, 0.8], patience=2, max_divisions=3) == 1
    assert plateau_divisions([0.9, 0.9, 0.9, 0.9, 0.9], patience=2, max_divisions=3) == 2
    assert plateau_divisions([0.5] * 20, patience=1, max_divisions=3) == 3  # the paper stopped after 3
    cfg = Recipe(lr=0.01, plateau_patience=2)
    assert learning_rate(cfg, 3.5, [0.9, 0.8, 0.8, 0.8]) == pytest.approx(0.001)


def test_step_schedule_and_warmup():
    cfg = Recipe(lr=0.01, schedule="step", step_epochs=30, warmup_epochs=2)
    assert learning_rate(cfg, 0.0, []) == pytest.approx(0.001)
    assert learning_rate(cfg, 1.0, []) == pytest.approx(0.0055)
    assert learning_rate(cfg, 2.0, []) == pytest.approx(0.01)
    assert learning_rate(cfg, 29.9, []) == pytest.approx(0.01)
    assert learning_rate(cfg, 30.0, []) == pytest.approx(0.001)
    assert learning_rate(cfg, 89.0, []) == pytest.approx(0.0001)


def test_momentum_moves_between_layouts():
    """The checkpoint's optimizer state is keyed by canonical name: grouped -> halves -> grouped."""
    torch.manual_seed(4)
    cfg = AlexNetConfig(num_classes=6)
    grouped = AlexNet(cfg=cfg)
    opt = torch.optim.SGD(grouped.parameters(), lr=0.01, momentum=0.9)
    F.cross_entropy(grouped(torch.randn(2, 3, 224, 224)), torch.tensor([0, 5])).backward()
    opt.step()
    state = optimizer_state(opt, grouped)
    assert set(state["momentum"]) == set(grouped.state_dict())
    split = TwoDeviceAlexNet(cfg, ("cpu", "cpu"))
    opt2 = torch.optim.SGD(split.parameters(), lr=0.01, momentum=0.9)
    load_optimizer_state(opt2, split, state)
    back = optimizer_state(opt2, split)
    for k, v in state["momentum"].items():
        assert torch.equal(back["momentum"][k], v), k
    rows = split.halves[0].conv2.weight.shape[0]
    assert torch.equal(opt2.state[split.halves[1].conv2.weight]["momentum_buffer"], state["momentum"]["conv2.weight"][rows:])


def test_one_seed_gives_the_same_weights_in_both_layouts():
    cfg = AlexNetConfig(num_classes=7)
    torch.manual_seed(5)
    grouped = canonical_state(AlexNet(cfg=cfg))
    torch.manual_seed(5)
    split = canonical_state(TwoDeviceAlexNet(cfg, ("cpu", "cpu")))
    assert list(split) == list(grouped) and all(torch.equal(split[k], grouped[k]) for k in grouped)


def _lrn_by_hand(a, n=5, alpha=1e-4, beta=0.75, k=2.0):
    """Within each half (48 or 128 maps), a / (k + alpha/n * sum of squares of n neighbours)^beta."""
    out = torch.empty_like(a)
    half = a.shape[1] // 2
    for h in (0, 1):
        x = a[:, h * half:(h + 1) * half]
        sq = x ** 2
        for c in range(half):
            window = sq[:, max(0, c - n // 2):min(half, c + n // 2 + 1)].sum(1)
            out[:, h * half + c] = x[:, c] / (k + alpha / n * window) ** beta
    return out


def _forward_by_hand(state, x, masks):
    """The paper's layer order (section 3.5, figure 2) from the canonical weights, in float64:
    conv -> ReLU -> LRN -> max-pool 3/2 for conv1 and conv2; conv3, conv4 with ReLU; conv5 -> ReLU ->
    pool; fc6, fc7 -> ReLU -> dropout (masks: kept units, scaled by 1/(1 - p)); fc8."""
    def conv(name, t, stride, pad, groups):
        return F.conv2d(t, state[f"{name}.weight"], state[f"{name}.bias"], stride, pad, groups=groups)
    t = F.max_pool2d(_lrn_by_hand(conv("conv1", x, 4, 2, 1).clamp_min(0)), 3, 2)
    t = F.max_pool2d(_lrn_by_hand(conv("conv2", t, 1, 2, 2).clamp_min(0)), 3, 2)
    t = conv("conv3", t, 1, 1, 1).clamp_min(0)
    t = conv("conv4", t, 1, 1, 2).clamp_min(0)
    t = F.max_pool2d(conv("conv5", t, 1, 1, 2).clamp_min(0), 3, 2).flatten(1)
    t = (t @ state["fc6.weight"].T + state["fc6.bias"]).clamp_min(0) * masks[0]
    t = (t @ state["fc7.weight"].T + state["fc7.bias"]).clamp_min(0) * masks[1]
    return t @ state["fc8.weight"].T + state["fc8.bias"]


@pytest.mark.parametrize("layout", ["grouped", "two halves"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_pass_is_the_papers_layer_order(layout, mode, monkeypatch):
    """AlexNet against a hand-written forward pass, in train mode with a fixed dropout mask (patched
    in where the model draws its mask) and in eval mode (no dropout)."""
    import model.alexnet as alexnet
    torch.manual_seed(6)
    cfg = AlexNetConfig(num_classes=10)
    grouped = AlexNet(cfg=cfg).double()
    net = grouped if layout == "grouped" else TwoDeviceAlexNet(cfg, ("cpu", "cpu")).double()
    load_canonical(net, canonical_state(grouped))
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64) * 50
    g = torch.Generator().manual_seed(7)
    keep = [(torch.rand(2, 4096, generator=g) > 0.5).double() for _ in range(2)]
    drawn = []

    def fixed_dropout(t, p, training, inplace=False):  # the model's own call, with a known mask
        if not training:
            return t
        assert p == 0.5
        mask = keep[len(drawn) // (1 if layout == "grouped" else 2)]
        if layout == "two halves":  # each half drops its own 2048 units
            mask = mask[:, :2048] if len(drawn) % 2 == 0 else mask[:, 2048:]
        drawn.append(p)
        return t * mask / (1 - p)
    monkeypatch.setattr(alexnet.F, "dropout", fixed_dropout)
    net.train(mode == "train")
    masks = [m / 0.5 for m in keep] if mode == "train" else [1.0, 1.0]
    expected = _forward_by_hand(canonical_state(grouped), x, masks)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-9, atol=1e-9)
    assert len(drawn) == ((2 if layout == "grouped" else 4) if mode == "train" else 0)


def test_lrn_in_channels_last_memory_is_the_same_and_stays_channels_last():
    """The channels-last LRN path (no copy to NCHW) against the hand-written LRN within halves."""
    torch.manual_seed(8)
    model = AlexNet(num_classes=5).double()
    a = torch.randn(2, 96, 9, 9, dtype=torch.float64) * 30
    nhwc = a.contiguous(memory_format=torch.channels_last)
    out = model.half_lrn(nhwc)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, _lrn_by_hand(a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.half_lrn(a), _lrn_by_hand(a), rtol=1e-12, atol=1e-12)
    x = torch.randn(2, 3, 224, 224, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last)), model(x), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------- recipes reach the run (issue: values by hand)

def _built(name: str, *flags: str):
    """What the trainer builds from a recipe name (and flags): recipe, model, optimizer."""
    from model import options
    cfg = options.config_from_args(["--shards", "unused", "--recipe", name, *flags])
    recipe = options.resolve_recipe(cfg)
    torch.manual_seed(0)
    model = AlexNet(cfg=recipe.model_config(1000))
    return recipe, model, make_optimizer(model, recipe)


def _weight_stds(model) -> dict:
    return {n: mod.weight.std().item() for n, mod in model.named_children() if hasattr(mod, "weight")}


@pytest.mark.parametrize("name, batch, lr, lrn_k, stds, bias, schedule, lighting, scale", [
    # paper, section 5 (batch 128, lr 0.01, momentum 0.9, wd 5e-4, lr / 10 at most three times), 3.3 (k = 2),
    # 4.1 (lighting); cuda-convnet2: biases at 2x lr without decay, lit batches x 1/1.1
    ("paper", 128, 0.01, 2.0, dict(conv1=0.01, conv2=0.01, conv3=0.03, conv4=0.03, conv5=0.03, fc6=0.01, fc7=0.01,
                                   fc8=0.01), 1.0, "plateau", True, 1 / 1.1),
    # bvlc_alexnet: batch 256, lr 0.01 / 10 every 100k iterations (20 epochs), LRN k = 1, fc6/fc7 N(0, 0.005)
    ("caffe", 256, 0.01, 1.0, dict(conv1=0.01, conv2=0.01, conv3=0.01, conv4=0.01, conv5=0.01, fc6=0.005, fc7=0.005,
                                   fc8=0.01), 0.1, "step", False, 1.0),
])
def test_every_recipe_value_reaches_the_run(name, batch, lr, lrn_k, stds, bias, schedule, lighting, scale):
    recipe, model, opt = _built(name)
    assert recipe.batch_size == batch and recipe.epochs == 90
    weights, biases = opt.param_groups
    assert (weights["lr"], weights["momentum"], weights["weight_decay"]) == (lr, 0.9, 5e-4)
    assert (biases["lr"], biases["weight_decay"]) == (2 * lr, 0.0)
    lrn = model.lrn
    assert (lrn.size, lrn.alpha, lrn.beta, lrn.k) == (5, 1e-4, 0.75, lrn_k)
    for layer, std in _weight_stds(model).items():
        assert std == pytest.approx(stds[layer], rel=0.05), layer
    for layer in ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8"):
        expected = bias if layer in ("conv2", "conv4", "conv5", "fc6", "fc7") else 0.0
        assert torch.all(getattr(model, layer).bias == expected), layer
    assert model.cfg.dropout == 0.5 and model.lrn_after == {"conv1", "conv2"}
    assert recipe.schedule == schedule and recipe.lighting is lighting and recipe.train_scale == scale
    assert recipe.input_norm == "mean"
    if schedule == "plateau":  # never improving: three divisions, then no more (section 5)
        assert learning_rate(recipe, 60.0, [0.5] * 60) == pytest.approx(lr / 1000, rel=1e-12)
        assert learning_rate(recipe, 3.0, [0.5, 0.5, 0.5]) == pytest.approx(lr / 10, rel=1e-12)
    else:
        assert learning_rate(recipe, 19.9, []) == lr and learning_rate(recipe, 20.0, []) == pytest.approx(lr / 10)


def test_the_authors_released_init():
    """--init cuda-convnet2 (layers-223-1gpu.cfg): initW 0.03 in conv3-5, 0.01 elsewhere; biases as the paper."""
    torch.manual_seed(1)
    model = AlexNet(cfg=AlexNetConfig(init="cuda-convnet2"))
    expected = dict(conv1=0.01, conv2=0.01, conv3=0.03, conv4=0.03, conv5=0.03, fc6=0.01, fc7=0.01, fc8=0.01)
    for layer, std in _weight_stds(model).items():
        n = getattr(model, layer).weight.numel()  # 34,848 weights in conv1: the std's sampling error ~0.4 %
        assert abs(std - expected[layer]) < 5 * expected[layer] / (2 * n) ** 0.5, layer
    for layer in expected:
        assert torch.all(getattr(model, layer).bias == (1.0 if layer in ("conv2", "conv4", "conv5", "fc6", "fc7")
                                                        else 0.0)), layer


@pytest.mark.parametrize("name, flags, lr", [
    ("paper", ["--batch-size", "256"], 0.02),      # cuda-convnet2's configs: 0.01 at 128, 0.02 at 256
    ("paper", ["--batch-size", "512"], 0.04),
    ("paper", ["--batch-size", "32"], 0.0025),
    ("caffe", ["--batch-size", "256"], 0.01),      # Caffe states its 0.01 at 256
    ("caffe", ["--batch-size", "128"], 0.005),
    ("paper", ["--batch-size", "256", "--lr", "0.03"], 0.03),  # --lr is taken as given
    ("paper", ["--lr", "0.03", "--lr-batch", "128", "--batch-size", "256"], 0.06),
])
def test_the_step_per_image_is_kept_across_batch_sizes(name, flags, lr):
    recipe, _, opt = _built(name, *flags)
    assert recipe.lr == pytest.approx(lr, rel=1e-12) and opt.param_groups[0]["lr"] == pytest.approx(lr, rel=1e-12)


def test_torchrun_ranks_do_not_change_the_lr(monkeypatch):
    """The batch is the global one: 2 ranks of 128 at --batch-size 256 take 0.02, as one process would."""
    from model import devices, options
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = options.config_from_args(["--shards", "unused", "--batch-size", "256"])
    assert devices.distributed()[1] == 2 and options.resolve_recipe(cfg).lr == pytest.approx(0.02)


def test_dead_fc7_units_are_counted_on_a_model_set_by_hand():
    """fc7 weights 0, biases -1 on the first 1,024 units and +1 on the rest: exactly 25 % dead."""
    from model.alexnet import fc7_dead_share
    from model.guards import stall_warning
    model = AlexNet(num_classes=10)
    with torch.no_grad():
        model.fc7.weight.zero_()
        model.fc7.bias.fill_(1.0)
        model.fc7.bias[:1024] = -1.0
    model.train()
    assert fc7_dead_share(model, torch.randn(4, 3, 224, 224)) == 0.25
    assert model.training  # the probe leaves the mode as it found it
    warning = stall_warning(2.30, 10, 2000, "paper", "paper", 0.25)
    assert "25.0 % of fc7's units are dead" in warning and "--init cuda-convnet2" in warning
    assert "documents" in stall_warning(2.30, 10, 2000, "paper", "paper", 0.9)


def test_momentum_restored_beside_channels_last_weights_is_channels_last():
    """A checkpoint whose buffers are NCHW (written on the CPU, by two halves, or a torch that saved them
    contiguous) resumed on one GPU, channels-last: the buffers came back NCHW beside channels-last weights,
    which takes SGD off its _foreach fast path for every later step. The values are the saved ones."""
    torch.manual_seed(4)
    cfg = AlexNetConfig(num_classes=6, width=0.125)
    written = AlexNet(cfg=cfg)  # NCHW, as on the CPU
    opt = torch.optim.SGD(written.parameters(), lr=0.01, momentum=0.9)
    F.cross_entropy(written(torch.randn(2, 3, 224, 224)), torch.tensor([0, 5])).backward()
    opt.step()
    state = optimizer_state(opt, written)
    model = AlexNet(cfg=cfg).to(memory_format=torch.channels_last)
    fresh = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    load_optimizer_state(fresh, model, state)
    for name, p in model.named_parameters():
        buf = fresh.state[p]["momentum_buffer"]
        assert buf.stride() == p.stride(), name
        assert torch.equal(buf, state["momentum"][name]), name
    assert model.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the case that mattered


def test_227_input_with_conv1_unpadded_keeps_every_shape():
    """The layer table's geometry by hand: (227 - 11) / 4 + 1 = 55 with padding 0, as (224 + 2*2 - 11) // 4 + 1
    = 55 with padding 2; every later map, and so every weight, is the same size."""
    small = AlexNet(cfg=AlexNetConfig(num_classes=10, input_size=227))
    assert small.conv1.padding == (0, 0) and small.conv1.stride == (4, 4) and small.conv1.kernel_size == (11, 11)
    assert AlexNet(cfg=AlexNetConfig(num_classes=10)).conv1.padding == (2, 2)
    with torch.no_grad():
        assert tuple(small.conv1(torch.zeros(1, 3, 227, 227)).shape) == (1, 96, 55, 55)
        assert tuple(small.features(torch.zeros(1, 3, 227, 227)).shape) == (1, 256, 6, 6)
        assert tuple(small(torch.zeros(2, 3, 227, 227)).shape) == (2, 10)
    shapes = {k: tuple(v.shape) for k, v in AlexNet(cfg=AlexNetConfig(num_classes=10)).state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in small.state_dict().items()}
    with pytest.raises(Exception, match="the images are 224x224, and this model takes 227x227 crops"):
        small(torch.zeros(1, 3, 224, 224))
    split = TwoDeviceAlexNet(AlexNetConfig(num_classes=10, input_size=227), ("cpu", "cpu"))
    with torch.no_grad():
        assert tuple(split(torch.zeros(1, 3, 227, 227)).shape) == (1, 10)
