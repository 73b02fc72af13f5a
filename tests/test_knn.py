"""Tests of the FAISS k-NN probe against scikit-learn's brute-force KNeighborsClassifier."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from seal_probe.knn import KnnClassifier, KnnError, drop_self_matches, faiss_threads, knn_predict, majority_vote


def embeddings(seed: int, rows: int, dim: int = 6) -> np.ndarray:
    """Continuous random vectors, so no two distances to a query are equal."""
    return np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)


def tied_votes(model: KNeighborsClassifier, queries: np.ndarray) -> int:
    """Count the queries whose two most frequent neighbour classes have equal votes."""
    probabilities = np.sort(model.predict_proba(queries), axis=1)
    return int((probabilities[:, -1] == probabilities[:, -2]).sum())


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_predictions_match_sklearn_with_ties(distance):
    support, queries = embeddings(0, 300), embeddings(1, 400)
    labels = np.random.default_rng(2).choice([2, 5, 9], size=300)
    reference = KNeighborsClassifier(n_neighbors=4, algorithm="brute", weights="uniform", metric=distance).fit(support, labels)
    assert tied_votes(reference, queries) > 50  # the case under test: many tied votes
    predictions = knn_predict(support, labels, queries, k=4, distance=distance)
    np.testing.assert_array_equal(predictions, reference.predict(queries))


def test_neighbours_match_sklearn():
    support, queries = embeddings(3, 200), embeddings(4, 50)
    reference = KNeighborsClassifier(n_neighbors=7, algorithm="brute").fit(support, np.zeros(200, dtype=int))
    probe = KnnClassifier(support, np.zeros(200, dtype=int), k=7)
    np.testing.assert_array_equal(probe.kneighbors(queries), reference.kneighbors(queries, return_distance=False))


def test_strided_float64_input_matches_sklearn():
    support, queries = embeddings(5, 150, dim=12).astype(np.float64)[:, ::2], embeddings(6, 60, dim=12).astype(np.float64)[:, ::2]
    labels = np.random.default_rng(7).integers(0, 4, size=150)
    reference = KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(support, labels)
    np.testing.assert_array_equal(knn_predict(support, labels, queries, k=5, chunk_size=17), reference.predict(queries))


def test_self_exclusion_matches_sklearn_without_point():
    support = embeddings(8, 120)
    labels = np.random.default_rng(9).integers(0, 3, size=120)
    chosen = np.arange(0, 120, 6)
    predictions = knn_predict(support, labels, support[chosen], k=6, exclude_indices=chosen)
    for position, index in enumerate(chosen):
        without = np.delete(np.arange(120), index)
        reference = KNeighborsClassifier(n_neighbors=6, algorithm="brute").fit(support[without], labels[without])
        assert predictions[position] == reference.predict(support[index : index + 1])[0], f"support example {index}"


def test_self_exclusion_mixed_queries():
    support, outside = embeddings(10, 80), embeddings(11, 5)
    labels = np.random.default_rng(12).integers(0, 3, size=80)
    queries = np.concatenate([support[:5], outside])
    exclude = np.array([0, 1, 2, 3, 4, -1, -1, -1, -1, -1])
    predictions = knn_predict(support, labels, queries, k=5, exclude_indices=exclude)
    reference = KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(support, labels)
    np.testing.assert_array_equal(predictions[5:], reference.predict(outside))
    for index in range(5):
        without = np.delete(np.arange(80), index)
        leave_one_out = KNeighborsClassifier(n_neighbors=5, algorithm="brute").fit(support[without], labels[without])
        assert predictions[index] == leave_one_out.predict(support[index : index + 1])[0], f"support example {index}"


def test_duplicate_of_query_stays_neighbour():
    support = embeddings(13, 50)
    support[7] = support[3]
    probe = KnnClassifier(support, np.zeros(50, dtype=int), k=3)
    neighbours = probe.kneighbors(support[3:4], exclude_indices=[3])[0]
    assert neighbours[0] == 7
    assert 3 not in neighbours


def test_duplicates_filling_search_drop_last():
    # Six copies of one vector: a search for k + 1 = 4 may not return the query's own index.
    support = np.concatenate([np.ones((6, 4), dtype=np.float32), embeddings(14, 30, dim=4) + 5])
    labels = np.array([1] * 6 + [0] * 30)
    probe = KnnClassifier(support, labels, k=3)
    for index in range(6):
        neighbours = probe.kneighbors(support[index : index + 1], exclude_indices=[index])[0]
        assert index not in neighbours, f"copy {index}"
        assert set(neighbours) <= set(range(6)) - {index}, f"copy {index}"


def test_drop_self_matches_by_hand():
    indices = np.array([[3, 1, 2], [0, 4, 5], [8, 9, 7]])
    kept = drop_self_matches(indices, np.array([1, 9, -1]), k=2)
    np.testing.assert_array_equal(kept, [[3, 2], [0, 4], [8, 9]])


def test_majority_vote_ties_by_hand():
    votes = np.array([[2, 1, 1, 2], [0, 3, 3, 0], [4, 4, 4, 1], [3, 2, 1, 0]])
    np.testing.assert_array_equal(majority_vote(votes, 5), [1, 0, 4, 0])


def test_k_larger_than_support_rejected():
    with pytest.raises(KnnError, match=r"k=50 is larger than the support set \(30 examples\); lower k"):
        knn_predict(embeddings(15, 30), np.zeros(30, dtype=int), embeddings(16, 2), k=50)


def test_k_equal_support_with_self_rejected():
    support = embeddings(17, 10)
    with pytest.raises(KnnError, match="at least 11 support examples"):
        knn_predict(support, np.zeros(10, dtype=int), support[:2], k=10, exclude_indices=[0, 1])


def test_self_index_out_of_range_rejected():
    support = embeddings(18, 10)
    with pytest.raises(KnnError, match="contains 10"):
        knn_predict(support, np.zeros(10, dtype=int), support[:2], k=2, exclude_indices=[0, 10])


def test_unknown_distance_rejected():
    with pytest.raises(KnnError, match="manhattan"):
        knn_predict(embeddings(19, 10), np.zeros(10, dtype=int), embeddings(20, 2), k=2, distance="manhattan")


def test_faiss_threads_restored():
    before = faiss.omp_get_max_threads()
    with faiss_threads(before + 1) as count:
        assert count == before + 1
        assert faiss.omp_get_max_threads() == before + 1
    assert faiss.omp_get_max_threads() == before


def test_nan_embeddings_rejected():
    support = embeddings(21, 10)
    support[4, 2] = np.nan
    with pytest.raises(KnnError, match="NaN or infinite"):
        knn_predict(support, np.zeros(10, dtype=int), embeddings(22, 2), k=2)
