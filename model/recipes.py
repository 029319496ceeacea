"""Training recipes: every value that decides what a run learns, in one named place.

    python -m model.train --shards DIR                   # --recipe paper, the default
    python -m model.train --shards DIR --recipe caffe    # Caffe's bvlc_alexnet
    python -m model.train --shards DIR --lr 0.02         # any single flag overrides its recipe value

"paper" is the paper (Krizhevsky, Sutskever, Hinton 2012), with what it leaves open
resolved by its authors' released code (github.com/akrizhevsky/cuda-convnet2):
  - init: the released config's (layers/layers-223-1gpu.cfg: conv3-5 N(0, 0.03), the rest
    as section 5). The paper's printed N(0, 0.01) everywhere stays at chance at batch 128
    (most of fc7 dies in the first steps; README "Recipes"): --init paper;
  - lr: 0.01 at 128 images a step, kept per image at other batch sizes (resolve below);
  - input: 0-255 pixels minus the training mean, nothing divided (convdata.py);
  - lighting: N(0, 0.1^2) draws times the eigenvalues' square roots, then training
    batches times 1/(1 + 0.1) (convdata.py, add_color_noise);
  - biases: 2x the weights' learning rate (epsB = 2 epsW), no weight decay (wc is the
    weights'; layers/layer-params-223-ce2-1gpu.cfg, cudaconvnet/src/layer.cu);
  - LRN: alpha divided by the size n (layer.py, CrossMapResponseNormLayerParser).
"caffe" is BVLC/caffe models/bvlc_alexnet (solver.prototxt, train_val.prototxt).
The README's table lists each choice with its source.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

MAX_BATCH = 65536  # images per step: beyond any GPU's memory at 224 px (a typo, not a batch size)


def field_help(default, help: str):
    """A dataclass field with its help text (its unit and source), shown by `train --help`."""
    return field(default=default, metadata={"help": help})


_f = field_help


@dataclass(frozen=True)
class Recipe:
    # schedule and optimizer
    epochs: int = _f(90, "passes over the training set (section 5: 'roughly 90 cycles')")
    batch_size: int = _f(128, "images per step, over all ranks (section 5)")
    lr: float = _f(0.01, "initial learning rate of the weights at --lr-batch images per step (section 5); "
                         "without --lr, another --batch-size scales it to keep the step per image")
    lr_batch: int = _f(128, "the batch size --lr is stated for (cuda-convnet2: epsW 0.01 at 128, 0.02 at 256; "
                            "its update divides the gradient sum by the batch)")
    momentum: float = _f(0.9, "SGD momentum (section 5)")
    weight_decay: float = _f(5e-4, "L2 weight decay on the weights (section 5)")
    bias_lr_mult: float = _f(2.0, "biases' learning rate / the weights' (cuda-convnet2: epsB = 2 epsW)")
    bias_decay: bool = _f(False, "weight decay on the biases too (cuda-convnet2: no)")
    schedule: str = _f("plateau", "'plateau': lr / 10 when the val top-1 error stops improving (section 5); "
                                  "'step': lr / 10 every --step-epochs")
    plateau_patience: int = _f(2, "epochs without a new best val top-1 error before lr / 10 (the paper gives none)")
    max_lr_divisions: int = _f(3, "at most this many divisions by 10 (section 5: three)")
    step_epochs: int = _f(30, "'step' schedule: epochs between divisions by 10")
    warmup_epochs: float = _f(0.0, "linear ramp from lr/10 to lr over this many epochs (not in the paper)")
    # model
    init: str = _f("cuda-convnet2", "'cuda-convnet2': the authors' released config (layers-223-1gpu.cfg): the "
                                    "paper's init but conv3-5 N(0, 0.03), the default since it learns at batch 128 "
                                    "where 'paper' does not (README 'Recipes'); 'paper': N(0, 0.01), biases 1 in "
                                    "conv2,4,5, fc6,7 (section 5); 'caffe': bvlc_alexnet's (biases 0.1, fc6/fc7 "
                                    "N(0, 0.005)); 'kaiming': He-normal, biases 0")
    lrn_layers: str = _f("paper", "LRN after conv1, conv2 ('paper', section 3.3) or after all five convs ('all')")
    lrn_convention: str = _f("alpha/n", "'alpha/n': k + alpha/n * sum(a^2), as cuda-convnet2 (layer.py) and Caffe "
                                        "compute it; 'alpha': the paper's printed formula")
    lrn_k: float = _f(2.0, "LRN's additive constant k (section 3.3; Caffe's default is 1)")
    dropout: float = _f(0.5, "dropout probability in fc6 and fc7 (section 4.2)")
    extra_conv: bool = _f(False, "Table 2's sixth conv layer over the last pooling layer (section 6: 256 maps of "
                                 "3x3, each half on its own, fc6 unchanged; README 'Reproducing the paper')")
    width: float = _f(1.0, "every layer's maps and units times this (1 = the paper's; 1/8 for a quick "
                           "smoke run on a CPU, ~15x faster a step)")
    input_size: int = _f(224, "the crops' side in px: 224 (section 2's crops; conv1 padded by 2, as torchvision) "
                              "or 227 (conv1 unpadded, as Caffe's bvlc_alexnet and the layer table); conv1 gives "
                              "55x55 maps either way, so the weights' shapes are the same")
    # input
    input_norm: str = _f("mean", "the normalization mode (pipeline/normalization.py): 'mean': x - mean in 0-255 "
                                 "units (cuda-convnet2 convdata.py); 'std': (x/255 - mean) / std; 'none': raw 0-255")
    lighting: bool = _f(True, "PCA lighting, alpha ~ N(0, 0.1^2) times sqrt(eigenvalue) (section 4.1, convdata.py)")
    train_scale: float = _f(1 / 1.1, "lit training batches are multiplied by this (convdata.py: 1 / (1 + 0.1))")

    def model_config(self, num_classes: int):
        """The AlexNetConfig this recipe trains."""
        from model.alexnet import AlexNetConfig
        return AlexNetConfig(num_classes=num_classes, lrn_layers=self.lrn_layers, lrn_convention=self.lrn_convention,
                             lrn_k=self.lrn_k, dropout=self.dropout, init=self.init, extra_conv=self.extra_conv,
                             width=self.width, input_size=self.input_size)

    def validate(self) -> None:
        """ValueError naming the flag and what is wrong."""
        from model.alexnet import CONV1_PADDING, INITS
        from pipeline.normalization import MODES
        choices = {"schedule": ("plateau", "step"), "init": INITS,
                   "lrn_layers": ("paper", "all"), "lrn_convention": ("alpha/n", "alpha"),
                   "input_norm": MODES}
        for f in fields(self):  # NaN passes every comparison below, and inf trains nothing
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"--{flag(f.name)} must be a finite number, not {value}")
        if self.input_size not in CONV1_PADDING:  # the sizes conv1 has a padding for
            raise ValueError(f"--input-size must be 224 or 227, not {self.input_size}")
        if self.batch_size > MAX_BATCH:
            raise ValueError(f"--batch-size {self.batch_size}: more than {MAX_BATCH} images per step")
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{flag(name)} must be one of {', '.join(allowed)}, not {getattr(self, name)!r}")
        positive = ("epochs", "batch_size", "lr", "lr_batch", "step_epochs", "train_scale", "plateau_patience")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"--{flag(name)} must be > 0, not {getattr(self, name)}")
        if not 0 < self.width <= 1:
            raise ValueError(f"--width must be in (0, 1], not {self.width}")
        for name in ("momentum", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"--{flag(name)} must be in [0, 1), not {getattr(self, name)}")
        for name in ("weight_decay", "bias_lr_mult", "warmup_epochs", "max_lr_divisions", "lrn_k"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{flag(name)} must be >= 0, not {getattr(self, name)}")


def flag(name: str) -> str:
    return name.replace("_", "-")


RECIPES: dict[str, Recipe] = {
    "paper": Recipe(),
    # bvlc_alexnet: batch 256, lr 0.01 / 10 every 100k of 450k iterations: 20 and 90 epochs of ImageNet's
    # 1.28M images; no lighting; LRN with Caffe's default k = 1; 57.1 % / 80.2 % top-1 / top-5 accuracy.
    "caffe": replace(Recipe(), batch_size=256, lr_batch=256, schedule="step", step_epochs=20, init="caffe",
                     lrn_k=1.0, lighting=False, train_scale=1.0, input_size=227),  # crop_size 227, conv1 pad 0
    # The mission's layer table: 227x227x3 input, conv1 11x11 stride 4 'valid', and Local Response
    # Normalization listed after each of the five convolutions; everything else the paper recipe's.
    "layer-table": replace(Recipe(), input_size=227, lrn_layers="all"),
}

SOURCES = {
    "paper": ("Krizhevsky et al. 2012, resolved by cuda-convnet2 where the paper is silent",
              "paper: 40.7 % / 18.2 % top-1 / top-5 error, one model, 10 crops (ILSVRC-2012 val)"),
    "caffe": ("BVLC/caffe models/bvlc_alexnet (PR #327)",
              "57.1 % / 80.2 % top-1 / top-5 accuracy, centre crop (its readme)"),
    "layer-table": ("the layer table this project was started from: 227 input, conv1 'valid', LRN after conv1-5; "
                    "the paper recipe otherwise", "none published"),
}

RECIPE_FIELDS = tuple(f.name for f in fields(Recipe))


def resolve(name: str, overrides: dict) -> Recipe:
    """The recipe `name` with the given fields replaced (None = keep the recipe's value), its lr stated
    for the batch it runs at (lr_batch == batch_size):
      - without --lr, the recipe's step per image is kept: lr x batch_size / lr_batch (the authors' rule:
        cuda-convnet2 sums the batch's gradients and divides by the batch, and its configs raise epsW with
        the batch: 0.01 at 128, 0.02 at 256, 0.04 at 512);
      - --lr is taken as given, for --batch-size (or for --lr-batch, if that is given too).
    He init assumes unit-variance inputs: --init kaiming without --input-norm takes "std"
    (with 0-255 inputs its loss is non-finite within a few steps)."""
    if name not in RECIPES:
        raise KeyError(f"--recipe must be one of {', '.join(RECIPES)}, not {name!r}")
    given = {k: v for k, v in overrides.items() if v is not None}
    if given.get("init") == "kaiming" and "input_norm" not in given:
        given["input_norm"] = "std"
    recipe = replace(RECIPES[name], **given)
    if "lr" in given and "lr_batch" not in given:
        return replace(recipe, lr_batch=recipe.batch_size)
    if recipe.lr_batch <= 0:
        return recipe  # validate() names it
    return replace(recipe, lr=recipe.lr * recipe.batch_size / recipe.lr_batch, lr_batch=recipe.batch_size)


def lr_rule(name: str, overrides: dict) -> str:
    """How resolve() arrived at the lr, in words (printed at start, kept in config.json)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    stated = replace(RECIPES[name], **given) if name in RECIPES else Recipe()
    lr = resolve(name, overrides).lr
    if "lr" in given and "lr_batch" not in given:
        return f"lr {lr:g} as given by --lr, at batch {stated.batch_size}"
    source = "--lr/--lr-batch" if "lr" in given or "lr_batch" in given else f"recipe {name}"
    return (f"lr {lr:g} = {stated.lr:g} ({source}, at batch {stated.lr_batch}) x {stated.batch_size}/"
            f"{stated.lr_batch}: the same step per image at batch {stated.batch_size}")
