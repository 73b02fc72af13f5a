"""One-call Hessian analysis of a model: eigenvalues, trace and spectral density in a JSON-serialisable report."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from seal_probe.hessian.algorithms import (
    DEFAULT_GRID_POINTS,
    DEFAULT_SIGMA_SQUARED,
    EigenResult,
    SpectralDensity,
    TraceResult,
    hutchinson_trace,
    hutchpp_trace,
    gradient_start,
    lanczos,
    power_iteration,
    spectral_density,
)
from seal_probe.hessian.operators import HessianError, HessianOperator, HvpMode, LossFn, ModelMode
from seal_probe.hessian.pyhessian_engine import PyHessianEngine, TraceLoop
from seal_probe.hessian.selection import ParameterSpec, select_parameters

logger = logging.getLogger(__name__)

QUANTITIES = ("eigenvalues", "trace", "density")
LANCZOS_STARTS = ("gradient", "random")

# PyHessian's authors (Yao et al. 2020) report that estimates on small samples vary widely (top
# eigenvalue 159 to 1587 over ten runs on 128 examples) and that about 4,096 CIFAR-10 examples
# give stable numbers.
STABLE_NUM_EXAMPLES = 4096


@dataclass(frozen=True)
class HessianSettings:
    """Every setting behind a HessianReport, so each number can be traced to how it was made."""

    engine: str
    method: str
    which: str
    top_k: int
    tol: float
    max_iter: int | None
    lanczos_criterion: str
    trace_method: str
    trace_samples: int
    density_steps: int
    density_runs: int
    sigma_squared: float
    params: str | list[str]
    threshold: str
    weight_decay: float
    dtype: str
    mode: str
    allow_train_mode: bool
    hvp_mode: str
    cache_graph: bool
    finite_differences: bool
    pyhessian_trace_loop: str
    quantities: list[str]
    seed: int
    seeds: dict[str, int]
    num_examples: int
    num_batches: int
    num_parameters: int
    device: str
    torch_version: str
    lanczos_start: str = "random"


@dataclass(frozen=True)
class QuantityCost:
    """Hessian-vector products and wall-clock seconds spent on one quantity."""

    num_matvecs: int
    seconds: float


@dataclass(frozen=True)
class HessianReport:
    """Results of analyze_hessian with their settings.

    top_eigenvalues are in decreasing order and bottom_eigenvalues in increasing order (most
    negative first); each residual is ||H v - lambda v|| for the unit eigenvector estimate v.
    `costs` has one entry per computed quantity plus "setup" (model copy, batch transfer and one
    gradient to find parameters without a gradient).
    """

    settings: HessianSettings
    parameter_names: tuple[str, ...]
    excluded_parameters: dict[str, str]
    gradient_norm: float
    top_eigenvalues: tuple[float, ...] = ()
    top_residuals: tuple[float, ...] = ()
    bottom_eigenvalues: tuple[float, ...] = ()
    bottom_residuals: tuple[float, ...] = ()
    eigen_results: tuple[EigenResult, ...] = ()
    trace: TraceResult | None = None
    density: SpectralDensity | None = None
    costs: dict[str, QuantityCost] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-compatible dictionary with every setting and result."""
        return {
            "settings": asdict(self.settings),
            "parameter_names": list(self.parameter_names),
            "excluded_parameters": dict(self.excluded_parameters),
            "gradient_norm": self.gradient_norm,
            "top_eigenvalues": list(self.top_eigenvalues),
            "top_residuals": list(self.top_residuals),
            "bottom_eigenvalues": list(self.bottom_eigenvalues),
            "bottom_residuals": list(self.bottom_residuals),
            "eigen_results": [result.to_dict() for result in self.eigen_results],
            "trace": None if self.trace is None else self.trace.to_dict(),
            "density": None if self.density is None else self.density.to_dict(),
            "costs": {name: asdict(cost) for name, cost in self.costs.items()},
        }

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON text, and write it to `path` when given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HessianReport:
        """Rebuild a report from to_dict() output."""
        trace = data.get("trace")
        density = data.get("density")
        if trace is not None:
            trace = TraceResult(**{**trace, "samples": tuple(trace["samples"]), "notes": tuple(trace["notes"])})
        if density is not None:
            density = SpectralDensity(
                **{
                    **density,
                    "nodes": tuple(tuple(run) for run in density["nodes"]),
                    "weights": tuple(tuple(run) for run in density["weights"]),
                    "grid": tuple(density["grid"]),
                    "values": tuple(density["values"]),
                }
            )
        eigen_results = tuple(
            EigenResult(**{**result, "values": tuple(result["values"]), "residuals": tuple(result["residuals"])})
            for result in data.get("eigen_results", [])
        )
        return cls(
            settings=HessianSettings(**data["settings"]),
            parameter_names=tuple(data["parameter_names"]),
            excluded_parameters=dict(data["excluded_parameters"]),
            gradient_norm=data["gradient_norm"],
            top_eigenvalues=tuple(data["top_eigenvalues"]),
            top_residuals=tuple(data["top_residuals"]),
            bottom_eigenvalues=tuple(data["bottom_eigenvalues"]),
            bottom_residuals=tuple(data["bottom_residuals"]),
            eigen_results=eigen_results,
            trace=trace,
            density=density,
            costs={name: QuantityCost(**cost) for name, cost in data["costs"].items()},
        )


