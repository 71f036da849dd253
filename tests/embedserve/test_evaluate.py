"""The evaluation pipeline on synthetic embeddings with known answers: perfectly separated classes
score 1 everywhere, and an approximate index searched exhaustively matches the exact one."""

from __future__ import annotations

import numpy as np
import pytest

from embedserve.evaluate import (
    AnnSetting,
    default_ann_settings,
    evaluate_embeddings,
    format_report,
    l2_normalize,
    linear_probe,
)


def clusters(per_class: int, seed: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    """4 classes around orthogonal directions of R^16."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(4), per_class)
    x = np.eye(16)[labels] * 4 + rng.normal(scale=spread, size=(len(labels), 16))
    return l2_normalize(x), labels


def test_separated_classes_score_one_and_exhaustive_ivf_matches_exact():
    gallery, gallery_labels = clusters(100, 0, 0.3)
    queries, query_labels = clusters(10, 1, 0.3)
    settings = [AnnSetting("IVF8,Flat", "nprobe", (1, 8)), AnnSetting("HNSW16", "efSearch", (64,))]
    report = evaluate_embeddings(
        gallery, gallery_labels, queries, query_labels, ann_settings=settings, repeats=1
    )
    assert all(row["top1"] == 1.0 for row in report["knn"])
    assert report["retrieval"] == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "map@r": 1.0}
    ivf = {row["value"]: row for row in report["ann"] if row["index"] == "IVF8,Flat"}
    assert ivf[8]["recall@10"] == 1.0  # nprobe = nlist visits every list: exact
    assert ivf[1]["recall@10"] <= ivf[8]["recall@10"]
    assert all(row["qps"] > 0 and row["bytes"] > 0 for row in report["ann"])
    table = format_report(report)
    assert "| map@r | 1.0000 |" in table and "| IVF8,Flat | nprobe=8 | 1.000 |" in table


def test_overlapping_classes_score_below_one():
    gallery, gallery_labels = clusters(50, 0, 3.0)
    queries, query_labels = clusters(10, 1, 3.0)
    report = evaluate_embeddings(gallery, gallery_labels, queries, query_labels, ann_settings=[])
    assert "ann" not in report
    assert 0 < report["retrieval"]["map@r"] < 1
    assert report["retrieval"]["recall@1"] <= report["retrieval"]["recall@5"] <= 1


@pytest.mark.parametrize(
    "n, expected",
    [
        (1_000, ["HNSW32"]),
        (2_000, ["IVF178,Flat", "HNSW32"]),
        (9_469, ["IVF389,Flat", "HNSW32", "IVF389,PQ64"]),
    ],
)
def test_default_ann_settings_skip_indexes_the_gallery_cannot_train(n, expected):
    assert [s.factory for s in default_ann_settings(n)] == expected


def test_linear_probe_separates_linearly_separable_classes_and_not_random_labels():
    train, train_labels = clusters(100, 0, 0.3)
    test, test_labels = clusters(25, 1, 0.3)
    probe = linear_probe(train, train_labels, test, test_labels)
    assert probe["top1"] == 1.0 and probe["converged"]
    assert probe["train_images"] == 400 and probe["test_images"] == 100
    # labels that the embeddings carry no information about: about chance (1/4), never perfect
    rng = np.random.default_rng(2)
    shuffled = linear_probe(train, rng.permutation(train_labels), test, test_labels)
    assert shuffled["top1"] < 0.5
    report = evaluate_embeddings(train, train_labels, test, test_labels, ann_settings=[])
    report["linear"] = probe
    assert "| linear probe top-1 | 1.0000 |" in format_report(report)


def test_linear_probe_needs_two_classes():
    x = np.ones((10, 4), np.float32)
    with pytest.raises(ValueError, match="at least two classes"):
        linear_probe(x, np.zeros(10, int), x, np.zeros(10, int))
