"""Hessian eigenvalues, trace and density computed by PyHessian 0.1's `hessian` class, made to run on current PyTorch."""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import types
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from seal_probe.hessian.algorithms import (
    DEFAULT_GRID_POINTS,
    DEFAULT_SIGMA_SQUARED,
    EigenResult,
    SpectralDensity,
    TraceResult,
    _mean_and_stderr,
    density_result,
    gaussian_density,
)
from seal_probe.hessian.operators import HessianError, HessianOperator, LossFn, deterministic_numerics

logger = logging.getLogger(__name__)

TraceLoop = Literal["pyhessian", "fixed"]


def _symmetric_eig(input: torch.Tensor, eigenvectors: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stand in for torch.eig (removed in PyTorch 1.9) on the symmetric tridiagonal that PyHessian passes.

    Returns torch.eig's layout: an (n, 2) tensor of (real, imaginary) eigenvalue parts, with the
    imaginary parts zero, and the eigenvectors as columns.
    """
    if not torch.equal(input, input.mT):
        raise HessianError("the torch.eig replacement handles symmetric matrices only, got a non-symmetric one")
    values, vectors = torch.linalg.eigh(input)
    packed = torch.stack([values, torch.zeros_like(values)], dim=1)
    if not eigenvectors:
        vectors = torch.empty(0, dtype=input.dtype, device=input.device)
    return packed, vectors


class _TorchWithEig(types.ModuleType):
    """Stand-in for the torch module inside PyHessian's hessian.py, with `eig` restored."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.eig = _symmetric_eig

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


@dataclass
class _CallCounters:
    """Products and power-iteration steps observed during one PyHessian call."""

    products: int = 0
    # Power-iteration steps per eigenvalue index, seen through calls to PyHessian's orthnormal().
    steps_per_eigenvalue: Counter = field(default_factory=Counter)


def _pyhessian_module() -> types.ModuleType:
    # pyhessian/__init__.py rebinds the name `pyhessian.hessian` to the class, so fetch the module itself.
    return importlib.import_module("pyhessian.hessian")


@contextlib.contextmanager
def pyhessian_compatibility(
    *, seed: int, dtype: torch.dtype, device: torch.device, counters: _CallCounters | None = None
) -> Iterator[_CallCounters]:
    """Patch PyHessian 0.1 for one call and restore everything on exit.

    Inside the block: PyHessian's `torch.eig` works again (through torch.linalg.eigh), the torch
    and numpy random number generators are seeded with `seed` (the global torch state is forked,
    so it is unchanged afterwards), the default dtype is the operator's dtype (PyHessian creates
    vectors with torch.randn and torch.zeros), TF32 is off, deterministic algorithms are on, and
    the warning that backward(create_graph=True) creates a reference cycle is silenced.
    Products and power-iteration steps are counted in the yielded counters.
    """
    module = _pyhessian_module()
    counters = counters if counters is not None else _CallCounters()
    saved_torch = module.torch
    saved_product = module.hessian_vector_product
    saved_orthnormal = module.orthnormal
    saved_dtype = torch.get_default_dtype()
    saved_numpy_state = np.random.get_state()

    def counting_product(gradients, params, vector):
        counters.products += 1
        return saved_product(gradients, params, vector)

    def counting_orthnormal(vector, basis):
        counters.steps_per_eigenvalue[len(basis)] += 1
        return saved_orthnormal(vector, basis)

    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), warnings.catch_warnings(), deterministic_numerics():
        warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True", category=UserWarning)
        try:
            torch.manual_seed(seed)
            np.random.seed(seed)
            torch.set_default_dtype(dtype)
            module.torch = _TorchWithEig()
            module.hessian_vector_product = counting_product
            module.orthnormal = counting_orthnormal
            yield counters
        finally:
            module.torch = saved_torch
            module.hessian_vector_product = saved_product
            module.orthnormal = saved_orthnormal
            torch.set_default_dtype(saved_dtype)
            np.random.set_state(saved_numpy_state)


