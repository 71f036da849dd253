"""The methods side by side: a row per equal-budget run of the quality manifest (from its recipe
and committed log) and one for the shipped default (models/DEFAULT): the exported package's
figures from its card and `embedserve eval` report, else its log's latest evaluation; epochs,
hours, resolution and the CPUs of its stretches.
"""

from __future__ import annotations

import re
import tomllib
from typing import Any

from benchmarks.common import ROOT
from benchmarks.quality_logs import read_json, read_log

# lightly's Imagenette ResNet-18 kNN top-1 at 200 and 800 epochs (../shared/guide/REFERENCE.md)
LIGHTLY = {"barlow_twins": (0.651, 0.852), "byol": (0.705, 0.887), "simsiam": (0.752, 0.872)}


METHOD_NAMES = {"barlow_twins": "Barlow Twins", "byol": "BYOL", "simsiam": "SimSiam"}


# the CPU feature that decides a stretch's kernels, best first (the start record's cpu.flags)
CPU_FEATURES = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"), ("avx2", "AVX2")]


HARDWARE = re.compile(r"CPU, \d+ cores \(([^,)]+)(?:, ([^)]+))?\), (\w+)")


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
    (models/DEFAULT), its stages the manifest's runs of its lineage; where the default is one of
    the comparison runs, that row is marked `default` instead."""
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
    default_file = ROOT / "models" / "DEFAULT"
    name = default_file.read_text().strip() if default_file.exists() else None
    for row in out:  # a default that is an equal-budget run is marked, not repeated
        row["default"] = row["name"] == name
    if name is not None and not any(row["default"] for row in out):
        stages = lineage(name, runs)
        card = read_json(ROOT / "models" / name / "card.json") or {}
        method = card.get("method") or rows.get(name, {}).get("method", "?")
        init = rows.get(name, {}).get("random_init")
        out.append(
            method_row(name, method, "shipped default", stages, None, init) | {"default": True}
        )
    return out
