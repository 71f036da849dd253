"""The two index backends on the same vectors in one run: FAISS in process against Milvus.

The same vectors (10^5 x 512, L2-normalized, around 1,000 centres: benchmarks.synthetic) go
through embedserve's classes (index_backend.create_index) into `faiss` (in this process: the
baseline), `milvus-lite` (a `*.db` file: Milvus Lite in this process, over gRPC on loopback) and
`milvus-server` (`milvus-lite server --data-dir DIR --port P`, a process of its own: the index
several embedding servers share), as Flat and (--hnsw) HNSW32, each searched `inserted` (by the
process that added the vectors) and `reopened` (as a new process finds it). Measured: insert
rate (one timed pass, --insert-batch per add, with paths and labels), queries/s at --batches
(k=10; median of --repeats runs of >= --min-time s after a warm-up) and with a label filter
matching 10% (batch 1), recall@10 against numpy's exact answer, seconds to create or reopen;
rates also as ratios to the FAISS index of the same kind and state, in the same run.

    python -m benchmarks.index_backends [--n 1e5] [--threads 1] [--no-hnsw]
    # -> benchmarks/results/index_backends.json and .md
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.common import RESULTS, command, machine, machine_line, median_rate, write_json

K = 10
LABELS = 10  # labels assigned at random: a one-label filter matches ~10%
BASELINE = "faiss"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--n", type=float, default=1e5, help="vectors in the index")
    p.add_argument("--dim", type=int, default=512, help="vector size (the default model's: 512)")
    p.add_argument("--insert-batch", type=int, default=1000, help="vectors per add call")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 100], help="queries per call")
    p.add_argument("--queries", type=int, default=1000, help="distinct query vectors")
    p.add_argument("--recall-queries", type=int, default=100, help="queries scored for recall")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="FAISS and BLAS threads")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per timed run, at least")
    p.add_argument("--hnsw", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--ef-search", type=int, default=64, help="HNSW32 efSearch (Milvus: ef)")
    p.add_argument("--note", action="append", default=[], help="a line for the notes")
    p.add_argument("--out", default=None, help="output JSON (default: results/index_backends)")
    return p.parse_args(argv)


def plan(hnsw: bool, ef_search: int) -> list[tuple[str, str, dict]]:
    """(backend, factory, search parameters) in the order measured; FAISS first (the baseline)."""
    rows = [("faiss", "Flat", {}), ("milvus-lite", "Flat", {}), ("milvus-server", "Flat", {})]
    if hnsw:
        params = {"efSearch": ef_search}
        rows[1:1] = [("faiss", "HNSW32", params)]
        rows.append(("milvus-lite", "HNSW32", params))
    return rows


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as s:
        return s.getsockname()[1]


def start_server(data_dir: Path, port: int, log: Path, timeout: float = 120.0, **_):
    """`milvus-lite server` on 127.0.0.1:port; (process, URI, seconds until a client connects)."""
    from pymilvus import MilvusClient

    uri = f"http://127.0.0.1:{port}"
    start = time.perf_counter()
    command = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data_dir)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        # a background job's SIGINT is ignored (bash, no job control): the server needs it
        sigint = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
        proc = subprocess.Popen(command, stdout=out, stderr=out, preexec_fn=sigint)
    while True:  # the port first (pymilvus logs each refused connection), then a client
        if proc.poll() is not None:
            raise RuntimeError(f"milvus-lite server exited with {proc.returncode}: see {log}")
        if time.perf_counter() - start > timeout:
            stop_server(proc)
            raise TimeoutError(f"milvus-lite server not ready in {timeout} s: see {log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            time.sleep(0.05)
            continue
        client = MilvusClient(uri=uri, timeout=10)
        client.list_collections()
        client.close()
        return proc, uri, time.perf_counter() - start


def stop_server(proc: subprocess.Popen) -> None:
    """Ctrl-C: the server's clean shutdown, which writes its memtable out (SIGTERM, which it
    does not handle, leaves the rows to its write-ahead log); an error if it does not stop."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()


def busy_processes(share: float = 10.0) -> list[str]:
    """ "% command" of the other processes over `share` % of a CPU (ps: over their life)."""
    out = subprocess.run(["ps", "-eo", "pid=,pcpu=,args="], capture_output=True, text=True)
    rows = [line.split(None, 2) for line in out.stdout.splitlines()]
    return [f"{c}% {a[:70]}" for p, c, a in rows if float(c) > share and int(p) != os.getpid()]


