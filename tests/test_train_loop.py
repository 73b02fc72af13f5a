"""The epoch loop: checkpoints, run.json, exact resume after an interruption, NaN handling and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from seal_train.checkpoint import model_from_checkpoint
from seal_train.data import BatchLoader
from seal_train.loop import BatchEvent, NonFiniteLossError, TrainingInterrupted, load_training_data, resume, train

pytestmark = [pytest.mark.usefixtures("single_thread"), pytest.mark.slow]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "latest.pt", weights_only=True)["model_state_dict"]


def stop_at(generation: int, epoch: int, batch: int):
    def callback(event: BatchEvent) -> None:
        if event.stage == "after_step" and (event.generation, event.epoch, event.batch) == (generation, epoch, batch):
            event.stop.request()

    return callback


def test_checkpoints_listed_and_loadable(tiny_config):
    config = tiny_config(strategy="seal", generations=2, epochs=2, ascent_epochs=1)
    result = train(config)
    record = json.loads((result.run_dir / "run.json").read_text())

    listed = {(c["generation"], c["kind"], c["path"]) for c in record["checkpoints"]}
    assert listed == {(0, "generation", "gen0.pt"), (1, "ascent", "gen1-ascent.pt"), (1, "generation", "gen1.pt"), (1, "latest", "latest.pt")}
    for entry in record["checkpoints"]:
        payload = torch.load(result.run_dir / entry["path"], weights_only=True)
        assert payload["meta"]["kind"] == entry["kind"]
        assert payload["meta"]["epoch"] == entry["epoch"]
        assert payload["meta"]["config"]["strategy"] == "seal"
    assert record["status"] == "finished"
    assert len(record["history"]) == 4


def test_checkpoint_rebuilds_model_with_recorded_accuracy(tiny_config):
    """A model rebuilt from gen1.pt reproduces the validation accuracy that run.json recorded."""
    config = tiny_config(strategy="llf", generations=2, epochs=2)
    result = train(config)

    payload = torch.load(result.run_dir / "gen1.pt", weights_only=True)
    model = model_from_checkpoint(payload).eval()
    data = load_training_data(config)
    loader = BatchLoader(data.val, batch_size=17, shuffle=False)
    with torch.no_grad():
        correct = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in loader)

    assert correct / len(data.val) == pytest.approx(result.history[-1].val_acc, abs=1e-12)


def test_training_state_loads_weights_only(tiny_config):
    result = train(tiny_config(strategy="seal", generations=1, epochs=2))
    state = torch.load(result.run_dir / "latest.pt", weights_only=True)["training_state"]
    assert state["position"] == {"generation": 1, "epoch": 0, "batch": 0, "generation_started": False}
    assert len(state["rng"]["python"][1]) == 625


@pytest.mark.parametrize(
    ("strategy", "where"),
    [
        ("seal", (1, 0, 2)),   # mid-ascent
        ("seal", (0, 1, 3)),   # mid-descent in generation 0
        ("llf", (1, 0, 1)),    # just after the re-initialisation
        ("seal", (1, 0, 5)),   # the last batch of the ascent epoch: stops at the epoch boundary
    ],
)
def test_resume_matches_uninterrupted(tiny_config, strategy, where):
    reference = train(tiny_config(strategy=strategy, run_name="reference"))
    interrupted_config = tiny_config(strategy=strategy, run_name="interrupted")

    with pytest.raises(TrainingInterrupted):
        train(interrupted_config, callback=stop_at(*where))
    assert json.loads((interrupted_config.run_dir / "run.json").read_text())["status"] == "interrupted"
    resumed = resume(interrupted_config.run_dir)

    expected, actual = final_weights(reference.run_dir), final_weights(resumed.run_dir)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key
    assert [m.val_acc for m in resumed.history] == [m.val_acc for m in reference.history]
    assert [m.train_loss for m in resumed.history] == [m.train_loss for m in reference.history]


def test_resume_rejects_changed_option(tiny_config):
    config = tiny_config(strategy="seal")
    with pytest.raises(TrainingInterrupted):
        train(config, callback=stop_at(0, 0, 1))
    with pytest.raises(ValueError, match="cannot change lr=0.5"):
        resume(config.run_dir, overrides={"lr": 0.5})


def test_nan_loss_stops_and_keeps_checkpoint(tiny_config):
    config = tiny_config(strategy="normal", generations=2, epochs=2)

    def poison(event: BatchEvent) -> None:
        if event.stage == "after_step" and (event.generation, event.epoch, event.batch) == (1, 0, 2):
            with torch.no_grad():
                event.model.fc.weight.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match="generation 1 epoch 1"):
        train(config, callback=poison)

    record = json.loads((config.run_dir / "run.json").read_text())
    assert record["status"] == "failed"
    state = torch.load(config.run_dir / "latest.pt", weights_only=True)
    assert state["training_state"]["position"]["generation"] == 1
    assert all(torch.isfinite(v).all() for v in state["model_state_dict"].values() if v.is_floating_point())


def test_sigint_saves_and_exits_130(tmp_path):
    """A real Ctrl-C (SIGINT) stops the CLI with exit code 130, a resume hint and a loadable latest.pt."""
    out_dir = tmp_path / "runs"
    command = [
        sys.executable, "-m", "seal_train.cli", "run", "--strategy", "seal", "--train-examples", "192",
        "--val-examples", "64", "--batch-size", "32", "--arch-kwargs", '{"widths": [4, 8, 8, 8]}',
        "--generations", "30", "--epochs", "2", "--num-threads", "1", "--out-dir", str(out_dir),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_file = out_dir / "seal" / "run.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (run_file.exists() and json.loads(run_file.read_text())["history"]):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)

    assert process.returncode == 130, stderr
    assert f"seal-train resume {out_dir / 'seal'}" in stderr
    assert json.loads(run_file.read_text())["status"] == "interrupted"
    torch.load(out_dir / "seal" / "latest.pt", weights_only=True)
