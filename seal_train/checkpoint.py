"""Self-describing checkpoints: atomic writes, weights_only loading, model rebuilt from metadata."""

from __future__ import annotations

import datetime as dt
import platform
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import InputSpec
from .models import build_model
from .runs import write_atomic

FORMAT = "seal-suite-checkpoint"
FORMAT_VERSION = 1
# Kinds of checkpoint a run writes.
KIND_GENERATION = "generation"      # end of a generation
KIND_ASCENT = "ascent"              # end of a SEAL ascent phase
KIND_LATEST = "latest"              # resumable state, overwritten every epoch


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or not in the expected format."""


def library_versions() -> dict[str, str]:
    import numpy
    import torchvision

    from . import __version__

    # str(): torch.__version__ is a TorchVersion object, which weights_only loading rejects.
    return {
        "seal_suite": str(__version__),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(numpy.__version__),
        "python": platform.python_version(),
    }


def make_meta(
    *,
    arch: str,
    arch_kwargs: dict[str, Any],
    num_classes: int,
    input_spec: InputSpec,
    dataset: dict[str, Any],
    strategy: str,
    generation: int,
    epoch: int,
    kind: str,
    config: dict[str, Any],
    metrics: list[dict[str, Any]],
    seed: int,
    threshold: str,
) -> dict[str, Any]:
    """Collect the metadata every checkpoint carries; all values are plain Python types."""
    return {
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs),
        "num_classes": int(num_classes),
        "input_spec": input_spec.to_dict(),
        "dataset": dict(dataset),
        "strategy": strategy,
        "threshold": threshold,
        "generation": int(generation),
        "epoch": int(epoch),
        "kind": kind,
        "config": dict(config),
        "metrics": list(metrics),
        "seed": int(seed),
        "versions": library_versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def save_atomic(obj: Any, path: str | Path) -> Path:
    """torch.save obj to path atomically (see write_atomic)."""
    return write_atomic(path, lambda stream: torch.save(obj, stream))


def save_checkpoint(path: str | Path, *, model: nn.Module, meta: dict[str, Any], training_state: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint: {"format", "format_version", "model_state_dict", "meta"[, "training_state"]}."""
    module = model.module if hasattr(model, "module") else model
    module = getattr(module, "_orig_mod", module)
    payload: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model_state_dict": {k: v.detach().cpu() for k, v in module.state_dict().items()},
        "meta": meta,
    }
    if training_state is not None:
        payload["training_state"] = training_state
    return save_atomic(payload, path)


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of this suite's checkpoints with weights_only=True (no code is unpickled)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found; check the path")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for bad files
        raise CheckpointError(f"cannot load checkpoint {path}: {str(error).splitlines()[0]}") from error
    if not is_suite_checkpoint(payload):
        raise CheckpointError(f"{path} is not a seal-suite checkpoint (no 'format': {FORMAT!r} entry)")
    if payload["format_version"] > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format version {payload['format_version']}, this release reads up to {FORMAT_VERSION}; upgrade seal-suite")
    return payload


def is_suite_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def model_from_checkpoint(payload: dict[str, Any]) -> nn.Module:
    """Rebuild the model a suite checkpoint describes and load its weights strictly."""
    meta = payload["meta"]
    model = build_model(
        meta["arch"],
        num_classes=meta["num_classes"],
        in_channels=meta["input_spec"]["channels"],
        **meta.get("arch_kwargs", {}),
    )
    model.load_state_dict(payload["model_state_dict"], strict=True)
    return model
