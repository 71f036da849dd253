"""The `embedserve` command line: build and search indexes (FAISS or Milvus), evaluate an encoder.

    embedserve index build  --images photos/ --out indexes/photos [--factory HNSW32]
    embedserve index add    --index indexes/photos --images more-photos/ [--replace]
    embedserve index delete --index indexes/photos [--id 12 ...] [--path photos/a.jpg ...]
    embedserve index info   --index indexes/photos
    embedserve index migrate --from indexes/photos --to http://milvus:19530   (or photos.db)
    embedserve search       --index indexes/photos query.jpg [-k 10] [--json]
                            [--label cats ...] [--path-prefix photos/] [--min-score 0.5]
    embedserve search       --index indexes/photos --id 12   (more like item 12)
    embedserve eval         --gallery train/ --queries val/ [--out DIR] [--cache DIR]

Exit codes: 0 success, 2 a usage or input error (the message names the file), 1 anything else.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from embedserve.cli_common import (
    USAGE_ERROR,
    UsageError,
    add_engine_options,
    add_thumbnail_options,
    configure_threads,
    embed_folder,
    make_encoder,
)
from embedserve.cli_eval import cmd_eval
from embedserve.imagefolder import ImageFolderError
from embedserve.index_backend import create_index, is_milvus, milvus_settings, open_index
from embedserve.index_format import DEFAULT_FACTORY, SearchIndexError
from embedserve.package import PackageError
from embedserve.preprocess import ImageDecodeError

# -- index ------------------------------------------------------------------------------------

INDEX_HELP = "the index: a folder (FAISS), a *.db file (Milvus Lite) or an http(s):// URI (Milvus)"


def _search_parameters(args: argparse.Namespace) -> dict[str, int]:
    params = {}
    if args.nprobe is not None:
        params["nprobe"] = args.nprobe
    if args.ef_search is not None:
        params["efSearch"] = args.ef_search
    return params


def cmd_index_build(args: argparse.Namespace) -> int:
    out = args.out
    if not is_milvus(out) and (Path(out) / "CURRENT").exists() and not args.overwrite:
        raise UsageError(
            f"{out} already holds an index: pass --overwrite to replace it, or use "
            f"`embedserve index add` to add images to it"
        )
    encoder = make_encoder(args, args.model)
    images, result = embed_folder(args, encoder, args.images)
    if len(result.ok) == 0:
        raise UsageError(f"{args.images}: none of the images could be decoded")
    # a Milvus collection is created now (refused when one exists, unless --overwrite)
    index = create_index(
        out, encoder.package, args.factory, _search_parameters(args), overwrite=args.overwrite
    )
    kept = result.ok.tolist()
    index.add(
        result.embeddings,
        [str(images.paths[i].resolve()) for i in kept],
        [images.labels[i] for i in kept],
        thumbnails=result.thumbnails,
    )
    version = index.save(out)
    print(f"wrote {index!r} to {out}" + (f" ({version.name})" if version else ""))
    return 0


def cmd_index_add(args: argparse.Namespace) -> int:
    index = open_index(args.index)
    encoder = make_encoder(args, args.model or index.manifest["model"]["name"])
    index.check_model(encoder.package, where=args.index)
    images, result = embed_folder(args, encoder, args.images)
    kept = result.ok.tolist()
    added = index.add(
        result.embeddings,
        [str(images.paths[i].resolve()) for i in kept],
        [images.labels[i] for i in kept],
        thumbnails=result.thumbnails,
        replace=args.replace,
    )
    ids, replaced = _added(index, added)
    index.save(args.index)
    span = f"ids {ids[0]}..{ids[-1]}" if len(ids) else "nothing added"
    also = f", replacing {len(replaced)} with the same paths" if args.replace else ""
    print(f"added {len(ids)} images to {args.index} ({span}{also}); it now holds {len(index)}")
    return 0


def _added(index: Any, added: Any) -> tuple[list[int], list[int]]:
    """The new ids and the replaced ones, from SearchIndex.add's answer (an AddResult, or the
    ids with the replaced ones in `index.last_replaced`)."""
    if hasattr(added, "ids"):
        return [int(i) for i in added.ids], [int(i) for i in added.replaced]
    return [int(i) for i in added], [int(i) for i in getattr(index, "last_replaced", [])]


def cmd_index_delete(args: argparse.Namespace) -> int:
    if not args.id and not args.path:
        raise UsageError("nothing to delete: give --id N and/or --path P (each repeatable)")
    if any(i < 0 for i in args.id):
        raise UsageError(f"--id must be a non-negative integer, got {min(args.id)}")
    index = open_index(args.index)
    # a path as given, and the absolute path `index build/add` stored for the same file
    forms = {p: list(dict.fromkeys([p, str(Path(p).resolve())])) for p in args.path}
    result = index.delete(
        ids=list(dict.fromkeys(args.id)), paths=[f for v in forms.values() for f in v]
    )
    missing_paths = [p for p, fs in forms.items() if set(fs) <= set(result.missing_paths)]
    version = index.save(args.index)  # compacted: the vectors and thumbnails are gone for good
    print(
        f"deleted {len(result.deleted)} items from {args.index}"
        + (f" (ids {', '.join(map(str, result.deleted))})" if result.deleted else "")
        + f"; it now holds {len(index)}"
        + (f" ({Path(version).name})" if version else "")
    )
    for i in result.missing_ids:
        print(f"embedserve: no live item with id {i} in {args.index}", file=sys.stderr)
    for p in missing_paths:
        print(f"embedserve: no live item with path {p} in {args.index}", file=sys.stderr)
    return USAGE_ERROR if result.missing_ids or missing_paths else 0


def cmd_index_info(args: argparse.Namespace) -> int:
    index = open_index(args.index)
    print(json.dumps({**index.manifest, "count": len(index)}, indent=2))
    return 0


def cmd_index_migrate(args: argparse.Namespace) -> int:
    if is_milvus(args.source) or not (Path(args.source) / "CURRENT").exists():
        raise UsageError(f"--from {args.source}: not a FAISS index folder")
    if not is_milvus(args.to):
        raise UsageError(
            f"--to {args.to}: give a Milvus Lite file (*.db) or a Milvus server's URI "
            "(http://HOST:19530)"
        )
    from embedserve.index_migrate import migrate  # pymilvus is imported only when it is used

    report = migrate(
        args.source,
        args.to,
        factory=args.factory,
        overwrite=args.overwrite,
        sample=args.sample,
        min_overlap=args.min_overlap,
        **milvus_settings(),
    )
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
        return 0
    print(
        f"migrated {report.items} items ({report.thumbnails} thumbnails) from {args.source} to "
        f"{args.to} collection {report.collection!r} ({report.factory}) in {report.seconds} s; "
        f"checked: {report.target_items} items there, {report.rows_equal}/{report.sampled} "
        f"sampled items equal, their searches agree on {report.overlap:.0%} of the top 10"
    )
    return 0


# -- search -----------------------------------------------------------------------------------


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    if args.min_score is not None and not -1.0 <= args.min_score <= 1.0:
        raise UsageError(f"--min-score must be between -1 and 1, got {args.min_score}")
    return {
        "labels": args.label or None,
        "path_prefix": args.path_prefix or None,
        "min_score": args.min_score,
    }


def cmd_search(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise UsageError(f"-k must be at least 1, got {args.k}")
    if (args.id is None) == (not args.images):
        raise UsageError("give query IMAGE files, or --id N of a stored item, not both")
    filters = _filters(args)
    index = open_index(args.index)
    if args.id is not None:
        if index.item(args.id) is None:
            raise UsageError(f"--id {args.id}: no live item with this id in {args.index}")
        hits = index.search_by_id(args.id, args.k, **filters)
        return _print_hits(args, [(None, args.id, hits)])
    encoder = make_encoder(args, args.model or index.manifest["model"]["name"])
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
    results = index.search(queries, args.k, **filters)
    return _print_hits(
        args, [(image, None, hits) for image, hits in zip(args.images, results, strict=True)]
    )


def _print_hits(
    args: argparse.Namespace, answers: list[tuple[str | None, int | None, list]]
) -> int:
    """Each query's hits: JSON ({"query": image or null, "id": stored id or null, "hits"}) or
    text (rank, score, id, label, path)."""
    if args.json:
        answer = [{"query": image, "id": item, "hits": hits} for image, item, hits in answers]
        print(json.dumps(answer, indent=2))
        return 0
    for image, item, hits in answers:
        print(f"{image}:" if item is None else f"more like id {item}:")
        for rank, hit in enumerate(hits, 1):
            label = f" [{hit['label']}]" if hit["label"] is not None else ""
            print(f"  {rank:3d}. {hit['score']:.4f}  id {hit['id']}{label}  {hit['path']}")
    return 0


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
    build.add_argument(
        "--out",
        required=True,
        help="the index to write: a folder (FAISS), a *.db file (Milvus Lite) or an http(s):// "
        "URI (a Milvus server; collection: EMBEDSERVE_MILVUS_COLLECTION)",
    )
    build.add_argument(
        "--factory",
        default=DEFAULT_FACTORY,
        help="FAISS index-factory string, inner-product metric (default: Flat, exact); e.g. "
        "'IVF256,Flat', 'HNSW32', 'IVF256,PQ64' (trained on the images)",
    )
    build.add_argument("--nprobe", type=int, default=None, help="IVF lists searched (saved)")
    build.add_argument("--ef-search", type=int, default=None, help="HNSW efSearch (saved)")
    build.add_argument("--overwrite", action="store_true", help="replace an existing index")
    add_thumbnail_options(build)
    add_engine_options(build, model_help)
    build.set_defaults(func=cmd_index_build)

    add = index_commands.add_parser(
        "add",
        help="embed more images into an existing index (existing ids do not change)",
        description="Append the images under --images to an index; new items get the next ids.",
    )
    add.add_argument("--index", required=True, help=INDEX_HELP)
    add.add_argument("--images", required=True, help="folder of images to add")
    add.add_argument(
        "--replace",
        action="store_true",
        help="delete the items already stored under the same paths (the files' absolute paths)",
    )
    add_thumbnail_options(add)
    add_engine_options(add, "model package (default: the one the index was built with)")
    add.set_defaults(func=cmd_index_add)

    delete = index_commands.add_parser(
        "delete",
        help="delete items by id or path, for good",
        description="Delete the items with the given ids and every item stored under the given "
        "paths (as given, or the absolute path of that file, which `index build/add` store), then "
        "save the index compacted: their vectors and thumbnails are gone. Ids are never reused. "
        "Exit code 2 (after deleting the others) when an id or path matches no live item.",
    )
    delete.add_argument("--index", required=True, help=INDEX_HELP)
    delete.add_argument(
        "--id", type=int, action="append", default=[], help="an item's id (repeatable)"
    )
    delete.add_argument("--path", action="append", default=[], help="a stored path (repeatable)")
    delete.set_defaults(func=cmd_index_delete)

    info = index_commands.add_parser("info", help="print an index's manifest and size")
    info.add_argument("--index", required=True, help=INDEX_HELP)
    info.set_defaults(func=cmd_index_info)

    migrate = index_commands.add_parser(
        "migrate",
        help="copy a FAISS index folder into Milvus and check the copy",
        description="Copy every item of a FAISS index folder (id, vector, path, label, thumbnail) "
        "into a new Milvus collection bound to the same model, then check it: equal counts, a "
        "sample of equal items, and the sample's searches finding the same top 10. The collection "
        "and token: EMBEDSERVE_MILVUS_COLLECTION (default embedserve), EMBEDSERVE_MILVUS_TOKEN.",
    )
    migrate.add_argument("--from", dest="source", required=True, help="FAISS index folder")
    migrate.add_argument(
        "--to", required=True, help="Milvus Lite file (*.db) or Milvus URI (http://HOST:19530)"
    )
    migrate.add_argument(
        "--factory",
        default=None,
        help="the collection's index, as a factory string: Flat, HNSW<M>, IVF<n>,Flat, IVF<n>,SQ8, "
        "IVF<n>,PQ<m> (default: the folder's)",
    )
    migrate.add_argument("--overwrite", action="store_true", help="replace an existing collection")
    migrate.add_argument("--sample", type=int, default=50, help="items checked after the copy (50)")
    migrate.add_argument(
        "--min-overlap",
        type=float,
        default=0.9,
        help="fail when the sampled searches share less of their top 10 than this (0.9)",
    )
    migrate.add_argument("--json", action="store_true", help="print the report as JSON")
    migrate.set_defaults(func=cmd_index_migrate)

    search = commands.add_parser(
        "search",
        help="the nearest neighbours of query images",
        description="Embed each IMAGE and print its k nearest items in the index, or, with --id N "
        "instead of images, the items most like the stored item N (itself left out). --label, "
        "--path-prefix and --min-score keep only the items that match (on a Flat index, the "
        "exact top k of those). The server's /search gives the same answer.",
    )
    search.add_argument("--index", required=True, help=INDEX_HELP)
    search.add_argument("images", nargs="*", metavar="IMAGE", help="query image files")
    search.add_argument(
        "--id", type=int, default=None, help="search by this stored item instead (more like it)"
    )
    search.add_argument("-k", type=int, default=10, help="neighbours per query (10)")
    search.add_argument(
        "--label",
        action="append",
        default=[],
        help="keep only items with this label (repeatable: any of them)",
    )
    search.add_argument(
        "--path-prefix", default=None, help="keep only items whose path starts with this"
    )
    search.add_argument(
        "--min-score", type=float, default=None, help="keep only hits scoring at least this"
    )
    search.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_engine_options(search, "model package (default: the one the index was built with)")
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
    add_engine_options(ev, model_help)
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
            args.threads = configure_threads(args.threads)
        if args.func is cmd_eval:
            return cmd_eval(args, argv)
        return args.func(args)
    except (UsageError, PackageError, SearchIndexError, ImageFolderError) as e:
        print(f"embedserve: error: {e}", file=sys.stderr)
        return USAGE_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
