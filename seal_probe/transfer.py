"""Linear-probe transfer and few-shot evaluation of a frozen network's features on a target dataset."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from seal_train.data import ImageDataset, InputSpec, prepare_images, stratified_split

from .layers import DEFAULT_MAX_DIM, extract_embeddings, resolve_probe_layers
from .targets import Target, load_target, validate_target

log = logging.getLogger(__name__)

# Regularisation strengths C tried by the linear probe: 10^-4, 10^-3, ..., 10^4 (9 values).
DEFAULT_C_GRID: tuple[float, ...] = tuple(float(10.0**exponent) for exponent in range(-4, 5))
# Fraction of each class of the target's train split held out to choose C.
DEFAULT_VAL_FRACTION = 0.2
DEFAULT_MAX_ITER = 1000
DEFAULT_TOL = 1e-4
# Two-sided 95% quantile of the standard normal distribution, used for the few-shot interval.
Z_95 = 1.96
FEW_SHOT_CLASSIFIERS = ("logistic", "centroid")


class TransferError(ValueError):
    """Features, labels or settings that a linear probe or a few-shot evaluation cannot use."""


# ---------------------------------------------------------------- results


@dataclass(frozen=True)
class LinearProbeResult:
    """A linear probe's choice of C, its validation and test accuracy, and the refit's convergence.

    Accuracies are fractions in [0, 1]. grid is sorted in increasing order, and val_accuracy[i],
    val_iterations[i] and val_converged[i] belong to grid[i]. train_size and val_size are the two
    parts of the target's train split. iterations and converged describe the final refit on both.
    """

    grid: list[float]
    val_fraction: float
    seed: int
    max_iter: int
    tol: float
    train_size: int
    val_size: int
    test_size: int
    num_classes: int
    feature_dim: int
    val_accuracy: list[float]
    val_iterations: list[int]
    val_converged: list[bool]
    chosen_c: float
    test_accuracy: float
    iterations: int
    converged: bool


@dataclass(frozen=True)
class FewShotSettings:
    """An N-way K-shot protocol: n_way classes per episode, k_shot support and n_query query examples per class.

    classifier "logistic" (the default) fits L2-regularised logistic regression with a fixed C = c
    on the support set, because a support set is too small to hold out a validation part.
    "centroid" assigns each query to the nearest class mean of the support set in Euclidean
    distance, a tie going to the class drawn first. Both standardise features with the
    support set's statistics only.
    split names the target split whose features the episodes are drawn from.
    """

    n_way: int = 5
    k_shot: int = 5
    n_query: int = 15
    episodes: int = 600
    split: str = "test"
    classifier: str = "logistic"
    c: float = 1.0
    max_iter: int = DEFAULT_MAX_ITER

    def __post_init__(self) -> None:
        if self.n_way < 2:
            raise TransferError(f"n_way must be >= 2, got {self.n_way}; an episode needs two or more classes")
        if self.k_shot < 1:
            raise TransferError(f"k_shot must be >= 1, got {self.k_shot}")
        if self.n_query < 1:
            raise TransferError(f"n_query must be >= 1, got {self.n_query}")
        if self.episodes < 2:
            raise TransferError(f"episodes must be >= 2 for a confidence interval, got {self.episodes}")
        if self.split not in ("train", "test"):
            raise TransferError(f"few-shot split must be 'train' or 'test', got {self.split!r}")
        if self.classifier not in FEW_SHOT_CLASSIFIERS:
            raise TransferError(f"unknown few-shot classifier {self.classifier!r}; choose one of: {', '.join(FEW_SHOT_CLASSIFIERS)}")
        if not self.c > 0:
            raise TransferError(f"few-shot C must be > 0, got {self.c}")
        if self.max_iter < 1:
            raise TransferError(f"max_iter must be >= 1, got {self.max_iter}")


@dataclass(frozen=True)
class Episode:
    """One few-shot episode as indices into a feature array, with support and query grouped by class."""

    classes: np.ndarray
    support: np.ndarray
    query: np.ndarray


@dataclass(frozen=True)
class FewShotResult:
    """Per-episode accuracies and their mean with a 95% confidence interval (mean - ci95, mean + ci95)."""

    settings: FewShotSettings
    seed: int
    accuracies: list[float]
    mean: float
    ci95: float
    unconverged_episodes: int


@dataclass
class TransferResult:
    """A transfer evaluation of one model on one target, with every setting needed to repeat it."""

    target: dict[str, Any]
    layer: str
    layer_reduction: str
    feature_dim: int
    input_spec: dict[str, Any]
    conversions: list[str]
    seed: int
    batch_size: int
    device: str
    linear_probe: LinearProbeResult
    few_shot: FewShotResult | None
    extraction_seconds: float
    fit_seconds: float
    few_shot_seconds: float
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TransferResult":
        values = dict(data)
        values["linear_probe"] = LinearProbeResult(**data["linear_probe"])
        if data.get("few_shot") is not None:
            few_shot = dict(data["few_shot"])
            few_shot["settings"] = FewShotSettings(**few_shot["settings"])
            values["few_shot"] = FewShotResult(**few_shot)
        return cls(**values)

    def save_json(self, path: str | Path) -> Path:
        """Write the result as indented JSON through a temporary file, so a crash leaves no partial file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(handle, "w") as stream:
                json.dump(self.to_dict(), stream, indent=2)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load_json(cls, path: str | Path) -> "TransferResult":
        return cls.from_dict(json.loads(Path(path).read_text()))


