"""Tests of the linear probe, few-shot episodes and run_transfer against scikit-learn and hand-computed values."""

from __future__ import annotations

import copy
import math
import statistics
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from seal_probe.targets import Target, TargetError, load_target
from seal_probe.transfer import (
    DEFAULT_C_GRID,
    Episode,
    FewShotSettings,
    TransferError,
    TransferResult,
    classify_episode,
    confidence_interval_95,
    extract_features,
    fit_linear_probe,
    plot_transfer,
    run_few_shot,
    run_transfer,
    sample_episodes,
)
from seal_train.data import DatasetError, InputSpec, prepare_images, stratified_split
from seal_train.models import build_model

GRID = [1e-3, 1e-1, 10.0]
SMALL_FEW_SHOT = FewShotSettings(n_way=3, k_shot=2, n_query=3, episodes=6)
DIGITS_SPEC = InputSpec(1, 8, 8, (0.3,), (0.37,))


@pytest.fixture(autouse=True)
def single_thread():
    # The fits and forward passes here are tiny. On a busy machine, several BLAS or OpenMP threads
    # wait on each other and make them many times slower than one thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1, user_api="blas"):
        yield
    torch.set_num_threads(threads)


def _blobs(per_class: int, *, seed: int, classes: int = 3, dim: int = 12, spread: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    """Draw overlapping Gaussian clusters, so that the choice of C changes the accuracy."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim))
    labels = np.repeat(np.arange(classes), per_class)
    features = centres[labels] + spread * rng.normal(size=(len(labels), dim))
    return features, labels


def _sklearn_probe(train_x, train_y, test_x, test_y, *, grid, val_fraction, seed):
    """The protocol written out with scikit-learn's own pipeline: validation accuracies, chosen C, test accuracy."""
    keep, held = stratified_split(torch.from_numpy(train_y), val_fraction, seed=seed)
    val_accuracy = []
    for c in grid:
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
        pipeline.fit(train_x[keep], train_y[keep])
        val_accuracy.append(pipeline.score(train_x[held], train_y[held]))
    chosen = grid[int(np.argmax(val_accuracy))]
    final = make_pipeline(StandardScaler(), LogisticRegression(C=chosen, max_iter=1000)).fit(train_x, train_y)
    return val_accuracy, chosen, final.score(test_x, test_y), int(final[-1].n_iter_.max())


def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("resnet-narrow", num_classes=10, in_channels=1, widths=(4, 8, 8, 16))


def _penultimate(model: torch.nn.Module, inputs: torch.Tensor) -> np.ndarray:
    """Compute the input of model.fc by running the ResNet's stages by hand, in eval mode, on a copy."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        x = model.maxpool(model.relu(model.bn1(model.conv1(inputs))))
        for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
            x = stage(x)
        return torch.flatten(model.avgpool(x), 1).numpy()


def _digits_subset(per_class: int) -> Target:
    target = load_target("digits", seed=0)
    labels = target.train.labels.numpy()
    keep = np.concatenate([np.flatnonzero(labels == label)[:per_class] for label in range(10)])
    return Target("digits", target.train.subset(np.sort(keep)), target.test, target.split, target.conversions)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


# ---------------------------------------------------------------- linear probe


def test_probe_matches_sklearn_pipeline():
    train_x, train_y = _blobs(40, seed=0)
    test_x, test_y = _blobs(20, seed=1)
    val_accuracy, chosen, test_accuracy, iterations = _sklearn_probe(train_x, train_y, test_x, test_y, grid=GRID, val_fraction=0.25, seed=7)

    result = fit_linear_probe(train_x, train_y, test_x, test_y, grid=GRID, val_fraction=0.25, seed=7)

    assert result.val_accuracy == val_accuracy
    assert result.chosen_c == chosen
    assert result.test_accuracy == test_accuracy
    assert result.iterations == iterations


def test_probe_split_sizes():
    train_x, train_y = _blobs(40, seed=0)
    test_x, test_y = _blobs(20, seed=1)
    result = fit_linear_probe(train_x, train_y, test_x, test_y, grid=GRID, val_fraction=0.25, seed=7)

    assert (result.train_size, result.val_size, result.test_size) == (90, 30, 60)
    assert (result.num_classes, result.feature_dim) == (3, 12)


def test_probe_tie_takes_smallest_c():
    train_x, train_y = _blobs(20, seed=0, spread=0.01)
    test_x, test_y = _blobs(5, seed=0, spread=0.01)
    result = fit_linear_probe(train_x, train_y, test_x, test_y, grid=[10.0, 0.1, 1.0], seed=0)

    assert result.val_accuracy == [1.0, 1.0, 1.0]
    assert result.chosen_c == 0.1


def test_probe_default_grid():
    assert DEFAULT_C_GRID == tuple(10.0**k for k in range(-4, 5))


def test_probe_reports_nonconvergence():
    train_x, train_y = _blobs(30, seed=0)
    with pytest.warns(ConvergenceWarning):
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=1)).fit(train_x, train_y)

    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        result = fit_linear_probe(train_x, train_y, train_x, train_y, grid=[1.0], max_iter=1)

    assert result.converged is False
    assert result.val_converged == [False]
    assert result.iterations == 1


def test_probe_rejects_single_class():
    features = np.ones((10, 3))
    with pytest.raises(TransferError, match="single class"):
        fit_linear_probe(features, np.zeros(10, dtype=int), features, np.zeros(10, dtype=int))


def test_probe_rejects_class_missing_from_validation():
    train_x, train_y = _blobs(10, seed=0)
    train_x, train_y = np.vstack([train_x, np.zeros((1, 12))]), np.append(train_y, 3)

    with pytest.raises(TransferError, match="class 3 has 1 training example"):
        fit_linear_probe(train_x, train_y, train_x, train_y, grid=GRID)


@pytest.mark.parametrize("grid", [[], [0.0, 1.0], [1.0, 1.0], [float("inf")]])
def test_probe_rejects_bad_grid(grid):
    train_x, train_y = _blobs(10, seed=0)
    with pytest.raises(TransferError, match="grid|C must be"):
        fit_linear_probe(train_x, train_y, train_x, train_y, grid=grid)


def test_probe_rejects_nan_features():
    train_x, train_y = _blobs(10, seed=0)
    train_x[3, 2] = np.nan
    with pytest.raises(TransferError, match="NaN"):
        fit_linear_probe(train_x, train_y, train_x, train_y, grid=GRID)


def test_probe_rejects_dimension_mismatch():
    train_x, train_y = _blobs(10, seed=0)
    with pytest.raises(TransferError, match="12 dimensions, test features 5"):
        fit_linear_probe(train_x, train_y, train_x[:, :5], train_y, grid=GRID)


# ---------------------------------------------------------------- few-shot


def test_interval_matches_textbook():
    accuracies = [0.6, 0.8, 0.7, 0.9, 0.75, 0.65]
    mean = statistics.mean(accuracies)
    half_width = 1.96 * statistics.stdev(accuracies) / math.sqrt(len(accuracies))

    result_mean, result_half_width = confidence_interval_95(accuracies)

    assert result_mean == pytest.approx(mean, rel=1e-12)
    assert result_half_width == pytest.approx(half_width, rel=1e-12)


def test_interval_rejects_one_episode():
    with pytest.raises(TransferError, match="two or more episodes"):
        confidence_interval_95([0.5])


def test_episodes_reproducible():
    labels = np.repeat(np.arange(6), 10)
    first = sample_episodes(labels, n_way=4, k_shot=2, n_query=3, episodes=5, seed=11)
    again = sample_episodes(labels, n_way=4, k_shot=2, n_query=3, episodes=5, seed=11)
    other = sample_episodes(labels, n_way=4, k_shot=2, n_query=3, episodes=5, seed=12)

    for a, b in zip(first, again):
        assert np.array_equal(a.classes, b.classes)
        assert np.array_equal(a.support, b.support)
        assert np.array_equal(a.query, b.query)
    assert any(not np.array_equal(a.query, b.query) for a, b in zip(first, other))


def test_episodes_structure():
    labels = np.repeat(np.arange(6), 10)
    for episode in sample_episodes(labels, n_way=4, k_shot=2, n_query=3, episodes=20, seed=0):
        indices = np.concatenate([episode.support, episode.query])

        assert len(set(episode.classes.tolist())) == 4
        assert labels[episode.support].tolist() == np.repeat(episode.classes, 2).tolist()
        assert labels[episode.query].tolist() == np.repeat(episode.classes, 3).tolist()
        assert len(set(indices.tolist())) == 4 * (2 + 3)


def test_episodes_reject_small_class():
    labels = np.concatenate([np.repeat([0, 1, 2], 10), [3, 3, 3, 3]])
    with pytest.raises(TransferError, match=r"class 3 has 4 example\(s\) in the split, fewer than k_shot \+ n_query = 5"):
        sample_episodes(labels, n_way=3, k_shot=2, n_query=3, episodes=2, seed=0)


def test_episodes_reject_too_few_classes():
    labels = np.repeat([0, 1], 10)
    with pytest.raises(TransferError, match="5-way episodes need 5 classes, the split has 2"):
        sample_episodes(labels, n_way=5, k_shot=1, n_query=1, episodes=2, seed=0)


def test_centroid_hand_case():
    # Support means are 1 (class 0) and 11 (class 1). Standardising one dimension keeps the order
    # of distances, so query 4 (label 1) lies nearer to class 0: three of four queries are right.
    features = np.array([[0.0], [2.0], [10.0], [12.0], [1.0], [11.0], [7.0], [4.0]])
    labels = np.array([0, 0, 1, 1, 0, 1, 1, 1])
    episode = Episode(classes=np.array([0, 1]), support=np.array([0, 1, 2, 3]), query=np.array([4, 5, 6, 7]))

    accuracy, converged = classify_episode(features, labels, episode, classifier="centroid")

    assert accuracy == 0.75
    assert converged is True


def test_logistic_episode_matches_sklearn():
    features, labels = _blobs(8, seed=4)
    episode = sample_episodes(labels, n_way=3, k_shot=3, n_query=5, episodes=1, seed=0)[0]
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=0.5, max_iter=1000))
    pipeline.fit(features[episode.support], labels[episode.support])
    expected = pipeline.score(features[episode.query], labels[episode.query])

    accuracy, _ = classify_episode(features, labels, episode, classifier="logistic", c=0.5)

    assert accuracy == expected


def test_few_shot_summary_matches_episodes():
    features, labels = _blobs(12, seed=2, classes=5)
    settings = FewShotSettings(n_way=3, k_shot=2, n_query=4, episodes=8, classifier="centroid")
    episodes = sample_episodes(labels, n_way=3, k_shot=2, n_query=4, episodes=8, seed=5)
    accuracies = [classify_episode(features, labels, e, classifier="centroid")[0] for e in episodes]

    result = run_few_shot(features, labels, settings, seed=5)

    assert result.accuracies == accuracies
    assert result.mean == pytest.approx(statistics.mean(accuracies), rel=1e-12)
    assert result.ci95 == pytest.approx(1.96 * statistics.stdev(accuracies) / math.sqrt(8), rel=1e-12)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_way": 1}, "n_way must be >= 2"),
        ({"k_shot": 0}, "k_shot must be >= 1"),
        ({"episodes": 1}, "episodes must be >= 2"),
        ({"classifier": "svm"}, "unknown few-shot classifier 'svm'"),
        ({"split": "val"}, "split must be 'train' or 'test'"),
    ],
)
def test_few_shot_settings_rejected(changes, message):
    with pytest.raises(TransferError, match=message):
        FewShotSettings(**changes)


# ---------------------------------------------------------------- frozen features and run_transfer


def test_features_match_manual_forward():
    model = _tiny_model()
    target = _digits_subset(12)
    inputs, _ = prepare_images(target.train.images, DIGITS_SPEC)

    features = extract_features(model, target.train, spec=DIGITS_SPEC, batch_size=32)

    np.testing.assert_allclose(features.values, _penultimate(model, inputs), rtol=1e-5, atol=1e-6)


def test_transfer_matches_sklearn_pipeline():
    model = _tiny_model()
    target = _digits_subset(20)
    train_x = _penultimate(model, prepare_images(target.train.images, DIGITS_SPEC)[0]).astype(np.float64)
    test_x = _penultimate(model, prepare_images(target.test.images, DIGITS_SPEC)[0]).astype(np.float64)
    train_y, test_y = target.train.labels.numpy(), target.test.labels.numpy()
    _, chosen, test_accuracy, _ = _sklearn_probe(train_x, train_y, test_x, test_y, grid=GRID, val_fraction=0.2, seed=3)

    result = run_transfer(model, target, spec=DIGITS_SPEC, grid=GRID, seed=3, few_shot=None)

    assert result.linear_probe.chosen_c == chosen
    assert result.linear_probe.test_accuracy == test_accuracy
    assert result.feature_dim == 16


def test_transfer_leaves_model_unchanged():
    model = _tiny_model()
    model.train()
    before = _state(model)
    modes_seen = []
    handle = model.layer1.register_forward_pre_hook(lambda module, args: modes_seen.append(module.training))

    run_transfer(model, _digits_subset(10), spec=DIGITS_SPEC, grid=GRID, few_shot=SMALL_FEW_SHOT)
    handle.remove()

    after = model.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert modes_seen and not any(modes_seen)
    assert all(module.training for module in model.modules())


def test_transfer_reports_conversions():
    torch.manual_seed(0)
    model = build_model("resnet-narrow", num_classes=10, in_channels=3, widths=(4, 8, 8, 16))
    spec = InputSpec(3, 16, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))

    result = run_transfer(model, _digits_subset(10), spec=spec, grid=GRID, few_shot=None, convert_channels=True, resize=True)

    assert result.target["image_shape"] == [1, 8, 8]
    assert result.conversions == [
        "pixel values 0..16 scaled to uint8 0..255",
        "grayscale to RGB (channel repeated)",
        "bilinear resize 8x8 to 16x16",
    ]


def test_transfer_requires_resize():
    spec = InputSpec(1, 16, 16, (0.5,), (0.25,))
    with pytest.raises(DatasetError, match="pass --resize"):
        run_transfer(_tiny_model(), _digits_subset(10), spec=spec, grid=GRID, few_shot=None)


def test_transfer_by_name_records_seed():
    result = run_transfer(_tiny_model(), "digits", spec=DIGITS_SPEC, grid=GRID, seed=4, few_shot=SMALL_FEW_SHOT)

    assert result.target["split"] == {"method": "stratified", "test_fraction": 0.25, "seed": 4}
    assert result.few_shot.seed == 4
    assert len(result.few_shot.accuracies) == SMALL_FEW_SHOT.episodes


def test_transfer_checks_few_shot_before_forward():
    model = _tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    too_many = FewShotSettings(n_way=5, k_shot=40, n_query=15, episodes=2)

    with pytest.raises(TransferError, match="in the test split, fewer than k_shot \\+ n_query = 55"):
        run_transfer(model, _digits_subset(10), spec=DIGITS_SPEC, grid=GRID, few_shot=too_many)
    assert calls == []


def test_transfer_rejects_single_class_target():
    digits = load_target("digits", seed=0)
    zeros = digits.train.subset(np.flatnonzero(digits.train.labels.numpy() == 0))
    target = Target("zeros", zeros, digits.test, {"method": "official"})

    with pytest.raises(TargetError, match="single class"):
        run_transfer(_tiny_model(), target, spec=DIGITS_SPEC, grid=GRID, few_shot=None)


def test_transfer_rejects_ambiguous_layer():
    with pytest.raises(TransferError, match="matches 4 layers"):
        run_transfer(_tiny_model(), _digits_subset(10), spec=DIGITS_SPEC, layer="layer?", grid=GRID, few_shot=None)


def test_result_json_round_trip(tmp_path):
    result = run_transfer(_tiny_model(), _digits_subset(10), spec=DIGITS_SPEC, grid=GRID, few_shot=SMALL_FEW_SHOT)

    path = result.save_json(tmp_path / "transfer.json")

    assert TransferResult.load_json(path) == result


# ---------------------------------------------------------------- plot


def _result(target_name: str) -> TransferResult:
    probe = fit_linear_probe(*_blobs(10, seed=0), *_blobs(5, seed=1), grid=[1.0])
    few_shot = run_few_shot(*_blobs(10, seed=0), SMALL_FEW_SHOT, seed=0)
    return TransferResult(
        target={"name": target_name}, layer="penultimate", layer_reduction="none", feature_dim=12,
        input_spec=DIGITS_SPEC.to_dict(), conversions=[], seed=0, batch_size=8, device="cpu",
        linear_probe=probe, few_shot=few_shot, extraction_seconds=0.0, fit_seconds=0.0, few_shot_seconds=0.0,
    )


def test_plot_writes_png(tmp_path):
    path = plot_transfer({"normal": _result("digits"), "seal": _result("digits")}, tmp_path / "plot.png")

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_rejects_mixed_targets(tmp_path):
    with pytest.raises(TransferError, match="different targets"):
        plot_transfer({"a": _result("digits"), "b": _result("dtd")}, tmp_path / "plot.png")
    assert not (tmp_path / "plot.png").exists()
