"""FAISS index capacity: memory, build time, search speed and recall of each index type.

The figures behind docs/capacity.md. One gallery of --size vectors (default 10^6) of the default
model's dimension (512), synthetic but shaped like embeddings (L2-normalized, scattered around
1,000 random centres: benchmarks.synthetic), is indexed by each of three FAISS index types as
the product stores them (embedserve.index_ids.build_id_index: Flat and HNSW32 wrapped in
"IDMap2", IVF-PQ holding its ids with a hash-table direct map):

- Flat: exact, the vectors as they are (4 bytes per dimension);
- HNSW32: a graph of 32 links per vector over the same vectors, efConstruction 40 (FAISS's and
  the product's default);
- IVF<nlist>,PQ<dim/8>: nlist = 4 sqrt(N) inverted lists (the product's rule of thumb), each
  vector compressed to dim/8 one-byte codes (64 bytes for 512-d, 8 dimensions per byte, the
  IVF-PQ of `embedserve eval`), trained on 39 x nlist vectors (FAISS's minimum per list).

For each: build time (train, add), the serialized size (faiss.serialize_index: what index.faiss
holds), bytes per vector, and the process's resident-memory growth during the build (VmRSS after
minus before; and the peak, VmHWM, reset before the build where Linux allows it). Then
queries/s at batch 1 (median of --repeats timed runs of >= --min-time s after a warm-up) and
recall@10 against the exact answer (faiss.knn) on --queries queries, at each search setting:
the first of --nprobe and of --ef-search (1 and 16) are FAISS's defaults, which an index built
without --nprobe / --ef-search gets. Builds use --threads; searches --search-threads (1): FAISS
runs a single query on one thread for these indexes, and on shared cores a second OpenMP thread
only adds waiting at each parallel region.

"IVF<n>,PQ64" is the factory string of docs/search.md and `embedserve eval`; FAISS's factory
turns on polysemous training for it (a cost that does not grow with N and that the product's
searches do not use); the default list adds "IVF<n>,PQ64np", the same index without it, so the
two build times show that cost.

    python -m benchmarks.index_capacity [--size 1e6] [--dim 512] [--threads 2]
    # -> benchmarks/results/index_capacity.json and .md
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import median_rate

K = 10


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--size", type=float, default=1e6, help="vectors in the gallery")
    p.add_argument("--dim", type=int, default=512, help="vector size (the default model's: 512)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="build threads (and BLAS)")
    p.add_argument("--search-threads", type=int, default=1, help="FAISS threads when searching")
    p.add_argument("--queries", type=int, default=100, help="queries timed and scored")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per timed run, at least")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 16, 64], help="IVF settings")
    p.add_argument("--ef-search", type=int, nargs="+", default=[16, 64, 256], help="HNSW")
    p.add_argument("--factories", nargs="+", default=None, help="default: Flat, HNSW32, IVF-PQ")
    p.add_argument("--note", default="", help="recorded with the result (e.g. what shared the CPU)")
    p.add_argument("--out", default=None, help="output JSON (default: results/index_capacity)")
    return p.parse_args(argv)


def factories(n: int, dim: int) -> list[str]:
    """Flat, HNSW32 and IVF-PQ with nlist = 4 sqrt(n) and dim/8 one-byte codes per vector, with
    and without FAISS's polysemous training."""
    ivfpq = f"IVF{int(4 * math.sqrt(n))},PQ{dim // 8}"
    return ["Flat", "HNSW32", ivfpq, ivfpq + "np"]


def memory(field: str = "VmRSS") -> int | None:
    """A /proc/self/status memory figure in bytes (VmRSS: resident now; VmHWM: its peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); whether it worked."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc), so the next build's RSS growth is its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def build(factory: str, data, seed: int = 0) -> tuple[object, dict]:
    """`factory` built as the product builds it over `data` (ids 0..n-1): the index and its
    build time, serialized size and memory growth."""
    import faiss
    import numpy as np

    from embedserve.index_ids import build_id_index, train_if_needed

    n, dim = data.shape
    release_freed_memory()
    rss_before, peak_ok = memory(), reset_peak()
    start = time.perf_counter()
    index = build_id_index(dim, factory)
    ivf = faiss.try_extract_index_ivf(index)
    train_n = 0
    if not index.is_trained:  # k-means on 39 vectors per list, FAISS's minimum
        train_n = min(n, 39 * ivf.nlist) if ivf is not None else n
        rows = np.sort(np.random.default_rng(seed).choice(n, train_n, replace=False))
        train_if_needed(index, data[rows], factory)
    train_s = time.perf_counter() - start
    index.add_with_ids(data, np.arange(n, dtype=np.int64))
    build_s = time.perf_counter() - start
    rss_after, peak = memory(), memory("VmHWM")
    index_bytes = int(faiss.serialize_index(index).size)
    grew = rss_before is not None and rss_after is not None
    return index, {
        "factory": factory,
        "stored_as": type(faiss.downcast_index(index)).__name__,
        "n": n,
        "dim": dim,
        "train_vectors": train_n,
        "train_s": round(train_s, 2),
        "add_s": round(build_s - train_s, 2),
        "build_s": round(build_s, 2),
        "index_bytes": index_bytes,
        "bytes_per_vector": round(index_bytes / n, 1),
        "raw_bytes_per_vector": 4 * dim,
        "rss_growth_bytes": rss_after - rss_before if grew else None,
        "rss_peak_growth_bytes": peak - rss_before if grew and peak_ok and peak else None,
    }


def settings(factory: str, nprobe: list[int], ef_search: list[int]) -> list[dict[str, int]]:
    """The search settings measured for a factory: the first of each list is FAISS's default."""
    if factory.startswith("IVF"):
        return [{"nprobe": p} for p in nprobe]
    if "HNSW" in factory:
        return [{"efSearch": e} for e in ef_search]
    return [{}]


