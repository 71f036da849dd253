"""`embedserve eval`: kNN and retrieval evaluation of an encoder on a labelled gallery and
queries, with the approximate-index sweep, plots and the retrieval grid."""

from __future__ import annotations

import argparse
import json
import shlex
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from embedserve.cli_common import UsageError, make_encoder, show_progress
from embedserve.imagefolder import scan_images


def cmd_eval(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from embedserve.evaluate import (
        embed_image_set,
        evaluate_embeddings,
        format_report,
        linear_probe,
        require_scikit_learn,
    )
    from embedserve.plots import plot_recall_qps

    if args.linear:  # fail before the embedding, not after it
        try:
            require_scikit_learn()
        except ImportError as e:
            raise UsageError(f"--linear: {e}") from e
    encoder = make_encoder(args, args.model)
    package = encoder.package
    sets, vectors = {}, {}
    for split, folder in (("gallery", args.gallery), ("queries", args.queries)):
        images = scan_images(folder)
        if any(label is None for label in images.labels):
            raise UsageError(
                f"{folder}: eval needs labels, i.e. class-per-folder images (FOLDER/<class>/...)"
            )
        if args.linear and split == "gallery" and len(set(images.labels)) < 2:
            raise UsageError(f"{folder}: --linear needs a gallery of at least two classes")
        cache = (
            Path(args.cache) / f"{package.name}.{encoder.variant}.{split}.npy"
            if args.cache
            else None
        )
        embeddings, ok, summary = embed_image_set(
            encoder,
            images,
            cache,
            batch_size=args.batch_size,
            threads=args.threads,
            progress=show_progress(args),
            desc=split,
        )
        sets[split] = (images, ok, summary)
        vectors[split] = embeddings
    gallery_images, gallery_ok, _ = sets["gallery"]
    query_images, query_ok, _ = sets["queries"]
    classes = sorted(set(gallery_images.classes) | set(query_images.classes))
    class_index = {c: i for i, c in enumerate(classes)}
    gallery_labels = np.array([class_index[gallery_images.labels[i]] for i in gallery_ok])
    query_labels = np.array([class_index[query_images.labels[i]] for i in query_ok])
    if Path(args.gallery).resolve() == Path(args.queries).resolve():
        warnings.warn(
            "the gallery and the queries are the same folder: every query finds itself first",
            stacklevel=1,
        )
    report: dict[str, Any] = {
        "command": "embedserve " + shlex.join(argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {
            "name": package.name,
            "sha256": package.card["sha256"],
            "variant": encoder.variant,
            "providers": encoder.providers,
        },
        "protocol": (
            "cosine similarity of L2-normalized embeddings; weighted kNN votes exp(sim/T); "
            "recall@k: a gallery item of the query's label among the top k; mAP@R with R = the "
            "number of gallery items of the query's label; ANN recall@10: overlap of the top 10 "
            "with the exact top 10; queries/s with all queries in one batch"
        ),
        "threads": args.threads,
    }
    for split, (images, ok, summary) in sets.items():
        report[split] = {
            "folder": str(Path(images.root)),
            "images": len(ok),
            "classes": len(images.classes),
            **summary,
        }
    settings = [] if args.no_ann else None
    report.update(
        evaluate_embeddings(
            vectors["gallery"],
            gallery_labels,
            vectors["queries"],
            query_labels,
            ann_settings=settings,
            repeats=args.repeats,
        )
    )
    if args.linear:
        report["linear"] = linear_probe(
            vectors["gallery"], gallery_labels, vectors["queries"], query_labels
        )
    report["title"] = (
        f"{package.name} ({encoder.variant}): {len(gallery_ok)} gallery, {len(query_ok)} queries"
    )
    out = Path(args.out or f"runs/eval/{package.name}")
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = {}
    if "ann" in report:
        report["plots"]["recall_qps"] = str(plot_recall_qps(report, out / "recall_qps.png"))
    report["plots"]["retrieval_grid"] = str(
        draw_grid(args, vectors, gallery_images, gallery_ok, query_images, query_ok, out)
    )
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        print(f"\nwrote {out / 'eval.json'}, " + ", ".join(report["plots"].values()))
    return 0


def draw_grid(args, vectors, gallery_images, gallery_ok, query_images, query_ok, out: Path):
    """The first query of each class (up to --grid-rows) with its top-8 neighbours."""
    from embedserve.evaluate import exact_search, l2_normalize
    from embedserve.plots import retrieval_grid

    chosen, seen = [], set()
    for row, position in enumerate(query_ok):
        label = query_images.labels[position]
        if label not in seen:
            seen.add(label)
            chosen.append(row)
    chosen = chosen[: args.grid_rows]
    sims, ids = exact_search(
        l2_normalize(vectors["gallery"]), l2_normalize(vectors["queries"][chosen]), 8
    )
    rows = []
    for row, sim_row, id_row in zip(chosen, sims, ids, strict=True):
        q = query_ok[row]
        hits = [
            (
                str(gallery_images.paths[gallery_ok[i]]),
                gallery_images.labels[gallery_ok[i]],
                float(s),
            )
            for s, i in zip(sim_row, id_row, strict=True)
        ]
        rows.append((str(query_images.paths[q]), query_images.labels[q], hits))
    return retrieval_grid(rows, out / "retrieval_grid.png")
