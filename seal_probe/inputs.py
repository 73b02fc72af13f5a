"""Probe data: a reproducible class-balanced subset of a dataset split, prepared for the audited model."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from seal_train.data import DatasetError, ImageDataset, InputSpec, load_dataset, prepare_images

log = logging.getLogger(__name__)


@dataclass
class ProbeData:
    """Model-ready images of a dataset split, their labels, and where they came from.

    indices are positions in the split, in ascending order; images[i] is example indices[i].
    record contains plain JSON types only.
    """

    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor
    classes: list[str]
    record: dict[str, Any]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def load_probe_data(
    dataset: str | ImageDataset,
    *,
    spec: InputSpec,
    root: str | Path | None = None,
    split: str = "train",
    subset_size: int | None = None,
    seed: int = 0,
    convert_channels: bool = False,
    resize: bool = False,
    image_size: tuple[int, int] | None = None,
) -> ProbeData:
    """Load a dataset split with seal_train.data, take a subset and convert it to model inputs.

    dataset is a name from seal_train.data.DATASETS, read from root, or a dataset already in
    memory (then root and image_size must be None). With subset_size=None every example of the
    split is used. Otherwise balanced_subset draws the subset: a pure function of the labels,
    subset_size and seed.

    Images are normalised with spec.mean and spec.std. A channel conversion or a resize
    happens only when convert_channels or resize is set, and record["conversions"] names each
    one that was applied.
    """
    data = _load_split(dataset, root=root, split=split, image_size=image_size)
    if len(data) == 0:
        raise DatasetError(f"dataset {data.name!r} split {split!r} is empty; pass a split that contains images")

    if subset_size is None:
        indices = np.arange(len(data), dtype=np.int64)
    else:
        indices = balanced_subset(data.labels, subset_size, seed=seed)
    subset = data.subset(indices)

    try:
        images, conversions = prepare_images(subset.images, spec, convert_channels=convert_channels, resize=resize)
    except DatasetError as error:
        raise DatasetError(f"dataset {data.name!r}: {error}") from error
    for conversion in conversions:
        log.info("probe data %s %s: applied %s", data.name, split, conversion)

    record = {
        "dataset": data.name,
        "root": str(root) if root is not None else data.source,
        "split": split,
        "split_size": len(data),
        "fingerprint": data.fingerprint(),
        "subset_size": len(indices),
        "subset_fingerprint": subset.fingerprint(),
        "seed": seed if subset_size is not None else None,
        "class_counts": np.bincount(subset.labels.numpy(), minlength=data.num_classes).tolist(),
        "conversions": list(conversions),
        "input_spec": spec.to_dict(),
    }
    return ProbeData(images=images, labels=subset.labels.clone(), indices=torch.from_numpy(indices), classes=list(data.classes), record=record)


def _load_split(dataset: str | ImageDataset, *, root: str | Path | None, split: str, image_size: tuple[int, int] | None) -> ImageDataset:
    if isinstance(dataset, ImageDataset):
        if root is not None or image_size is not None:
            raise DatasetError(f"dataset {dataset.name!r} is already loaded, so root and image_size do not apply; pass None")
        return dataset
    return load_dataset(dataset, root=root, split=split, image_size=image_size)


def balanced_subset(labels: torch.Tensor, subset_size: int, *, seed: int) -> np.ndarray:
    """Draw subset_size example indices with class counts as equal as the split allows.

    Each class present in labels gets subset_size // C examples (C classes present). The
    remaining subset_size % C go one each to classes drawn with the seed. A class with too few
    examples contributes all it has, and the shortfall is spread over the other classes the
    same way. Within each class the examples are a uniform draw without replacement.
    The result is sorted and depends only on labels, subset_size and seed.
    """
    total = len(labels)
    if total == 0:
        raise DatasetError("cannot draw a subset from an empty split; pass a split that contains images")
    if isinstance(subset_size, bool) or not isinstance(subset_size, (int, np.integer)) or subset_size < 1:
        raise DatasetError(f"subset size must be an integer >= 1, got {subset_size!r}")
    if subset_size > total:
        raise DatasetError(f"subset size {subset_size} is larger than the split ({total} examples); pass at most {total}")

    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    classes, counts = np.unique(labels_np, return_counts=True)
    if subset_size < len(classes):
        log.warning(
            "a subset of %d examples cannot contain all %d classes, so %d classes have no example; "
            "pass a subset size of at least %d for k-NN probes that can predict every class",
            subset_size, len(classes), len(classes) - subset_size, len(classes),
        )
    quotas = _class_quotas(counts, int(subset_size), rng)

    chosen = []
    for label, quota in zip(classes, quotas):
        members = np.flatnonzero(labels_np == label)
        chosen.append(rng.choice(members, size=quota, replace=False))
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def _class_quotas(counts: np.ndarray, subset_size: int, rng: np.random.Generator) -> np.ndarray:
    """Split subset_size over classes as evenly as their counts allow (water-filling)."""
    quotas = np.zeros(len(counts), dtype=np.int64)
    order = rng.permutation(len(counts))
    remaining = subset_size

    while remaining > 0:
        open_classes = [c for c in order if quotas[c] < counts[c]]
        share = remaining // len(open_classes)
        if share == 0:
            for c in open_classes[:remaining]:
                quotas[c] += 1
            break
        for c in open_classes:
            added = min(share, counts[c] - quotas[c])
            quotas[c] += added
            remaining -= added
    return quotas


def check_class_count(model_num_classes: int, dataset: ImageDataset | ProbeData) -> None:
    """Raise DatasetError unless the labels of dataset can index the model's classes.

    This applies where labels are read as the model's own class indices (the training loss
    for the Hessian, accuracy), which holds only for the dataset the model was trained on.
    """
    name = dataset.record["dataset"] if isinstance(dataset, ProbeData) else dataset.name
    dataset_classes = len(dataset.classes)
    if dataset_classes != model_num_classes:
        raise DatasetError(
            f"the model has {model_num_classes} classes but dataset {name!r} has {dataset_classes}; "
            "probe with the dataset the model was trained on, or use the transfer probe for another dataset"
        )

    labels = dataset.labels
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= model_num_classes):
        raise DatasetError(
            f"dataset {name!r} has labels from {int(labels.min())} to {int(labels.max())}, outside the model's "
            f"classes 0..{model_num_classes - 1}; check the dataset files"
        )
