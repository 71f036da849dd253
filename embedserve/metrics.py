"""Retrieval and kNN-classification metrics: pure functions, numpy in, numpy (or float) out.

Every function takes the result of a nearest-neighbour search, rows sorted by decreasing
similarity: `sims` float [Q, K] and `neighbour_labels` int [Q, K] (the gallery labels of the
hits), with `query_labels` int [Q]. Labels are integer class indices.
"""

from __future__ import annotations

import numpy as np


def weighted_knn_top1(
    sims: np.ndarray,
    neighbour_labels: np.ndarray,
    query_labels: np.ndarray,
    k: int,
    temperature: float,
    num_classes: int,
) -> float:
    """Top-1 accuracy of the weighted kNN classifier: the k nearest vote with weight exp(sim/T).

    The InstDisc / DINO protocol, as in training/knn.py: ties go to the lowest class index.
    """
    k = min(k, sims.shape[1])
    weights = np.exp(sims[:, :k].astype(np.float64) / temperature)  # QxK
    votes = np.zeros((len(sims), num_classes), np.float64)  # QxC
    np.add.at(votes, (np.arange(len(sims))[:, None], neighbour_labels[:, :k]), weights)
    return float((votes.argmax(1) == query_labels).mean())


def recall_at_k(neighbour_labels: np.ndarray, query_labels: np.ndarray, k: int) -> float:
    """Fraction of queries with at least one neighbour of their own label among the top k."""
    hits = neighbour_labels[:, :k] == query_labels[:, None]  # QxK
    return float(hits.any(1).mean())


def map_at_r(
    neighbour_labels: np.ndarray, query_labels: np.ndarray, relevant_counts: np.ndarray
) -> float:
    """Mean average precision at R (Musgrave et al. 2020), R = the query's relevant gallery count.

    AP@R = (1/R) * sum_{i<=R} P@i * rel_i; `neighbour_labels` needs at least max(R) columns.
    """
    r = np.asarray(relevant_counts)
    if neighbour_labels.shape[1] < r.max(initial=0):
        raise ValueError(
            f"map_at_r needs {int(r.max())} neighbours per query, got {neighbour_labels.shape[1]}"
        )
    width = int(r.max(initial=0))
    rel = neighbour_labels[:, :width] == query_labels[:, None]  # QxR
    rel &= np.arange(width)[None, :] < r[:, None]  # only the first R of each query count
    precision = np.cumsum(rel, axis=1) / np.arange(1, width + 1)[None, :]
    ap = (precision * rel).sum(1) / np.maximum(r, 1)
    return float(np.where(r > 0, ap, 0.0).mean())


def neighbour_recall(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int) -> float:
    """k-recall@k: the mean fraction of the exact k nearest ids that the approximate search found."""
    approx, exact = approx_ids[:, :k], exact_ids[:, :k]
    found = [len(np.intersect1d(a[a >= 0], e[e >= 0])) for a, e in zip(approx, exact, strict=True)]
    return float(np.mean(found) / k)


def relevant_counts(gallery_labels: np.ndarray, query_labels: np.ndarray) -> np.ndarray:
    """For each query, how many gallery items share its label (the R of mAP@R)."""
    per_class = np.bincount(gallery_labels, minlength=int(query_labels.max(initial=0)) + 1)
    return per_class[query_labels]
