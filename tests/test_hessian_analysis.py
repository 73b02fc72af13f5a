"""analyze_hessian end to end: values against dense Hessians, parameter splits, JSON reports and plots."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from seal_probe.hessian import (
    HessianError,
    HessianReport,
    analyze_hessian,
    load_report,
    plot_density,
    plot_top_eigenvalues,
    select_parameters,
)
from seal_probe.hessian.testing import case_by_name, dense_hessian


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def staged_model() -> nn.Module:
    """A tiny network with SEAL-style block names: layer1, layer2, layer3, fc."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            layer1=nn.Linear(4, 5),
            act1=nn.Tanh(),
            layer2=nn.Linear(5, 5),
            act2=nn.Tanh(),
            layer3=nn.Linear(5, 4),
            act3=nn.Tanh(),
            fc=nn.Linear(4, 3),
        )
    )


def staged_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (torch.randn(11, 4, generator=generator), torch.randint(0, 3, (11,), generator=generator)),
        (torch.randn(9, 4, generator=generator), torch.randint(0, 3, (9,), generator=generator)),
    ]


def test_report_values_match_dense_hessian():
    case = case_by_name("cnn")
    dense = dense_hessian(case.model, case.batches)
    exact = torch.linalg.eigvalsh(dense)

    report = analyze_hessian(
        case.model,
        case.batches,
        top_k=3,
        which="both",
        tol=1e-8,
        trace_samples=60,
        density_steps=25,
        density_runs=2,
        dtype=torch.float64,
        seed=3,
    )

    assert report.top_eigenvalues == pytest.approx(exact.flip(0)[:3].tolist(), rel=1e-4)
    assert report.bottom_eigenvalues == pytest.approx(exact[:3].tolist(), rel=1e-4)
    assert max(report.top_residuals + report.bottom_residuals) < 1e-6
    assert abs(report.trace.value - float(torch.trace(dense))) <= 3 * report.trace.stderr
    grid = np.asarray(report.density.grid)
    assert np.trapezoid(report.density.values, grid) == pytest.approx(1.0, abs=1e-9)
    assert report.settings.num_parameters == dense.shape[0]
    assert report.settings.num_examples == 32
    assert report.settings.num_batches == 2
    assert report.settings.seeds == {"eigenvalues": 3, "trace": 4, "density": 5}
    assert report.costs["trace"].num_matvecs == 60
    assert report.costs["density"].num_matvecs == 50
    assert report.costs["eigenvalues"].num_matvecs == report.eigen_results[0].num_matvecs


@pytest.mark.parametrize("start", ["gradient", "random"])
def test_lanczos_starts_match_dense(start):
    case = case_by_name("mlp")
    exact = torch.linalg.eigvalsh(dense_hessian(case.model, case.batches))

    report = analyze_hessian(
        case.model, case.batches, quantities=["eigenvalues"], top_k=3, tol=1e-8, lanczos_start=start, dtype=torch.float64
    )

    assert report.top_eigenvalues == pytest.approx(exact.flip(0)[:3].tolist(), rel=1e-6)
    assert report.settings.lanczos_start == start


def test_gradient_start_at_zero_gradient():
    # Zero weights and every input seen with both signs: the gradient vanishes and the top
    # eigenvalue 1/15 is repeated.
    model = nn.Linear(5, 3, bias=False)
    nn.init.zeros_(model.weight)
    inputs = torch.cat([torch.eye(5), -torch.eye(5)] * 3)
    targets = torch.tensor([0] * 10 + [1] * 10 + [2] * 10)
    batches = [(inputs, targets)]
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches))

    report = analyze_hessian(model, batches, quantities=["eigenvalues"], top_k=3, tol=1e-8, dtype=torch.float64)

    assert report.gradient_norm < 1e-12
    assert report.top_eigenvalues == pytest.approx(exact.flip(0)[:3].tolist(), rel=1e-6)


def test_old_report_loads_random_start(tmp_path):
    case = case_by_name("mlp")
    report = analyze_hessian(case.model, case.batches, quantities=["eigenvalues"], top_k=1)
    data = report.to_dict()
    del data["settings"]["lanczos_start"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(data))

    assert report.settings.lanczos_start == "gradient"
    assert load_report(path).settings.lanczos_start == "random"


def test_report_json_round_trip(tmp_path):
    case = case_by_name("mlp")
    report = analyze_hessian(case.model, case.batches, top_k=2, trace_samples=5, density_steps=5, seed=9)
    path = tmp_path / "reports" / "hessian.json"

    report.to_json(path)
    loaded = load_report(path)
    data = json.loads(path.read_text())

    assert loaded == report
    assert data["settings"]["engine"] == "default"
    assert data["settings"]["dtype"] == "float32"
    assert data["settings"]["seed"] == 9
    assert data["settings"]["density_steps"] == 5
    assert data["settings"]["hvp_mode"] in ("forward_over_reverse", "double_backward")
    assert set(data["costs"]) == {"setup", "eigenvalues", "trace", "density"}
    assert all(cost["seconds"] >= 0 for cost in data["costs"].values())
    assert len(data["density"]["grid"]) == len(data["density"]["values"])
    assert data["eigen_results"][0]["method"] == "lanczos"
    assert "vectors" not in data["eigen_results"][0]


