"""Probe layers: choose them in execution order, capture them with hooks, stream their embeddings to disk."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

INPUT_LAYER = "input"
OUTPUT_LAYER = "output"
PENULTIMATE_LAYER = "penultimate"
SPECIAL_LAYERS = (INPUT_LAYER, OUTPUT_LAYER, PENULTIMATE_LAYER)

# 4,096 floats per example keeps one layer of 50,000 examples at about 0.8 GB in float32.
DEFAULT_MAX_DIM = 4096
REDUCTIONS = ("pool", "flatten")
MANIFEST_FILE = "embeddings.json"
LOGITS_FILE = "logits.npy"
LABELS_FILE = "labels.npy"
# Side length of the dummy images used to find the execution order when no input shape is given.
DUMMY_IMAGE_SIZE = 32


class ProbeLayerError(ValueError):
    """A probe layer that does not exist, is ambiguous, or cannot be captured."""


# ---------------------------------------------------------------- model state


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every module in eval mode and run under torch.inference_mode, then restore each module's own mode.

    Eval mode makes BatchNorm use its running statistics and leave them untouched, so the
    parameters and buffers are bit-identical afterwards. The modes are restored module by
    module because a model may mix train and eval submodules.
    """
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        for module, training in modes.items():
            module.training = training


def model_device(model: nn.Module) -> torch.device:
    """Return the device of the model's first parameter or buffer (CPU for a model without either)."""
    for tensor in chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _model_dtype(model: nn.Module) -> torch.dtype:
    for parameter in model.parameters():
        if parameter.is_floating_point():
            return parameter.dtype
    return torch.float32


# ---------------------------------------------------------------- hooks


@contextlib.contextmanager
def registered_hooks() -> Iterator[list[torch.utils.hooks.RemovableHandle]]:
    """Yield a list to append hook handles to, and remove every handle on exit, also after an exception."""
    handles: list[torch.utils.hooks.RemovableHandle] = []
    try:
        yield handles
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class ProbePoint:
    """The hook point of a probe layer: the input or the output of a module ("" is the whole model)."""

    layer: str
    module: str
    capture: str  # "input" or "output"


LayerSink = Callable[[str, torch.Tensor], None]


@contextlib.contextmanager
def capture_layers(model: nn.Module, points: Sequence[ProbePoint], sink: LayerSink) -> Iterator[None]:
    """Call sink(layer, tensor) with each probe point's tensor during every forward pass inside the context.

    The tensor is the live activation: a later in-place operation of the model (ReLU with
    inplace=True, a residual "+=") may overwrite it, so the sink must copy what it keeps before
    returning. The hooks are removed on exit, also when the body raises.
    """
    with registered_hooks() as handles:
        for point in points:
            module = model.get_submodule(point.module)
            if point.capture == "input":
                handles.append(module.register_forward_pre_hook(_input_hook(point.layer, sink)))
            else:
                handles.append(module.register_forward_hook(_output_hook(point.layer, sink)))
        yield


def _input_hook(layer: str, sink: LayerSink):
    def hook(module: nn.Module, args: tuple) -> None:
        sink(layer, args[0])

    return hook


def _output_hook(layer: str, sink: LayerSink):
    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        sink(layer, output)

    return hook


# ---------------------------------------------------------------- execution order


@dataclass
class ModuleCall:
    """When a module ran during one traced forward pass: event numbers of its first start and first end."""

    name: str
    start: int
    end: int = -1
    calls: int = 0
    tensor_output: bool = False
    is_model_output: bool = False


@dataclass
class ExecutionTrace:
    """The modules that ran in one forward pass, keyed by name, with the order of their events."""

    calls: dict[str, ModuleCall] = field(default_factory=dict)

    def ran_once(self, name: str) -> bool:
        return name in self.calls and self.calls[name].calls == 1

    def candidates(self) -> list[str]:
        """Names of the modules that ran once with a tensor output, in the order their outputs appeared."""
        usable = [call for call in self.calls.values() if call.calls == 1 and call.tensor_output]
        return [call.name for call in sorted(usable, key=lambda call: call.end)]


