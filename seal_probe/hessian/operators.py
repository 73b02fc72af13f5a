"""Matrix-free Hessian operators: products with the Hessian of a model's mean loss over fixed batches."""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import nn
from torch.func import functional_call, jvp
from torch.func import grad as func_grad

from seal_probe.hessian.reductions import norm

logger = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
HvpMode = Literal["auto", "forward_over_reverse", "double_backward"]
ModelMode = Literal["eval", "train", "keep"]

# Exceptions that torch raises when an operation lacks a forward-mode or second-order derivative,
# or when a custom autograd.Function does not support torch.func transforms.
_DERIVATIVE_ERRORS = (RuntimeError, NotImplementedError)


class HessianError(ValueError):
    """An input for which the Hessian computation would fail or return a silently wrong matrix."""


class SecondDerivativeError(HessianError):
    """An operation in the model has no second derivative, so automatic Hessian-vector products fail."""


@runtime_checkable
class LinearOperator(Protocol):
    """A symmetric linear operator on flat vectors: the interface every algorithm in this package uses."""

    @property
    def size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def num_matvecs(self) -> int: ...

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        """Return A @ vector as a new tensor, which the caller may modify in place."""
        ...


class MatrixOperator:
    """A dense symmetric matrix behind the LinearOperator interface, for small problems and tests."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise HessianError(f"matrix must be square, got shape {tuple(matrix.shape)}")
        self._matrix = matrix
        self._num_matvecs = 0

    @property
    def size(self) -> int:
        return self._matrix.shape[0]

    @property
    def device(self) -> torch.device:
        return self._matrix.device

    @property
    def dtype(self) -> torch.dtype:
        return self._matrix.dtype

    @property
    def num_matvecs(self) -> int:
        return self._num_matvecs

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        self._num_matvecs += 1
        return self._matrix @ vector.to(self._matrix.dtype)


class ShiftedOperator:
    """The operator A + shift * I; its products are counted on the wrapped operator."""

    def __init__(self, operator: LinearOperator, shift: float) -> None:
        self.operator = operator
        self.shift = float(shift)

    @property
    def size(self) -> int:
        return self.operator.size

    @property
    def device(self) -> torch.device:
        return self.operator.device

    @property
    def dtype(self) -> torch.dtype:
        return self.operator.dtype

    @property
    def num_matvecs(self) -> int:
        return self.operator.num_matvecs

    def matvec(self, vector: torch.Tensor) -> torch.Tensor:
        return self.operator.matvec(vector) + self.shift * vector


def _uses_legacy_tf32_flags() -> bool:
    """Return whether the allow_tf32 flags can be read, which fails once the fp32_precision API was used.

    PyTorch 2.9 and later raise on reading one API after the other has set TF32, so the flags are
    saved and restored through whichever API the process already uses.
    """
    try:
        _ = torch.backends.cuda.matmul.allow_tf32
        _ = torch.backends.cudnn.allow_tf32
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def _tf32_disabled() -> Iterator[None]:
    if _uses_legacy_tf32_flags():
        saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        try:
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
            yield
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
        return

    settings = (torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn)
    saved_precisions = [setting.fp32_precision for setting in settings]
    try:
        for setting in settings:
            setting.fp32_precision = "ieee"
        yield
    finally:
        for setting, precision in zip(settings, saved_precisions):
            setting.fp32_precision = precision


@contextlib.contextmanager
def deterministic_numerics() -> Iterator[None]:
    """Disable TF32 and turn on deterministic algorithms for the block, then restore the previous settings.

    Deterministic algorithms are enabled with warn_only=True, so an operation that has no
    deterministic implementation logs a torch warning instead of raising.
    """
    saved_cudnn_deterministic = torch.backends.cudnn.deterministic
    saved_cudnn_benchmark = torch.backends.cudnn.benchmark
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with _tf32_disabled():
        try:
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            torch.use_deterministic_algorithms(True, warn_only=True)
            yield
        finally:
            torch.use_deterministic_algorithms(saved_deterministic, warn_only=saved_warn_only)
            torch.backends.cudnn.deterministic = saved_cudnn_deterministic
            torch.backends.cudnn.benchmark = saved_cudnn_benchmark


@dataclass(frozen=True)
class Batch:
    """One batch on the operator's device and dtype, with its number of examples."""

    inputs: Any
    targets: Any
    num_examples: int