@pytest.mark.parametrize("side", ["early", "late"])
def test_early_late_split_gives_dense_subblock(side):
    model = staged_model()
    batches = staged_batches()
    early = ["layer1.weight", "layer1.bias", "layer2.weight", "layer2.bias"]
    late = ["layer3.weight", "layer3.bias", "fc.weight", "fc.bias"]
    names = early if side == "early" else late
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches, params=names))

    report = analyze_hessian(
        model,
        batches,
        params=side,
        threshold="layer3",
        quantities=("eigenvalues",),
        top_k=2,
        tol=1e-8,
        dtype=torch.float64,
    )

    assert report.parameter_names == tuple(names)
    assert report.settings.params == side
    assert report.top_eigenvalues == pytest.approx(exact.flip(0)[:2].tolist(), rel=1e-4)


def test_name_patterns_select_parameters():
    model = staged_model()

    assert select_parameters(model, ["fc.*", "layer1.bias"]) == ["layer1.bias", "fc.weight", "fc.bias"]
    assert select_parameters(model, "layer2.*") == ["layer2.weight", "layer2.bias"]
    with pytest.raises(HessianError, match=r"parameter pattern 'head.\*' matches no parameter"):
        select_parameters(model, ["head.*"])
    with pytest.raises(ValueError, match=r"threshold block 'layer9' not found"):
        select_parameters(model, "early", threshold="layer9")


def test_power_method_reports_both_ends():
    case = case_by_name("mlp")
    exact = torch.linalg.eigvalsh(dense_hessian(case.model, case.batches))

    report = analyze_hessian(
        case.model,
        case.batches,
        quantities=("eigenvalues",),
        method="power",
        which="both",
        top_k=1,
        tol=1e-9,
        max_iter=2000,
        dtype=torch.float64,
    )

    assert report.top_eigenvalues == pytest.approx([float(exact[-1])], rel=1e-4)
    assert report.bottom_eigenvalues == pytest.approx([float(exact[0])], rel=1e-4)
    assert [result.which for result in report.eigen_results] == ["largest", "smallest"]


def test_pyhessian_engine_report():
    case = case_by_name("mlp")
    exact = torch.linalg.eigvalsh(dense_hessian(case.model, case.batches))

    report = analyze_hessian(
        case.model, case.batches, engine="pyhessian", top_k=1, trace_samples=10, density_steps=10, dtype=torch.float64
    )

    assert report.settings.method == "power"
    assert report.settings.which == "magnitude"
    assert report.settings.hvp_mode == "pyhessian"
    assert report.top_eigenvalues == pytest.approx([float(exact[-1])], rel=1e-3)
    assert report.costs["density"].num_matvecs == 10
    assert report.costs["trace"].num_matvecs == report.trace.num_samples


def test_analysis_rejects_bad_settings():
    case = case_by_name("mlp")

    with pytest.raises(HessianError, match=r"use engine='default' for the most negative ones"):
        analyze_hessian(case.model, case.batches, engine="pyhessian", which="smallest")
    with pytest.raises(HessianError, match=r"quantities must be a non-empty subset"):
        analyze_hessian(case.model, case.batches, quantities=("curvature",))
    with pytest.raises(HessianError, match=r"top_k must be <= the number of selected parameters \(57\), got 58"):
        analyze_hessian(case.model, case.batches, top_k=58)
    with pytest.raises(HessianError, match=r"lanczos_start must be 'gradient' or 'random', got 'ones'"):
        analyze_hessian(case.model, case.batches, lanczos_start="ones")


def test_plots_written_with_log_density(tmp_path):
    case = case_by_name("mlp")
    reports = {
        f"generation {seed}": analyze_hessian(
            case.model, case.batches, top_k=3, trace_samples=3, density_steps=8, seed=seed, quantities=("eigenvalues", "density")
        )
        for seed in (0, 1)
    }

    density_figure = plot_density(reports, tmp_path / "density.png")
    eigen_figure = plot_top_eigenvalues(reports, tmp_path / "top.png")

    for path in (tmp_path / "density.png", tmp_path / "top.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    density_axes = density_figure.axes[0]
    assert density_axes.get_yscale() == "log"
    assert density_axes.get_xlabel() == "Eigenvalue"
    assert density_axes.get_title() == "Hessian eigenvalue spectral density"
    assert [text.get_text() for text in density_axes.get_legend().get_texts()] == ["generation 0", "generation 1"]
    eigen_axes = eigen_figure.axes[0]
    assert [text.get_text() for text in eigen_axes.get_legend().get_texts()] == ["generation 0", "generation 1"]
    assert eigen_axes.get_ylabel() == "Eigenvalue"


def test_plot_without_density_raises(tmp_path):
    case = case_by_name("mlp")
    report = analyze_hessian(case.model, case.batches, quantities=("eigenvalues",), top_k=1)

    with pytest.raises(HessianError, match=r"report 'only eigenvalues' has no spectral density"):
        plot_density({"only eigenvalues": report}, tmp_path / "density.png")
    assert isinstance(report, HessianReport)
