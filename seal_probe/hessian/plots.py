"""Plots of Hessian reports: spectral densities and top eigenvalues of several checkpoints overlaid."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from seal_probe.hessian.analysis import HessianReport
from seal_probe.hessian.operators import HessianError

# PyHessian's density plot adds 1e-7 before taking the log; values are clipped at the same floor.
DENSITY_FLOOR = 1e-7


def _new_figure() -> Figure:
    figure = Figure(figsize=(7.0, 4.5), layout="tight")
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=150)


def plot_density(
    reports: Mapping[str, HessianReport],
    path: str | Path,
    *,
    title: str = "Hessian eigenvalue spectral density",
) -> Figure:
    """Overlay the smoothed spectral densities of several reports on a log-scale y axis and save the figure.

    The keys of `reports` become the legend labels. Returns the figure (not registered with pyplot).
    """
    if not reports:
        raise HessianError("plot_density needs at least one report")
    figure = _new_figure()
    axes = figure.add_subplot()
    for label, report in reports.items():
        if report.density is None:
            raise HessianError(f"report {label!r} has no spectral density; compute it with 'density' in quantities")
        values = np.maximum(np.asarray(report.density.values), DENSITY_FLOOR)
        axes.semilogy(report.density.grid, values, label=label, linewidth=1.2)

    axes.set_xlabel("Eigenvalue")
    axes.set_ylabel("Density (log scale)")
    axes.set_title(title)
    axes.legend()
    _save(figure, path)
    return figure


def plot_top_eigenvalues(
    reports: Mapping[str, HessianReport],
    path: str | Path,
    *,
    title: str = "Top Hessian eigenvalues",
) -> Figure:
    """Plot each report's top eigenvalues against their rank, with residual norms as error bars, and save the figure.

    For a symmetric matrix an eigenvalue lies within the residual norm of each estimate, so the
    bars bound the error. Returns the figure (not registered with pyplot).
    """
    if not reports:
        raise HessianError("plot_top_eigenvalues needs at least one report")
    figure = _new_figure()
    axes = figure.add_subplot()
    for label, report in reports.items():
        if not report.top_eigenvalues:
            raise HessianError(
                f"report {label!r} has no top eigenvalues; compute them with which='largest' or 'both'"
            )
        ranks = np.arange(1, len(report.top_eigenvalues) + 1)
        axes.errorbar(ranks, report.top_eigenvalues, yerr=report.top_residuals, marker="o", capsize=3, label=label)

    axes.set_xlabel("Rank")
    axes.set_ylabel("Eigenvalue")
    axes.set_title(title)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.legend()
    _save(figure, path)
    return figure