def infer_input_shape(model: nn.Module) -> tuple[int, ...]:
    """Guess the shape of one example from the first convolution or linear layer of the model.

    A Conv2d gives (in_channels, 32, 32) and a Linear gives (in_features,). Models whose
    classifier needs one exact image size need input_shape instead.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return (module.in_channels, DUMMY_IMAGE_SIZE, DUMMY_IMAGE_SIZE)
        if isinstance(module, nn.Conv1d):
            return (module.in_channels, DUMMY_IMAGE_SIZE)
        if isinstance(module, nn.Linear):
            return (module.in_features,)
    raise ProbeLayerError(f"cannot guess the input shape of {type(model).__name__}; pass input_shape=(channels, height, width)")


def trace_execution(model: nn.Module, *, input_shape: Sequence[int] | None = None) -> ExecutionTrace:
    """Run one forward pass of two zero examples with hooks on every module and record the execution order.

    Events are numbered in the order they happen: a module's start is its first forward
    pre-hook, its end its first forward hook. A container therefore ends after its children.
    """
    shape = tuple(input_shape) if input_shape is not None else infer_input_shape(model)
    dummy = torch.zeros((2, *shape), dtype=_model_dtype(model), device=model_device(model))
    trace = ExecutionTrace()
    counter = iter(range(1 << 62))

    def on_start(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            call = trace.calls.setdefault(name, ModuleCall(name, start=next(counter)))
            call.calls += 1

        return hook

    def on_end(name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            call = trace.calls[name]
            if call.end < 0:
                call.end = next(counter)
                call.tensor_output = isinstance(output, torch.Tensor)
                outputs[name] = output

        return hook

    outputs: dict[str, Any] = {}
    with evaluation_mode(model), registered_hooks() as handles:
        for name, module in model.named_modules():
            if name:
                handles.append(module.register_forward_pre_hook(on_start(name)))
                handles.append(module.register_forward_hook(on_end(name)))
        try:
            model_output = model(dummy)
        except Exception as error:
            raise ProbeLayerError(
                f"a forward pass on a dummy batch of shape {tuple(dummy.shape)} failed ({type(error).__name__}: {error}); "
                "pass the model's input_shape=(channels, height, width)"
            ) from error

    for name, output in outputs.items():
        trace.calls[name].is_model_output = output is model_output
    return trace


# ---------------------------------------------------------------- layer choice


def _is_resnet_style(model: nn.Module) -> bool:
    return isinstance(getattr(model, "layer1", None), nn.Sequential)


def _resnet_layers(model: nn.Module, trace: ExecutionTrace) -> list[str]:
    """Return the stem's last module, every residual block, and the pooled features, in execution order."""
    layers = []
    stage_start = trace.calls["layer1"].start if "layer1" in trace.calls else 1 << 62
    stem = [
        name for name, _ in model.named_children()
        if trace.ran_once(name) and trace.calls[name].tensor_output and trace.calls[name].end < stage_start
    ]
    if stem:
        layers.append(max(stem, key=lambda name: trace.calls[name].end))

    stage = 1
    while isinstance(getattr(model, f"layer{stage}", None), nn.Sequential):
        blocks = [f"layer{stage}.{child}" for child, _ in getattr(model, f"layer{stage}").named_children()]
        layers += [block for block in blocks if trace.ran_once(block)]
        stage += 1

    if trace.ran_once("avgpool"):
        layers.append("avgpool")
    return layers


def _generic_layers(model: nn.Module, trace: ExecutionTrace) -> list[str]:
    """Return the direct children of the model, with nn.Sequential children replaced by their own children."""
    names = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential):
            names += [f"{name}.{grandchild}" for grandchild, _ in child.named_children()]
        else:
            names.append(name)

    usable = []
    for name in names:
        call = trace.calls.get(name)
        if call is not None and call.calls == 1 and call.tensor_output and not call.is_model_output:
            usable.append(name)
    return usable


def _last_linear(model: nn.Module, trace: ExecutionTrace) -> str:
    linear = [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name in trace.calls]
    if not linear:
        raise ProbeLayerError(f"{type(model).__name__} runs no nn.Linear, so it has no 'penultimate' layer; name a module instead")
    return max(linear, key=lambda name: trace.calls[name].start)


