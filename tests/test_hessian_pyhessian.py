"""The PyHessian 0.1 engine: agreement with dense Hessians and the compatibility layer's repairs."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
from torch import nn

from seal_probe.hessian import HessianError, PyHessianEngine, pyhessian_compatibility
from seal_probe.hessian.testing import case_by_name, clone_state, dense_hessian


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class PartlyUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.used(torch.tanh(inputs))


@pytest.mark.parametrize("merge_batches", [True, False], ids=["data_mode", "dataloader_mode"])
def test_top_eigenvalue_matches_dense(merge_batches):
    # The "mlp" case has a clear gap (top two eigenvalues 0.757 and 0.478), so PyHessian's rule,
    # a relative change below tol = 1e-3 between steps, stops within tol of the eigenvalue.
    case = case_by_name("mlp")
    batches = case.batches
    if merge_batches:
        batches = [(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))]
    exact = torch.linalg.eigvalsh(dense_hessian(case.model, case.batches))
    engine = PyHessianEngine(case.model, batches, dtype=torch.float64)

    result = engine.eigenvalues(k=1, seed=0)

    assert result.values[0] == pytest.approx(float(exact[-1]), rel=1e-3)
    assert abs(result.values[0] - float(exact[-1])) <= result.residuals[0]
    assert result.converged
    assert result.num_matvecs == result.num_iterations + 1


def test_top_eigenvalue_small_gap_stops_early():
    # The top two eigenvalues are 0.581 and 0.524. The change between steps drops below 1e-3
    # while the estimate is still further than that from the eigenvalue, but the residual bounds the error.
    case = case_by_name("batchnorm_eval")
    exact = torch.linalg.eigvalsh(dense_hessian(case.model, case.batches))
    engine = PyHessianEngine(case.model, case.batches, dtype=torch.float64)

    result = engine.eigenvalues(k=1, seed=0)

    error = abs(result.values[0] - float(exact[-1]))
    assert float(exact[-2]) / float(exact[-1]) > 0.9
    assert error > 1e-3 * float(exact[-1])
    assert error <= result.residuals[0]


def test_density_runs_and_integrates_to_one():
    case = case_by_name("mlp")
    exact = torch.linalg.eigvalsh(dense_hessian(case.model, case.batches))
    engine = PyHessianEngine(case.model, case.batches, dtype=torch.float64)

    density = engine.density(num_steps=20, num_runs=2, seed=1)

    grid = np.asarray(density.grid)
    values = np.asarray(density.values)
    assert np.trapezoid(values, grid) == pytest.approx(1.0, abs=1e-9)
    assert density.num_runs == 2
    assert density.num_matvecs == 2 * 20
    for nodes, weights in zip(density.nodes, density.weights):
        assert sum(weights) == pytest.approx(1.0, abs=1e-9)
        assert max(nodes) <= float(exact[-1]) + 1e-6
        assert min(nodes) >= float(exact[0]) - 1e-6


def test_compatibility_layer_restores_global_state():
    module = importlib.import_module("pyhessian.hessian")
    torch_before = module.torch
    dtype_before = torch.get_default_dtype()
    rng_before = torch.get_rng_state()
    numpy_before = np.random.get_state()[1].copy()
    case = case_by_name("mlp")

    PyHessianEngine(case.model, case.batches, dtype=torch.float64).density(num_steps=5, seed=3)

    assert module.torch is torch_before
    assert torch.get_default_dtype() == dtype_before
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert np.array_equal(np.random.get_state()[1], numpy_before)
    with pytest.raises(RuntimeError, match="torch.eig"):
        torch.eig(torch.eye(2))


def test_compatibility_layer_provides_eig_inside_block():
    module = importlib.import_module("pyhessian.hessian")
    matrix = torch.tensor([[2.0, 1.0], [1.0, 3.0]])

    with pytest.raises(RuntimeError):
        module.torch.eig(matrix, eigenvectors=True)
    with pytest.raises(HessianError, match="symmetric matrices only"):
        with pyhessian_compatibility(seed=0, dtype=torch.float32, device=torch.device("cpu")):
            module.torch.eig(torch.tensor([[1.0, 2.0], [0.0, 1.0]]), eigenvectors=True)
    with pyhessian_compatibility(seed=0, dtype=torch.float32, device=torch.device("cpu")):
        packed, vectors = module.torch.eig(matrix, eigenvectors=True)

    np.testing.assert_allclose(packed[:, 0].numpy(), np.linalg.eigvalsh(matrix.numpy()), rtol=1e-6)
    assert torch.equal(packed[:, 1], torch.zeros(2))
    torch.testing.assert_close(matrix @ vectors, vectors * packed[:, 0])


def test_same_seed_gives_same_numbers():
    case = case_by_name("cnn")
    engine = PyHessianEngine(case.model, case.batches, dtype=torch.float64)

    first = engine.eigenvalues(k=2, seed=4)
    second = engine.eigenvalues(k=2, seed=4)
    other = engine.eigenvalues(k=2, seed=5)

    assert first.values == second.values
    assert first.values != other.values


def test_unused_parameter_crashes_pyhessian_but_not_engine():
    torch.manual_seed(0)
    model = PartlyUnused()
    batches = [(torch.randn(10, 4), torch.randint(0, 3, (10,)))]
    pyhessian = importlib.import_module("pyhessian")
    exact = torch.linalg.eigvalsh(dense_hessian(model, batches, params=["used.weight", "used.bias"]))

    with pytest.raises(AssertionError):
        pyhessian.hessian(model, nn.functional.cross_entropy, data=batches[0], cuda=False).eigenvalues()
    model.zero_grad(set_to_none=True)
    engine = PyHessianEngine(model, batches, dtype=torch.float64)
    result = engine.eigenvalues(k=1)

    assert engine.operator.excluded_parameters == {
        "unused.weight": "receives no gradient from the loss",
        "unused.bias": "receives no gradient from the loss",
    }
    assert result.values[0] == pytest.approx(float(exact[-1]), rel=1e-3)


def test_trace_stops_early_on_negative_running_mean():
    case = case_by_name("mlp_mse")

    def negated_mse(outputs, targets):
        return -nn.functional.mse_loss(outputs, targets)

    exact = float(torch.trace(dense_hessian(case.model, case.batches, loss_fn=negated_mse)))
    engine = PyHessianEngine(case.model, case.batches, loss_fn=negated_mse, dtype=torch.float64)

    original = engine.trace(max_iter=50, seed=0)
    fixed = engine.trace(max_iter=50, seed=0, loop="fixed")

    assert exact < 0
    assert original.num_samples == 2
    assert "because the running mean" in original.notes[0]
    assert "was negative" in original.notes[0]
    assert fixed.num_samples == 50
    assert fixed.notes == ()
    assert abs(fixed.value - exact) <= 3 * fixed.stderr


def test_weight_decay_shifts_results():
    case = case_by_name("cnn")
    plain = PyHessianEngine(case.model, case.batches, dtype=torch.float64)
    decayed = PyHessianEngine(case.model, case.batches, dtype=torch.float64, weight_decay=0.1)

    assert decayed.eigenvalues(k=1, seed=2).values[0] == pytest.approx(plain.eigenvalues(k=1, seed=2).values[0] + 0.1)
    plain_trace = plain.trace(max_iter=5, seed=2, loop="fixed")
    decayed_trace = decayed.trace(max_iter=5, seed=2, loop="fixed")
    assert decayed_trace.value == pytest.approx(plain_trace.value + 0.1 * plain.size)


def test_engine_leaves_model_untouched():
    case = case_by_name("batchnorm_eval")
    case.model.train()
    before = clone_state(case.model)

    engine = PyHessianEngine(case.model, case.batches)
    engine.eigenvalues(k=1)
    engine.trace(max_iter=3)

    after = clone_state(case.model)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert case.model.training
    assert all(parameter.grad is None for parameter in case.model.parameters())
