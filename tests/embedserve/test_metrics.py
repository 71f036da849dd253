"""Retrieval metrics on hand-made cases with known answers, and parity of the weighted kNN with
the training-time monitor (training/knn.py) on the same features."""

from __future__ import annotations

import math

import numpy as np
import pytest

from embedserve import metrics
from embedserve.evaluate import exact_search, l2_normalize


def test_weighted_knn_votes_are_exp_sim_over_t():
    sims = np.array([[0.9, 0.8, 0.1]])
    labels = np.array([[0, 1, 1]])
    # T=1: class 0 gets e^0.9 = 2.46, class 1 gets e^0.8 + e^0.1 = 3.33 -> class 1
    assert (
        metrics.weighted_knn_top1(sims, labels, np.array([1]), k=3, temperature=1.0, num_classes=2)
        == 1.0
    )
    # T=0.07 sharpens: e^(0.9/0.07) beats e^(0.8/0.07) + e^(0.1/0.07) -> class 0
    assert (
        metrics.weighted_knn_top1(sims, labels, np.array([0]), k=3, temperature=0.07, num_classes=2)
        == 1.0
    )
    # k=1: only the nearest votes
    assert (
        metrics.weighted_knn_top1(sims, labels, np.array([0]), k=1, temperature=1.0, num_classes=2)
        == 1.0
    )


def test_weighted_knn_averages_over_queries_and_clips_k():
    sims = np.array([[0.9, 0.5], [0.9, 0.5]])
    labels = np.array([[2, 0], [1, 1]])
    # k=200 is clipped to the 2 columns; query 0 votes class 2, query 1 votes class 1
    top1 = metrics.weighted_knn_top1(
        sims, labels, np.array([2, 0]), k=200, temperature=0.1, num_classes=3
    )
    assert top1 == 0.5


def test_weighted_knn_breaks_ties_towards_the_lowest_class_like_argmax():
    sims = np.array([[0.5, 0.5]])
    labels = np.array([[1, 0]])
    assert metrics.weighted_knn_top1(sims, labels, np.array([0]), 2, 0.1, 2) == 1.0


def test_recall_at_k_counts_queries_with_a_same_label_neighbour_in_the_top_k():
    labels = np.array([[1, 0, 0], [0, 0, 1], [2, 2, 2]])
    queries = np.array([0, 1, 1])
    assert metrics.recall_at_k(labels, queries, 1) == 0.0
    assert metrics.recall_at_k(labels, queries, 2) == pytest.approx(1 / 3)
    assert metrics.recall_at_k(labels, queries, 3) == pytest.approx(2 / 3)


def test_map_at_r_matches_the_papers_examples():
    # Musgrave et al.: R=10, the first 3 retrieved relevant, the rest not -> 3/10
    labels = np.array([[1, 1, 1] + [0] * 9])
    assert metrics.map_at_r(labels, np.array([1]), np.array([10])) == pytest.approx(0.3)
    # R=3, relevant at ranks 1 and 3: (1/1 + 2/3) / 3
    labels = np.array([[1, 0, 1, 1]])  # rank 4 is beyond R and does not count
    assert metrics.map_at_r(labels, np.array([1]), np.array([3])) == pytest.approx((1 + 2 / 3) / 3)
    # a perfect ranking gives 1; two queries with different R average
    labels = np.array([[0, 0, 1], [1, 0, 0]])
    value = metrics.map_at_r(labels, np.array([0, 1]), np.array([2, 1]))
    assert value == pytest.approx(1.0)


def test_map_at_r_refuses_too_few_neighbours():
    with pytest.raises(ValueError, match="needs 5 neighbours"):
        metrics.map_at_r(np.zeros((1, 3), int), np.array([0]), np.array([5]))


def test_relevant_counts_are_gallery_items_per_query_label():
    counts = metrics.relevant_counts(np.array([0, 0, 1, 2]), np.array([0, 1, 2, 0, 3]))
    assert counts.tolist() == [2, 1, 1, 2, 0]


def test_neighbour_recall_is_the_overlap_with_the_exact_top_k():
    approx = np.array([[1, 2, 3], [4, 5, -1]])
    exact = np.array([[3, 2, 9], [4, 5, 6]])
    assert metrics.neighbour_recall(approx, exact, 3) == pytest.approx((2 / 3 + 2 / 3) / 2)
    assert metrics.neighbour_recall(exact, exact, 3) == 1.0


def test_faiss_exact_search_equals_numpy_brute_force():
    rng = np.random.default_rng(0)
    gallery = l2_normalize(rng.normal(size=(500, 32)))
    queries = l2_normalize(rng.normal(size=(40, 32)))
    sims, ids = exact_search(gallery, queries, 15)
    reference = queries.astype(np.float64) @ gallery.T.astype(np.float64)  # QxN
    expected = np.argsort(-reference, axis=1)[:, :15]
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_allclose(sims, np.take_along_axis(reference, expected, 1), atol=1e-5)


def test_weighted_knn_gives_the_training_monitors_number():
    torch = pytest.importorskip("torch")
    from training.knn import knn_accuracy

    rng = np.random.default_rng(1)
    centres = rng.normal(size=(5, 16))
    bank_labels = rng.integers(0, 5, 600)
    query_labels = rng.integers(0, 5, 200)
    bank = l2_normalize(centres[bank_labels] + rng.normal(scale=1.5, size=(600, 16)))
    queries = l2_normalize(centres[query_labels] + rng.normal(scale=1.5, size=(200, 16)))
    for temperature in (0.07, 0.1):
        reference = knn_accuracy(
            torch.from_numpy(queries),
            torch.from_numpy(query_labels),
            torch.from_numpy(bank),
            torch.from_numpy(bank_labels),
            ks=(20, 200),
            temperature=temperature,
        )
        sims, ids = exact_search(bank, queries, 200)
        for k in (20, 200):
            ours = metrics.weighted_knn_top1(
                sims, bank_labels[ids], query_labels, k, temperature, num_classes=5
            )
            # float32 similarities from two libraries: at most one near-tie may vote differently
            assert math.isclose(ours, reference[k], abs_tol=1 / len(queries) + 1e-9), (
                k,
                temperature,
            )