def _candidate_message(trace: ExecutionTrace, limit: int = 40) -> str:
    names = [*SPECIAL_LAYERS, *trace.candidates()]
    listing = ", ".join(names[:limit])
    if len(names) > limit:
        listing += f", ... ({len(names) - limit} more; see model.named_modules())"
    return listing


def _match_patterns(patterns: Sequence[str], trace: ExecutionTrace) -> list[str]:
    """Expand fnmatch patterns over the names of modules that ran; special names pass through."""
    ran = [call.name for call in sorted(trace.calls.values(), key=lambda call: call.end)]
    chosen: list[str] = []
    for pattern in patterns:
        if pattern in SPECIAL_LAYERS:
            chosen.append(pattern)
            continue
        matches = [name for name in ran if fnmatch.fnmatchcase(name, pattern)]
        if not matches:
            raise ProbeLayerError(f"probe layer {pattern!r} matches no module that runs in the forward pass; candidates: {_candidate_message(trace)}")
        for name in matches:
            call = trace.calls[name]
            if call.calls != 1:
                raise ProbeLayerError(
                    f"module {name!r} runs {call.calls} times in one forward pass, so its output is ambiguous; "
                    "choose the module that contains it"
                )
            if not call.tensor_output:
                raise ProbeLayerError(f"module {name!r} returns no single tensor, so it cannot be a probe layer; choose one of its submodules")
        chosen += matches
    return chosen