def load_report(path: str | Path) -> HessianReport:
    """Read a HessianReport written by HessianReport.to_json."""
    return HessianReport.from_dict(json.loads(Path(path).read_text()))


def _validate_choices(
    *, engine: str, method: str, which: str, trace_method: str, quantities: Sequence[str], lanczos_start: str
) -> None:
    if engine not in ("default", "pyhessian"):
        raise HessianError(f"engine must be 'default' or 'pyhessian', got {engine!r}")
    if method not in ("lanczos", "power"):
        raise HessianError(f"method must be 'lanczos' or 'power', got {method!r}")
    if which not in ("largest", "smallest", "both"):
        raise HessianError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if trace_method not in ("hutchinson", "hutchpp"):
        raise HessianError(f"trace_method must be 'hutchinson' or 'hutchpp', got {trace_method!r}")
    if lanczos_start not in LANCZOS_STARTS:
        raise HessianError(f"lanczos_start must be 'gradient' or 'random', got {lanczos_start!r}")
    unknown = [name for name in quantities if name not in QUANTITIES]
    if unknown or not quantities:
        raise HessianError(f"quantities must be a non-empty subset of {list(QUANTITIES)}, got {list(quantities)}")
    if engine == "pyhessian":
        if method != "power":
            raise HessianError("engine='pyhessian' computes eigenvalues by power iteration only; pass method='power'")
        if which != "largest":
            raise HessianError(
                f"engine='pyhessian' finds only the largest-magnitude eigenvalues, got which={which!r}; "
                "use engine='default' for the most negative ones"
            )
        if trace_method != "hutchinson":
            raise HessianError("engine='pyhessian' estimates the trace by Hutchinson's method only; pass trace_method='hutchinson'")


def _split_eigen_results(
    results: Sequence[EigenResult], *, which: str, k: int
) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """Return (top values, top residuals, bottom values, bottom residuals) from decreasing-order results."""
    top_values: tuple[float, ...] = ()
    top_residuals: tuple[float, ...] = ()
    bottom_values: tuple[float, ...] = ()
    bottom_residuals: tuple[float, ...] = ()
    for result in results:
        side = result.which if result.which != "magnitude" else "largest"
        if side in ("largest", "both") and which in ("largest", "both"):
            top_values = result.values[:k]
            top_residuals = result.residuals[:k]
        if side in ("smallest", "both") and which in ("smallest", "both"):
            bottom_values = tuple(reversed(result.values[-k:]))
            bottom_residuals = tuple(reversed(result.residuals[-k:]))
    return top_values, top_residuals, bottom_values, bottom_residuals


