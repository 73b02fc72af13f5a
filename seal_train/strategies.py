"""Iterative-training strategies (normal, LLF, SEAL and ablations), the per-generation schedule and the optimizer.

A strategy acts through two hooks that the epoch loop calls without knowing which strategy runs:
`on_generation_start` (re-initialisation) and `phase` (how early and late parameters are
optimised in a given epoch). The loop builds a fresh optimizer whenever the phase changes and at
every generation start, which resets the momentum buffers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

# Roles a parameter group can take in a phase.
DESCEND = "descend"
ASCEND = "ascend"
FREEZE = "freeze"

DESCENT_PHASE = "descent"
ASCENT_PHASE = "ascent"


class StrategyError(ValueError):
    """An unknown strategy name or invalid strategy setting."""


@dataclass(frozen=True)
class GroupRule:
    """Optimisation rule of one parameter group in a phase.

    lr_scale multiplies the epoch's learning rate lr_e, and a negative value means gradient ascent.
    Frozen groups are left out of the optimizer, so neither they nor their momentum change.
    """

    role: str
    lr_scale: float
    weight_decay: bool
    frozen: bool = False


@dataclass(frozen=True)
class Phase:
    """The optimisation rules for the early and late parameters during one epoch."""

    name: str
    early: GroupRule
    late: GroupRule


def rule_for(role: str, *, ascent_scale: float) -> GroupRule:
    """Return the group rule of a role; ascending groups get lr S * lr_e and no weight decay."""
    if role == DESCEND:
        return GroupRule(DESCEND, 1.0, True)
    if role == ASCEND:
        # Weight decay with a negative learning rate would grow the weights, so it is off.
        return GroupRule(ASCEND, ascent_scale, False)
    if role == FREEZE:
        return GroupRule(FREEZE, 0.0, False, frozen=True)
    raise StrategyError(f"unknown parameter role {role!r}; choose {DESCEND}, {ASCEND} or {FREEZE}")


@dataclass(frozen=True)
class Strategy:
    """An iterative-training strategy: what happens at the start of every generation g >= 1.

    reinitialize_late re-initialises the late weights (LLF). ascent_roles gives the roles of the
    (early, late) parameters during the first ascent_epochs epochs of each generation g >= 1;
    None means every epoch descends. Generation 0 is ordinary training for every strategy.
    Subclasses may override the two hooks to define strategies that these fields cannot express.
    """

    name: str
    description: str
    reinitialize_late: bool = False
    ascent_roles: tuple[str, str] | None = None
    ascent_epochs: int = 0
    ascent_scale: float = -0.01

    def with_settings(self, *, ascent_epochs: int, ascent_scale: float) -> "Strategy":
        """Return a copy with the run's K (ascent epochs) and S (ascent learning-rate scale)."""
        if ascent_epochs < 0:
            raise StrategyError(f"ascent_epochs must be >= 0, got {ascent_epochs}")
        return dataclasses.replace(self, ascent_epochs=ascent_epochs, ascent_scale=ascent_scale)

    def on_generation_start(self, model: nn.Module, *, generation: int, late_modules: list[tuple[str, nn.Module]], seed: int) -> list[str]:
        """Apply the strategy's change at the start of a generation and return the names of re-initialised tensors."""
        if generation < 1 or not self.reinitialize_late:
            return []
        return reinitialize_weights(late_modules, seed=seed * 1_000_003 + generation)

    def phase(self, epoch: int, *, generation: int) -> Phase:
        """Return the phase of epoch `epoch` (counted from 0 within the generation)."""
        descent = rule_for(DESCEND, ascent_scale=self.ascent_scale)
        if generation >= 1 and self.ascent_roles is not None and epoch < self.ascent_epochs:
            early_role, late_role = self.ascent_roles
            return Phase(
                ASCENT_PHASE,
                rule_for(early_role, ascent_scale=self.ascent_scale),
                rule_for(late_role, ascent_scale=self.ascent_scale),
            )
        return Phase(DESCENT_PHASE, descent, descent)


STRATEGIES: dict[str, Strategy] = {
    strategy.name: strategy
    for strategy in (
        Strategy("normal", "ordinary training restarted every generation: fresh optimizer, schedule restarts"),
        Strategy(
            "llf",
            "later-layer forgetting (Zhou et al. 2022): late conv and classifier weights re-initialised every generation",
            reinitialize_late=True,
        ),
        Strategy(
            "seal",
            "SEAL (Sarfi et al. 2023): early parameters ascend at S * lr for the first K epochs of each generation, late descend",
            ascent_roles=(ASCEND, DESCEND),
        ),
        Strategy("reverse", "ablation of SEAL: late parameters ascend for K epochs, early descend", ascent_roles=(DESCEND, ASCEND)),
        Strategy("seal-freeze", "ablation of SEAL: early parameters ascend for K epochs while late parameters are frozen", ascent_roles=(ASCEND, FREEZE)),
        Strategy(
            "llf-seal",
            "LLF re-initialisation and the SEAL ascent in the same generation",
            reinitialize_late=True,
            ascent_roles=(ASCEND, DESCEND),
        ),
    )
}


