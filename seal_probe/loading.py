"""Load any image-classifier checkpoint for an audit: suite, raw or wrapped state dicts, safetensors, TorchScript."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import math
import pickle
import re
import sys
import zipfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from seal_train.checkpoint import FORMAT_VERSION, CheckpointError, is_suite_checkpoint
from seal_train.data import IMAGENET_MEAN, IMAGENET_STD, InputSpec
from seal_train.models import ModelError, available_architectures, build_model

log = logging.getLogger(__name__)

TRUST_FLAG = "--trust-checkpoint"
EMA_CHOICES = ("auto", "use", "ignore")

# Keys under which training code stores the weights. timm's load_state_dict looks for
# state_dict_ema, model_ema, state_dict and model; the others are common in research code.
PLAIN_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "network")
EMA_WRAPPER_KEYS = ("model_ema", "state_dict_ema", "ema_state_dict", "ema")

# DataParallel and DistributedDataParallel add "module." in front of every key.
DATA_PARALLEL_PREFIX = "module."
# torch.compile's OptimizedModule adds an "_orig_mod" component, which can sit at any depth
# when only a submodule was compiled.
COMPILE_COMPONENT = "_orig_mod"

# Architectures tried, in this order, for a state dict that comes without --arch. The first one
# whose keys and tensor shapes all equal the file's is taken. Each name is built with
# seal_train.models.build_model, so the seal_train names come first and win over torchvision's
# identical key layout.
DETECTABLE_ARCHITECTURES = (
    "resnet18",
    "resnet50",
    "torchvision:resnet34",
    "torchvision:resnet101",
    "torchvision:resnet152",
    "cifar-resnet18",
    "resnet-narrow",
)
# The SEAL authors' training code trains these ResNets on Tiny-ImageNet: 64x64 RGB inputs
# normalised with the ImageNet mean and std. A detected layout with no stated input gets these.
AUTHORS_INPUT_DEFAULTS = {
    "resnet18": (64, 64, IMAGENET_MEAN, IMAGENET_STD),
    "resnet50": (64, 64, IMAGENET_MEAN, IMAGENET_STD),
}

# Classifier and first-convolution weight names of torchvision and timm models, tried before
# guessing from the key order: ResNet/RegNet, DenseNet, MobileNet/EfficientNet, VGG, ViT, timm heads.
CLASSIFIER_KEYS = (
    "fc.weight", "classifier.weight", "classifier.1.weight", "classifier.3.weight",
    "classifier.6.weight", "heads.head.weight", "head.weight", "head.fc.weight",
)
FIRST_CONV_KEYS = (
    "conv1.weight", "features.0.weight", "features.0.0.weight", "features.conv0.weight",
    "conv_proj.weight", "patch_embed.proj.weight", "conv_stem.weight", "stem.conv.weight", "stem.0.weight",
)

MAX_LISTED_KEYS = 5
MAX_STAND_IN_ROUNDS = 64
SAFETENSORS_SUFFIX = ".safetensors"


class CheckpointLoadError(CheckpointError):
    """A checkpoint cannot be loaded as requested; the message names the value and the fix."""


class _PickledObjectError(CheckpointLoadError):
    """The weights sit inside a pickled Python object that only full unpickling can rebuild."""


# ---------------------------------------------------------------- results


@dataclass
class KeyMatch:
    """Result of comparing the checkpoint's tensors with the model's state dict."""

    loaded: int
    expected: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not (self.missing or self.unexpected or self.shape_mismatches)

    def summary(self) -> str:
        """Describe the mismatches in one line: the first few keys of each kind plus counts."""
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys ({_first_items(self.missing)})")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys ({_first_items(self.unexpected)})")
        if self.shape_mismatches:
            shown = [
                f"{item['key']}: checkpoint {tuple(item['checkpoint'])}, model {tuple(item['model'])}"
                for item in self.shape_mismatches
            ]
            parts.append(f"{len(self.shape_mismatches)} shape mismatches ({_first_items(shown)})")
        return "; ".join(parts) if parts else "all keys match"


@dataclass
class CheckpointSource:
    """Provenance of the weights: file format, wrapper key taken, and what the loader inferred or changed."""

    format: str
    wrapper_key: str | None = None
    ema: bool = False
    unused_keys: list[str] = field(default_factory=list)
    bookkeeping: dict[str, Any] = field(default_factory=dict)
    prefixes_stripped: list[str] = field(default_factory=list)
    stand_ins: list[str] = field(default_factory=list)
    other_weights: list[str] = field(default_factory=list)
    stored_dtypes: list[str] = field(default_factory=list)
    inferred: dict[str, dict[str, Any]] = field(default_factory=dict)
    key_match: KeyMatch | None = None
    partial: bool = False

    def infer(self, name: str, value: Any, reason: str) -> None:
        """Record a value the file did not state and the loader chose, and log it."""
        self.inferred[name] = {"value": value, "reason": reason}
        log.info("inferred %s = %s (%s)", name, value, reason)


@dataclass
class LoadedModel:
    """A model ready for an audit (eval mode) with everything known about its checkpoint."""

    model: nn.Module
    input_spec: InputSpec
    num_classes: int
    arch: str
    source: CheckpointSource
    meta: dict[str, Any]
    path: str
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        """Return the record of this load as plain JSON types (the model itself is left out)."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "arch": self.arch,
            "num_classes": self.num_classes,
            "input_spec": self.input_spec.to_dict(),
            "source": asdict(self.source),
            "meta": self.meta,
        }


@dataclass
class _Request:
    """The caller's options after validation; None means the file or a default decides."""

    arch: str | None
    num_classes: int | None
    in_channels: int | None
    input_size: tuple[int, int] | None
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    model_def: str | None
    trust_checkpoint: bool
    allow_partial: bool
    ema: str
    map_location: str | torch.device


