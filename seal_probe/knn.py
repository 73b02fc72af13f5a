"""Exact k-nearest-neighbour probes with FAISS: search, self-match exclusion and scikit-learn's majority vote."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Sequence

import faiss
import numpy as np
import torch

log = logging.getLogger(__name__)

DISTANCES = ("euclidean", "cosine")
TIE_RULE = (
    "majority vote with uniform weights; a tied vote goes to the smallest class label, "
    "as in scikit-learn's KNeighborsClassifier(algorithm='brute', weights='uniform')"
)
NEIGHBOUR_ORDER = "neighbours at equal distance are ranked as FAISS returns them (not guaranteed to match scikit-learn)"
# Rows read at a time: support vectors copied into the search array, and queries per faiss call.
DEFAULT_CHUNK_SIZE = 8192
# faiss-gpu's k-selection handles at most GPU_MAX_SELECTION_K neighbours: 2048 in CUDA builds of
# current releases, 1024 in older ones, where faiss raises its own error above 1024.
GPU_MAX_K = 2048


class KnnError(ValueError):
    """An invalid k, distance, label array or self-match index."""


def faiss_has_gpu() -> bool:
    """Return whether the installed faiss was built with GPU support and detects a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def default_thread_count() -> int:
    """Return torch's intra-op thread count, which follows OMP_NUM_THREADS and the cores available."""
    return max(1, torch.get_num_threads())


@contextlib.contextmanager
def faiss_threads(count: int | None) -> Iterator[int]:
    """Set faiss's OpenMP thread count for the duration of the context and restore the previous count."""
    previous = faiss.omp_get_max_threads()
    count = default_thread_count() if count is None else count
    if count < 1:
        raise KnnError(f"the faiss thread count must be >= 1, got {count}")
    faiss.omp_set_num_threads(count)
    try:
        yield count
    finally:
        faiss.omp_set_num_threads(previous)


def validate_k(k: int, support_size: int, *, exclude_self: bool = False) -> None:
    """Raise KnnError unless k neighbours exist for every query.

    With exclude_self a query that sits in the support set loses its own entry, so the
    support set needs at least k + 1 examples.
    """
    if k < 1:
        raise KnnError(f"k must be >= 1, got {k}")
    needed = k + 1 if exclude_self else k
    if needed > support_size:
        if exclude_self:
            raise KnnError(
                f"k={k} needs at least {needed} support examples when each query's own entry is excluded, "
                f"but the support set has {support_size}; lower k (--k) or enlarge the support set (--support-size)"
            )
        raise KnnError(
            f"k={k} is larger than the support set ({support_size} examples); "
            "lower k (--k) or enlarge the support set (--support-size)"
        )


def _as_rows(chunk: Any, *, normalise: bool) -> np.ndarray:
    rows = np.ascontiguousarray(chunk, dtype=np.float32)
    if rows.ndim != 2:
        raise KnnError(f"embeddings must be a 2-D array (examples, features), got shape {rows.shape}")
    if not np.isfinite(rows).all():
        raise KnnError("embeddings contain NaN or infinite values; check the model's weights and inputs")
    if normalise:
        norms = np.linalg.norm(rows, axis=1, keepdims=True)
        rows = np.divide(rows, norms, out=np.zeros_like(rows), where=norms > 0)
    return rows


