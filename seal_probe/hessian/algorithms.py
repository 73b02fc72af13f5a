"""Lanczos, deflated power iteration, Hutchinson and Hutch++ traces and spectral density for any LinearOperator."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from seal_probe.hessian.operators import HessianError, LinearOperator, ShiftedOperator
from seal_probe.hessian.reductions import dot as _dot
from seal_probe.hessian.reductions import norm as _norm
from seal_probe.hessian.reductions import projections as _projections

logger = logging.getLogger(__name__)

Which = Literal["largest", "smallest", "both"]
PowerWhich = Literal["largest", "smallest", "magnitude"]

# PyHessian's density plot (density_generate in its repository's example code) smooths with
# Gaussians of variance 1e-5 * max(1, lambda_max - lambda_min) on 10,000 grid points.
DEFAULT_SIGMA_SQUARED = 1e-5
DEFAULT_GRID_POINTS = 10_000
MAX_GRID_POINTS = 200_000
# The density grid extends this many standard deviations of the smoothing Gaussian past the
# extreme nodes, so almost no mass falls off the grid.
GRID_TAIL_STDS = 5.0


@dataclass(frozen=True)
class EigenResult:
    """Eigenvalue estimates in decreasing algebraic order, with residual norms.

    residuals[i] = ||A v_i - values[i] v_i|| for the unit vector v_i in row i of `vectors`. For a
    symmetric A, some eigenvalue lies within residuals[i] of values[i].
    """

    values: tuple[float, ...]
    residuals: tuple[float, ...]
    method: str
    which: str
    tol: float
    num_iterations: int
    num_matvecs: int
    converged: bool
    vectors: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """Return the JSON-serialisable fields (the eigenvectors are left out)."""
        data = asdict(self)
        data.pop("vectors")
        data["values"] = list(self.values)
        data["residuals"] = list(self.residuals)
        return data


@dataclass(frozen=True)
class TraceResult:
    """A stochastic trace estimate: value = mean of the samples (plus a deterministic part for Hutch++).

    stderr is the standard error of the mean, std(samples, ddof=1) / sqrt(len(samples)).
    """

    value: float
    stderr: float
    num_samples: int
    num_matvecs: int
    method: str
    samples: tuple[float, ...]
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        data = asdict(self)
        data["samples"] = list(self.samples)
        data["notes"] = list(self.notes)
        return data


@dataclass(frozen=True)
class SpectralDensity:
    """An eigenvalue spectral density from stochastic Lanczos quadrature.

    Each run r gives Lanczos nodes theta_ri (Ritz values) with weights w_ri (squared first
    components of the tridiagonal's eigenvectors, summing to 1), so that sum_i w_ri f(theta_ri)
    estimates tr f(A) / n. The smoothed density is
    rho(x) = (1 / R) * sum_r sum_i w_ri * N(x; theta_ri, variance), with
    variance = sigma_squared * max(1, lambda_max - lambda_min), evaluated on `grid` and divided by
    its trapezoidal integral so that it integrates to 1 on the grid.
    """

    nodes: tuple[tuple[float, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    grid: tuple[float, ...]
    values: tuple[float, ...]
    sigma_squared: float
    variance: float
    num_steps: int
    num_runs: int
    num_matvecs: int

    def to_dict(self) -> dict:
        return {
            "nodes": [list(run) for run in self.nodes],
            "weights": [list(run) for run in self.weights],
            "grid": list(self.grid),
            "values": list(self.values),
            "sigma_squared": self.sigma_squared,
            "variance": self.variance,
            "num_steps": self.num_steps,
            "num_runs": self.num_runs,
            "num_matvecs": self.num_matvecs,
        }


# -- helpers ----------------------------------------------------------------------------------


def _require_int(name: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HessianError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _require_tol(tol: float) -> None:
    if not (math.isfinite(tol) and tol > 0):
        raise HessianError(f"tol must be finite and > 0, got {tol}")


def _generator(operator: LinearOperator, seed: int) -> torch.Generator:
    generator = torch.Generator(device=operator.device)
    generator.manual_seed(int(seed))
    return generator


def _gaussian_vector(operator: LinearOperator, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(operator.size, generator=generator, device=operator.device, dtype=operator.dtype)


def _rademacher_vector(operator: LinearOperator, generator: torch.Generator) -> torch.Tensor:
    vector = torch.empty(operator.size, device=operator.device, dtype=operator.dtype)
    return vector.bernoulli_(0.5, generator=generator).mul_(2).sub_(1)


def _orthogonalise(vector: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove, in place, the components along the rows of an orthonormal basis by classical Gram-Schmidt.

    A second pass runs only when the first removed more than 1 - 1/sqrt(2) of the norm (the
    Daniel-Gragg-Kaufman-Stewart criterion), which keeps the result orthogonal to working precision.
    """
    if basis.shape[0] == 0:
        return vector
    norm_before = _norm(vector)
    # In place: a fresh vector of a large model's size costs more than the projection on CPU.
    vector.addmv_(basis.T, _projections(basis, vector), alpha=-1.0)
    if _norm(vector) < norm_before / math.sqrt(2.0):
        vector.addmv_(basis.T, _projections(basis, vector), alpha=-1.0)
    return vector


# Gaussian draws tried when Lanczos restarts in the orthogonal complement of an invariant subspace.
RESTART_DRAWS = 3


def _operator_vector(name: str, operator: LinearOperator, vector: torch.Tensor) -> torch.Tensor:
    """Return vector on the operator's device and dtype, or raise if it is not a tensor of the operator's size."""
    if not isinstance(vector, torch.Tensor):
        raise HessianError(f"{name} must be a torch.Tensor of shape ({operator.size},), got {type(vector).__name__}")
    if vector.shape != (operator.size,):
        raise HessianError(f"{name} must have shape ({operator.size},), got {tuple(vector.shape)}")
    return vector.to(device=operator.device, dtype=operator.dtype)


def _check_start(operator: LinearOperator, start: torch.Tensor) -> torch.Tensor:
    start = _operator_vector("start", operator, start)
    norm = _norm(start)
    if not math.isfinite(norm) or norm == 0.0:
        raise HessianError(f"start must be a finite, non-zero vector, got norm {norm}")
    return start


def gradient_start(operator: LinearOperator, gradient: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Return a Lanczos start vector: the unit gradient plus a unit Gaussian vector.

    For a cross-entropy loss the gradient J^T (p - y) lies in the range of J^T, like the top
    eigenvectors of the Gauss-Newton part J^T H_out J. On a random ResNet18 its cosine with the top
    eigenvector was 0.68, against about 1/sqrt(n) = 3e-4 for a Gaussian vector, and Lanczos
    reached 1e-3 accuracy in 5 products instead of 11. The Gaussian half keeps every eigenvector's
    component at least as large as from a Gaussian start alone, up to a factor sqrt(2), so an
    eigenvector orthogonal to the gradient is still found. A zero or non-finite gradient gives the
    Gaussian vector alone.
    """
    gradient = _operator_vector("gradient", operator, gradient)
    gaussian = _gaussian_vector(operator, _generator(operator, seed))
    gaussian.div_(_norm(gaussian))
    norm = _norm(gradient)
    if not math.isfinite(norm):
        logger.warning("The gradient contains NaN or infinite values (norm %s); starting Lanczos from a Gaussian vector", norm)
        return gaussian
    if norm == 0.0:
        return gaussian
    return gaussian.add_(gradient, alpha=1.0 / norm)


def _product_into(operator: LinearOperator, vector: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write operator @ vector into out, which must not overlap vector, and return out."""
    if getattr(operator, "accepts_out", False):
        return operator.matvec(vector, out=out)
    return out.copy_(operator.matvec(vector))


def _tridiagonal_eigh(alphas: Sequence[float], betas: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigen-decompose the symmetric tridiagonal matrix in float64; eigenvalues ascending."""
    size = len(alphas)
    tridiagonal = np.diag(np.asarray(alphas, dtype=np.float64))
    if size > 1:
        off = np.asarray(betas[: size - 1], dtype=np.float64)
        tridiagonal += np.diag(off, 1) + np.diag(off, -1)
    return np.linalg.eigh(tridiagonal)


# -- Lanczos ----------------------------------------------------------------------------------


@dataclass
class _Krylov:
    """A Lanczos run: T has diagonal alphas and off-diagonal betas[:-1]; betas[-1] is the final residual norm."""

    alphas: list[float]
    betas: list[float]
    basis: torch.Tensor
    exhausted: bool


def _lanczos_process(
    operator: LinearOperator,
    start: torch.Tensor,
    *,
    max_steps: int,
    generator: torch.Generator | None,
    full_reorthogonalisation: bool = True,
    should_stop: Callable[[list[float], list[float]], bool] | None = None,
) -> _Krylov:
    """Run Lanczos from `start` for at most max_steps products.

    Each step applies the three-term recurrence w = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}. With
    full_reorthogonalisation, w is then orthogonalised against the whole basis, which keeps the
    basis orthonormal and prevents spurious copies of converged Ritz values (at a cost of two
    passes over the basis per step). At an invariant subspace (beta ~ 0) the run continues from a
    random vector orthogonal to the basis when a generator is given, and stops otherwise.
    Continuing lets a single-vector Krylov method find further copies of a repeated eigenvalue,
    which one start vector cannot reach.
    """
    size = operator.size
    max_steps = min(max_steps, size)
    # Reorthogonalised residuals of an exhausted Krylov space are rounding noise of about
    # eps * ||A|| times a growth factor; sqrt(eps) * ||A|| separates them from genuine directions.
    breakdown = math.sqrt(torch.finfo(operator.dtype).eps)
    capacity = min(max_steps, 32)
    basis = torch.empty((capacity, size), device=operator.device, dtype=operator.dtype)
    basis[0] = start / _norm(start)
    count = 1
    alphas: list[float] = []
    betas: list[float] = []
    scale = 0.0
    exhausted = False

    for step in range(max_steps):
        current = basis[step]
        # The product goes straight into the next basis row when there is one, where it is
        # orthogonalised and normalised in place, which saves allocating a vector per step.
        if count < basis.shape[0]:
            residual = _product_into(operator, current, basis[count])
        else:
            residual = operator.matvec(current)
        alpha = _dot(residual, current)
        alphas.append(alpha)
        residual.sub_(current, alpha=alpha)
        if step > 0 and betas[-1] != 0.0:
            residual.sub_(basis[step - 1], alpha=betas[-1])
        if full_reorthogonalisation:
            residual = _orthogonalise(residual, basis[:count])
        beta = _norm(residual)
        scale = max(scale, abs(alpha), beta)
        betas.append(beta)

        restart = False
        if beta <= breakdown * max(scale, 1e-300):
            betas[-1] = 0.0
            exhausted = count == size or generator is None
            # Repeated eigenvalues hide in the complement, so a restart skips the stop test once.
            restart = not exhausted
        if not restart and should_stop is not None and should_stop(alphas, betas):
            break
        if step + 1 == max_steps or exhausted:
            break

        if betas[-1] == 0.0:
            # Invariant subspace found: continue in its orthogonal complement. A draw that lies in
            # the span, such as a start vector drawn from the same seed, is drawn again.
            for _ in range(RESTART_DRAWS):
                fresh = _gaussian_vector(operator, generator)
                fresh_norm = _norm(fresh)
                residual = _orthogonalise(fresh, basis[:count])
                beta = _norm(residual)
                if beta > breakdown * fresh_norm:
                    break
            else:
                exhausted = True
                break
        if count == basis.shape[0]:
            grown = torch.empty((min(2 * count, max_steps), size), device=operator.device, dtype=operator.dtype)
            grown[:count] = basis
            basis = grown
        torch.div(residual, beta, out=basis[count])
        count += 1

    return _Krylov(alphas=alphas, betas=betas, basis=basis[: len(alphas)], exhausted=exhausted)


def _selected_ritz_indices(num_ritz: int, k: int, which: str) -> list[int]:
    """Indices into ascending Ritz values for the k largest, k smallest, or both."""
    k = min(k, num_ritz)
    if which == "largest":
        return list(range(num_ritz - k, num_ritz))
    if which == "smallest":
        return list(range(k))
    return sorted(set(range(k)) | set(range(num_ritz - k, num_ritz)))


def _ritz_errors(
    values: np.ndarray, vectors: np.ndarray, last_beta: float, indices: Sequence[int], criterion: str
) -> list[float]:
    """Estimate |lambda - theta_i| for the selected Ritz values from their residual norms r_i.

    criterion="residual" returns r_i = beta_m * |s_i[m]|, a bound on the distance to the nearest
    eigenvalue. criterion="gap" returns min(r_i, r_i^2 / gap_i), the bound
    |lambda - theta| <= r^2 / gap (Parlett, The Symmetric Eigenvalue Problem, 1998, section 11.7),
    with gap_i estimated as the distance from theta_i to the nearest other Ritz value.
    NOTE: the true gap is to the nearest other eigenvalue. While an eigenvalue close to theta_i is
    not yet represented in the Krylov space, the estimated gap is too large, so the claimed
    accuracy is too optimistic. Only the residual criterion is a bound.
    """
    errors = []
    for index in indices:
        residual = abs(last_beta * float(vectors[-1, index]))
        if criterion == "residual" or len(values) == 1:
            errors.append(residual)
            continue
        gap = float(np.min(np.abs(np.delete(values, index) - values[index])))
        errors.append(min(residual, residual**2 / gap) if gap > 0 else residual)
    return errors


def lanczos(
    operator: LinearOperator,
    *,
    k: int = 1,
    which: Which = "largest",
    tol: float = 1e-3,
    max_iter: int | None = None,
    seed: int = 0,
    criterion: Literal["residual", "gap"] = "residual",
    full_reorthogonalisation: bool = True,
    explicit_residuals: bool = True,
    callback: Callable[[int, np.ndarray], None] | None = None,
    start: torch.Tensor | None = None,
) -> EigenResult:
    """Find the k algebraically largest and/or smallest eigenvalues with the Lanczos method.

    Lanczos builds a Krylov basis Q from a start vector (Gaussian unless `start` is given) and a tridiagonal T = Q^T A Q
    whose eigenvalues (Ritz values) theta_i are computed in float64. The basis is fully
    reorthogonalised by default. full_reorthogonalisation=False keeps only the three-term
    recurrence, which saves two passes over the basis per step but is unreliable with float32
    products: on a ResNet18 their rounding let the top Ritz value drift above the
    reorthogonalised value within a few dozen steps (bench/hessian.md), and the Ritz vectors
    lost all accuracy. The run stops once the error
    estimate of every requested Ritz value is at most tol * max(|theta_i|, sqrt(eps) * max_j |theta_j|),
    or after max_iter products (default min(n, max(100, 12 k))). The estimate is the residual
    norm with criterion="residual" (a rigorous bound) or min(r, r^2 / gap) with criterion="gap"
    (see _ritz_errors). With explicit_residuals=True each returned pair's residual
    ||A v - theta v|| is recomputed with one more product. callback(step, ritz_values) is called
    after every product with the ascending Ritz values.

    The basis stores one vector per step, so memory is about max_iter * n * itemsize bytes.
    NOTE: from one start vector Lanczos finds one copy of an exactly repeated eigenvalue unless its
    Krylov space is exhausted. A second copy can then be missing from the k values while the run
    reports convergence. Runs from two starts (lanczos_start "gradient" and "random") expose it.
    """
    _require_int("k", k, 1)
    _require_tol(tol)
    if which not in ("largest", "smallest", "both"):
        raise HessianError(f"which must be 'largest', 'smallest' or 'both', got {which!r}")
    if criterion not in ("residual", "gap"):
        raise HessianError(f"criterion must be 'residual' or 'gap', got {criterion!r}")
    size = operator.size
    if k > size:
        raise HessianError(f"k must be <= the number of parameters ({size}), got {k}")
    if max_iter is None:
        max_iter = min(size, max(100, 12 * k))
    _require_int("max_iter", max_iter, 1)

    generator = _generator(operator, seed)
    start_count = operator.num_matvecs
    relative_floor = math.sqrt(torch.finfo(operator.dtype).eps)
    required_count = min(size, 2 * k if which == "both" else k)

    def ritz_converged(alphas: list[float], betas: list[float], *, report: bool = True) -> bool:
        values, vectors = _tridiagonal_eigh(alphas, betas)
        if report and callback is not None:
            callback(len(alphas), values)
        if len(alphas) < required_count:
            return False
        floor = relative_floor * float(np.max(np.abs(values)))
        indices = _selected_ritz_indices(len(values), k, which)
        errors = _ritz_errors(values, vectors, betas[-1], indices, criterion)
        return all(error <= tol * max(abs(values[index]), floor) for index, error in zip(indices, errors))

    if start is None:
        start = _gaussian_vector(operator, generator)
    else:
        start = _check_start(operator, start)
    krylov = _lanczos_process(
        operator,
        start,
        max_steps=max_iter,
        generator=generator,
        full_reorthogonalisation=full_reorthogonalisation,
        should_stop=ritz_converged,
    )
    num_iterations = len(krylov.alphas)
    converged = krylov.exhausted or ritz_converged(krylov.alphas, krylov.betas, report=False)

    ritz_values, ritz_vectors = _tridiagonal_eigh(krylov.alphas, krylov.betas)
    indices = _selected_ritz_indices(len(ritz_values), k, which)[::-1]
    coefficients = torch.as_tensor(ritz_vectors[:, indices].T, device=operator.device, dtype=operator.dtype)
    eigenvectors = coefficients @ krylov.basis
    for vector in eigenvectors:
        vector.div_(_norm(vector))
    values = [float(ritz_values[index]) for index in indices]

    estimates = [abs(krylov.betas[-1] * float(ritz_vectors[-1, index])) for index in indices]
    inconsistent: list[tuple[float, float]] = []
    if explicit_residuals:
        residuals = []
        for value, vector in zip(values, eigenvectors):
            residuals.append(_norm(operator.matvec(vector) - value * vector))
        floor = relative_floor * max(abs(value) for value in values)
        inconsistent = [
            (value, residual)
            for value, residual, estimate in zip(values, residuals, estimates)
            if residual > max(10.0 * estimate, tol * max(abs(value), floor))
        ]
        if inconsistent:
            converged = False
            value, residual = inconsistent[0]
            logger.warning(
                "Lanczos's residual estimates are far below the explicit residuals (eigenvalue %.6g: residual %.3g), "
                "so the operator is not linear and symmetric to working precision; finite differences across "
                "non-smooth operations such as ReLU do this. Treat these eigenvalues as unconverged",
                value,
                residual,
            )
    else:
        residuals = estimates

    if not converged and not inconsistent:
        logger.warning(
            "Lanczos stopped after %d products before every requested eigenvalue reached tol=%g; "
            "raise max_iter for tighter values",
            num_iterations,
            tol,
        )
    return EigenResult(
        values=tuple(values),
        residuals=tuple(residuals),
        method="lanczos",
        which=which,
        tol=tol,
        num_iterations=num_iterations,
        num_matvecs=operator.num_matvecs - start_count,
        converged=bool(converged),
        vectors=eigenvectors,
    )


# -- power iteration --------------------------------------------------------------------------


@dataclass
class _PowerPair:
    value: float
    vector: torch.Tensor
    residual: float
    iterations: int
    converged: bool


def _deflated_power(
    operator: LinearOperator,
    count: int,
    *,
    locked: list[torch.Tensor],
    max_iter: int,
    tol: float,
    generator: torch.Generator,
    shift: float = 0.0,
) -> list[_PowerPair]:
    """PyHessian's deflated power iteration: one eigenpair at a time, orthogonal to the locked vectors.

    Each eigenpair starts from a Gaussian vector and stops when the Rayleigh quotient changes by
    less than tol relative, |lambda_new - lambda_old| / (|lambda_old| + 1e-6) < tol, or after
    max_iter products. For an operator A + shift * I the rule is applied to the quotients of A
    (lambda - shift): relative to the shifted quotient it would stop after a couple of steps
    whenever the shift is large.
    """
    pairs: list[_PowerPair] = []
    for _ in range(count):
        basis = torch.stack(locked) if locked else torch.empty((0, operator.size), device=operator.device, dtype=operator.dtype)
        vector = _gaussian_vector(operator, generator)
        previous: float | None = None
        pair: _PowerPair | None = None
        for iteration in range(1, max_iter + 1):
            vector = _orthogonalise(vector, basis)
            vector.div_(_norm(vector))
            product = operator.matvec(vector)
            quotient = _dot(product, vector)
            residual = _norm(torch.add(product, vector, alpha=-quotient))
            converged = previous is not None and abs(previous - quotient) / (abs(previous - shift) + 1e-6) < tol
            pair = _PowerPair(quotient, vector, residual, iteration, converged)
            norm = _norm(product)
            if converged or norm == 0.0:
                pair.converged = True
                break
            previous = quotient
            vector = product.div_(norm)
        assert pair is not None
        pairs.append(pair)
        locked = [*locked, pair.vector]
    return pairs


def power_iteration(
    operator: LinearOperator,
    *,
    k: int = 1,
    which: PowerWhich = "largest",
    max_iter: int = 100,
    tol: float = 1e-3,
    seed: int = 0,
) -> EigenResult:
    """Find k eigenvalues by deflated power iteration with PyHessian's defaults (max_iter 100, tol 1e-3).

    which="magnitude" is PyHessian's algorithm as published: it converges to the eigenvalues of
    largest |lambda|, whatever their sign. For which="largest" ("smallest") the dominant
    eigenvalue lambda_d is found first and the iteration then runs on A + |lambda_d| I
    (A - |lambda_d| I), whose dominant eigenvalues are the algebraically largest (smallest) ones
    of A. max_iter bounds the products per eigenvalue. Residuals come from the last product of each
    eigenvalue, so they cost nothing extra.
    """
    _require_int("k", k, 1)
    _require_int("max_iter", max_iter, 1)
    _require_tol(tol)
    if which not in ("largest", "smallest", "magnitude"):
        raise HessianError(f"which must be 'largest', 'smallest' or 'magnitude', got {which!r}")
    if k > operator.size:
        raise HessianError(f"k must be <= the number of parameters ({operator.size}), got {k}")

    generator = _generator(operator, seed)
    start_count = operator.num_matvecs
    options = {"max_iter": max_iter, "tol": tol, "generator": generator}

    if which == "magnitude":
        pairs = _deflated_power(operator, k, locked=[], **options)
        values = [pair.value for pair in pairs]
    else:
        sign = 1.0 if which == "largest" else -1.0
        dominant = _deflated_power(operator, 1, locked=[], **options)[0]
        # The dominant eigenpair already counts when it lies at the requested end of the spectrum.
        found = [dominant] if sign * dominant.value >= 0 else []
        shift = sign * abs(dominant.value)
        shifted = ShiftedOperator(operator, shift)
        rest = _deflated_power(shifted, k - len(found), locked=[pair.vector for pair in found], shift=shift, **options)
        for pair in rest:
            pair.value -= shift
        pairs = found + rest
        values = [pair.value for pair in pairs]

    order = sorted(range(len(pairs)), key=lambda index: -values[index])
    converged = all(pair.converged for pair in pairs)
    if not converged:
        logger.warning("Power iteration reached max_iter=%d before tol=%g for some eigenvalues", max_iter, tol)
    return EigenResult(
        values=tuple(values[index] for index in order),
        residuals=tuple(pairs[index].residual for index in order),
        method="power",
        which=which,
        tol=tol,
        num_iterations=sum(pair.iterations for pair in pairs),
        num_matvecs=operator.num_matvecs - start_count,
        converged=converged,
        vectors=torch.stack([pairs[index].vector for index in order]),
    )


# -- trace ------------------------------------------------------------------------------------


def _mean_and_stderr(samples: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(samples, dtype=np.float64)
    stderr = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else float("nan")
    return float(array.mean()), stderr


def hutchinson_trace(operator: LinearOperator, *, num_samples: int = 100, seed: int = 0) -> TraceResult:
    """Estimate tr(A) as the mean of z^T A z over Rademacher vectors z (Hutchinson 1989).

    Each sample costs one product; the standard error is std(z^T A z, ddof=1) / sqrt(num_samples).
    """
    _require_int("num_samples", num_samples, 2)
    generator = _generator(operator, seed)
    start_count = operator.num_matvecs

    samples = []
    for _ in range(num_samples):
        probe = _rademacher_vector(operator, generator)
        samples.append(_dot(probe, operator.matvec(probe)))

    value, stderr = _mean_and_stderr(samples)
    return TraceResult(
        value=value,
        stderr=stderr,
        num_samples=num_samples,
        num_matvecs=operator.num_matvecs - start_count,
        method="hutchinson",
        samples=tuple(samples),
    )


def hutchpp_trace(operator: LinearOperator, *, num_matvecs: int = 99, seed: int = 0) -> TraceResult:
    """Estimate tr(A) with Hutch++ (Meyer, Musco, Musco and Woodruff 2021).

    With s = num_matvecs // 3: Q is an orthonormal basis of A S for s Rademacher columns S, and
    tr(A) ~ tr(Q^T A Q) + (1 / s) * sum_i g_i^T P A P g_i with P = I - Q Q^T and s further
    Rademacher vectors g_i. The first term is exact given Q, so the standard error is that of the
    second, std(g_i^T P A P g_i, ddof=1) / sqrt(s). Memory: 2 s vectors of the operator's size.
    """
    _require_int("num_matvecs", num_matvecs, 6)
    generator = _generator(operator, seed)
    start_count = operator.num_matvecs
    sketch_size = num_matvecs // 3

    sketch = torch.stack([operator.matvec(_rademacher_vector(operator, generator)) for _ in range(sketch_size)])
    basis = torch.linalg.qr(sketch.T, mode="reduced").Q.T.contiguous()
    del sketch
    low_rank = sum(_dot(row, operator.matvec(row)) for row in basis)

    samples = []
    for _ in range(sketch_size):
        probe = _orthogonalise(_rademacher_vector(operator, generator), basis)
        samples.append(_dot(probe, operator.matvec(probe)))

    residual_mean, stderr = _mean_and_stderr(samples)
    return TraceResult(
        value=low_rank + residual_mean,
        stderr=stderr,
        num_samples=sketch_size,
        num_matvecs=operator.num_matvecs - start_count,
        method="hutchpp",
        samples=tuple(samples),
    )


# -- spectral density -------------------------------------------------------------------------


def slq_quadrature(
    operator: LinearOperator, *, num_steps: int = 100, num_runs: int = 1, seed: int = 0
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Return stochastic Lanczos quadrature nodes and weights, one array pair per run.

    Each run starts Lanczos with full reorthogonalisation from a normalised Rademacher vector v and
    takes min(num_steps, n) products, fewer at an invariant subspace. The nodes are T's
    eigenvalues and the weights the squared first components of its eigenvectors, which sum to 1,
    so sum_i w_i theta_i = v^T A v / ||v||^2 estimates tr(A) / n.
    """
    _require_int("num_steps", num_steps, 1)
    _require_int("num_runs", num_runs, 1)
    generator = _generator(operator, seed)

    nodes_per_run = []
    weights_per_run = []
    for _ in range(num_runs):
        start = _rademacher_vector(operator, generator)
        krylov = _lanczos_process(operator, start, max_steps=num_steps, generator=None)
        nodes, vectors = _tridiagonal_eigh(krylov.alphas, krylov.betas)
        weights = vectors[0, :] ** 2
        nodes_per_run.append(nodes)
        weights_per_run.append(weights / weights.sum())
    return nodes_per_run, weights_per_run


def gaussian_density(
    nodes_per_run: Sequence[np.ndarray],
    weights_per_run: Sequence[np.ndarray],
    *,
    sigma_squared: float = DEFAULT_SIGMA_SQUARED,
    num_points: int = DEFAULT_GRID_POINTS,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Smooth quadrature nodes into a density on a grid; return (grid, density, variance).

    variance = sigma_squared * max(1, lambda_max - lambda_min) over all nodes, as in PyHessian's
    density plot. PyHessian's grid ends 0.01 beyond the extreme nodes. This grid extends 5
    standard deviations beyond them instead, so the density integrates to 1 and keeps its mean.
    It has at least num_points points and at least 4 per standard deviation, up to 200,000.
    """
    if not (math.isfinite(sigma_squared) and sigma_squared > 0):
        raise HessianError(f"sigma_squared must be finite and > 0, got {sigma_squared}")
    _require_int("num_points", num_points, 2)
    if not nodes_per_run:
        raise HessianError("gaussian_density needs at least one run of nodes and weights")

    all_nodes = np.concatenate([np.asarray(nodes, dtype=np.float64) for nodes in nodes_per_run])
    lowest, highest = float(all_nodes.min()), float(all_nodes.max())
    variance = sigma_squared * max(1.0, highest - lowest)
    std = math.sqrt(variance)
    lower = lowest - GRID_TAIL_STDS * std
    upper = highest + GRID_TAIL_STDS * std
    points = max(num_points, math.ceil((upper - lower) / (std / 4.0)) + 1)
    if points > MAX_GRID_POINTS:
        logger.warning("Capping the density grid at %d points (%d requested)", MAX_GRID_POINTS, points)
        points = MAX_GRID_POINTS
    grid = np.linspace(lower, upper, points)

    density = np.zeros_like(grid)
    normaliser = 1.0 / math.sqrt(2.0 * math.pi * variance)
    for nodes, weights in zip(nodes_per_run, weights_per_run):
        nodes = np.asarray(nodes, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.float64)
        for begin in range(0, points, 8192):
            chunk = grid[begin : begin + 8192, None]
            kernel = np.exp(-((chunk - nodes[None, :]) ** 2) / (2.0 * variance)) * normaliser
            density[begin : begin + 8192] += kernel @ weights
    density /= len(nodes_per_run)
    density /= np.trapezoid(density, grid)
    return grid, density, variance


def spectral_density(
    operator: LinearOperator,
    *,
    num_steps: int = 100,
    num_runs: int = 1,
    seed: int = 0,
    sigma_squared: float = DEFAULT_SIGMA_SQUARED,
    num_points: int = DEFAULT_GRID_POINTS,
) -> SpectralDensity:
    """Estimate the eigenvalue spectral density by stochastic Lanczos quadrature, averaged over runs.

    See slq_quadrature for the nodes and weights and gaussian_density for the smoothing.
    """
    start_count = operator.num_matvecs
    nodes, weights = slq_quadrature(operator, num_steps=num_steps, num_runs=num_runs, seed=seed)
    grid, density, variance = gaussian_density(nodes, weights, sigma_squared=sigma_squared, num_points=num_points)
    return density_result(
        nodes,
        weights,
        grid=grid,
        density=density,
        sigma_squared=sigma_squared,
        variance=variance,
        num_steps=num_steps,
        num_matvecs=operator.num_matvecs - start_count,
    )


def density_result(
    nodes: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    *,
    grid: np.ndarray,
    density: np.ndarray,
    sigma_squared: float,
    variance: float,
    num_steps: int,
    num_matvecs: int,
) -> SpectralDensity:
    """Pack quadrature nodes, weights and a smoothed density into a SpectralDensity."""
    return SpectralDensity(
        nodes=tuple(tuple(float(x) for x in run) for run in nodes),
        weights=tuple(tuple(float(x) for x in run) for run in weights),
        grid=tuple(float(x) for x in grid),
        values=tuple(float(x) for x in density),
        sigma_squared=sigma_squared,
        variance=variance,
        num_steps=num_steps,
        num_runs=len(nodes),
        num_matvecs=num_matvecs,
    )
