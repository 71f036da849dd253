"""benchmarks.search_filters on a small gallery: every case measured against the exact answer
of the same question, with its ratio to the unfiltered rate of the same index."""

from __future__ import annotations

import json

import numpy as np

from benchmarks import search_filters


def test_exact_ids_are_the_top_k_among_the_allowed_rows():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((200, 8)).astype(np.float32)
    queries = rng.standard_normal((3, 8)).astype(np.float32)
    allowed = np.arange(200) % 4 == 1
    got = search_filters.exact_ids(np, data, allowed, queries)
    for q, ids in zip(queries, got, strict=True):
        scores = np.where(allowed, data @ q, -np.inf)
        assert ids == set(np.argsort(-scores)[: search_filters.K].tolist())


def test_a_small_run_measures_every_case_and_flat_answers_exactly(tmp_path):
    out = tmp_path / "sf.json"
    argv = ["--sizes", "3000", "--batches", "1", "--queries", "20", "--recall-queries", "20"]
    argv += ["--repeats", "1", "--min-time", "0.01", "--threads", "1", "--out", str(out)]
    assert search_filters.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {row["index"]: row for row in result["results"]}
    assert set(rows) == {"Flat", "IVF219,Flat", "HNSW32"}
    cases = ("label_10pct", "path_prefix_10pct", "deleted_10pct", "compacted")
    for row in rows.values():
        for case in cases:
            assert row[case]["qps"]["1"] > 0 and row[case]["qps_ratio"]["1"] > 0
            assert 0 <= row[case]["recall@10"] <= 1
    for case in ("unfiltered", *cases):  # a Flat index answers every question exactly
        assert rows["Flat"][case]["recall@10"] == 1.0
    assert "| 3,000 | Flat | label_10pct | 1.000 |" in out.with_suffix(".md").read_text()
