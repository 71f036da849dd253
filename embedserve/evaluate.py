"""Retrieval evaluation of an encoder: a labelled gallery, labelled queries, exact and approximate
search, in one run (`embedserve eval` is the command line).

    report = evaluate_embeddings(gallery, gallery_labels, queries, query_labels)
    report["knn"]          # weighted kNN top-1 at k=20/200, T=0.07/0.1 (both published protocols)
    report["retrieval"]    # recall@1/5/10 (a same-label item in the top k), mAP@R
    report["ann"]          # per approximate index and setting: recall@10 vs exact, QPS, build time
    linear_probe(gallery, gallery_labels, queries, query_labels)  # `embedserve eval --linear`

All similarities are cosine: the embeddings are L2-normalized (again, here, in case a quantized
model's rows drift from norm 1).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embedserve import metrics
from embedserve.imagefolder import EmbedResult, ImageSet, embed_files
from embedserve.index import build_faiss_index, set_search_parameters
from embedserve.package import Encoder

KNN_KS = (20, 200)
KNN_TEMPERATURES = (0.07, 0.1)
RECALL_KS = (1, 5, 10)
ANN_K = 10
LINEAR_C = 1.0  # the probe's inverse L2 strength: fixed, never tuned on the reported split


@dataclass(frozen=True)
class AnnSetting:
    """An approximate index to build and the search-time parameter values to sweep."""

    factory: str
    parameter: str | None
    values: tuple[int, ...] = ()


def default_ann_settings(n: int) -> list[AnnSetting]:
    """IVF (nlist ~ 4 sqrt(n)), HNSW32 and IVF-PQ (8 dims per byte) at a few settings each.

    k-means needs more training vectors than centroids (FAISS warns below 39 per centroid, but
    works): IVF is skipped below 8 vectors per list, PQ (256 centroids) below 4,096 vectors.
    """
    nlist = max(1, int(4 * math.sqrt(n)))
    probes = tuple(p for p in (1, 2, 4, 8, 16, 32, 64) if p <= nlist)
    settings = [AnnSetting("HNSW32", "efSearch", (16, 32, 64, 128, 256))]
    if n >= 8 * nlist:
        settings.insert(0, AnnSetting(f"IVF{nlist},Flat", "nprobe", probes))
    if n >= 16 * 256:
        pq_probes = tuple(p for p in (4, 16, 64) if p <= nlist)
        settings.append(AnnSetting(f"IVF{nlist},PQ64", "nprobe", pq_probes))
    return settings


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1 (a new float32 array)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_search(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: sims float32 [Q, k] and ids int64 [Q, k], best first."""
    index = build_faiss_index(gallery.shape[1], "Flat")
    index.add(np.ascontiguousarray(gallery, np.float32))
    return index.search(np.ascontiguousarray(queries, np.float32), min(k, len(gallery)))


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ann_sweep(
    gallery: np.ndarray,
    queries: np.ndarray,
    exact_ids: np.ndarray,
    settings: Sequence[AnnSetting],
    k: int = ANN_K,
    repeats: int = 3,
) -> list[dict[str, Any]]:
    """recall@k against the exact ids and queries/s (all queries in one batch, median of
    `repeats`) for every approximate index and parameter value."""
    rows = []
    for setting in settings:
        start = time.perf_counter()
        index = build_faiss_index(gallery.shape[1], setting.factory)
        index.train(gallery)
        index.add(gallery)
        build_s = time.perf_counter() - start
        size = int(faiss.serialize_index(index).size)
        for value in setting.values or (None,):
            if setting.parameter is not None:
                set_search_parameters(index, **{setting.parameter: value})
            index.search(queries[:64], k)  # warm-up
            seconds = _median_seconds(lambda index=index: index.search(queries, k), repeats)
            _, ids = index.search(queries, k)
            rows.append(
                {
                    "index": setting.factory,
                    "parameter": setting.parameter,
                    "value": value,
                    f"recall@{k}": metrics.neighbour_recall(ids, exact_ids, k),
                    "qps": len(queries) / seconds,
                    "build_s": build_s,
                    "bytes": size,
                }
            )
    return rows


def evaluate_embeddings(
    gallery: np.ndarray,
    gallery_labels: np.ndarray,
    queries: np.ndarray,
    query_labels: np.ndarray,
    ann_settings: Sequence[AnnSetting] | None = None,
    repeats: int = 3,
) -> dict[str, Any]:
    """kNN top-1, recall@k, mAP@R and (unless `ann_settings` is empty) the approximate-index
    sweep, for a labelled gallery [N, D] and labelled queries [Q, D]."""
    gallery, queries = l2_normalize(gallery), l2_normalize(queries)
    num_classes = int(max(gallery_labels.max(), query_labels.max())) + 1
    relevant = metrics.relevant_counts(gallery_labels, query_labels)
    depth = max(max(KNN_KS), int(relevant.max(initial=0)), ANN_K)
    start = time.perf_counter()
    sims, ids = exact_search(gallery, queries, depth)  # QxK each
    exact_seconds = time.perf_counter() - start
    neighbour_labels = gallery_labels[ids]  # QxK
    report: dict[str, Any] = {
        "knn": [
            {
                "k": k,
                "temperature": t,
                "top1": metrics.weighted_knn_top1(
                    sims, neighbour_labels, query_labels, k, t, num_classes
                ),
            }
            for k in KNN_KS
            for t in KNN_TEMPERATURES
        ],
        "retrieval": {
            **{
                f"recall@{k}": metrics.recall_at_k(neighbour_labels, query_labels, k)
                for k in RECALL_KS
            },
            "map@r": metrics.map_at_r(neighbour_labels, query_labels, relevant),
        },
    }
    if ann_settings is None:
        ann_settings = default_ann_settings(len(gallery))
    if ann_settings:
        flat = build_faiss_index(gallery.shape[1], "Flat")
        flat.add(gallery)
        flat.search(queries[:64], ANN_K)
        seconds = _median_seconds(lambda: flat.search(queries, ANN_K), repeats)
        report["exact"] = {
            "index": "Flat",
            f"recall@{ANN_K}": 1.0,
            "qps": len(queries) / seconds,
            "bytes": int(faiss.serialize_index(flat).size),
        }
        report["ann"] = ann_sweep(gallery, queries, ids[:, :ANN_K], ann_settings, repeats=repeats)
    report["exact_search_seconds"] = exact_seconds
    return report