def probe_points(
    model: nn.Module,
    patterns: Sequence[str] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> list[ProbePoint]:
    """Resolve probe layers into hook points, sorted in execution order; see resolve_probe_layers."""
    trace = trace_execution(model, input_shape=input_shape)
    if patterns is None:
        body = _resnet_layers(model, trace) if _is_resnet_style(model) else _generic_layers(model, trace)
        names = [INPUT_LAYER, *body, OUTPUT_LAYER]
    else:
        if isinstance(patterns, str):
            patterns = [patterns]
        if not patterns:
            raise ProbeLayerError("the list of probe layers is empty; name at least one layer or pass None for the default list")
        names = _match_patterns(patterns, trace)

    points = {}
    for name in names:
        if name == INPUT_LAYER:
            points[name] = (ProbePoint(name, "", "input"), -1)
        elif name == OUTPUT_LAYER:
            points[name] = (ProbePoint(name, "", "output"), 1 << 62)
        elif name == PENULTIMATE_LAYER:
            linear = _last_linear(model, trace)
            points[name] = (ProbePoint(name, linear, "input"), trace.calls[linear].start)
        else:
            points[name] = (ProbePoint(name, name, "output"), trace.calls[name].end)
    return [point for point, _ in sorted(points.values(), key=lambda item: item[1])]


def resolve_probe_layers(
    model: nn.Module,
    patterns: Sequence[str] | None = None,
    *,
    input_shape: Sequence[int] | None = None,
) -> list[str]:
    """Return the probe layer names in execution order, found with one forward pass of a dummy batch.

    Default choice (patterns=None), always starting with "input" and ending with "output"
    (the network's logits):
    - a torchvision-style ResNet (a `layer1` nn.Sequential): the last stem module to run before
      layer1 (maxpool for torchvision's resnets), every residual block (layer1.0, layer1.1, ...)
      and "avgpool";
    - any other model: its direct children in execution order, each nn.Sequential child replaced
      by its own children. Modules that run more than once, return no single tensor, or return
      the model output itself are skipped.
    patterns are fnmatch patterns over named_modules() names ("layer*.0", "features.3"), where
    "*" also matches dots. Special names: "input", "output" and "penultimate", the input of the
    last nn.Linear to run. input_shape is one example's shape; by default it is guessed from the
    first layer (see infer_input_shape).
    """
    return [point.layer for point in probe_points(model, patterns, input_shape=input_shape)]


# ---------------------------------------------------------------- reduction


@dataclass(frozen=True)
class Reduction:
    """The reduction of one layer's per-example activation to a vector, of kind "none", "pool" or "flatten"."""

    kind: str
    feature_shape: tuple[int, ...]
    pooled_size: tuple[int, int] | None
    dim: int

    def describe(self) -> str:
        if self.kind == "pool":
            return f"adaptive average pool to {self.pooled_size[0]}x{self.pooled_size[1]}, flattened"
        if self.kind == "flatten":
            return "flattened"
        return "none (already small)"

    def apply(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.kind == "pool":
            tensor = F.adaptive_avg_pool2d(tensor, self.pooled_size)
        return tensor.reshape(tensor.shape[0], -1)


def choose_reduction(feature_shape: Sequence[int], *, reduce: str, max_dim: int) -> Reduction:
    """Pick the reduction of one layer from the shape of one example's activation.

    reduce="pool": a (C, H, W) map with C*H*W > max_dim is average-pooled to s x s, s the largest
    size with C*s*s <= max_dim (capped at H and W). When C alone exceeds max_dim, s is 1 and the
    vector keeps C > max_dim entries. A smaller map, or a vector, is kept as is (flattened).
    reduce="flatten" flattens every activation whatever its size.
    """
    shape = tuple(int(size) for size in feature_shape)
    size = int(np.prod(shape)) if shape else 1
    if reduce == "flatten":
        return Reduction("flatten", shape, None, size)
    if size <= max_dim:
        return Reduction("none", shape, None, size)
    if len(shape) != 3:
        raise ProbeLayerError(
            f"an activation of shape {shape} has {size} values, more than max_dim={max_dim}, and only (C, H, W) maps can be pooled; "
            "pass reduce='flatten' or a larger max_dim"
        )

    channels, height, width = shape
    side = max(1, int(np.sqrt(max_dim / channels)))
    while channels * (side + 1) ** 2 <= max_dim:  # guard against float rounding in sqrt
        side += 1
    while side > 1 and channels * side * side > max_dim:
        side -= 1
    pooled = (min(side, height), min(side, width))
    return Reduction("pool", shape, pooled, channels * pooled[0] * pooled[1])


# ---------------------------------------------------------------- on-disk store


class _NpyWriter:
    """Append rows to a float32 .npy file whose shape is written up front.

    Plain file writes are used instead of a writable np.memmap, because the dirty pages of a
    memmap count towards the process's resident memory until it is unmapped.
    """

    def __init__(self, path: Path, rows: int, dim: int, *, name: str) -> None:
        self.path = path
        self.name = name
        self.rows = rows
        self.dim = dim
        self.written = 0
        self._stream = open(path, "wb")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (rows, dim)}
        np.lib.format.write_array_header_1_0(self._stream, header)

    def append(self, block: np.ndarray) -> None:
        if self.written + len(block) > self.rows:
            raise ProbeLayerError(f"more than the expected {self.rows} examples arrived; pass the right num_examples")
        if block.ndim != 2 or block.shape[1] != self.dim:
            raise ProbeLayerError(
                f"a batch gave {tuple(block.shape[1:])} values per example for {self.name}, earlier batches gave {self.dim}; "
                "give every example the same shape"
            )
        np.ascontiguousarray(block, dtype=np.float32).tofile(self._stream)
        self.written += len(block)

    def close(self) -> None:
        self._stream.close()


class RowReader:
    """Read-only row access to a float32 .npy file through plain file reads, so reads do not stay resident.

    Supports len(), .shape and slicing with a step of 1 (reader[start:stop]). Every slice is a
    fresh C-contiguous float32 array.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as stream:
            version = np.lib.format.read_magic(stream)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran_order, dtype = read_header(stream)
            self.offset = stream.tell()
        if dtype != np.float32 or fortran_order or len(shape) != 2:
            raise ProbeLayerError(f"{self.path} is not a C-ordered 2-D float32 .npy file; extract the embeddings again")
        self.shape = tuple(shape)
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: slice) -> np.ndarray:
        if not isinstance(index, slice) or index.step not in (None, 1):
            raise TypeError("RowReader supports only contiguous row slices such as reader[start:stop]")
        start, stop, _ = index.indices(self.shape[0])
        count = max(0, stop - start) * self.shape[1]
        offset = self.offset + start * self.shape[1] * 4
        return np.fromfile(self.path, dtype=np.float32, count=count, offset=offset).reshape(-1, self.shape[1])

    def read(self) -> np.ndarray:
        return self[:]


@dataclass(frozen=True)
class LayerEmbedding:
    """One probe layer in a store: the per-example activation shape, its reduction, the vector size and file."""

    name: str
    feature_shape: tuple[int, ...]
    reduction: str
    dim: int
    file: str


class EmbeddingStore:
    """Per-layer embeddings (N, dim) as float32 .npy files in one folder, plus the network's logits.

    A store over a temporary folder deletes it on close() or at the end of a with block.
    A store over a caller's out_dir leaves the files in place.
    """

    def __init__(
        self,
        directory: Path,
        layers: dict[str, LayerEmbedding],
        *,
        num_examples: int,
        settings: dict[str, Any],
        has_labels: bool,
        temporary: bool,
    ) -> None:
        self.directory = Path(directory)
        self.layers = dict(layers)
        self.num_examples = num_examples
        self.settings = dict(settings)
        self.has_labels = has_labels
        self.temporary = temporary
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.directory), True) if temporary else None

    @property
    def layer_names(self) -> list[str]:
        return list(self.layers)

    def _path(self, file: str) -> Path:
        if self._cleanup is not None and not self._cleanup.alive:
            raise ProbeLayerError(f"the embedding store in {self.directory} is closed; extract the embeddings again")
        return self.directory / file

    def _layer(self, layer: str) -> LayerEmbedding:
        if layer not in self.layers:
            raise ProbeLayerError(f"layer {layer!r} is not in this embedding store; stored layers: {', '.join(self.layers)}")
        return self.layers[layer]

    def reader(self, layer: str) -> RowReader:
        """Return chunked row access to one layer's embeddings (see RowReader)."""
        return RowReader(self._path(self._layer(layer).file))

    def embeddings(self, layer: str, *, mmap: bool = True) -> np.ndarray:
        """Return one layer's embeddings (N, dim) as a read-only memmap, or loaded into memory with mmap=False."""
        return np.load(self._path(self._layer(layer).file), mmap_mode="r" if mmap else None)

    @property
    def logits(self) -> np.ndarray:
        """The network's outputs (N, num_classes), float32, loaded into memory."""
        return np.load(self._path(LOGITS_FILE))

    @property
    def predictions(self) -> np.ndarray:
        """The network's predictions argmax f(x), int64."""
        return np.argmax(self.logits, axis=1).astype(np.int64)

    @property
    def labels(self) -> np.ndarray | None:
        """Labels yielded by a loader next to the images, None for a bare tensor of images."""
        return np.load(self._path(LABELS_FILE)) if self.has_labels else None

    def describe(self) -> list[dict[str, Any]]:
        """Return one JSON-ready record per layer: name, activation shape, reduction and dim."""
        return [{**asdict(layer), "feature_shape": list(layer.feature_shape)} for layer in self.layers.values()]

    def close(self) -> None:
        """Delete the folder of a temporary store; a store over a caller's out_dir is left alone."""
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> "EmbeddingStore":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    @classmethod
    def open(cls, directory: str | Path) -> "EmbeddingStore":
        """Open a store that extract_embeddings wrote to an out_dir."""
        directory = Path(directory)
        manifest_path = directory / MANIFEST_FILE
        if not manifest_path.is_file():
            raise ProbeLayerError(f"{manifest_path} not found; {directory} is not an embedding store written by extract_embeddings")
        manifest = json.loads(manifest_path.read_text())
        layers = {
            record["name"]: LayerEmbedding(record["name"], tuple(record["feature_shape"]), record["reduction"], record["dim"], record["file"])
            for record in manifest["layers"]
        }
        return cls(
            directory, layers,
            num_examples=manifest["num_examples"], settings=manifest["settings"],
            has_labels=manifest["has_labels"], temporary=False,
        )


# ---------------------------------------------------------------- extraction


def _batches(source: Any, *, batch_size: int, num_examples: int | None) -> tuple[int, Iterator[tuple[torch.Tensor, Any]]]:
    """Return the number of examples and an iterator of (images, labels or None) batches."""
    if isinstance(source, np.ndarray):
        source = torch.from_numpy(source)
    if isinstance(source, torch.Tensor):
        images = source

        def tensor_batches() -> Iterator[tuple[torch.Tensor, None]]:
            for start in range(0, len(images), batch_size):
                yield images[start : start + batch_size], None

        return len(images), tensor_batches()

    if num_examples is None:
        dataset = getattr(source, "dataset", None)
        if dataset is None or not hasattr(dataset, "__len__"):
            raise ProbeLayerError(f"cannot tell how many examples {type(source).__name__} yields; pass num_examples")
        num_examples = len(dataset)

    def loader_batches() -> Iterator[tuple[torch.Tensor, Any]]:
        for item in source:
            if isinstance(item, (tuple, list)):
                yield item[0], item[1] if len(item) > 1 else None
            else:
                yield item, None

    return num_examples, loader_batches()


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        found = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ProbeLayerError(
            f"model inputs must be a floating-point tensor, got {found}; "
            "normalise uint8 images first with seal_train.data.prepare_images"
        )
    if images.dim() < 2:
        raise ProbeLayerError(f"model inputs need a batch dimension, got shape {tuple(images.shape)}")


def _prepare_out_dir(out_dir: str | Path | None) -> tuple[Path, Path | None]:
    """Return (folder to write into, final folder or None for a temporary store)."""
    if out_dir is None:
        return Path(tempfile.mkdtemp(prefix="seal-embeddings-")), None
    final = Path(out_dir)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise ProbeLayerError(f"embedding folder {final} already exists and is not empty; choose a new out_dir or delete it")
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent)), final


