"""The per-generation learning-rate schedule: linear warm-up, then cosine, restarted every generation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from seal_train.loop import train
from seal_train.strategies import StrategyError, learning_rate

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_lr(epoch: int, lr: float, epochs: int, warmup: int) -> float:
    if epoch < warmup:
        return lr * (epoch + 1) / warmup
    return float(0.5 * (1 + np.cos(np.pi * (epoch - warmup) / (epochs - warmup))) * lr)


@pytest.mark.parametrize("epoch", [0, 1, 10, 19, 20, 21, 90, 159])
def test_schedule_paper_settings(epoch):
    assert learning_rate(epoch, base_lr=0.1, epochs=160, warmup_epochs=20) == pytest.approx(reference_lr(epoch, 0.1, 160, 20), rel=1e-12)


def test_schedule_peak_after_warmup():
    assert learning_rate(20, base_lr=0.1, epochs=160, warmup_epochs=20) == pytest.approx(0.1, rel=1e-12)


def test_schedule_without_warmup():
    values = [learning_rate(e, base_lr=0.2, epochs=4, warmup_epochs=0) for e in range(4)]
    assert values == pytest.approx([0.2, 0.2 * (1 + np.cos(np.pi / 4)) / 2, 0.1, 0.2 * (1 + np.cos(3 * np.pi / 4)) / 2], rel=1e-12)


def test_schedule_epoch_out_of_range():
    with pytest.raises(StrategyError, match="epoch must be in"):
        learning_rate(4, base_lr=0.1, epochs=4, warmup_epochs=1)


@pytest.mark.slow
def test_run_records_schedule(tiny_config):
    """run.json lists lr_e per epoch, restarting each generation, with S * lr_e for early parameters in the ascent."""
    config = tiny_config(strategy="seal", generations=2, epochs=3, warmup_epochs=1, ascent_epochs=1, lr=0.08)
    result = train(config)
    history = json.loads((result.run_dir / "run.json").read_text())["history"]

    for entry in history:
        expected = reference_lr(entry["epoch"], 0.08, 3, 1)
        assert entry["lr_late"] == pytest.approx(expected, rel=1e-12), entry
        ascent = entry["generation"] >= 1 and entry["epoch"] < 1
        expected_early = -0.01 * expected if ascent else expected
        assert entry["lr_early"] == pytest.approx(expected_early, rel=1e-12), entry
        assert entry["phase"] == ("ascent" if ascent else "descent")