def require_scikit_learn() -> None:
    """Raise ImportError, saying what to install, when the linear probe cannot run."""
    try:
        import sklearn  # noqa: F401
    except ImportError as e:
        raise ImportError(
            "the linear probe needs scikit-learn: pip install 'embedserve[eval]'"
        ) from e


def linear_probe(
    train: np.ndarray,
    train_labels: np.ndarray,
    test: np.ndarray,
    test_labels: np.ndarray,
    c: float = LINEAR_C,
    max_iter: int = 1000,
) -> dict[str, Any]:
    """Top-1 of a linear classifier trained on frozen embeddings: the linear-probe protocol.

    Multinomial logistic regression (scikit-learn, L-BFGS) on the standardized embeddings of the
    training images (centre crops, no augmentation), L2 penalty with inverse strength `c`, scored
    on the test embeddings. The papers train their probes for 100+ epochs on augmented crops, so
    this is a cheaper, deterministic estimate of the same quantity.
    """
    require_scikit_learn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(train_labels)) < 2:
        raise ValueError("a linear probe needs training images of at least two classes")
    start = time.perf_counter()
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))
    probe.fit(train, train_labels)
    seconds = time.perf_counter() - start
    classifier = probe[-1]
    return {
        "top1": float((probe.predict(test) == test_labels).mean()),
        "train_top1": float((probe.predict(train) == train_labels).mean()),
        "classifier": "multinomial logistic regression on standardized frozen embeddings "
        "(scikit-learn, L-BFGS, L2)",
        "C": c,
        "iterations": int(np.max(classifier.n_iter_)),
        "converged": bool(np.max(classifier.n_iter_) < max_iter),
        "train_images": int(len(train)),
        "test_images": int(len(test)),
        "seconds": round(seconds, 2),
    }


# -- embedding folders, with a cache --------------------------------------------------------


def embed_image_set(
    encoder: Encoder,
    images: ImageSet,
    cache: Path | None = None,
    batch_size: int = 32,
    threads: int = 2,
    progress: bool = True,
    desc: str = "embedding",
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Embeddings float32 [N_ok, D], the positions in `images` they belong to, and a summary.

    With `cache` (a .npy path), embeddings saved there by the same model variant for the same
    files are reused; otherwise they are computed and saved there (with a .json beside it).
    """
    package = encoder.package
    key = {
        "model": package.name,
        "sha256": package.card["sha256"],
        "variant": encoder.variant,
        "root": str(images.root.resolve()),
        "paths": [str(p) for p in images.paths],
    }
    sidecar = cache.with_suffix(".json") if cache is not None else None
    if cache is not None and cache.is_file() and sidecar.is_file():
        saved = json.loads(sidecar.read_text())
        if all(saved.get(name) == value for name, value in key.items()):
            embeddings = np.load(cache)
            ok = np.array(saved["ok"], np.int64)
            return embeddings, ok, {"cached": str(cache), "failed": saved["failed"]}
    result: EmbedResult = embed_files(
        encoder, images.paths, batch_size=batch_size, threads=threads, progress=progress, desc=desc
    )
    summary = {
        "seconds": round(result.seconds, 2),
        "images_per_second": round(result.images_per_second, 1),
        "failed": result.failed,
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(cache.name + ".tmp.npy")
        np.save(tmp, result.embeddings)
        os.replace(tmp, cache)
        sidecar.write_text(json.dumps({**key, "ok": result.ok.tolist(), "failed": result.failed}))
    return result.embeddings, result.ok, summary


# -- reporting --------------------------------------------------------------------------------


def format_report(report: dict[str, Any]) -> str:
    """The report as Markdown tables."""
    lines = ["| metric | value |", "|---|---|"]
    for row in report["knn"]:
        lines.append(
            f"| weighted kNN top-1, k={row['k']}, T={row['temperature']} | {row['top1']:.4f} |"
        )
    for name, value in report["retrieval"].items():
        lines.append(f"| {name} | {value:.4f} |")
    if "linear" in report:
        lines.append(f"| linear probe top-1 | {report['linear']['top1']:.4f} |")
    if "ann" in report:
        exact = report["exact"]
        lines += [
            "",
            f"| index | setting | recall@{ANN_K} vs exact | queries/s | build s | MiB |",
            "|---|---|---|---|---|---|",
            f"| {exact['index']} (exact) | - | 1.000 | {exact['qps']:,.0f} | - | "
            f"{exact['bytes'] / 2**20:.1f} |",
        ]
        for row in report["ann"]:
            setting = f"{row['parameter']}={row['value']}" if row["parameter"] else "-"
            lines.append(
                f"| {row['index']} | {setting} | {row[f'recall@{ANN_K}']:.3f} | "
                f"{row['qps']:,.0f} | {row['build_s']:.2f} | {row['bytes'] / 2**20:.1f} |"
            )
    return "\n".join(lines)