def analyze_hessian(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    *,
    loss_fn: LossFn | None = None,
    quantities: Sequence[str] = QUANTITIES,
    top_k: int = 5,
    which: Literal["largest", "smallest", "both"] = "largest",
    method: Literal["lanczos", "power"] | None = None,
    tol: float = 1e-3,
    max_iter: int | None = None,
    lanczos_criterion: Literal["residual", "gap"] = "residual",
    lanczos_start: Literal["gradient", "random"] = "gradient",
    trace_method: Literal["hutchinson", "hutchpp"] = "hutchinson",
    trace_samples: int = 100,
    density_steps: int = 100,
    density_runs: int = 1,
    sigma_squared: float = DEFAULT_SIGMA_SQUARED,
    density_points: int = DEFAULT_GRID_POINTS,
    params: ParameterSpec = "all",
    threshold: str = "layer3",
    weight_decay: float = 0.0,
    dtype: torch.dtype = torch.float32,
    mode: ModelMode = "eval",
    allow_train_mode: bool = False,
    engine: Literal["default", "pyhessian"] = "default",
    hvp_mode: HvpMode = "auto",
    cache_graph: bool | None = None,
    finite_differences: bool = False,
    pyhessian_trace_loop: TraceLoop = "pyhessian",
    min_examples: int = 1,
    seed: int = 0,
) -> HessianReport:
    """Compute the Hessian's top eigenvalues, trace and spectral density for one model and data set.

    The matrix is the Hessian of the mean loss over all examples in `batches`, plus
    weight_decay * I. loss_fn must return the batch mean (default cross-entropy). The parameters
    are selected by `params`: "all", "early" or "late" at the `threshold` block, or name patterns.
    The model is analysed as a private copy, in eval mode by default, so the audited model is
    never changed.

    - eigenvalues: top_k per side, by Lanczos (default, with tol on the relative residual) or by
      deflated power iteration (PyHessian's max_iter 100 per eigenvalue, tol 1e-3 on the relative
      change between steps).
    - trace: Hutchinson with trace_samples Rademacher vectors, or Hutch++ with trace_samples products.
    - density: stochastic Lanczos quadrature with density_steps steps averaged over density_runs
      runs, smoothed with Gaussians of variance sigma_squared * max(1, lambda_max - lambda_min).

    engine="pyhessian" computes the same quantities through PyHessian 0.1. The PyHessianEngine
    docstring lists where its numbers differ. Seeds: eigenvalues use `seed`, the trace seed + 1 and the
    density seed + 2.

    Args:
        model, batches, loss_fn, weight_decay, mode, allow_train_mode, hvp_mode, cache_graph,
            finite_differences, min_examples: as for HessianOperator.
        quantities: any of "eigenvalues", "trace", "density".
        top_k: eigenvalues per requested end of the spectrum.
        which: "largest", "smallest" (most negative) or "both".
        method: "lanczos" or "power"; default "lanczos", and "power" for engine="pyhessian".
        tol: eigenvalue tolerance; PyHessian also uses it for its trace stopping rule.
        lanczos_criterion: Lanczos error estimate, "residual" (a bound) or "gap" (see lanczos).
        lanczos_start: "gradient" starts Lanczos from the unit loss gradient plus a unit Gaussian
            vector (see gradient_start), which converges in fewer products; "random" from a
            Gaussian vector. Trace and density always use random probes.
        max_iter: Lanczos steps (default min(n, max(100, 12 top_k))) or power steps per eigenvalue (100).
        trace_method: "hutchinson" or "hutchpp".
        trace_samples: Hutchinson samples, Hutch++ products, or PyHessian's trace maxIter.
        density_steps, density_runs: Lanczos steps per quadrature run, and the number of runs.
        sigma_squared, density_points: smoothing variance factor and minimum grid size.
        params, threshold: parameter selection, see select_parameters.
        dtype: torch.float32 or torch.float64 for the copy and all products.
        engine: "default" or "pyhessian".
        pyhessian_trace_loop: "pyhessian" keeps its stopping rule, "fixed" draws trace_samples samples.
        seed: base seed, see above.
    """
    if method is None:
        method = "power" if engine == "pyhessian" else "lanczos"
    quantities = list(dict.fromkeys(quantities))
    _validate_choices(
        engine=engine, method=method, which=which, trace_method=trace_method, quantities=quantities, lanczos_start=lanczos_start
    )
    if "eigenvalues" in quantities and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise HessianError(f"top_k must be an integer >= 1, got {top_k!r}")
    seeds = {"eigenvalues": seed, "trace": seed + 1, "density": seed + 2}
    costs: dict[str, QuantityCost] = {}

    started = time.perf_counter()
    names = select_parameters(model, params, threshold=threshold)
    computer: PyHessianEngine | None = None
    if engine == "pyhessian":
        if mode != "eval":
            raise HessianError(f"engine='pyhessian' always puts the model in eval mode, got mode={mode!r}")
        computer = PyHessianEngine(
            model, batches, loss_fn=loss_fn, params=names, weight_decay=weight_decay, dtype=dtype, min_examples=min_examples
        )
        operator = computer.operator
    else:
        operator = HessianOperator(
            model,
            batches,
            loss_fn=loss_fn,
            params=names,
            weight_decay=weight_decay,
            dtype=dtype,
            mode=mode,
            allow_train_mode=allow_train_mode,
            hvp_mode=hvp_mode,
            cache_graph=cache_graph,
            finite_differences=finite_differences,
            min_examples=min_examples,
            seed=seed,
        )
    costs["setup"] = QuantityCost(num_matvecs=0, seconds=time.perf_counter() - started)
    if operator.num_examples < STABLE_NUM_EXAMPLES:
        logger.warning(
            "Computing the Hessian on %d examples; PyHessian's authors report widely varying estimates on "
            "small samples and stable ones from about %d examples",
            operator.num_examples,
            STABLE_NUM_EXAMPLES,
        )
    if "eigenvalues" in quantities and top_k > operator.size:
        raise HessianError(f"top_k must be <= the number of selected parameters ({operator.size}), got {top_k}")

    counted: PyHessianEngine | HessianOperator = computer if computer is not None else operator

    def measure(name: str, compute):
        before = counted.num_matvecs
        begin = time.perf_counter()
        result = compute()
        after = counted.num_matvecs
        costs[name] = QuantityCost(num_matvecs=after - before, seconds=time.perf_counter() - begin)
        logger.info("Computed %s in %.1f s with %d products", name, costs[name].seconds, after - before)
        return result

    eigen_results: list[EigenResult] = []
    if "eigenvalues" in quantities:
        eigen_results = measure(
            "eigenvalues",
            lambda: _compute_eigenvalues(
                counted,
                method=method,
                which=which,
                k=top_k,
                tol=tol,
                max_iter=max_iter,
                criterion=lanczos_criterion,
                start=lanczos_start,
                seed=seeds["eigenvalues"],
            ),
        )

    trace = None
    if "trace" in quantities:
        if computer is not None:
            trace = measure(
                "trace",
                lambda: computer.trace(max_iter=trace_samples, tol=tol, seed=seeds["trace"], loop=pyhessian_trace_loop),
            )
        elif trace_method == "hutchinson":
            trace = measure("trace", lambda: hutchinson_trace(operator, num_samples=trace_samples, seed=seeds["trace"]))
        else:
            trace = measure("trace", lambda: hutchpp_trace(operator, num_matvecs=trace_samples, seed=seeds["trace"]))

    density = None
    if "density" in quantities:
        options = {
            "num_steps": density_steps,
            "num_runs": density_runs,
            "seed": seeds["density"],
            "sigma_squared": sigma_squared,
            "num_points": density_points,
        }
        if computer is not None:
            density = measure("density", lambda: computer.density(**options))
        else:
            density = measure("density", lambda: spectral_density(operator, **options))

    top_values, top_residuals, bottom_values, bottom_residuals = _split_eigen_results(
        eigen_results, which=which, k=top_k
    )
    settings = HessianSettings(
        engine=engine,
        method=method,
        which="magnitude" if engine == "pyhessian" else which,
        top_k=top_k,
        tol=tol,
        max_iter=max_iter,
        lanczos_criterion=lanczos_criterion,
        lanczos_start=lanczos_start if method == "lanczos" else "random",
        trace_method=trace_method,
        trace_samples=trace_samples,
        density_steps=density_steps,
        density_runs=density_runs,
        sigma_squared=sigma_squared,
        params=params if isinstance(params, str) else list(params),
        threshold=threshold,
        weight_decay=weight_decay,
        dtype=str(operator.dtype).removeprefix("torch."),
        mode=mode,
        allow_train_mode=allow_train_mode,
        hvp_mode="pyhessian" if engine == "pyhessian" else operator.hvp_mode,
        cache_graph=operator.cache_graph,
        finite_differences=finite_differences,
        pyhessian_trace_loop=pyhessian_trace_loop,
        quantities=quantities,
        seed=seed,
        seeds=seeds,
        num_examples=operator.num_examples,
        num_batches=len(operator.batches),
        num_parameters=operator.size,
        device=str(operator.device),
        torch_version=torch.__version__,
    )
    return HessianReport(
        settings=settings,
        parameter_names=operator.parameter_names,
        excluded_parameters=dict(operator.excluded_parameters),
        gradient_norm=operator.gradient_norm,
        top_eigenvalues=top_values,
        top_residuals=top_residuals,
        bottom_eigenvalues=bottom_values,
        bottom_residuals=bottom_residuals,
        eigen_results=tuple(eigen_results),
        trace=trace,
        density=density,
        costs=costs,
    )


def _compute_eigenvalues(
    computer: HessianOperator | PyHessianEngine,
    *,
    method: str,
    which: str,
    k: int,
    tol: float,
    max_iter: int | None,
    criterion: str,
    start: str,
    seed: int,
) -> list[EigenResult]:
    if isinstance(computer, PyHessianEngine):
        return [computer.eigenvalues(k=k, max_iter=max_iter or 100, tol=tol, seed=seed)]
    if method == "lanczos":
        vector = gradient_start(computer, computer.data_gradient, seed=seed) if start == "gradient" else None
        return [
            lanczos(computer, k=k, which=which, tol=tol, max_iter=max_iter, criterion=criterion, seed=seed, start=vector)
        ]
    sides = ["largest", "smallest"] if which == "both" else [which]
    return [
        power_iteration(computer, k=k, which=side, max_iter=max_iter or 100, tol=tol, seed=seed + offset)
        for offset, side in enumerate(sides)
    ]
