"""HessianOperator against dense float64 Hessians from torch.func, plus its input checks."""

from __future__ import annotations

import copy
import tracemalloc
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.func import functional_call

from seal_probe.hessian import (
    HessianError,
    HessianOperator,
    SecondDerivativeError,
    analyze_hessian,
    lanczos,
)
from seal_probe.hessian.testing import case_by_name, clone_state, dense_hessian, reference_cases

CASES = reference_cases()
CASE_IDS = [case.name for case in CASES]


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    # The reference models are tiny; several threads on a shared CPU only add contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_vectors(size: int, count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    return [torch.randn(size, generator=generator, dtype=torch.float64) for _ in range(count)]


# torch 2.14's forward-mode derivative of mse_loss's backward fails ("ZeroTensors are immutable"),
# so forward-over-reverse runs on the cross-entropy cases only; hvp_mode="auto" falls back.
FORWARD_OVER_REVERSE_CASES = [case for case in CASES if case.name != "mlp_mse"]


@pytest.mark.parametrize(
    ("case", "hvp_mode"),
    [(case, "double_backward") for case in CASES] + [(case, "forward_over_reverse") for case in FORWARD_OVER_REVERSE_CASES],
    ids=[f"double_backward-{case.name}" for case in CASES] + [f"forward_over_reverse-{case.name}" for case in FORWARD_OVER_REVERSE_CASES],
)
def test_matvec_matches_dense_hessian(case, hvp_mode):
    dense = dense_hessian(case.model, case.batches, loss_fn=case.loss_fn)
    operator = HessianOperator(case.model, case.batches, loss_fn=case.loss_fn, dtype=torch.float64, hvp_mode=hvp_mode)

    assert operator.size == dense.shape[0]
    for vector in random_vectors(operator.size):
        torch.testing.assert_close(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)
    assert operator.num_matvecs == 3
    assert operator.hvp_mode == hvp_mode


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_auto_mode_matches_dense_hessian(case):
    dense = dense_hessian(case.model, case.batches, loss_fn=case.loss_fn)
    operator = HessianOperator(case.model, case.batches, loss_fn=case.loss_fn, dtype=torch.float64)

    vector = random_vectors(operator.size, 1)[0]
    torch.testing.assert_close(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)
    assert operator.hvp_mode in ("forward_over_reverse", "double_backward")


def test_single_batch_keeps_graph_by_default():
    case = case_by_name("mlp")
    inputs = torch.cat([x for x, _ in case.batches])
    targets = torch.cat([y for _, y in case.batches])

    single = HessianOperator(case.model, [(inputs, targets)], dtype=torch.float64)
    split = HessianOperator(case.model, case.batches, dtype=torch.float64)
    forward = HessianOperator(case.model, [(inputs, targets)], dtype=torch.float64, hvp_mode="forward_over_reverse")

    assert single.cache_graph is True
    assert single.hvp_mode == "double_backward"
    assert split.cache_graph is False
    assert forward.cache_graph is False


def test_probe_graph_matches_dense():
    # One batch: the construction-time gradient keeps its graph and serves every product.
    case = case_by_name("cnn")
    batch = (torch.cat([x for x, _ in case.batches]), torch.cat([y for _, y in case.batches]))
    dense = dense_hessian(case.model, [batch], loss_fn=case.loss_fn)
    operator = HessianOperator(case.model, [batch], loss_fn=case.loss_fn, dtype=torch.float64)

    assert operator.cache_graph is True
    for vector in random_vectors(operator.size):
        torch.testing.assert_close(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("batches", ["one", "two"])
def test_matvec_into_out_matches_dense(batches):
    case = case_by_name("cnn")
    data = case.batches
    if batches == "one":
        data = [(torch.cat([x for x, _ in case.batches]), torch.cat([y for _, y in case.batches]))]
    operator = HessianOperator(case.model, data, loss_fn=case.loss_fn, dtype=torch.float64, weight_decay=0.25)
    dense = dense_hessian(case.model, data, loss_fn=case.loss_fn) + 0.25 * torch.eye(operator.size, dtype=torch.float64)
    out = torch.full((operator.size,), float("nan"), dtype=torch.float64)

    for vector in random_vectors(operator.size):
        product = operator.matvec(vector, out=out)
        assert product.data_ptr() == out.data_ptr()
        torch.testing.assert_close(out, dense @ vector, rtol=1e-10, atol=1e-12)


def test_matvec_rejects_wrong_out():
    case = case_by_name("mlp")
    operator = HessianOperator(case.model, case.batches, dtype=torch.float64)

    with pytest.raises(HessianError, match=r"out must be a torch.float64 tensor of shape \(57,\) on cpu, got torch.float32 \(57,\) on cpu"):
        operator.matvec(torch.zeros(57, dtype=torch.float64), out=torch.zeros(57))
    shared = torch.zeros(57, dtype=torch.float64)
    with pytest.raises(HessianError, match=r"out shares memory with vector; pass a separate tensor for the product"):
        operator.matvec(shared, out=shared)


def test_data_gradient_matches_autograd():
    case = case_by_name("cnn")
    model = copy.deepcopy(case.model).double().eval()
    inputs = torch.cat([x for x, _ in case.batches]).double()
    targets = torch.cat([y for _, y in case.batches])
    loss = case.loss_fn(model(inputs), targets)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()))])

    operator = HessianOperator(case.model, case.batches, loss_fn=case.loss_fn, dtype=torch.float64, weight_decay=0.5)

    torch.testing.assert_close(operator.data_gradient, expected, rtol=1e-10, atol=1e-12)
    assert operator.gradient_norm == pytest.approx(float(expected.norm()), rel=1e-12)