def _first_items(items: Sequence[str]) -> str:
    shown = ", ".join(str(item) for item in items[:MAX_LISTED_KEYS])
    return shown + (", ..." if len(items) > MAX_LISTED_KEYS else "")


# ---------------------------------------------------------------- entry point


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    in_channels: int | None = None,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    model_def: str | None = None,
    trust_checkpoint: bool = False,
    allow_partial: bool = False,
    ema: str = "auto",
    map_location: str | torch.device | None = "cpu",
) -> LoadedModel:
    """Load a checkpoint of an image classifier for auditing and put the model in eval mode.

    Accepted files are this suite's checkpoints, whose model is rebuilt from their metadata, and
    torch.save files with a state dict, bare or under a wrapper key such as "state_dict",
    "model_state_dict" or an EMA key. Also accepted are .safetensors files and TorchScript
    archives, which are used as they are. A whole pickled nn.Module is loaded only with trust_checkpoint=True,
    because unpickling it runs code from the file. Everything else is read with
    torch.load(weights_only=True), even when trust_checkpoint is set. Pickled objects outside the weights, such as numpy scalars
    or an argparse.Namespace next to the state dict, are replaced by inert stand-ins and not
    unpickled.

    The architecture comes from, in order: model_def ("file.py:ClassName", imported from that
    file), arch (a seal_train registry name, "torchvision:<name>" or "timm:<name>"), the suite
    metadata, or the key layout of the torchvision ResNets. A detected resnet18 or resnet50
    layout is assumed to be the SEAL authors' Tiny-ImageNet setting (64x64 RGB inputs,
    ImageNet mean and std) unless input_size, mean or std say otherwise. num_classes and
    in_channels are read from the classifier and first convolution weights where possible, and
    given values must agree with them.

    Keys must match exactly unless allow_partial=True, which loads the matching tensors, logs a
    warning and marks the result as partial. ema chooses between EMA and plain weights when a
    file has both: "auto" takes the EMA weights, as timm's load_checkpoint does by default,
    "use" requires them and "ignore" takes the plain weights.

    Every failure raises CheckpointLoadError with one line naming the value and the fix. The
    file is only read, never written.
    """
    request = _validate_request(
        arch=arch, num_classes=num_classes, in_channels=in_channels, input_size=input_size,
        mean=mean, std=std, model_def=model_def, trust_checkpoint=trust_checkpoint,
        allow_partial=allow_partial, ema=ema, map_location=map_location,
    )
    path = _check_path(path)
    digest = file_sha256(path)

    payload, source = _read_checkpoint(path, request)

    if isinstance(payload, nn.Module):
        loaded = _adopt_module(payload, path, request, source)
    elif is_suite_checkpoint(payload):
        loaded = _load_suite_checkpoint(payload, path, request, source)
    else:
        loaded = _load_state_dict_checkpoint(payload, path, request, source)
    model, spec, classes, arch_name, meta = loaded

    model.eval()
    model.to(request.map_location)
    _check_forward(model, spec, num_classes=classes, path=path, device=request.map_location)

    log.info("loaded %s as %s (%d classes, input %s)", path, arch_name, classes, spec)
    return LoadedModel(
        model=model, input_spec=spec, num_classes=classes, arch=arch_name,
        source=source, meta=meta, path=str(path), sha256=digest,
    )


# ---------------------------------------------------------------- request validation


def _validate_request(**options: Any) -> _Request:
    """Check the caller's options before the file is read, so a typo fails fast."""
    if options["ema"] not in EMA_CHOICES:
        raise CheckpointLoadError(f"ema must be one of {', '.join(EMA_CHOICES)}, got {options['ema']!r}")

    if options["arch"] is not None and options["model_def"] is not None:
        raise CheckpointLoadError("give either --arch or --model-def, not both")

    for name in ("num_classes", "in_channels"):
        value = options[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise CheckpointLoadError(f"{name} must be a positive integer, got {value!r}")

    options["input_size"] = _parse_input_size(options["input_size"])
    if options["map_location"] is None:
        options["map_location"] = "cpu"

    for name in ("mean", "std"):
        if options[name] is not None:
            options[name] = tuple(float(v) for v in options[name])
            if not options[name]:
                raise CheckpointLoadError(f"--{name} needs one value per input channel, got none")
    if options["std"] is not None and any(not s > 0 for s in options["std"]):
        raise CheckpointLoadError(f"every --std value must be > 0, got {list(options['std'])}")

    return _Request(**options)


def _parse_input_size(value: int | Sequence[int] | None) -> tuple[int, int] | None:
    if value is None:
        return None
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(v, int) and v >= 1 for v in size):
        raise CheckpointLoadError(f"input size must be one positive integer or two (height, width), got {value!r}")
    return (int(size[0]), int(size[1]))


