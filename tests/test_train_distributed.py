"""DistributedDataParallel on CPU: two gloo processes end with the weights of one process with the same global batch."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from seal_train.config import TrainConfig, resolve_config
from seal_train.loop import train
from seal_train.models import MODELS

from conftest import TINY_TRAINING

pytestmark = pytest.mark.slow


class NoNormNet(nn.Module):
    """A small CNN without BatchNorm, whose forward pass does not depend on how the batch is split."""

    def __init__(self, num_classes: int, in_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 4, 3, stride=2)
        self.layer3 = nn.Conv2d(4, 8, 3, stride=2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.layer3(torch.relu(self.conv1(x))))
        return self.fc(x.mean(dim=(2, 3)))


# Registered at import, so the spawned processes (which import this module) know the name too.
MODELS["test-no-norm"] = lambda num_classes, in_channels, **kwargs: NoNormNet(num_classes, in_channels)


def make_config(out_dir: Path, run_name: str) -> TrainConfig:
    values = {
        **TINY_TRAINING,
        "arch": "test-no-norm",
        "arch_kwargs": {},
        "train_examples": 128,
        "strategy": "seal",
        "generations": 2,
        "epochs": 2,
        "ascent_epochs": 1,
        "out_dir": str(out_dir),
        "run_name": run_name,
        "num_threads": 1,
        # BatchLoader draws crops per process batch, so augmentation differs between one and two processes.
        "augment": False,
    }
    return resolve_config(overrides=values)


def worker(rank: int, out_dir: str, store: str) -> None:
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        train(make_config(Path(out_dir), "two-processes"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one(tmp_path, single_thread):
    mp.spawn(worker, args=(str(tmp_path), str(tmp_path / "store")), nprocs=2, join=True)
    single_process = train(make_config(tmp_path, "one-process"))

    distributed_weights = torch.load(tmp_path / "two-processes" / "gen1.pt", weights_only=True)["model_state_dict"]
    single_weights = torch.load(single_process.run_dir / "gen1.pt", weights_only=True)["model_state_dict"]
    for key in single_weights:
        torch.testing.assert_close(distributed_weights[key], single_weights[key], rtol=1e-5, atol=1e-6, msg=key)
    # The runs must have moved away from the shared initial weights for the comparison to mean anything.
    torch.manual_seed(0)  # the run's seed, from which build_run_model draws the initial weights
    initial = NoNormNet(10, 1).state_dict()
    assert not torch.allclose(single_weights["fc.weight"], initial["fc.weight"])
