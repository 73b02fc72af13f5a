"""Image datasets decoded once into memory, reproducible splits, and a tensor batch loader."""

from __future__ import annotations

import gzip
import hashlib
import logging
import pickle
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Per-channel statistics of the Fashion-MNIST training split, pixels scaled to [0, 1].
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
# Debian's dataset-fashion-mnist package installs the idx files here.
DEFAULT_FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
EMBEDDED_FILE = "fashion_mnist_subset.npz"


class DatasetError(ValueError):
    """A dataset is missing, in the wrong layout, or inconsistent with a request."""


@dataclass(frozen=True)
class InputSpec:
    """Input format of a model: channel count, spatial size and the normalisation of [0, 1] pixels."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        return {**asdict(self), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(
            channels=int(data["channels"]),
            height=int(data["height"]),
            width=int(data["width"]),
            mean=tuple(float(m) for m in data["mean"]),
            std=tuple(float(s) for s in data["std"]),
        )


@dataclass
class ImageDataset:
    """Images as one uint8 tensor (N, C, H, W) with int64 labels, decoded once."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    name: str
    source: str
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DatasetError(f"images must be a uint8 tensor (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if len(self.images) != len(self.labels):
            raise DatasetError(f"{len(self.images)} images but {len(self.labels)} labels in dataset {self.name!r}")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_spec(self) -> InputSpec:
        _, channels, height, width = self.images.shape
        return InputSpec(channels, height, width, self.mean, self.std)

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> "ImageDataset":
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageDataset(self.images[index], self.labels[index], self.classes, self.name, self.source, self.mean, self.std)

    def fingerprint(self) -> str:
        """Return a short SHA-256 of the images and labels, to tell two datasets apart in records."""
        digest = hashlib.sha256()
        digest.update(self.images.numpy().tobytes())
        digest.update(self.labels.numpy().astype(np.int64).tobytes())
        return digest.hexdigest()[:16]


# ---------------------------------------------------------------- readers


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (the MNIST container format), gzip-compressed or plain, as uint8."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DatasetError(f"cannot read idx file {path}: {error}; re-extract the dataset") from error
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path} is not a uint8 idx file (bad magic number); pass the folder with the original *-ubyte files")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise DatasetError(f"{path} contains {len(data)} bytes but its header declares {expected}; the file is truncated, extract it again")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem, root / stem.replace("-idx", ".idx")):
        if candidate.is_file():
            return candidate
    raise DatasetError(
        f"missing {stem}[.gz] in {root}; pass --data-root with the Fashion-MNIST idx files "
        "(Debian: apt-get install dataset-fashion-mnist)"
    )


def load_embedded(split: str) -> ImageDataset:
    """Load the Fashion-MNIST subset committed with the package (1,000 train / 200 test images per class)."""
    with resources.as_file(resources.files("seal_train.assets") / EMBEDDED_FILE) as path:
        with np.load(path) as archive:
            images = archive[f"{split}_images"]
            labels = archive[f"{split}_labels"]
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
        "fashion-mnist-subset",
        "embedded",
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
    )


def load_fashion_mnist(root: Path | None, split: str) -> ImageDataset:
    """Load full Fashion-MNIST from its idx files (default: Debian's package folder)."""
    root = Path(root) if root else DEFAULT_FASHION_MNIST_ROOT
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_find_idx(root, f"{prefix}-images-idx3-ubyte"))
    labels = read_idx(_find_idx(root, f"{prefix}-labels-idx1-ubyte"))
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        list(FASHION_MNIST_CLASSES),
        "fashion-mnist",
        str(root),
        FASHION_MNIST_MEAN,
        FASHION_MNIST_STD,
    )


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickle the CIFAR batch files, which hold only dicts, lists, bytes and numpy arrays."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a CIFAR batch file")


def _read_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"missing CIFAR batch file {path}; pass --data-root with the extracted python version of the dataset")
    with open(path, "rb") as handle:
        try:
            return _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        except (pickle.UnpicklingError, EOFError, ValueError) as error:
            raise DatasetError(f"{path} is not a CIFAR python batch file: {error}") from error


def _cifar_dir(root: Path, folder: str) -> Path:
    return root / folder if (root / folder).is_dir() else root