class _LayerRecorder:
    """The sink of capture_layers: reduce each layer's batch and append it to that layer's .npy file."""

    def __init__(self, directory: Path, points: Sequence[ProbePoint], *, num_examples: int, reduce: str, max_dim: int) -> None:
        self.directory = directory
        self.num_examples = num_examples
        self.reduce = reduce
        self.max_dim = max_dim
        self.files = {point.layer: f"layer{position:02d}.npy" for position, point in enumerate(points)}
        self.reductions: dict[str, Reduction] = {}
        self.writers: dict[str, _NpyWriter] = {}

    def __call__(self, layer: str, tensor: Any) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise ProbeLayerError(f"probe layer {layer!r} produced {type(tensor).__name__}, not a tensor; choose another layer")
        if layer not in self.reductions:
            reduction = choose_reduction(tensor.shape[1:], reduce=self.reduce, max_dim=self.max_dim)
            self.reductions[layer] = reduction
            self.writers[layer] = _NpyWriter(self.directory / self.files[layer], self.num_examples, reduction.dim, name=f"probe layer {layer!r}")
        vectors = self.reductions[layer].apply(tensor.detach())
        self.writers[layer].append(vectors.to(device="cpu", dtype=torch.float32).numpy())

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


def _write_json_atomic(data: Any, path: Path) -> None:
    temporary = path.with_name(f".{path.name}.partial")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def extract_embeddings(
    model: nn.Module,
    images_or_loader: torch.Tensor | np.ndarray | Iterable,
    layers: Sequence[str] | None = None,
    *,
    batch_size: int = 256,
    reduce: str = "pool",
    max_dim: int = DEFAULT_MAX_DIM,
    device: str | torch.device | None = None,
    out_dir: str | Path | None = None,
    num_examples: int | None = None,
    progress: bool = False,
) -> EmbeddingStore:
    """Run the model once over the data and stream every probe layer's embeddings to disk.

    images_or_loader: float model inputs (N, ...) already normalised, or an iterable of batches
    (a tensor, or a tuple (images, labels, ...) as seal_train.data.BatchLoader and torch's
    DataLoader yield). For an iterable, the number of examples is len(source.dataset) unless
    num_examples is given. layers: names or patterns, resolved and sorted by
    resolve_probe_layers (None for the default list). Each layer's activation is reduced as
    choose_reduction describes and written as float32 rows. The logits are kept too.
    device: where the forward pass runs (default: the model's device). A model moved there is
    moved back afterwards. The model runs in eval mode under torch.inference_mode, and each
    module's train/eval mode is restored afterwards.
    out_dir: a new or empty folder that keeps the files, written under a temporary name and
    renamed when complete. Default: a temporary folder that the store deletes on close().
    """
    if batch_size < 1:
        raise ProbeLayerError(f"batch_size must be >= 1, got {batch_size}")
    if reduce not in REDUCTIONS:
        raise ProbeLayerError(f"unknown reduction {reduce!r}; choose one of: {', '.join(REDUCTIONS)}")
    if max_dim < 1:
        raise ProbeLayerError(f"max_dim must be >= 1, got {max_dim}")

    count, batches = _batches(images_or_loader, batch_size=batch_size, num_examples=num_examples)
    first = next(batches, None)
    if first is None or count < 1:
        raise ProbeLayerError("no examples to embed; pass at least one image")
    _check_images(first[0])
    batches = chain([first], batches)

    original_device = model_device(model)
    target = torch.device(device) if device is not None else original_device
    directory, final = _prepare_out_dir(out_dir)
    try:
        if target != original_device:
            model.to(target)
        store = _extract(model, batches, layers, directory, final, count=count, input_shape=tuple(first[0].shape[1:]),
                         batch_size=batch_size, reduce=reduce, max_dim=max_dim, device=target, progress=progress)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    finally:
        if target != original_device:
            model.to(original_device)
    return store


