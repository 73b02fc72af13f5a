"""Parameter selection for the Hessian: all parameters, the SEAL early/late split, or name patterns."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Union

from torch import nn

from seal_probe.hessian.operators import HessianError

ParameterSpec = Union[str, Sequence[str]]
NAMED_SELECTIONS = ("all", "early", "late")


def select_parameters(model: nn.Module, spec: ParameterSpec = "all", *, threshold: str = "layer3") -> list[str]:
    """Resolve a parameter selection to names, in named_parameters() order.

    spec is one of:
    - "all": every parameter.
    - "early" or "late": the two sides of seal_train.models.split_parameters at the threshold
      block. Early parameters are those before the first parameter inside the block.
    - fnmatch patterns over named_parameters() names, such as ["layer4.*", "fc.*"]. A single
      string other than the three names above counts as one pattern.
    Frozen parameters are kept here, and HessianOperator excludes them.
    """
    names = [name for name, _ in model.named_parameters()]
    if isinstance(spec, str) and spec == "all":
        return names
    if isinstance(spec, str) and spec in ("early", "late"):
        from seal_train.models import split_parameters

        early, late = split_parameters(model, threshold)
        chosen = early if spec == "early" else late
        if not chosen:
            raise HessianError(
                f"the {spec!r} parameters at threshold {threshold!r} are empty; choose another threshold block"
            )
        return [name for name, _ in chosen]

    patterns = [spec] if isinstance(spec, str) else list(spec)
    if not patterns:
        raise HessianError("params is an empty list of patterns; pass 'all', 'early', 'late' or name patterns")
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
            raise HessianError(
                f"parameter pattern {pattern!r} matches no parameter; names look like {names[:4]}"
            )
    return [name for name in names if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)]
