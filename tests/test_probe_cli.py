"""The seal-probe commands end to end on a tiny trained checkpoint."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call
from typer.testing import CliRunner

from seal_probe.analyses import DataOptions, DepthOptions, HessianOptions, measure_depth, measure_hessian
from seal_probe.cli import app
from seal_probe.inputs import load_probe_data
from seal_probe.loading import load_model
from seal_train.loop import train

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny SEAL run's last generation checkpoint."""
    from seal_train.config import resolve_config
    from tests.conftest import TINY_TRAINING

    root = tmp_path_factory.mktemp("probe")
    config = resolve_config(overrides={**TINY_TRAINING, "strategy": "seal", "out_dir": str(root), "run_name": "seal"})
    result = train(config)
    return result.run_dir / [c for c in result.checkpoints if c.kind == "generation"][-1].path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def test_depth_cli_writes_outputs(checkpoint, tmp_path, single_thread):
    before = _sha256(checkpoint)

    result = runner.invoke(app, [
        "depth", str(checkpoint), "--support-size", "60", "--query-size", "40", "--k", "5",
        "--out", str(tmp_path / "depth"), "--json", str(tmp_path / "summary.json"),
    ])

    assert result.exit_code == 0, result.output
    with open(tmp_path / "depth" / "seal-gen1.examples.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert len(rows) == 40
    assert summary["checkpoints"][0]["options"]["k"] == 5
    assert summary["checkpoints"][0]["data"]["support"]["subset_size"] == 60
    assert (tmp_path / "depth" / "depth.png").stat().st_size > 0
    assert _sha256(checkpoint) == before


def test_depth_leaves_model_bit_identical(checkpoint, single_thread):
    loaded = load_model(checkpoint)
    loaded.model.train()
    before = _state(loaded.model)

    measure_depth(loaded, DataOptions(), DepthOptions(support_size=60, query_size=40, k=5, query_split="train"))

    after = loaded.model.state_dict()
    assert all(torch.equal(before[name].view(torch.uint8) if before[name].is_floating_point() else before[name],
                           after[name].view(torch.uint8) if after[name].is_floating_point() else after[name]) for name in before)
    assert loaded.model.training


def test_hessian_top_eigenvalue_matches_dense(checkpoint, single_thread):
    loaded = load_model(checkpoint, map_location="cpu")
    options = HessianOptions(examples=48, batch_size=20, quantities=("eigenvalues",), top_k=3, params=("fc.*",), tol=1e-6, seed=3)

    report, _ = measure_hessian(loaded, DataOptions(), options)

    data = load_probe_data("fashion-mnist-subset", spec=loaded.input_spec, split="train", subset_size=48, seed=3)
    model = loaded.model.double().eval()
    names = ["fc.weight", "fc.bias"]
    fixed = {name: tensor for name, tensor in model.state_dict().items() if name not in names}
    shapes = [model.get_parameter(name).shape for name in names]
    sizes = [int(np.prod(shape)) for shape in shapes]

    def loss(flat: torch.Tensor) -> torch.Tensor:
        pieces = dict(zip(names, (piece.view(shape) for piece, shape in zip(flat.split(sizes), shapes))))
        logits = functional_call(model, {**fixed, **pieces}, (data.images.double(),))
        return torch.nn.functional.cross_entropy(logits, data.labels)

    flat = torch.cat([model.get_parameter(name).detach().reshape(-1) for name in names])
    dense = torch.autograd.functional.hessian(loss, flat)
    exact = torch.linalg.eigvalsh(dense).flip(0)[:3].numpy()
    np.testing.assert_allclose(report.top_eigenvalues, exact, rtol=1e-3)


def test_hessian_cli_writes_json(checkpoint, tmp_path, single_thread):
    result = runner.invoke(app, [
        "hessian", str(checkpoint), "--examples", "32", "--top-k", "2", "--trace-samples", "4",
        "--density-steps", "6", "--out", str(tmp_path / "h"), "--json", str(tmp_path / "h.json"),
    ])

    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "h.json").read_text())["checkpoints"][0]
    assert len(record["result"]["top_eigenvalues"]) == 2
    assert record["data"]["examples"]["subset_size"] == 32
    assert (tmp_path / "h" / "density.png").is_file()


def test_hessian_cli_unknown_start(checkpoint, tmp_path):
    result = runner.invoke(app, ["hessian", str(checkpoint), "--lanczos-start", "ones", "--out", str(tmp_path / "h")])

    assert result.exit_code != 0
    assert "unknown --lanczos-start 'ones'; choose gradient or random" in result.output
    assert not (tmp_path / "h").exists()


def test_transfer_cli_writes_json(checkpoint, tmp_path, single_thread):
    result = runner.invoke(app, [
        "transfer", str(checkpoint), "--target", "digits", "--resize", "--episodes", "4", "--n-way", "3",
        "--k-shot", "2", "--n-query", "3", "--out", str(tmp_path / "t"),
    ])

    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "t" / "transfer.json").read_text())["checkpoints"][0]
    assert 0.0 <= record["result"]["linear_probe"]["test_accuracy"] <= 1.0
    assert any("resize" in conversion for conversion in record["result"]["conversions"])


def test_transfer_cli_without_resize_exits_2(checkpoint, tmp_path):
    result = runner.invoke(app, ["transfer", str(checkpoint), "--target", "digits", "--out", str(tmp_path / "t")])

    assert result.exit_code == 2
    assert "--resize" in result.output
    assert not (tmp_path / "t").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["depth", "{missing}"], "not found"),
        (["depth", "{text}"], "{text_name}"),
        (["depth", "{checkpoint}", "--k", "500", "--support-size", "60"], "k=500"),
        (["depth", "{checkpoint}", "--distance", "manhattan"], "manhattan"),
        (["hessian", "{checkpoint}", "--params", "nothing.*", "--examples", "8"], "nothing"),
        (["hessian", "{checkpoint}", "--skip", "eigenvalues", "--skip", "trace", "--skip", "density"], "--skip"),
        (["depth", "{checkpoint}", "--dataset", "no-such-dataset"], "no-such-dataset"),
    ],
)
def test_bad_input_exits_2(checkpoint, tmp_path, arguments, message):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    values = {"missing": str(tmp_path / "missing.pt"), "text": str(text), "text_name": text.name, "checkpoint": str(checkpoint)}

    result = runner.invoke(app, [a.format(**values) for a in arguments] + ["--out", str(tmp_path / "out")])

    assert result.exit_code == 2, result.output
    assert message.format(**values) in result.output
    assert len(result.output.strip().splitlines()) <= 3


def test_layers_cli_lists_resnet_layers(checkpoint):
    result = runner.invoke(app, ["layers", str(checkpoint)])

    assert result.exit_code == 0, result.output
    lines = result.output.split()
    assert lines[0] == "input"
    assert lines[-1] == "output"
    assert "layer3.0" in lines