# ---------------------------------------------------------------- input checks


def _validate_features(features: np.ndarray, labels: np.ndarray, *, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return features as float64 (N, D) and labels as int64 (N,), or raise TransferError naming the problem."""
    features = np.asarray(features)
    labels = np.asarray(labels)
    if features.ndim != 2:
        raise TransferError(f"{name} features must be a 2-D array (examples, dimensions), got shape {features.shape}")
    if labels.ndim != 1 or len(labels) != len(features):
        raise TransferError(f"{name} labels must be 1-D with one label per example: {len(features)} examples, labels of shape {labels.shape}")
    if len(features) == 0:
        raise TransferError(f"{name} features are empty; the split has no examples")
    if not np.isfinite(features).all():
        raise TransferError(f"{name} features contain NaN or infinity; check the model and the layer")
    return features.astype(np.float64, copy=False), labels.astype(np.int64, copy=False)


def _validate_grid(grid: Sequence[float]) -> list[float]:
    values = sorted(float(c) for c in grid)
    if not values:
        raise TransferError("the C grid is empty; pass one or more positive values such as 10^-4..10^4")
    if values[0] <= 0 or not all(math.isfinite(c) for c in values):
        raise TransferError(f"every C must be positive and finite, got {values}")
    if len(set(values)) != len(values):
        raise TransferError(f"the C grid contains duplicates: {values}")
    return values


def _validation_split(labels: np.ndarray, *, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out round(val_fraction * n_c) examples of each class c, or raise if a class would miss a part."""
    if not 0.0 < val_fraction < 1.0:
        raise TransferError(f"validation fraction must be in (0, 1), got {val_fraction}; pass a value such as {DEFAULT_VAL_FRACTION}")
    train_index, val_index = stratified_split(torch.from_numpy(labels), val_fraction, seed=seed)

    classes, counts = np.unique(labels, return_counts=True)
    val_classes = set(np.unique(labels[val_index]).tolist())
    train_classes = set(np.unique(labels[train_index]).tolist())
    for label, count in zip(classes.tolist(), counts.tolist()):
        if label not in val_classes or label not in train_classes:
            part = "validation" if label not in val_classes else "training"
            raise TransferError(
                f"class {label} has {count} training example(s), so the {part} part of a validation split "
                f"with fraction {val_fraction} has none of it; use a target with more examples per class or change the fraction"
            )
    return train_index, val_index


# ---------------------------------------------------------------- linear probe


def _make_probe(c: float, *, max_iter: int, tol: float) -> Pipeline:
    # LogisticRegression with lbfgs and its default penalty is L2-regularised. With three or more
    # classes it minimises the multinomial loss. With two it minimises the binary logistic loss,
    # the same model with one class's logit fixed at 0.
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter, tol=tol))


def _fit_converged(estimator, features: np.ndarray, labels: np.ndarray) -> bool:
    """Fit estimator in place and return False if the solver issued a ConvergenceWarning.

    The ConvergenceWarning is caught, so that callers record it instead of printing it. Other
    warnings are issued again.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        estimator.fit(features, labels)

    converged = True
    for warning in caught:
        if issubclass(warning.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return converged


def _fit_probe(probe: Pipeline, features: np.ndarray, labels: np.ndarray) -> tuple[int, bool]:
    """Fit probe in place and return the solver's iteration count and whether it converged."""
    converged = _fit_converged(probe, features, labels)
    return int(np.max(probe[-1].n_iter_)), converged