def exact_rows(np, data, queries, allowed=None) -> list[set[int]]:
    """The rows of the exact top-k of each query (among the `allowed` rows, a bool mask)."""
    rows = np.arange(len(data)) if allowed is None else np.flatnonzero(allowed)
    scores = queries @ data[rows].T
    top = np.argpartition(-scores, K - 1, axis=1)[:, :K]
    return [set(rows[t].tolist()) for t in top]


def recall(found: list[list[dict]], exact: list[set[int]], row_of: dict[int, int]) -> float:
    hits = sum(len({row_of[h["id"]] for h in f} & e) for f, e in zip(found, exact, strict=True))
    return hits / (K * len(exact))


def insert(index, data, paths, labels, batch: int) -> tuple[float, dict[int, int]]:
    """Add every vector, `batch` per call; (seconds, {id: row})."""
    row_of: dict[int, int] = {}
    start = time.perf_counter()
    for lo in range(0, len(data), batch):
        added = index.add(data[lo : lo + batch], paths[lo : lo + batch], labels[lo : lo + batch])
        ids = getattr(added, "ids", added)  # MilvusIndex: AddResult; SearchIndex: the ids
        row_of.update(zip((int(i) for i in ids), range(lo, lo + len(ids)), strict=True))
    return time.perf_counter() - start, row_of


def measure(args, index, queries, truth, row_of) -> dict:
    """The search figures of a filled index: first query, rates, recall (all, label-filtered)."""
    start = time.perf_counter()
    index.search(queries[:1], K)
    row: dict = {"first_query_ms": round((time.perf_counter() - start) * 1000, 2)}

    def rate(batch: int, **filters) -> float:
        search = lambda q: index.search(q, K, **filters)  # noqa: E731
        return sig(median_rate(search, queries, batch, args.repeats, args.min_time))

    row["qps"] = {str(b): rate(b) for b in args.batches}
    row["qps_label_10pct"] = {"1": rate(1, labels=["label0"])}
    rq = queries[: args.recall_queries]
    row[f"recall@{K}"] = round(recall(index.search(rq, K), truth["all"], row_of), 4)
    found = index.search(rq, K, labels=["label0"])
    row[f"recall@{K}_label_10pct"] = round(recall(found, truth["label0"], row_of), 4)
    return row


def run_backend(args, backend, factory, params, package, work, server, data, queries, truth):
    """One backend and index, created, filled and searched, then reopened as a new process
    would find it and searched again: its two rows ("inserted", "reopened")."""
    from embedserve import index_backend

    n, name = len(data), factory.lower()
    labels = [f"label{v}" for v in truth["labels"]]
    paths = [f"d{i % 100}/{i}.jpg" for i in range(n)]  # 100 folders
    where = {"faiss": str(work / f"faiss-{name}"), "milvus-lite": str(work / f"lite-{name}.db")}
    location = where.get(backend, server["uri"])
    milvus = {} if backend == "faiss" else {"collection": f"bench_{name}"}
    start = time.perf_counter()
    index = index_backend.create_index(location, package, factory, params, overwrite=True, **milvus)
    head = {"backend": backend, "index": factory, "params": params}
    first = {**head, "state": "inserted", "open_s": round(time.perf_counter() - start, 3)}
    insert_s, row_of = insert(index, data, paths, labels, args.insert_batch)
    first.update(count=len(index), insert_s=round(insert_s, 2))
    first["insert_per_s"] = round(n / insert_s, 1)
    first.update(measure(args, index, queries, truth, row_of))
    print(first, flush=True)
    second = {**head, "state": "reopened"}
    index.save(location)  # FAISS: writes the folder; Milvus: flushes the last rows
    if backend == "milvus-lite":
        from milvus_lite.server_manager import server_manager_instance

        index.close()  # and stop this process's Milvus Lite, which writes out its memtable
        server_manager_instance.release_server(location)
    elif backend == "milvus-server":
        index.close()  # the server keeps running, as it does for the replicas that share it
    disk = server["data_dir"] if backend == "milvus-server" else Path(location)
    size = sum(f.stat().st_size for f in disk.rglob("*") if f.is_file())
    second["disk_mib"] = round(size / 2**20, 1)
    start = time.perf_counter()
    index = index_backend.open_index(location, package, **milvus)
    index.search(queries[:1], K)
    second["open_s"] = round(time.perf_counter() - start, 3)  # open and first query
    second["count"] = len(index)
    second.update(measure(args, index, queries, truth, row_of))
    getattr(index, "close", lambda: None)()  # MilvusIndex: its client
    print(second, flush=True)
    return [first, second]