def count_examples(targets: Any) -> int:
    """Return the number of examples in a batch, read from the first dimension of its targets."""
    if isinstance(targets, torch.Tensor):
        return int(targets.shape[0]) if targets.ndim > 0 else 1
    return len(targets)


def _cast_floating(value: Any, *, device: torch.device, dtype: torch.dtype) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        return value.to(dtype) if value.is_floating_point() else value
    return value


def load_batches(
    batches: Iterable[tuple[Any, Any]],
    *,
    device: torch.device,
    dtype: torch.dtype,
    min_examples: int = 1,
) -> list[Batch]:
    """Materialise (inputs, targets) pairs once, on the given device and floating dtype.

    A data loader is read once here, so shuffling or augmentation happens once and every
    product uses the same examples. Batches without examples are dropped.
    """
    if min_examples < 1:
        raise HessianError(f"min_examples must be >= 1, got {min_examples}")
    if isinstance(batches, (tuple, list)) and len(batches) == 2 and isinstance(batches[0], torch.Tensor):
        raise HessianError(
            "batches must be an iterable of (inputs, targets) pairs, got one pair of tensors; "
            "wrap a single batch as [(inputs, targets)]"
        )

    loaded = []
    for index, pair in enumerate(batches):
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise HessianError(f"batch {index} is not an (inputs, targets) pair, got {type(pair).__name__}")
        inputs, targets = pair
        num_examples = count_examples(targets)
        if num_examples == 0:
            logger.debug("Dropping batch %d because it has no examples", index)
            continue
        loaded.append(
            Batch(
                inputs=_cast_floating(inputs, device=device, dtype=dtype),
                targets=_cast_floating(targets, device=device, dtype=dtype),
                num_examples=num_examples,
            )
        )

    total = sum(batch.num_examples for batch in loaded)
    if total < min_examples:
        raise HessianError(
            f"the batches contain {total} examples but at least {min_examples} are required; "
            "pass more batches or lower min_examples"
        )
    return loaded


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Return whether two tensors may share elements: same storage and overlapping byte ranges."""
    if a.device != b.device or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def byte_range(tensor: torch.Tensor) -> tuple[int, int]:
        begin = tensor.storage_offset() * tensor.element_size()
        span = sum((size - 1) * abs(stride) for size, stride in zip(tensor.shape, tensor.stride()))
        return begin, begin + (span + 1) * tensor.element_size()

    a_begin, a_end = byte_range(a)
    b_begin, b_end = byte_range(b)
    return a_begin < b_end and b_begin < a_end


def copy_model(model: nn.Module, *, dtype: torch.dtype | None, mode: ModelMode) -> nn.Module:
    """Return a private deep copy in the requested dtype and mode, with requires_grad off everywhere.

    Every computation runs on this copy, so the audited model's parameters, buffers, gradients
    and train/eval mode are never touched. The copy's parameters are new Parameter objects that
    share storage with the model's, which saves copying the weights. That is safe because
    products read parameter values only through functional_call and nothing writes to them.
    Buffers, which BatchNorm in train mode updates, are copied.
    """
    if mode not in ("eval", "train", "keep"):
        raise HessianError(f"mode must be 'eval', 'train' or 'keep', got {mode!r}")
    shared = {id(parameter): nn.Parameter(parameter.detach(), requires_grad=False) for parameter in model.parameters()}
    try:
        private = copy.deepcopy(model, memo=shared)
    except (RuntimeError, TypeError) as error:
        raise HessianError(
            f"the model cannot be deep-copied ({error}); make every tensor attribute a parameter or buffer"
        ) from error

    if dtype is not None:
        if not dtype.is_floating_point:
            raise HessianError(f"dtype must be a floating-point dtype, got {dtype}")
        private = private.to(dtype)
    if mode == "eval":
        private.eval()
    elif mode == "train":
        private.train()
    private.requires_grad_(False)
    for parameter in private.parameters():
        parameter.grad = None
    return private


def check_finite_state(model: nn.Module) -> None:
    """Raise HessianError if a parameter or floating-point buffer contains NaN or infinity."""
    named_tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in named_tensors:
        if not tensor.is_floating_point():
            continue
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise HessianError(
                f"{name!r} contains {bad} NaN or infinite values; the Hessian is undefined there, "
                "so load a checkpoint with finite weights"
            )


def find_batch_dependent_modules(model: nn.Module) -> list[str]:
    """Describe the modules whose output depends on the batch composition or on random numbers.

    These are BatchNorm layers that normalise with batch statistics (train mode, or
    track_running_stats=False) and dropout layers with p > 0 in train mode. With any of them the
    matrix changes between products unless batches and random numbers are fixed, and the
    per-example weighting no longer equals one concatenated batch.
    NOTE: dropout called through torch.nn.functional inside forward() is not visible here.
    """
    found = []
    for name, module in model.named_modules():
        label = repr(name) if name else "the root module"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            uses_batch_statistics = module.training or not module.track_running_stats
            if uses_batch_statistics:
                found.append(f"{label} ({type(module).__name__} using batch statistics)")
        elif isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            found.append(f"{label} ({type(module).__name__} with p={module.p} in train mode)")
    return found


def has_random_modules(model: nn.Module) -> bool:
    """Return whether a dropout layer is active, so products must re-seed the random number generator."""
    return any(
        isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0
        for module in model.modules()
    )


def find_once_differentiable_functions(grad_fn: Any) -> list[str]:
    """Name the custom autograd Functions in a graph whose backward is marked @once_differentiable."""
    names: list[str] = []
    seen = set()
    stack = [grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        forward_class = getattr(node, "_forward_cls", None)
        if forward_class is not None and hasattr(forward_class.backward, "__wrapped__"):
            names.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(set(names))


def describe_derivative_error(error: BaseException) -> str:
    """Return " in <operation>" when a torch error about a missing derivative names the operation, else ""."""
    message = str(error)
    patterns = (
        r"derivative for (\S+) is not implemented",
        r"forward AD with (\S+) that does not support",
        r"forward-mode AD.*?for (\S+)",
    )
    for pattern in patterns:
        match = re.search(pattern, message)
        if match:
            return f" in {match.group(1).rstrip('.,')}"
    return ""


class HessianOperator:
    """Product with the Hessian of the mean loss of a model over a fixed list of batches.

    The matrix is H = sum_b (n_b / N) * d^2 L_b / d theta^2 + weight_decay * I, where L_b is the
    loss of batch b (a mean over its n_b examples, as loss_fn must return), N = sum_b n_b and theta
    the selected parameters. For per-example losses this equals the Hessian of the mean loss over
    all N examples, so uneven batches give the same matrix as one concatenated batch.

    Products use forward-over-reverse automatic differentiation (torch.func.jvp of
    torch.func.grad) or double backward (torch.autograd.grad with create_graph=True);
    hvp_mode="auto" times the first product both ways and keeps the faster one. cache_graph=True
    keeps every batch's first-order gradient graph, so each product costs one backward pass
    through it, at the price of holding all batches' activations in memory. By default
    (cache_graph=None) the graph is kept when there is a single batch, as PyHessian's `data=`
    mode does, because every product builds that graph anyway. bench/hessian.md
    has the measured costs relative to a gradient. finite_differences=True uses central
    differences of gradients, (g(theta + h v) - g(theta - h v)) / (2 h), for models with an
    operation that has no second derivative.

    The operator works on a private deep copy of the model in the requested dtype and mode, so
    the audited model is never mutated. Selected parameters that receive no gradient on any
    batch, or have requires_grad=False, are excluded and listed in `excluded_parameters`.

    Args:
        model: the audited model; it is deep-copied and never changed.
        batches: (inputs, targets) pairs, read once and kept fixed; `model(inputs)` must work.
        loss_fn: loss_fn(outputs, targets) returning the mean over the batch (default cross-entropy).
        params: names from named_parameters() to take the Hessian over (default: all trainable).
        weight_decay: coefficient of the added weight_decay * I (default 0, data term only).
        dtype: dtype of the copy and the products, such as torch.float64 (default: the model's).
        mode: "eval" (default), "train", or "keep" the model's module modes.
        allow_train_mode: accept BatchNorm on batch statistics and active dropout; batches are then
            fixed and the random number generator is re-seeded from `seed` for every batch.
        hvp_mode: "auto", "forward_over_reverse" or "double_backward".
        cache_graph: keep the first-order gradient graphs between products (double backward only);
            None keeps it for a single batch unless hvp_mode="forward_over_reverse" or
            finite_differences=True, or a custom Function rules out double backward.
        finite_differences: use central differences of gradients instead of second derivatives.
        fd_step: norm of the finite-difference step (default eps ** (1/3) of the dtype).
        min_examples: raise HessianError when the batches contain fewer examples.
        seed: base seed for re-seeding dropout masks.

    Attributes:
        num_examples: N, the number of examples in the batches.
        gradient_norm: norm of the data gradient at theta, computed once at construction.
        excluded_parameters: name -> reason for every selected parameter left out of the matrix.
        num_gradients: gradients computed through gradient().
    """

    # matvec accepts out=, which Lanczos uses to write each product into its basis.
    accepts_out = True

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[tuple[Any, Any]],
        *,
        loss_fn: LossFn | None = None,
        params: Sequence[str] | None = None,
        weight_decay: float = 0.0,
        dtype: torch.dtype | None = None,
        mode: ModelMode = "eval",
        allow_train_mode: bool = False,
        hvp_mode: HvpMode = "auto",
        cache_graph: bool | None = None,
        finite_differences: bool = False,
        fd_step: float | None = None,
        min_examples: int = 1,
        seed: int = 0,
    ) -> None:
        if hvp_mode not in ("auto", "forward_over_reverse", "double_backward"):
            raise HessianError(
                f"hvp_mode must be 'auto', 'forward_over_reverse' or 'double_backward', got {hvp_mode!r}"
            )
        if cache_graph and hvp_mode == "forward_over_reverse":
            raise HessianError("cache_graph=True needs hvp_mode 'double_backward' or 'auto', got 'forward_over_reverse'")
        if cache_graph and finite_differences:
            raise HessianError("cache_graph=True and finite_differences=True exclude each other; choose one")
        if not math.isfinite(weight_decay) or weight_decay < 0:
            raise HessianError(f"weight_decay must be finite and >= 0, got {weight_decay}")
        if fd_step is not None and not (math.isfinite(fd_step) and fd_step > 0):
            raise HessianError(f"fd_step must be finite and > 0, got {fd_step}")

        self.loss_fn: LossFn = loss_fn if loss_fn is not None else nn.functional.cross_entropy
        self.weight_decay = float(weight_decay)
        self.seed = int(seed)
        self.finite_differences = bool(finite_differences)
        self.fd_step = fd_step

        self._model = copy_model(model, dtype=dtype, mode=mode)
        check_finite_state(self._model)
        self._check_batch_dependence(allow_train_mode)
        self._reseed = has_random_modules(self._model)

        parameters = dict(self._model.named_parameters())
        if not parameters:
            raise HessianError(f"{type(model).__name__} has no parameters")
        first = next(iter(parameters.values()))
        self._device = first.device
        self._dtype = dtype if dtype is not None else first.dtype
        self._batches = load_batches(batches, device=self._device, dtype=self._dtype, min_examples=min_examples)
        self.num_examples = sum(batch.num_examples for batch in self._batches)

        self.excluded_parameters: dict[str, str] = {}
        names = self._resolve_names(model, params, parameters)
        self._names = names
        self._primals = tuple(parameters[name].detach() for name in names)
        self._cache_leaves: tuple[torch.Tensor, ...] = ()
        self._cached_gradients: list[tuple[torch.Tensor | None, ...]] | None = None
        # A graph that may be cached is built by the probe itself, which saves one gradient.
        may_cache = len(self._batches) == 1 and not finite_differences and hvp_mode != "forward_over_reverse"
        self._probe_gradient(keep_graph=may_cache and cache_graph is not False)
        if cache_graph is None:
            cache_graph = may_cache and not self._once_differentiable
        self.cache_graph = bool(cache_graph)
        if not self.cache_graph:
            self._cache_leaves, self._cached_gradients = (), None

        self._shapes = [primal.shape for primal in self._primals]
        self._numels = [primal.numel() for primal in self._primals]
        self._size = sum(self._numels)
        self._resolved_mode = self._initial_hvp_mode(hvp_mode)
        self._num_matvecs = 0
        self.num_gradients = 0

    # -- interface --------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Number of selected scalar parameters, the dimension of the matrix."""
        return self._size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def num_matvecs(self) -> int:
        """Number of Hessian-vector products computed so far; one product covers all batches."""
        return self._num_matvecs

    @property
    def parameter_names(self) -> tuple[str, ...]:
        """Names of the parameters the matrix is taken over, in named_parameters() order."""
        return tuple(self._names)

    @property
    def hvp_mode(self) -> str:
        """The product method in use: forward_over_reverse, double_backward or finite_differences."""
        return self._resolved_mode

    @property
    def private_model(self) -> nn.Module:
        """The operator's deep copy of the model (requires_grad off), shared with other engines; do not train it."""
        return self._model

    @property
    def batches(self) -> tuple[Batch, ...]:
        """The fixed batches, on the operator's device and dtype."""
        return tuple(self._batches)

    @property
    def parameter_vector(self) -> torch.Tensor:
        """The selected parameters flattened into one vector (a copy)."""
        return torch.cat([primal.reshape(-1) for primal in self._primals])

    def matvec(self, vector: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Return H @ vector for a flat vector of length `size`.

        With out (a flat tensor of the operator's size, dtype and device that does not overlap
        vector) the product is written there and out is returned.
        """
        if vector.shape != (self._size,):
            raise HessianError(f"vector must have shape ({self._size},), got {tuple(vector.shape)}")
        if out is not None and (out.shape != (self._size,) or out.dtype != self._dtype or out.device != self._device):
            raise HessianError(
                f"out must be a {self._dtype} tensor of shape ({self._size},) on {self._device}, "
                f"got {out.dtype} {tuple(out.shape)} on {out.device}"
            )
        if out is not None and _overlap(out, vector):
            raise HessianError("out shares memory with vector; pass a separate tensor for the product")
        vector = vector.to(device=self._device, dtype=self._dtype)

        with deterministic_numerics(), torch.enable_grad():
            if self._resolved_mode == "finite_differences":
                product = self._finite_difference_product(vector)
            else:
                product = self._automatic_product(self._unflatten(vector), out=out)
        if out is not None and product is not out:
            product = out.copy_(product)
        if self.weight_decay:
            product.add_(vector, alpha=self.weight_decay)

        # A sum is finite exactly when every entry is, unless it overflows; the full check confirms.
        if not math.isfinite(float(product.sum())) and not bool(torch.isfinite(product).all()):
            raise HessianError(
                "the Hessian-vector product contains NaN or infinite values although the loss is finite; "
                "check the model for operations that are not twice differentiable at these weights"
            )
        self._num_matvecs += 1
        return product

    @property
    def data_gradient(self) -> torch.Tensor:
        """The flat gradient of the mean loss without weight decay, computed at construction. Read only."""
        return self._data_gradient

    def gradient(self) -> torch.Tensor:
        """Return the gradient of the mean loss (plus weight_decay * theta) as a flat vector."""
        with deterministic_numerics(), torch.enable_grad():
            gradient = self._gradient_at(self._primals)
        if self.weight_decay:
            gradient = gradient + self.weight_decay * self.parameter_vector
        self.num_gradients += 1
        return gradient

    # -- setup ------------------------------------------------------------------------------

    def _check_batch_dependence(self, allow_train_mode: bool) -> None:
        modules = find_batch_dependent_modules(self._model)
        if not modules:
            return
        if not allow_train_mode:
            raise HessianError(
                f"the Hessian would change between products because of: {'; '.join(modules)}; "
                "use mode='eval', or pass allow_train_mode=True to fix the batches and random numbers"
            )
        logger.warning(
            "Computing the Hessian with batch-dependent modules (%s); batches and random seeds are fixed, "
            "but the result depends on the batch split",
            "; ".join(modules),
        )

    def _resolve_names(
        self, model: nn.Module, params: Sequence[str] | None, parameters: dict[str, nn.Parameter]
    ) -> list[str]:
        requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
        if params is None:
            requested = list(parameters)
        else:
            if isinstance(params, str):
                raise HessianError(f"params must be a sequence of parameter names, got the string {params!r}")
            unknown = [name for name in params if name not in parameters]
            if unknown:
                raise HessianError(
                    f"unknown parameter names {unknown}; valid names include {list(parameters)[:5]}"
                )
            chosen = set(params)
            requested = [name for name in parameters if name in chosen]

        names = []
        for name in requested:
            if requires_grad.get(name, True):
                names.append(name)
            else:
                self.excluded_parameters[name] = "requires_grad=False"
        if not names:
            raise HessianError("no selected parameter has requires_grad=True; select trainable parameters")
        return names

    def _probe_gradient(self, *, keep_graph: bool) -> None:
        """Compute the gradient once to check the loss and drop parameters that receive no gradient.

        Also stores the data gradient (without weight decay) and its norm in `gradient_norm`. With
        keep_graph (one batch only) the gradient is built with create_graph=True and kept as the
        cached graph for double-backward products.
        """
        leaves = tuple(primal.detach().requires_grad_(True) for primal in self._primals)
        graph_gradients: tuple[torch.Tensor | None, ...] = ()
        used = [False] * len(leaves)
        self._once_differentiable: list[str] = []

        with deterministic_numerics(), torch.enable_grad():
            totals: list[torch.Tensor | None] = [None] * len(leaves)
            for index, batch in enumerate(self._batches):
                loss = self._batch_loss(leaves, batch, index)
                self._check_finite_loss(loss, index)
                if index == 0:
                    self._once_differentiable = find_once_differentiable_functions(loss.grad_fn)
                if loss.grad_fn is None:
                    continue
                grads = torch.autograd.grad(loss, leaves, create_graph=keep_graph, allow_unused=True)
                if keep_graph:
                    graph_gradients = grads
                weight = batch.num_examples / self.num_examples
                for position, grad in enumerate(grads):
                    if grad is None:
                        continue
                    used[position] = True
                    grad = grad.detach()
                    total = totals[position]
                    if total is None:
                        totals[position] = grad if weight == 1.0 else weight * grad
                    else:
                        totals[position] = total + weight * grad

        used_pairs = []
        for name, primal, is_used in zip(self._names, self._primals, used):
            if is_used:
                used_pairs.append((name, primal))
            else:
                self.excluded_parameters[name] = "receives no gradient from the loss"
        if not used_pairs:
            raise HessianError(
                "none of the selected parameters receives a gradient from the loss; "
                "check that the model's forward uses them"
            )
        if len(used_pairs) < len(self._names):
            logger.info("Excluding parameters from the Hessian: %s", self.excluded_parameters)
        self._names = [name for name, _ in used_pairs]
        self._primals = tuple(primal for _, primal in used_pairs)
        self._data_gradient = torch.cat([total.reshape(-1) for total in totals if total is not None])
        self.gradient_norm = norm(self._data_gradient)
        if graph_gradients:
            self._cache_leaves = tuple(leaf for leaf, is_used in zip(leaves, used) if is_used)
            self._cached_gradients = [tuple(grad for grad, is_used in zip(graph_gradients, used) if is_used)]

    def _initial_hvp_mode(self, hvp_mode: HvpMode) -> str:
        if self.finite_differences:
            return "finite_differences"
        if self.cache_graph or hvp_mode == "double_backward":
            self._check_double_backward_support()
            return "double_backward"
        return hvp_mode

    def _check_double_backward_support(self) -> None:
        if self._once_differentiable:
            raise SecondDerivativeError(
                f"double backward is unavailable: custom autograd Functions {self._once_differentiable} are marked "
                "@once_differentiable; pass finite_differences=True to use central differences of gradients"
            )

    # -- products ---------------------------------------------------------------------------

    def _unflatten(self, vector: torch.Tensor) -> tuple[torch.Tensor, ...]:
        pieces = torch.split(vector, self._numels)
        return tuple(piece.view(shape) for piece, shape in zip(pieces, self._shapes))

    def _flatten(self, tensors: Sequence[torch.Tensor | None], out: torch.Tensor | None = None) -> torch.Tensor:
        # Double backward returns some gradients with permuted strides. Copying each piece into a
        # preallocated vector copies them once, where reshape(-1) and cat would copy them twice.
        flat = out if out is not None else torch.empty(self._size, device=self._device, dtype=self._dtype)
        for tensor, piece in zip(tensors, torch.split(flat, self._numels)):
            if tensor is None:
                piece.zero_()
            else:
                piece.view(tensor.shape).copy_(tensor)
        return flat

    def _accumulate(
        self, total: torch.Tensor | None, pieces: Sequence[torch.Tensor | None], batch: Batch, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Add (n_b / N) times the flattened pieces to total in place. The first batch fills out, or a new vector."""
        weight = batch.num_examples / self.num_examples
        if total is None:
            flat = self._flatten(pieces, out=out)
            return flat.mul_(weight) if weight != 1.0 else flat
        return total.add_(self._flatten(pieces), alpha=weight)

    @contextlib.contextmanager
    def _fixed_randomness(self, index: int) -> Iterator[None]:
        """Re-seed the random number generator per batch so dropout masks repeat in every product."""
        if not self._reseed:
            yield
            return
        devices = [self._device] if self._device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + index)
            yield

    def _batch_loss(self, tensors: Sequence[torch.Tensor], batch: Batch, index: int) -> torch.Tensor:
        with self._fixed_randomness(index):
            outputs = functional_call(self._model, dict(zip(self._names, tensors)), (batch.inputs,))
        loss = self.loss_fn(outputs, batch.targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise HessianError(f"loss_fn must return a scalar (the mean over the batch), got {shape}")
        return loss

    def _check_finite_loss(self, loss: torch.Tensor, index: int) -> None:
        value = float(loss.detach())
        if not math.isfinite(value):
            raise HessianError(
                f"the loss on batch {index} is {value}; check the inputs and targets for NaN or infinity "
                "and the model for overflow"
            )

    def _automatic_product(self, tangents: tuple[torch.Tensor, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        """Return H @ tangents in the resolved mode. Only double backward writes into out. matvec copies the other products there."""
        if self._resolved_mode == "auto":
            return self._choose_mode(tangents)
        if self._resolved_mode == "forward_over_reverse":
            try:
                return self._forward_over_reverse_product(tangents)
            except _DERIVATIVE_ERRORS as error:
                raise SecondDerivativeError(
                    f"forward-over-reverse differentiation failed{describe_derivative_error(error)} "
                    f"({str(error).splitlines()[0]}); use hvp_mode='auto' or 'double_backward', or finite_differences=True"
                ) from error
        return self._double_backward_product(tangents, out=out)

    def _choose_mode(self, tangents: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Time the first product with both differentiation modes and keep the faster one.

        On CPU, forward-over-reverse has a fixed cost of tens of milliseconds per call, so double
        backward is faster on small models and forward-over-reverse on large ones. The two products
        must agree to 1e-3 relative, else a warning is logged.
        NOTE: the choice rests on one timed call each, so on a busy machine it can differ between runs;
        pass hvp_mode explicitly for bit-reproducible products.
        """
        products: dict[str, torch.Tensor] = {}
        seconds: dict[str, float] = {}
        failures: dict[str, BaseException] = {}
        candidates = [("forward_over_reverse", self._forward_over_reverse_product)]
        if not self._once_differentiable:
            candidates.append(("double_backward", self._double_backward_product))

        for mode, compute in candidates:
            begin = time.perf_counter()
            try:
                products[mode] = compute(tangents)
            except (*_DERIVATIVE_ERRORS, SecondDerivativeError) as error:
                failures[mode] = error
                logger.info("Hessian-vector product by %s failed: %s", mode, str(error).splitlines()[0])
                continue
            seconds[mode] = time.perf_counter() - begin

        if not products:
            if self._once_differentiable:
                self._check_double_backward_support()
            error = failures.get("double_backward") or failures["forward_over_reverse"]
            if isinstance(error, SecondDerivativeError):
                raise error
            raise SecondDerivativeError(
                f"no second derivative available{describe_derivative_error(error)} ({str(error).splitlines()[0]}); "
                "pass finite_differences=True to use central differences of gradients"
            ) from error

        if len(products) == 2:
            forward, backward = products["forward_over_reverse"], products["double_backward"]
            difference = float(torch.linalg.vector_norm(forward - backward))
            scale = float(torch.linalg.vector_norm(backward))
            if difference > 1e-3 * max(scale, torch.finfo(self._dtype).tiny):
                logger.warning(
                    "Forward-over-reverse and double backward products differ by %.3g relative; "
                    "check the model for operations with inexact derivatives",
                    difference / max(scale, torch.finfo(self._dtype).tiny),
                )
        self._resolved_mode = min(seconds, key=seconds.__getitem__)
        logger.info(
            "Using %s Hessian-vector products (%s)",
            self._resolved_mode,
            ", ".join(f"{mode} {value * 1e3:.1f} ms" for mode, value in seconds.items()),
        )
        return products[self._resolved_mode]

    def _forward_over_reverse_product(self, tangents: tuple[torch.Tensor, ...]) -> torch.Tensor:
        total: torch.Tensor | None = None
        argnums = tuple(range(len(self._primals)))
        for index, batch in enumerate(self._batches):

            def loss_and_value(*tensors: torch.Tensor, batch: Batch = batch, index: int = index):
                loss = self._batch_loss(tensors, batch, index)
                return loss, loss.detach()

            gradient_fn = func_grad(loss_and_value, argnums=argnums, has_aux=True)
            _, product, loss_value = jvp(gradient_fn, self._primals, tangents, has_aux=True)
            self._check_finite_loss(loss_value, index)
            total = self._accumulate(total, product, batch)
        assert total is not None
        return total

    def _double_backward_product(self, tangents: tuple[torch.Tensor, ...], out: torch.Tensor | None = None) -> torch.Tensor:
        total: torch.Tensor | None = None
        if self.cache_graph and self._cached_gradients is None:
            self._cache_leaves = tuple(primal.detach().requires_grad_(True) for primal in self._primals)
            self._cached_gradients = [
                self._graph_gradient(self._cache_leaves, batch, index) for index, batch in enumerate(self._batches)
            ]

        for index, batch in enumerate(self._batches):
            if self._cached_gradients is not None:
                leaves = self._cache_leaves
                gradients = self._cached_gradients[index]
            else:
                # detach() shares storage, so no 11M-entry copy per product; nothing writes to the leaves.
                leaves = tuple(primal.detach().requires_grad_(True) for primal in self._primals)
                gradients = self._graph_gradient(leaves, batch, index)
            retain_graph = self._cached_gradients is not None
            product = self._differentiate_gradient(gradients, leaves, tangents, retain_graph=retain_graph)
            total = self._accumulate(total, product, batch, out=out)
        assert total is not None
        return total

    def _graph_gradient(
        self, leaves: tuple[torch.Tensor, ...], batch: Batch, index: int
    ) -> tuple[torch.Tensor | None, ...]:
        loss = self._batch_loss(leaves, batch, index)
        self._check_finite_loss(loss, index)
        if loss.grad_fn is None:
            return (None,) * len(leaves)
        return torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)

    def _differentiate_gradient(
        self,
        gradients: tuple[torch.Tensor | None, ...],
        leaves: tuple[torch.Tensor, ...],
        tangents: tuple[torch.Tensor, ...],
        *,
        retain_graph: bool,
    ) -> tuple[torch.Tensor | None, ...]:
        # A gradient that does not require grad is constant in theta: its Hessian rows are zero.
        pairs = [(g, t) for g, t in zip(gradients, tangents) if g is not None and g.requires_grad]
        if not pairs:
            return (None,) * len(leaves)
        try:
            return torch.autograd.grad(
                [g for g, _ in pairs],
                leaves,
                grad_outputs=[t for _, t in pairs],
                retain_graph=retain_graph,
                allow_unused=True,
            )
        except RuntimeError as error:
            raise SecondDerivativeError(
                f"double backward failed{describe_derivative_error(error)} ({str(error).splitlines()[0]}); "
                "pass finite_differences=True to use central differences of gradients"
            ) from error

    def _gradient_at(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        leaves = tuple(tensor.detach().requires_grad_(True) for tensor in tensors)
        total = torch.zeros(self._size, device=self._device, dtype=self._dtype)
        for index, batch in enumerate(self._batches):
            loss = self._batch_loss(leaves, batch, index)
            self._check_finite_loss(loss, index)
            if loss.grad_fn is None:
                continue
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            total.add_(self._flatten(grads), alpha=batch.num_examples / self.num_examples)
        return total

    def _finite_difference_product(self, vector: torch.Tensor) -> torch.Tensor:
        """Central difference of the data gradient along vector, with a step of norm fd_step.

        The default step is eps ** (1/3) of the dtype (4.9e-3 in float32, 6.1e-6 in float64), which
        balances truncation error O(h^2) against rounding error O(eps / h).
        """
        norm = float(torch.linalg.vector_norm(vector))
        if norm == 0.0:
            return torch.zeros_like(vector)
        step = self.fd_step if self.fd_step is not None else torch.finfo(self._dtype).eps ** (1.0 / 3.0)
        scale = step / norm
        direction = self._unflatten(vector)
        plus = tuple(primal + scale * d for primal, d in zip(self._primals, direction))
        minus = tuple(primal - scale * d for primal, d in zip(self._primals, direction))
        return (self._gradient_at(plus) - self._gradient_at(minus)) / (2.0 * scale)