def _extract(
    model: nn.Module,
    batches: Iterator[tuple[torch.Tensor, Any]],
    layers: Sequence[str] | None,
    directory: Path,
    final: Path | None,
    *,
    count: int,
    input_shape: tuple[int, ...],
    batch_size: int,
    reduce: str,
    max_dim: int,
    device: torch.device,
    progress: bool,
) -> EmbeddingStore:
    points = probe_points(model, layers, input_shape=input_shape)
    recorder = _LayerRecorder(directory, points, num_examples=count, reduce=reduce, max_dim=max_dim)
    logits_writer: _NpyWriter | None = None
    labels: list[np.ndarray] = []
    seen = 0
    started = time.perf_counter()
    log.info("extracting %d probe layers for %d examples on %s", len(points), count, device)

    try:
        with evaluation_mode(model), capture_layers(model, points, recorder):
            for images, batch_labels in tqdm(batches, total=-(-count // batch_size), disable=not progress, desc="embeddings"):
                _check_images(images)
                output = model(images.to(device, non_blocking=True))
                if not isinstance(output, torch.Tensor) or output.dim() != 2:
                    raise ProbeLayerError(f"the model must return logits (batch, classes), got {getattr(output, 'shape', type(output).__name__)}")
                if logits_writer is None:
                    logits_writer = _NpyWriter(directory / LOGITS_FILE, count, output.shape[1], name="the logits")
                logits_writer.append(output.to(device="cpu", dtype=torch.float32).numpy())
                if batch_labels is not None:
                    labels.append(torch.as_tensor(batch_labels).cpu().numpy().astype(np.int64))
                seen += len(images)
    finally:
        recorder.close()
        if logits_writer is not None:
            logits_writer.close()

    if seen != count:
        raise ProbeLayerError(
            f"the data yielded {seen} examples, {count} were expected; "
            "pass num_examples, or a loader that keeps every example (drop_last=False)"
        )

    silent = [point.layer for point in points if point.layer not in recorder.reductions]
    if silent:
        raise ProbeLayerError(f"probe layers {', '.join(silent)} did not run in the forward pass; choose layers that run on every input")

    has_labels = bool(labels)
    if has_labels:
        np.save(directory / LABELS_FILE, np.concatenate(labels))

    entries = {
        point.layer: LayerEmbedding(point.layer, recorder.reductions[point.layer].feature_shape,
                                    recorder.reductions[point.layer].describe(), recorder.reductions[point.layer].dim,
                                    recorder.files[point.layer])
        for point in points
    }
    settings = {
        "reduce": reduce,
        "max_dim": max_dim,
        "batch_size": batch_size,
        "device": str(device),
        "num_examples": count,
        "forward_seconds": time.perf_counter() - started,
    }
    manifest = {
        "num_examples": count,
        "has_labels": has_labels,
        "settings": settings,
        "layers": [{**asdict(entry), "feature_shape": list(entry.feature_shape)} for entry in entries.values()],
    }
    _write_json_atomic(manifest, directory / MANIFEST_FILE)

    if final is not None:
        os.replace(directory, final)
        directory = final
    log.info("extracted %s in %.1f s", ", ".join(f"{name} ({entry.dim})" for name, entry in entries.items()), settings["forward_seconds"])
    return EmbeddingStore(directory, entries, num_examples=count, settings=settings, has_labels=has_labels, temporary=final is None)
