"""Tests of prediction depth: the definition on hand-built probes, the pipeline against scikit-learn, writers and plot."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.neighbors import KNeighborsClassifier
from torch import nn

from seal_probe.depth import (
    DepthError,
    DepthSettings,
    DepthTiming,
    compute_prediction_depth,
    mean_with_interval,
    plot_depth,
    run_prediction_depth,
    summarise_depths,
    write_depth_outputs,
)
from seal_probe.knn import KnnError
from seal_probe.layers import extract_embeddings
from seal_train.models import build_model

# Probe predictions (layers x queries) and network predictions with depths worked out by hand.
HAND_PROBES = np.array([
    [0, 1, 0, 0, 1, 2],
    [0, 1, 1, 0, 0, 2],
    [0, 1, 0, 0, 1, 1],
    [0, 0, 0, 1, 1, 2],
])
HAND_NETWORK = np.array([0, 0, 0, 0, 1, 2])
HAND_DEPTHS = np.array([0, 3, 2, np.nan, 2, 3])  # all agree; only the last; from 2; never; from 2; only the last
HAND_CONSISTENT = np.array([True, True, True, False, True, True])
SHAPE = (1, 12, 12)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    model = build_model("resnet-narrow", num_classes=3, in_channels=1, widths=(4, 4, 8, 8))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.3, 0.3)
            module.running_var.uniform_(0.5, 1.5)
    return model


def tiny_data(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, *SHAPE, generator=generator), torch.randint(0, 3, (rows,), generator=generator)


def depth_by_scan(probes: np.ndarray, network: np.ndarray) -> list[int | None]:
    """Walk back from the last probe while it agrees with the network: the first layer of that run is the depth."""
    depths: list[int | None] = []
    for column in range(probes.shape[1]):
        layer = probes.shape[0]
        while layer > 0 and probes[layer - 1, column] == network[column]:
            layer -= 1
        depths.append(layer if layer < probes.shape[0] else None)
    return depths


def hand_result():
    settings = DepthSettings(
        layers=[], k=3, distance="euclidean", tie_rule="", neighbour_order="", reduce="pool", max_dim=4096,
        support_size=10, num_queries=6, exclude_self=False, num_self_matches_excluded=0, batch_size=2,
        device="cpu", knn_device="cpu", knn_threads=1, seed=0,
    )
    layer_info = [{"name": name, "dim": dim, "reduction": "none"} for name, dim in zip(["input", "a", "b", "output"], [4, 3, 2, 3])]
    return summarise_depths(
        settings=settings, timing=DepthTiming(1.0, 2.0, 3.0), layer_info=layer_info,
        query_ids=np.array([10, 11, 12, 13, 14, 15]), labels=np.array([0, 1, 0, 0, 1, 1]),
        predictions=HAND_NETWORK, probe_predictions=HAND_PROBES,
    )


def test_depth_hand_cases():
    depths, consistent = compute_prediction_depth(HAND_PROBES, HAND_NETWORK)
    np.testing.assert_array_equal(depths, HAND_DEPTHS)
    np.testing.assert_array_equal(consistent, HAND_CONSISTENT)


def test_depth_single_layer():
    depths, consistent = compute_prediction_depth(np.array([[1, 2]]), np.array([1, 0]))
    np.testing.assert_array_equal(depths, [0, np.nan])
    np.testing.assert_array_equal(consistent, [True, False])


def test_depth_matches_scan_on_random_probes():
    rng = np.random.default_rng(0)
    probes, network = rng.integers(0, 2, size=(6, 500)), rng.integers(0, 2, size=500)
    depths, consistent = compute_prediction_depth(probes, network)
    expected = depth_by_scan(probes, network)
    np.testing.assert_array_equal(consistent, [depth is not None for depth in expected])
    np.testing.assert_array_equal(depths, [np.nan if depth is None else depth for depth in expected])


def test_depth_shape_mismatch_rejected():
    with pytest.raises(DepthError, match=r"\(4, 6\) and \(5,\)"):
        compute_prediction_depth(HAND_PROBES, np.zeros(5, dtype=int))


def test_mean_interval_matches_scipy():
    values = np.array([0, 1, 1, 2, 3, 3, 3, 5], dtype=float)
    mean, interval = mean_with_interval(values)
    expected = stats.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean())
    assert interval == pytest.approx(expected)


def test_summary_counts_by_hand():
    result = hand_result()
    assert result.depth_histogram == [1, 0, 2, 2]
    assert result.num_never_consistent == 1
    assert result.fraction_never_consistent == pytest.approx(1 / 6)
    assert result.mean_depth == pytest.approx((0 + 3 + 2 + 2 + 3) / 5)
    assert [layer.accuracy for layer in result.layers] == pytest.approx([5 / 6, 3 / 6, 6 / 6, 3 / 6])
    assert [layer.agreement for layer in result.layers] == pytest.approx([5 / 6, 3 / 6, 4 / 6, 5 / 6])


def test_writers_round_trip(tmp_path):
    result = hand_result()
    paths = write_depth_outputs(result, tmp_path / "depth")

    with open(paths["examples"], newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [row["depth"] for row in rows] == ["0", "3", "2", "", "2", "3"]
    assert [row["depth_layer"] for row in rows] == ["input", "output", "b", "", "b", "output"]
    assert [row["index"] for row in rows] == ["10", "11", "12", "13", "14", "15"]
    assert [row["probe_a"] for row in rows] == [str(value) for value in HAND_PROBES[1]]

    with open(paths["layers"], newline="") as stream:
        layers = list(csv.DictReader(stream))
    assert [row["examples_at_depth"] for row in layers] == ["1", "0", "2", "2"]
    assert [row["layer"] for row in layers] == ["input", "a", "b", "output"]

    summary = json.loads(paths["summary"].read_text())
    assert summary["num_never_consistent"] == 1
    assert summary["depth_histogram"] == {"input": 1, "a": 0, "b": 2, "output": 2}
    assert summary["settings"]["k"] == 3
    assert sorted(path.name for path in (tmp_path / "depth").iterdir()) == ["examples.csv", "layers.csv", "summary.json"]


def test_plot_writes_png(tmp_path):
    import matplotlib.image

    path = plot_depth({"normal": hand_result(), "seal": hand_result()}, tmp_path / "depth.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).shape[0] > 100


def test_run_matches_sklearn_probes():
    model = tiny_model()
    support, support_labels = tiny_data(1, 60)
    queries, query_labels = tiny_data(2, 25)
    result = run_prediction_depth(model, support, support_labels, queries, query_labels, k=5, batch_size=16)

    with extract_embeddings(model, support) as support_store, extract_embeddings(model, queries) as query_store:
        assert result.layer_names == support_store.layer_names
        for position, layer in enumerate(result.layer_names):
            reference = KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(support_store.embeddings(layer), support_labels.numpy())
            np.testing.assert_array_equal(result.probe_predictions[position], reference.predict(query_store.embeddings(layer)), err_msg=layer)

    with torch.no_grad():
        network = model.eval()(queries).argmax(1).numpy()
    np.testing.assert_array_equal(result.predictions, network)
    expected = depth_by_scan(result.probe_predictions, network)
    assert [result.example_depth(position) for position in range(25)] == expected
    assert result.layers[0].accuracy == pytest.approx(np.mean(result.probe_predictions[0] == query_labels.numpy()))


def test_run_excludes_self_like_sklearn():
    model = tiny_model()
    support, labels = tiny_data(3, 40)
    result = run_prediction_depth(model, support, labels, support, labels, layers=["input", "avgpool", "output"], k=4)
    assert result.settings.num_self_matches_excluded == 40

    with extract_embeddings(model, support, ["input", "avgpool", "output"]) as store:
        for position, layer in enumerate(result.layer_names):
            # predict(None) gives scikit-learn's leave-one-out predictions: no point is its own neighbour.
            reference = KNeighborsClassifier(n_neighbors=4, algorithm="brute").fit(store.embeddings(layer), labels.numpy())
            np.testing.assert_array_equal(result.probe_predictions[position], reference.predict(None), err_msg=layer)


def test_run_leaves_model_unchanged():
    model = tiny_model()
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    support, labels = tiny_data(4, 30)
    run_prediction_depth(model, support, labels, support[:10], labels[:10], k=3, query_support_indices=np.arange(10))
    after = model.state_dict()
    for name, tensor in before.items():
        assert torch.equal(tensor, after[name]), name
    assert all(module.training for module in model.modules())


def test_run_k_too_large_rejected():
    support, labels = tiny_data(5, 30)
    with pytest.raises(KnnError, match=r"k=50 is larger than the support set \(30 examples\)"):
        run_prediction_depth(tiny_model(), support, labels, support[:3], labels[:3], k=50, exclude_self=False)


def test_run_label_count_mismatch_rejected():
    support, labels = tiny_data(6, 30)
    with pytest.raises(DepthError, match="query_labels needs one label per example: 3"):
        run_prediction_depth(tiny_model(), support, labels, support[:3], labels[:4], k=3)


def test_interval_clipped_to_depth_range():
    from scipy import stats

    values = np.array([0.0, 7.0])
    half_width = stats.t.ppf(0.975, 1) * values.std(ddof=1) / np.sqrt(2)

    mean, interval = mean_with_interval(values, bounds=(0, 7))

    assert mean == 3.5
    assert 3.5 - half_width < 0
    assert interval == (0, 7)
