"""Strategies: the ascent step, momentum resets, LLF re-initialisation, the threshold match and the ablations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from seal_train.loop import BatchEvent, train
from seal_train.models import build_model, split_parameters
from seal_train.strategies import (
    ASCENT_PHASE,
    STRATEGIES,
    ascend_gradients,
    build_optimizer,
    get_strategy,
    late_modules,
    set_learning_rate,
)

pytestmark = pytest.mark.usefixtures("single_thread")

LR = 0.05
WEIGHT_DECAY = 5e-4
MOMENTUM = 0.9
SCALE = -0.01


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet-narrow", num_classes=10, in_channels=1, widths=(4, 8, 8, 8)).double()


def batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 12, 12, generator=generator, dtype=torch.float64), torch.randint(0, 10, (8,), generator=generator)) for _ in range(count)]


def autograd_gradients(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gradients of the mean cross-entropy on a copy of the model, taken with torch.autograd.grad."""
    clone = copy.deepcopy(model)
    names, params = zip(*clone.named_parameters())
    loss = nn.functional.cross_entropy(clone(images), labels)
    return dict(zip(names, torch.autograd.grad(loss, params)))


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor) -> None:
    """One step as train_epoch takes it: backward, negate ascending gradients, SGD step."""
    optimizer.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(images), labels).backward()
    ascend_gradients(optimizer)
    optimizer.step()


def phase_optimizer(model: nn.Module, strategy_name: str) -> tuple[torch.optim.Optimizer, set[str], set[str]]:
    strategy = get_strategy(strategy_name, ascent_epochs=1, ascent_scale=SCALE)
    early, late = split_parameters(model, "layer3")
    phase = strategy.phase(0, generation=1)
    optimizer = build_optimizer(phase, early=[p for _, p in early], late=[p for _, p in late], lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, nesterov=False)
    set_learning_rate(optimizer, LR)
    return optimizer, {n for n, _ in early}, {n for n, _ in late}


@pytest.mark.parametrize("strategy", ["seal", "llf-seal", "seal-freeze"])
def test_early_ascent_step_fresh_momentum(strategy):
    model = tiny_model()
    optimizer, early, late = phase_optimizer(model, strategy)
    (images, labels), = batches(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = autograd_gradients(model, images, labels)

    optimizer_step(model, optimizer, images, labels)

    for name, param in model.named_parameters():
        if name in early:
            expected = before[name] + abs(SCALE) * LR * grads[name]
        elif strategy == "seal-freeze":
            assert torch.equal(param.detach(), before[name]), name
            continue
        else:
            expected = before[name] - LR * (grads[name] + WEIGHT_DECAY * before[name])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12, msg=name)


def test_seal_ascent_second_step_momentum():
    model = tiny_model()
    optimizer, early, late = phase_optimizer(model, "seal")
    (images1, labels1), (images2, labels2) = batches(2)
    grads1 = autograd_gradients(model, images1, labels1)
    optimizer_step(model, optimizer, images1, labels1)
    middle = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads2 = autograd_gradients(model, images2, labels2)

    optimizer_step(model, optimizer, images2, labels2)

    # Early: theta += |S| * lr * buf with buf = mu * g1 + g2, the momentum of the true gradients.
    for name in early:
        param = model.get_parameter(name).detach()
        expected = middle[name] + abs(SCALE) * LR * (MOMENTUM * grads1[name] + grads2[name])
        torch.testing.assert_close(param, expected, rtol=1e-10, atol=1e-12, msg=name)


def test_reverse_late_ascends_early_descends():
    model = tiny_model()
    optimizer, early, late = phase_optimizer(model, "reverse")
    (images, labels), = batches(1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = autograd_gradients(model, images, labels)

    optimizer_step(model, optimizer, images, labels)

    for name, param in model.named_parameters():
        if name in late:
            expected = before[name] + abs(SCALE) * LR * grads[name]
        else:
            expected = before[name] - LR * (grads[name] + WEIGHT_DECAY * before[name])
        torch.testing.assert_close(param.detach(), expected, rtol=1e-10, atol=1e-12, msg=name)


def test_generation_zero_descends_for_every_strategy():
    for name in STRATEGIES:
        strategy = get_strategy(name, ascent_epochs=3, ascent_scale=SCALE)
        for epoch in range(4):
            assert strategy.phase(epoch, generation=0).name != ASCENT_PHASE, (name, epoch)


def test_ascent_lasts_k_epochs():
    strategy = get_strategy("seal", ascent_epochs=2, ascent_scale=SCALE)
    phases = [strategy.phase(epoch, generation=1).name for epoch in range(4)]
    assert phases == ["ascent", "ascent", "descent", "descent"]


def late_conv_and_classifier_weights(model: nn.Module, late: set[str]) -> set[str]:
    return {
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear)) and f"{name}.weight" in late
    }


