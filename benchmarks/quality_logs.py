"""Every run of the quality table from its metrics log: a row of kNN (final, best, random
init), the linear probe of its `embedserve eval --linear` report, training time, and the published
figure for its method and dataset; a run started from another's encoder counts both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from benchmarks.common import ROOT
from embedserve.package import lineage_epochs

# Published ResNet-18 figures, from ../shared/guide/REFERENCE.md ("Published results").
PUBLISHED: dict[tuple[str, str], dict[str, Any]] = {
    ("barlow_twins", "imagenette-160"): {"knn": 0.852, "epochs": 800, "k": 20},
    ("byol", "imagenette-160"): {"knn": 0.887, "epochs": 800, "k": 20},
    ("simsiam", "imagenette-160"): {"knn": 0.872, "epochs": 800, "k": 20},
    ("barlow_twins", "cifar10"): {"knn": 0.842, "epochs": 200, "k": 200, "linear": 0.9210},
    ("byol", "cifar10"): {"knn": 0.869, "epochs": 200, "k": 200, "linear": 0.9258},
    ("simsiam", "cifar10"): {"knn": 0.819, "epochs": 200, "k": 200, "linear": 0.9051},
}


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def linear_top1(run: dict[str, Any], key: str) -> float | None:
    """The linear probe's top-1 from an `embedserve eval --linear` report named in the manifest."""
    if key not in run:
        return None
    report = json.loads((ROOT / run[key]).read_text())
    if "linear" not in report:
        raise ValueError(f"{run[key]}: no linear probe (run embedserve eval with --linear)")
    return report["linear"]["top1"]


def summarize(
    run: dict[str, Any], k: int, runs: dict[str, dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One table row from a run's metrics log.

    A run started from another's encoder (`--init-from`) names that run in the manifest
    (`"continues": NAME`, looked up in `runs`): its row then counts both runs' epochs and
    training time, its curve follows the earlier one, and its random-initialisation baseline is
    the earlier run's (its own first evaluation is the starting point, not a random network).
    """
    records = read_log(ROOT / run["metrics"])
    start = next(r for r in records if r["kind"] == "start")
    cfg = start["config"]
    evals = [r for r in records if r["kind"] == "eval"]
    key = f"knn_top1_k{k}"
    init = next((r[key] for r in evals if r.get("tag") == "init"), None)
    trained = [(r["epoch"], r[key]) for r in evals if r.get("tag") != "init"]
    if not trained:
        raise ValueError(f"{run['metrics']}: no evaluation after an epoch")
    epochs = [r for r in records if r["kind"] == "epoch"]
    minutes = round(sum(e["seconds"] for e in epochs) / 60, 1)
    before = None
    if start.get("init_from") or "continues" in run:
        before = continued(run, start, cfg, k, runs or {})
    # epochs are counted from the first run's start, as the curve and the epochs cell count them
    offset = before["total_epochs"] if before else 0
    curve = [(p["epoch"], p["knn"]) for p in before["curve"]] if before else []
    curve += [(offset + e, v) for e, v in ([(0, init)] if init is not None else []) + trained]
    final_epoch, final = trained[-1]
    best_epoch, best = max(trained, key=lambda e: e[1])
    best_epoch += offset
    published = PUBLISHED.get((cfg["method"], run["dataset"]), {})
    return {
        "name": run["name"],
        "method": cfg["method"],
        "dataset": run["dataset"],
        "epochs": final_epoch,
        "knn_k": k,
        "knn_temperature": cfg["knn_temperature"],
        "knn_final": final,
        "knn_best": best,
        "knn_best_epoch": best_epoch,
        "random_init": before["random_init"] if before else init,
        "start_knn": init if before else None,
        "continues": before["name"] if before else None,
        "total_epochs": offset + final_epoch,
        # the epochs (counted from the first run's start) at which each later schedule began
        "restarts": (before["restarts"] + [offset]) if before else [],
        "linear": linear_top1(run, "linear_eval"),
        "random_init_linear": linear_top1(run, "random_init_linear_eval"),
        "published_knn": published.get("knn"),
        "published_epochs": published.get("epochs"),
        "published_linear": published.get("linear"),
        "train_minutes": minutes,
        "total_train_minutes": round((before["total_train_minutes"] if before else 0) + minutes, 1),
        "hardware": run["hardware"],
        "command": cfg.get("extra", {}).get("command"),
        "curve": [{"epoch": e, "knn": v} for e, v in curve],
    }


def continued(
    run: dict[str, Any], start: dict[str, Any], cfg: dict[str, Any], k: int, runs: dict
) -> dict[str, Any]:
    """The row of the run that `run` started from, checked against what its log recorded."""
    source = start.get("init_from") or {}
    name = run.get("continues")
    if name is None or name not in runs:
        raise ValueError(
            f"{run['metrics']}: the run started from {source.get('path', 'another encoder')}; "
            f'name that run in the manifest with "continues" (got {name!r})'
        )
    if not source:
        raise ValueError(f'{run["metrics"]}: "continues": {name!r}, but the log has no init_from')
    before = summarize(runs[name], k, runs)
    # the source's record counts its own epochs; those of the runs before it are nested in it
    source_epochs = lineage_epochs(source)
    if source_epochs != before["total_epochs"] or source.get("method") != cfg["method"]:
        raise ValueError(
            f"{run['metrics']}: started from a {source.get('method')} encoder of "
            f"{source_epochs} epochs in all, not from {name} ({before['method']}, "
            f"{before['total_epochs']} epochs)"
        )
    return before