def fit_linear_probe(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    *,
    grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> LinearProbeResult:
    """Choose C on a stratified validation split, refit on train + validation, and score on test.

    Each probe is StandardScaler (fitted on the probe's training examples only) followed by
    LogisticRegression(C, solver="lbfgs"). The validation split is seal_train's stratified_split
    of the train labels with val_fraction and seed. C maximises validation accuracy, and a tie
    goes to the smallest C, the strongest regularisation.
    """
    train_features, train_labels = _validate_features(train_features, train_labels, name="train")
    test_features, test_labels = _validate_features(test_features, test_labels, name="test")
    if train_features.shape[1] != test_features.shape[1]:
        raise TransferError(f"train features have {train_features.shape[1]} dimensions, test features {test_features.shape[1]}; extract both from the same layer")
    classes = np.unique(train_labels)
    if len(classes) < 2:
        raise TransferError(f"the train labels contain a single class ({classes[0]}); a linear probe needs two or more classes")
    if max_iter < 1:
        raise TransferError(f"max_iter must be >= 1, got {max_iter}")
    grid = _validate_grid(grid)
    train_index, val_index = _validation_split(train_labels, val_fraction=val_fraction, seed=seed)

    # NOTE: these fits are many small BLAS calls. On 2 busy shared cores, OpenBLAS with 2 threads
    # ran them about 135 times slower than with 1 (bench/bench_transfer.py on digits), so a
    # loaded machine may need OPENBLAS_NUM_THREADS=1 or threadpoolctl's threadpool_limits(1).
    val_accuracy, val_iterations, val_converged = [], [], []
    for c in grid:
        probe = _make_probe(c, max_iter=max_iter, tol=tol)
        iterations, converged = _fit_probe(probe, train_features[train_index], train_labels[train_index])
        val_accuracy.append(float(probe.score(train_features[val_index], train_labels[val_index])))
        val_iterations.append(iterations)
        val_converged.append(converged)
        log.debug("C=%g: validation accuracy %.4f after %d iterations (converged: %s)", c, val_accuracy[-1], iterations, converged)

    chosen_c = grid[int(np.argmax(val_accuracy))]
    probe = _make_probe(chosen_c, max_iter=max_iter, tol=tol)
    iterations, converged = _fit_probe(probe, train_features, train_labels)
    test_accuracy = float(probe.score(test_features, test_labels))
    if not converged:
        log.warning("the linear probe with C=%g did not converge in %d iterations; raise max_iter", chosen_c, max_iter)

    return LinearProbeResult(
        grid=grid,
        val_fraction=val_fraction,
        seed=seed,
        max_iter=max_iter,
        tol=tol,
        train_size=len(train_index),
        val_size=len(val_index),
        test_size=len(test_labels),
        num_classes=len(classes),
        feature_dim=int(train_features.shape[1]),
        val_accuracy=val_accuracy,
        val_iterations=val_iterations,
        val_converged=val_converged,
        chosen_c=chosen_c,
        test_accuracy=test_accuracy,
        iterations=iterations,
        converged=converged,
    )


# ---------------------------------------------------------------- few-shot


def _check_episode_counts(labels: np.ndarray, *, n_way: int, k_shot: int, n_query: int, split: str = "split") -> None:
    """Raise TransferError unless labels have n_way classes or more, each with k_shot + n_query examples."""
    classes, counts = np.unique(labels, return_counts=True)
    needed = k_shot + n_query
    if len(classes) < n_way:
        raise TransferError(f"{n_way}-way episodes need {n_way} classes, the {split} has {len(classes)}; lower n_way")
    short = [(int(label), int(count)) for label, count in zip(classes, counts) if count < needed]
    if short:
        label, count = short[0]
        raise TransferError(
            f"class {label} has {count} example(s) in the {split}, fewer than k_shot + n_query = {needed} "
            f"({len(short)} class(es) short); lower k_shot or n_query"
        )


def sample_episodes(labels: np.ndarray, *, n_way: int, k_shot: int, n_query: int, episodes: int, seed: int) -> list[Episode]:
    """Draw episodes: n_way distinct classes, then k_shot + n_query distinct examples of each, without replacement.

    The draws come from numpy's default_rng(seed) in a fixed order, so the same labels and seed
    give the same episodes. Every class of labels must have k_shot + n_query examples or more.
    """
    for argument, value in (("n_way", n_way), ("k_shot", k_shot), ("n_query", n_query), ("episodes", episodes)):
        if value < 1:
            raise TransferError(f"{argument} must be >= 1, got {value}")
    labels = np.asarray(labels)
    _check_episode_counts(labels, n_way=n_way, k_shot=k_shot, n_query=n_query)
    classes = np.unique(labels)
    needed = k_shot + n_query

    members = {int(label): np.flatnonzero(labels == label) for label in classes}
    rng = np.random.default_rng(seed)
    drawn = []
    for _ in range(episodes):
        episode_classes = rng.choice(classes, size=n_way, replace=False)
        picks = [rng.choice(members[int(label)], size=needed, replace=False) for label in episode_classes]
        support = np.concatenate([pick[:k_shot] for pick in picks])
        query = np.concatenate([pick[k_shot:] for pick in picks])
        drawn.append(Episode(classes=episode_classes, support=support, query=query))
    return drawn


def classify_episode(
    features: np.ndarray,
    labels: np.ndarray,
    episode: Episode,
    *,
    classifier: str = "logistic",
    c: float = 1.0,
    max_iter: int = DEFAULT_MAX_ITER,
) -> tuple[float, bool]:
    """Fit a classifier on the support set and return (query accuracy, converged).

    "centroid" has no solver, so it always reports converged.
    """
    scaler = StandardScaler().fit(features[episode.support])
    support = scaler.transform(features[episode.support])
    query = scaler.transform(features[episode.query])
    support_labels = labels[episode.support]
    query_labels = labels[episode.query]

    if classifier == "logistic":
        model = LogisticRegression(C=c, solver="lbfgs", max_iter=max_iter)
        converged = _fit_converged(model, support, support_labels)
        predictions = model.predict(query)
    elif classifier == "centroid":
        centroids = np.stack([support[support_labels == label].mean(axis=0) for label in episode.classes])
        distances = ((query[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=2)
        predictions = episode.classes[np.argmin(distances, axis=1)]
        converged = True
    else:
        raise TransferError(f"unknown few-shot classifier {classifier!r}; choose one of: {', '.join(FEW_SHOT_CLASSIFIERS)}")
    return float(np.mean(predictions == query_labels)), converged


def confidence_interval_95(accuracies: Sequence[float]) -> tuple[float, float]:
    """Return (mean, half-width) of the normal-approximation 95% interval: mean +- 1.96 * s / sqrt(n).

    s is the sample standard deviation (ddof = 1) over the n episodes.
    """
    values = np.asarray(accuracies, dtype=np.float64)
    if len(values) < 2:
        raise TransferError(f"a confidence interval needs two or more episodes, got {len(values)}")
    mean = float(values.mean())
    half_width = Z_95 * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, half_width


def run_few_shot(features: np.ndarray, labels: np.ndarray, settings: FewShotSettings, *, seed: int = 0) -> FewShotResult:
    """Evaluate settings.episodes episodes drawn with seed and summarise their query accuracies."""
    features, labels = _validate_features(features, labels, name=f"few-shot {settings.split}")
    episodes = sample_episodes(
        labels, n_way=settings.n_way, k_shot=settings.k_shot, n_query=settings.n_query, episodes=settings.episodes, seed=seed
    )

    accuracies, unconverged = [], 0
    for episode in episodes:
        accuracy, converged = classify_episode(
            features, labels, episode, classifier=settings.classifier, c=settings.c, max_iter=settings.max_iter
        )
        accuracies.append(accuracy)
        unconverged += not converged
    if unconverged:
        log.warning("%d of %d few-shot episodes did not converge in %d iterations", unconverged, len(episodes), settings.max_iter)

    mean, half_width = confidence_interval_95(accuracies)
    return FewShotResult(settings=settings, seed=seed, accuracies=accuracies, mean=mean, ci95=half_width, unconverged_episodes=unconverged)


# ---------------------------------------------------------------- features of a frozen network


@dataclass(frozen=True)
class LayerFeatures:
    """One probe layer's features of a dataset: float32 (N, dim), how the layer was reduced, and the input conversions."""

    values: np.ndarray
    reduction: str
    conversions: list[str]
    device: str


def _prepared_batches(images: torch.Tensor, spec: InputSpec, *, convert_channels: bool, resize: bool, batch_size: int):
    """Yield float model inputs batch by batch, so that only one batch of a large target is in float at a time."""
    for start in range(0, len(images), batch_size):
        inputs, _ = prepare_images(images[start : start + batch_size], spec, convert_channels=convert_channels, resize=resize)
        yield inputs


def resolve_layer(model: nn.Module, layer: str, *, spec: InputSpec) -> str:
    """Resolve one probe layer name or pattern, or raise TransferError unless it names exactly one layer."""
    names = resolve_probe_layers(model, [layer], input_shape=(spec.channels, spec.height, spec.width))
    if len(names) != 1:
        raise TransferError(f"layer {layer!r} matches {len(names)} layers ({', '.join(names)}); name exactly one")
    return names[0]


def extract_features(
    model: nn.Module,
    dataset: ImageDataset,
    *,
    spec: InputSpec,
    layer: str = "penultimate",
    convert_channels: bool = False,
    resize: bool = False,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    max_dim: int = DEFAULT_MAX_DIM,
) -> LayerFeatures:
    """Run the frozen model over dataset once and return the features of one probe layer.

    Images go through seal_train.data.prepare_images (normalisation with spec, and channel
    conversion or bilinear resizing only when requested). seal_probe.layers.extract_embeddings
    captures the layer, reduces a large feature map by average pooling to at most max_dim values,
    and runs the model in eval mode, restoring each module's mode afterwards.
    """
    _, conversions = prepare_images(dataset.images[:1], spec, convert_channels=convert_channels, resize=resize)
    batches = _prepared_batches(dataset.images, spec, convert_channels=convert_channels, resize=resize, batch_size=batch_size)

    with extract_embeddings(
        model, batches, [layer],
        batch_size=batch_size, reduce="pool", max_dim=max_dim, device=device, num_examples=len(dataset),
    ) as store:
        values = store.embeddings(layer, mmap=False)
        reduction = store.layers[layer].reduction
        used_device = store.settings["device"]
    return LayerFeatures(values=values, reduction=reduction, conversions=conversions, device=used_device)


# ---------------------------------------------------------------- transfer of one model to one target


def _library_versions() -> dict[str, str]:
    import sklearn

    from . import __version__

    return {"seal_suite": __version__, "torch": torch.__version__, "scikit_learn": sklearn.__version__, "numpy": np.__version__}


def run_transfer(
    model: nn.Module,
    target: str | Target,
    *,
    spec: InputSpec,
    layer: str = "penultimate",
    grid: Sequence[float] = DEFAULT_C_GRID,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    seed: int = 0,
    few_shot: FewShotSettings | None = FewShotSettings(),
    max_iter: int = DEFAULT_MAX_ITER,
    convert_channels: bool = False,
    resize: bool = False,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    root: str | Path | None = None,
    max_dim: int = DEFAULT_MAX_DIM,
) -> TransferResult:
    """Evaluate how well a frozen model's features transfer to a target: a linear probe, then few-shot episodes.

    target is a registry name of seal_probe.targets (read from root) or a loaded Target.
    With resize, images of differing sizes are decoded at the model's input size.
    seed draws the target's test split where it has no official one, the validation split that
    chooses C, and the few-shot episodes. Settings and protocol sizes are checked before any
    forward pass. The model's parameters and buffers are not changed.
    """
    grid = _validate_grid(grid)
    if max_iter < 1:
        raise TransferError(f"max_iter must be >= 1, got {max_iter}")
    if batch_size < 1:
        raise TransferError(f"batch_size must be >= 1, got {batch_size}")

    if isinstance(target, str):
        image_size = (spec.height, spec.width) if resize else None
        target = load_target(target, root=root, image_size=image_size, seed=seed)
    else:
        validate_target(target)
    train_labels = target.train.labels.numpy()
    test_labels = target.test.labels.numpy()
    _validation_split(train_labels, val_fraction=val_fraction, seed=seed)
    if few_shot is not None:
        few_shot_labels = train_labels if few_shot.split == "train" else test_labels
        _check_episode_counts(
            few_shot_labels, n_way=few_shot.n_way, k_shot=few_shot.k_shot, n_query=few_shot.n_query, split=f"{few_shot.split} split"
        )
    layer = resolve_layer(model, layer, spec=spec)

    started = time.perf_counter()
    options = dict(spec=spec, layer=layer, convert_channels=convert_channels, resize=resize, batch_size=batch_size, device=device, max_dim=max_dim)
    train_features = extract_features(model, target.train, **options)
    test_features = extract_features(model, target.test, **options)
    extraction_seconds = time.perf_counter() - started

    started = time.perf_counter()
    probe = fit_linear_probe(
        train_features.values, train_labels, test_features.values, test_labels,
        grid=grid, val_fraction=val_fraction, seed=seed, max_iter=max_iter,
    )
    fit_seconds = time.perf_counter() - started

    started = time.perf_counter()
    few_shot_result = None
    if few_shot is not None:
        features = train_features if few_shot.split == "train" else test_features
        few_shot_result = run_few_shot(features.values, few_shot_labels, few_shot, seed=seed)
    few_shot_seconds = time.perf_counter() - started

    log.info(
        "transfer to %s from layer %s: linear probe %.2f%% (C=%g), features %.1f s, probe fit %.1f s",
        target.name, layer, 100 * probe.test_accuracy, probe.chosen_c, extraction_seconds, fit_seconds,
    )
    return TransferResult(
        target=target.to_dict(),
        layer=layer,
        layer_reduction=train_features.reduction,
        feature_dim=probe.feature_dim,
        input_spec=spec.to_dict(),
        conversions=[*target.conversions, *train_features.conversions],
        seed=seed,
        batch_size=batch_size,
        device=train_features.device,
        linear_probe=probe,
        few_shot=few_shot_result,
        extraction_seconds=extraction_seconds,
        fit_seconds=fit_seconds,
        few_shot_seconds=few_shot_seconds,
        versions=_library_versions(),
    )


# ---------------------------------------------------------------- plot


def plot_transfer(results: dict[str, TransferResult], path: str | Path) -> Path:
    """Draw one group of bars per checkpoint: linear-probe test accuracy and few-shot mean accuracy.

    Few-shot bars carry their 95% confidence interval as error bars. Every result must come
    from the same target and the same few-shot protocol, so that the bars are comparable.
    """
    if not results:
        raise TransferError("no results to plot; pass one or more {label: TransferResult}")
    targets = {result.target["name"] for result in results.values()}
    if len(targets) > 1:
        raise TransferError(f"the results come from different targets ({', '.join(sorted(targets))}); plot one target at a time")
    protocols = {None if r.few_shot is None else r.few_shot.settings for r in results.values()}
    if len(protocols) > 1:
        raise TransferError("the results use different few-shot settings; plot results of one protocol together")

    from matplotlib.figure import Figure

    labels = list(results)
    layers = {result.layer for result in results.values()}
    tick_labels = labels if len(layers) == 1 else [f"{label}\n{results[label].layer}" for label in labels]
    positions = np.arange(len(labels))
    settings = next(iter(protocols))
    width = 0.38 if settings is not None else 0.6
    # A Figure without pyplot draws with the Agg canvas and leaves the caller's backend alone.
    figure = Figure(figsize=(max(4.0, 1.4 * len(labels) + 2.0), 4.5), layout="constrained")
    axes = figure.subplots()

    probe_accuracy = [100.0 * results[label].linear_probe.test_accuracy for label in labels]
    offset = -width / 2 if settings is not None else 0.0
    bars = axes.bar(positions + offset, probe_accuracy, width, label="linear probe (test)")
    axes.bar_label(bars, fmt="%.1f", padding=2)
    if settings is not None:
        few_shot_mean = [100.0 * results[label].few_shot.mean for label in labels]
        few_shot_ci = [100.0 * results[label].few_shot.ci95 for label in labels]
        bars = axes.bar(
            positions + width / 2, few_shot_mean, width, yerr=few_shot_ci, capsize=4,
            label=f"{settings.n_way}-way {settings.k_shot}-shot ({settings.classifier}, 95% CI)",
        )
        axes.bar_label(bars, fmt="%.1f", padding=2)

    target_name = next(iter(targets))
    title = f"Transfer to {target_name}" + (f" (layer {next(iter(layers))})" if len(layers) == 1 else "")
    axes.set_xticks(positions, tick_labels)
    axes.set_xlabel("checkpoint")
    axes.set_ylabel("accuracy (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    figure.legend(loc="outside lower center", ncols=2)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    return path
