"""Bitwise snapshots of a model's parameters and buffers, to prove that an audit left it unchanged."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn


class ModelChangedError(RuntimeError):
    """A parameter or buffer of an audited model differs from its snapshot."""


@dataclass(frozen=True)
class ModelSnapshot:
    """CPU copies of every parameter and buffer of a model, keyed by dotted name."""

    tensors: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.tensors)


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    # Non-persistent buffers are included: they are absent from state_dict() but can still
    # change what the model computes.
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def snapshot_model_state(model: nn.Module) -> ModelSnapshot:
    """Copy every parameter and buffer of model to CPU memory."""
    tensors = {name: tensor.detach().to("cpu", copy=True) for name, tensor in _named_tensors(model)}
    return ModelSnapshot(tensors)


def _as_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """View a tensor's memory as uint8, so NaN equals the same NaN and -0.0 differs from 0.0."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def _describe_change(before: torch.Tensor, after: torch.Tensor) -> str | None:
    """Return how a tensor changed, or None when it is bitwise identical."""
    if before.dtype != after.dtype:
        return f"dtype changed from {before.dtype} to {after.dtype}"

    if before.shape != after.shape:
        return f"shape changed from {tuple(before.shape)} to {tuple(after.shape)}"

    if torch.equal(_as_bytes(before), _as_bytes(after)):
        return None

    if before.numel() == 0:
        return "contents changed"
    element_size = before.element_size()
    changed_bytes = _as_bytes(before) != _as_bytes(after)
    changed_values = int(changed_bytes.view(-1, element_size).any(dim=1).sum())
    return f"{changed_values} of {before.numel()} values differ"


def find_changes(model: nn.Module, snapshot: ModelSnapshot) -> list[tuple[str, str]]:
    """Return (name, description) for every tensor that differs from the snapshot, in model order."""
    current = dict(_named_tensors(model))
    changes = []
    for name, tensor in current.items():
        if name not in snapshot.tensors:
            changes.append((name, "added after the snapshot"))
            continue
        description = _describe_change(snapshot.tensors[name], tensor)
        if description is not None:
            changes.append((name, description))

    for name in snapshot.tensors:
        if name not in current:
            changes.append((name, "removed after the snapshot"))
    return changes


def assert_model_unchanged(model: nn.Module, snapshot: ModelSnapshot) -> None:
    """Raise ModelChangedError naming the first tensor that is not bitwise equal to the snapshot."""
    changes = find_changes(model, snapshot)
    if not changes:
        return

    name, description = changes[0]
    others = f" ({len(changes) - 1} more tensors changed)" if len(changes) > 1 else ""
    raise ModelChangedError(
        f"the audited model was modified: tensor {name!r} {description}{others}; "
        "the probe must leave parameters and buffers untouched"
    )


@contextlib.contextmanager
def model_unchanged(model: nn.Module) -> Iterator[ModelSnapshot]:
    """Snapshot model on entry and raise ModelChangedError on exit if any tensor changed.

    The check is skipped when the block raises, so the original error is not masked.
    """
    snapshot = snapshot_model_state(model)
    yield snapshot
    assert_model_unchanged(model, snapshot)