def _check_path(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointLoadError(f"checkpoint {path} not found; check the path")
    if not path.is_file():
        raise CheckpointLoadError(f"checkpoint {path} is not a file; pass the checkpoint file itself")
    return path


def file_sha256(path: str | Path) -> str:
    """Return the hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------- reading the file


def _read_checkpoint(path: Path, request: _Request) -> tuple[Any, CheckpointSource]:
    """Read the file with the reader its leading bytes call for; return the payload and its source."""
    kind = _sniff_format(path)

    if kind == "safetensors":
        return _read_safetensors(path, request), CheckpointSource(format="safetensors")

    if kind == "zip" and _is_torchscript_archive(path):
        return _read_torchscript(path, request), CheckpointSource(format="torchscript")

    payload, stand_ins = _read_torch_pickle(path, request)
    if isinstance(payload, nn.Module):
        source = CheckpointSource(format="pickled-module", stand_ins=stand_ins)
    elif is_suite_checkpoint(payload):
        source = CheckpointSource(format="seal-suite", stand_ins=stand_ins)
    else:
        source = CheckpointSource(format="torch-pickle", stand_ins=stand_ins)
    return payload, source


def _sniff_format(path: Path) -> str:
    """Classify a file as "zip" (torch.save or TorchScript), "pickle" (legacy torch.save) or "safetensors"."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    size = path.stat().st_size

    if not head:
        raise CheckpointLoadError(f"{path} is empty; the checkpoint was not written completely, so copy or save it again")

    if head.startswith(b"PK\x03\x04"):
        return "zip"

    # A legacy torch.save file starts with a pickle protocol opcode (0x80) and a magic number.
    if head[0] == 0x80:
        return "pickle"

    # A safetensors file starts with the length of its JSON header as a little-endian uint64.
    header_length = int.from_bytes(head[:8], "little") if len(head) >= 9 else 0
    if head[8:9] == b"{" and 0 < header_length <= size - 8:
        return "safetensors"
    if path.suffix == SAFETENSORS_SUFFIX:
        raise CheckpointLoadError(f"{path} is not a valid safetensors file (bad header); the file is truncated or corrupt")

    raise CheckpointLoadError(
        f"{path} is not a PyTorch checkpoint (it starts with {head[:8]!r}); "
        "pass a file written by torch.save, a .safetensors file or a TorchScript archive"
    )


def _is_torchscript_archive(path: Path) -> bool:
    """Tell a TorchScript archive from a torch.save zip: only TorchScript writes constants.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise CheckpointLoadError(f"{path} is a damaged zip archive ({error}); the file is truncated or corrupt, so copy or save it again") from error
    return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in names)


def _read_safetensors(path: Path, request: _Request) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = str(request.map_location)
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointLoadError(f"cannot read safetensors file {path}: {_first_line(error)}; the file is truncated or corrupt") from error


def _read_torchscript(path: Path, request: _Request) -> nn.Module:
    # NOTE: torch.jit.load runs no Python pickle code. The TorchScript program in the archive
    # can still call any registered operator when the model runs, and this loader does not vet it.
    try:
        return torch.jit.load(str(path), map_location=request.map_location)
    except RuntimeError as error:
        raise CheckpointLoadError(f"cannot read TorchScript archive {path}: {_first_line(error)}; the file is truncated or corrupt") from error


class _StandIn:
    """An inert object put in place of a pickled Python object that weights_only loading rejects.

    It stores the arguments and state it receives and runs no code from the file.
    """

    global_name = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "_StandIn":
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.global_name}, not unpickled>"


def _make_stand_in(global_name: str) -> tuple[type, str]:
    stand_in = type(f"StandIn[{global_name}]", (_StandIn,), {"global_name": global_name})
    return stand_in, global_name


_REJECTED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def _read_torch_pickle(path: Path, request: _Request) -> tuple[Any, list[str]]:
    """Unpickle a torch.save file with weights_only=True, replacing rejected globals by stand-ins.

    Rejected globals are found by a static scan of the pickle and, for those built on the fly,
    from torch's error message one at a time. When the weights themselves sit in a rejected
    object (a pickled model), the file is unpickled in full if trust_checkpoint is set and
    rejected otherwise.
    """
    stand_in_names = _static_unsafe_globals(path)
    for _ in range(MAX_STAND_IN_ROUNDS):
        try:
            payload = _torch_load_with_stand_ins(path, stand_in_names, request)
            break
        except pickle.UnpicklingError as error:
            rejected = _REJECTED_GLOBAL.search(str(error))
            if rejected is None or rejected.group(1) in stand_in_names or not _stand_ins_supported():
                return _load_trusted_or_reject(path, request, stand_in_names, error), []
            stand_in_names.append(rejected.group(1))
    else:
        return _load_trusted_or_reject(path, request, stand_in_names, None), []

    if stand_in_names:
        try:
            _select_weights(payload, path, request, CheckpointSource(format="torch-pickle"))
        except _PickledObjectError:
            if not request.trust_checkpoint:
                raise
            return _load_trusted(path, request), []
        except CheckpointLoadError:
            pass  # raised again, with the same message, when the weights are selected for real
        log.info("%s: left %s as inert stand-ins (objects beside the weights, not unpickled)", path, ", ".join(stand_in_names))
    return payload, stand_in_names


def _stand_ins_supported() -> bool:
    # torch.serialization.safe_globals and get_unsafe_globals_in_checkpoint appeared in torch 2.5.
    return hasattr(torch.serialization, "safe_globals") and hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint")


def _static_unsafe_globals(path: Path) -> list[str]:
    if not _stand_ins_supported():
        return []
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except (ValueError, RuntimeError, pickle.UnpicklingError, KeyError, EOFError):
        # Legacy (non-zip) files cannot be scanned, and damaged ones fail in torch.load next.
        return []


def _torch_load_with_stand_ins(path: Path, stand_in_names: list[str], request: _Request) -> Any:
    try:
        if not stand_in_names:
            return torch.load(path, map_location=request.map_location, weights_only=True)
        with torch.serialization.safe_globals([_make_stand_in(name) for name in stand_in_names]):
            return torch.load(path, map_location=request.map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise CheckpointLoadError(
            f"cannot read {path} as a PyTorch checkpoint: {_first_line(error)}; "
            "the file is truncated or corrupt, or was not written by torch.save"
        ) from error


def _load_trusted_or_reject(path: Path, request: _Request, names: list[str], error: Exception | None) -> Any:
    if request.trust_checkpoint:
        return _load_trusted(path, request)

    shown = ", ".join(names) if names else _first_line(error)
    raise CheckpointLoadError(
        f"{path} contains pickled Python objects ({shown}) that weights_only loading rejects; "
        f"if you trust the file's source, pass {TRUST_FLAG}"
    )


def _load_trusted(path: Path, request: _Request) -> Any:
    """Unpickle the whole file with weights_only=False, which runs code from it."""
    log.warning("%s: unpickling with weights_only=False because the checkpoint is trusted; this runs code from the file", path)
    try:
        return torch.load(path, map_location=request.map_location, weights_only=False)
    except (ModuleNotFoundError, AttributeError) as error:
        raise CheckpointLoadError(
            f"{path} needs Python code that is not importable here: {_first_line(error)}; "
            "put the module that defines the model on PYTHONPATH"
        ) from error
    except (RuntimeError, EOFError, pickle.UnpicklingError, OSError) as error:
        raise CheckpointLoadError(f"cannot unpickle {path}: {_first_line(error)}; the file is truncated or corrupt") from error


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip() if error is not None else ""
    return text.splitlines()[0] if text else type(error).__name__


# ---------------------------------------------------------------- finding the state dict


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, dict)
        and len(obj) > 0
        and all(isinstance(key, str) for key in obj)
        and all(isinstance(value, torch.Tensor) for value in obj.values())
    )


def _select_weights(payload: Any, path: Path, request: _Request, source: CheckpointSource) -> Any:
    """Walk down wrapper keys until a state dict or a module; record the path taken in source."""
    current = payload
    taken: list[str] = []

    while not _is_state_dict(current) and not isinstance(current, nn.Module):
        where = f" under {'.'.join(taken)!r}" if taken else ""
        if isinstance(current, _StandIn):
            raise _PickledObjectError(
                f"{path} stores the model{where} as a pickled {current.global_name} object that weights_only loading "
                f"rejects; if you trust the file's source, pass {TRUST_FLAG}"
            )
        if not isinstance(current, dict):
            raise CheckpointLoadError(
                f"{path} contains a {type(current).__name__}{where}, not a state dict or model; "
                "pass a checkpoint that contains the model's weights"
            )

        # Below an EMA key, plain wrapper keys such as "state_dict" lead to the EMA weights.
        key, use_ema, others = _choose_wrapper_key(current, path, "auto" if source.ema else request.ema, where)
        if not taken:
            _record_top_level(current, key, source)
        source.other_weights += [".".join([*taken, other]) for other in others]
        taken.append(key)
        source.ema = source.ema or use_ema
        current = current[key]

    source.wrapper_key = ".".join(taken) if taken else None
    return current


def _choose_wrapper_key(container: dict, path: Path, ema: str, where: str) -> tuple[str, bool, list[str]]:
    """Pick the wrapper key of one level according to the ema choice.

    Returns the key, whether it contains EMA weights, and the other wrapper keys of this level.
    """
    ema_keys = [key for key in EMA_WRAPPER_KEYS if _holds_weights(container.get(key))]
    plain_keys = [key for key in PLAIN_WRAPPER_KEYS if _holds_weights(container.get(key))]

    if ema == "use" and not ema_keys:
        raise CheckpointLoadError(
            f"{path} has no EMA weights{where} (looked for {', '.join(EMA_WRAPPER_KEYS)}); "
            "pass --ema ignore or auto to load the plain weights"
        )

    if ema in ("use", "auto") and ema_keys:
        return ema_keys[0], True, ema_keys[1:] + plain_keys

    if plain_keys:
        return plain_keys[0], False, plain_keys[1:] + ema_keys

    keys = [str(key) for key in container]
    raise CheckpointLoadError(
        f"no state dict found in {path}{where}: its keys are {_first_items(keys)}, none is a known wrapper key "
        f"({', '.join(PLAIN_WRAPPER_KEYS + EMA_WRAPPER_KEYS)}); save the model's state_dict() or pass a supported file"
    )


def _holds_weights(value: Any) -> bool:
    """Whether a wrapper key's value can contain weights: a non-empty dict, a model or a stand-in for one."""
    if isinstance(value, dict):
        return len(value) > 0
    return isinstance(value, (nn.Module, _StandIn))


def _record_top_level(container: dict, key: str, source: CheckpointSource) -> None:
    """Record the top-level keys left unused and their scalar values (epoch, best accuracy, ...)."""
    source.unused_keys = [str(name) for name in container if name != key]
    for name in source.unused_keys:
        value = container[name]
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (bool, int, float, str)) and not (isinstance(value, float) and not math.isfinite(value)):
            source.bookkeeping[name] = value