def measure(index, queries, exact, params: dict[str, int], repeats: int, min_time: float) -> dict:
    """queries/s at batch 1 and recall@K against `exact` (ids [Q, K]) at one search setting."""
    import numpy as np

    from embedserve.index_ids import search, set_search_parameters

    if params:
        set_search_parameters(index, **params)
    qps = median_rate(lambda q: search(index, q, K), queries, 1, repeats, min_time)
    _, ids = search(index, queries, K)
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(ids, exact, strict=True))
    return {"params": params, "qps_batch1": round(qps, 1), f"recall@{K}": hits / exact.size}


def run(data, queries, names: list[str], args: argparse.Namespace) -> list[dict]:
    """Every factory of `names` built over `data` and searched at each of its settings."""
    import faiss

    _, exact = faiss.knn(queries, data, K, faiss.METRIC_INNER_PRODUCT)
    rows = []
    for factory in names:
        faiss.omp_set_num_threads(args.threads)
        index, row = build(factory, data)
        print(f"{factory}: {row}", flush=True)
        row["searches"] = []
        faiss.omp_set_num_threads(args.search_threads)
        for params in settings(factory, args.nprobe, args.ef_search):
            found = measure(index, queries, exact, params, args.repeats, args.min_time)
            print(f"  {found}", flush=True)
            row["searches"].append(found)
        rows.append(row)
        del index
    release_freed_memory()
    return rows


def mib(x: int | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def markdown(result: dict) -> str:
    m = result["machine"]
    flags = ", ".join(m["cpu_flags"]) or "none of the tracked ones"
    lines = [
        "# FAISS index capacity",
        "",
        f"- Command: `{result['command']}`",
        f"- Date: {result['created']}; the run took {result['seconds']:,.0f} s",
        f"- Machine: {m['cpu_model']}, {m['cores']} cores (flags: {flags}); GPU: {m['gpu'] or 'none'}"
        f"; FAISS {m['faiss']}, {m['threads']} threads to build, {m['search_threads']} to search",
        f"- Load average (1, 5, 15 min) before the run: {result['loadavg_before']}, after: "
        f"{result['loadavg_after']} (near 0 on a quiet machine)",
    ]
    if result["note"]:
        lines.append(f"- Note: {result['note']}")
    lines += [f"- Data: {result['data']}", f"- Protocol: {result['protocol']}", ""]
    lines += [
        "| index | stored as | vectors | train s | add s | build s | index MiB | bytes/vector | "
        "RSS growth MiB | peak growth MiB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["results"]:
        lines.append(
            f"| {r['factory']} | {r['stored_as']} | {r['n']:,} | {r['train_s']:.1f} | "
            f"{r['add_s']:.1f} | {r['build_s']:.1f} | {mib(r['index_bytes'])} | "
            f"{r['bytes_per_vector']:,.1f} | {mib(r['rss_growth_bytes'])} | "
            f"{mib(r['rss_peak_growth_bytes'])} |"
        )
    lines += ["", f"| index | search setting | q/s batch 1 | recall@{K} |", "|---|---|---:|---:|"]
    for r in result["results"]:
        for i, s in enumerate(r["searches"]):
            setting = ", ".join(f"{k}={v}" for k, v in s["params"].items()) or "-"
            if s["params"] and i == 0:
                setting += " (FAISS default)"
            lines.append(
                f"| {r['factory']} | {setting} | {s['qps_batch1']:,.1f} | {s[f'recall@{K}']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # BLAS reads its thread count when numpy is imported: the same threads as FAISS
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import faiss
    import numpy as np

    from benchmarks.common import RESULTS, command, machine, write_json
    from benchmarks.synthetic import clustered_vectors, random_centres

    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    started = time.perf_counter()
    n = int(args.size)
    centres = random_centres(1000, args.dim)
    queries = clustered_vectors(args.queries, args.dim, seed=1, centres=centres)
    data = clustered_vectors(n, args.dim, seed=n, centres=centres)
    rows = run(data, queries, args.factories or factories(n, args.dim), args)
    result = {
        "command": command("index_capacity", sys.argv[1:] if argv is None else argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(
            threads=args.threads,
            search_threads=args.search_threads,
            faiss=faiss.__version__,
            numpy=np.__version__,
        ),
        "loadavg_before": loadavg_before,
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "note": args.note,
        "data": f"synthetic: {n:,} L2-normalized {args.dim}-d float32 vectors around 1,000 "
        f"random centres (benchmarks.synthetic); {args.queries} queries from the same centres",
        "protocol": "build: embedserve.index_ids.build_id_index, train (IVF: 39 x nlist "
        "vectors) + add_with_ids of all vectors; index MiB: faiss.serialize_index; RSS growth: "
        "VmRSS after the build minus before (peak: VmHWM); q/s: median of "
        f"{args.repeats} runs of >= {args.min_time} s at batch 1 after a warm-up; recall@{K}: "
        f"overlap with faiss.knn's exact top {K}",
        "seconds": round(time.perf_counter() - started, 1),
        "results": rows,
    }
    out = write_json(args.out or RESULTS / "index_capacity.json", result)
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    print(f"wrote {out} and {out.with_suffix('.md')} in {result['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
