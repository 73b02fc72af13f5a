"""Dense reference Hessians and small reference models for checking the Hessian engines."""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from seal_probe.hessian.operators import LossFn


def dense_hessian(
    model: nn.Module,
    batches: Sequence[tuple[Any, Any]],
    *,
    loss_fn: LossFn | None = None,
    params: Sequence[str] | None = None,
    weight_decay: float = 0.0,
) -> torch.Tensor:
    """Return the dense float64 Hessian of the example-weighted mean loss, built with torch.func.hessian.

    H = d^2/d theta^2 [sum_b (n_b / N) * loss_fn(model(x_b), y_b)] + weight_decay * I over the
    parameters named in `params` (default: all with requires_grad), flattened in named_parameters()
    order. The model is deep-copied to float64 and put in eval mode, because torch.func.hessian
    (forward over reverse) gives wrong second derivatives through BatchNorm on batch statistics in
    PyTorch 2.14. Only for small models: the matrix has n^2 entries.
    """
    loss_fn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
    private = copy.deepcopy(model).double().eval()
    base = {name: parameter.detach() for name, parameter in private.named_parameters()}
    names = list(params) if params is not None else [n for n, p in model.named_parameters() if p.requires_grad]
    shapes = [base[name].shape for name in names]
    sizes = [base[name].numel() for name in names]
    flat = torch.cat([base[name].reshape(-1) for name in names])

    prepared = []
    for inputs, targets in batches:
        inputs = inputs.double() if inputs.is_floating_point() else inputs
        targets = targets.double() if targets.is_floating_point() else targets
        prepared.append((inputs, targets))
    total = sum(int(targets.shape[0]) for _, targets in prepared)

    def mean_loss(theta: torch.Tensor) -> torch.Tensor:
        pieces = torch.split(theta, sizes)
        replaced = {name: piece.view(shape) for name, piece, shape in zip(names, pieces, shapes)}
        value = theta.new_zeros(())
        for inputs, targets in prepared:
            outputs = functional_call(private, {**base, **replaced}, (inputs,))
            value = value + (targets.shape[0] / total) * loss_fn(outputs, targets)
        return value

    hessian = torch.func.hessian(mean_loss)(flat)
    return hessian + weight_decay * torch.eye(flat.numel(), dtype=hessian.dtype)


@dataclass(frozen=True)
class ReferenceCase:
    """A small model with fixed batches and loss, small enough for a dense Hessian."""

    name: str
    model: nn.Module
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    loss_fn: LossFn


def _uneven_split(inputs: torch.Tensor, targets: torch.Tensor, first: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(inputs[:first], targets[:first]), (inputs[first:], targets[first:])]


def _mse(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(outputs, targets)


def reference_cases(seed: int = 0) -> list[ReferenceCase]:
    """Build an MLP (cross-entropy), an MLP (mean squared error), a small CNN and an MLP with BatchNorm.

    Each has two uneven batches (13 and 19 examples). The BatchNorm model has random running
    statistics, so eval mode differs from the identity normalisation. The global random number
    generator is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_cases(torch.Generator().manual_seed(seed))


def _build_cases(generator: torch.Generator) -> list[ReferenceCase]:
    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    def labels(count: int, classes: int) -> torch.Tensor:
        return torch.randint(0, classes, (count,), generator=generator)

    cases = []

    mlp = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    cases.append(ReferenceCase("mlp", mlp, _uneven_split(randn(32, 5), labels(32, 3), 13), nn.functional.cross_entropy))

    regression = nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 2))
    cases.append(ReferenceCase("mlp_mse", regression, _uneven_split(randn(32, 4), randn(32, 2), 13), _mse))

    cnn = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(1, 3, kernel_size=3),
            act=nn.Tanh(),
            pool=nn.AvgPool2d(2),
            flat=nn.Flatten(),
            fc=nn.Linear(12, 3),
        )
    )
    cases.append(ReferenceCase("cnn", cnn, _uneven_split(randn(32, 1, 6, 6), labels(32, 3), 13), nn.functional.cross_entropy))

    batchnorm = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    with torch.no_grad():
        batchnorm[1].running_mean.copy_(randn(6) * 0.5)
        batchnorm[1].running_var.copy_(randn(6).abs() + 0.5)
        batchnorm[1].weight.copy_(1.0 + 0.3 * randn(6))
        batchnorm[1].bias.copy_(0.3 * randn(6))
    batchnorm.eval()
    cases.append(
        ReferenceCase("batchnorm_eval", batchnorm, _uneven_split(randn(32, 4), labels(32, 3), 13), nn.functional.cross_entropy)
    )
    return cases


def case_by_name(name: str, seed: int = 0) -> ReferenceCase:
    """Return one of reference_cases() by name."""
    for case in reference_cases(seed):
        if case.name == name:
            return case
    raise KeyError(f"unknown reference case {name!r}")


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copy every parameter and buffer, for bit-identity checks after an analysis."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict(keep_vars=True).items()}