def strip_wrapper_prefixes(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove torch.compile's "_orig_mod" components and leading DataParallel "module." prefixes.

    "_orig_mod" is removed wherever it is a whole key component. "module." is removed only
    while every key starts with it, in any order and nesting with "_orig_mod". Returns the new
    state dict and the prefixes removed, in the order they were found.
    """
    stripped: list[str] = []
    keys = list(state_dict)

    if any(COMPILE_COMPONENT in key.split(".") for key in keys):
        keys = [".".join(part for part in key.split(".") if part != COMPILE_COMPONENT) for key in keys]
        stripped.append(COMPILE_COMPONENT + ".")

    while keys and all(key.startswith(DATA_PARALLEL_PREFIX) for key in keys):
        keys = [key[len(DATA_PARALLEL_PREFIX):] for key in keys]
        stripped.append(DATA_PARALLEL_PREFIX)

    if len(set(keys)) != len(keys):
        # Two keys became one, so the components were real module names: keep the original.
        return dict(state_dict), []
    return dict(zip(keys, state_dict.values())), stripped


def _check_finite(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """Raise on the first floating-point tensor that contains NaN or inf."""
    for name, tensor in tensors.items():
        if not (tensor.is_floating_point() or tensor.is_complex()):
            continue
        bad = ~torch.isfinite(tensor)
        if bool(bad.any()):
            kind = "NaN" if bool(torch.isnan(tensor).any()) else "inf"
            raise CheckpointLoadError(
                f"{path}: tensor {name!r} contains {kind} ({int(bad.sum())} of {tensor.numel()} values are not finite); "
                "the run diverged or the file is corrupt, so audit an earlier checkpoint"
            )


def _stored_dtypes(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({str(tensor.dtype).removeprefix("torch.") for tensor in tensors.values()})


# ---------------------------------------------------------------- shape hints


@dataclass(frozen=True)
class _ShapeHints:
    """num_classes and in_channels as the weight shapes state them, with the keys they came from."""

    classifier_key: str | None = None
    num_classes: int | None = None
    first_conv_key: str | None = None
    in_channels: int | None = None


def _shape_hints(state_dict: dict[str, torch.Tensor], *, ordered: bool = True) -> _ShapeHints:
    """Read in_channels from the first convolution weight and num_classes from the classifier weight.

    Conventional names (CLASSIFIER_KEYS, FIRST_CONV_KEYS) are tried first. Otherwise, when the
    keys are in module order (ordered=True; safetensors files sort them), the first 4-D weight
    is the first convolution, and the last weight of 2 or more dimensions is the classifier if
    it is 2-D (a Linear layer). A hint that cannot be read this way is None.
    """
    weights = [(key, tensor) for key, tensor in state_dict.items() if key.split(".")[-1] == "weight" and tensor.dim() >= 2]

    classifier = next(((key, state_dict[key]) for key in CLASSIFIER_KEYS if key in state_dict and state_dict[key].dim() == 2), None)
    if classifier is None and ordered and weights and weights[-1][1].dim() == 2:
        classifier = weights[-1]

    first_conv = next(((key, state_dict[key]) for key in FIRST_CONV_KEYS if key in state_dict and state_dict[key].dim() == 4), None)
    if first_conv is None and ordered:
        first_conv = next(((key, tensor) for key, tensor in weights if tensor.dim() == 4), None)

    hints = _ShapeHints()
    if classifier is not None:
        hints = replace(hints, classifier_key=classifier[0], num_classes=int(classifier[1].shape[0]))
    if first_conv is not None:
        hints = replace(hints, first_conv_key=first_conv[0], in_channels=int(first_conv[1].shape[1]))
    return hints


def _resolve_counts(hints: _ShapeHints, request: _Request, path: Path, source: CheckpointSource) -> tuple[int | None, int | None]:
    """Check given num_classes and in_channels against the weight shapes; fill in what was not given."""
    num_classes, in_channels = request.num_classes, request.in_channels

    if hints.num_classes is not None:
        if num_classes is None:
            num_classes = hints.num_classes
            source.infer("num_classes", num_classes, f"rows of {hints.classifier_key}")
        elif num_classes != hints.num_classes:
            raise CheckpointLoadError(
                f"num_classes={num_classes} does not match {path}: its classifier {hints.classifier_key} has "
                f"{hints.num_classes} outputs; pass --num-classes {hints.num_classes} or omit it"
            )

    if hints.in_channels is not None:
        if in_channels is None:
            in_channels = hints.in_channels
            source.infer("in_channels", in_channels, f"input channels of {hints.first_conv_key}")
        elif in_channels != hints.in_channels:
            raise CheckpointLoadError(
                f"in_channels={in_channels} does not match {path}: its first convolution {hints.first_conv_key} takes "
                f"{hints.in_channels} input channels; pass --in-channels {hints.in_channels} or omit it"
            )
    return num_classes, in_channels


# ---------------------------------------------------------------- building the model


def _load_suite_checkpoint(payload: dict, path: Path, request: _Request, source: CheckpointSource) -> tuple:
    """Rebuild a seal-suite model from its metadata; given options must agree with the metadata."""
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointLoadError(
            f"{path} has seal-suite format version {payload['format_version']}, this release reads up to {FORMAT_VERSION}; upgrade seal-suite"
        )
    if request.model_def is not None:
        raise CheckpointLoadError(f"{path} is a seal-suite checkpoint that names its architecture; omit --model-def")

    meta = payload["meta"]
    spec = InputSpec.from_dict(meta["input_spec"])
    recorded = {
        "arch": meta["arch"], "num_classes": int(meta["num_classes"]), "in_channels": spec.channels,
        "input_size": (spec.height, spec.width), "mean": spec.mean, "std": spec.std,
    }
    for name, value in recorded.items():
        given = getattr(request, name)
        if given is not None and given != value:
            raise CheckpointLoadError(
                f"{name}={given} does not match the value {value} recorded in seal-suite checkpoint {path}; omit --{name.replace('_', '-')}"
            )

    state_dict = payload["model_state_dict"]
    source.wrapper_key = "model_state_dict"
    source.unused_keys = [key for key in payload if key not in ("model_state_dict", "meta")]
    source.stored_dtypes = _stored_dtypes(state_dict)
    _check_finite(state_dict, path)

    try:
        model = build_model(meta["arch"], num_classes=int(meta["num_classes"]), in_channels=spec.channels, **meta.get("arch_kwargs", {}))
    except (ModelError, TypeError) as error:
        raise CheckpointLoadError(f"cannot rebuild {meta['arch']!r} from the metadata of {path}: {_first_line(error)}") from error

    source.key_match = _load_weights(model, state_dict, path=path, arch=meta["arch"], request=request, source=source)
    return model, spec, int(meta["num_classes"]), meta["arch"], dict(meta)


def _load_state_dict_checkpoint(payload: Any, path: Path, request: _Request, source: CheckpointSource) -> tuple:
    """Load a (possibly wrapped) state dict into the architecture given, imported or detected."""
    weights = _select_weights(payload, path, request, source)
    _log_selection(path, source)
    if isinstance(weights, nn.Module):
        source.format = "pickled-module"
        return _adopt_module(weights, path, request, source)

    state_dict, source.prefixes_stripped = strip_wrapper_prefixes(weights)
    if source.prefixes_stripped:
        log.info("%s: removed key prefixes %s", path, " and ".join(repr(p) for p in source.prefixes_stripped))
    source.stored_dtypes = _stored_dtypes(state_dict)
    _check_finite(state_dict, path)

    hints = _shape_hints(state_dict, ordered=source.format != "safetensors")
    num_classes, in_channels = _resolve_counts(hints, request, path, source)

    model, arch_name, defaults = _build_architecture(state_dict, path, request, source, num_classes=num_classes, in_channels=in_channels)
    state_dict = _keep_prefixes_if_model_has_them(weights, state_dict, model, source)
    num_classes = _model_num_classes(model, num_classes)
    in_channels = in_channels if in_channels is not None else _model_in_channels(model)
    spec = _resolve_input_spec(request, path, source, in_channels=in_channels, defaults=defaults)

    source.key_match = _load_weights(model, state_dict, path=path, arch=arch_name, request=request, source=source)
    return model, spec, num_classes, arch_name, {}


def _log_selection(path: Path, source: CheckpointSource) -> None:
    if source.wrapper_key is None:
        return
    log.info("%s: took the weights under %r%s", path, source.wrapper_key, " (EMA)" if source.ema else "")
    if source.other_weights:
        log.info("%s also contains weights under %s, not used; --ema chooses between EMA and plain weights",
                 path, ", ".join(map(repr, source.other_weights)))


def _keep_prefixes_if_model_has_them(
    original: dict[str, torch.Tensor], stripped: dict[str, torch.Tensor], model: nn.Module, source: CheckpointSource
) -> dict[str, torch.Tensor]:
    """Undo the prefix stripping when the model's own keys match the original keys better.

    A model with a child module named "module" has keys that start with "module." itself.
    """
    if not source.prefixes_stripped:
        return stripped
    model_keys = set(model.state_dict())
    if len(model_keys & set(original)) > len(model_keys & set(stripped)):
        source.prefixes_stripped = []
        return dict(original)
    return stripped


def _build_architecture(
    state_dict: dict[str, torch.Tensor],
    path: Path,
    request: _Request,
    source: CheckpointSource,
    *,
    num_classes: int | None,
    in_channels: int | None,
) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build the model to load into; return it, its description and input defaults it implies."""
    if request.model_def is not None:
        model = _build_from_model_def(request.model_def, num_classes=num_classes, in_channels=in_channels)
        return model, f"model_def:{request.model_def}", {}

    if request.arch is not None:
        return _build_named(request.arch, num_classes=num_classes, in_channels=in_channels, path=path)

    if num_classes is None or in_channels is None:
        raise CheckpointLoadError(
            f"cannot determine the architecture of {path} from its keys ({_first_items(list(state_dict))}); "
            "pass --arch NAME or --model-def FILE.py:CLASS"
        )
    arch = detect_architecture(state_dict, num_classes=num_classes, in_channels=in_channels)
    if arch is None:
        raise CheckpointLoadError(
            f"cannot determine the architecture of {path}: its keys ({_first_items(list(state_dict))}) match none of "
            f"{', '.join(DETECTABLE_ARCHITECTURES)}; pass --arch NAME (one of {', '.join(available_architectures())}, timm:<name>) "
            "or --model-def FILE.py:CLASS"
        )
    source.infer("arch", arch, "key names and tensor shapes match this architecture exactly")

    defaults: dict[str, Any] = {}
    if arch in AUTHORS_INPUT_DEFAULTS and in_channels == 3:
        height, width, mean, std = AUTHORS_INPUT_DEFAULTS[arch]
        defaults = {
            "input_size": (height, width), "mean": mean, "std": std,
            "reason": "the SEAL authors' Tiny-ImageNet setting for this ResNet layout",
        }
    return build_model(arch, num_classes=num_classes, in_channels=in_channels), arch, defaults


def detect_architecture(state_dict: dict[str, torch.Tensor], *, num_classes: int, in_channels: int) -> str | None:
    """Return the first of DETECTABLE_ARCHITECTURES whose state dict has exactly these keys and shapes.

    Candidates are built on the meta device, so nothing is allocated or initialised.
    A missing BatchNorm num_batches_tracked counter in the file is tolerated, as torch's
    load_state_dict tolerates it.
    """
    if "conv1.weight" not in state_dict or "layer1.0.conv1.weight" not in state_dict:
        return None
    wanted = {key: tuple(tensor.shape) for key, tensor in state_dict.items()}

    for arch in DETECTABLE_ARCHITECTURES:
        with torch.device("meta"):
            candidate = build_model(arch, num_classes=num_classes, in_channels=in_channels)
        shapes = {key: tuple(tensor.shape) for key, tensor in candidate.state_dict().items()}
        required = {key: shape for key, shape in shapes.items() if not key.endswith("num_batches_tracked")}
        if all(wanted.get(key) == shape for key, shape in required.items()) and set(wanted) <= set(shapes):
            return arch
    return None


def _build_named(arch: str, *, num_classes: int | None, in_channels: int | None, path: Path) -> tuple[nn.Module, str, dict[str, Any]]:
    """Build a registry, torchvision or timm architecture by name."""
    if num_classes is None:
        raise CheckpointLoadError(f"the class count of {path} cannot be read from its weights; pass --num-classes")

    if arch.startswith("timm:"):
        return _build_timm(arch, num_classes=num_classes, in_channels=in_channels if in_channels is not None else 3)

    try:
        model = build_model(arch, num_classes=num_classes, in_channels=in_channels if in_channels is not None else 3)
    except ModelError as error:
        raise CheckpointLoadError(f"{_first_line(error)} (from --arch)") from error
    except TypeError as error:
        raise CheckpointLoadError(f"cannot build --arch {arch!r} with {num_classes} classes: {_first_line(error)}") from error
    return model, arch, {}


def _build_timm(arch: str, *, num_classes: int, in_channels: int) -> tuple[nn.Module, str, dict[str, Any]]:
    # NOTE: only the error for a missing timm is tested here; timm is not a dependency of the suite.
    name = arch[len("timm:"):]
    try:
        import timm
    except ImportError as error:
        raise CheckpointLoadError(f"--arch {arch} needs the timm package, which is not installed; pip install timm") from error

    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels)
    except RuntimeError as error:
        raise CheckpointLoadError(f"unknown timm model {name!r}: {_first_line(error)}; see timm.list_models()") from error

    config = getattr(model, "pretrained_cfg", None) or {}
    defaults: dict[str, Any] = {}
    if "input_size" in config and "mean" in config and "std" in config:
        defaults = {
            "input_size": tuple(config["input_size"][-2:]), "mean": tuple(config["mean"]), "std": tuple(config["std"]),
            "reason": f"timm's pretrained_cfg for {name}",
        }
    return model, arch, defaults


