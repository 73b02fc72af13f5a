"""Report plots that compare strategies across generations; every figure is readable without the code."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

if TYPE_CHECKING:
    from .report import CheckpointEntry


def _by_run(entries: list["CheckpointEntry"]) -> dict[str, list["CheckpointEntry"]]:
    runs: dict[str, list] = defaultdict(list)
    for entry in entries:
        runs[entry.run].append(entry)
    return {run: sorted(members, key=lambda e: e.generation) for run, members in runs.items()}


def _final(entries: list["CheckpointEntry"]) -> list["CheckpointEntry"]:
    return [members[-1] for members in _by_run(entries).values()]


def _save(figure: plt.Figure, path: Path, *, rect: tuple[float, float, float, float] = (0, 0, 1, 1)) -> Path:
    figure.tight_layout(rect=rect)
    temporary = path.with_name(f".{path.stem}.partial.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)
    return path


def _line_plot(entries, value, *, title: str, ylabel: str, path: Path, error=None, percent: bool = False) -> Path | None:
    """Plot value(entry) against generation, one line per run; return None when no entry has a value."""
    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    plotted = False
    for run, members in _by_run(entries).items():
        points = [(e.generation, value(e), error(e) if error else None) for e in members if value(e) is not None]
        if not points:
            continue
        generations = [p[0] for p in points]
        values = np.array([p[1] for p in points]) * (100 if percent else 1)
        if error is not None and any(p[2] is not None for p in points):
            # A point without an interval (too few examples) gets no bar rather than hiding all bars.
            errors = np.array([p[2] if p[2] is not None else (np.nan, np.nan) for p in points]).T * (100 if percent else 1)
            axes.errorbar(generations, values, yerr=errors, marker="o", capsize=3, label=run)
        else:
            axes.plot(generations, values, marker="o", label=run)
        plotted = True
    if not plotted:
        plt.close(figure)
        return None
    axes.set_xlabel("Generation")
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend(title="Run (strategy)")
    return _save(figure, path)


def _depth_error(entry) -> tuple[float, float] | None:
    depth = entry.results.get("depth", {})
    ci = depth.get("mean_depth_ci95")
    mean = depth.get("mean_depth")
    if ci is None or mean is None:
        return None
    return (mean - ci[0], ci[1] - mean)


def plot_depth_histograms(entries, path: Path, *, group: str) -> Path | None:
    """Grouped bars: the fraction of queries at each prediction depth, for each run's final generation."""
    finals = [e for e in _final(entries) if "depth" in e.results]
    if not finals:
        return None
    layers = list(finals[0].results["depth"]["depth_histogram"])
    figure, axes = plt.subplots(figsize=(max(6.5, 0.7 * len(layers) * len(finals) / 2 + 3), 4.2))
    width = 0.8 / (len(finals) + 1)
    positions = np.arange(len(layers) + 1)
    for index, entry in enumerate(finals):
        depth = entry.results["depth"]
        total = depth["num_consistent"] + depth["num_never_consistent"]
        counts = [*depth["depth_histogram"].values(), depth["num_never_consistent"]]
        axes.bar(positions + index * width, np.array(counts) / total, width, label=f"{entry.run} (generation {entry.generation})")
    axes.set_xticks(positions + width * (len(finals) - 1) / 2)
    axes.set_xticklabels([f"{i}: {name}" for i, name in enumerate(layers)] + ["never\nconsistent"], rotation=45, ha="right")
    axes.set_xlabel("Prediction depth (index: probe layer)")
    axes.set_ylabel("Fraction of query examples")
    axes.set_title(f"Prediction-depth histogram, final generations\n{group}")
    axes.legend()
    return _save(figure, path)


def plot_density_overlay(entries, path: Path, *, group: str) -> Path | None:
    """Overlay the Hessian spectral densities of each run's final generation on a log scale."""
    from .hessian import HessianReport, plot_density

    reports = {
        f"{e.run} (generation {e.generation})": HessianReport.from_dict(e.results["hessian"])
        for e in _final(entries)
        if e.results.get("hessian", {}).get("density") is not None
    }
    if not reports:
        return None
    plot_density(reports, path, title=f"Hessian eigenvalue spectral density, final generations\n{group}")
    return path