@pytest.mark.parametrize("name", ["llf", "llf-seal"])
def test_llf_reinitialises_late_weights_only(name):
    model = tiny_model()
    early, late = split_parameters(model, "layer3")
    late_names = {n for n, _ in late}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    strategy = get_strategy(name, ascent_epochs=1, ascent_scale=SCALE)

    strategy.on_generation_start(model, generation=1, late_modules=late_modules(model, late_names), seed=0)

    expected_changed = late_conv_and_classifier_weights(model, late_names)
    assert "fc.weight" in expected_changed
    assert "layer3.0.downsample.0.weight" in expected_changed
    after = model.state_dict()
    for key, value in after.items():
        if key in expected_changed:
            assert not torch.equal(value, before[key]), f"{key} was not re-initialised"
        else:
            assert torch.equal(value, before[key]), f"{key} changed"


def test_llf_new_weights_within_kaiming_bound():
    model = tiny_model()
    early, late = split_parameters(model, "layer3")
    late_names = {n for n, _ in late}
    get_strategy("llf", ascent_epochs=0, ascent_scale=SCALE).on_generation_start(
        model, generation=1, late_modules=late_modules(model, late_names), seed=0
    )

    for key in late_conv_and_classifier_weights(model, late_names):
        weight = model.get_parameter(key).detach()
        fan_in = weight[0].numel()
        bound = 1.0 / math.sqrt(fan_in)
        assert weight.abs().max() <= bound, key
        # A uniform draw over +-bound with this many values reaches at least half the bound.
        assert weight.abs().max() > 0.5 * bound, key


def test_llf_generation_zero_unchanged():
    model = tiny_model()
    early, late = split_parameters(model, "layer3")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    get_strategy("llf", ascent_epochs=0, ascent_scale=SCALE).on_generation_start(
        model, generation=0, late_modules=late_modules(model, {n for n, _ in late}), seed=0
    )
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class Layer30First(nn.Module):
    """A model whose block layer30 comes before layer3 in named_parameters() order."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(4, 4)
        self.layer30 = nn.Linear(4, 4)
        self.layer3 = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 2)


def test_threshold_skips_layer30():
    early, late = split_parameters(Layer30First(), "layer3")
    assert [n for n, _ in early] == ["stem.weight", "stem.bias", "layer30.weight", "layer30.bias"]
    assert [n for n, _ in late] == ["layer3.weight", "layer3.bias", "fc.weight", "fc.bias"]


@pytest.mark.slow
def test_loop_momentum_resets(tiny_config):
    """Momentum buffers are empty before the first step of each generation and of the descent after the ascent."""
    config = tiny_config(strategy="seal", generations=3, epochs=3, ascent_epochs=1)
    seen = {}

    def record(event: BatchEvent) -> None:
        if event.stage != "before_step" or event.batch > 1:
            return
        buffers = [s.get("momentum_buffer") for s in event.optimizer.state.values()]
        weight_decay = {group["name"]: group["weight_decay"] for group in event.optimizer.param_groups}
        seen[(event.generation, event.epoch, event.batch)] = (any(b is not None for b in buffers), weight_decay, event.phase.name)

    train(config, callback=record)

    for generation in range(3):
        for epoch in range(3):
            has_momentum, weight_decay, phase = seen[(generation, epoch, 0)]
            fresh = epoch == 0 or (generation >= 1 and epoch == 1)
            assert has_momentum != fresh, (generation, epoch)
            assert seen[(generation, epoch, 1)][0], (generation, epoch)
            if phase == ASCENT_PHASE:
                assert weight_decay == {"early": 0.0, "late": config.weight_decay}
            else:
                assert weight_decay == {"early": config.weight_decay, "late": config.weight_decay}
    assert seen[(1, 0, 0)][2] == ASCENT_PHASE
    assert seen[(2, 1, 0)][2] != ASCENT_PHASE


@pytest.mark.slow
def test_loop_seal_freeze_keeps_late_bits(tiny_config):
    """Over a whole ascent epoch of seal-freeze the late parameters keep their bits, the early ones move."""
    config = tiny_config(strategy="seal-freeze", generations=2, epochs=2, ascent_epochs=1)
    snapshots = {}

    def record(event: BatchEvent) -> None:
        if event.generation == 1 and event.epoch == 0 and event.stage == "before_step" and event.batch == 0:
            snapshots["start"] = {n: p.detach().clone() for n, p in event.model.named_parameters()}
        if event.generation == 1 and event.epoch == 0 and event.stage == "after_step":
            snapshots["end"] = {n: p.detach().clone() for n, p in event.model.named_parameters()}

    train(config, callback=record)

    model = build_model("resnet-narrow", num_classes=10, in_channels=1, widths=(4, 8, 8, 8))
    early, late = split_parameters(model, "layer3")
    for name, _ in late:
        assert torch.equal(snapshots["start"][name], snapshots["end"][name]), name
    assert not torch.equal(snapshots["start"]["conv1.weight"], snapshots["end"]["conv1.weight"])
