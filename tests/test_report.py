"""The report and study commands on tiny runs of all three strategies."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

from seal_probe.analyses import DataOptions, DepthOptions, HessianOptions, TransferOptions
from seal_probe.cli import app
from seal_probe.report import ReportError, ReportOptions, build_report, collect_checkpoints
from seal_train.loop import train
from seal_train.runs import read_run

STRATEGIES = ("normal", "llf", "seal")
PLOTS = ("accuracy.png", "depth.png", "depth-histograms.png", "density.png", "top-eigenvalue.png", "transfer.png")
# Settings small enough for a few seconds per checkpoint; every analysis still runs in full.
TINY_REPORT = ReportOptions(
    depth=DepthOptions(support_size=60, query_size=40, k=5, batch_size=64),
    hessian=HessianOptions(examples=32, batch_size=32, top_k=2, trace_samples=4, trace_method="hutchinson", density_steps=6),
    transfer=TransferOptions(target="digits", grid=(0.1, 1.0), episodes=4, n_way=3, k_shot=2, n_query=3, max_iter=200),
)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> list[Path]:
    """Train one tiny run per strategy, shared by the tests of this module."""
    from tests.conftest import TINY_TRAINING
    from seal_train.config import resolve_config

    root = tmp_path_factory.mktemp("study")
    run_dirs = []
    for strategy in STRATEGIES:
        config = resolve_config(overrides={**TINY_TRAINING, "strategy": strategy, "out_dir": str(root / "runs"), "run_name": strategy})
        run_dirs.append(train(config).run_dir)
    return run_dirs


def _modified_times(folder: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in (folder / "cache").iterdir()}


def test_report_rows_plots_and_cache(tiny_runs, tmp_path, single_thread):
    out = tmp_path / "report"

    first = build_report(tiny_runs, out_dir=out, options=TINY_REPORT)
    cached = _modified_times(out)
    second = build_report(tiny_runs, out_dir=out, options=TINY_REPORT)

    expected_rows = sum(len([c for c in read_run(run).checkpoints if c.kind == "generation"]) for run in tiny_runs)
    with open(out / "summary.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == expected_rows
    assert {row["strategy"] for row in rows} == set(STRATEGIES)
    assert all(row["mean_depth"] or float(row["never_consistent"]) == 1.0 for row in rows)
    assert all(row["top_eigenvalue"] and row["trace"] and row["transfer_accuracy"] for row in rows)
    for plot in PLOTS:
        assert (out / plot).stat().st_size > 0, plot
    assert (out / "summary.md").read_text().count("\n| ") == expected_rows + 1
    assert first.computed == expected_rows * 3
    assert second.computed == 0
    assert _modified_times(out) == cached


def test_report_validation_accuracy_from_run(tiny_runs, tmp_path):
    options = replace(TINY_REPORT, analyses=())
    report = build_report(tiny_runs, out_dir=tmp_path / "report", options=options)

    rows = [row for group in report.groups.values() for row in group]
    for run_dir in tiny_runs:
        record = read_run(run_dir)
        for row in (r for r in rows if r["strategy"] == record.strategy):
            last_epoch = [m for m in record.history if m.generation == row["generation"]][-1]
            assert row["val_acc"] == last_epoch.val_acc


def test_report_recomputes_changed_settings(tiny_runs, tmp_path, single_thread):
    out = tmp_path / "report"
    options = replace(TINY_REPORT, analyses=("depth",))
    build_report(tiny_runs[:1], out_dir=out, options=options)

    changed = replace(options, depth=replace(options.depth, k=3))
    report = build_report(tiny_runs[:1], out_dir=out, options=changed)

    cache = json.loads(next((out / "cache").glob("*.depth.json")).read_text())
    assert report.computed == len(collect_checkpoints(tiny_runs[:1]))
    assert cache["key"]["options"]["k"] == 3


def test_report_groups_mixed_datasets(tiny_runs, tmp_path):
    other = tmp_path / "other"
    record = json.loads((tiny_runs[0] / "run.json").read_text())
    record["dataset"]["name"] = "another-dataset"
    record["run_name"] = "normal-other"
    other.mkdir()
    for checkpoint in record["checkpoints"]:
        source = Path(checkpoint["path"])
        source = source if source.is_file() else tiny_runs[0] / source.name
        (other / source.name).write_bytes(source.read_bytes())
        checkpoint["path"] = str(other / source.name)
    (other / "run.json").write_text(json.dumps(record))

    report = build_report([tiny_runs[0], other], out_dir=tmp_path / "report", options=replace(TINY_REPORT, analyses=()))

    assert len(report.groups) == 2
    assert (tmp_path / "report" / "accuracy-group2.png").is_file()


def test_report_rejects_folder_without_checkpoints(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()

    with pytest.raises(ReportError, match="run.json"):
        build_report([empty], out_dir=tmp_path / "report", options=TINY_REPORT)


def test_report_cli_missing_run_exits_2(tmp_path):
    result = CliRunner().invoke(app, ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "report")])

    assert result.exit_code == 2
    assert "run.json" in result.output


def test_report_cli_unknown_skip_exits_2(tiny_runs, tmp_path):
    result = CliRunner().invoke(app, ["report", str(tiny_runs[0]), "--skip", "curvature", "--out", str(tmp_path / "r")])

    assert result.exit_code == 2
    assert "curvature" in result.output