def test_cached_graph_matches_dense_hessian():
    case = case_by_name("cnn")
    dense = dense_hessian(case.model, case.batches, loss_fn=case.loss_fn)
    operator = HessianOperator(case.model, case.batches, loss_fn=case.loss_fn, dtype=torch.float64, cache_graph=True)

    for vector in random_vectors(operator.size):
        torch.testing.assert_close(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)


def test_finite_differences_match_dense_hessian():
    case = case_by_name("mlp")
    dense = dense_hessian(case.model, case.batches, loss_fn=case.loss_fn)
    operator = HessianOperator(case.model, case.batches, loss_fn=case.loss_fn, dtype=torch.float64, finite_differences=True)

    assert operator.hvp_mode == "finite_differences"
    for vector in random_vectors(operator.size):
        expected = dense @ vector
        error = torch.linalg.vector_norm(operator.matvec(vector) - expected) / torch.linalg.vector_norm(expected)
        assert error < 1e-7


def test_uneven_batches_equal_one_batch():
    case = case_by_name("batchnorm_eval")
    inputs = torch.cat([x for x, _ in case.batches])
    targets = torch.cat([y for _, y in case.batches])
    split = HessianOperator(case.model, case.batches, dtype=torch.float64, hvp_mode="double_backward")
    whole = HessianOperator(case.model, [(inputs, targets)], dtype=torch.float64, hvp_mode="double_backward")

    assert [len(y) for _, y in case.batches] == [13, 19]
    assert split.num_examples == whole.num_examples == 32
    for vector in random_vectors(split.size):
        torch.testing.assert_close(split.matvec(vector), whole.matvec(vector), rtol=1e-12, atol=1e-14)


def test_weight_decay_adds_identity():
    case = case_by_name("mlp_mse")
    dense = dense_hessian(case.model, case.batches, loss_fn=case.loss_fn, weight_decay=0.05)
    operator = HessianOperator(case.model, case.batches, loss_fn=case.loss_fn, dtype=torch.float64, weight_decay=0.05)

    for vector in random_vectors(operator.size):
        torch.testing.assert_close(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)


def test_parameter_subset_gives_dense_subblock():
    case = case_by_name("cnn")
    names = [name for name, _ in case.model.named_parameters()]
    selected = ["fc.weight", "conv.bias"]
    full = dense_hessian(case.model, case.batches)
    sizes = dict((name, parameter.numel()) for name, parameter in case.model.named_parameters())
    offsets = {}
    position = 0
    for name in names:
        offsets[name] = range(position, position + sizes[name])
        position += sizes[name]
    # The operator keeps named_parameters() order: conv.bias comes before fc.weight.
    index = torch.tensor([i for name in names if name in selected for i in offsets[name]])
    expected_block = full[index][:, index]

    operator = HessianOperator(case.model, case.batches, params=selected, dtype=torch.float64)

    assert operator.parameter_names == ("conv.bias", "fc.weight")
    for vector in random_vectors(operator.size):
        torch.testing.assert_close(operator.matvec(vector), expected_block @ vector, rtol=1e-10, atol=1e-12)


class PartlyUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.frozen(torch.tanh(self.used(inputs)))


def test_parameters_without_gradient_are_excluded():
    torch.manual_seed(0)
    model = PartlyUnused()
    batches = [(torch.randn(10, 4), torch.randint(0, 3, (10,)))]
    dense = dense_hessian(model, batches, params=["used.weight", "used.bias"])

    operator = HessianOperator(model, batches, dtype=torch.float64)

    assert operator.parameter_names == ("used.weight", "used.bias")
    assert operator.excluded_parameters == {
        "unused.weight": "receives no gradient from the loss",
        "unused.bias": "receives no gradient from the loss",
        "frozen.weight": "requires_grad=False",
        "frozen.bias": "requires_grad=False",
    }
    vector = random_vectors(operator.size, 1)[0]
    torch.testing.assert_close(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)


def test_only_unused_parameters_raise():
    model = PartlyUnused()
    batches = [(torch.randn(10, 4), torch.randint(0, 3, (10,)))]

    with pytest.raises(HessianError, match="none of the selected parameters receives a gradient"):
        HessianOperator(model, batches, params=["unused.weight"])


def test_model_state_bit_identical_after_analysis():
    case = case_by_name("batchnorm_eval")
    model = case.model
    model.train()
    model[0].eval()
    modes_before = [module.training for module in model.modules()]
    state_before = clone_state(model)

    analyze_hessian(
        model,
        case.batches,
        top_k=2,
        trace_samples=4,
        density_steps=5,
        dtype=torch.float64,
        quantities=("eigenvalues", "trace", "density"),
    )

    state_after = clone_state(model)
    assert state_after.keys() == state_before.keys()
    for name, tensor in state_before.items():
        assert state_after[name].dtype == tensor.dtype, name
        assert torch.equal(state_after[name], tensor), name
    assert [module.training for module in model.modules()] == modes_before
    assert all(parameter.grad is None for parameter in model.parameters())


def test_numerics_flags_set_during_products_and_restored():
    case = case_by_name("mlp")
    observed = []

    def recording_loss(outputs, targets):
        observed.append(
            (
                torch.are_deterministic_algorithms_enabled(),
                torch.backends.cuda.matmul.allow_tf32,
                torch.backends.cudnn.allow_tf32,
            )
        )
        return nn.functional.cross_entropy(outputs, targets)

    flags_before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.allow_tf32)
    operator = HessianOperator(case.model, case.batches, loss_fn=recording_loss, hvp_mode="double_backward")
    observed.clear()
    operator.matvec(torch.ones(operator.size))
    flags_after = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.allow_tf32)

    # PyTorch enables TF32 for cuDNN by default, so its flag shows both the change and the restore.
    assert flags_before == (False, True)
    assert observed
    assert all(flags == (True, False, False) for flags in observed)
    assert flags_after == flags_before


def resident_bytes() -> int:
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads resident memory from /proc")
@pytest.mark.parametrize(
    ("hvp_mode", "cache_graph"),
    [("forward_over_reverse", False), ("double_backward", False), ("double_backward", True)],
)
def test_memory_flat_over_100_products(hvp_mode, cache_graph):
    # A leaked autograd graph would hold this batch's activations: about 2 MB per product.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 512), nn.Tanh(), nn.Linear(512, 10))
    batches = [(torch.randn(512, 32), torch.randint(0, 10, (512,)))]
    operator = HessianOperator(model, batches, hvp_mode=hvp_mode, cache_graph=cache_graph)
    vector = torch.randn(operator.size)

    tracemalloc.start()
    for _ in range(20):
        operator.matvec(vector)
    resident_early = resident_bytes()
    python_early, _ = tracemalloc.get_traced_memory()
    for _ in range(80):
        operator.matvec(vector)
    resident_late = resident_bytes()
    python_late, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert operator.num_matvecs == 100
    assert resident_late - resident_early < 40 * 2**20
    assert python_late - python_early < 1 * 2**20


# -- input checks -------------------------------------------------------------------------------


def test_batchnorm_in_train_mode_raises():
    case = case_by_name("batchnorm_eval")

    with pytest.raises(HessianError, match=r"'1' \(BatchNorm1d using batch statistics\).*allow_train_mode=True"):
        HessianOperator(case.model, case.batches, mode="train")


