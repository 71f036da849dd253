"""benchmarks.index_capacity on a tiny gallery (2,000 vectors of 32 dimensions): the figures the
capacity plan is made of behave as they must, and the report holds what the docs quote.

The IVF-PQ indexes here are the "np" form (no polysemous training, which alone takes seconds)."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import index_capacity
from benchmarks.synthetic import clustered_vectors, random_centres

DIM = 32


def gallery(n: int) -> np.ndarray:
    return clustered_vectors(n, DIM, seed=n, centres=random_centres(50, DIM))


def test_the_default_indexes_follow_the_rules_of_thumb():
    assert index_capacity.factories(10**6, 512) == [
        "Flat",
        "HNSW32",
        "IVF4000,PQ64",
        "IVF4000,PQ64np",
    ]
    assert index_capacity.factories(2000, DIM)[2] == "IVF178,PQ4"  # 4 sqrt(n) lists, d/8 bytes
    assert index_capacity.settings("IVF178,PQ4", [1, 16], [16]) == [{"nprobe": 1}, {"nprobe": 16}]
    assert index_capacity.settings("HNSW32", [1], [16, 64]) == [{"efSearch": 16}, {"efSearch": 64}]
    assert index_capacity.settings("Flat", [1], [16]) == [{}]


def test_index_memory_grows_with_the_vectors_by_what_each_vector_stores():
    sizes = {}
    for n in (1000, 2000):
        for factory in ("Flat", "HNSW32", "IVF64,PQ4np"):
            index, row = index_capacity.build(factory, gallery(n))
            assert index.ntotal == n and row["n"] == n and row["dim"] == DIM
            assert row["bytes_per_vector"] == round(row["index_bytes"] / n, 1)
            assert row["build_s"] >= row["train_s"] >= 0
            assert (row["train_vectors"] > 0) == factory.startswith("IVF")
            sizes[factory, n] = row["index_bytes"]
    per_vector = {f: (sizes[f, 2000] - sizes[f, 1000]) / 1000 for f in ("Flat", "HNSW32")}
    per_vector["IVF-PQ"] = (sizes["IVF64,PQ4np", 2000] - sizes["IVF64,PQ4np", 1000]) / 1000
    assert per_vector["Flat"] == DIM * 4 + 8  # the float32 vector and its id
    assert 2000 * DIM * 4 < sizes["Flat", 2000] < 1.1 * 2000 * DIM * 4
    assert per_vector["HNSW32"] > per_vector["Flat"] + 32 * 4  # and at least 32 links of 4 bytes
    # 4 bytes of codes, an 8-byte id in its list, 16 bytes in the direct map (id -> list entry)
    assert per_vector["IVF-PQ"] == 4 + 8 + 16
    assert sizes["IVF64,PQ4np", 2000] < sizes["Flat", 2000] / 2


def test_flat_is_exact_and_the_search_setting_is_applied():
    import faiss

    data = gallery(2000)
    queries = clustered_vectors(20, DIM, seed=1, centres=random_centres(50, DIM))
    _, exact = faiss.knn(queries, data, index_capacity.K, faiss.METRIC_INNER_PRODUCT)
    index, _ = index_capacity.build("Flat", data)
    flat = index_capacity.measure(index, queries, exact, {}, repeats=1, min_time=0.01)
    assert flat["recall@10"] == 1.0 and flat["qps_batch1"] > 0
    index, _ = index_capacity.build("IVF64,PQ4np", data)
    for nprobe in (1, 64):
        found = index_capacity.measure(
            index, queries, exact, {"nprobe": nprobe}, repeats=1, min_time=0.01
        )
        assert faiss.extract_index_ivf(index).nprobe == nprobe
        assert found["params"] == {"nprobe": nprobe} and 0 < found["recall@10"] < 1  # PQ: lossy


def test_a_tiny_run_writes_what_the_capacity_plan_quotes(tmp_path):
    out = tmp_path / "ic.json"
    argv = ["--size", "2000", "--dim", str(DIM), "--queries", "20", "--repeats", "1"]
    argv += ["--min-time", "0.01", "--threads", "1", "--note", "a test", "--out", str(out)]
    argv += ["--factories", "Flat", "HNSW32", "IVF178,PQ4np"]
    assert index_capacity.main(argv) == 0
    result = json.loads(out.read_text())
    for key in ("command", "created", "machine", "loadavg_before", "loadavg_after", "seconds"):
        assert result[key], key
    assert result["command"].startswith("python -m benchmarks.index_capacity --size 2000")
    assert {"cpu_model", "cores", "cpu_flags", "threads", "search_threads"} <= set(
        result["machine"]
    )
    rows = {r["factory"]: r for r in result["results"]}
    assert list(rows) == ["Flat", "HNSW32", "IVF178,PQ4np"]
    for r in rows.values():
        assert r["index_bytes"] > 0 and r["build_s"] >= 0 and r["searches"]
        for s in r["searches"]:
            assert s["qps_batch1"] > 0 and 0 <= s["recall@10"] <= 1
    assert rows["Flat"]["searches"][0]["recall@10"] == 1.0
    assert rows["IVF178,PQ4np"]["bytes_per_vector"] < rows["Flat"]["bytes_per_vector"]
    md = out.with_suffix(".md").read_text()
    assert result["command"] in md and "Note: a test" in md
    assert "| Flat | - |" in md and "| HNSW32 | efSearch=16 (FAISS default) |" in md
    assert "| Flat | IndexIDMap2 | 2,000 |" in md
