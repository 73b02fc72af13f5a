"""Each analysis applied to one loaded checkpoint with recorded options; shared by the CLI and the report."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch

from seal_train.data import DatasetError

from .depth import DepthResult, run_prediction_depth
from .hessian import HessianReport, analyze_hessian
from .inputs import ProbeData, check_class_count, load_probe_data
from .integrity import model_unchanged
from .layers import DEFAULT_MAX_DIM
from .loading import LoadedModel
from .transfer import DEFAULT_C_GRID, DEFAULT_MAX_ITER, DEFAULT_VAL_FRACTION, FewShotSettings, TransferResult, run_transfer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataOptions:
    """Dataset the probes read, and the conversions allowed to fit it to the model.

    dataset=None takes the dataset a suite checkpoint was trained on (from its metadata).
    """

    dataset: str | None = None
    root: str | None = None
    convert_channels: bool = False
    resize: bool = False


@dataclass(frozen=True)
class DepthOptions:
    """Settings of a prediction-depth measurement.

    The support set is a class-balanced subset of support_split; queries a class-balanced
    subset of query_split. When both come from the same split, a query that is also a
    support example is excluded from its own neighbours unless exclude_self is False.
    """

    support_split: str = "train"
    support_size: int = 2000
    query_split: str = "test"
    query_size: int = 1000
    k: int = 30
    distance: str = "euclidean"
    layers: tuple[str, ...] | None = None
    reduce: str = "pool"
    max_dim: int = DEFAULT_MAX_DIM
    exclude_self: bool = True
    batch_size: int = 256
    seed: int = 0


@dataclass(frozen=True)
class HessianOptions:
    """Settings of a Hessian measurement: the example set and every estimator parameter."""

    split: str = "train"
    examples: int = 512
    batch_size: int = 128
    quantities: tuple[str, ...] = ("eigenvalues", "trace", "density")
    top_k: int = 5
    which: str = "largest"
    method: str | None = None
    tol: float = 1e-3
    lanczos_start: str = "gradient"
    trace_method: str = "hutchinson"
    trace_samples: int = 100
    density_steps: int = 100
    density_runs: int = 1
    params: tuple[str, ...] = ("all",)
    threshold: str | None = None
    weight_decay: float = 0.0
    float64: bool = False
    engine: str = "default"
    allow_train_mode: bool = False
    finite_differences: bool = False
    seed: int = 0


@dataclass(frozen=True)
class TransferOptions:
    """Settings of a transfer measurement: target, feature layer, probe grid and few-shot episodes."""

    target: str = "digits"
    target_root: str | None = None
    layer: str = "penultimate"
    grid: tuple[float, ...] = tuple(DEFAULT_C_GRID)
    val_fraction: float = DEFAULT_VAL_FRACTION
    max_iter: int = DEFAULT_MAX_ITER
    few_shot: bool = True
    n_way: int = 5
    k_shot: int = 5
    n_query: int = 15
    episodes: int = 100
    batch_size: int = 256
    seed: int = 0


@dataclass
class AnalysisRecord:
    """One analysis of one checkpoint: what was loaded, which data, the options and the result."""

    analysis: str
    checkpoint: dict[str, Any]
    data: dict[str, Any]
    options: dict[str, Any]
    result: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def require_eager_module(loaded: LoadedModel, analysis: str) -> None:
    """Raise for a TorchScript model, which supports neither forward hooks nor requires_grad_ changes."""
    if isinstance(loaded.model, torch.jit.ScriptModule):
        raise ValueError(
            f"{loaded.path} is a TorchScript archive, whose modules support neither the forward hooks nor the "
            f"requires_grad_ changes that {analysis} needs; load the model's state dict with --arch or --model-def instead"
        )


def resolve_dataset(loaded: LoadedModel, options: DataOptions) -> tuple[str, str | None]:
    """Return (dataset name, root): the requested one, or the one a suite checkpoint was trained on."""
    if options.dataset is not None:
        return options.dataset, options.root

    dataset = loaded.meta.get("dataset", {}) if loaded.meta else {}
    if not dataset.get("name"):
        raise DatasetError(f"{loaded.path} does not say which dataset it was trained on; pass --dataset (and --data-root)")
    root = options.root if options.root is not None else loaded.meta.get("config", {}).get("data_root")
    return dataset["name"], root


def _probe_data(loaded: LoadedModel, data: DataOptions, *, split: str, size: int | None, seed: int) -> ProbeData:
    name, root = resolve_dataset(loaded, data)
    probe_data = load_probe_data(
        name, spec=loaded.input_spec, root=root, split=split, subset_size=size, seed=seed,
        convert_channels=data.convert_channels, resize=data.resize,
    )
    check_class_count(loaded.num_classes, probe_data)
    return probe_data


def _self_positions(support: ProbeData, queries: ProbeData) -> np.ndarray:
    """Return each query's position in the support set, or -1 for a query outside it."""
    position = {int(index): i for i, index in enumerate(support.indices.tolist())}
    return np.array([position.get(int(index), -1) for index in queries.indices.tolist()], dtype=np.int64)


