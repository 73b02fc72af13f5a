"""The seal-train command line: bad input gives one clear line and a non-zero exit, good input a summary."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import seal_train.checkpoint
import seal_train.cli
import seal_train.loop
from seal_train.cli import app

pytestmark = pytest.mark.usefixtures("single_thread")

TINY_FLAGS = [
    "--train-examples", "96", "--val-examples", "32", "--batch-size", "32", "--arch-kwargs", '{"widths": [4, 8, 8, 8]}',
    "--generations", "2", "--epochs", "2",
]


def invoke(*args: str, **kwargs):
    return CliRunner().invoke(app, list(args), **kwargs)


def run_flags(out_dir: Path, *extra: str) -> list[str]:
    return ["run", *TINY_FLAGS, "--out-dir", str(out_dir), *extra]


def error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--strategy", "annealing"], "unknown strategy 'annealing'; choose one of: normal, llf, seal"),
        (["--arch", "resnet7"], "unknown architecture 'resnet7'"),
        (["--threshold", "layer9"], "threshold block 'layer9' not found"),
        (["--preset", "imagenet"], "unknown preset 'imagenet'"),
        (["--num-classes", "7"], "num_classes is 7 but dataset 'fashion-mnist-subset' has 10 classes"),
        (["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (["--dataset", "cifar10", "--data-root", "/nonexistent-seal-data"], "missing CIFAR batch file"),
        (["--lr", "0"], "lr must be > 0, got 0.0"),
        (["--arch-kwargs", "{widths: 4}"], "--arch-kwargs must be a JSON object"),
        (["--amp", "bf16"], "amp 'bf16' needs CUDA"),
        (["--batch-size", "0"], "batch_size must be >= 1"),
        (["--arch-kwargs", '{"wid": 3}'], "unknown --arch-kwargs key 'wid' for resnet-narrow; valid keys: widths"),
        (["--arch-kwargs", '{"widths": 4}'], "widths must be a list of 4 positive integers, got 4"),
    ],
)
def test_bad_input_exits_2(tmp_path, flags, message):
    result = invoke(*run_flags(tmp_path / "runs", *flags))
    assert result.exit_code == 2, result.output
    assert message in error_line(result)
    assert not (tmp_path / "runs").exists()


def test_wrong_dataset_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir()
    result = invoke(*run_flags(tmp_path / "runs", "--dataset", "tiny-imagenet", "--data-root", str(root)))
    assert result.exit_code == 2
    assert "wnids.txt not found" in error_line(result)


def test_unknown_config_key(tmp_path):
    config_file = tmp_path / "options.json"
    config_file.write_text(json.dumps({"epochz": 3}))
    result = invoke(*run_flags(tmp_path / "runs", "--config", str(config_file)))
    assert result.exit_code == 2
    assert "unknown config key 'epochz'" in error_line(result)


def test_unwritable_out_dir(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = invoke(*run_flags(blocker / "runs"))
    assert result.exit_code == 2
    assert "is a file; choose another --out-dir" in error_line(result)


@pytest.mark.slow
def test_existing_run_rejected_then_overwritten(tmp_path):
    first = invoke(*run_flags(tmp_path / "runs", "--strategy", "normal"))
    assert first.exit_code == 0, first.output
    before = (tmp_path / "runs" / "normal" / "gen1.pt").read_bytes()

    rejected = invoke(*run_flags(tmp_path / "runs", "--strategy", "normal"))
    assert rejected.exit_code == 2
    assert "already contains a run; pass --resume to continue it or --overwrite to replace it" in error_line(rejected)
    assert (tmp_path / "runs" / "normal" / "gen1.pt").read_bytes() == before

    replaced = invoke(*run_flags(tmp_path / "runs", "--strategy", "normal", "--overwrite", "--lr", "0.05"))
    assert replaced.exit_code == 0, replaced.output
    saved = json.loads((tmp_path / "runs" / "normal" / "config.json").read_text())
    assert saved["lr"] == 0.05


@pytest.mark.slow
def test_run_prints_summary(tmp_path):
    result = invoke(*run_flags(tmp_path / "runs", "--strategy", "llf"))
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "runs" / "llf" / "run.json").read_text())
    final = [m["val_acc"] for m in record["history"] if m["epoch"] == 1]
    assert f"run folder: {tmp_path / 'runs' / 'llf'}" in result.output
    for generation, accuracy in enumerate(final):
        assert f"generation {generation}: final validation accuracy {100 * accuracy:.2f}%" in result.output


@pytest.mark.slow
def test_resume_finished_run(tmp_path):
    assert invoke(*run_flags(tmp_path / "runs", "--strategy", "seal")).exit_code == 0
    result = invoke("resume", str(tmp_path / "runs" / "seal"))
    assert result.exit_code == 0, result.output
    assert "status: finished" in result.output

    again = invoke(*run_flags(tmp_path / "runs", "--strategy", "seal", "--resume"))
    assert again.exit_code == 0, again.output

    changed = invoke(*run_flags(tmp_path / "runs", "--strategy", "seal", "--resume", "--lr", "0.5"))
    assert changed.exit_code == 2
    assert "cannot change lr=0.5 (saved: 0.1) when resuming" in error_line(changed)


def test_resume_missing_folder(tmp_path):
    result = invoke("resume", str(tmp_path / "nothing"))
    assert result.exit_code == 2
    assert error_line(result) == f"error: run folder {tmp_path / 'nothing'} not found; check the path"


def test_run_resume_missing_folder(tmp_path):
    result = invoke(*run_flags(tmp_path / "runs", "--resume"))
    assert result.exit_code == 2
    assert error_line(result) == f"error: run folder {tmp_path / 'runs' / 'seal'} not found; check the path"


def test_run_resume_with_config_file(tmp_path):
    config_file = tmp_path / "options.json"
    config_file.write_text(json.dumps({"epochs": 2}))
    result = invoke(*run_flags(tmp_path / "runs", "--resume", "--config", str(config_file)))
    assert result.exit_code == 2
    assert error_line(result) == f"error: run folder {tmp_path / 'runs' / 'seal'} not found; check the path"


def test_resume_folder_without_latest(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("resume", str(tmp_path / "empty"))
    assert result.exit_code == 2
    assert "has no latest.pt to resume from" in error_line(result)


def test_resume_and_overwrite_exclusive(tmp_path):
    result = invoke(*run_flags(tmp_path / "runs", "--resume", "--overwrite"))
    assert result.exit_code == 2
    assert "--resume and --overwrite exclude each other" in error_line(result)


def test_presets_lists_values():
    result = invoke("presets")
    assert result.exit_code == 0
    assert "tiny-imagenet-resnet50:" in result.output
    assert "  epochs = 160" in result.output


def test_strategies_lists_all():
    result = invoke("strategies")
    names = [line.split()[0] for line in result.output.splitlines()]
    assert names == ["normal", "llf", "seal", "reverse", "seal-freeze", "llf-seal"]


def test_nan_loss_exits_1(tmp_path):
    result = invoke(*run_flags(tmp_path / "runs", "--strategy", "normal", "--lr", "1e30"))
    assert result.exit_code == 1, result.output
    assert "training loss is nan in generation 0 epoch 1" in error_line(result)
    assert json.loads((tmp_path / "runs" / "normal" / "run.json").read_text())["status"] == "failed"


def fail_checkpoint_writes(monkeypatch, kind: str, generation: int, error: OSError) -> None:
    """Make torch.save raise error for the checkpoint of one kind and generation; other writes go through."""
    real_save = seal_train.checkpoint.torch.save

    def save(payload, stream, *args, **kwargs):
        meta = payload["meta"]
        if (meta["kind"], meta["generation"]) == (kind, generation):
            stream.write(b"partial data")
            raise error
        return real_save(payload, stream, *args, **kwargs)

    monkeypatch.setattr(seal_train.checkpoint.torch, "save", save)


@pytest.mark.parametrize(
    ("kind", "generation", "error_number", "written"),
    [
        ("latest", 0, errno.ENOSPC, ["gen0.pt"]),
        ("generation", 1, errno.EACCES, ["gen0.pt", "latest.pt"]),
    ],
)
def test_checkpoint_write_error_exits_1(tmp_path, monkeypatch, kind, generation, error_number, written):
    fail_checkpoint_writes(monkeypatch, kind, generation, OSError(error_number, os.strerror(error_number)))
    run_dir = tmp_path / "runs" / "normal"
    failed_file = run_dir / ("latest.pt" if kind == "latest" else f"gen{generation}.pt")

    result = invoke(*run_flags(tmp_path / "runs", "--strategy", "normal", "--epochs", "1"))

    assert result.exit_code == 1, result.output
    line = error_line(result)
    assert str(failed_file) in line
    assert os.strerror(error_number) in line
    assert "Traceback" not in result.output
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed"
    assert str(failed_file) in record["message"]
    assert os.strerror(error_number) in record["message"]
    assert [entry["path"] for entry in record["checkpoints"]] == written
    for entry in record["checkpoints"]:
        assert seal_train.checkpoint.load_checkpoint(run_dir / entry["path"])["meta"]["kind"] == entry["kind"]
    assert not failed_file.exists()
    assert not list(run_dir.glob("*.partial"))


def test_help_wraps_at_80_columns():
    result = invoke("run", "--help", env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    assert "--save-ascent-checkpoints" in result.output
    assert "--no-save-ascent-checkpoints" in result.output
    assert "fashion-mnist-subset" in result.output
    assert "\u2026" not in result.output
    assert max(len(line) for line in result.output.splitlines()) <= 80


def test_interrupt_before_training_exits_130(tmp_path, monkeypatch):
    def interrupt(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(seal_train.loop, "load_training_data", interrupt)
    result = invoke(*run_flags(tmp_path / "runs"))
    assert result.exit_code == 130, result.output
    assert "Traceback" not in result.output
    assert result.output.strip().splitlines() == ["interrupted before training started; no checkpoint was written"]


def test_interrupt_during_imports_exits_130(monkeypatch, capsys):
    def interrupt():
        raise KeyboardInterrupt

    monkeypatch.setattr(seal_train.cli, "_load_app", interrupt)
    with pytest.raises(SystemExit) as exit_info:
        seal_train.cli.main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err.splitlines() == ["interrupted while starting; nothing was written"]


def test_cli_module_imports_no_torch():
    """Ctrl-C during the slow imports (torch, typer) reaches main(), so importing seal_train.cli must not load them."""
    code = "import sys, seal_train.cli; print(sorted({'torch', 'typer'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert output.strip() == "[]"
