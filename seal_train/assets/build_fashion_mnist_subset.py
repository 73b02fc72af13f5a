"""Build the embedded Fashion-MNIST subset from the official idx files."""

import argparse
import gzip
import hashlib
from pathlib import Path

import numpy as np

TRAIN_PER_CLASS = 1000
TEST_PER_CLASS = 200
SEED = 0


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (gzip-compressed or plain) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """Draw per_class indices of every class without replacement, sorted."""
    chosen = [rng.choice(np.flatnonzero(labels == c), per_class, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(chosen))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("fashion_mnist_subset.npz"))
    args = parser.parse_args()

    rng = np.random.default_rng(SEED)
    arrays = {}
    digests = []
    for split, prefix, per_class in (("train", "train", TRAIN_PER_CLASS), ("test", "t10k", TEST_PER_CLASS)):
        image_file = args.source / f"{prefix}-images-idx3-ubyte.gz"
        label_file = args.source / f"{prefix}-labels-idx1-ubyte.gz"
        images, labels = read_idx(image_file), read_idx(label_file)
        keep = balanced_indices(labels, per_class, rng)
        arrays[f"{split}_images"] = images[keep]
        arrays[f"{split}_labels"] = labels[keep]
        arrays[f"{split}_source_indices"] = keep.astype(np.int32)
        for path in (image_file, label_file):
            digests.append(f"{path.name} sha256={hashlib.sha256(path.read_bytes()).hexdigest()}")

    arrays["provenance"] = np.array(
        f"Fashion-MNIST (Zalando SE, 2017, MIT licence), class-balanced subset: "
        f"{TRAIN_PER_CLASS} train and {TEST_PER_CLASS} test images per class, numpy seed {SEED}. "
        + "; ".join(digests)
    )
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
