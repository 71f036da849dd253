"""The quality table (benchmarks.quality_table) reads what the trainer writes: a metrics log
made by a real short run gives the row and the plot, and the shipped manifest's logs parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import quality_table
from benchmarks.common import ROOT


def write_log(path: Path, init: float, per_epoch: list[float], seconds: float) -> None:
    records = [
        {
            "kind": "start",
            "config": {
                "method": "byol",
                "knn_temperature": 0.07,
                "extra": {"command": "python -m training.train --method byol"},
            },
        },
        {"kind": "eval", "epoch": 0, "tag": "init", "knn_top1_k20": init},
    ]
    for epoch, acc in enumerate(per_epoch, start=1):
        records.append({"kind": "eval", "epoch": epoch, "tag": "epoch", "knn_top1_k20": acc})
        records.append({"kind": "epoch", "epoch": epoch, "seconds": seconds})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def set_init_from(path: Path, source: dict) -> None:
    """Record in a log's start that its run began from `source` (what --init-from writes)."""
    start, *rest = path.read_text().splitlines()
    path.write_text(
        "\n".join([json.dumps({**json.loads(start), "init_from": source}), *rest]) + "\n"
    )


def test_a_row_reports_final_best_init_time_and_the_published_figure(tmp_path, monkeypatch):
    monkeypatch.setattr(quality_table, "ROOT", tmp_path)
    write_log(tmp_path / "run.jsonl", init=0.30, per_epoch=[0.35, 0.42, 0.41], seconds=90)
    run = {"name": "r", "dataset": "imagenette-160", "metrics": "run.jsonl", "hardware": "cpu"}
    row = quality_table.summarize(run, k=20)
    assert (row["epochs"], row["knn_final"], row["knn_best"], row["knn_best_epoch"]) == (
        3,
        0.41,
        0.42,
        2,
    )
    assert row["random_init"] == 0.30 and row["train_minutes"] == 4.5
    assert row["published_knn"] == 0.887 and row["published_epochs"] == 800
    assert [p["epoch"] for p in row["curve"]] == [0, 1, 2, 3]
    md = quality_table.markdown([row])
    assert "| r | byol | imagenette-160 | 3 | 41.00 | 42.00 (2) | 30.00 | 88.70 (800) |" in md
    assert quality_table.plot(row, tmp_path).stat().st_size > 1000  # a PNG was drawn


def test_the_linear_probe_comes_from_the_eval_reports_the_run_names(tmp_path, monkeypatch):
    monkeypatch.setattr(quality_table, "ROOT", tmp_path)
    write_log(tmp_path / "run.jsonl", init=0.30, per_epoch=[0.35], seconds=60)
    (tmp_path / "trained.json").write_text(json.dumps({"linear": {"top1": 0.6123}}))
    (tmp_path / "init.json").write_text(json.dumps({"linear": {"top1": 0.3456}}))
    run = {
        "name": "c",
        "dataset": "cifar10",
        "metrics": "run.jsonl",
        "hardware": "cpu",
        "linear_eval": "trained.json",
        "random_init_linear_eval": "init.json",
    }
    row = quality_table.summarize(run, k=20)
    assert (row["linear"], row["random_init_linear"], row["published_linear"]) == (
        0.6123,
        0.3456,
        0.9258,
    )
    assert "| 61.23 (random init 34.56) | 92.58 |" in quality_table.markdown([row])
    (tmp_path / "init.json").write_text(json.dumps({"knn": []}))
    with pytest.raises(ValueError, match="no linear probe"):
        quality_table.summarize(run, k=20)


def test_a_log_without_a_trained_evaluation_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(quality_table, "ROOT", tmp_path)
    write_log(tmp_path / "run.jsonl", init=0.30, per_epoch=[], seconds=90)
    run = {"name": "r", "dataset": "cifar10", "metrics": "run.jsonl", "hardware": "cpu"}
    with pytest.raises(ValueError, match="no evaluation after an epoch"):
        quality_table.summarize(run, k=20)


def test_the_shipped_manifest_builds_the_table(tmp_path):
    assert quality_table.main(["--out", str(tmp_path), "--no-plots"]) == 0
    rows = json.loads((tmp_path / "quality.json").read_text())
    manifest = json.loads((ROOT / "benchmarks" / "quality_runs.json").read_text())
    assert [r["name"] for r in rows] == [m["name"] for m in manifest]
    assert all(r["knn_final"] > r["random_init"] for r in rows)