def _build_from_model_def(spec: str, *, num_classes: int | None, in_channels: int | None) -> nn.Module:
    """Import ClassName from FILE.py and instantiate it, passing num_classes and in_channels if it takes them.

    This runs the code in FILE.py, which the caller named.
    """
    model_class = _import_model_class(spec)

    try:
        parameters = inspect.signature(model_class).parameters
    except (TypeError, ValueError):
        parameters = {}
    kwargs: dict[str, Any] = {}
    if "num_classes" in parameters and num_classes is not None:
        kwargs["num_classes"] = num_classes
    if "in_channels" in parameters and in_channels is not None:
        kwargs["in_channels"] = in_channels
    required = [
        name for name, parameter in parameters.items()
        if parameter.default is inspect.Parameter.empty
        and parameter.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and name not in kwargs
    ]
    if required:
        raise CheckpointLoadError(
            f"cannot instantiate {spec}: its constructor requires {', '.join(required)}; give those arguments defaults"
        )

    try:
        return model_class(**kwargs)
    except Exception as error:  # the user's constructor can raise anything
        raise CheckpointLoadError(f"instantiating {spec} failed: {type(error).__name__}: {_first_line(error)}") from error


def _import_model_class(spec: str) -> type[nn.Module]:
    file_part, separator, class_name = spec.rpartition(":")
    if not separator or not file_part or not class_name:
        raise CheckpointLoadError(f"--model-def must be FILE.py:ClassName, got {spec!r}")
    file_path = Path(file_part)
    if not file_path.is_file():
        raise CheckpointLoadError(f"model definition file {file_path} not found; check the path in --model-def")

    digest = hashlib.sha256(str(file_path.resolve()).encode()).hexdigest()[:12]
    module_name = f"seal_probe_model_def_{digest}"
    module_spec = importlib.util.spec_from_file_location(module_name, file_path)
    if module_spec is None or module_spec.loader is None:
        raise CheckpointLoadError(f"cannot import {file_path} as Python source; --model-def needs a .py file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:  # the user's module can raise anything while it is imported
        del sys.modules[module_name]
        raise CheckpointLoadError(f"importing {file_path} failed: {type(error).__name__}: {_first_line(error)}") from error

    model_class = getattr(module, class_name, None)
    if not (isinstance(model_class, type) and issubclass(model_class, nn.Module)):
        available = sorted(name for name, value in vars(module).items() if isinstance(value, type) and issubclass(value, nn.Module) and value.__module__ == module_name)
        raise CheckpointLoadError(
            f"{file_path} defines no nn.Module subclass {class_name!r}; classes found: {', '.join(available) or 'none'}"
        )
    return model_class


def _model_num_classes(model: nn.Module, num_classes: int | None) -> int:
    if num_classes is not None:
        return num_classes
    hints = _shape_hints(model.state_dict())
    if hints.num_classes is None:
        raise CheckpointLoadError(f"cannot determine the class count of {type(model).__name__}; pass --num-classes")
    return hints.num_classes


def _model_in_channels(model: nn.Module) -> int:
    hints = _shape_hints(model.state_dict())
    if hints.in_channels is None:
        raise CheckpointLoadError(f"cannot determine the input channels of {type(model).__name__}; pass --in-channels")
    return hints.in_channels


def _resolve_input_spec(request: _Request, path: Path, source: CheckpointSource, *, in_channels: int, defaults: dict[str, Any]) -> InputSpec:
    """Combine given input options with the defaults of the architecture; raise if any stays unknown."""
    values: dict[str, Any] = {"input_size": request.input_size, "mean": request.mean, "std": request.std}
    for name in values:
        if values[name] is None and name in defaults:
            values[name] = defaults[name]
            source.infer(name, list(defaults[name]), defaults["reason"])

    unknown = [f"--{name.replace('_', '-')}" for name, value in values.items() if value is None]
    if unknown:
        raise CheckpointLoadError(f"{path} does not record the model's input; pass {', '.join(unknown)}")

    mean, std = tuple(values["mean"]), tuple(values["std"])
    for name, stats in (("mean", mean), ("std", std)):
        if len(stats) != in_channels:
            raise CheckpointLoadError(f"--{name} has {len(stats)} values but the model has {in_channels} input channels; give one value per channel")
    height, width = values["input_size"]
    return InputSpec(in_channels, int(height), int(width), mean, std)


def _adopt_module(module: nn.Module, path: Path, request: _Request, source: CheckpointSource) -> tuple:
    """Use a TorchScript or trusted pickled model as it is; options may only state or confirm its input."""
    if request.arch is not None or request.model_def is not None:
        raise CheckpointLoadError(f"{path} contains a whole model ({source.format}), so --arch and --model-def do not apply; omit them")

    for wrapper in (nn.DataParallel, nn.parallel.DistributedDataParallel):
        if isinstance(module, wrapper):
            module = module.module
            source.prefixes_stripped.append(DATA_PARALLEL_PREFIX)
    if hasattr(module, COMPILE_COMPONENT) and isinstance(getattr(module, COMPILE_COMPONENT), nn.Module):
        module = getattr(module, COMPILE_COMPONENT)
        source.prefixes_stripped.append(COMPILE_COMPONENT + ".")

    state = module.state_dict()
    source.stored_dtypes = _stored_dtypes(state)
    _check_finite(state, path)

    hints = _shape_hints(state)
    num_classes, in_channels = _resolve_counts(hints, request, path, source)
    if in_channels is None:
        raise CheckpointLoadError(f"cannot determine the input channels of the model in {path}; pass --in-channels")
    spec = _resolve_input_spec(request, path, source, in_channels=in_channels, defaults={})

    classes = num_classes if num_classes is not None else _forward_classes(module, spec, path=path, device=request.map_location)
    if num_classes is None:
        source.infer("num_classes", classes, "width of the model's output")
    description = "torchscript" if isinstance(module, torch.jit.ScriptModule) else f"pickled:{type(module).__module__}.{type(module).__qualname__}"
    return module, spec, classes, description, {}


# ---------------------------------------------------------------- loading weights


def _match_keys(model_state: dict[str, torch.Tensor], checkpoint: dict[str, torch.Tensor]) -> KeyMatch:
    """Compare keys and shapes; a missing num_batches_tracked counter is not counted as missing."""
    missing = [key for key in model_state if key not in checkpoint and not key.endswith("num_batches_tracked")]
    unexpected = [key for key in checkpoint if key not in model_state]
    mismatches = [
        {"key": key, "checkpoint": list(checkpoint[key].shape), "model": list(tensor.shape)}
        for key, tensor in model_state.items()
        if key in checkpoint and checkpoint[key].shape != tensor.shape
    ]
    loaded = sum(1 for key, tensor in model_state.items() if key in checkpoint and checkpoint[key].shape == tensor.shape)
    return KeyMatch(loaded=loaded, expected=len(model_state), missing=missing, unexpected=unexpected, shape_mismatches=mismatches)


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], *, path: Path, arch: str, request: _Request, source: CheckpointSource) -> KeyMatch:
    """Copy matching tensors into model; strict unless allow_partial, in which case warn loudly."""
    match = _match_keys(model.state_dict(), state_dict)

    if not match.complete and not request.allow_partial:
        raise CheckpointLoadError(
            f"{path} does not match architecture {arch}: {match.summary()}; "
            "pass the right --arch (or --model-def), or --allow-partial to load only the matching tensors"
        )

    if not match.complete:
        source.partial = True
        log.warning(
            "PARTIAL LOAD of %s into %s: %d of %d model tensors loaded, %d missing, %d unexpected, %d shape mismatches (%s)",
            path, arch, match.loaded, match.expected, len(match.missing), len(match.unexpected),
            len(match.shape_mismatches), match.summary(),
        )

    model_state = model.state_dict()
    usable = {key: tensor for key, tensor in state_dict.items() if key in model_state and model_state[key].shape == tensor.shape}
    model.load_state_dict(usable, strict=False)
    return match