def measure_depth(loaded: LoadedModel, data: DataOptions, options: DepthOptions, *, device: str | None = None) -> tuple[DepthResult, AnalysisRecord]:
    """Measure prediction depth of one checkpoint; the model is verified unchanged afterwards."""
    require_eager_module(loaded, "prediction depth")
    support = _probe_data(loaded, data, split=options.support_split, size=options.support_size, seed=options.seed)
    if options.query_split == options.support_split and options.query_size == options.support_size:
        queries = support
    else:
        queries = _probe_data(loaded, data, split=options.query_split, size=options.query_size, seed=options.seed + 1)
    same_split = options.query_split == options.support_split

    with model_unchanged(loaded.model):
        result = run_prediction_depth(
            loaded.model,
            support.images,
            support.labels,
            queries.images,
            queries.labels,
            layers=list(options.layers) if options.layers else None,
            k=options.k,
            distance=options.distance,
            reduce=options.reduce,
            max_dim=options.max_dim,
            exclude_self=options.exclude_self,
            query_support_indices=_self_positions(support, queries) if same_split else None,
            query_ids=queries.indices.numpy(),
            batch_size=options.batch_size,
            device=device,
            seed=options.seed,
        )

    record = AnalysisRecord(
        analysis="depth",
        checkpoint=loaded.to_dict(),
        data={"support": support.record, "queries": queries.record},
        options=asdict(options),
        result=result.summary(),
    )
    return result, record


def measure_hessian(loaded: LoadedModel, data: DataOptions, options: HessianOptions, *, device: str | None = None) -> tuple[HessianReport, AnalysisRecord]:
    """Measure the Hessian spectrum of one checkpoint's mean loss over a fixed example set."""
    require_eager_module(loaded, "the Hessian analysis")
    examples = _probe_data(loaded, data, split=options.split, size=options.examples, seed=options.seed)
    target = torch.device(device) if device else next(loaded.model.parameters()).device
    batches = [
        (examples.images[start : start + options.batch_size].to(target), examples.labels[start : start + options.batch_size].to(target))
        for start in range(0, len(examples), options.batch_size)
    ]
    params: str | list[str] = options.params[0] if len(options.params) == 1 and options.params[0] in ("all", "early", "late") else list(options.params)
    threshold = options.threshold or loaded.meta.get("threshold") or "layer3"

    with model_unchanged(loaded.model):
        report = analyze_hessian(
            loaded.model,
            batches,
            quantities=options.quantities,
            top_k=options.top_k,
            which=options.which,
            method=options.method,
            tol=options.tol,
            lanczos_start=options.lanczos_start,
            trace_method=options.trace_method,
            trace_samples=options.trace_samples,
            density_steps=options.density_steps,
            density_runs=options.density_runs,
            params=params,
            threshold=threshold,
            weight_decay=options.weight_decay,
            dtype=torch.float64 if options.float64 else torch.float32,
            allow_train_mode=options.allow_train_mode,
            engine=options.engine,
            finite_differences=options.finite_differences,
            seed=options.seed,
        )

    record = AnalysisRecord(
        analysis="hessian",
        checkpoint=loaded.to_dict(),
        data={"examples": examples.record},
        options=asdict(options),
        result=report.to_dict(),
    )
    return report, record


@contextmanager
def _target_root_option() -> Iterator[None]:
    """Name transfer's --target-root in dataset errors, which speak of training's --data-root."""
    try:
        yield
    except DatasetError as error:
        raise type(error)(str(error).replace("--data-root", "--target-root")) from error


def measure_transfer(loaded: LoadedModel, data: DataOptions, options: TransferOptions, *, device: str | None = None) -> tuple[TransferResult, AnalysisRecord]:
    """Measure linear-probe and few-shot transfer of one checkpoint's frozen features to a target."""
    require_eager_module(loaded, "transfer")
    few_shot = FewShotSettings(n_way=options.n_way, k_shot=options.k_shot, n_query=options.n_query, episodes=options.episodes) if options.few_shot else None

    with model_unchanged(loaded.model), _target_root_option():
        result = run_transfer(
            loaded.model,
            options.target,
            spec=loaded.input_spec,
            layer=options.layer,
            grid=options.grid,
            val_fraction=options.val_fraction,
            seed=options.seed,
            few_shot=few_shot,
            max_iter=options.max_iter,
            convert_channels=data.convert_channels,
            resize=data.resize,
            batch_size=options.batch_size,
            device=device,
            root=options.target_root,
        )

    record = AnalysisRecord(
        analysis="transfer",
        checkpoint=loaded.to_dict(),
        data={"target": options.target, "root": options.target_root},
        options=asdict(options),
        result=result.to_dict(),
    )
    return result, record
