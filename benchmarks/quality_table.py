"""The quality table: the methods side by side, and every run beside the published results.

From `benchmarks/quality_runs.json`: "comparison", the equal-budget runs of the three methods,
each named by its recipe (training/recipes/: method, epochs, resolution, OUT of its live log
OUT/metrics.jsonl) with a committed copy of its log, `benchmarks/results/logs/NAME.metrics.jsonl`;
"runs", earlier runs' logs (one file per run, or a folder per model trained in several schedules,
one file per stage). Writes into benchmarks/results/: quality.json and quality.md (a row per
method run and one for the shipped default, models/DEFAULT: an exported package's figures from
its card and `embedserve eval` report, else its log's latest evaluation; then a row per run),
knn-methods.png (kNN per epoch, a line per method) and knn-<model>.png (one per lineage).

    python -m benchmarks.quality_table               # from the committed logs
    python -m benchmarks.quality_table --sync-logs   # first copies each live log over its
                                                     # committed copy when it extends it
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import textwrap
import tomllib
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
    "imagenette-160": "lightly benchmarks: 128 px, batch 256, 800 epochs, best epoch on val, one "
    "A6000 GPU; lightly's docs say kNN k=20, its benchmark script's kNN helper uses k=200, T=0.1",
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


def figure(size: tuple[float, float]) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size, dpi=120)


def save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot(row: dict[str, Any], out: Path) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig, ax = figure((5, 3.4))
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
    return save(fig, out / f"knn-{row['name'].replace('/', '-')}.png")


def pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.2f}"


def linear_cell(row: dict[str, Any]) -> str:
    if row["random_init_linear"] is None:
        return pct(row["linear"])
    return f"{pct(row['linear'])} (random init {pct(row['random_init_linear'])})"


def markdown(rows: list[dict[str, Any]], methods: list[dict[str, Any]] | None = None) -> str:
    lines = [
        "# Embedding quality: the methods side by side, and our runs beside the published results",
        "",
        *(methods_markdown(methods) if methods else []),
        "## Every run",
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


# -- the methods side by side: the equal-budget runs and the shipped default -----------------

# lightly's Imagenette ResNet-18 kNN top-1 at 200 and 800 epochs (../shared/guide/REFERENCE.md)
LIGHTLY = {"barlow_twins": (0.651, 0.852), "byol": (0.705, 0.887), "simsiam": (0.752, 0.872)}
METHOD_NAMES = {"barlow_twins": "Barlow Twins", "byol": "BYOL", "simsiam": "SimSiam"}
COLOURS = {"simsiam": "tab:green", "byol": "tab:orange", "barlow_twins": "tab:blue"}
# the CPU feature that decides a stretch's kernels, best first (the start record's cpu.flags)
CPU_FEATURES = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx2", "AVX2")]
HARDWARE = re.compile(r"CPU, \d+ cores \(([^,)]+)(?:, ([^)]+))?\), (\w+)")
METHODS_NOTES = """
- Percentages. Equal budget: one uninterrupted schedule per method from its recipe
  (`training/recipes/`), 200 epochs, batch 128. kNN: weighted, cosine, on backbone embeddings;
  gallery = Imagenette train, queries = val. 'exported': the package's figures, from its card
  (measured on model.onnx at export) and `embedserve eval` (`eval-NAME/eval.json`; linear probe
  with `--linear`); 'online (epoch E)': the training log's latest evaluation (every 5 epochs,
  at T=0.07 only). Random init: kNN k=20 of the untrained ResNet-18 (`--eval-at-start`).
- lightly: published Imagenette ResNet-18 kNN top-1 (batch 256, 128 px, best epoch, one A6000);
  its docs say k=20, its benchmark script's kNN helper uses k=200, T=0.1: compare with both.
- Hours: the sum of the logged epoch times (an interrupted epoch counts from its resume). CPUs:
  each stretch's (a start or resume of the run), from its start record ('xN': N stretches).
- Logs: `python -m benchmarks.quality_table --sync-logs` copies each live
  `runs/NAME/metrics.jsonl` over `logs/NAME.metrics.jsonl`. Curves: `knn-methods.png`.
