"""Shared fixtures: tiny training configs on a slice of the embedded Fashion-MNIST subset."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from seal_train.config import TrainConfig, resolve_config

# A 4-8-8-8 narrow ResNet on 192 training images: 6 batches of 32 per epoch, well under a second.
TINY_TRAINING = {
    "train_examples": 192,
    "val_examples": 64,
    "arch_kwargs": {"widths": [4, 8, 8, 8]},
    "batch_size": 32,
    "eval_batch_size": 64,
    "generations": 2,
    "epochs": 3,
    "warmup_epochs": 1,
    "ascent_epochs": 1,
}


@pytest.fixture
def tiny_config(tmp_path: Path) -> Callable[..., TrainConfig]:
    """Return a factory of tiny configs that write under tmp_path/runs; keyword arguments override fields."""

    def make(**overrides: Any) -> TrainConfig:
        values = {**TINY_TRAINING, "out_dir": str(tmp_path / "runs"), **overrides}
        return resolve_config(overrides=values)

    return make


@pytest.fixture
def single_thread():
    """Run torch on one thread for the test: on a busy shared CPU two threads can be ten times slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
