"""The quality table in markdown: the methods side by side, then every run beside the
published results.
"""

from __future__ import annotations

from typing import Any

from benchmarks.quality_methods import METHOD_NAMES

PUBLISHED_SOURCE = {
    "imagenette-160": "lightly benchmarks: 128 px, batch 256, 800 epochs, best epoch on val, one "
    "A6000 GPU; lightly's docs say kNN k=20, its benchmark script's kNN helper uses k=200, T=0.1",
    "cifar10": "lightly benchmarks: 200 epochs, batch 128, kNN k=200 (T=0.1), one A6000; "
    "linear probe: solo-learn, 1000 epochs",
}


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
        elif r.get("default"):
            method += " (equal budget; the shipped default)"
        lines.append(
            f"| {method} | {r['package']} | {source} | {pct(r.get('knn_k20'))} | {k200} | "
            f"{pct(r.get('recall@1'))} | {pct(r.get('map@r'))} | {pct(r.get('linear'))} | "
            f"{pct(r['random_init'])} | {pct(r['lightly_200'])} | {pct(r['lightly_800'])} | "
            f"{epochs} | {r['resolution']} | {hours} | {cpus} |"
        )
    return lines + METHODS_NOTES.splitlines() + [""]