class PyHessianEngine:
    """Compute Hessian quantities through `pyhessian.hessian` (PyHessian 0.1 from PyPI, Yao et al. 2020).

    The model copy, batches and parameter list are prepared by a HessianOperator (same checks,
    same exclusions of frozen parameters and of parameters without a gradient, which crash
    PyHessian 0.1), and PyHessian runs on that copy in eval mode with cuda=False on CPU.
    A single batch uses PyHessian's `data=` mode, which keeps the gradient graph between
    products. Several batches use its `dataloader=` mode, which weights each batch's product by
    its size. Both modes equal the default engine's mean-loss Hessian when loss_fn returns a
    batch mean, but a sum-reduced loss would give batch-size-weighted sums instead.

    Where the numbers differ from the default engine, and why:
    - eigenvalues: deflated power iteration converges to the eigenvalues of largest magnitude,
      not the algebraically largest. It stops when the Rayleigh quotient changes by less than tol
      relative between two steps. With a small spectral gap that happens well before the
      estimate is within tol of the eigenvalue. Later eigenvalues inherit the error of earlier vectors. Its
      vector normalisation adds 1e-6 to the norm. The vector it returns is the next iterate
      (normalised H v), not the vector whose Rayleigh quotient it returns, and the residuals
      computed here (one extra PyHessian product per eigenvalue) are those of the returned vector.
    - trace: PyHessian stops when the running mean of z^T H z changes by less than tol relative,
      and its test divides by (running mean + 1e-6), so it stops after two samples whenever the
      running mean is negative. The result's notes record when either happened. loop="fixed"
      draws exactly the requested number of samples with PyHessian's own products.
    - density: the same stochastic Lanczos quadrature, but PyHessian builds and diagonalises the
      tridiagonal in the default dtype (set here to the operator's dtype, float32 unless
      dtype=torch.float64) rather than float64, and after a breakdown it continues from a
      Gaussian vector rather than stopping. Its nodes and weights are smoothed
      with the same gaussian_density as the default engine.
    - random numbers: PyHessian draws from the global torch generator, seeded here per call, so
      its samples differ from the default engine's at the same seed.
    - weight decay: PyHessian has none, so weight_decay * I is added to the results afterwards
      (eigenvalues and density nodes shift by weight_decay, each trace sample by weight_decay * n).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[tuple[Any, Any]],
        *,
        loss_fn: LossFn | None = None,
        params: Sequence[str] | None = None,
        weight_decay: float = 0.0,
        dtype: torch.dtype | None = None,
        min_examples: int = 1,
    ) -> None:
        self.operator = HessianOperator(
            model,
            batches,
            loss_fn=loss_fn,
            params=params,
            weight_decay=0.0,
            dtype=dtype,
            mode="eval",
            min_examples=min_examples,
        )
        if not math.isfinite(weight_decay) or weight_decay < 0:
            raise HessianError(f"weight_decay must be finite and >= 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        self.num_matvecs = 0

    @property
    def size(self) -> int:
        return self.operator.size

    @property
    def num_examples(self) -> int:
        return self.operator.num_examples

    # -- PyHessian objects ----------------------------------------------------------------

    @contextlib.contextmanager
    def _session(self, seed: int) -> Iterator[tuple[Any, _CallCounters]]:
        """Yield a fresh `pyhessian.hessian` object on the prepared model, then release its graph."""
        model = self.operator.private_model
        selected = set(self.operator.parameter_names)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name in selected)
        batches = [(batch.inputs, batch.targets) for batch in self.operator.batches]
        device = self.operator.device
        counters = _CallCounters()

        try:
            with pyhessian_compatibility(seed=seed, dtype=self.operator.dtype, device=device, counters=counters):
                module = _pyhessian_module()
                cuda = device.type == "cuda"
                if len(batches) == 1:
                    computer = module.hessian(model, self.operator.loss_fn, data=batches[0], cuda=cuda)
                else:
                    computer = module.hessian(model, self.operator.loss_fn, dataloader=batches, cuda=cuda)
                    original = computer.dataloader_hv_product

                    def counting_dataloader_product(vector):
                        counters.products += 1
                        return original(vector)

                    computer.dataloader_hv_product = counting_dataloader_product
                yield computer, counters
        finally:
            for parameter in model.parameters():
                parameter.grad = None
                parameter.requires_grad_(False)
            self.num_matvecs += counters.products

    @staticmethod
    def _product(computer: Any, vector: list[torch.Tensor]) -> list[torch.Tensor]:
        if computer.full_dataset:
            return list(computer.dataloader_hv_product(vector)[1])
        module = _pyhessian_module()
        return list(module.hessian_vector_product(computer.gradsH, computer.params, vector))

    # -- quantities -------------------------------------------------------------------------

    def eigenvalues(self, *, k: int = 1, max_iter: int = 100, tol: float = 1e-3, seed: int = 0) -> EigenResult:
        """Return PyHessian's top-k eigenvalues (largest magnitude) with residuals, in decreasing algebraic order."""
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise HessianError(f"k must be an integer >= 1, got {k!r}")
        if k > self.size:
            raise HessianError(f"k must be <= the number of parameters ({self.size}), got {k}")

        with self._session(seed) as (computer, counters):
            values, vectors = computer.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
            steps = [counters.steps_per_eigenvalue[index] for index in range(k)]
            residuals = []
            flat_vectors = []
            for value, vector in zip(values, vectors):
                norm = math.sqrt(sum(float((piece * piece).sum()) for piece in vector))
                unit = [piece / norm for piece in vector]
                product = self._product(computer, unit)
                squared = sum(float(((hv - value * u) ** 2).sum()) for hv, u in zip(product, unit))
                residuals.append(math.sqrt(squared))
                flat_vectors.append(torch.cat([piece.reshape(-1) for piece in unit]))

        order = sorted(range(k), key=lambda index: -values[index])
        converged = all(count < max_iter for count in steps)
        return EigenResult(
            values=tuple(float(values[index]) + self.weight_decay for index in order),
            residuals=tuple(residuals[index] for index in order),
            method="pyhessian_power",
            which="magnitude",
            tol=tol,
            num_iterations=sum(steps),
            num_matvecs=counters.products,
            converged=converged,
            vectors=torch.stack([flat_vectors[index] for index in order]),
        )

    def trace(
        self, *, max_iter: int = 100, tol: float = 1e-3, seed: int = 0, loop: TraceLoop = "pyhessian"
    ) -> TraceResult:
        """Estimate the trace by Hutchinson's method with PyHessian's products.

        loop="pyhessian" calls hessian.trace(maxIter, tol) and keeps its stopping rule (see the class
        docstring); loop="fixed" draws exactly max_iter Rademacher samples.
        """
        if loop not in ("pyhessian", "fixed"):
            raise HessianError(f"loop must be 'pyhessian' or 'fixed', got {loop!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 2:
            raise HessianError(f"max_iter must be an integer >= 2, got {max_iter!r}")

        notes: list[str] = []
        with self._session(seed) as (computer, counters):
            if loop == "pyhessian":
                samples = [float(sample) for sample in computer.trace(maxIter=max_iter, tol=tol)]
                notes.extend(self._describe_trace_stop(samples, max_iter=max_iter, tol=tol))
            else:
                samples = []
                for _ in range(max_iter):
                    probe = [torch.randint_like(p, high=2) * 2 - 1 for p in computer.params]
                    product = self._product(computer, probe)
                    samples.append(sum(float((hv * z).sum()) for hv, z in zip(product, probe)))

        shift = self.weight_decay * self.size
        samples = [sample + shift for sample in samples]
        value, stderr = _mean_and_stderr(samples)
        return TraceResult(
            value=value,
            stderr=stderr,
            num_samples=len(samples),
            num_matvecs=counters.products,
            method=f"pyhessian_hutchinson_{loop}",
            samples=tuple(samples),
            notes=tuple(notes),
        )

    @staticmethod
    def _describe_trace_stop(samples: list[float], *, max_iter: int, tol: float) -> list[str]:
        if len(samples) >= max_iter:
            return []
        running_mean = float(np.mean(samples[:-1]))
        if running_mean + 1e-6 < 0:
            note = (
                f"PyHessian stopped after {len(samples)} of {max_iter} samples because the running mean "
                f"{running_mean:.6g} was negative, which its relative-change test treats as converged"
            )
        else:
            note = (
                f"PyHessian stopped after {len(samples)} of {max_iter} samples because the running mean "
                f"changed by less than tol={tol:g} relative"
            )
        logger.warning("%s; pass loop='fixed' for a fixed number of samples", note)
        return [note]

    def density(
        self,
        *,
        num_steps: int = 100,
        num_runs: int = 1,
        seed: int = 0,
        sigma_squared: float = DEFAULT_SIGMA_SQUARED,
        num_points: int = DEFAULT_GRID_POINTS,
    ) -> SpectralDensity:
        """Run PyHessian's density(iter, n_v) and smooth its nodes and weights with gaussian_density."""
        for name, value in (("num_steps", num_steps), ("num_runs", num_runs)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HessianError(f"{name} must be an integer >= 1, got {value!r}")
        if num_steps > self.size:
            raise HessianError(
                f"num_steps must be <= the number of parameters ({self.size}) for PyHessian's Lanczos, got {num_steps}"
            )

        with self._session(seed) as (computer, counters):
            eigen_runs, weight_runs = computer.density(iter=num_steps, n_v=num_runs)

        nodes = [np.asarray(run, dtype=np.float64) + self.weight_decay for run in eigen_runs]
        weights = [np.asarray(run, dtype=np.float64) for run in weight_runs]
        weights = [run / run.sum() for run in weights]
        grid, values, variance = gaussian_density(nodes, weights, sigma_squared=sigma_squared, num_points=num_points)
        return density_result(
            nodes,
            weights,
            grid=grid,
            density=values,
            sigma_squared=sigma_squared,
            variance=variance,
            num_steps=num_steps,
            num_matvecs=counters.products,
        )