def test_active_dropout_raises():
    model = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.Linear(6, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,)))]

    with pytest.raises(HessianError, match=r"'1' \(Dropout with p=0.5 in train mode\)"):
        HessianOperator(model, batches, mode="train")


def test_allowed_dropout_repeats_the_same_matrix():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3))
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))), (torch.randn(5, 4), torch.randint(0, 3, (5,)))]
    operator = HessianOperator(model, batches, mode="train", allow_train_mode=True, dtype=torch.float64)
    first, second = random_vectors(operator.size, 2)

    # Only fixed dropout masks make repeated products equal and the matrix symmetric.
    assert torch.equal(operator.matvec(first), operator.matvec(first))
    assert float(second @ operator.matvec(first)) == pytest.approx(float(first @ operator.matvec(second)), rel=1e-10)


def test_allowed_batchnorm_train_mode_matches_autograd():
    case = case_by_name("batchnorm_eval")
    operator = HessianOperator(case.model, case.batches, mode="train", allow_train_mode=True, dtype=torch.float64)

    reference_model = copy.deepcopy(case.model).double().train()
    names = [name for name, _ in reference_model.named_parameters()]
    shapes = [parameter.shape for parameter in reference_model.parameters()]
    sizes = [parameter.numel() for parameter in reference_model.parameters()]

    def mean_loss(theta):
        pieces = torch.split(theta, sizes)
        replaced = {name: piece.view(shape) for name, piece, shape in zip(names, pieces, shapes)}
        total = theta.new_zeros(())
        for inputs, targets in case.batches:
            outputs = functional_call(reference_model, replaced, (inputs.double(),))
            total = total + len(targets) / 32 * nn.functional.cross_entropy(outputs, targets)
        return total

    flat = torch.cat([parameter.detach().reshape(-1) for parameter in reference_model.parameters()])
    # torch.autograd.functional.hessian is reverse over reverse; torch.func.hessian mishandles
    # BatchNorm on batch statistics.
    dense = torch.autograd.functional.hessian(mean_loss, flat)

    for vector in random_vectors(operator.size, 2):
        torch.testing.assert_close(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)
    assert operator.hvp_mode == "double_backward"
    assert case.model[1].training is False


def test_k_larger_than_parameter_count_raises():
    case = case_by_name("mlp_mse")
    operator = HessianOperator(case.model, case.batches, loss_fn=case.loss_fn)

    with pytest.raises(HessianError, match=rf"k must be <= the number of parameters \({operator.size}\), got {operator.size + 1}"):
        lanczos(operator, k=operator.size + 1)


def test_nan_weight_raises_with_parameter_name():
    case = case_by_name("mlp")
    with torch.no_grad():
        case.model[2].weight[0, 0] = float("nan")

    with pytest.raises(HessianError, match=r"'2.weight' contains 1 NaN or infinite values"):
        HessianOperator(case.model, case.batches)


def test_nan_loss_raises():
    case = case_by_name("mlp")
    inputs, targets = case.batches[1]
    inputs = inputs.clone()
    inputs[3, 0] = float("nan")

    with pytest.raises(HessianError, match=r"the loss on batch 1 is nan"):
        HessianOperator(case.model, [case.batches[0], (inputs, targets)])


def test_too_few_examples_raise():
    case = case_by_name("mlp")

    with pytest.raises(HessianError, match=r"contain 0 examples but at least 1 are required"):
        HessianOperator(case.model, [])
    with pytest.raises(HessianError, match=r"contain 32 examples but at least 100 are required"):
        HessianOperator(case.model, case.batches, min_examples=100)


def test_single_pair_instead_of_batches_raises():
    case = case_by_name("mlp")

    with pytest.raises(HessianError, match=r"wrap a single batch as \[\(inputs, targets\)\]"):
        HessianOperator(case.model, case.batches[0])


def test_unknown_parameter_name_raises():
    case = case_by_name("mlp")

    with pytest.raises(HessianError, match=r"unknown parameter names \['head.weight'\]"):
        HessianOperator(case.model, case.batches, params=["head.weight"])


class SquareOnce(torch.autograd.Function):
    """x ** 2 with a first derivative only."""

    @staticmethod
    def forward(ctx, inputs):
        ctx.save_for_backward(inputs)
        return inputs * inputs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        (inputs,) = ctx.saved_tensors
        return 2 * inputs * grad_output


