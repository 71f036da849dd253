"""Similarity-search speed: FAISS Flat, IVF and HNSW against numpy brute force, in one run.

For each gallery size (10^4, 10^5, 10^6 vectors of the default model's dimension, 512), every
method is built (build time, serialized index size, resident-memory growth), then searched with
batches of 1, 10 and 100 queries (queries/s: the median of several timed runs after a warm-up)
and scored by recall@10 against the exact answer. numpy brute force (one matmul + argpartition)
is the baseline every QPS is divided by.

The vectors are synthetic but shaped like embeddings: L2-normalized points scattered around 1,000
random centres (cosine to their centre about 0.7), so that IVF and HNSW see clustered data as
they do with real images; uniform random vectors would be unrealistically hard for them.

    python -m benchmarks.search_benchmark [--sizes 1e4 1e5 1e6] [--dim 512] [--threads 2]
    # -> benchmarks/results/search_benchmark.json and .md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import RESULTS, command, machine, median_rate, write_json

K = 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    p.add_argument("--dim", type=int, default=512, help="vector size (the default model's: 512)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 10, 100])
    p.add_argument("--queries", type=int, default=1000, help="distinct query vectors")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS and BLAS threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed run, at least")
    p.add_argument("--nprobe", type=int, nargs="+", default=[8, 32], help="IVF settings")
    p.add_argument("--ef-search", type=int, default=64, help="HNSW32 efSearch")
    p.add_argument("--ef-construction", type=int, default=40, help="HNSW32 efConstruction")
    p.add_argument(
        "--ef-construction-large",
        type=int,
        default=20,
        help="HNSW32 efConstruction from 10^6 vectors, to keep the build within minutes on 2 cores",
    )
    p.add_argument("--out", default=str(RESULTS / "search_benchmark.json"))
    return p.parse_args()


ARGS = parse_args()
# BLAS reads its thread count when numpy is imported: the baseline gets the same threads as FAISS
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = str(ARGS.threads)

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.synthetic import clustered_vectors as synthetic  # noqa: E402
from benchmarks.synthetic import random_centres  # noqa: E402


def rss_bytes() -> int:
    """Resident memory of this process (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class NumpyBruteForce:
    """The baseline: scores = queries @ data.T, then argpartition for the top k and a sort."""

    def __init__(self, data: np.ndarray) -> None:
        self.data = data

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries @ self.data.T  # QxN
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # QxK, unordered
        top_scores = np.take_along_axis(scores, top, 1)
        order = np.argsort(-top_scores, axis=1)
        return np.take_along_axis(top_scores, order, 1), np.take_along_axis(top, order, 1)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    return float(
        np.mean([len(np.intersect1d(a, b)) for a, b in zip(found, exact, strict=True)]) / K
    )


def run_size(n: int, centres: np.ndarray, queries: np.ndarray) -> list[dict]:
    data = synthetic(n, ARGS.dim, seed=n, centres=centres)
    nlist = int(4 * math.sqrt(n))
    ef_construction = ARGS.ef_construction if n < 1_000_000 else ARGS.ef_construction_large
    methods: list[tuple[str, str, dict]] = [("numpy", "brute force", {}), ("Flat", "Flat", {})]
    methods += [(f"IVF{nlist},Flat", "IVF", {"nprobe": p}) for p in ARGS.nprobe]
    methods += [("HNSW32", "HNSW", {"efSearch": ARGS.ef_search, "efConstruction": ef_construction})]
    rows, exact_ids, built = [], None, {}
    for factory, family, params in methods:
        if factory in built:  # another search setting of an index built already
            index, build_s, size, rss = built[factory]
        else:
            built.clear()  # free the previous index before building the next
            rss_before = rss_bytes()
            start = time.perf_counter()
            if factory == "numpy":
                index = NumpyBruteForce(data)
            else:
                index = faiss.index_factory(ARGS.dim, factory, faiss.METRIC_INNER_PRODUCT)
                if family == "HNSW":
                    index.hnsw.efConstruction = ef_construction
                if not index.is_trained:  # k-means on 39 points per list, FAISS's minimum
                    sample = np.random.default_rng(0).choice(n, min(n, 39 * nlist), replace=False)
                    index.train(data[np.sort(sample)])
                index.add(data)
            build_s = time.perf_counter() - start
            rss = rss_bytes() - rss_before
            size = data.nbytes if factory == "numpy" else int(faiss.serialize_index(index).size)
            built[factory] = (index, build_s, size, rss)
        if "nprobe" in params:
            faiss.ParameterSpace().set_index_parameter(index, "nprobe", params["nprobe"])
        if "efSearch" in params:
            index.hnsw.efSearch = params["efSearch"]
        _, ids = index.search(queries[:100], K)
        if factory == "Flat":
            exact_ids = ids
        row = {
            "n": n,
            "method": factory,
            "family": family,
            "params": params,
            "build_s": round(build_s, 3),
            "index_bytes": size,
            "rss_delta_bytes": rss,
            "qps": {
                str(b): median_rate(
                    lambda q, ix=index: ix.search(q, K), queries, b, ARGS.repeats, ARGS.min_time
                )
                for b in ARGS.batches
            },
            "_ids": ids,
        }
        rows.append(row)
        print(
            f"n={n:>9,} {factory:<16} {params} build {build_s:7.2f} s  "
            + "  ".join(f"b{b}: {q:>9,.0f} q/s" for b, q in row["qps"].items()),
            flush=True,
        )
    baseline = rows[0]["qps"]
    for row in rows:
        row[f"recall@{K}"] = recall_at_k(row.pop("_ids"), exact_ids)
        row["qps_vs_numpy"] = {b: row["qps"][b] / baseline[b] for b in row["qps"]}
    del data, built
    return rows


def markdown(results: dict) -> str:
    b = [str(x) for x in ARGS.batches]
    lines = [
        "| vectors | method | build s | index MiB | recall@10 | "
        + " | ".join(f"q/s batch {x} (x numpy)" for x in b)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(b),
    ]
    for row in results["results"]:
        setting = ", ".join(f"{k}={v}" for k, v in row["params"].items())
        name = row["method"] + (f" ({setting})" if setting else "")
        cells = " | ".join(f"{row['qps'][x]:,.0f} ({row['qps_vs_numpy'][x]:.1f}x)" for x in b)
        lines.append(
            f"| {row['n']:,} | {name} | {row['build_s']:.2f} | {row['index_bytes'] / 2**20:,.0f} | "
            f"{row[f'recall@{K}']:.3f} | {cells} |"
        )
    return "\n".join(lines)


def main() -> None:
    faiss.omp_set_num_threads(ARGS.threads)
    centres = random_centres(1000, ARGS.dim)
    queries = synthetic(ARGS.queries, ARGS.dim, seed=1, centres=centres)
    started = time.perf_counter()
    rows = []
    for size in ARGS.sizes:
        rows += run_size(int(size), centres, queries)
    results = {
        "command": command("search_benchmark", sys.argv[1:]),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(threads=ARGS.threads, faiss=faiss.__version__, numpy=np.__version__),
        "data": f"synthetic: L2-normalized, {ARGS.dim}-d, around 1,000 random centres; "
        f"{ARGS.queries} distinct queries; recall@{K} against Flat on 100 queries",
        "protocol": f"queries/s: median of {ARGS.repeats} runs of >= {ARGS.min_time} s after a "
        "warm-up; build: train (IVF: k-means on 39 x nlist vectors) + add; index bytes: "
        "faiss.serialize_index (numpy: the data array); rss_delta_bytes: resident memory growth "
        "during the build",
        "seconds": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    out = write_json(ARGS.out, results)
    out.with_suffix(".md").write_text(markdown(results) + "\n")
    print(markdown(results))
    print(f"\nwrote {out} and {out.with_suffix('.md')} in {results['seconds']} s")


if __name__ == "__main__":
    main()