"""


def cpu_label(start: dict[str, Any], hardware: str | None = None) -> str:
    """A stretch's CPU from its start record, else (logs older than the records' `cpu`) from the
    manifest's hardware line ("CPU, 2 cores (AMD EPYC, AVX2 only), fp32")."""
    if cpu := start.get("cpu"):
        feature = next((name for flag, name in CPU_FEATURES if flag in cpu.get("flags", [])), None)
        model, parts = cpu["model"], [feature, start.get("precision")]
    elif m := HARDWARE.fullmatch(hardware or ""):
        model, parts = m[1], [m[2], m[3]]
    else:
        return hardware or "?"
    parts = [p for p in parts if p]
    return f"{model} ({', '.join(parts)})" if parts else model


def stage_facts(stages: list[dict[str, Any]]) -> dict[str, Any]:
    """Epochs, seconds, CPUs, resolutions and evaluations of a run's logs, first stage first.

    Per epoch the last record counts (a run resumed from a checkpoint older than its last epoch
    record logs that epoch again); every start record (a start or a resume) is a stretch."""
    facts: dict[str, Any] = {"epochs": 0, "seconds": 0.0, "cpus": [], "plan": [], "evals": []}
    facts["init"] = facts["config"] = None
    for stage in stages:
        path = ROOT / stage["metrics"]
        records = read_log(path) if path.exists() else []
        starts = [r for r in records if r["kind"] == "start"]
        if not starts:
            continue
        epochs = {r["epoch"]: r["seconds"] for r in records if r["kind"] == "epoch"}
        evals = {r["epoch"]: r for r in records if r["kind"] == "eval" and r.get("tag") != "init"}
        init = next((r for r in records if r["kind"] == "eval" and r.get("tag") == "init"), None)
        if init is not None and stage is stages[0]:  # the first stage's: a random network
            facts["init"] = init.get("knn_top1_k20")
        offset, done = facts["epochs"], max(epochs, default=0)
        facts["evals"] += [{**evals[e], "epoch": offset + e} for e in sorted(evals)]
        facts["epochs"] += done
        facts["seconds"] += sum(epochs.values())
        facts["cpus"] += [cpu_label(s, stage.get("hardware")) for s in starts]
        cfg = facts["config"] = starts[-1]["config"]
        facts["plan"].append((cfg["image_size"], cfg.get("eval_size") or cfg["image_size"], done))
    return facts


def resolution(plan: list[tuple[int, int, int]]) -> str:
    """'96 px crops, 128 px eval'; a lineage trained at several sizes gives each size's epochs."""
    crops: list[list[int]] = []
    for size, _, epochs in plan:
        if crops and crops[-1][0] == size:
            crops[-1][1] += epochs
        else:
            crops.append([size, epochs])
    if len(crops) <= 1:
        return f"{plan[0][0]} px crops, {plan[-1][1]} px eval" if plan else "-"
    sizes = ", then ".join(f"{size} px crops ({epochs} ep)" for size, epochs in crops)
    return f"{sizes}; {plan[-1][1]} px eval"


