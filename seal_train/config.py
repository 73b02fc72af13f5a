"""Training configuration: the TrainConfig dataclass, named presets, config files and their precedence."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

AMP_MODES = ("off", "bf16", "fp16")
# Keys of TrainConfig that a resumed run may change; every other key must match the saved run.
RESUMABLE_OVERRIDES = ("device", "eval_batch_size", "num_threads")


class ConfigError(ValueError):
    """An invalid option value, unknown option or unreadable config file."""


def _option(default: Any, help: str, **kwargs: Any) -> Any:
    """Declare a TrainConfig field with the help text its CLI flag shows."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """Every setting of a training run. Each field is also a `seal-train run` flag (underscores become dashes)."""

    preset: str = _option("demo", "Preset that supplies the defaults (see `seal-train presets`).")

    # Data.
    dataset: str = _option("fashion-mnist-subset", "Dataset name: fashion-mnist-subset, fashion-mnist, cifar10, cifar100, tiny-imagenet or imagefolder.")
    data_root: str | None = _option(None, "Folder with the dataset files (not needed for fashion-mnist-subset).")
    image_size: int | None = _option(None, "Resize imagefolder images to this square size in pixels.")
    val_fraction: float = _option(0.0, "Fraction of each training class held out for validation; 0 validates on the dataset's test split (Tiny-ImageNet: the official validation split).")
    train_examples: int | None = _option(None, "Train on a seeded random subset of this many training examples (for quick runs).")
    val_examples: int | None = _option(None, "Validate on a seeded random subset of this many validation examples.")

    # Model and parameter split.
    arch: str = _option("resnet-narrow", "Architecture name (see seal_train.models.MODELS) or torchvision:<name>.")
    arch_kwargs: dict = _option({}, "Extra keyword arguments of the architecture, as JSON, e.g. '{\"widths\": [8, 16, 32, 64]}'.")
    num_classes: int | None = _option(None, "Number of classes; must match the dataset (default: taken from the dataset).")
    threshold: str = _option("layer3", "First block of the late parameters; earlier parameters are early.")

    # Iterative training.
    strategy: str = _option("seal", "Strategy applied at each generation start (see `seal-train strategies`).")
    generations: int = _option(3, "Number of generations G.")
    epochs: int = _option(3, "Epochs per generation E.")
    warmup_epochs: int = _option(0, "Linear warm-up epochs W at the start of every generation.")
    ascent_epochs: int = _option(1, "Epochs K of the ascent phase at the start of generations >= 1 (ascent strategies).")
    ascent_scale: float = _option(-0.01, "Learning-rate scale S of the ascending parameters; negative means gradient ascent.")

    # Optimisation.
    lr: float = _option(0.1, "Peak learning rate of SGD.")
    momentum: float = _option(0.9, "SGD momentum.")
    weight_decay: float = _option(5e-4, "L2 weight decay of descending parameters (ascending parameters always get 0).")
    nesterov: bool = _option(False, "Use Nesterov momentum.")
    batch_size: int = _option(128, "Global batch size (split evenly over the processes of a distributed run).")
    eval_batch_size: int = _option(512, "Batch size for validation.")
    label_smoothing: float = _option(0.1, "Label smoothing of the training cross-entropy.")
    augment: bool = _option(True, "Random crop with zero padding and horizontal flip on training batches.")
    crop_padding: int = _option(2, "Padding in pixels of the random crop.")
    flip: bool = _option(True, "Random horizontal flip with p = 0.5 (when augment is on).")

    # Reproducibility and hardware.
    seed: int = _option(0, "Seed of the model init, data order, augmentation, validation split and LLF re-initialisation.")
    deterministic: bool = _option(True, "Use deterministic algorithms (bit-identical reruns on the same machine and thread count).")
    device: str = _option("auto", "Device: auto (CUDA when available), cpu, cuda or cuda:<index>.")
    num_threads: int | None = _option(None, "CPU threads of torch's intra-op pool (default: torch's choice, usually one per core).")
    amp: str = _option("off", "Mixed precision on CUDA: off, bf16 or fp16 (fp16 uses a gradient scaler).")
    channels_last: bool = _option(False, "Use the channels-last memory format (CUDA only).")
    sync_bn: bool = _option(False, "Convert BatchNorm to SyncBatchNorm in distributed CUDA runs.")

    # Output.
    out_dir: str = _option("checkpoints", "Folder that contains the run folders.")
    run_name: str | None = _option(None, "Name of the run folder under out_dir (default: the strategy name).")
    save_ascent_checkpoints: bool = _option(True, "Write gen{g}-ascent.pt at the end of each ascent phase.")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / (self.run_name or self.strategy)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    return list(dataclasses.fields(TrainConfig))


def field_types() -> dict[str, Any]:
    """Return the resolved type of each TrainConfig field."""
    return typing.get_type_hints(TrainConfig)


# ---------------------------------------------------------------- presets

TINY_IMAGENET_PAPER = {
    # Defaults of the SEAL authors' code for Tiny-ImageNet (Sarfi et al., CVPR 2023, arXiv 2304.04858).
    "dataset": "tiny-imagenet",
    "val_fraction": 0.0,
    "threshold": "layer3",
    "strategy": "seal",
    "generations": 10,
    "epochs": 160,
    "warmup_epochs": 20,
    "ascent_epochs": 40,
    "ascent_scale": -0.01,
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "nesterov": False,
    "batch_size": 32,
    "label_smoothing": 0.1,
    "augment": True,
    "crop_padding": 4,
    "flip": True,
    "num_classes": 200,
}

PRESETS: dict[str, dict[str, Any]] = {
    # The TrainConfig defaults: the narrow ResNet on the embedded Fashion-MNIST subset (10,000 training
    # and 2,000 test images), G=3 generations of E=3 epochs, so that a run takes minutes on a CPU.
    # With W=0 the per-generation lr is 0.1, 0.075, 0.025 (a one-epoch warm-up would start at the peak anyway).
    "demo": {},
    "tiny-imagenet-resnet18": {**TINY_IMAGENET_PAPER, "arch": "resnet18"},
    "tiny-imagenet-resnet50": {**TINY_IMAGENET_PAPER, "arch": "resnet50"},
}
PRESET_DESCRIPTIONS = {
    "demo": "narrow ResNet (0.3M parameters) on the embedded Fashion-MNIST subset; minutes on a CPU",
    "tiny-imagenet-resnet18": "the SEAL paper's Tiny-ImageNet settings with ResNet18",
    "tiny-imagenet-resnet50": "the SEAL paper's Tiny-ImageNet settings with ResNet50",
}


def preset_config(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], "preset": name})


# ---------------------------------------------------------------- values and files


def _allowed_types(annotation: Any) -> tuple[Any, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def coerce_value(name: str, value: Any) -> Any:
    """Check a value from a config file or a flag against the field type and convert ints to floats."""
    annotation = field_types().get(name)
    if annotation is None:
        raise ConfigError(f"unknown config key {name!r}; valid keys: {', '.join(f.name for f in config_fields())}")
    allowed = _allowed_types(annotation)
    if value is None and type(None) in allowed:
        return None
    if bool in allowed:
        if isinstance(value, bool):
            return value
    elif float in allowed and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif int in allowed and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif str in allowed and isinstance(value, str):
        return value
    elif dict in allowed and isinstance(value, dict):
        return dict(value)
    expected = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"config key {name!r} must be {expected}, got {value!r}")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a JSON or TOML config file into a dict of checked TrainConfig values."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; check the path")
    text = path.read_text(encoding="utf-8")

    if path.suffix == ".toml":
        if sys.version_info < (3, 11):
            raise ConfigError(f"reading TOML config {path} needs Python 3.11 or newer (tomllib); use a JSON file instead")
        import tomllib

        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as error:
            raise ConfigError(f"invalid TOML in {path}: {error}") from error
    elif path.suffix == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"invalid JSON in {path}: {error}") from error
    else:
        raise ConfigError(f"config file {path} must end in .json or .toml")

    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must contain a table of options, got {type(raw).__name__}")
    return {key: coerce_value(key, value) for key, value in raw.items()}


def resolve_config(
    *,
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Merge preset < config file < overrides (flags) into a validated TrainConfig.

    The preset is taken from the argument, else from the file's "preset" key, else "demo".
    """
    file_values = read_config_file(config_file) if config_file else {}
    overrides = {key: coerce_value(key, value) for key, value in (overrides or {}).items()}

    name = preset or overrides.get("preset") or file_values.get("preset") or "demo"
    merged = {**preset_config(name).to_dict(), **file_values, **overrides, "preset": name}

    config = TrainConfig(**merged)
    validate_config(config)
    return config


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a TrainConfig saved with a run (config.json or checkpoint meta)."""
    checked = {key: coerce_value(key, value) for key, value in values.items()}
    config = TrainConfig(**checked)
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    """Raise ConfigError for values that no run could use; names and registries are checked where they are used."""
    positive = ("generations", "epochs", "batch_size", "eval_batch_size")
    for name in positive:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be >= 1, got {getattr(config, name)}")

    if not 0 <= config.warmup_epochs < config.epochs:
        raise ConfigError(f"warmup_epochs must be in [0, epochs) = [0, {config.epochs}), got {config.warmup_epochs}")
    if not 0 <= config.ascent_epochs <= config.epochs:
        raise ConfigError(f"ascent_epochs must be in [0, epochs] = [0, {config.epochs}], got {config.ascent_epochs}")
    if not math.isfinite(config.lr) or config.lr <= 0:
        raise ConfigError(f"lr must be > 0, got {config.lr}")
    if not math.isfinite(config.ascent_scale):
        raise ConfigError(f"ascent_scale must be finite, got {config.ascent_scale}")
    if not 0 <= config.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {config.momentum}")
    if config.nesterov and config.momentum == 0:
        raise ConfigError("nesterov needs momentum > 0; set --momentum or drop --nesterov")
    if config.weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0 <= config.label_smoothing < 1:
        raise ConfigError(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if not 0 <= config.val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {config.val_fraction}")
    if config.crop_padding < 0:
        raise ConfigError(f"crop_padding must be >= 0, got {config.crop_padding}")
    for name in ("train_examples", "val_examples", "num_classes", "image_size", "num_threads"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1 or unset, got {value}")
    if config.amp not in AMP_MODES:
        raise ConfigError(f"amp must be one of {', '.join(AMP_MODES)}, got {config.amp!r}")
    if config.run_name is not None and (not config.run_name or Path(config.run_name).name != config.run_name):
        raise ConfigError(f"run_name must be a plain folder name without slashes, got {config.run_name!r}")


def changed_keys(saved: TrainConfig, requested: dict[str, Any]) -> list[str]:
    """Return the keys whose requested value differs from a saved run's config."""
    saved_values = saved.to_dict()
    return [key for key, value in requested.items() if saved_values.get(key) != coerce_value(key, value)]
