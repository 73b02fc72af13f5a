"""Prediction depth (Baldock et al., NeurIPS 2021): k-NN probes at every probe layer, per-example depth, writers and plot."""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import faiss
import numpy as np
import torch
from torch import nn

from seal_train.runs import write_atomic

from . import __version__
from .knn import DISTANCES, NEIGHBOUR_ORDER, TIE_RULE, KnnClassifier, default_thread_count, faiss_has_gpu, validate_k
from .layers import DEFAULT_MAX_DIM, EmbeddingStore, extract_embeddings, probe_points

log = logging.getLogger(__name__)

CI_METHOD = (
    "Student t interval on the mean depth of consistent examples: mean +/- t(0.975, n-1) * s / sqrt(n), "
    "clipped to [0, number of probe layers - 1]"
)
DEPTH_DEFINITION = (
    "depth of x = smallest probe layer index l such that the k-NN probe at every layer m >= l predicts "
    "the network's own prediction argmax f(x); layer 0 is the input. An example whose last probe disagrees "
    "has no depth and is counted as never consistent."
)


class DepthError(ValueError):
    """Inconsistent inputs to a prediction-depth computation."""


# ---------------------------------------------------------------- the definition


def compute_prediction_depth(probe_predictions: np.ndarray, network_predictions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (depths, consistent) for probe predictions (n_layers, n_queries) and network predictions (n_queries,).

    depth = min { l : p_m(x) = y_hat(x) for every m >= l }, with layers indexed 0..n_layers-1 in
    execution order. consistent is False when the last probe disagrees with y_hat, because then
    no such l exists. depths is NaN there, so an average over all examples cannot silently count
    those examples. The array is float64 only to carry that NaN, and every other entry is a whole number.
    """
    probes = np.asarray(probe_predictions)
    network = np.asarray(network_predictions)
    if probes.ndim != 2 or network.ndim != 1 or probes.shape[1] != network.shape[0]:
        raise DepthError(
            f"probe predictions must be (n_layers, n_queries) and network predictions (n_queries,), "
            f"got {probes.shape} and {network.shape}"
        )
    if probes.shape[0] == 0:
        raise DepthError("no probe layers; pass at least one layer of probe predictions")

    agrees = probes == network[None, :]
    # suffix[l] is True when every probe from layer l to the last agrees with the network.
    suffix = np.flip(np.logical_and.accumulate(np.flip(agrees, axis=0), axis=0), axis=0)
    consistent = suffix[-1].copy()

    depths = np.full(network.shape[0], np.nan)
    depths[consistent] = np.argmax(suffix[:, consistent], axis=0)
    return depths, consistent


def mean_with_interval(
    values: np.ndarray,
    *,
    confidence: float = 0.95,
    bounds: tuple[float, float] | None = None,
) -> tuple[float | None, tuple[float, float] | None]:
    """Return the mean and its Student t confidence interval (None for no values, no interval below 2 values).

    With bounds, the interval is clipped to the range the values can take (depths lie in
    [0, number of probe layers - 1]), which matters when few examples are consistent.
    """
    from scipy import stats  # imported here because scipy.stats takes over a second to import

    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return None, None
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None
    half_width = float(stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * values.std(ddof=1) / np.sqrt(len(values)))
    low, high = mean - half_width, mean + half_width
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return mean, (low, high)


# ---------------------------------------------------------------- results


@dataclass
class DepthSettings:
    """Everything that determines a depth result, recorded with it."""

    layers: list[dict[str, Any]]
    k: int
    distance: str
    tie_rule: str
    neighbour_order: str
    reduce: str
    max_dim: int
    support_size: int
    num_queries: int
    exclude_self: bool
    num_self_matches_excluded: int
    batch_size: int
    device: str
    knn_device: str
    knn_threads: int
    seed: int
    definition: str = DEPTH_DEFINITION
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class DepthTiming:
    """Wall-clock seconds of each step of run_prediction_depth."""

    forward_seconds: float
    search_seconds: float
    total_seconds: float


@dataclass
class LayerProbeResult:
    """One probe layer: its embedding size and the k-NN probe's accuracy on the queries."""

    layer: str
    dim: int
    reduction: str
    accuracy: float  # against the label
    agreement: float  # against the network's prediction


@dataclass
class DepthResult:
    """Prediction depth of every query, per-layer probe accuracy, their summaries and the settings.

    Per-example arrays have one entry per query. depths is NaN where consistent is False.
    probe_predictions has one row per probe layer, in execution order.
    """

    settings: DepthSettings
    timing: DepthTiming
    layers: list[LayerProbeResult]
    query_ids: np.ndarray
    labels: np.ndarray
    predictions: np.ndarray
    depths: np.ndarray
    consistent: np.ndarray
    probe_predictions: np.ndarray
    mean_depth: float | None
    mean_depth_ci95: tuple[float, float] | None
    ci_method: str
    num_consistent: int
    num_never_consistent: int
    fraction_never_consistent: float
    depth_histogram: list[int]

    @property
    def layer_names(self) -> list[str]:
        return [layer.layer for layer in self.layers]

    def example_depth(self, position: int) -> int | None:
        """Return the depth of the query at this position, or None when it is never consistent."""
        return int(self.depths[position]) if self.consistent[position] else None

    def summary(self) -> dict[str, Any]:
        """Return the JSON-ready summary: settings, timing, per-layer results and depth statistics."""
        return {
            "settings": asdict(self.settings),
            "timing": asdict(self.timing),
            "layers": [asdict(layer) for layer in self.layers],
            "mean_depth": self.mean_depth,
            "mean_depth_ci95": list(self.mean_depth_ci95) if self.mean_depth_ci95 is not None else None,
            "ci_method": self.ci_method,
            "num_consistent": self.num_consistent,
            "num_never_consistent": self.num_never_consistent,
            "fraction_never_consistent": self.fraction_never_consistent,
            "depth_histogram": {layer: count for layer, count in zip(self.layer_names, self.depth_histogram)},
        }


def summarise_depths(
    *,
    settings: DepthSettings,
    timing: DepthTiming,
    layer_info: Sequence[dict[str, Any]],
    query_ids: np.ndarray,
    labels: np.ndarray,
    predictions: np.ndarray,
    probe_predictions: np.ndarray,
) -> DepthResult:
    """Compute depths from probe predictions and collect the per-layer and per-example statistics."""
    depths, consistent = compute_prediction_depth(probe_predictions, predictions)

    layers = [
        LayerProbeResult(
            layer=info["name"],
            dim=int(info["dim"]),
            reduction=info["reduction"],
            accuracy=float(np.mean(row == labels)),
            agreement=float(np.mean(row == predictions)),
        )
        for info, row in zip(layer_info, probe_predictions)
    ]

    mean, interval = mean_with_interval(depths[consistent], bounds=(0, len(layers) - 1))
    histogram = np.bincount(depths[consistent].astype(np.int64), minlength=len(layers))
    never = int((~consistent).sum())
    return DepthResult(
        settings=settings,
        timing=timing,
        layers=layers,
        query_ids=query_ids,
        labels=labels,
        predictions=predictions,
        depths=depths,
        consistent=consistent,
        probe_predictions=probe_predictions,
        mean_depth=mean,
        mean_depth_ci95=interval,
        ci_method=CI_METHOD,
        num_consistent=int(consistent.sum()),
        num_never_consistent=never,
        fraction_never_consistent=never / len(predictions),
        depth_histogram=[int(count) for count in histogram],
    )


# ---------------------------------------------------------------- the pipeline


def _as_labels(labels: Any, name: str, expected: int) -> np.ndarray:
    array = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if array.ndim != 1 or len(array) != expected:
        raise DepthError(f"{name} needs one label per example: {expected}, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.integer):
        raise DepthError(f"{name} must be integers, got {array.dtype}")
    return array.astype(np.int64)


def _self_indices(
    query_support_indices: Any,
    *,
    exclude_self: bool,
    same_images: bool,
    num_queries: int,
    support_size: int,
) -> np.ndarray | None:
    """Return each query's index in the support set (-1 when absent), or None when nothing is excluded."""
    if not exclude_self:
        return None
    if query_support_indices is None:
        return np.arange(num_queries, dtype=np.int64) if same_images else None
    indices = np.asarray(query_support_indices, dtype=np.int64)
    if indices.shape != (num_queries,):
        raise DepthError(f"query_support_indices needs one entry per query: {num_queries}, got shape {indices.shape}")
    if ((indices < -1) | (indices >= support_size)).any():
        raise DepthError(
            f"query_support_indices must be in [-1, {support_size - 1}], because the support set has {support_size} examples; "
            "use -1 for a query outside the support set"
        )
    return indices


def _probe_layer(
    support_store: EmbeddingStore,
    query_store: EmbeddingStore,
    layer: str,
    support_labels: np.ndarray,
    *,
    k: int,
    distance: str,
    self_indices: np.ndarray | None,
    use_gpu: bool | None,
    threads: int | None,
) -> np.ndarray:
    """Fit the k-NN probe of one layer on the support embeddings and predict every query."""
    probe = KnnClassifier(support_store.reader(layer), support_labels, k=k, distance=distance, use_gpu=use_gpu, threads=threads)
    return probe.predict(query_store.reader(layer), exclude_indices=self_indices)


def run_prediction_depth(
    model: nn.Module,
    support_images: torch.Tensor,
    support_labels: Any,
    query_images: torch.Tensor,
    query_labels: Any,
    *,
    layers: Sequence[str] | None = None,
    k: int = 30,
    distance: str = "euclidean",
    reduce: str = "pool",
    max_dim: int = DEFAULT_MAX_DIM,
    exclude_self: bool = True,
    query_support_indices: Sequence[int] | np.ndarray | None = None,
    query_ids: Sequence[int] | np.ndarray | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    use_gpu_knn: bool | None = None,
    knn_threads: int | None = None,
    seed: int = 0,
) -> DepthResult:
    """Measure the prediction depth of every query with k-NN probes fitted on the support set.

    Images are float model inputs, already normalised (seal_train.data.prepare_images).
    layers: probe layer names or patterns (see resolve_probe_layers), None for the default list.
    Probes vote with TIE_RULE, and the reference is the network's own prediction.
    Self-matches: query_support_indices gives each query's index in the support set, or -1 for
    a query outside it. With exclude_self=True that entry is never the query's neighbour. When
    query_images is support_images and no indices are given, query i is support example i.
    query_ids: the dataset index of each query, for the per-example output (default 0..n-1).
    seed: seeds torch's generator during the forward passes and is recorded. Eval mode is
    deterministic for standard layers, and the exact k-NN search is deterministic too.
    """
    started = time.perf_counter()
    if distance not in DISTANCES:
        raise DepthError(f"unknown distance {distance!r}; choose one of: {', '.join(DISTANCES)}")
    support_size, num_queries = len(support_images), len(query_images)
    support_y = _as_labels(support_labels, "support_labels", support_size)
    query_y = _as_labels(query_labels, "query_labels", num_queries)
    same_images = query_images is support_images
    self_indices = _self_indices(
        query_support_indices, exclude_self=exclude_self, same_images=same_images,
        num_queries=num_queries, support_size=support_size,
    )
    validate_k(k, support_size, exclude_self=self_indices is not None and bool((self_indices >= 0).any()))
    ids = np.arange(num_queries, dtype=np.int64) if query_ids is None else np.asarray(query_ids, dtype=np.int64)
    if ids.shape != (num_queries,):
        raise DepthError(f"query_ids needs one entry per query: {num_queries}, got shape {ids.shape}")

    names = [point.layer for point in probe_points(model, layers, input_shape=tuple(support_images.shape[1:]))]
    extract = dict(batch_size=batch_size, reduce=reduce, max_dim=max_dim, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        support_store = extract_embeddings(model, support_images, names, **extract)
        try:
            query_store = support_store if same_images else extract_embeddings(model, query_images, names, **extract)
        except BaseException:
            support_store.close()
            raise
    forward_done = time.perf_counter()

    try:
        predictions = query_store.predictions
        probe_predictions = np.stack([
            _probe_layer(support_store, query_store, layer, support_y, k=k, distance=distance,
                         self_indices=self_indices, use_gpu=use_gpu_knn, threads=knn_threads)
            for layer in names
        ])
        layer_info = [{key: value for key, value in record.items() if key != "file"} for record in query_store.describe()]
    finally:
        support_store.close()
        query_store.close()
    finished = time.perf_counter()

    settings = DepthSettings(
        layers=layer_info,
        k=k,
        distance=distance,
        tie_rule=TIE_RULE,
        neighbour_order=NEIGHBOUR_ORDER,
        reduce=reduce,
        max_dim=max_dim,
        support_size=support_size,
        num_queries=num_queries,
        exclude_self=exclude_self,
        num_self_matches_excluded=int((self_indices >= 0).sum()) if self_indices is not None else 0,
        batch_size=batch_size,
        device=support_store.settings["device"],
        knn_device="gpu" if (faiss_has_gpu() if use_gpu_knn is None else use_gpu_knn) else "cpu",
        knn_threads=default_thread_count() if knn_threads is None else knn_threads,
        seed=seed,
        versions={"seal_suite": __version__, "torch": torch.__version__, "faiss": faiss.__version__, "numpy": np.__version__},
    )
    timing = DepthTiming(forward_done - started, finished - forward_done, finished - started)
    result = summarise_depths(
        settings=settings, timing=timing, layer_info=layer_info, query_ids=ids,
        labels=query_y, predictions=predictions, probe_predictions=probe_predictions,
    )
    log.info(
        "prediction depth of %d queries over %d layers: mean %s, %d never consistent, %.1f s (forward %.1f s, search %.1f s)",
        num_queries, len(names), "n/a" if result.mean_depth is None else f"{result.mean_depth:.3f}",
        result.num_never_consistent, timing.total_seconds, timing.forward_seconds, timing.search_seconds,
    )
    return result


# ---------------------------------------------------------------- writers


def _write_atomic(path: str | Path, data: bytes) -> Path:
    return write_atomic(path, lambda stream: stream.write(data))


def _csv_bytes(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def write_examples_csv(result: DepthResult, path: str | Path) -> Path:
    """Write one row per query: id, label, prediction, depth (empty when never consistent), consistent, probe predictions."""
    names = result.layer_names
    header = ["index", "label", "prediction", "depth", "depth_layer", "consistent", *[f"probe_{name}" for name in names]]
    rows = []
    for position in range(len(result.query_ids)):
        depth = result.example_depth(position)
        rows.append([
            int(result.query_ids[position]),
            int(result.labels[position]),
            int(result.predictions[position]),
            "" if depth is None else depth,
            "" if depth is None else names[depth],
            int(result.consistent[position]),
            *[int(value) for value in result.probe_predictions[:, position]],
        ])
    return _write_atomic(path, _csv_bytes(header, rows))


def write_layers_csv(result: DepthResult, path: str | Path) -> Path:
    """Write one row per probe layer: position, name, dim, reduction, k-NN accuracy and agreement, examples at that depth."""
    header = ["position", "layer", "dim", "reduction", "knn_accuracy", "knn_agreement", "examples_at_depth"]
    rows = [
        [position, layer.layer, layer.dim, layer.reduction, f"{layer.accuracy:.6f}", f"{layer.agreement:.6f}", count]
        for position, (layer, count) in enumerate(zip(result.layers, result.depth_histogram))
    ]
    return _write_atomic(path, _csv_bytes(header, rows))


def write_summary_json(result: DepthResult, path: str | Path) -> Path:
    """Write result.summary() as indented JSON."""
    return _write_atomic(path, (json.dumps(result.summary(), indent=2) + "\n").encode())


def write_depth_outputs(result: DepthResult, out_dir: str | Path) -> dict[str, Path]:
    """Write examples.csv, layers.csv and summary.json into out_dir and return their paths."""
    out_dir = Path(out_dir)
    return {
        "examples": write_examples_csv(result, out_dir / "examples.csv"),
        "layers": write_layers_csv(result, out_dir / "layers.csv"),
        "summary": write_summary_json(result, out_dir / "summary.json"),
    }


# ---------------------------------------------------------------- plot


def plot_depth(results: dict[str, DepthResult], path: str | Path, *, title: str = "Prediction depth") -> Path:
    """Draw depth histograms (bars grouped by checkpoint) and per-layer k-NN accuracy curves into one PNG.

    Bars are fractions of each checkpoint's queries, so checkpoints with different query counts
    compare. The last bar group counts the never-consistent examples. Curves: k-NN accuracy
    against the label (solid) and agreement with the network's prediction (dashed).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not results:
        raise DepthError("no results to plot; pass at least one checkpoint's DepthResult")
    first_names = next(iter(results.values())).layer_names
    same_layers = all(result.layer_names == first_names for result in results.values())
    if not same_layers:
        log.warning("the checkpoints have different probe layers; the plot uses layer positions instead of names")
    num_layers = max(len(result.layer_names) for result in results.values())
    tick_labels = first_names if same_layers else [str(position) for position in range(num_layers)]

    figure = Figure(figsize=(max(10.0, 1.1 * num_layers + 4), 4.5))
    FigureCanvasAgg(figure)
    histogram_axes, accuracy_axes = figure.subplots(1, 2)
    width = 0.8 / len(results)
    colours = [f"C{index % 10}" for index in range(len(results))]

    for index, (label, result) in enumerate(results.items()):
        counts = np.array([*result.depth_histogram, result.num_never_consistent], dtype=np.float64)
        fractions = counts / max(1, len(result.query_ids))
        positions = np.arange(len(counts), dtype=np.float64)
        positions[-1] = num_layers  # the never-consistent group sits after the last layer
        histogram_axes.bar(positions - 0.4 + width * (index + 0.5), fractions, width=width, color=colours[index], label=label)

        layer_positions = np.arange(len(result.layers))
        accuracy_axes.plot(layer_positions, [layer.accuracy for layer in result.layers], "-o", color=colours[index], label=f"{label}: vs label")
        accuracy_axes.plot(layer_positions, [layer.agreement for layer in result.layers], "--s", color=colours[index], label=f"{label}: vs prediction")

    histogram_axes.set_xticks(np.arange(num_layers + 1), [*tick_labels, "never"], rotation=45, ha="right")
    histogram_axes.set_xlabel("prediction depth (probe layer)")
    histogram_axes.set_ylabel("fraction of queries")
    histogram_axes.set_title("Depth histogram")
    histogram_axes.legend()

    accuracy_axes.set_xticks(np.arange(num_layers), tick_labels, rotation=45, ha="right")
    accuracy_axes.set_ylim(0.0, 1.02)
    accuracy_axes.set_xlabel("probe layer")
    accuracy_axes.set_ylabel("k-NN probe accuracy")
    accuracy_axes.set_title("k-NN probe accuracy per layer")
    accuracy_axes.legend(fontsize="small")

    figure.suptitle(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return _write_atomic(path, buffer.getvalue())