class SquareNet(nn.Module):
    def __init__(self, custom: bool) -> None:
        super().__init__()
        self.first = nn.Linear(4, 5)
        self.second = nn.Linear(5, 3)
        self.custom = custom

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.first(inputs)
        hidden = SquareOnce.apply(hidden) if self.custom else hidden * hidden
        return self.second(hidden)


def test_operation_without_double_backward_raises():
    torch.manual_seed(0)
    model = SquareNet(custom=True)
    batches = [(torch.randn(12, 4), torch.randint(0, 3, (12,)))]
    operator = HessianOperator(model, batches)

    with pytest.raises(SecondDerivativeError, match=r"\['SquareOnceBackward'\].*finite_differences=True"):
        operator.matvec(torch.ones(operator.size))
    with pytest.raises(SecondDerivativeError, match=r"marked @once_differentiable"):
        HessianOperator(model, batches, hvp_mode="double_backward")


class SquareNoJvp(torch.autograd.Function):
    """x ** 2 with a backward that torch.func cannot take forward-mode derivatives of."""

    @staticmethod
    def forward(inputs):
        return inputs * inputs

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad_output):
        (inputs,) = ctx.saved_tensors
        return 2 * inputs * grad_output


def loss_without_jvp(outputs, targets):
    return nn.functional.cross_entropy(SquareNoJvp.apply(outputs), targets)


def test_forward_over_reverse_failure_raises():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(12, 4), torch.randint(0, 3, (12,)))]
    operator = HessianOperator(model, batches, loss_fn=loss_without_jvp, hvp_mode="forward_over_reverse")

    with pytest.raises(SecondDerivativeError, match=r"forward-over-reverse differentiation failed.*hvp_mode='auto'"):
        operator.matvec(torch.ones(operator.size))


def test_auto_mode_falls_back_to_double_backward():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    batches = [(torch.randn(12, 4), torch.randint(0, 3, (12,)))]
    operator = HessianOperator(model, batches, loss_fn=loss_without_jvp, dtype=torch.float64, cache_graph=False)

    def squared_logits_loss(outputs, targets):
        return nn.functional.cross_entropy(outputs * outputs, targets)

    dense = dense_hessian(model, batches, loss_fn=squared_logits_loss)
    vector = random_vectors(operator.size, 1)[0]
    torch.testing.assert_close(operator.matvec(vector), dense @ vector, rtol=1e-10, atol=1e-12)
    assert operator.hvp_mode == "double_backward"


def test_finite_differences_handle_operation_without_double_backward():
    torch.manual_seed(0)
    custom = SquareNet(custom=True)
    reference = SquareNet(custom=False)
    reference.load_state_dict(custom.state_dict())
    batches = [(torch.randn(12, 4), torch.randint(0, 3, (12,)))]
    dense = dense_hessian(reference, batches)

    operator = HessianOperator(custom, batches, dtype=torch.float64, finite_differences=True)

    for vector in random_vectors(operator.size):
        expected = dense @ vector
        error = torch.linalg.vector_norm(operator.matvec(vector) - expected) / torch.linalg.vector_norm(expected)
        assert error < 1e-7


class CTCHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.project = nn.Linear(4, 5)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        # (batch, time, features) to the (time, batch, classes) log-probabilities ctc_loss expects.
        return self.project(inputs).log_softmax(-1).transpose(0, 1)


def ctc_mean_loss(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    steps, batch, _ = log_probs.shape
    input_lengths = torch.full((batch,), steps, dtype=torch.long)
    target_lengths = torch.full((batch,), targets.shape[1], dtype=torch.long)
    return nn.functional.ctc_loss(log_probs, targets, input_lengths, target_lengths)


def test_builtin_operation_without_second_derivative_named():
    torch.manual_seed(0)
    model = CTCHead()
    batches = [(torch.randn(3, 8, 4), torch.randint(1, 5, (3, 2)))]
    operator = HessianOperator(model, batches, loss_fn=ctc_mean_loss, cache_graph=False)

    with pytest.raises(SecondDerivativeError, match=r"failed in aten::_ctc_loss_backward .*finite_differences=True"):
        operator.matvec(torch.ones(operator.size))
    fallback = HessianOperator(model, batches, loss_fn=ctc_mean_loss, finite_differences=True)
    assert torch.isfinite(fallback.matvec(torch.ones(fallback.size))).all()
