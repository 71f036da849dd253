"""The quality table: our training runs beside the published results, from the runs' metrics logs.

Reads the runs listed in `benchmarks/quality_runs.json` (each a metrics log written by
`python -m training.train`, copied into `benchmarks/results/logs/`: one file per run, or a
folder per model trained in several schedules, one file per stage), and writes
  - benchmarks/results/quality.json and quality.md: method x dataset x epochs, our kNN top-1
    next to the published figure at its own epochs, the random initialisation of the same
    network (the run's `--eval-at-start` evaluation), training time and hardware;
  - benchmarks/results/knn-<run>.png: kNN top-1 against epoch, one plot per model: for the
    last run of a lineage (no other run continues it), its curve covering all the stages.

    python -m benchmarks.quality_table
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS, ROOT
from embedserve.package import lineage_epochs

TITLE_WIDTH = 48  # characters of a run name per title line at the plot's size and 9 pt

# Published ResNet-18 figures, from ../shared/guide/REFERENCE.md ("Published results").
PUBLISHED: dict[tuple[str, str], dict[str, Any]] = {
    ("barlow_twins", "imagenette-160"): {"knn": 0.852, "epochs": 800, "k": 20},
    ("byol", "imagenette-160"): {"knn": 0.887, "epochs": 800, "k": 20},
    ("simsiam", "imagenette-160"): {"knn": 0.872, "epochs": 800, "k": 20},
    ("barlow_twins", "cifar10"): {"knn": 0.842, "epochs": 200, "k": 200, "linear": 0.9210},
    ("byol", "cifar10"): {"knn": 0.869, "epochs": 200, "k": 200, "linear": 0.9258},
    ("simsiam", "cifar10"): {"knn": 0.819, "epochs": 200, "k": 200, "linear": 0.9051},
}
PUBLISHED_SOURCE = {
    "imagenette-160": "lightly benchmarks: 128 px, batch 256, 800 epochs, kNN k=20 on val "
    "(T=0.1), best epoch, one A6000 GPU",
    "cifar10": "lightly benchmarks: 200 epochs, batch 128, kNN k=200 (T=0.1), one A6000; "
    "linear probe: solo-learn, 1000 epochs",
}


def read_log(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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


def title_lines(name: str, width: int = TITLE_WIDTH) -> list[str]:
    """A run name cut at its hyphens into lines that fit the plot's width (long names ran off)."""
    return textwrap.wrap(name, width, break_on_hyphens=True)


def plot(row: dict[str, Any], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    xs = [p["epoch"] for p in row["curve"]]
    ys = [p["knn"] for p in row["curve"]]
    ax.plot(xs, ys, marker="o", label=f"{row['method']} (ours)")
    for i, restart in enumerate(row["restarts"]):
        label = "new schedule at " + ", ".join(map(str, row["restarts"])) if i == 0 else None
        ax.axvline(restart, color="tab:red", ls="--", lw=1, label=label)
    if row["random_init"] is not None:
        ax.axhline(row["random_init"], color="grey", ls=":", label="random init")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"kNN top-1 (k={row['knn_k']}, T={row['knn_temperature']})")
    ax.set_title("\n".join(title_lines(row["name"])), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path = out / f"knn-{row['name'].replace('/', '-')}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def linear_cell(row: dict[str, Any]) -> str:
    if row["random_init_linear"] is None:
        return pct(row["linear"])
    return f"{pct(row['linear'])} (random init {pct(row['random_init_linear'])})"


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# Embedding quality: our runs beside the published results",
        "",
        "Written by `python -m benchmarks.quality_table` from the runs' metrics logs "
        "(`benchmarks/quality_runs.json`, logs in `logs/`). kNN top-1 in %: weighted kNN on "
        "backbone features, cosine, T=0.07, gallery = train, queries = val (Imagenette) or test "
        "(CIFAR-10). 'final' is after the last epoch; 'best' is the best evaluated epoch (the "
        "published figures are best epochs). Random init: the same network before training. "
        "Linear: `embedserve eval --linear` on the exported package (logistic regression on frozen "
        "centre-crop embeddings of train, top-1 on test). A run started from another run's "
        "encoder (`--init-from`, a new schedule with fresh heads) gives its epochs and training "
        "time as earlier + its own; its random init is the earlier run's. A model trained in "
        "several schedules has a row per stage, `MODEL/NN-...` (its log "
        "`logs/MODEL/NN-....metrics.jsonl`), the row `MODEL` being its last stage; each model "
        "has one plot, `knn-MODEL.png`, its curve over all the stages.",
        "",
        "| run | method | dataset | epochs | kNN final | kNN best (epoch) | random init | "
        "published kNN (epochs) | linear | published linear | training | hardware |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        published = (
            f"{pct(r['published_knn'])} ({r['published_epochs']})" if r["published_knn"] else "-"
        )
        epochs, training = str(r["epochs"]), f"{r['train_minutes']} min"
        if r.get("continues"):
            first = r["total_epochs"] - r["epochs"]
            epochs = f"{first} + {r['epochs']} = {r['total_epochs']}"
            training = (
                f"{round(r['total_train_minutes'] - r['train_minutes'], 1)} + "
                f"{r['train_minutes']} = {r['total_train_minutes']} min"
            )
        lines.append(
            f"| {r['name']} | {r['method']} | {r['dataset']} | {epochs} | "
            f"{pct(r['knn_final'])} | {pct(r['knn_best'])} ({r['knn_best_epoch']}) | "
            f"{pct(r['random_init'])} | {published} | {linear_cell(r)} | "
            f"{pct(r['published_linear'])} | {training} | {r['hardware']} |"
        )
    lines += ["", "Published sources:"]
    lines += [f"- {d}: {s}" for d, s in PUBLISHED_SOURCE.items()]
    lines += ["", "Commands:"]
    lines += [f"- {r['name']}: `{r['command']}`" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / "quality_runs.json"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = json.loads(Path(args.runs).read_text())
    by_name = {run["name"]: run for run in runs}
    rows = [summarize(run, run.get("knn_k", 20), by_name) for run in runs]
    if not args.no_plots:
        continued = {run.get("continues") for run in runs}
        for row in rows:
            if row["name"] not in continued:  # the last of its lineage: one plot per model
                row["plot"] = str(plot(row, out).relative_to(out))
    (out / "quality.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "quality.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
