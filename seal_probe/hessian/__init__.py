"""Curvature analysis: Hessian eigenvalues, trace and spectral density of a model's mean loss."""

from seal_probe.hessian.algorithms import (
    EigenResult,
    SpectralDensity,
    TraceResult,
    gaussian_density,
    gradient_start,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    slq_quadrature,
    spectral_density,
)
from seal_probe.hessian.analysis import (
    STABLE_NUM_EXAMPLES,
    HessianReport,
    HessianSettings,
    QuantityCost,
    analyze_hessian,
    load_report,
)
from seal_probe.hessian.operators import (
    HessianError,
    HessianOperator,
    LinearOperator,
    MatrixOperator,
    SecondDerivativeError,
    ShiftedOperator,
    deterministic_numerics,
)
from seal_probe.hessian.plots import plot_density, plot_top_eigenvalues
from seal_probe.hessian.pyhessian_engine import PyHessianEngine, pyhessian_compatibility
from seal_probe.hessian.selection import select_parameters

__all__ = [
    "STABLE_NUM_EXAMPLES",
    "EigenResult",
    "HessianError",
    "HessianOperator",
    "HessianReport",
    "HessianSettings",
    "LinearOperator",
    "MatrixOperator",
    "PyHessianEngine",
    "QuantityCost",
    "SecondDerivativeError",
    "ShiftedOperator",
    "SpectralDensity",
    "TraceResult",
    "analyze_hessian",
    "deterministic_numerics",
    "gaussian_density",
    "gradient_start",
    "hutchinson_trace",
    "hutchpp_trace",
    "lanczos",
    "load_report",
    "plot_density",
    "plot_top_eigenvalues",
    "power_iteration",
    "pyhessian_compatibility",
    "select_parameters",
    "slq_quadrature",
    "spectral_density",
]