def add_ratios(rows: list[dict]) -> None:
    """Each rate as a ratio to the FAISS index of the same factory (else FAISS Flat) and state
    in `rows`, and the milliseconds per query over that baseline's."""
    faiss_rows = {(r["index"], r["state"]): r for r in rows if r["backend"] == BASELINE}
    for row in rows:
        state = row["state"]
        base = faiss_rows.get((row["index"], state)) or faiss_rows[("Flat", state)]
        row["baseline"] = f"{BASELINE} {base['index']} {state}"
        if "insert_per_s" in row:
            row["insert_ratio"] = sig(row["insert_per_s"] / base["insert_per_s"])
        for key in ("qps", "qps_label_10pct"):
            row[f"{key}_ratio"] = {b: sig(q / base[key][b]) for b, q in row[key].items()}
        ms = {b: 1000 / q - 1000 / base["qps"][b] for b, q in row["qps"].items()}
        row["extra_ms_per_query"] = {b: sig(v) for b, v in ms.items()}


def sig(v: float) -> float:
    return float(f"{v:.4g}")  # 4 significant digits: rates and ratios span 10^-4 to 10^5


def num(v: float, digits: int = 3) -> str:
    """`v` to `digits` significant digits in plain notation: 180,766; 112; 0.0953."""
    places = digits - 1 - math.floor(math.log10(abs(v))) if v else 0
    return f"{v:,.{max(0, places)}f}"


def table_row(r: dict, batches: list[int]) -> str:
    setting = ", ".join(f"{k}={v}" for k, v in r["params"].items())
    cells = [r["backend"], r["index"] + (f" ({setting})" if setting else ""), r["state"]]
    rates = [(r.get("insert_per_s"), r.get("insert_ratio"))]
    rates += [(r["qps"][str(b)], r["qps_ratio"][str(b)]) for b in batches]
    rates.append((r["qps_label_10pct"]["1"], r["qps_label_10pct_ratio"]["1"]))
    cells += ["" if q is None else f"{num(q)} ({num(x)}x)" for q, x in rates]
    extra = [r["extra_ms_per_query"][str(b)] for b in batches]
    cells += [("+" if e > 0 else "") + num(e) for e in extra]
    cells += [f"{r[f'recall@{K}']:.3f}", f"{r[f'recall@{K}_label_10pct']:.3f}"]
    cells += [f"{r['open_s']:.2f}", f"{r['count']:,}"]
    return "| " + " | ".join(cells) + " |"


