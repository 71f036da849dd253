"""The quality table (benchmarks.quality_table) reads what the trainer writes: a metrics log
made by a real short run gives the row and the plot, and the shipped manifest's logs parse."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import (
    quality_logs,
    quality_markdown,
    quality_methods,
    quality_plots,
    quality_sync,
    quality_table,
)
from benchmarks.common import ROOT


def use_root(monkeypatch, root: Path) -> None:
    """Read the runs' logs, recipes, cards and eval reports below `root`."""
    for module in (quality_logs, quality_methods, quality_sync, quality_table):
        monkeypatch.setattr(module, "ROOT", root)


def write_log(path: Path, init: float, per_epoch: list[float], seconds: float) -> None:
    records = [
        {
            "kind": "start",
            "config": {
                "method": "byol",
                "image_size": 128,
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
    use_root(monkeypatch, tmp_path)
    write_log(tmp_path / "run.jsonl", init=0.30, per_epoch=[0.35, 0.42, 0.41], seconds=90)
    run = {"name": "r", "dataset": "imagenette-160", "metrics": "run.jsonl", "hardware": "cpu"}
    row = quality_logs.summarize(run, k=20)
    assert (row["epochs"], row["knn_final"], row["knn_best"], row["knn_best_epoch"]) == (
        3,
        0.41,
        0.42,
        2,
    )
    assert row["random_init"] == 0.30 and row["train_minutes"] == 4.5
    assert row["published_knn"] == 0.887 and row["published_epochs"] == 800
    assert [p["epoch"] for p in row["curve"]] == [0, 1, 2, 3]
    md = quality_markdown.markdown([row])
    assert "| r | byol | imagenette-160 | 3 | 41.00 | 42.00 (2) | 30.00 | 88.70 (800) |" in md
    assert quality_plots.plot(row, tmp_path).stat().st_size > 1000  # a PNG was drawn


def test_the_linear_probe_comes_from_the_eval_reports_the_run_names(tmp_path, monkeypatch):
    use_root(monkeypatch, tmp_path)
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
    row = quality_logs.summarize(run, k=20)
    assert (row["linear"], row["random_init_linear"], row["published_linear"]) == (
        0.6123,
        0.3456,
        0.9258,
    )
    assert "| 61.23 (random init 34.56) | 92.58 |" in quality_markdown.markdown([row])
    (tmp_path / "init.json").write_text(json.dumps({"knn": []}))
    with pytest.raises(ValueError, match="no linear probe"):
        quality_logs.summarize(run, k=20)


def test_a_log_without_a_trained_evaluation_is_refused(tmp_path, monkeypatch):
    use_root(monkeypatch, tmp_path)
    write_log(tmp_path / "run.jsonl", init=0.30, per_epoch=[], seconds=90)
    run = {"name": "r", "dataset": "cifar10", "metrics": "run.jsonl", "hardware": "cpu"}
    with pytest.raises(ValueError, match="no evaluation after an epoch"):
        quality_logs.summarize(run, k=20)


def test_the_shipped_manifest_builds_the_table(tmp_path):
    assert quality_table.main(["--out", str(tmp_path), "--no-plots"]) == 0
    table = json.loads((tmp_path / "quality.json").read_text())
    manifest = json.loads((ROOT / "benchmarks" / "quality_runs.json").read_text())
    assert [r["name"] for r in table["runs"]] == [m["name"] for m in manifest["runs"]]
    assert all(r["knn_final"] > r["random_init"] for r in table["runs"])
    default = (ROOT / "models" / "DEFAULT").read_text().strip()
    recipes = [m["name"] for m in manifest["comparison"]]
    # the default gets its own row unless it is one of the recipes' runs, whose row it marks
    assert [r["name"] for r in table["methods"]] == recipes + [default] * (default not in recipes)
    assert [r["name"] for r in table["methods"] if r["default"]] == [default]
    assert {r["method"] for r in table["methods"]} == {"simsiam", "byol", "barlow_twins"}


def test_a_run_started_from_another_counts_both_and_keeps_the_first_ones_baseline(
    tmp_path, monkeypatch
):
    use_root(monkeypatch, tmp_path)
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
    row = quality_logs.summarize(runs["second"], k=20, runs=runs)
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
    md = quality_markdown.markdown([row])
    assert "| second | byol | imagenette-160 | 2 + 3 = 5 | 58.00 | 58.00 (5) | 30.00 |" in md
    assert "| 2.0 + 6.0 = 8.0 min |" in md
    assert quality_plots.plot(row, tmp_path).stat().st_size > 1000

    # the manifest must name the earlier run, and it must be the one the log started from
    del runs["second"]["continues"]
    with pytest.raises(ValueError, match="name that run in the manifest"):
        quality_logs.summarize(runs["second"], k=20, runs=runs)
    runs["second"]["continues"] = "first"
    set_init_from(tmp_path / "second.jsonl", {**source, "epochs": 40})
    with pytest.raises(ValueError, match="not from first"):
        quality_logs.summarize(runs["second"], k=20, runs=runs)


def test_a_second_continuation_counts_the_whole_lineage(tmp_path, monkeypatch):
    """A run started from a continued run's package: the source's record counts its own
    epochs, with the run before it nested; the row counts all three schedules."""
    use_root(monkeypatch, tmp_path)
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
    row = quality_logs.summarize(runs["c"], k=20, runs=runs)
    assert (row["epochs"], row["total_epochs"], row["knn_best_epoch"]) == (2, 7, 7)
    assert row["random_init"] == 0.30  # the first run's, two schedules back
    assert (row["train_minutes"], row["total_train_minutes"]) == (4.0, 9.0)
    assert [p["epoch"] for p in row["curve"]] == [0, 1, 2, 2, 3, 4, 5, 5, 6, 7]
    assert row["restarts"] == [2, 5]  # both later schedules, for the plot's markers
    assert "| c | byol | imagenette-160 | 5 + 2 = 7 |" in quality_markdown.markdown([row])

    # naming the first run instead of the one it started from is refused
    runs["c"]["continues"] = "a"
    with pytest.raises(ValueError, match="encoder of 5 epochs in all, not from a"):
        quality_logs.summarize(runs["c"], k=20, runs=runs)


def test_a_long_run_name_is_cut_at_its_hyphens_into_lines_that_fit_the_plot():
    name = "barlow-twins-imagenette-40+38+20+18+24ep-bs64-lars0.25-crop0.4"
    lines = quality_plots.title_lines(name)
    assert len(lines) == 2
    assert all(len(line) <= quality_plots.TITLE_WIDTH for line in lines)
    assert "".join(lines) == name  # nothing dropped, only cut
    assert all(line.endswith("-") for line in lines[:-1])  # at hyphens, not mid-word
    assert quality_plots.title_lines("simsiam-imagenette-5ep") == ["simsiam-imagenette-5ep"]


# -- the methods side by side ----------------------------------------------------------------

EPYC = ("AMD EPYC", ["avx2", "avx512f", "avx512_bf16"], "bf16")
XEON = ("Intel Xeon", ["avx2", "avx512f", "avx512_bf16", "amx_bf16"], "bf16")


def write_stretches(path: Path, method: str, stretches: list) -> None:
    """A comparison run's log: per stretch (a start or a resume) its CPU and its epochs as
    (epoch, seconds, kNN k=20 or None), as the trainer writes them."""
    records = []
    for (model, flags, precision), epochs in stretches:
        config = {"method": method, "image_size": 96, "eval_size": 128, "epochs": 200}
        cpu = {"model": model, "cores": 2, "flags": flags}
        records.append(
            {"kind": "start", "config": {**config, "knn_temperature": 0.07}, "cpu": cpu}
            | {"precision": precision}
        )
        for epoch, seconds, knn in epochs:
            if knn is not None:
                records.append(
                    {"kind": "eval", "epoch": epoch, "tag": "epoch", "knn_top1_k20": knn}
                    | {"knn_top1_k200": round(knn - 0.01, 4)}
                )
            records.append({"kind": "epoch", "epoch": epoch, "seconds": seconds})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def comparison(tmp_path: Path, monkeypatch) -> tuple[list[dict], dict]:
    """Two comparison runs (recipes under tmp_path) and the run giving their random init."""
    use_root(monkeypatch, tmp_path)
    entries = []
    for method in ("simsiam", "byol"):
        recipe = tmp_path / "training" / "recipes" / f"{method}.toml"
        recipe.parent.mkdir(parents=True, exist_ok=True)
        recipe.write_text(
            f'method = "{method}"\nout = "runs/{method}"\nimage_size = 96\n'
            "eval_size = 128\nepochs = 200\n"
        )
        entries.append(
            {
                "name": method,
                "recipe": f"training/recipes/{method}.toml",
                "metrics": f"logs/{method}.metrics.jsonl",
                "random_init_from": "init",
            }
        )
    write_log(tmp_path / "init.jsonl", init=0.346, per_epoch=[0.40], seconds=60)
    init = {"name": "init", "dataset": "imagenette-160", "metrics": "init.jsonl", "hardware": "x"}
    rows = {"init": quality_logs.summarize(init, k=20)}
    return entries, rows


def test_a_run_in_progress_shows_its_latest_online_figures_hours_and_cpus(tmp_path, monkeypatch):
    entries, rows = comparison(tmp_path, monkeypatch)
    # three stretches on two CPUs; the resume after epoch 6 logged epoch 6 again (counted once)
    first = [(e, 1800.0, 0.40 if e == 5 else None) for e in range(1, 7)]
    second = [(e, 1800.0, 0.45 if e == 10 else None) for e in range(6, 11)]
    third = [(11, 900.0, None)]
    stretches = [(EPYC, first), (XEON, second), (EPYC, third)]  # back on the first CPU
    write_stretches(tmp_path / "logs/simsiam.metrics.jsonl", "simsiam", stretches)

    ss, byol = quality_methods.method_rows(entries, {}, rows)
    assert (ss["source"], ss["source_epoch"], ss["knn_k20"], ss["knn_k200"]) == (
        "online",
        10,
        0.45,
        0.44,
    )
    assert ss["package"] == "in progress: epoch 11 of 200" and ss["epochs"] == 11
    assert ss["hours"] == 5.25  # 10 epochs of 30 min + 15 min, epoch 6 once
    assert ss["random_init"] == 0.346  # from the run the manifest names
    assert [p["epoch"] for p in ss["curve"]] == [5, 10]
    assert byol["package"] == "not started" and byol["hours"] is None and byol["curve"] == []
    assert byol["resolution"] == "96 px crops, 128 px eval"  # the recipe's plan
    md = "\n".join(quality_markdown.methods_markdown([ss, byol]))
    assert (
        "| SimSiam | in progress: epoch 11 of 200 | online (epoch 10) | 45.00 | 44.00 (T=0.07) "
        "| - | - | - | 34.60 | 75.20 | 87.20 | 11 / 200 | 96 px crops, 128 px eval | 5.2 | "
        "AMD EPYC (AVX512-BF16, bf16) x2; Intel Xeon (AMX, bf16) |"
    ) in md
    assert "| BYOL | not started | - | - |" in md


def test_an_exported_package_gives_the_card_and_eval_figures(tmp_path, monkeypatch):
    entries, rows = comparison(tmp_path, monkeypatch)
    write_stretches(
        tmp_path / "logs/simsiam.metrics.jsonl",
        "simsiam",
        [(EPYC, [(e, 3600.0, 0.5 + e / 1000) for e in range(1, 201)])],
    )
    (ss, _) = quality_methods.method_rows(entries, {}, rows)
    assert ss["package"] == "not exported yet" and ss["source"] == "online"
    assert ss["knn_k20"] == 0.7 and ss["epochs"] == 200 and ss["hours"] == 200.0

    card = tmp_path / "models/simsiam/card.json"
    card.parent.mkdir(parents=True)
    knn = [
        {"k": 20, "temperature": 0.07, "top1": 0.71},
        {"k": 200, "temperature": 0.07, "top1": 0.69},
    ]
    card.write_text(json.dumps({"method": "simsiam", "metrics": {"knn": knn}}))
    (ss, _) = quality_methods.method_rows(entries, {}, rows)
    # no eval report yet: the card's figures, its k=200 at T=0.07 (marked)
    assert (ss["source"], ss["package"], ss["knn_k20"], ss["knn_k200"]) == (
        "exported (card only)",
        "models/simsiam",
        0.71,
        0.69,
    )
    assert ss["knn_k200_temperature"] == 0.07 and ss["recall@1"] is None

    report = tmp_path / "benchmarks/results/eval-simsiam/eval.json"
    report.parent.mkdir(parents=True)
    evals = [
        {"k": 20, "temperature": 0.07, "top1": 0.7105},
        {"k": 200, "temperature": 0.1, "top1": 0.695},
    ]
    report.write_text(
        json.dumps(
            {
                "knn": evals,
                "retrieval": {"recall@1": 0.66, "map@r": 0.31},
                "linear": {"top1": 0.8},
            }
        )
    )
    (ss, _) = quality_methods.method_rows(entries, {}, rows)
    assert (ss["knn_k20"], ss["knn_k200"], ss["knn_k200_temperature"]) == (0.7105, 0.695, 0.1)
    assert (ss["recall@1"], ss["map@r"], ss["linear"]) == (0.66, 0.31, 0.8)
    assert ss["source"] == "exported"
    md = "\n".join(quality_markdown.methods_markdown([ss]))
    assert "| SimSiam | models/simsiam | exported | 71.05 | 69.50 | 66.00 | 31.00 | 80.00 |" in md
    assert "| 200 / 200 | 96 px crops, 128 px eval | 200.0 |" in md


def test_the_default_row_sums_its_lineage_and_the_plot_is_written(tmp_path, monkeypatch):
    entries, _ = comparison(tmp_path, monkeypatch)
    write_stretches(
        tmp_path / "logs/simsiam.metrics.jsonl",
        "simsiam",
        [(EPYC, [(e, 600.0, 0.40 + e / 100 if e % 5 == 0 else None) for e in range(1, 16)])],
    )
    # the default: two stages, the first logged before start records named their CPU
    write_log(tmp_path / "a.jsonl", init=0.35, per_epoch=[0.40, 0.50], seconds=1800)
    write_stretches(tmp_path / "b.jsonl", "byol", [(XEON, [(1, 3600.0, 0.55)])])
    set_init_from(tmp_path / "b.jsonl", {"kind": "package", "method": "byol", "epochs": 2})
    stage = {"dataset": "imagenette-160", "hardware": "CPU, 2 cores (AMD EPYC, AVX2 only), fp32"}
    runs = [
        {"name": "m", "metrics": "b.jsonl", "continues": "m/01"} | stage,
        {"name": "m/01", "metrics": "a.jsonl"} | stage,
        {"name": "init", "metrics": "init.jsonl"} | stage,
    ]
    (tmp_path / "manifest.json").write_text(json.dumps({"comparison": entries, "runs": runs}))
    (tmp_path / "models").mkdir()
    (tmp_path / "models/DEFAULT").write_text("m\n")
    out = tmp_path / "out"
    assert quality_table.main(["--runs", str(tmp_path / "manifest.json"), "--out", str(out)]) == 0
    methods = json.loads((out / "quality.json").read_text())["methods"]
    default = methods[-1]
    assert (default["name"], default["role"], default["package"]) == (
        "m",
        "shipped default",
        "not exported yet",
    )
    assert (default["epochs"], default["hours"], default["random_init"]) == (3, 2.0, 0.35)
    assert default["cpus"] == ["AMD EPYC (AVX2 only, fp32)", "Intel Xeon (AMX, bf16)"]
    assert default["resolution"] == "128 px crops (2 ep), then 96 px crops (1 ep); 128 px eval"
    md = (out / "quality.md").read_text()
    assert md.index("## The methods side by side") < md.index("## Every run")
    assert "| BYOL (shipped default) | not exported yet | online (epoch 3) | 55.00 |" in md
    assert "| 3 (2 stages) |" in md
    assert (out / "knn-methods.png").stat().st_size > 10_000
    assert [p["epoch"] for p in methods[0]["curve"]] == [5, 10, 15]


def test_a_default_that_is_an_equal_budget_run_is_marked_on_its_row_not_repeated(
    tmp_path, monkeypatch
):
    entries, rows = comparison(tmp_path, monkeypatch)
    write_stretches(
        tmp_path / "logs/byol.metrics.jsonl", "byol", [(EPYC, [(e, 60.0, 0.6) for e in (1, 2)])]
    )
    (tmp_path / "models").mkdir()
    (tmp_path / "models/DEFAULT").write_text("byol\n")
    methods = quality_methods.method_rows(entries, {}, rows)
    assert [(r["name"], r["role"], r["default"]) for r in methods] == [
        ("simsiam", "equal budget", False),
        ("byol", "equal budget", True),
    ]
    md = "\n".join(quality_markdown.methods_markdown(methods))
    assert "| BYOL (equal budget; the shipped default) | in progress: epoch 2 of 200 |" in md
    assert "| SimSiam | not started |" in md


def test_sync_logs_copies_a_longer_live_log_that_continues_the_committed_one(tmp_path, monkeypatch):
    entries, _ = comparison(tmp_path, monkeypatch)
    live = tmp_path / "runs/simsiam/metrics.jsonl"
    live.parent.mkdir(parents=True)
    live.write_text('{"kind": "start"}\n{"kind": "epoch", "epoch": 1}\n{"kind": "ep')
    committed = tmp_path / "logs/simsiam.metrics.jsonl"
    assert quality_sync.sync_logs(entries) == [
        "synced logs/simsiam.metrics.jsonl from runs/simsiam/metrics.jsonl"
    ]
    # whole lines only: the trainer may be writing the last one
    assert committed.read_text() == '{"kind": "start"}\n{"kind": "epoch", "epoch": 1}\n'
    assert quality_sync.sync_logs(entries) == []  # nothing new
    committed.write_text(committed.read_text() + '{"kind": "epoch", "epoch": 2}\n')
    assert quality_sync.sync_logs(entries) == []  # the committed copy is longer: kept
    assert committed.read_text().count("\n") == 3
    live.write_text('{"kind": "start", "other": 1}\n' * 5)
    with pytest.raises(ValueError, match="does not continue"):
        quality_sync.sync_logs(entries)
    # a restarted run, still shorter than the lost one's committed log: refused, not skipped
    live.write_text('{"kind": "start", "other": 1}\n')
    with pytest.raises(ValueError, match="delete logs/simsiam.metrics.jsonl first"):
        quality_sync.sync_logs(entries)
    assert committed.read_text().count("\n") == 3  # the committed log is kept
    committed.unlink()  # deleted on purpose: the restarted run's log replaces it
    assert quality_sync.sync_logs(entries) == [
        "synced logs/simsiam.metrics.jsonl from runs/simsiam/metrics.jsonl"
    ]
    assert committed.read_text() == '{"kind": "start", "other": 1}\n'
