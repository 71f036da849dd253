"""The `embedserve` command line: build and search FAISS indexes, evaluate an encoder.

    embedserve index build --images photos/ --out indexes/photos [--factory HNSW32]
    embedserve index add   --index indexes/photos --images more-photos/
    embedserve index info  --index indexes/photos
    embedserve search      --index indexes/photos query.jpg [-k 10] [--json]
    embedserve eval        --gallery train/ --queries val/ [--out DIR] [--cache DIR]

Exit codes: 0 success, 2 a usage or input error (the message names the file), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from embedserve.imagefolder import ImageFolderError, embed_files, scan_images
from embedserve.index import DEFAULT_FACTORY, SearchIndex, SearchIndexError
from embedserve.package import Encoder, PackageError, load_package
from embedserve.preprocess import ImageDecodeError

USAGE_ERROR = 2


class UsageError(Exception):
    """A bad argument or input; reported in one line with exit code 2."""


# -- shared options ---------------------------------------------------------------------------


def _add_engine_options(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the encoder runs (default: auto: CUDA where a GPU is present and CUDA really "
        "starts, else the CPU, without trying CUDA where no GPU is present)",
    )
    p.add_argument(
        "--variant",
        default="auto",
        help="model variant: auto (int8 on a VNNI CPU, fp16 on CUDA), fp32, fp16 or int8",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for decoding, ONNX Runtime and FAISS (default: all cores)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _configure_threads(threads: int | None) -> int:
    import os

    import faiss

    threads = threads or os.cpu_count() or 1
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    faiss.omp_set_num_threads(threads)
    return threads


def _encoder(args: argparse.Namespace, model: str | None) -> Encoder:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    package = load_package(model)
    return Encoder(package, variant=args.variant, device=args.device, intra_op_threads=args.threads)


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def _embed_folder(args: argparse.Namespace, encoder: Encoder, folder: str):
    """Scan and embed a folder; returns (images, embeddings, kept positions, failures)."""
    images = scan_images(folder)
    result = embed_files(
        encoder,
        images.paths,
        batch_size=args.batch_size,
        threads=args.threads,
        progress=_progress(args),
    )
    rate = f"{result.images_per_second:.1f} img/s"
    print(
        f"embedded {len(result.ok)} of {len(images.paths)} images from {folder} in "
        f"{result.seconds:.1f} s ({rate}); {len(result.failed)} skipped",
        file=sys.stderr,
    )
    return images, result


# -- index ------------------------------------------------------------------------------------


def _search_parameters(args: argparse.Namespace) -> dict[str, int]:
    params = {}
    if args.nprobe is not None:
        params["nprobe"] = args.nprobe
    if args.ef_search is not None:
        params["efSearch"] = args.ef_search
    return params


def cmd_index_build(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if (out / "CURRENT").exists() and not args.overwrite:
        raise UsageError(
            f"{out} already holds an index: pass --overwrite to replace it, or use "
            f"`embedserve index add` to add images to it"
        )
    encoder = _encoder(args, args.model)
    index = SearchIndex.create(encoder.package, args.factory, _search_parameters(args))
    images, result = _embed_folder(args, encoder, args.images)
    if len(result.ok) == 0:
        raise UsageError(f"{args.images}: none of the images could be decoded")
    kept = result.ok.tolist()
    index.add(
        result.embeddings,
        [str(images.paths[i].resolve()) for i in kept],
        [images.labels[i] for i in kept],
    )
    version = index.save(out)
    print(f"wrote {index!r} to {out} ({version.name})")
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    index = SearchIndex.load(args.index)
    encoder = _encoder(args, args.model or index.manifest["model"]["name"])
    index.check_model(encoder.package, where=args.index)
    images, result = _embed_folder(args, encoder, args.images)
    kept = result.ok.tolist()
    ids = index.add(
        result.embeddings,
        [str(images.paths[i].resolve()) for i in kept],
        [images.labels[i] for i in kept],
    )
    index.save(args.index)
    span = f"ids {ids[0]}..{ids[-1]}" if len(ids) else "nothing added"
    print(f"added {len(ids)} images to {args.index} ({span}); it now holds {len(index)}")
    return 0


def cmd_index_info(args: argparse.Namespace) -> int:
    index = SearchIndex.load(args.index)
    print(json.dumps(index.manifest, indent=2))
    return 0


# -- search -----------------------------------------------------------------------------------


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    index = SearchIndex.load(args.index)
    encoder = _encoder(args, args.model or index.manifest["model"]["name"])
    index.check_model(encoder.package, where=args.index)
    for image in args.images:
        if not Path(image).is_file():
            raise UsageError(f"{image}: no such file")
    try:
        queries = encoder.embed_images(args.images)
    except ImageDecodeError:
        for image in args.images:  # find which one, to name it
            try:
                encoder.embed_images([image])
            except ImageDecodeError as e:
                raise UsageError(f"{image}: {e}") from e
        raise
    results = index.search(queries, args.k)
    if args.json:
        answer = [
            {"query": image, "hits": hits} for image, hits in zip(args.images, results, strict=True)
        ]
        print(json.dumps(answer, indent=2))
        return 0
    for image, hits in zip(args.images, results, strict=True):
        print(f"{image}:")
        for rank, hit in enumerate(hits, 1):
            label = f" [{hit['label']}]" if hit["label"] is not None else ""
            print(f"  {rank:3d}. {hit['score']:.4f}  id {hit['id']}{label}  {hit['path']}")
    return 0


# -- eval -------------------------------------------------------------------------------------


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
    encoder = _encoder(args, args.model)
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
            progress=_progress(args),
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
        _draw_grid(args, vectors, gallery_images, gallery_ok, query_images, query_ok, out)
    )
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_report(report))
        print(f"\nwrote {out / 'eval.json'}, " + ", ".join(report["plots"].values()))
    return 0


def _draw_grid(args, vectors, gallery_images, gallery_ok, query_images, query_ok, out: Path):
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


# -- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="embedserve",
        description="Image similarity search and retrieval evaluation with FAISS.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model_help = "model package: a name in models/ or a folder (default: models/DEFAULT)"

    index = commands.add_parser("index", help="build, extend or describe a search index")
    index_commands = index.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = index_commands.add_parser(
        "build",
        help="embed every image of a folder and write an index",
        description="Embed every image under --images (class-per-folder gives labels, a flat "
        "folder none) and write a FAISS index with its metadata to --out, atomically.",
    )
    build.add_argument("--images", required=True, help="folder of images (searched recursively)")
    build.add_argument("--out", required=True, help="index folder to write")
    build.add_argument(
        "--factory",
        default=DEFAULT_FACTORY,
        help="FAISS index-factory string, inner-product metric (default: Flat, exact); e.g. "
        "'IVF256,Flat', 'HNSW32', 'IVF256,PQ64' (trained on the images)",
    )
    build.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (saved)")
    build.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (saved)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index")
    _add_engine_options(build, model_help)
    build.set_defaults(func=cmd_index_build)

    add = index_commands.add_parser(
        "add",
        help="embed more images into an existing index (existing ids do not change)",
        description="Append the images under --images to an index; new items get the next ids.",
    )
    add.add_argument("--index", required=True, help="index folder")
    add.add_argument("--images", required=True, help="folder of images to add")
    _add_engine_options(add, "model package (default: the one the index was built with)")
    add.set_defaults(func=cmd_index_add)

    info = index_commands.add_parser("info", help="print an index's manifest")
    info.add_argument("--index", required=True, help="index folder")
    info.set_defaults(func=cmd_index_info)

    search = commands.add_parser(
        "search",
        help="the nearest neighbours of query images",
        description="Embed each IMAGE and print its k nearest items in the index (the server's "
        "/search gives the same answer).",
    )
    search.add_argument("--index", required=True, help="index folder")
    search.add_argument("images", nargs="+", metavar="IMAGE", help="query image files")
    search.add_argument("-k", type=int, default=10, help="neighbours per query (10)")
    search.add_argument("--json", action="store_true", help="print JSON instead of text")
    _add_engine_options(search, "model package (default: the one the index was built with)")
    search.set_defaults(func=cmd_search)

    ev = commands.add_parser(
        "eval",
        help="retrieval and kNN evaluation of an encoder on a labelled gallery and queries",
        description="Weighted kNN top-1 (k=20/200, T=0.07/0.1), recall@1/5/10, mAP@R, and "
        "recall@10 vs exact + queries/s of IVF, HNSW and IVF-PQ indexes; writes eval.json, "
        "recall_qps.png and retrieval_grid.png to --out.",
    )
    ev.add_argument("--gallery", required=True, help="class-per-folder gallery (e.g. train/)")
    ev.add_argument("--queries", required=True, help="class-per-folder queries (e.g. val/)")
    ev.add_argument("--out", default=None, help="output folder (default: runs/eval/MODEL)")
    ev.add_argument(
        "--cache",
        default=None,
        help="folder for the embeddings (.npy); a later run with the same model and files reuses them",
    )
    ev.add_argument("--no-ann", action="store_true", help="skip the approximate-index sweep")
    ev.add_argument(
        "--linear",
        action="store_true",
        help="also train a linear probe (logistic regression) on the gallery's embeddings and "
        "report its top-1 on the queries",
    )
    ev.add_argument("--repeats", type=int, default=3, help="timing repeats (median) (3)")
    ev.add_argument("--grid-rows", type=int, default=10, help="queries in the retrieval grid (10)")
    ev.add_argument("--json", action="store_true", help="print the JSON report, not the table")
    _add_engine_options(ev, model_help)
    ev.set_defaults(func=cmd_eval)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"embedserve: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `embedserve` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.showwarning = _show_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "threads"):
            args.threads = _configure_threads(args.threads)
        if args.func is cmd_eval:
            return cmd_eval(args, argv)
        return args.func(args)
    except (UsageError, PackageError, SearchIndexError, ImageFolderError) as e:
        print(f"embedserve: error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