def _check_forward(model: nn.Module, spec: InputSpec, *, num_classes: int, path: Path, device: str | torch.device) -> None:
    """Run one zero image through the model and check that it returns num_classes logits."""
    outputs = _forward_classes(model, spec, path=path, device=device)
    if outputs != num_classes:
        raise CheckpointLoadError(
            f"the model from {path} returns {outputs} outputs per image but num_classes is {num_classes}; pass --num-classes {outputs}"
        )


def _forward_classes(model: nn.Module, spec: InputSpec, *, path: Path, device: str | torch.device) -> int:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    probe = torch.zeros(1, spec.channels, spec.height, spec.width, dtype=dtype, device=device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(probe)
    except Exception as error:  # any module can raise anything on a wrong input shape
        raise CheckpointLoadError(
            f"the model from {path} fails on a {tuple(probe.shape)} input: {type(error).__name__}: {_first_line(error)}; "
            "check --input-size and --in-channels"
        ) from error
    finally:
        model.train(was_training)

    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        kind = f"shape {tuple(output.shape)}" if isinstance(output, torch.Tensor) else type(output).__name__
        raise CheckpointLoadError(
            f"the model from {path} returns {kind} for one image, not (1, num_classes) logits; wrap it so forward returns logits"
        )
    return int(output.shape[1])


__all__ = [
    "AUTHORS_INPUT_DEFAULTS",
    "CheckpointLoadError",
    "CheckpointSource",
    "DETECTABLE_ARCHITECTURES",
    "KeyMatch",
    "LoadedModel",
    "detect_architecture",
    "file_sha256",
    "load_model",
    "strip_wrapper_prefixes",
]
