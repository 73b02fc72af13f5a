"""One training epoch and one validation pass, shared by the run loop and the benchmark."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from .data import BatchLoader
from .strategies import ascend_gradients


@dataclass
class EpochTotals:
    """Running sums of one training epoch, kept on the device to avoid a sync per batch."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    count: torch.Tensor

    @classmethod
    def zeros(cls, device: torch.device) -> "EpochTotals":
        return cls(*torch.zeros(3, dtype=torch.float64, device=device))

    def as_tensor(self) -> torch.Tensor:
        return torch.stack([self.loss_sum, self.correct, self.count])

    @classmethod
    def from_tensor(cls, values: torch.Tensor) -> "EpochTotals":
        return cls(*values.to(torch.float64).clone())


@dataclass
class StepSettings:
    """Loss, precision and memory format of the training steps."""

    criterion: nn.Module
    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        """Return the autocast context of the forward pass, or a no-op one in full precision."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def train_epoch(
    net: nn.Module,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    *,
    settings: StepSettings,
    totals: EpochTotals,
    start_batch: int = 0,
    should_stop: Callable[[], bool] = lambda: False,
    on_batch: Callable[[str, int], None] | None = None,
    progress: tqdm | None = None,
) -> int:
    """Train for the rest of the loader's current epoch from start_batch and return the next batch index.

    Returns early, after a completed step, when should_stop() is true. Ascending parameter groups
    have their gradients negated before each step (see strategies.ascend_gradients).
    """
    net.train()
    batch_index = start_batch
    has_ascent = any(group["ascent"] for group in optimizer.param_groups)
    for images, labels in loader.batches(start=start_batch):
        if settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)

        with settings.autocast():
            logits = net(images)
            loss = settings.criterion(logits, labels)

        optimizer.zero_grad(set_to_none=True)
        if settings.scaler is not None:
            settings.scaler.scale(loss).backward()
        else:
            loss.backward()
        if has_ascent:
            ascend_gradients(optimizer)
        if on_batch is not None:
            on_batch("before_step", batch_index)
        if settings.scaler is not None:
            settings.scaler.step(optimizer)
            settings.scaler.update()
        else:
            optimizer.step()

        with torch.no_grad():
            totals.loss_sum += loss.detach().double() * len(labels)
            totals.correct += (logits.argmax(1) == labels).sum()
            totals.count += len(labels)
        batch_index += 1
        if on_batch is not None:
            on_batch("after_step", batch_index - 1)
        if progress is not None and not progress.disable:
            progress.update(1)
            if batch_index % 20 == 0:
                progress.set_postfix(loss=f"{loss.item():.3f}")
        if should_stop():
            break
    return batch_index


@torch.no_grad()
def evaluate(net: nn.Module, loader: BatchLoader, *, settings: StepSettings) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) over the loader in eval mode, without label smoothing."""
    net.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=settings.device)
    correct = torch.zeros((), dtype=torch.float64, device=settings.device)
    for images, labels in loader:
        if settings.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with settings.autocast():
            logits = net(images)
        loss_sum += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
        correct += (logits.argmax(1) == labels).sum()
    count = len(loader.dataset)
    return float(loss_sum) / count, float(correct) / count