def plot_transfer_bars(entries, path: Path, *, group: str) -> Path | None:
    """Bars per generation and run: linear-probe test accuracy, and few-shot accuracy with its 95% interval."""
    with_transfer = [e for e in entries if "transfer" in e.results]
    if not with_transfer:
        return None
    runs = _by_run(with_transfer)
    generations = sorted({e.generation for e in with_transfer})
    target = with_transfer[0].results["transfer"]["target"].get("name", "target")
    has_few_shot = any(e.results["transfer"].get("few_shot") for e in with_transfer)

    figure, panels = plt.subplots(1, 2 if has_few_shot else 1, figsize=(11 if has_few_shot else 6.5, 4.2), squeeze=False)
    width = 0.8 / len(runs)
    for index, (run, members) in enumerate(runs.items()):
        by_generation = {e.generation: e.results["transfer"] for e in members}
        x = np.array([g for g in generations if g in by_generation]) + index * width
        probe = [100 * by_generation[g]["linear_probe"]["test_accuracy"] for g in generations if g in by_generation]
        bars = panels[0, 0].bar(x, probe, width, label=run)
        panels[0, 0].bar_label(bars, fmt="%.1f", fontsize=7)
        if has_few_shot:
            shots = [by_generation[g]["few_shot"] for g in generations if g in by_generation]
            bars = panels[0, 1].bar(x, [100 * s["mean"] for s in shots], width, yerr=[100 * s["ci95"] for s in shots], capsize=3, label=run)
            panels[0, 1].bar_label(bars, fmt="%.1f", fontsize=7, label_type="center")

    titles = [f"Linear probe on {target}", f"Few-shot on {target} (95% CI)"]
    for panel, title in zip(panels[0], titles):
        panel.set_xticks(np.array(generations) + width * (len(runs) - 1) / 2)
        panel.set_xticklabels([str(g) for g in generations])
        panel.set_xlabel("Generation")
        panel.set_ylabel("Test accuracy (%)")
        panel.set_title(title)
        panel.set_ylim(0, 100)
    handles, labels = panels[0, 0].get_legend_handles_labels()
    figure.legend(handles, labels, title="Run (strategy)", loc="center right")
    figure.suptitle(f"Transfer of frozen features\n{group}")
    return _save(figure, path, rect=(0, 0, 0.85, 1))


def write_report_plots(entries: list["CheckpointEntry"], out_dir: Path, *, suffix: str, group: str) -> list[Path]:
    """Write every report plot of one dataset/architecture group; return the files written."""
    hessian = lambda e, key: (e.results.get("hessian", {}).get(key) or [None])[0]  # noqa: E731
    plots = [
        _line_plot(entries, lambda e: e.val_acc, title=f"Validation accuracy at the end of each generation\n{group}",
                   ylabel="Validation accuracy (%)", path=out_dir / f"accuracy{suffix}.png", percent=True),
        _line_plot(entries, lambda e: e.results.get("depth", {}).get("mean_depth"), error=_depth_error,
                   title=f"Mean prediction depth (95% CI) by generation\n{group}",
                   ylabel="Mean prediction depth (probe layers)", path=out_dir / f"depth{suffix}.png"),
        plot_depth_histograms(entries, out_dir / f"depth-histograms{suffix}.png", group=group),
        plot_density_overlay(entries, out_dir / f"density{suffix}.png", group=group),
        _line_plot(entries, lambda e: hessian(e, "top_eigenvalues"), title=f"Top Hessian eigenvalue by generation\n{group}",
                   ylabel="Top eigenvalue of the loss Hessian", path=out_dir / f"top-eigenvalue{suffix}.png"),
        plot_transfer_bars(entries, out_dir / f"transfer{suffix}.png", group=group),
    ]
    return [path for path in plots if path is not None]