def test_a_run_started_from_another_counts_both_and_keeps_the_first_ones_baseline(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(quality_table, "ROOT", tmp_path)
    write_log(tmp_path / "first.jsonl", init=0.30, per_epoch=[0.40, 0.50], seconds=60)
    write_log(tmp_path / "second.jsonl", init=0.51, per_epoch=[0.48, 0.55, 0.58], seconds=120)
    source = {"kind": "package", "path": "models/x", "method": "byol", "epochs": 2}
    set_init_from(tmp_path / "second.jsonl", source)
    runs = {
        "first": {"name": "first", "dataset": "imagenette-160", "metrics": "first.jsonl"},
        "second": {
            "name": "second",
            "dataset": "imagenette-160",
            "metrics": "second.jsonl",
            "continues": "first",
        },
    }
    for run in runs.values():
        run["hardware"] = "cpu"
    row = quality_table.summarize(runs["second"], k=20, runs=runs)
    assert (row["epochs"], row["total_epochs"], row["knn_final"]) == (3, 5, 0.58)
    assert (row["knn_best"], row["knn_best_epoch"]) == (0.58, 5)  # counted from the first run
    assert row["random_init"] == 0.30 and row["start_knn"] == 0.51  # not the warm start
    assert row["restarts"] == [2]
    assert (row["train_minutes"], row["total_train_minutes"]) == (6.0, 8.0)
    assert [(p["epoch"], p["knn"]) for p in row["curve"]] == [
        (0, 0.30),
        (1, 0.40),
        (2, 0.50),
        (2, 0.51),
        (3, 0.48),
        (4, 0.55),
        (5, 0.58),
    ]
    md = quality_table.markdown([row])
    assert "| second | byol | imagenette-160 | 2 + 3 = 5 | 58.00 | 58.00 (5) | 30.00 |" in md
    assert "| 2.0 + 6.0 = 8.0 min |" in md
    assert quality_table.plot(row, tmp_path).stat().st_size > 1000

    # the manifest must name the earlier run, and it must be the one the log started from
    del runs["second"]["continues"]
    with pytest.raises(ValueError, match="name that run in the manifest"):
        quality_table.summarize(runs["second"], k=20, runs=runs)
    runs["second"]["continues"] = "first"
    set_init_from(tmp_path / "second.jsonl", {**source, "epochs": 40})
    with pytest.raises(ValueError, match="not from first"):
        quality_table.summarize(runs["second"], k=20, runs=runs)


def test_a_second_continuation_counts_the_whole_lineage(tmp_path, monkeypatch):
    """A run started from a continued run's package: the source's record counts its own
    epochs, with the run before it nested; the row counts all three schedules."""
    monkeypatch.setattr(quality_table, "ROOT", tmp_path)
    write_log(tmp_path / "a.jsonl", init=0.30, per_epoch=[0.40, 0.50], seconds=60)
    write_log(tmp_path / "b.jsonl", init=0.50, per_epoch=[0.52, 0.55, 0.58], seconds=60)
    write_log(tmp_path / "c.jsonl", init=0.58, per_epoch=[0.57, 0.61], seconds=120)
    first = {"kind": "package", "method": "byol", "epochs": 2, "init_from": None}
    set_init_from(tmp_path / "b.jsonl", first)
    set_init_from(
        tmp_path / "c.jsonl", {"kind": "package", "method": "byol", "epochs": 3, "init_from": first}
    )
    runs = {
        name: {
            "name": name,
            "dataset": "imagenette-160",
            "metrics": f"{name}.jsonl",
            "hardware": "cpu",
            **({"continues": before} if before else {}),
        }
        for name, before in [("a", None), ("b", "a"), ("c", "b")]
    }
    row = quality_table.summarize(runs["c"], k=20, runs=runs)
    assert (row["epochs"], row["total_epochs"], row["knn_best_epoch"]) == (2, 7, 7)
    assert row["random_init"] == 0.30  # the first run's, two schedules back
    assert (row["train_minutes"], row["total_train_minutes"]) == (4.0, 9.0)
    assert [p["epoch"] for p in row["curve"]] == [0, 1, 2, 2, 3, 4, 5, 5, 6, 7]
    assert row["restarts"] == [2, 5]  # both later schedules, for the plot's markers
    assert "| c | byol | imagenette-160 | 5 + 2 = 7 |" in quality_table.markdown([row])

    # naming the first run instead of the one it started from is refused
    runs["c"]["continues"] = "a"
    with pytest.raises(ValueError, match="encoder of 5 epochs in all, not from a"):
        quality_table.summarize(runs["c"], k=20, runs=runs)


def test_a_long_run_name_is_cut_at_its_hyphens_into_lines_that_fit_the_plot():
    name = "barlow-twins-imagenette-40+38+20+18+24ep-bs64-lars0.25-crop0.4"
    lines = quality_table.title_lines(name)
    assert len(lines) == 2
    assert all(len(line) <= quality_table.TITLE_WIDTH for line in lines)
    assert "".join(lines) == name  # nothing dropped, only cut
    assert all(line.endswith("-") for line in lines[:-1])  # at hyphens, not mid-word
    assert quality_table.title_lines("simsiam-imagenette-5ep") == ["simsiam-imagenette-5ep"]