def get_strategy(name: str, *, ascent_epochs: int, ascent_scale: float) -> Strategy:
    """Look up a strategy by name and apply the run's ascent settings."""
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[name].with_settings(ascent_epochs=ascent_epochs, ascent_scale=ascent_scale)


# ---------------------------------------------------------------- re-initialisation


def late_modules(model: nn.Module, late_names: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """Return the modules that own at least one late parameter, in named_modules() order."""
    late = set(late_names)
    owners = []
    for module_name, module in model.named_modules():
        own = [f"{module_name}.{name}" if module_name else name for name, _ in module.named_parameters(recurse=False)]
        if any(name in late for name in own):
            owners.append((module_name, module))
    return owners


def reinitialize_weights(modules: list[tuple[str, nn.Module]], *, seed: int) -> list[str]:
    """Re-initialise the weight of every Conv and Linear module with PyTorch's default layer init.

    That init is kaiming_uniform_(weight, a=sqrt(5)), a uniform draw in +-1/sqrt(fan_in).
    Biases, BatchNorm parameters and BatchNorm buffers are left unchanged. The draw uses its own
    seeded RNG stream, so the global RNG state is untouched and a repeat gives identical weights.
    """
    names = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for module_name, module in modules:
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                with torch.no_grad():
                    values = torch.empty_like(module.weight, device="cpu")
                    nn.init.kaiming_uniform_(values, a=math.sqrt(5))
                    module.weight.copy_(values)
                names.append(f"{module_name}.weight")
    return names


# ---------------------------------------------------------------- schedule and optimizer


def learning_rate(epoch: int, *, base_lr: float, epochs: int, warmup_epochs: int) -> float:
    """Return lr_e for epoch e of a generation (counted from 0).

    Linear warm-up lr * (e + 1) / W for e < W, then cosine 0.5 * (1 + cos(pi * (e - W) / (E - W))) * lr.
    """
    if not 0 <= epoch < epochs:
        raise StrategyError(f"epoch must be in [0, {epochs}), got {epoch}")
    if epoch < warmup_epochs:
        return base_lr * (epoch + 1) / warmup_epochs
    return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs))) * base_lr


def build_optimizer(
    phase: Phase,
    *,
    early: list[nn.Parameter],
    late: list[nn.Parameter],
    lr: float,
    momentum: float,
    weight_decay: float,
    nesterov: bool,
) -> torch.optim.SGD:
    """Build a fresh SGD optimizer (empty momentum buffers) for a phase.

    Each parameter group carries "name" (early/late), "role", "lr_scale" and "ascent". torch.optim.SGD
    rejects a negative lr, so an ascending group gets lr |S| * lr_e and ascent=True, and
    `ascend_gradients` negates its gradients before every step. With momentum the update is then
    theta += |S| * lr_e * buf, where buf accumulates the true gradients.
    """
    groups = []
    for group_name, params, rule in (("early", early, phase.early), ("late", late, phase.late)):
        if rule.frozen or not params:
            continue
        groups.append(
            {
                "params": list(params),
                "name": group_name,
                "role": rule.role,
                "lr_scale": rule.lr_scale,
                "ascent": rule.lr_scale < 0,
                "lr": abs(rule.lr_scale) * lr,
                "weight_decay": weight_decay if rule.weight_decay else 0.0,
            }
        )
    if not groups:
        raise StrategyError(f"phase {phase.name!r} freezes every parameter; nothing would be trained")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set each group's lr to |lr_scale| * lr for this epoch."""
    for group in optimizer.param_groups:
        group["lr"] = abs(group["lr_scale"]) * lr


def ascend_gradients(optimizer: torch.optim.Optimizer) -> None:
    """Negate the gradients of the ascending groups, so the SGD step moves them uphill."""
    for group in optimizer.param_groups:
        if group["ascent"]:
            for param in group["params"]:
                if param.grad is not None:
                    param.grad.neg_()


def signed_learning_rates(phase: Phase, lr: float) -> dict[str, float]:
    """Return the effective signed learning rate of the early and late parameters (0 when frozen)."""
    return {
        "early": 0.0 if phase.early.frozen else phase.early.lr_scale * lr,
        "late": 0.0 if phase.late.frozen else phase.late.lr_scale * lr,
    }
