"""benchmarks.index_backends on 1,000 vectors of dim 16, against FAISS, a Milvus Lite file and a
`milvus-lite server` process: every row counted and exact (Flat), every ratio taken to the FAISS
row of the same run, and the markdown rebuilt from the JSON alone."""

from __future__ import annotations

import json

import numpy as np
import pytest

from benchmarks import index_backends as ib

N = 1000


def test_exact_rows_are_the_top_k_among_the_allowed_rows_and_recall_counts_them():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((300, 8)).astype(np.float32)
    queries = rng.standard_normal((4, 8)).astype(np.float32)
    allowed = np.arange(300) % 3 == 0
    got = ib.exact_rows(np, data, queries, allowed)
    for q, rows in zip(queries, got, strict=True):
        scores = np.where(allowed, data @ q, -np.inf)
        assert rows == set(np.argsort(-scores)[: ib.K].tolist())
    row_of = {1000 + r: r for r in range(300)}  # ids are not rows (Milvus's are not)
    found = [[{"id": 1000 + r} for r in sorted(rows)] for rows in got]
    assert ib.recall(found, got, row_of) == 1.0
    found[0] = found[0][:5]
    assert ib.recall(found, got, row_of) == pytest.approx(1 - 5 / (ib.K * 4))


def test_ratios_are_to_the_faiss_row_of_the_same_index_and_state():
    def row(backend, index, state, qps):
        return {"backend": backend, "index": index, "state": state, "insert_per_s": qps * 10}

    rows = [
        row("faiss", "Flat", "inserted", 100.0),
        row("faiss", "Flat", "reopened", 50.0),
        row("faiss", "HNSW32", "inserted", 400.0),
        row("milvus-lite", "Flat", "reopened", 25.0),
        row("milvus-lite", "HNSW32", "inserted", 100.0),
        row("milvus-server", "IVF8,Flat", "inserted", 20.0),  # no FAISS IVF: FAISS Flat
    ]
    for r in rows:
        r["qps"] = {"1": r["insert_per_s"] / 10}
        r["qps_label_10pct"] = {"1": r["insert_per_s"] / 20}
    ib.add_ratios(rows)
    assert [r["qps_ratio"]["1"] for r in rows] == [1.0, 1.0, 1.0, 0.5, 0.25, 0.2]
    assert [r["baseline"] for r in rows[3:]] == [
        "faiss Flat reopened",
        "faiss HNSW32 inserted",
        "faiss Flat inserted",
    ]
    assert rows[3]["extra_ms_per_query"]["1"] == pytest.approx(1000 / 25 - 1000 / 50)
    assert rows[4]["insert_ratio"] == 0.25 and rows[4]["qps_label_10pct_ratio"]["1"] == 0.25
    # the table's figures: significant digits, never an exponent or a rate rounded to 0
    assert [ib.num(v) for v in (180766.3, 112.4, 0.0053, 0.00004, -5.97, 0)] == [
        "180,766",
        "112",
        "0.00530",
        "0.0000400",
        "-5.97",
        "0",
    ]


def test_the_plan_measures_the_faiss_baseline_first():
    assert ib.plan(False, 64)[0] == ("faiss", "Flat", {})
    hnsw = ib.plan(True, 64)
    assert hnsw[0][:2] == ("faiss", "Flat") and ("milvus-lite", "HNSW32", {"efSearch": 64}) in hnsw


def test_a_small_run_on_both_backends_is_exact_counted_and_compared_to_faiss(tmp_path, monkeypatch):
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")  # main sets them: restored after the test
    out = tmp_path / "ib.json"
    argv = ["--n", str(N), "--dim", "16", "--queries", "100", "--recall-queries", "50"]
    argv += ["--repeats", "1", "--min-time", "0.01", "--threads", "1", "--no-hnsw"]
    assert ib.main([*argv, "--insert-batch", "300", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {(r["backend"], r["state"]): r for r in result["results"]}
    backends = ("faiss", "milvus-lite", "milvus-server")
    assert set(rows) == {(b, s) for b in backends for s in ("inserted", "reopened")}
    for (backend, state), r in rows.items():
        assert r["count"] == N, (backend, state)  # after the insert, and after reopening
        assert r["recall@10"] == 1.0 and r["recall@10_label_10pct"] == 1.0  # Flat is exact
        base = rows[("faiss", state)]
        assert r["baseline"] == f"faiss Flat {state}"
        for b in ("1", "100"):
            assert r["qps"][b] > 0
            assert r["qps_ratio"][b] == pytest.approx(r["qps"][b] / base["qps"][b], rel=1e-3)
        if state == "inserted":
            ratio = r["insert_per_s"] / base["insert_per_s"]
            assert r["insert_ratio"] == pytest.approx(ratio, rel=1e-3)
    assert rows[("faiss", "inserted")]["qps_ratio"] == {"1": 1.0, "100": 1.0}
    # the markdown is made from the JSON alone: everything it shows is in the JSON
    assert out.with_suffix(".md").read_text() == ib.markdown(result) + "\n"
    text = out.with_suffix(".md").read_text()
    assert "| milvus-server | Flat | reopened |" in text and result["command"] in text
    assert result["machine"]["cpu_model"] in text and "load average" in text.lower()
