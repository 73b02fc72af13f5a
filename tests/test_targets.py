"""Tests of the transfer targets: digits, ImageFolder trees and torchvision-format folders built in tmp_path."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from seal_probe.targets import TargetError, available_targets, load_target
from seal_train.data import DatasetError, stratified_split


def _write_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 idx file: magic bytes 0, 0, 0x08, ndim, then big-endian sizes and the raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


# ---------------------------------------------------------------- digits


def test_digits_split_sizes():
    target = load_target("digits", seed=0)
    counts = np.bincount(load_digits().target)
    expected_test = np.rint(0.25 * counts).astype(int)

    assert len(target.train) + len(target.test) == counts.sum()
    assert np.bincount(target.test.labels.numpy(), minlength=10).tolist() == expected_test.tolist()
    assert target.split == {"method": "stratified", "test_fraction": 0.25, "seed": 0}


def test_digits_image_format():
    target = load_target("digits", seed=0)

    assert tuple(target.train.images.shape[1:]) == (1, 8, 8)
    assert target.train.images.dtype == torch.uint8
    assert target.to_dict()["image_shape"] == [1, 8, 8]
    assert target.conversions == ["pixel values 0..16 scaled to uint8 0..255"]


def test_digits_pixels_scaled():
    target = load_target("digits", seed=1)
    bunch = load_digits()
    _, held = stratified_split(torch.from_numpy(bunch.target), 0.25, seed=1)
    expected = np.floor(bunch.images[held] * 255 / 16 + 0.5).astype(np.uint8)

    assert np.array_equal(target.test.images[:, 0].numpy(), expected)
    assert np.array_equal(target.test.labels.numpy(), bunch.target[held])


def test_digits_seed_changes_split():
    first = load_target("digits", seed=0)
    again = load_target("digits", seed=0)
    other = load_target("digits", seed=1)

    assert first.test.fingerprint() == again.test.fingerprint()
    assert first.test.fingerprint() != other.test.fingerprint()


def test_digits_rejects_bad_fraction():
    with pytest.raises(TargetError, match="test fraction must be in"):
        load_target("digits", test_fraction=1.0)


# ---------------------------------------------------------------- registry and folders


def test_unknown_target_lists_names():
    with pytest.raises(TargetError) as caught:
        load_target("imagenet-21k")

    assert "'imagenet-21k'" in str(caught.value)
    assert all(name in str(caught.value) for name in available_targets())


def test_target_error_is_value_error():
    assert issubclass(TargetError, DatasetError)
    assert issubclass(TargetError, ValueError)


def test_torchvision_missing_folder(tmp_path):
    with pytest.raises(TargetError) as caught:
        load_target("dtd", root=tmp_path)

    assert str(tmp_path) in str(caught.value)
    assert "dtd/dtd/" in str(caught.value)


def test_torchvision_root_required():
    with pytest.raises(TargetError, match="needs root"):
        load_target("svhn")


def test_folder_not_found(tmp_path):
    with pytest.raises(TargetError, match="not found"):
        load_target("flowers102", root=tmp_path / "absent")


# ---------------------------------------------------------------- torchvision layouts on disk


def _make_dtd(root: Path, sizes: dict[str, list[tuple[str, int, int]]]) -> dict[str, np.ndarray]:
    """Write a DTD tree (dtd/dtd/images, dtd/dtd/labels/<split>1.txt); return the pixels by relative name."""
    data = root / "dtd" / "dtd"
    rng = np.random.default_rng(0)
    pixels = {}
    for split, entries in sizes.items():
        lines = []
        for index, (class_name, height, width) in enumerate(entries):
            relative = f"{class_name}/{split}_{index}.png"
            array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            _write_png(data / "images" / relative, array)
            pixels[relative] = array
            lines.append(relative)
        (data / "labels").mkdir(parents=True, exist_ok=True)
        (data / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    return pixels


DTD_LAYOUT = {
    "train": [("banded", 12, 12), ("dotted", 12, 12), ("banded", 20, 16), ("dotted", 12, 12)],
    "val": [("banded", 12, 12), ("dotted", 9, 14)],
    "test": [("dotted", 12, 12), ("banded", 12, 12)],
}


def test_dtd_merges_train_and_val(tmp_path):
    _make_dtd(tmp_path, DTD_LAYOUT)
    target = load_target("dtd", root=tmp_path, image_size=(12, 12))

    assert len(target.train) == 6
    assert target.train.classes == ["banded", "dotted"]
    assert target.train.labels.tolist() == [0, 1, 0, 1, 0, 1]
    assert tuple(target.train.images.shape[1:]) == (3, 12, 12)


def test_dtd_keeps_pixels_at_size(tmp_path):
    pixels = _make_dtd(tmp_path, DTD_LAYOUT)
    target = load_target("dtd", root=tmp_path, image_size=(12, 12))

    assert np.array_equal(target.test.images[0].permute(1, 2, 0).numpy(), pixels["dotted/test_0.png"])


def test_dtd_reports_resizes(tmp_path):
    _make_dtd(tmp_path, DTD_LAYOUT)
    target = load_target("dtd", root=tmp_path, image_size=(12, 12))

    assert target.conversions == [
        "dtd train: PIL bilinear resize of 1 of 4 images to 12x12",
        "dtd val: PIL bilinear resize of 1 of 2 images to 12x12",
    ]


def test_dtd_mixed_sizes_need_image_size(tmp_path):
    _make_dtd(tmp_path, DTD_LAYOUT)

    with pytest.raises(TargetError, match="pass image_size"):
        load_target("dtd", root=tmp_path)


def test_mnist_reads_idx_arrays(tmp_path):
    rng = np.random.default_rng(0)
    train_images = rng.integers(0, 256, size=(6, 28, 28), dtype=np.uint8)
    test_images = rng.integers(0, 256, size=(4, 28, 28), dtype=np.uint8)
    raw = tmp_path / "MNIST" / "raw"
    _write_idx(raw / "train-images-idx3-ubyte", train_images)
    _write_idx(raw / "train-labels-idx1-ubyte", np.array([0, 1, 2, 0, 1, 2], dtype=np.uint8))
    _write_idx(raw / "t10k-images-idx3-ubyte", test_images)
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([2, 1, 0, 1], dtype=np.uint8))

    target = load_target("mnist", root=tmp_path)

    assert np.array_equal(target.train.images[:, 0].numpy(), train_images)
    assert target.test.labels.tolist() == [2, 1, 0, 1]
    assert target.split["method"] == "official"


# ---------------------------------------------------------------- ImageFolder trees


def _make_image_folder(root: Path, classes: list[str], per_class: int) -> None:
    rng = np.random.default_rng(0)
    for class_name in classes:
        for index in range(per_class):
            _write_png(root / class_name / f"{index}.png", rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8))


def test_imagefolder_stratified_split(tmp_path):
    _make_image_folder(tmp_path, ["a", "b", "c"], per_class=4)
    target = load_target("imagefolder", root=tmp_path, seed=3)

    assert np.bincount(target.test.labels.numpy()).tolist() == [1, 1, 1]
    assert target.split == {"method": "stratified", "test_fraction": 0.25, "seed": 3}


def test_imagefolder_official_split(tmp_path):
    _make_image_folder(tmp_path / "train", ["a", "b"], per_class=3)
    _make_image_folder(tmp_path / "test", ["a", "b"], per_class=2)
    target = load_target("imagefolder", root=tmp_path)

    assert (len(target.train), len(target.test)) == (6, 4)
    assert target.split == {"method": "official"}


def test_imagefolder_single_class(tmp_path):
    _make_image_folder(tmp_path, ["only"], per_class=4)

    with pytest.raises(TargetError, match="single class"):
        load_target("imagefolder", root=tmp_path)


def test_imagefolder_train_without_test(tmp_path):
    _make_image_folder(tmp_path / "train", ["a", "b"], per_class=2)

    with pytest.raises(TargetError, match="has train/ but no test/"):
        load_target("imagefolder", root=tmp_path)
