"""Target datasets for transfer evaluation, read from local files only, each with a train and a test split."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from seal_train.data import DatasetError, ImageDataset, load_dataset, stratified_split

log = logging.getLogger(__name__)

# Fraction of each class held out as the test split of a target that has no official one.
DEFAULT_TEST_FRACTION = 0.25
# load_digits stores pixel intensities as integers 0..16.
DIGITS_MAX_VALUE = 16


class TargetError(DatasetError):
    """An unknown target, a missing folder, or a target that cannot serve as a probe's data."""


@dataclass
class Target:
    """A target dataset: a train and a test split of uint8 images, and how they were made."""

    name: str
    train: ImageDataset
    test: ImageDataset
    split: dict[str, Any]
    conversions: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Describe the target for a result record, without the images."""
        _, channels, height, width = self.train.images.shape
        return {
            "name": self.name,
            "source": self.train.source,
            "num_classes": self.train.num_classes,
            "train_size": len(self.train),
            "test_size": len(self.test),
            "image_shape": [int(channels), int(height), int(width)],
            "split": dict(self.split),
            "conversions": list(self.conversions),
            "train_fingerprint": self.train.fingerprint(),
            "test_fingerprint": self.test.fingerprint(),
        }


# ---------------------------------------------------------------- helpers


def _channel_stats(images: torch.Tensor, *, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Compute the per-channel mean and standard deviation of uint8 images scaled to [0, 1].

    Sums run in float64 over chunks, so a large dataset is never converted to float at once.
    """
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, len(images), chunk):
        block = images[start : start + chunk].to(torch.float64).div_(255.0)
        total += block.sum(dim=(0, 2, 3))
        total_sq += block.square().sum(dim=(0, 2, 3))

    count = len(images) * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(0.0).sqrt()
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _split_stratified(dataset: ImageDataset, *, test_fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    if not 0.0 < test_fraction < 1.0:
        raise TargetError(f"test fraction must be in (0, 1), got {test_fraction}; pass a value such as {DEFAULT_TEST_FRACTION}")
    train_index, test_index = stratified_split(dataset.labels, test_fraction, seed=seed)
    return dataset.subset(train_index), dataset.subset(test_index)


def _require_root(name: str, root: str | Path | None, expected: str) -> Path:
    if root is None:
        raise TargetError(f"target {name!r} needs root: the folder that contains {expected}")
    root = Path(root)
    if not root.is_dir():
        raise TargetError(f"folder {root} for target {name!r} not found; pass the folder that contains {expected}")
    return root


# ---------------------------------------------------------------- scikit-learn digits


def load_digits_target(*, test_fraction: float = DEFAULT_TEST_FRACTION, seed: int = 0) -> Target:
    """Load scikit-learn's digits (1,797 grayscale 8x8 images, 10 classes) with a stratified test split.

    load_digits ships inside scikit-learn, so nothing is read from the network. Each value v
    in 0..16 becomes the uint8 pixel round(v * 255 / 16). The test split contains
    round(test_fraction * n_c) images of each class c, drawn with seed.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / DIGITS_MAX_VALUE)).astype(np.uint8)
    images = torch.from_numpy(pixels).unsqueeze(1).contiguous()
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    classes = [str(digit) for digit in bunch.target_names]

    full = ImageDataset(images, labels, classes, "digits", "sklearn.datasets.load_digits", (0.0,), (1.0,))
    train, test = _split_stratified(full, test_fraction=test_fraction, seed=seed)
    train.mean, train.std = _channel_stats(train.images)
    test.mean, test.std = train.mean, train.std

    split = {"method": "stratified", "test_fraction": test_fraction, "seed": seed}
    return Target("digits", train, test, split, [f"pixel values 0..{DIGITS_MAX_VALUE} scaled to uint8 0..255"])


# ---------------------------------------------------------------- seal_train loaders


def _load_official_splits(name: str, root: str | Path | None) -> Target:
    """Load a dataset of seal_train's registry that has official train and test splits."""
    train = load_dataset(name, root=root, split="train")
    test = load_dataset(name, root=root, split="test")
    return Target(name, train, test, {"method": "official"})


def load_image_folder_target(
    root: str | Path | None,
    *,
    image_size: tuple[int, int] | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> Target:
    """Load an ImageFolder tree as a target.

    With root/train/<class>/ and root/test/<class>/ both present these are the splits.
    Otherwise root/<class>/ is split with a stratified test split drawn with seed.
    Images of differing sizes need image_size, which resizes them with PIL's bilinear filter.
    """
    root = _require_root("imagefolder", root, "one sub-folder per class, or train/ and test/ with one per class")
    has_train, has_test = (root / "train").is_dir(), (root / "test").is_dir()
    if has_train != has_test:
        present, missing = ("train", "test") if has_train else ("test", "train")
        raise TargetError(f"image folder {root} has {present}/ but no {missing}/; add {missing}/ or pass a folder with one sub-folder per class")

    conversions = [f"decoded at {image_size[0]}x{image_size[1]} (PIL bilinear resize of every file of another size)"] if image_size else []
    if has_train:
        train = load_dataset("imagefolder", root=root, split="train", image_size=image_size)
        test = load_dataset("imagefolder", root=root, split="test", image_size=image_size)
        if train.classes != test.classes:
            raise TargetError(f"image folder {root}: train/ and test/ have different class folders; give both the same sub-folders")
        return Target("imagefolder", train, test, {"method": "official"}, conversions)

    full = load_dataset("imagefolder", root=root, split="train", image_size=image_size)
    train, test = _split_stratified(full, test_fraction=test_fraction, seed=seed)
    split = {"method": "stratified", "test_fraction": test_fraction, "seed": seed}
    return Target("imagefolder", train, test, split, conversions)


# ---------------------------------------------------------------- torchvision datasets on disk


@dataclass(frozen=True)
class TorchvisionTarget:
    """Settings for reading one torchvision dataset class into a train and a test split.

    train_parts and test_parts are the constructor arguments of the parts that make up each
    split (Flowers102's train split is its official train plus val parts). array is the
    layout of the dataset's decoded uint8 attribute ("NCHW" or "NHW"), or None when images
    are read one by one as PIL images.
    """

    class_name: str
    expected: str
    train_parts: tuple[dict[str, Any], ...]
    test_parts: tuple[dict[str, Any], ...]
    array: str | None = None
    data_attribute: str = "data"
    labels_attribute: str = "labels"


TORCHVISION_TARGETS: dict[str, TorchvisionTarget] = {
    "svhn": TorchvisionTarget("SVHN", "train_32x32.mat and test_32x32.mat", ({"split": "train"},), ({"split": "test"},), array="NCHW"),
    "stl10": TorchvisionTarget("STL10", "stl10_binary/", ({"split": "train"},), ({"split": "test"},), array="NCHW"),
    "mnist": TorchvisionTarget("MNIST", "MNIST/raw/", ({"train": True},), ({"train": False},), array="NHW", labels_attribute="targets"),
    "flowers102": TorchvisionTarget("Flowers102", "flowers-102/", ({"split": "train"}, {"split": "val"}), ({"split": "test"},)),
    "dtd": TorchvisionTarget("DTD", "dtd/dtd/", ({"split": "train"}, {"split": "val"}), ({"split": "test"},)),
    "oxford-pets": TorchvisionTarget("OxfordIIITPet", "oxford-iiit-pet/", ({"split": "trainval"},), ({"split": "test"},)),
    "fgvc-aircraft": TorchvisionTarget("FGVCAircraft", "fgvc-aircraft-2013b/", ({"split": "trainval"},), ({"split": "test"},)),
    "food101": TorchvisionTarget("Food101", "food-101/", ({"split": "train"},), ({"split": "test"},)),
    "gtsrb": TorchvisionTarget("GTSRB", "gtsrb/", ({"split": "train"},), ({"split": "test"},)),
}


def _open_torchvision(name: str, entry: TorchvisionTarget, root: Path, arguments: dict[str, Any]):
    from torchvision import datasets

    dataset_class = getattr(datasets, entry.class_name)
    try:
        return dataset_class(str(root), download=False, **arguments)
    except RuntimeError as error:
        # torchvision raises RuntimeError("Dataset not found ...") when its files are absent or fail their checksum.
        raise TargetError(
            f"torchvision.datasets.{entry.class_name} found no valid dataset under {root}; "
            f"place {entry.expected} there (target {name!r} never downloads)"
        ) from error
    except OSError as error:
        raise TargetError(f"cannot read target {name!r} under {root}: {error}; check that its files are complete") from error


def _array_part(dataset, entry: TorchvisionTarget) -> tuple[np.ndarray, np.ndarray]:
    images = np.asarray(getattr(dataset, entry.data_attribute), dtype=np.uint8)
    if entry.array == "NHW":
        images = images[:, None, :, :]
    labels = np.asarray(getattr(dataset, entry.labels_attribute), dtype=np.int64)
    return np.ascontiguousarray(images), labels


def _decode_part(dataset, *, part_name: str, image_size: tuple[int, int] | None) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode every PIL image of a torchvision dataset into (N, 3, H, W) uint8, and count the images resized."""
    from PIL import Image

    arrays, labels, resized = [], [], 0
    for index in tqdm(range(len(dataset)), desc=f"decoding {part_name}", unit="image", disable=None):
        image, class_index = dataset[index]
        image = image.convert("RGB")
        if image_size is not None and image.size != (image_size[1], image_size[0]):
            image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
            resized += 1
        array = np.asarray(image, dtype=np.uint8)
        if arrays and array.shape != arrays[0].shape:
            raise TargetError(
                f"{part_name}: image {index} is {array.shape[1]}x{array.shape[0]}, earlier ones are "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass image_size (--resize) to decode all at one size"
            )
        arrays.append(array)
        labels.append(int(class_index))

    if not arrays:
        raise TargetError(f"{part_name} has no images; check that its folder is complete")
    images = np.stack(arrays).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(images), np.asarray(labels, dtype=np.int64), resized


def _align_labels(labels: np.ndarray, part_classes: list[str] | None, classes: list[str]) -> np.ndarray:
    """Re-index labels of one part by class name onto classes, appending names seen for the first time."""
    if part_classes is None:
        return labels
    for class_name in part_classes:
        if class_name not in classes:
            classes.append(class_name)
    mapping = np.asarray([classes.index(class_name) for class_name in part_classes], dtype=np.int64)
    return mapping[labels]


def load_torchvision_target(
    name: str,
    root: str | Path | None,
    *,
    image_size: tuple[int, int] | None = None,
) -> Target:
    """Read a torchvision-format dataset already on disk (download=False) into a uint8 target.

    Datasets whose images differ in size are decoded once through PIL. They need image_size
    and are resized with PIL's bilinear filter, which the target's conversions record.

    NOTE: the resize stretches each image to image_size without keeping its aspect ratio or
    cropping, as seal_train's ImageFolder loader does. Both splits are held in memory as uint8,
    about 15 GB for Food101 at 224x224.
    """
    entry = TORCHVISION_TARGETS[name]
    root = _require_root(name, root, entry.expected)
    classes: list[str] = []
    conversions: list[str] = []
    splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    for split_name, parts in (("train", entry.train_parts), ("test", entry.test_parts)):
        image_parts, label_parts = [], []
        for arguments in parts:
            dataset = _open_torchvision(name, entry, root, arguments)
            part_name = f"{name} {'/'.join(str(v) for v in arguments.values())}"
            if entry.array is not None:
                images, labels = _array_part(dataset, entry)
            else:
                images, labels, resized = _decode_part(dataset, part_name=part_name, image_size=image_size)
                if resized:
                    conversions.append(f"{part_name}: PIL bilinear resize of {resized} of {len(labels)} images to {image_size[0]}x{image_size[1]}")
            part_classes = list(dataset.classes) if getattr(dataset, "classes", None) else None
            image_parts.append(images)
            label_parts.append(_align_labels(labels, part_classes, classes))
        splits[split_name] = (np.concatenate(image_parts), np.concatenate(label_parts))

    train_images, train_labels = splits["train"]
    test_images, test_labels = splits["test"]
    if train_images.shape[1:] != test_images.shape[1:]:
        raise TargetError(f"{name}: train images are {train_images.shape[1:]}, test images {test_images.shape[1:]}; pass image_size (--resize)")
    if not classes:
        classes = [str(label) for label in range(int(max(train_labels.max(), test_labels.max())) + 1)]

    train_tensor = torch.from_numpy(train_images)
    mean, std = _channel_stats(train_tensor)
    source = f"torchvision.datasets.{entry.class_name} at {root}"
    train = ImageDataset(train_tensor, torch.from_numpy(train_labels), classes, name, source, mean, std)
    test = ImageDataset(torch.from_numpy(test_images), torch.from_numpy(test_labels), classes, name, source, mean, std)
    split = {"method": "official", "train_parts": [dict(p) for p in entry.train_parts], "test_parts": [dict(p) for p in entry.test_parts]}
    return Target(name, train, test, split, conversions)


# ---------------------------------------------------------------- registry

TargetLoader = Callable[..., Target]

TARGETS: dict[str, TargetLoader] = {
    "digits": lambda root, image_size, test_fraction, seed: load_digits_target(test_fraction=test_fraction, seed=seed),
    "fashion-mnist-subset": lambda root, image_size, test_fraction, seed: _load_official_splits("fashion-mnist-subset", None),
    "fashion-mnist": lambda root, image_size, test_fraction, seed: _load_official_splits("fashion-mnist", root),
    # seal_train reads the python pickles in the folders torchvision's CIFAR10 and CIFAR100 write.
    "cifar10": lambda root, image_size, test_fraction, seed: _load_official_splits("cifar10", root),
    "cifar100": lambda root, image_size, test_fraction, seed: _load_official_splits("cifar100", root),
    "imagefolder": lambda root, image_size, test_fraction, seed: load_image_folder_target(
        root, image_size=image_size, test_fraction=test_fraction, seed=seed
    ),
    **{
        name: (lambda root, image_size, test_fraction, seed, name=name: load_torchvision_target(name, root, image_size=image_size))
        for name in TORCHVISION_TARGETS
    },
}


def available_targets() -> list[str]:
    return list(TARGETS)


def validate_target(target: Target) -> None:
    """Raise TargetError unless both splits are non-empty and the train split has two or more classes."""
    for split_name, dataset in (("train", target.train), ("test", target.test)):
        if len(dataset) == 0:
            raise TargetError(f"target {target.name!r} has an empty {split_name} split; check its files")

    present = torch.unique(target.train.labels).tolist()
    if len(present) < 2:
        only = target.train.classes[present[0]] if present and present[0] < len(target.train.classes) else present
        raise TargetError(
            f"target {target.name!r} has a single class ({only!r}) in its train split; "
            "a probe needs two or more classes, so add class folders or pick another target"
        )


def load_target(
    name: str,
    *,
    root: str | Path | None = None,
    image_size: tuple[int, int] | None = None,
    test_fraction: float = DEFAULT_TEST_FRACTION,
    seed: int = 0,
) -> Target:
    """Load a named target from local files; nothing is downloaded.

    root is the folder the target reads (unused by digits and fashion-mnist-subset).
    image_size (height, width) is the size at which images of differing sizes are decoded.
    test_fraction and seed make the stratified test split of a target that has no official one.
    """
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}")

    target = TARGETS[name](root, image_size, test_fraction, seed)
    validate_target(target)
    log.info(
        "target %s: %d train and %d test images of %d classes, shape %s",
        name, len(target.train), len(target.test), target.train.num_classes, tuple(target.train.images.shape[1:]),
    )
    return target
