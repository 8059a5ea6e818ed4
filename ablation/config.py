"""The run configuration: one frozen dataclass whose field names are the sweep parameter names."""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ablation.errors import ConfigError, LenetError

# Valid values of every categorical setting; the error for a bad value lists these.
CHOICES: dict[str, tuple[str, ...]] = {
    "activation": ("sigmoid", "tanh", "scaled_tanh", "relu", "leaky_relu", "elu", "gelu", "silu"),
    "pooling": ("avg", "max"),
    "norm": ("none", "batch"),
    "init": (
        "default",
        "lecun_normal",
        "xavier_uniform",
        "xavier_normal",
        "kaiming_uniform",
        "kaiming_normal",
        "orthogonal",
    ),
    "optimizer": ("sgd", "momentum", "nesterov", "adam", "adamw", "rmsprop"),
    "schedule": ("constant", "step", "cosine", "onecycle"),
    "augment": ("none", "flip", "crop", "crop_flip"),
    "pad": ("reflect", "mean"),
    "data": ("auto", "cifar10", "folder", "synthetic"),
    "device": ("auto", "cpu", "cuda"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "arch": ("lenet5", "resnet8", "resnet20"),  # resnet*: teachers for distillation (CIFAR ResNets, He et al. 2016)
    "tta": ("none", "flip", "flip_crop"),
    "teacher_logits": ("online", "precomputed"),
    "teacher_precision": ("auto", "fp32", "bf16", "fp16"),
    "preset": (),  # filled from PRESETS below
}

# PyTorch's optimisers hold lr and weight decay as float32: a larger value is a crash, not a divergence.
FLOAT32_LIMIT = 1e38

# Numeric ranges as (low, high, high_inclusive); low is always inclusive.
RANGES: dict[str, tuple[float, float, bool]] = {
    "dropout": (0.0, 1.0, False),
    "lr": (1e-12, FLOAT32_LIMIT, False),
    "momentum": (0.0, 1.0, False),
    "weight_decay": (0.0, FLOAT32_LIMIT, False),
    "l1": (0.0, FLOAT32_LIMIT, False),
    "warmup_epochs": (0.0, float("inf"), False),
    "label_smoothing": (0.0, 1.0, False),
    "grad_clip": (0.0, FLOAT32_LIMIT, False),
    "batch_size": (1, float("inf"), False),
    "epochs": (1, float("inf"), False),
    "early_stopping": (0, float("inf"), False),
    "val_size": (1, float("inf"), False),  # every choice is made on validation data; the data set caps it
    "threads": (0, 1024, True),
    # Seeds seed torch and numpy generators; numpy's take 0 .. 2**32 - 1.
    "seed": (0, 2**32, False),
    "split_seed": (0, 2**32, False),
    "ema": (0.0, 1.0, False),
    "cutout": (0, 33, False),  # the box's side in pixels; 32 covers the whole image
    "mixup": (0.0, FLOAT32_LIMIT, False),
    "cutmix": (0.0, FLOAT32_LIMIT, False),
    "distill_weight": (0.0, 1.0, True),
    "distill_temperature": (0.01, 100.0, True),
}


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one training run; the defaults are the `modern` preset."""

    # Model: LeNet-5's shape is fixed (conv 6@5x5, pool, conv 16@5x5, pool, fc 120, fc 84, fc 10).
    arch: str = "lenet5"  # resnet8/resnet20: teacher networks (activation, norm, init apply; pooling does not)
    activation: str = "relu"
    pooling: str = "max"
    norm: str = "batch"  # batch norm after every conv and hidden fc layer
    dropout: float = 0.0  # probability, on the two hidden fc layers
    init: str = "kaiming_normal"
    # Optimisation.
    optimizer: str = "nesterov"
    lr: float = 0.1  # peak learning rate
    momentum: float = 0.9  # used by momentum and nesterov
    weight_decay: float = 5e-4  # on conv/fc weights only; coupled L2 except adamw (decoupled)
    l1: float = 0.0  # coefficient of sum(|w|) over conv/fc weights, added to the loss
    schedule: str = "onecycle"
    # schedule=step: epochs after which the lr drops x0.1, e.g. "81,122"; "" = 50% and 75% (as fractions of the
    # epochs, applied to the steps after any warm-up)
    milestones: str = ""
    warmup_epochs: float = 0.0  # linear warm-up from 0, in epochs (fractions allowed)
    label_smoothing: float = 0.1
    grad_clip: float = 0.0  # max global gradient L2 norm; 0 = off
    batch_size: int = 128
    epochs: int = 30
    early_stopping: int = 0  # patience in epochs on val loss; 0 = off
    ema: float = 0.0  # decay of an exponential moving average of the weights, evaluated and saved; 0 = off
    # Distillation: loss = (1 - w) * CE + w * T^2 * KL(teacher || student at temperature T); off without a teacher.
    teacher: str = ""  # path of a checkpoint (best.pt) trained on the same split; "" = no distillation
    distill_weight: float = 0.5  # w; 0 = no distillation
    distill_temperature: float = 4.0  # T
    # online: the teacher runs on every batch; precomputed: its logits of every crop/flip view of every training
    # image are computed once into a file next to it and looked up: 162 teacher passes over the training split,
    # as many as ~3 runs of 50 epochs online (a ResNet-8's: 54 min in fp32, 24 min in bf16 on 2 CPU threads)
    teacher_logits: str = "online"
    # The teacher's autocast, for its logits online or in the table; auto = the run's own `precision`. bf16 on a
    # CPU with AVX512-BF16 ran a ResNet-8's forward pass 2.2x faster than fp32 (scripts/teacher_precision.py).
    teacher_precision: str = "auto"
    # Data.
    augment: str = "crop_flip"  # crop = pad 4 px then random 32x32 crop
    pad: str = "reflect"  # the crop's (and TTA's) padding: mirror the image, or the training split's mean colour
    cutout: int = 0  # side (px) of a square zeroed at a random centre of every training image; 0 = off
    mixup: float = 0.0  # Beta(alpha, alpha) of per-image mixup with a random partner; 0 = off
    cutmix: float = 0.0  # Beta(alpha, alpha) of per-image cutmix; with mixup, each image takes one at random
    tta: str = "none"  # test-time augmentation of val and test: the weighted mean of the views' logits
    val_size: int = 5000  # images held out of the training set for validation
    split_seed: int = 0  # fixes which images are held out, independent of `seed`
    data: str = "auto"
    data_dir: str = ""  # empty: $LENET_DATA_DIR or ~/.cache/lenet
    # Run.
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    threads: int = 0  # CPU threads; 0 = the cores this process may use
    preset: str = "modern"  # the base the other settings override

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_value(f.name, getattr(self, f.name))
        if self.schedule == "onecycle" and self.warmup_epochs > 0:
            raise ConfigError("schedule=onecycle has its own warm-up (the first 25% of steps); set warmup_epochs=0")
        if self.norm == "batch" and self.batch_size < 2:
            raise ConfigError(
                f"batch_size={self.batch_size} with norm=batch: batch norm needs at least 2 images per batch; "
                "set batch_size >= 2 or norm=none"
            )
        if self.teacher_logits == "precomputed" and (self.cutout or self.mixup or self.cutmix):
            raise ConfigError(
                "teacher_logits=precomputed holds the crop/flip views only; with cutout, mixup or cutmix "
                "use teacher_logits=online"
            )
        self.step_drops()  # a bad milestones value fails here, not at the first optimiser step
        if self.preset == "best_teacher" and not self.distilling:
            raise ConfigError(
                "preset=best_teacher distils from a teacher: set teacher=PATH/best.pt and distill_weight > 0 "
                "(train a teacher with `lenet train arch=resnet20 label_smoothing=0 epochs=28 --out teachers`)"
            )
        if self.arch != "lenet5" and self.dropout > 0:
            raise ConfigError(f"dropout is on LeNet-5's hidden fc layers; arch={self.arch} has none, set dropout=0")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RunConfig:
        """Build a config: the preset named in `values` (default modern), then the other values."""
        values = dict(values)
        unknown = sorted((k for k in values if k not in FIELD_TYPES), key=str)
        if unknown:
            raise ConfigError(_unknown_message(unknown))
        preset = str(values.get("preset", "modern"))
        _check_value("preset", preset)
        merged = {**PRESETS[preset], **values, "preset": preset}
        return cls(**{k: coerce(k, v) for k, v in merged.items()})

    def to_dict(self) -> dict[str, Any]:
        """The plain dict that goes to W&B and into every checkpoint."""
        return dataclasses.asdict(self)

    @property
    def distilling(self) -> bool:
        """A teacher is named and weighted: distill_weight=0 is exactly no distillation (no teacher is loaded)."""
        return bool(self.teacher) and self.distill_weight > 0

    def step_drops(self) -> tuple[float, ...]:
        """Where schedule=step drops the lr x0.1, as fractions of training: `milestones` / epochs, or 50% and 75%."""
        if not self.milestones:
            return (0.5, 0.75)
        if self.schedule != "step":
            raise ConfigError(
                f"milestones={self.milestones!r} apply to schedule=step only; set schedule=step or milestones=''"
            )
        try:
            epochs = [int(m) for m in self.milestones.split(",")]
        except ValueError:
            epochs = []
        if not epochs or epochs != sorted(set(epochs)) or not 0 < epochs[0] <= epochs[-1] < self.epochs:
            example = ",".join(str(e) for e in sorted({max(1, self.epochs // 2), max(1, self.epochs * 3 // 4)}))
            raise ConfigError(
                f"milestones={self.milestones!r} is not valid with epochs={self.epochs}; give increasing whole epochs "
                f"between 1 and {self.epochs - 1} separated by commas (e.g. milestones={example}), or milestones='' "
                "for drops after 50% and 75% of the epochs"
            )
        return tuple(m / self.epochs for m in epochs)

    def second_round(self) -> list[str]:
        """The second-round settings this config turns on (fused packs, ablation/fused.py, implement none yet)."""
        on = [k for k, off in SECOND_ROUND_OFF.items() if getattr(self, k) != off]
        return [*on, "teacher"] if self.distilling else on


# The second round's settings other than distillation, at their "off" values.
SECOND_ROUND_OFF: dict[str, Any] = {
    "arch": "lenet5",
    "tta": "none",
    "ema": 0.0,
    "cutout": 0,
    "mixup": 0.0,
    "cutmix": 0.0,
}

FIELD_TYPES: dict[str, type] = {f.name: {"str": str, "int": int, "float": float}[f.type] for f in fields(RunConfig)}

# Settings of where and how a run runs, not of its recipe: no preset sets them (a teacher is a file, like data).
NOT_TECHNIQUES = (
    "data",
    "data_dir",
    "teacher",
    "teacher_logits",
    "teacher_precision",
    "device",
    "precision",
    "threads",
    "seed",
    "val_size",
    "split_seed",
    "preset",
)

# Presets set every technique explicitly, so a preset never silently inherits another's choice.
PRESETS: dict[str, dict[str, Any]] = {
    # The best recipe found within LeNet-5's shape (see docs/results.md for how it was chosen).
    "modern": {f.name: f.default for f in fields(RunConfig) if f.name not in NOT_TECHNIQUES},
    # Close to LeCun et al. 1998 within LeNet-5's shape: scaled tanh, average pooling, plain SGD,
    # LeCun's fan-in init, no augmentation or regularisation, a constant learning rate.
    "classic": {
        "activation": "scaled_tanh",
        "pooling": "avg",
        "norm": "none",
        "dropout": 0.0,
        "init": "lecun_normal",
        "optimizer": "sgd",
        "lr": 0.02,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "l1": 0.0,
        "schedule": "constant",
        "milestones": "",
        "warmup_epochs": 0.0,
        "label_smoothing": 0.0,
        "grad_clip": 0.0,
        "batch_size": 32,
        "epochs": 30,
        "early_stopping": 0,
        "augment": "none",
        "pad": "reflect",
        "arch": "lenet5",
        "ema": 0.0,
        "distill_weight": 0.5,
        "distill_temperature": 4.0,
        "cutout": 0,
        "mixup": 0.0,
        "cutmix": 0.0,
        "tta": "none",
    },
}

# The published anchor: BIGBALLON/cifar-10-cnn 1_Lecun_Network/LeNet_dp_da_wd_keras.py (76.23 % test on the official
# images): He-normal init (Keras's is truncated at 2 std; ours is not), no batch norm, SGD Nesterov 0.9, lr 0.05 ->
# 0.005 after epoch 81 -> 0.0005 after 122 of 200, batch 128, Keras L2 1e-4 on every kernel (= weight decay 2e-4 in
# PyTorch's convention), flip + up to 4 px shifts filled with the mean colour (Keras fill 0 after per-channel
# standardisation; Keras shifts by real-valued amounts, ours by whole pixels), no label smoothing. The original trains
# on all 50,000 training images and reports the test accuracy it watched while training; lenet trains on 45,000 and
# tests the best-validation epoch once.
PRESETS["bigballon"] = {
    **PRESETS["modern"],
    "norm": "none",
    "lr": 0.05,
    "weight_decay": 2e-4,
    "schedule": "step",
    "milestones": "81,122",
    "label_smoothing": 0.0,
    "epochs": 200,
    "pad": "mean",
}

# The techniques that separate classic from modern, in the order the path study adds them; each names
# the settings it changes. Path presets add them one at a time to classic; leave-one-out presets take
# one away from modern (restoring its classic settings).
TECHNIQUES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("relu", ("activation",)),
    ("maxpool", ("pooling",)),
    ("he_init", ("init",)),
    ("batchnorm", ("norm",)),
    ("nesterov", ("optimizer", "momentum")),
    ("onecycle", ("schedule", "lr", "batch_size")),  # the one-cycle schedule with its peak lr and batch
    ("augment", ("augment",)),
    ("weight_decay", ("weight_decay",)),
    ("label_smoothing", ("label_smoothing",)),
)


# Regularisers the modern recipe does not use; modern_plus_<name> adds one (the regularisation study).
EXTRAS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("l1", {"l1": 1e-5}),
    ("dropout", {"dropout": 0.2}),
    ("early_stopping", {"early_stopping": 5}),
)

# Second-round techniques the modern recipe does not use; modern_plus_<name> adds one (sweeps/techniques.yaml),
# at its reference's CIFAR-10 value: TTA as airbench94 (flip; flip + 1 px translations), an EMA horizon of
# ~1000 steps (~3 epochs at batch 128), cutout 16 px (DeVries & Taylor 2017), mixup alpha 1 (Zhang et al. 2018),
# cutmix alpha 1 (Yun et al. 2019).
ADDITIONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("tta_flip", {"tta": "flip"}),
    ("tta_flip_crop", {"tta": "flip_crop"}),
    ("ema", {"ema": 0.999}),
    ("cutout", {"cutout": 16}),
    ("mixup", {"mixup": 1.0}),
    ("cutmix", {"cutmix": 1.0}),
)

# The modern recipe with another optimiser at its conventional peak lr (modern itself is Nesterov, 0.1):
# modern_with_<optimizer> (the optimiser study without an lr grid; sweeps/optim.yaml has the grid).
# AdamW's decay is decoupled (weights shrink by lr * wd per step), so modern's 5e-4 would be ~no decay at
# lr 1e-3; it gets PyTorch's default 0.01 instead. Adam and RMSprop keep modern's coupled L2 5e-4.
OPTIMISERS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("sgd", {"lr": 0.1}),
    ("momentum", {"lr": 0.1}),
    ("adam", {"lr": 0.001}),
    ("adamw", {"lr": 0.001, "weight_decay": 0.01}),
    ("rmsprop", {"lr": 0.001}),
)


def _technique_presets() -> dict[str, dict[str, Any]]:
    """path<k>_<technique> (classic + the first k techniques), modern_no_<technique>, modern_plus_<extra or
    addition>, modern_with_<optimizer>."""
    classic, modern = PRESETS["classic"], PRESETS["modern"]
    presets, current = {}, dict(classic)
    for k, (name, keys) in enumerate(TECHNIQUES[:-1], start=1):  # the last step is `modern` itself
        current.update({key: modern[key] for key in keys})
        presets[f"path{k}_{name}"] = dict(current)
    for name, keys in TECHNIQUES:
        presets[f"modern_no_{name}"] = {**modern, **{key: classic[key] for key in keys}}
    for name, values in EXTRAS + ADDITIONS:
        presets[f"modern_plus_{name}"] = {**modern, **values}
    for name, values in OPTIMISERS:
        presets[f"modern_with_{name}"] = {**modern, "optimizer": name, **values}
    return presets


PRESETS.update(_technique_presets())

# The best recipe without a teacher found on validation by sweeps/techniques.yaml (50 epochs, 3 seeds): modern plus
# each second-round technique whose mean val effect was positive, at most one TTA mode and one mixing augmentation
# (the rule in docs/results/README.md, stated before the data): TTA flip + crop and a weight EMA.
PRESETS["best"] = {**PRESETS["modern"], "tta": "flip_crop", "ema": 0.999, "epochs": 50}
# `best` with a teacher: distill_weight 0.5 at temperature 2, keeping best's label smoothing 0.1: the val pick of the
# full grid, sweeps/distill.yaml, as the rule in docs/results/README.md says (its first stage,
# sweeps/distill_weight.yaml, had picked T = 4 without smoothing: sweeps/best_teacher.yaml's runs). Measured: 76.53 %
# test over 3 seeds against 76.18 % for T = 4 (docs/results/best_teacher_t2/).
# The teacher is a file on the user's machine, so the preset cannot name it: a run must set teacher=PATH.
PRESETS["best_teacher"] = {**PRESETS["best"], "distill_weight": 0.5, "distill_temperature": 2.0}

CHOICES["preset"] = tuple(PRESETS)


def _unknown_message(unknown: list[Any]) -> str:
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(str(key), FIELD_TYPES, n=1)
        hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return f"unknown run setting {', '.join(hints)}; valid settings: {', '.join(FIELD_TYPES)} (see `lenet params`)"


# Examples for error messages where a setting's default ("") shows nothing.
EXAMPLES = {"milestones": "81,122", "teacher": "teachers/resnet20/best.pt", "data_dir": "data/cifar10-jpg.tar.gz"}


def coerce(key: str, value: Any) -> Any:
    """Convert strings from the command line and numpy scalars from sweeps to the field's type."""
    kind = FIELD_TYPES[key]
    try:
        if value is None or isinstance(value, (list, dict)) or (kind is not str and isinstance(value, bool)):
            raise ValueError  # YAML's ~, [..], {..} and yes/true are never a setting's value
        if kind is str:
            return str(value)
        if kind is int:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            return int(number)
        return float(value)
    except (TypeError, ValueError):
        example = EXAMPLES.get(key, RunConfig.__dataclass_fields__[key].default)
        wanted = {str: "a single value", int: "a whole number", float: "a number"}[kind]
        raise ConfigError(
            f"{key}={value!r} is not a valid {kind.__name__}; give {wanted}, e.g. {key}={example}"
        ) from None


def _check_value(key: str, value: Any) -> None:
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(CHOICES[key])}")
    if key in RANGES:
        low, high, inclusive = RANGES[key]
        if not (low <= value < high or (inclusive and value == high)):
            upper = "finite" if high == float("inf") else f"<= {high}" if inclusive else f"< {high}"
            raise ConfigError(f"{key}={value!r} is out of range; it must be >= {low} and {upper}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """Turn `key=value` words (as W&B's ${args_no_hyphens} emits them, or --key=value) into a dict."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep or not key:
            raise ConfigError(f"cannot read {item!r}: write settings as key=value, e.g. lr=0.01")
        out[key] = value
    return out


def read_yaml(path: Path, what: str, error: type[LenetError]) -> Any:
    """Parse a YAML file; a missing, unreadable or binary file or a syntax error becomes `error` naming `what`."""
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise error(f"{what} {path} does not exist; check the path") from None
    except IsADirectoryError:
        raise error(f"{what} {path} is a folder; give the path of a YAML file") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path} is not a text file (not UTF-8); give a YAML file") from None
    except OSError as exc:
        raise error(f"cannot read {what} {path} ({exc.strerror or type(exc).__name__}); check the path") from None
    except yaml.YAMLError as exc:
        raise error(f"{what} {path} is not valid YAML ({' '.join(str(exc).split())}); fix its syntax") from None


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a flat YAML mapping of settings (W&B's `{value: x}` entries are unwrapped)."""
    data = read_yaml(path, "config file", ConfigError)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must be a mapping of setting: value, e.g. 'lr: 0.01'")
    odd = [k for k in data if not isinstance(k, str)]
    if odd:
        raise ConfigError(
            f"config file {path}: key {odd[0]!r} is not a setting name; write setting: value, e.g. 'lr: 0.01'"
        )
    return {
        k: (v["value"] if isinstance(v, dict) and "value" in v else v) for k, v in data.items() if not k.startswith("_")
    }


def describe() -> list[tuple[str, str, str, str]]:
    """(name, type, default, allowed values) of every setting, for `lenet params`."""
    rows = []
    for f in fields(RunConfig):
        allowed = ", ".join(CHOICES.get(f.name, ()))
        if f.name in RANGES:
            low, high, inc = RANGES[f.name]
            allowed = f">= {low}" + ("" if high == float("inf") else f", {'<=' if inc else '<'} {high}")
        rows.append((f.name, FIELD_TYPES[f.name].__name__, repr(f.default), allowed))
    return rows