class FlatIndex:
    """Exact FAISS search over a fixed support set, by squared Euclidean distance or by cosine similarity.

    On the CPU the support vectors are read once into one float32 array, and each query chunk
    runs faiss.knn on it. That function calls the brute-force kernels behind IndexFlatL2 and
    IndexFlatIP (knn_L2sqr, knn_inner_product) but skips the index's own copy of the support set.
    On the GPU (use_gpu=True, or None when faiss_has_gpu()) the vectors go into a GPU flat index.
    Cosine similarity is the inner product of L2-normalised vectors. A zero vector stays zero,
    so its similarity to everything is 0.
    """

    def __init__(
        self,
        vectors: Any,
        *,
        distance: str = "euclidean",
        use_gpu: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        if distance not in DISTANCES:
            raise KnnError(f"unknown distance {distance!r}; choose one of: {', '.join(DISTANCES)}")
        if chunk_size < 1:
            raise KnnError(f"chunk_size must be >= 1, got {chunk_size}")
        self.distance = distance
        self.metric = faiss.METRIC_INNER_PRODUCT if distance == "cosine" else faiss.METRIC_L2
        self.use_gpu = faiss_has_gpu() if use_gpu is None else use_gpu
        if self.use_gpu and not faiss_has_gpu():
            raise KnnError("use_gpu=True, but the installed faiss has no GPU support or detects no GPU; install faiss-gpu or pass use_gpu=None")

        self.size = len(vectors)
        first = _as_rows(vectors[:1], normalise=False)
        self.dim = first.shape[1]
        if self.size < 1 or self.dim < 1:
            raise KnnError(f"the support set must have at least one example and one feature, got shape ({self.size}, {self.dim})")

        if self.use_gpu:
            # NOTE: the GPU path follows faiss-gpu's documented API but has not run in CI, which has no GPU.
            self._resources = faiss.StandardGpuResources()
            flat = faiss.IndexFlatIP(self.dim) if distance == "cosine" else faiss.IndexFlatL2(self.dim)
            self._index = faiss.index_cpu_to_gpu(self._resources, 0, flat)
        else:
            self._vectors = np.empty((self.size, self.dim), dtype=np.float32)

        for start in range(0, self.size, chunk_size):
            rows = _as_rows(vectors[start : start + chunk_size], normalise=distance == "cosine")
            if rows.shape[1] != self.dim:
                raise KnnError(f"support vectors have {rows.shape[1]} features from row {start} on but {self.dim} before; give every row the same length")
            if self.use_gpu:
                self._index.add(rows)
            else:
                self._vectors[start : start + len(rows)] = rows

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Return (scores, indices) of the k nearest support vectors, nearest first.

        Scores are squared Euclidean distances for "euclidean" and cosine similarities for "cosine".
        """
        if self.use_gpu and k > GPU_MAX_K:
            raise KnnError(f"faiss-gpu searches at most {GPU_MAX_K} neighbours, k={k} were requested; lower k or pass use_gpu=False")
        rows = _as_rows(queries, normalise=self.distance == "cosine")
        if rows.shape[1] != self.dim:
            raise KnnError(f"queries have {rows.shape[1]} features but the support vectors have {self.dim}; embed both with the same layer and reduction")
        if self.use_gpu:
            scores, indices = self._index.search(rows, k)
        else:
            scores, indices = faiss.knn(rows, self._vectors, k, metric=self.metric)
        return scores, indices.astype(np.int64)


def drop_self_matches(indices: np.ndarray, self_indices: np.ndarray, k: int) -> np.ndarray:
    """Keep k neighbours per query from a search for k + 1, dropping the query's own support entry.

    Exclusion is by index identity. A duplicate of the query at distance 0 stays a neighbour.
    When the query's own index is not among the k + 1 found, because exact duplicates filled
    those places, the last of them is dropped instead. A self index of -1 marks a query that
    is not in the support set.
    """
    if indices.shape[1] != k + 1:
        raise KnnError(f"expected a search for k + 1 = {k + 1} neighbours, got {indices.shape[1]} per query")
    is_self = (indices == self_indices[:, None]) & (self_indices[:, None] >= 0)
    keep = ~is_self
    keep[~is_self.any(axis=1), k] = False
    return indices[keep].reshape(len(indices), k)


def majority_vote(neighbour_classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Return the most frequent class per row of encoded classes (0..num_classes-1); ties go to the smallest class."""
    rows, k = neighbour_classes.shape
    offsets = np.arange(rows, dtype=np.int64)[:, None] * num_classes
    counts = np.bincount((neighbour_classes + offsets).ravel(), minlength=rows * num_classes).reshape(rows, num_classes)
    # np.argmax returns the first maximum, which is the smallest class among the tied majority.
    return np.argmax(counts, axis=1)


def _self_index_array(exclude_indices: Sequence[int] | np.ndarray | None, num_queries: int, support_size: int) -> np.ndarray | None:
    if exclude_indices is None:
        return None
    self_indices = np.asarray(exclude_indices, dtype=np.int64)
    if self_indices.shape != (num_queries,):
        raise KnnError(f"exclude_indices needs one support index (or -1) per query: {num_queries} values, got shape {self_indices.shape}")
    invalid = (self_indices < -1) | (self_indices >= support_size)
    if invalid.any():
        bad = int(self_indices[np.flatnonzero(invalid)[0]])
        raise KnnError(f"exclude_indices contains {bad}, outside the support set of {support_size}; use -1 for a query not in the support set")
    return self_indices if (self_indices >= 0).any() else None


class KnnClassifier:
    """A k-NN probe: exact FAISS search over a support set and a majority vote with scikit-learn's tie rule.

    Labels may be any integers; they are encoded in sorted order, so "smallest encoded class"
    equals "smallest label", as in scikit-learn's classes_.
    """

    def __init__(
        self,
        support: Any,
        support_labels: Sequence[int] | np.ndarray,
        *,
        k: int = 30,
        distance: str = "euclidean",
        use_gpu: bool | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        threads: int | None = None,
    ) -> None:
        labels = np.asarray(support_labels)
        if labels.ndim != 1 or len(labels) != len(support):
            raise KnnError(f"support_labels needs one label per support example: {len(support)}, got shape {labels.shape}")
        if not np.issubdtype(labels.dtype, np.integer):
            raise KnnError(f"support_labels must be integers, got {labels.dtype}")
        validate_k(k, len(support))

        self.k = k
        self.distance = distance
        self.chunk_size = chunk_size
        self.classes, self._encoded = np.unique(labels, return_inverse=True)
        self._threads = threads
        self.index = FlatIndex(support, distance=distance, use_gpu=use_gpu, chunk_size=chunk_size)
        log.debug(
            "k-NN probe: %d support vectors of %d features, %d classes, k=%d, %s distance, on the %s",
            self.index.size, self.index.dim, len(self.classes), k, distance, "GPU" if self.index.use_gpu else "CPU",
        )

    def kneighbors(self, queries: Any, *, exclude_indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Return the support indices (num_queries, k) of each query's k nearest neighbours, nearest first.

        exclude_indices gives each query's own index in the support set, or -1 for a query
        outside it. That entry is never the query's neighbour (see drop_self_matches).
        """
        self_indices = _self_index_array(exclude_indices, len(queries), self.index.size)
        if self_indices is not None:
            validate_k(self.k, self.index.size, exclude_self=True)

        blocks = []
        with faiss_threads(self._threads):
            for start in range(0, len(queries), self.chunk_size):
                chunk = queries[start : start + self.chunk_size]
                if self_indices is None:
                    _, indices = self.index.search(chunk, self.k)
                else:
                    _, indices = self.index.search(chunk, self.k + 1)
                    indices = drop_self_matches(indices, self_indices[start : start + len(indices)], self.k)
                blocks.append(indices)
        return np.concatenate(blocks) if blocks else np.empty((0, self.k), dtype=np.int64)

    def predict(self, queries: Any, *, exclude_indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Return the majority-vote label of each query's k nearest support examples (TIE_RULE)."""
        neighbours = self.kneighbors(queries, exclude_indices=exclude_indices)
        encoded = majority_vote(self._encoded[neighbours], len(self.classes))
        return self.classes[encoded]


def knn_predict(
    support: Any,
    support_labels: Sequence[int] | np.ndarray,
    queries: Any,
    *,
    k: int = 30,
    distance: str = "euclidean",
    exclude_indices: Sequence[int] | np.ndarray | None = None,
    use_gpu: bool | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    threads: int | None = None,
) -> np.ndarray:
    """Fit a KnnClassifier on the support set and return its predictions for the queries."""
    probe = KnnClassifier(support, support_labels, k=k, distance=distance, use_gpu=use_gpu, chunk_size=chunk_size, threads=threads)
    return probe.predict(queries, exclude_indices=exclude_indices)