def read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def package_figures(card: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The exported package's kNN (its `embedserve eval` report over its card), retrieval, linear."""
    knn = {(e["k"], e["temperature"]): e["top1"] for e in card["metrics"]["knn"]}
    knn |= {(e["k"], e["temperature"]): e["top1"] for e in report.get("knn", [])}
    k200 = (200, 0.1) if (200, 0.1) in knn else next((k for k in knn if k[0] == 200), (200, None))
    retrieval = report.get("retrieval", {})
    return {
        "source": "exported" if report else "exported (card only)",
        "knn_k20": knn.get((20, 0.07)),
        "knn_k200": knn.get(k200),
        "knn_k200_temperature": k200[1],
        "recall@1": retrieval.get("recall@1"),
        "map@r": retrieval.get("map@r"),
        "linear": report.get("linear", {}).get("top1"),
    }


def method_row(
    name: str, method: str, role: str, stages: list[dict], planned: int | None, init: float | None
) -> dict[str, Any]:
    """One row of the methods table: the package's figures once exported, else the log's."""
    f = stage_facts(stages)
    card = read_json(ROOT / "models" / name / "card.json")
    report = read_json(ROOT / "benchmarks" / "results" / f"eval-{name}" / "eval.json") or {}
    row: dict[str, Any] = {"name": name, "method": method, "role": role, "source": None}
    if card:
        row |= package_figures(card, report)
    elif f["evals"]:
        last = f["evals"][-1]
        row |= {"source": "online", "source_epoch": last["epoch"]}
        row |= {"knn_k20": last.get("knn_top1_k20"), "knn_k200": last.get("knn_top1_k200")}
        row["knn_k200_temperature"] = f["config"]["knn_temperature"]  # the log's only T
    if card:
        package = f"models/{name}"
    elif f["config"] is None:
        package = "not started"
    elif planned is not None and f["epochs"] < planned:
        package = f"in progress: epoch {f['epochs']} of {planned}"
    else:
        package = "not exported yet"
    training = (card or {}).get("training", {})
    seconds = f["seconds"] if f["config"] else training.get("duration_seconds")
    lightly = LIGHTLY.get(method, (None, None))
    return row | {
        "package": package,
        "random_init": f["init"] if f["init"] is not None else init,
        "lightly_200": lightly[0],
        "lightly_800": lightly[1],
        "epochs": f["epochs"],
        "epochs_planned": planned,
        "stages": len(stages),
        "resolution": resolution(f["plan"]),
        "hours": None if seconds is None else round(seconds / 3600, 2),
        "cpus": f["cpus"],
        "curve": [{"epoch": e["epoch"], "knn": e.get("knn_top1_k20")} for e in f["evals"]],
    }


def lineage(name: str, runs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The manifest's stages of a model, first first, following "continues" back from `name`."""
    stages = []
    while name in runs:
        stages.insert(0, runs[name])
        name = runs[name].get("continues")
    return stages


def method_rows(
    comparison: list[dict[str, Any]], runs: dict[str, dict[str, Any]], rows: dict[str, dict]
) -> list[dict[str, Any]]:
    """A row per comparison run (from its recipe and committed log), then the shipped default
    (models/DEFAULT), its stages the manifest's runs of its lineage."""
    out = []
    for entry in comparison:
        recipe = tomllib.loads((ROOT / entry["recipe"]).read_text())
        init = rows[entry["random_init_from"]]["random_init"]
        planned = recipe["epochs"]
        out.append(
            method_row(entry["name"], recipe["method"], "equal budget", [entry], planned, init)
        )
        if out[-1]["resolution"] == "-":  # not started: the recipe's plan
            size = recipe["image_size"]
            out[-1]["resolution"] = resolution([(size, recipe.get("eval_size") or size, 0)])
    if (ROOT / "models" / "DEFAULT").exists():
        name = (ROOT / "models" / "DEFAULT").read_text().strip()
        stages = [e for e in comparison if e["name"] == name] or lineage(name, runs)
        card = read_json(ROOT / "models" / name / "card.json") or {}
        method = card.get("method") or rows.get(name, {}).get("method", "?")
        init = rows.get(name, {}).get("random_init")
        out.append(method_row(name, method, "shipped default", stages, None, init))
    return out


def sync_logs(comparison: list[dict[str, Any]]) -> list[str]:
    """Copy each live log (the recipe's OUT/metrics.jsonl, not committed) over its committed
    copy when it is longer; whole lines only (the trainer may be writing one). A live log that
    does not begin with the committed one (a different run) is refused."""
    done = []
    for entry in comparison:
        recipe = tomllib.loads((ROOT / entry["recipe"]).read_text())
        live, committed = ROOT / recipe["out"] / "metrics.jsonl", ROOT / entry["metrics"]
        if not live.exists():
            continue
        text = live.read_text()
        text = text[: text.rfind("\n") + 1]
        old = committed.read_text() if committed.exists() else ""
        if len(text) <= len(old):
            continue
        if not text.startswith(old):
            raise ValueError(f"{live} does not continue {committed}: not copied")
        committed.parent.mkdir(parents=True, exist_ok=True)
        committed.write_text(text)
        done.append(f"synced {entry['metrics']} from {recipe['out']}/metrics.jsonl")
    return done


def plot_methods(rows: list[dict[str, Any]], out: Path) -> Path:
    """kNN top-1 (k=20) against epoch, a line per comparison run; lightly's 200-epoch figures
    dashed in the same colours; a run in progress ends where it is."""
    fig, ax = figure((7, 5))
    runs = [r for r in rows if r["role"] == "equal budget"]
    for r in runs:
        colour, label = COLOURS.get(r["method"]), METHOD_NAMES.get(r["method"], r["method"])
        xs, ys = [p["epoch"] for p in r["curve"]], [p["knn"] for p in r["curve"]]
        done = f"{r['epochs']}/{r['epochs_planned']} ep"
        ax.plot(xs, ys, marker="o", ms=3, color=colour, label=f"{label}, ours ({done})")
        if r["lightly_200"] is not None:
            ax.axhline(
                r["lightly_200"], color=colour, ls="--", lw=1, label=f"{label}, lightly 200 ep"
            )
    inits = [r["random_init"] for r in runs if r["random_init"] is not None]
    if inits:  # labelled on the plot: the legend keeps a column per method
        ax.axhline(inits[0], color="grey", ls=":", lw=1)
        ax.text(2, inits[0] + 0.004, "random init", color="grey", fontsize=7)
    ax.set_xlim(0, max([r["epochs_planned"] or 0 for r in runs] + [1]))
    ax.set_xlabel("epoch")
    ax.set_ylabel("kNN top-1 (k=20, T=0.07, val at 128 px)")
    ax.set_title("Equal budget: ResNet-18 on Imagenette, 200 epochs, batch 128", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), fontsize=7, ncol=3)
    return save(fig, out / "knn-methods.png")


def methods_markdown(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## The methods side by side",
        "",
        "| method | package | figures | kNN k=20 T=0.07 | kNN k=200 T=0.1 | recall@1 | mAP@R | "
        "linear | random init | lightly 200 ep | lightly 800 ep | epochs | resolution | "
        "hours | CPUs of its stretches |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        source = r["source"] or "-"
        if source == "online":
            source = f"online (epoch {r['source_epoch']})"
        k200 = pct(r.get("knn_k200"))
        if r.get("knn_k200") is not None and r["knn_k200_temperature"] != 0.1:
            k200 += f" (T={r['knn_k200_temperature']})"
        epochs = f"{r['epochs']} / {r['epochs_planned']}"
        if r["epochs_planned"] is None:
            epochs = f"{r['epochs']} ({r['stages']} stages)"
        hours = "-" if r["hours"] is None else f"{r['hours']:.1f}"
        counts = {cpu: r["cpus"].count(cpu) for cpu in r["cpus"]}  # in order of first use
        cpus = "; ".join(f"{c} x{n}" if n > 1 else c for c, n in counts.items()) or "-"
        method = METHOD_NAMES.get(r["method"], r["method"])
        if r["role"] != "equal budget":
            method += f" ({r['role']})"
        lines.append(
            f"| {method} | {r['package']} | {source} | {pct(r.get('knn_k20'))} | {k200} | "
            f"{pct(r.get('recall@1'))} | {pct(r.get('map@r'))} | {pct(r.get('linear'))} | "
            f"{pct(r['random_init'])} | {pct(r['lightly_200'])} | {pct(r['lightly_800'])} | "
            f"{epochs} | {r['resolution']} | {hours} | {cpus} |"
        )
    return lines + METHODS_NOTES.splitlines() + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--runs", default=str(ROOT / "benchmarks" / "quality_runs.json"))
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--no-plots", action="store_true")
    p.add_argument(
        "--sync-logs",
        action="store_true",
        help="first copy each comparison run's live log over its committed copy if it extends it",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads(Path(args.runs).read_text())
    if args.sync_logs:
        for line in sync_logs(manifest["comparison"]):
            print(line)
    runs = manifest["runs"]
    by_name = {run["name"]: run for run in runs}
    rows = [summarize(run, run.get("knn_k", 20), by_name) for run in runs]
    methods = method_rows(manifest["comparison"], by_name, {r["name"]: r for r in rows})
    if not args.no_plots:
        continued = {run.get("continues") for run in runs}
        for row in rows:
            if row["name"] not in continued:  # the last of its lineage: one plot per model
                row["plot"] = str(plot(row, out).relative_to(out))
        plot_methods(methods, out)
    (out / "quality.json").write_text(
        json.dumps({"methods": methods, "runs": rows}, indent=2) + "\n"
    )
    (out / "quality.md").write_text(markdown(rows, methods))
    print(markdown(rows, methods))
    return 0


if __name__ == "__main__":
    sys.exit(main())