def markdown(results: dict) -> str:
    m, batches = results["machine"], results["batches"]
    head = ["backend", "index", "state", "insert items/s (x)"]
    head += [f"q/s batch {b} (x)" for b in batches] + ["q/s batch 1, label 10% (x)"]
    head += [f"extra ms/query batch {b}" for b in batches]
    head += ["recall@10", "recall@10 label", "open s", "count"]
    table = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    table += [table_row(r, batches) for r in results["results"]]
    paragraphs = [
        f"# Index backends: FAISS in process vs Milvus, {results['n']:,} vectors",
        f"`{results['command']}`, {results['created']}, {results['seconds']} s in all.",
        f"Machine: {machine_line(m)}. Load average (1, 5, 15 min) before: {m['load_before']}, "
        f"after: {m['load_after']}. Versions: pymilvus {m['pymilvus']}, milvus-lite "
        f"{m['milvus_lite']}, faiss {m['faiss']}, numpy {m['numpy']}; {m['threads']} "
        f"FAISS/BLAS threads.\n\nData: {results['data']}.\n\nProtocol: {results['protocol']}.",
        "\n".join(table),
        "\n".join(f"- {note}" for note in results["notes"]),
    ]
    return "\n\n".join(paragraphs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # read by BLAS when numpy is imported (here, and in the server, which inherits them)
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    load_before = [round(v, 2) for v in os.getloadavg()]
    busy = busy_processes()
    import faiss
    import milvus_lite.constants
    import numpy as np
    import pymilvus

    from benchmarks.synthetic import clustered_vectors, random_centres
    from embedserve.package import ModelPackage

    faiss.omp_set_num_threads(args.threads)
    n = int(args.n)
    manifest = {"name": "synthetic", "sha256": "0" * 64, "embedding_dim": args.dim}
    package = ModelPackage(Path("."), manifest)  # what the index reads of a model: no file
    centres = random_centres(1000, args.dim)
    data, qs = (clustered_vectors(m, args.dim, s, centres) for m, s in ((n, n), (args.queries, 1)))
    labels = np.random.default_rng(n + 1).integers(0, LABELS, n)
    rq = qs[: args.recall_queries]
    truth = {"labels": labels, "all": exact_rows(np, data, rq)}
    truth["label0"] = exact_rows(np, data, rq, labels == 0)
    started, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="index_backends-") as tmp:
        work = Path(tmp)
        server = {"data_dir": work / "server-data", "port": free_port(), "log": work / "server.log"}
        server["proc"], server["uri"], start_s = start_server(**server)
        try:
            for backend, factory, params in plan(args.hnsw, args.ef_search):
                rows += run_backend(
                    args, backend, factory, params, package, work, server, data, qs, truth
                )
        finally:
            stop_server(server["proc"])
    add_ratios(rows)
    m = machine(threads=args.threads, faiss=faiss.__version__, numpy=np.__version__)
    m.update(pymilvus=pymilvus.__version__, milvus_lite=milvus_lite.__version__)
    m.update(load_before=load_before, load_after=[round(v, 2) for v in os.getloadavg()])
    results = {
        "command": command("index_backends", sys.argv[1:] if argv is None else argv),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": m,
        **{"n": n, "dim": args.dim, "batches": args.batches, "server_start_s": round(start_s, 3)},
        "data": f"synthetic, {args.dim}-d, L2-normalized, around 1,000 random centres, {LABELS} "
        f"labels at random; {args.queries} distinct queries, recall@{K} on {args.recall_queries}",
        "protocol": f"insert: one timed pass of all {n:,} vectors, {args.insert_batch} per add "
        f"call, with paths and labels, no thumbnails; queries/s: median of {args.repeats} runs "
        f"of >= {args.min_time} s after a warm-up, k={K}, through the index's search (ids, "
        "scores, paths, labels); (x): the ratio to the FAISS index of the same kind and state in "
        "the same run (Flat: the baseline); extra ms/query: 1000/(q/s) less the baseline's",
        "seconds": round(time.perf_counter() - started, 1),
        "results": rows,
        "notes": [
            "inserted: searched by the process that added the vectors (open s: create_index); "
            "reopened: as a new process finds the index (open s: open_index and a first query) "
            "after FAISS saved it and the in-process Milvus Lite was stopped; the milvus-lite "
            f"server runs on (a new client connects to it), as for replicas that share it; it "
            f"took {start_s:.2f} s to start (until a client connected); Milvus Lite and the "
            "server both answer over gRPC",
            f"Milvus Lite {milvus_lite.__version__} keeps new rows in a memtable until it holds "
            f"{milvus_lite.constants.MEMTABLE_MEMORY_LIMIT / 2**20:.0f} MiB (MILVUS_LITE_MEMTABLE_MEMORY_LIMIT_BYTES) "
            "or the database closes, and each search copies every memtable row's vector into a "
            "Python list (milvus_lite/storage/memtable.py, to_search_snapshot); every search "
            "also loops in Python over every stored row (dedup and deletions: "
            "milvus_lite/search/executor_indexed.py), a cost per call whatever the index; "
            "MilvusIndex therefore flushes every 4,096 rows it adds (FLUSH_ROWS) and on save, "
            "and the insert rate includes those flushes",
            "Milvus Lite builds a segment's vector index in the background: a search may find "
            "a segment without its HNSW file yet and search it exactly (recall then above "
            "FAISS's HNSW32)",
            f"processes over 10% CPU at the start (ps's average over their life): {busy}",
            *args.note,
        ],
    }
    out, text = write_json(args.out or RESULTS / "index_backends.json", results), markdown(results)
    out.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {out} and {out.with_suffix('.md')} in {results['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
