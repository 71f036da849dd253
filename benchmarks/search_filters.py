"""Filtered search and search after deletions, through embedserve's SearchIndex, in one run.

For each gallery size (10^5 and 10^6 vectors of the search benchmark's synthetic set: 512-d,
L2-normalized, clustered around 1,000 centres) and each index (Flat, IVF, HNSW32), the same
queries are searched five ways, and each rate is divided by the unfiltered rate of the same
index measured in the same run:

- unfiltered;
- `label` filter matching 10% of the items (ten labels, assigned at random);
- `path_prefix` filter matching 10% (ten folders, assigned at random);
- after deleting a random 10% of the items (tombstones, before compaction);
- after compaction (the deleted vectors removed from the FAISS index).

recall@10 is measured against the exact answer of the same question (numpy over the matching or
surviving vectors), so it states what a filter or a deletion costs each index. Queries/s are the
median of several timed runs of at least --min-time seconds, after a warm-up; a filter's mask is
computed by its first query and cached until the index changes, so the first query's time
(`first_query_ms`, one query) is given apart.

    python -m benchmarks.search_filters [--sizes 1e5 1e6] [--threads 2]
    # -> benchmarks/results/search_filters.json and .md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import UTC, datetime

from benchmarks.common import median_rate

K = 10
FRACTION = 0.1  # the share of items a filter matches, and of items deleted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6])
    p.add_argument("--dim", type=int, default=512, help="vector size (the default model's: 512)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 10], help="queries per call")
    p.add_argument("--queries", type=int, default=200, help="distinct query vectors")
    p.add_argument("--recall-queries", type=int, default=100, help="queries scored for recall")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS and BLAS threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed run, at least")
    p.add_argument("--nprobe", type=int, default=16, help="IVF lists searched")
    p.add_argument("--ef-search", type=int, default=64, help="HNSW32 efSearch")
    p.add_argument(
        "--hnsw-max", type=float, default=1e5, help="largest size an HNSW32 index is built for"
    )
    p.add_argument("--out", default=None, help="output JSON (default: results/search_filters)")
    return p.parse_args(argv)


def exact_ids(np, data, allowed, queries) -> list[set[int]]:
    """The exact top-k ids among the `allowed` rows (bool mask) for each query."""
    rows = np.flatnonzero(allowed)
    scores = queries @ data[rows].T
    top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    return [set(rows[t].tolist()) for t in top]


def recall(found: list[list[dict]], exact: list[set[int]]) -> float:
    return sum(len({h["id"] for h in f} & e) for f, e in zip(found, exact, strict=True)) / (
        K * len(exact)
    )


def run_index(args, np, package, factory, params, data, labels, folders, queries) -> dict:
    from embedserve.index import SearchIndex

    n = len(data)
    start = time.perf_counter()
    index = SearchIndex.create(package, factory=factory, search_parameters=params)
    first = min(n, 39 * int(factory[3:].split(",")[0])) if factory.startswith("IVF") else n
    paths = [f"{folders[i]}/{i}.jpg" for i in range(n)]
    for lo, hi in [(0, first), *((s, min(n, s + 100_000)) for s in range(first, n, 100_000))]:
        if hi > lo:  # an IVF index is trained on its first batch (39 vectors per list)
            index.add(data[lo:hi], paths[lo:hi], [f"label{v}" for v in labels[lo:hi]])
    build_s = time.perf_counter() - start
    rq = queries[: args.recall_queries]
    everything = np.ones(n, bool)
    row: dict = {"n": n, "index": factory, "params": params, "build_s": round(build_s, 2)}

    def measure(name: str, allowed, **filters) -> None:
        start = time.perf_counter()  # the first query computes (and caches) the filter's mask
        index.search(queries[:1], K, **filters)
        first_ms = (time.perf_counter() - start) * 1000
        qps = {
            str(b): median_rate(
                lambda q, f=filters: index.search(q, K, **f),
                queries,
                b,
                args.repeats,
                args.min_time,
            )
            for b in args.batches
        }
        found = index.search(rq, K, **filters)
        exact = exact_ids(np, data, allowed, rq)
        row[name] = {"qps": qps, f"recall@{K}": round(recall(found, exact), 4)}
        row[name]["first_query_ms"] = round(first_ms, 2)
        if name != "unfiltered":
            base = row["unfiltered"]["qps"]
            row[name]["qps_ratio"] = {b: round(qps[b] / base[b], 3) for b in qps}
        print(f"n={n:,} {factory} {name}: {row[name]}", flush=True)

    measure("unfiltered", everything)
    measure("label_10pct", labels == 0, labels=["label0"])
    measure("path_prefix_10pct", folders == "d0", path_prefix="d0/")
    deleted = np.random.default_rng(7).choice(n, int(n * FRACTION), replace=False)
    alive = everything.copy()
    alive[deleted] = False
    index.delete(ids=deleted.tolist())
    measure("deleted_10pct", alive)
    start = time.perf_counter()
    index.compact()
    row["compact_s"] = round(time.perf_counter() - start, 2)
    measure("compacted", alive)
    return row


def markdown(results: dict, batches: list[int]) -> str:
    cases = ["label_10pct", "path_prefix_10pct", "deleted_10pct", "compacted"]
    head = "| vectors | index | case | recall@10 | first query ms | " + " | ".join(
        f"q/s batch {b} (x unfiltered)" for b in batches
    )
    lines = [head + " |", "|---|---|---|---|---|" + "---|" * len(batches)]
    for row in results["results"]:
        setting = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        name = row["index"] + (f" ({setting})" if setting else "")
        for case in ["unfiltered", *cases]:
            r = row[case]
            cells = " | ".join(
                f"{r['qps'][str(b)]:,.0f}"
                + (f" ({r['qps_ratio'][str(b)]:.2f}x)" if "qps_ratio" in r else "")
                for b in batches
            )
            lines.append(
                f"| {row['n']:,} | {name} | {case} | {r[f'recall@{K}']:.3f} | "
                f"{r['first_query_ms']:.1f} | {cells} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # BLAS reads its thread count when numpy is imported: the same threads as FAISS
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import faiss
    import numpy as np

    from benchmarks.common import RESULTS, command, machine, write_json
    from benchmarks.synthetic import clustered_vectors, random_centres
    from embedserve.package import load_package

    faiss.omp_set_num_threads(args.threads)
    package = load_package(None)
    if package.embedding_dim != args.dim:
        raise SystemExit(f"--dim {args.dim}: the default model makes {package.embedding_dim}-d")
    centres = random_centres(1000, args.dim)
    queries = clustered_vectors(args.queries, args.dim, seed=1, centres=centres)
    started = time.perf_counter()
    rows = []
    for size in args.sizes:
        n = int(size)
        data = clustered_vectors(n, args.dim, seed=n, centres=centres)
        labels = np.random.default_rng(n + 1).integers(0, 10, n)
        folders = np.char.add("d", np.random.default_rng(n + 2).integers(0, 10, n).astype(str))
        nlist = int(4 * math.sqrt(n))
        indexes = [("Flat", {}), (f"IVF{nlist},Flat", {"nprobe": args.nprobe})]
        if n <= args.hnsw_max:
            indexes.append(("HNSW32", {"efSearch": args.ef_search}))
        for factory, params in indexes:
            rows.append(
                run_index(args, np, package, factory, params, data, labels, folders, queries)
            )
        del data
    results = {
        "command": command("search_filters", sys.argv[1:] if argv is None else argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(threads=args.threads, faiss=faiss.__version__, numpy=np.__version__),
        "data": f"synthetic: L2-normalized, {args.dim}-d, around 1,000 random centres; "
        f"{args.queries} distinct queries; recall@{K} on {args.recall_queries} of them against "
        "numpy's exact answer to the same question",
        "protocol": f"queries/s: median of {args.repeats} runs of >= {args.min_time} s after a "
        "warm-up, through SearchIndex.search (ids, scores, paths and labels of each hit); each "
        "case's ratio is to the unfiltered rate of the same index in the same run",
        "seconds": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    out = write_json(args.out or RESULTS / "search_filters.json", results)
    out.with_suffix(".md").write_text(markdown(results, args.batches) + "\n")
    print(markdown(results, args.batches))
    print(f"\nwrote {out} and {out.with_suffix('.md')} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
