"""Tests for seal_probe.inputs: subsets, class balance, seeds, conversions and class-count checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from seal_probe.inputs import balanced_subset, check_class_count, load_probe_data
from seal_train.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, DatasetError, ImageDataset, InputSpec, load_dataset

GRAY_SPEC = InputSpec(1, 28, 28, FASHION_MNIST_MEAN, FASHION_MNIST_STD)
RGB_SPEC = InputSpec(3, 28, 28, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def fashion_test_split() -> ImageDataset:
    return load_dataset("fashion-mnist-subset", split="test")


def _dataset_with_class_sizes(sizes: list[int]) -> ImageDataset:
    """A tiny grayscale dataset whose class c has sizes[c] examples, each image filled with its index."""
    total = sum(sizes)
    images = (torch.arange(total) % 256).to(torch.uint8).view(total, 1, 1, 1).expand(total, 1, 4, 4).contiguous()
    labels = torch.cat([torch.full((size,), label, dtype=torch.int64) for label, size in enumerate(sizes)])
    return ImageDataset(images, labels, [f"class{i}" for i in range(len(sizes))], "sized", "memory", (0.5,), (0.25,))


def test_subset_size_and_balance(fashion_test_split):
    probe = load_probe_data("fashion-mnist-subset", split="test", subset_size=25, seed=3, spec=GRAY_SPEC)

    counts = np.bincount(fashion_test_split.labels.numpy()[probe.indices.numpy()], minlength=10)
    assert len(probe) == 25
    assert counts.sum() == 25
    assert counts.max() - counts.min() <= 1
    assert len(np.unique(probe.indices.numpy())) == 25


def test_subset_labels_and_images(fashion_test_split):
    probe = load_probe_data("fashion-mnist-subset", split="test", subset_size=12, seed=1, spec=GRAY_SPEC)

    index = probe.indices.numpy()
    expected = (fashion_test_split.images[index].double() / 255 - FASHION_MNIST_MEAN[0]) / FASHION_MNIST_STD[0]
    assert torch.equal(probe.labels, fashion_test_split.labels[index])
    torch.testing.assert_close(probe.images, expected.float())


def test_seed_reproduces_indices():
    first = load_probe_data("fashion-mnist-subset", split="test", subset_size=30, seed=5, spec=GRAY_SPEC)
    second = load_probe_data("fashion-mnist-subset", split="test", subset_size=30, seed=5, spec=GRAY_SPEC)
    other = load_probe_data("fashion-mnist-subset", split="test", subset_size=30, seed=6, spec=GRAY_SPEC)

    assert torch.equal(first.indices, second.indices)
    assert not torch.equal(first.indices, other.indices)


def test_whole_split_without_subset(fashion_test_split):
    probe = load_probe_data("fashion-mnist-subset", split="test", spec=GRAY_SPEC)

    assert torch.equal(probe.indices, torch.arange(len(fashion_test_split)))
    assert probe.record["seed"] is None


def test_record_contents(fashion_test_split):
    probe = load_probe_data("fashion-mnist-subset", split="test", subset_size=20, seed=2, spec=GRAY_SPEC)

    record = probe.record
    assert record["dataset"] == "fashion-mnist-subset"
    assert record["split"] == "test"
    assert record["split_size"] == len(fashion_test_split)
    assert record["subset_size"] == 20
    assert record["seed"] == 2
    assert record["class_counts"] == np.bincount(fashion_test_split.labels.numpy()[probe.indices.numpy()], minlength=10).tolist()
    assert record["conversions"] == []


@pytest.mark.parametrize(("sizes", "subset_size", "expected"), [([2, 10, 10], 12, [2, 5, 5]), ([2, 10, 10], 13, [2, 5, 6]), ([1, 1, 9], 11, [1, 1, 9])])
def test_imbalanced_classes(sizes, subset_size, expected):
    data = _dataset_with_class_sizes(sizes)

    indices = balanced_subset(data.labels, subset_size, seed=0)

    assert sorted(np.bincount(data.labels.numpy()[indices], minlength=len(sizes)).tolist()) == expected


def test_in_memory_dataset():
    data = _dataset_with_class_sizes([3, 3])
    spec = InputSpec(1, 4, 4, (0.5,), (0.25,))

    probe = load_probe_data(data, subset_size=4, seed=0, spec=spec)

    expected = (probe.indices.double().view(-1, 1, 1, 1).expand(-1, 1, 4, 4) / 255 - 0.5) / 0.25
    torch.testing.assert_close(probe.images, expected.float())


@pytest.mark.parametrize("subset_size", [0, -3])
def test_subset_size_below_one(subset_size):
    with pytest.raises(DatasetError, match=rf"subset size must be an integer >= 1, got {subset_size}"):
        load_probe_data("fashion-mnist-subset", split="test", subset_size=subset_size, spec=GRAY_SPEC)


def test_subset_larger_than_split(fashion_test_split):
    too_many = len(fashion_test_split) + 1

    with pytest.raises(DatasetError, match=rf"subset size {too_many} is larger than the split \({len(fashion_test_split)} examples\)"):
        load_probe_data("fashion-mnist-subset", split="test", subset_size=too_many, spec=GRAY_SPEC)


def test_empty_dataset():
    empty = ImageDataset(torch.zeros(0, 1, 4, 4, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), ["a"], "empty", "memory", (0.5,), (0.25,))

    with pytest.raises(DatasetError, match=r"dataset 'empty' split 'train' is empty"):
        load_probe_data(empty, spec=InputSpec(1, 4, 4, (0.5,), (0.25,)))


def test_channel_conversion_needs_flag():
    with pytest.raises(DatasetError, match=r"--convert-channels"):
        load_probe_data("fashion-mnist-subset", split="test", subset_size=5, spec=RGB_SPEC)


def test_channel_conversion_reported(fashion_test_split):
    probe = load_probe_data("fashion-mnist-subset", split="test", subset_size=5, seed=0, spec=RGB_SPEC, convert_channels=True)

    gray = fashion_test_split.images[probe.indices.numpy()].double() / 255
    assert probe.images.shape == (5, 3, 28, 28)
    assert len(probe.record["conversions"]) == 1
    assert "grayscale to RGB" in probe.record["conversions"][0]
    for channel in range(3):
        torch.testing.assert_close(probe.images[:, channel : channel + 1], ((gray - 0.5) / 0.25).float())


def test_resize_needs_flag():
    spec = InputSpec(1, 32, 32, FASHION_MNIST_MEAN, FASHION_MNIST_STD)

    with pytest.raises(DatasetError, match=r"--resize"):
        load_probe_data("fashion-mnist-subset", split="test", subset_size=5, spec=spec)


def test_resize_reported():
    spec = InputSpec(1, 32, 32, FASHION_MNIST_MEAN, FASHION_MNIST_STD)

    probe = load_probe_data("fashion-mnist-subset", split="test", subset_size=5, spec=spec, resize=True)

    assert probe.images.shape == (5, 1, 32, 32)
    assert probe.record["conversions"] == ["bilinear resize 28x28 to 32x32"]


def test_class_count_matches(fashion_test_split):
    check_class_count(10, fashion_test_split)


def test_class_count_mismatch():
    probe = load_probe_data("fashion-mnist-subset", split="test", subset_size=10, spec=GRAY_SPEC)

    with pytest.raises(DatasetError, match=r"the model has 200 classes but dataset 'fashion-mnist-subset' has 10"):
        check_class_count(200, probe)


def test_class_count_label_out_of_range():
    data = ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 2]), ["a", "b"], "broken", "memory", (0.5,), (0.25,))

    with pytest.raises(DatasetError, match=r"labels from 0 to 2, outside the model's classes 0..1"):
        check_class_count(2, data)
