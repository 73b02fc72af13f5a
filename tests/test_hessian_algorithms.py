"""Lanczos, power iteration, trace estimators and spectral density against dense eigendecompositions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from seal_probe.hessian import (
    HessianError,
    HessianOperator,
    MatrixOperator,
    gaussian_density,
    gradient_start,
    hutchinson_trace,
    hutchpp_trace,
    lanczos,
    power_iteration,
    slq_quadrature,
    spectral_density,
)
from seal_probe.hessian.reductions import dot, norm, projections
from seal_probe.hessian.testing import dense_hessian, reference_cases

CASES = reference_cases()
CASE_IDS = [case.name for case in CASES]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def problems():
    """Each reference case as (float64 operator, dense Hessian, its eigenvalues ascending)."""
    built = {}
    for case in CASES:
        dense = dense_hessian(case.model, case.batches, loss_fn=case.loss_fn)
        operator = HessianOperator(
            case.model, case.batches, loss_fn=case.loss_fn, dtype=torch.float64, hvp_mode="double_backward"
        )
        built[case.name] = (operator, dense, torch.linalg.eigvalsh(dense))
    return built


def spectrum_matrix(eigenvalues, seed: int = 0) -> torch.Tensor:
    """Return Q diag(eigenvalues) Q^T for a random orthogonal Q."""
    generator = torch.Generator().manual_seed(seed)
    size = len(eigenvalues)
    orthogonal, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    return orthogonal @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ orthogonal.T


# -- eigenvalues ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASE_IDS)
def test_lanczos_top5_match_eigvalsh(problems, name):
    operator, dense, exact = problems[name]

    result = lanczos(operator, k=5, tol=1e-8, seed=1)

    expected = exact.flip(0)[:5].tolist()
    assert result.values == pytest.approx(expected, rel=1e-4)
    assert result.converged
    assert max(result.residuals) < 1e-6 * abs(expected[0])
    vectors = result.vectors
    for value, vector, residual in zip(result.values, vectors, result.residuals):
        assert float(torch.linalg.vector_norm(dense @ vector - value * vector)) == pytest.approx(residual, abs=1e-9)


@pytest.mark.parametrize("name", CASE_IDS)
def test_lanczos_most_negative_matches_eigvalsh(problems, name):
    operator, _, exact = problems[name]

    result = lanczos(operator, k=2, which="smallest", tol=1e-8, seed=2)

    # Values come in decreasing order, so the most negative eigenvalue is last.
    assert result.values[-1] == pytest.approx(float(exact[0]), rel=1e-4)
    assert result.values[0] == pytest.approx(float(exact[1]), rel=1e-4)
    assert exact[0] < 0


def test_lanczos_both_ends_in_one_run(problems):
    operator, _, exact = problems["cnn"]

    result = lanczos(operator, k=2, which="both", tol=1e-8)

    expected = [exact[-1], exact[-2], exact[1], exact[0]]
    assert result.values == pytest.approx([float(value) for value in expected], rel=1e-4)


def test_lanczos_finds_repeated_eigenvalues_after_breakdown():
    # From one start vector Lanczos finds a single copy of each repeated eigenvalue. The other
    # copies need the restart in the orthogonal complement.
    eigenvalues = [5.0, 5.0, 5.0, 2.0, 1.0, 0.5, 0.1, -0.3]
    operator = MatrixOperator(spectrum_matrix(eigenvalues))

    result = lanczos(operator, k=4, tol=1e-10)

    assert result.values == pytest.approx([5.0, 5.0, 5.0, 2.0], abs=1e-9)


def test_lanczos_gap_criterion_stops_earlier():
    eigenvalues = [50.0, 20.0, 10.0] + list(np.linspace(-1.0, 2.0, 197))
    operator = MatrixOperator(spectrum_matrix(eigenvalues, seed=5))
    steps = []

    residual = lanczos(operator, k=1, tol=1e-6, criterion="residual", seed=1)
    gap = lanczos(operator, k=1, tol=1e-6, criterion="gap", seed=1, callback=lambda step, values: steps.append(step))

    assert gap.num_iterations < residual.num_iterations
    assert gap.values[0] == pytest.approx(50.0, rel=1e-6)
    assert residual.values[0] == pytest.approx(50.0, rel=1e-6)
    assert steps == list(range(1, gap.num_iterations + 1))


def test_lanczos_callback_sees_rising_top_ritz_value(problems):
    operator, _, exact = problems["mlp"]
    top_values = []

    lanczos(operator, k=1, tol=1e-8, callback=lambda step, values: top_values.append(values[-1]))

    # By Cauchy interlacing the top Ritz value never decreases and never exceeds the top eigenvalue.
    assert all(later >= earlier - 1e-12 for earlier, later in zip(top_values, top_values[1:]))
    assert max(top_values) <= float(exact[-1]) + 1e-12


class DiagonalOperator:
    """diag(d) as a linear operator, for spectra too large to store as a dense matrix."""

    def __init__(self, diagonal: torch.Tensor) -> None:
        self.diagonal = diagonal
        self.count = 0

    @property
    def size(self) -> int:
        return self.diagonal.numel()

    @property
    def device(self) -> torch.device:
        return self.diagonal.device

    @property
    def dtype(self) -> torch.dtype:
        return self.diagonal.dtype

    @property
    def num_matvecs(self) -> int:
        return self.count

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        self.count += 1
        return self.diagonal * vector


def test_float32_lanczos_on_4m_entries():
    # Three outliers over a bulk in [-1, 1], so the top eigenvectors are single coordinates that
    # dominate the Lanczos vectors. Float32 sums along the whole vector put these values 2.5e-3 off.
    generator = torch.Generator().manual_seed(0)
    diagonal = torch.rand(4_000_000, generator=generator) * 2 - 1
    diagonal[:3] = torch.tensor([10.0, 6.0, 5.0])

    result = lanczos(DiagonalOperator(diagonal), k=3, tol=1e-6, seed=0)

    assert result.values == pytest.approx([10.0, 6.0, 5.0], rel=1e-5)
    assert max(result.residuals) < 1e-4


def test_reductions_match_float64():
    # 3M float32 entries where a few dominate and cancel, as in a Lanczos step on a network.
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(3_000_001, generator=generator)
    a[:100] *= 1000.0
    b = torch.randn(3_000_001, generator=generator)
    b[:100] = -a[:100] * float(a[100:].double() @ b[100:].double()) / float(a[:100].double().square().sum())
    basis = torch.stack([a / float(a.double().norm()), torch.randn(3_000_001, generator=generator)])

    exact_dot = float(a.double() @ b.double())
    exact_projections = basis.double() @ b.double()

    assert abs(dot(a, b) - exact_dot) <= 1e-9 * float(a.double().abs() @ b.double().abs())
    assert dot(a, a) == pytest.approx(float(a.double() @ a.double()), rel=2e-6)
    assert norm(a) == pytest.approx(float(a.double().norm()), rel=1e-7)
    torch.testing.assert_close(projections(basis, b).double(), exact_projections, rtol=1e-6, atol=1e-6 * float(b.double().norm()))


def test_gradient_start_orthogonal_top_eigenvector():
    # The "gradient" is the eigenvector of 6.0, orthogonal to the top one. The Gaussian half of
    # the start vector still reaches 10.0.
    eigenvalues = [10.0, 6.0, 3.0] + list(np.linspace(-1.0, 1.0, 57))
    matrix = spectrum_matrix(eigenvalues, seed=2)
    operator = MatrixOperator(matrix)
    _, vectors = torch.linalg.eigh(matrix)
    second = vectors[:, -2]

    start = gradient_start(operator, second, seed=4)
    result = lanczos(operator, k=2, tol=1e-10, start=start)

    # |g/|g| + z|^2 = 2 + 2 z.g/|g| for unit z, and start.g/|g| = 1 + z.g/|g|.
    assert float(torch.linalg.vector_norm(start)) == pytest.approx(math.sqrt(2.0 * float(start @ second)), rel=1e-9)
    assert result.values == pytest.approx([10.0, 6.0], rel=1e-9)


def test_gradient_start_zero_gradient(problems):
    operator, _, exact = problems["mlp"]

    start = gradient_start(operator, torch.zeros(operator.size, dtype=operator.dtype), seed=1)
    result = lanczos(operator, k=2, tol=1e-10, start=start)

    assert float(torch.linalg.vector_norm(start)) == pytest.approx(1.0, rel=1e-12)
    assert result.values == pytest.approx(exact.flip(0)[:2].tolist(), rel=1e-8)


def test_lanczos_gradient_start_matches_eigvalsh(problems):
    operator, _, exact = problems["cnn"]

    start = gradient_start(operator, operator.data_gradient, seed=0)
    result = lanczos(operator, k=5, tol=1e-8, start=start)

    assert result.values == pytest.approx(exact.flip(0)[:5].tolist(), rel=1e-6)


def test_lanczos_restarts_from_start_seed():
    # A zero gradient gives the Gaussian vector of seed 0. Lanczos draws the same vector first
    # when it restarts after the invariant subspace, so the restart must draw again.
    operator = MatrixOperator(torch.eye(6, dtype=torch.float64))
    start = gradient_start(operator, torch.zeros(6, dtype=torch.float64), seed=0)

    result = lanczos(operator, k=3, start=start, seed=0)

    assert result.values == pytest.approx([1.0, 1.0, 1.0], rel=1e-12)
    assert result.converged


def test_lanczos_flags_nonlinear_operator(caplog):
    # A product with a non-linear term: the recurrence's residual estimates look converged while
    # the explicit residuals do not.
    matrix = spectrum_matrix([10.0, 6.0, 3.0] + [0.5] * 27, seed=1)

    class Kinked(MatrixOperator):
        def matvec(self, vector):
            return super().matvec(vector) + 0.5 * vector.abs()

    result = lanczos(Kinked(matrix), k=2, tol=1e-6)

    assert result.converged is False
    assert "not linear and symmetric" in caplog.text


def test_power_largest_on_a_large_shift():
    # The shift by the dominant eigenvalue (300) must not make the change-based stop fire early.
    generator = torch.Generator().manual_seed(0)
    bulk = torch.rand(997, generator=generator, dtype=torch.float64) * 1e-3
    operator = MatrixOperator(torch.diag(torch.cat([torch.tensor([300.0, 120.0, 70.0], dtype=torch.float64), bulk])))

    result = power_iteration(operator, k=3, which="largest")

    assert result.values == pytest.approx([300.0, 120.0, 70.0], rel=1e-2)


def test_norm_without_underflow_or_overflow():
    tiny = torch.full((1000,), 1e-200, dtype=torch.float64)
    huge = torch.full((1000,), 1e200, dtype=torch.float64)

    assert norm(tiny) == pytest.approx(1e-200 * math.sqrt(1000.0), rel=1e-12)
    assert norm(huge) == pytest.approx(1e200 * math.sqrt(1000.0), rel=1e-12)


def test_lanczos_rejects_bad_start():
    operator = MatrixOperator(torch.eye(4, dtype=torch.float64))

    with pytest.raises(HessianError, match=r"start must have shape \(4,\), got \(3,\)"):
        lanczos(operator, start=torch.ones(3, dtype=torch.float64))
    with pytest.raises(HessianError, match=r"start must be a finite, non-zero vector, got norm 0.0"):
        lanczos(operator, start=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(HessianError, match=r"gradient must have shape \(4,\), got \(2,\)"):
        gradient_start(operator, torch.ones(2, dtype=torch.float64))
    with pytest.raises(HessianError, match=r"start must be a torch.Tensor of shape \(4,\), got list"):
        lanczos(operator, start=[1.0] * 4)


def test_lanczos_rejects_bad_arguments():
    operator = MatrixOperator(torch.eye(4, dtype=torch.float64))

    with pytest.raises(HessianError, match=r"k must be an integer >= 1, got 0"):
        lanczos(operator, k=0)
    with pytest.raises(HessianError, match=r"tol must be finite and > 0, got -1"):
        lanczos(operator, tol=-1)
    with pytest.raises(HessianError, match=r"which must be 'largest', 'smallest' or 'both', got 'top'"):
        lanczos(operator, which="top")
    with pytest.raises(HessianError, match=r"criterion must be 'residual' or 'gap', got 'change'"):
        lanczos(operator, criterion="change")


def test_lanczos_same_seed_same_result(problems):
    operator, _, _ = problems["mlp"]

    first = lanczos(operator, k=2, tol=1e-3, seed=7)
    second = lanczos(operator, k=2, tol=1e-3, seed=7)

    assert first.values == second.values
    assert first.num_iterations == second.num_iterations


def test_power_iteration_largest_matches_dense():
    eigenvalues = [10.0, 6.0, 3.0, 1.0, 0.5, -0.4, -12.0]
    operator = MatrixOperator(spectrum_matrix(eigenvalues, seed=3))

    result = power_iteration(operator, k=3, which="largest", tol=1e-10, max_iter=3000)

    # The dominant eigenvalue is -12, so "largest" must shift to reach 10, 6 and 3.
    assert result.values == pytest.approx([10.0, 6.0, 3.0], rel=1e-5)


def test_power_iteration_smallest_and_magnitude():
    eigenvalues = [10.0, 6.0, 3.0, 1.0, 0.5, -0.4, -2.0]
    operator = MatrixOperator(spectrum_matrix(eigenvalues, seed=4))

    smallest = power_iteration(operator, k=2, which="smallest", tol=1e-10, max_iter=3000)
    magnitude = power_iteration(operator, k=2, which="magnitude", tol=1e-10, max_iter=3000)

    assert smallest.values == pytest.approx([-0.4, -2.0], rel=1e-5)
    assert magnitude.values == pytest.approx([10.0, 6.0], rel=1e-5)


def test_power_iteration_on_hessian_within_its_tolerance(problems):
    operator, _, exact = problems["batchnorm_eval"]

    result = power_iteration(operator, k=1, which="magnitude", seed=3)

    # PyHessian's stopping rule bounds the change between steps, not the error; the residual
    # bounds the distance to the nearest eigenvalue.
    assert abs(result.values[0] - float(exact[-1])) <= result.residuals[0]
    assert result.values[0] == pytest.approx(float(exact[-1]), rel=1e-2)
    assert result.num_matvecs <= 100


# -- trace ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_hutchinson_within_three_standard_errors(problems, name):
    operator, dense, _ = problems[name]
    exact = float(torch.trace(dense))

    result = hutchinson_trace(operator, num_samples=100, seed=5)

    assert result.num_samples == 100
    assert result.num_matvecs == 100
    assert abs(result.value - exact) <= 3 * result.stderr
    assert result.stderr == pytest.approx(np.std(result.samples, ddof=1) / 10.0)


def test_hutchinson_standard_error_falls_with_samples(problems):
    operator, dense, _ = problems["batchnorm_eval"]
    # For Rademacher probes, Var(z^T H z) = 2 * sum of squared off-diagonal entries.
    off_diagonal = dense - torch.diag(torch.diag(dense))
    expected_std = math.sqrt(2.0 * float((off_diagonal**2).sum()))

    few = hutchinson_trace(operator, num_samples=10, seed=6)
    many = hutchinson_trace(operator, num_samples=160, seed=6)

    assert many.stderr < 0.5 * few.stderr
    assert many.stderr == pytest.approx(expected_std / math.sqrt(160), rel=0.3)


def test_hutchpp_within_three_standard_errors(problems):
    operator, dense, _ = problems["cnn"]
    exact = float(torch.trace(dense))

    result = hutchpp_trace(operator, num_matvecs=60, seed=8)

    assert result.num_matvecs == 60
    assert abs(result.value - exact) <= 3 * result.stderr


def test_hutchpp_exact_for_low_rank_matrix():
    eigenvalues = [4.0, -2.0, 1.5] + [0.0] * 37
    operator = MatrixOperator(spectrum_matrix(eigenvalues, seed=9))

    result = hutchpp_trace(operator, num_matvecs=15, seed=1)

    assert result.value == pytest.approx(3.5, abs=1e-10)
    assert result.stderr < 1e-10


# -- spectral density ----------------------------------------------------------------------------


def test_slq_exact_on_diagonal_matrix():
    # For a diagonal matrix and a Rademacher start vector every eigenvector weight is 1/n.
    diagonal = torch.tensor([3.0, -1.0, 0.5, 2.0, 7.0, -0.25], dtype=torch.float64)
    operator = MatrixOperator(torch.diag(diagonal))

    nodes, weights = slq_quadrature(operator, num_steps=6, num_runs=2, seed=3)

    for run_nodes, run_weights in zip(nodes, weights):
        np.testing.assert_allclose(np.sort(run_nodes), np.sort(diagonal.numpy()), atol=1e-10)
        np.testing.assert_allclose(run_weights, np.full(6, 1 / 6), atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "batchnorm_eval"])
def test_density_integrates_to_one_with_trace_mean(problems, name):
    operator, dense, exact = problems[name]
    size = dense.shape[0]
    runs = 4

    density = spectral_density(operator, num_steps=30, num_runs=runs, seed=11)

    grid = np.asarray(density.grid)
    values = np.asarray(density.values)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-9)
    for run_weights in density.weights:
        assert sum(run_weights) == pytest.approx(1.0, abs=1e-12)
    for run_nodes in density.nodes:
        assert min(run_nodes) >= float(exact[0]) - 1e-9
        assert max(run_nodes) <= float(exact[-1]) + 1e-9

    # Each run's mean is z^T H z / n for a Rademacher z: unbiased for tr(H) / n with variance
    # 2 * sum of squared off-diagonal entries / n^2.
    off_diagonal = dense - torch.diag(torch.diag(dense))
    std_of_mean = math.sqrt(2.0 * float((off_diagonal**2).sum()) / runs) / size
    first_moment = float(np.trapezoid(grid * values, grid))
    assert abs(first_moment - float(torch.trace(dense)) / size) <= 4 * std_of_mean
    assert density.num_matvecs == runs * 30


def test_density_variance_follows_spectral_range():
    nodes = [np.array([-1.0, 0.0, 41.0])]
    weights = [np.array([0.2, 0.5, 0.3])]

    grid, values, variance = gaussian_density(nodes, weights, sigma_squared=1e-5, num_points=2000)

    assert variance == pytest.approx(1e-5 * 42.0)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-9)
    assert np.trapezoid(grid * values, grid) == pytest.approx(-0.2 + 0.3 * 41.0, rel=1e-6)
    assert len(grid) >= 2000
    assert grid[1] - grid[0] <= math.sqrt(variance) / 4