def load_cifar(root: Path | None, split: str, *, num_classes: int) -> ImageDataset:
    """Load CIFAR-10 or CIFAR-100 from the python pickles (cifar-10-batches-py, cifar-100-python)."""
    if root is None:
        raise DatasetError(f"cifar{num_classes} needs --data-root pointing at the extracted python version")
    root = Path(root)
    if num_classes == 10:
        folder = _cifar_dir(root, "cifar-10-batches-py")
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        meta = _read_cifar_pickle(folder / "batches.meta")
        classes = [name.decode() for name in meta[b"label_names"]]
        label_key, mean, std = b"labels", CIFAR10_MEAN, CIFAR10_STD
    else:
        folder = _cifar_dir(root, "cifar-100-python")
        files = ["train" if split == "train" else "test"]
        meta = _read_cifar_pickle(folder / "meta")
        classes = [name.decode() for name in meta[b"fine_label_names"]]
        label_key, mean, std = b"fine_labels", CIFAR100_MEAN, CIFAR100_STD

    batches = [_read_cifar_pickle(folder / name) for name in files]
    images = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key], dtype=np.int64) for b in batches])
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, f"cifar{num_classes}", str(folder), mean, std)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def _decode_images(paths: list[Path], *, mode: str, size: tuple[int, int] | None) -> np.ndarray:
    """Decode image files with PIL into one uint8 array (N, H, W, C); all sizes must agree unless size is set."""
    from PIL import Image, UnidentifiedImageError

    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image = image.convert(mode)
                if size is not None and image.size != (size[1], size[0]):
                    image = image.resize((size[1], size[0]), Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as error:
            raise DatasetError(f"cannot decode image {path}: {error}; remove or replace the file") from error
        if array.ndim == 2:
            array = array[:, :, None]
        if arrays and array.shape != arrays[0].shape:
            raise DatasetError(
                f"image {path} is {array.shape[1]}x{array.shape[0]}, earlier ones are "
                f"{arrays[0].shape[1]}x{arrays[0].shape[0]}; pass --image-size to resize all images"
            )
        arrays.append(array)
    return np.stack(arrays)


def load_image_folder(root: Path | None, *, size: tuple[int, int] | None, grayscale: bool = False, name: str = "imagefolder") -> ImageDataset:
    """Load an ImageFolder tree (root/<class>/<image>), classes sorted by folder name."""
    if root is None or not Path(root).is_dir():
        raise DatasetError(f"image folder {root} not found; pass --data-root with one sub-folder per class")
    root = Path(root)
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    paths, labels = [], []
    for label, class_name in enumerate(classes):
        files = sorted(p for p in (root / class_name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DatasetError(f"no images found under {root}; expected root/<class>/<image>.png|jpg")
    images = _decode_images(paths, mode="L" if grayscale else "RGB", size=size)
    mean = (0.5,) if grayscale else IMAGENET_MEAN
    std = (0.5,) if grayscale else IMAGENET_STD
    return ImageDataset(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.tensor(labels, dtype=torch.int64),
        classes, name, str(root), mean, std,
    )


def load_tiny_imagenet(root: Path | None, split: str, *, cache: bool = True) -> ImageDataset:
    """Load Tiny-ImageNet-200 in its official layout; split "test" reads the labelled validation split.

    The decoded arrays are cached as <root>/seal_cache_<split>.npz (about 1.2 GB for train), so the
    JPEGs are decoded once per machine rather than once per run.
    """
    if root is None:
        raise DatasetError("tiny-imagenet needs --data-root pointing at the tiny-imagenet-200 folder")
    root = Path(root)
    wnids_file = root / "wnids.txt"
    if not wnids_file.is_file():
        raise DatasetError(f"{wnids_file} not found; --data-root must be the tiny-imagenet-200 folder (wnids.txt, train/, val/)")
    wnids = wnids_file.read_text().split()
    class_index = {wnid: i for i, wnid in enumerate(wnids)}

    cache_file = root / f"seal_cache_{split}.npz"
    if cache and cache_file.is_file():
        with np.load(cache_file) as archive:
            images, labels = archive["images"], archive["labels"]
    else:
        if split == "train":
            paths, labels = [], []
            for wnid in wnids:
                folder = root / "train" / wnid / "images"
                if not folder.is_dir():
                    raise DatasetError(f"{folder} not found; the train split must be train/<wnid>/images/*.JPEG")
                files = sorted(folder.glob("*.JPEG"))
                paths += files
                labels += [class_index[wnid]] * len(files)
        else:
            annotations = root / "val" / "val_annotations.txt"
            if not annotations.is_file():
                raise DatasetError(f"{annotations} not found; the validation split must be val/images plus val/val_annotations.txt")
            paths, labels = [], []
            for line in annotations.read_text().splitlines():
                fields = line.split("\t")
                if len(fields) < 2:
                    continue
                paths.append(root / "val" / "images" / fields[0])
                labels.append(class_index[fields[1]])
        log.info("decoding %d Tiny-ImageNet %s images (once; cached in %s)", len(paths), split, cache_file)
        images = _decode_images(paths, mode="RGB", size=(64, 64))
        labels = np.asarray(labels, dtype=np.int64)
        if cache:
            _save_npz_atomic(cache_file, images=images, labels=labels)

    return ImageDataset(
        torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        torch.from_numpy(labels),
        wnids, "tiny-imagenet", str(root), IMAGENET_MEAN, IMAGENET_STD,
    )


def _save_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    temporary = path.with_name(path.name + ".partial.npz")
    try:
        np.savez(temporary, **arrays)
        temporary.replace(path)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        log.warning("could not write the dataset cache %s (%s); decoding again next time", path, error)


# ---------------------------------------------------------------- registry

DatasetLoader = Callable[..., ImageDataset]

DATASETS: dict[str, DatasetLoader] = {
    "fashion-mnist-subset": lambda root, split, **_: load_embedded(split),
    "fashion-mnist": lambda root, split, **_: load_fashion_mnist(root, split),
    "cifar10": lambda root, split, **_: load_cifar(root, split, num_classes=10),
    "cifar100": lambda root, split, **_: load_cifar(root, split, num_classes=100),
    "tiny-imagenet": lambda root, split, **_: load_tiny_imagenet(root, split),
    "imagefolder": lambda root, split, image_size=None, **_: load_image_folder(
        Path(root) / split if root and (Path(root) / split).is_dir() else root, size=image_size
    ),
}


def load_dataset(name: str, *, root: str | Path | None = None, split: str = "train", image_size: tuple[int, int] | None = None) -> ImageDataset:
    """Load a named dataset split ("train" or "test") from local files; nothing is downloaded.

    For "imagefolder", root/<split>/ is used when it exists, otherwise root itself.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise DatasetError(f"unknown split {split!r}; choose 'train' or 'test'")
    dataset = DATASETS[name](Path(root) if root else None, split, image_size=image_size)
    if len(dataset) == 0:
        raise DatasetError(f"dataset {name!r} split {split!r} at {root} is empty")
    return dataset


def stratified_split(labels: torch.Tensor, fraction: float, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (keep, held_out) with round(fraction * n_c) of each class c held out.

    The split is a pure function of the labels, the fraction and the seed, so it is reproduced
    exactly from what a run records.
    """
    if not 0.0 <= fraction < 1.0:
        raise DatasetError(f"validation fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    labels_np = labels.numpy()
    held_out = []
    for label in np.unique(labels_np):
        members = np.flatnonzero(labels_np == label)
        count = int(round(fraction * len(members)))
        held_out.append(rng.permutation(members)[:count])
    held = np.sort(np.concatenate(held_out)) if held_out else np.array([], dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(labels_np)), held)
    return keep, held


# ---------------------------------------------------------------- tensors and batches


def to_float(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Scale uint8 images to [0, 1] and normalise each channel: (x / 255 - mean) / std."""
    x = images.float().div_(255.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x.sub_(mean_t).div_(std_t)


def prepare_images(
    images: torch.Tensor,
    spec: InputSpec,
    *,
    convert_channels: bool = False,
    resize: bool = False,
) -> tuple[torch.Tensor, list[str]]:
    """Turn uint8 images (N, C, H, W) into float model inputs that match spec.

    Channel conversion (grayscale to RGB by repetition, RGB to grayscale by ITU-R 601 luma) and
    bilinear resizing change the data, so each is done only when requested; the returned list
    names every conversion that was applied, for the record.
    """
    applied: list[str] = []
    channels = images.shape[1]
    if channels != spec.channels:
        if not convert_channels:
            raise DatasetError(
                f"the data has {channels} channel(s), the model expects {spec.channels}; "
                "pass --convert-channels to convert them"
            )
        if channels == 1 and spec.channels == 3:
            images = images.expand(-1, 3, -1, -1)
            applied.append("grayscale to RGB (channel repeated)")
        elif channels == 3 and spec.channels == 1:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
            applied.append("RGB to grayscale (ITU-R 601 luma)")
        else:
            raise DatasetError(f"cannot convert {channels} channels to {spec.channels}")

    x = to_float(images, spec.mean, spec.std)
    if tuple(x.shape[-2:]) != (spec.height, spec.width):
        if not resize:
            raise DatasetError(
                f"the data is {x.shape[-2]}x{x.shape[-1]}, the model expects {spec.height}x{spec.width}; "
                "pass --resize to resize it"
            )
        applied.append(f"bilinear resize {x.shape[-2]}x{x.shape[-1]} to {spec.height}x{spec.width}")
        x = F.interpolate(x, size=(spec.height, spec.width), mode="bilinear", align_corners=False, antialias=True)
    return x, applied


def random_crop_flip(batch: torch.Tensor, *, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Apply RandomCrop(size, padding) with zero padding and a horizontal flip with p = 0.5, per image.

    Works on a whole batch at once, so augmentation costs one gather instead of a Python loop.
    """
    n, _, height, width = batch.shape
    if padding > 0:
        padded = F.pad(batch, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), generator=generator).to(batch.device)
        rows = offsets[:, 0:1] + torch.arange(height, device=batch.device)
        cols = offsets[:, 1:2] + torch.arange(width, device=batch.device)
        index = torch.arange(n, device=batch.device)[:, None, None, None]
        channel = torch.arange(batch.shape[1], device=batch.device)[None, :, None, None]
        batch = padded[index, channel, rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        mask = (torch.rand(n, generator=generator) < 0.5).to(batch.device).view(n, 1, 1, 1)
        batch = torch.where(mask, batch.flip(-1), batch)
    return batch


class BatchLoader:
    """Iterate over (images, labels) batches of an in-memory dataset, on any device.

    The order of epoch e is a permutation drawn from seed and e alone, and the augmentation of
    batch i from seed, e and i, so a run resumed at any batch sees exactly the data it would have
    seen. With world_size > 1 each rank takes every world_size-th example of the shuffled order,
    as torch's DistributedSampler does, padded by wrapping around so all ranks have equal length.
    """

    def __init__(
        self,
        dataset: ImageDataset,
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool = False,
        crop_padding: int = 4,
        flip: bool = True,
        seed: int = 0,
        device: torch.device | str = "cpu",
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        spec: InputSpec | None = None,
    ) -> None:
        if batch_size < 1:
            raise DatasetError(f"batch size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.crop_padding = crop_padding
        self.flip = flip
        self.seed = seed
        self.device = torch.device(device)
        self.drop_last = drop_last
        self.rank = rank
        self.world_size = world_size
        self.spec = spec or dataset.input_spec
        self.epoch = 0
        self._images = dataset.images.to(self.device)
        self._labels = dataset.labels.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order and augmentation of this epoch (a global counter across generations)."""
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = -(-n // self.world_size)
            order = torch.cat([order, order[: per_rank * self.world_size - n]])
            order = order[self.rank :: self.world_size]
        return order

    def __len__(self) -> int:
        n = len(self._order())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield the batches of the current epoch from batch index start on."""
        order = self._order().to(self.device)
        for i in range(start, len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            images = self._images[index]
            if self.augment:
                # Crop the uint8 images, so padding is black as in torchvision's RandomCrop on PIL images.
                generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 100_003 + i)
                images = random_crop_flip(images, padding=self.crop_padding, flip=self.flip, generator=generator)
            yield to_float(images, self.spec.mean, self.spec.std), self._labels[index]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.batches()
