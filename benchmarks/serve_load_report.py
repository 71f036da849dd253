"""The figures of benchmarks.serve_load: the ratios against the targets, the medians over
repeated runs, and the markdown report.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

from benchmarks.common import command, machine, machine_line

RATIO_CONCURRENCY = 16


# Targets of the serving issue, at concurrency 16: HTTP img/s over (a) at the same batch size,
# by images per request, and HTTP img/s over the naive server (b).
PIPELINE_TARGETS = {8: 0.85, 1: 0.6}


NAIVE_TARGET = 2.0


def header(args, argv: list[str] | None, env: dict[str, str], source: str, loadavg) -> dict:
    """What every serve_load result begins with: the command, the machine, the load average
    before the run, the photos (`source`), the load's settings and the server's environment."""
    return {
        "command": command("serve_load", sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "loadavg_at_start": loadavg,
        "images": source,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeats": args.repeats,
        "server_env": env,
    }


def at(rows: list[dict], concurrency: int, k: int) -> dict | None:
    return next(
        (r for r in rows if r["concurrency"] == concurrency and r["images_per_request"] == k),
        None,
    )


def ratios(service: list[dict], naive: list[dict], pipeline: dict | None, max_batch) -> dict:
    """HTTP img/s over (a) at the same batch and at the max batch, and over (b), at concurrency
    16 (or the highest measured below it), with the targets and whether they are met."""
    concs = sorted({r["concurrency"] for r in service})
    if not concs:
        return {}
    c = RATIO_CONCURRENCY if RATIO_CONCURRENCY in concs else max(concs)
    pipe = {r["batch"]: r["img_s"] for r in (pipeline or {}).get("rows", [])}
    out: dict = {"concurrency": c, "by_images_per_request": {}}
    for k in sorted({r["images_per_request"] for r in service}):
        s, n = at(service, c, k), at(naive, c, k)
        row: dict = {"http_img_s": s["img_s"]}
        if k in pipe:
            row["pipeline_img_s"] = pipe[k]
            row["vs_pipeline"] = round(s["img_s"] / pipe[k], 3)
            if k in PIPELINE_TARGETS:
                row["vs_pipeline_target"] = PIPELINE_TARGETS[k]
                row["vs_pipeline_met"] = row["vs_pipeline"] >= PIPELINE_TARGETS[k]
        if max_batch in pipe:
            row["pipeline_max_batch_img_s"] = pipe[max_batch]
            row["vs_pipeline_max_batch"] = round(s["img_s"] / pipe[max_batch], 3)
        if n:
            row["naive_img_s"] = n["img_s"]
            row["vs_naive"] = round(s["img_s"] / n["img_s"], 2)
            row["vs_naive_target"] = NAIVE_TARGET
            row["vs_naive_met"] = row["vs_naive"] >= NAIVE_TARGET
        out["by_images_per_request"][str(k)] = row
    return out


_ROW_STATS = ("img_s", "req_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms")


_ROW_STATS += ("client_cpu_ms_per_request", "server_mean_batch")


def median_rows(runs_rows: list[list[dict]]) -> list[dict]:
    """Per point (same order in every run): the median of each figure, errors summed."""
    out = []
    for rows in zip(*runs_rows, strict=True):
        row = dict(rows[0])
        for key in _ROW_STATS:
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                row[key] = round(statistics.median(values), 3)
        row["errors"] = sum(r.get("errors", 0) for r in rows)
        row["img_s_runs"] = [r["img_s"] for r in rows]
        out.append(row)
    return out


def combine(runs: list[dict]) -> dict:
    """The medians over repeated runs; each ratio is taken within a run (service, (a) and (b)
    measured minutes apart on the same machine), then the median of those is reported."""
    first = runs[0]
    result = {k: first[k] for k in ("gpu", "service_info", "naive_info")}
    result["service_info_after"] = runs[-1].get("service_info_after")
    result["service"] = median_rows([r["service"] for r in runs])
    result["naive"] = median_rows([r["naive"] for r in runs])
    result["pipeline"] = None
    if first["pipeline"]:
        pipeline = dict(first["pipeline"])
        pipeline["rows"] = [
            {
                **rows[0],
                "img_s": round(statistics.median(r["img_s"] for r in rows), 1),
                "runs": [r["img_s"] for r in rows],
            }
            for rows in zip(*(r["pipeline"]["rows"] for r in runs), strict=True)
        ]
        pipeline["decode_preprocess_img_s"] = round(
            statistics.median(r["pipeline"]["decode_preprocess_img_s"] for r in runs), 1
        )
        result["pipeline"] = pipeline
    result["ratios"] = dict(first["ratios"])
    if first["ratios"]:
        by_k = {}
        for k, row in first["ratios"]["by_images_per_request"].items():
            merged = dict(row)
            for key, value in row.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if key.endswith("_target"):
                        continue
                    per_run = [r["ratios"]["by_images_per_request"][k][key] for r in runs]
                    merged[key] = round(statistics.median(per_run), 3)
                    if key.startswith("vs_"):
                        merged[f"{key}_runs"] = per_run
            for key in ("vs_pipeline", "vs_naive"):
                if f"{key}_target" in merged:
                    merged[f"{key}_met"] = merged[key] >= merged[f"{key}_target"]
            by_k[k] = merged
        result["ratios"]["by_images_per_request"] = by_k
    result["runs"] = [{"ratios": r["ratios"], "loadavg": os.getloadavg()} for r in runs]
    return result


def markdown(result: dict) -> str:
    """The results as a markdown report."""
    m = result["machine"]
    info = result.get("service_info") or {}
    batching = info.get("batching")
    if isinstance(batching, dict):  # the settings; what batching did is reported after the sweep
        batching = {k: v for k, v in batching.items() if k != "observed"}
    lines = [
        "# Serving load benchmark",
        "",
        f"- Command: `{result['command']}`",
        f"- Machine: {machine_line(m)}"
        + (f" (the service ran on {result['gpu']})" if result.get("gpu") else ""),
        f"- Service: provider {info.get('provider', 'n/a')}, variant {info.get('variant', 'n/a')}, "
        f"threads {json.dumps(info.get('threads'))}, batching {json.dumps(batching)}, "
        f"workers {info.get('workers', 'n/a')}; "
        f"environment {json.dumps(result['server_env'])}",
        f"- Load average (1, 5, 15 min) before the run: {result['loadavg_at_start']} "
        "(near 0 on a quiet machine)",
        f"- Photos: {result['images']}",
        f"- Load: closed loop, {result['duration_s']} s per point after {result['warmup_s']} s "
        "warm-up; one asyncio client process on the same cores as the server",
        f"- Figures: medians of {result.get('repeats', 1)} complete runs (service, (a), (b)); "
        "each ratio is taken within a run, and the median of those is given",
        "",
    ]

    def table(title: str, rows: list[dict]) -> None:
        if not rows:
            return
        batched = any("server_mean_batch" in r for r in rows)
        lines.extend(
            [
                f"## {title}",
                "",
                "| images/req | concurrency | img/s | req/s | p50 ms | p95 ms | p99 ms | client CPU ms/req |"
                + (" images per model call |" if batched else ""),
                "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if batched else ""),
            ]
        )
        for r in rows:
            lines.append(
                f"| {r['images_per_request']} | {r['concurrency']} | {r['img_s']} | {r['req_s']} | "
                f"{r['p50_ms']} | {r['p95_ms']} | {r['p99_ms']} | {r['client_cpu_ms_per_request']} |"
                + (f" {r.get('server_mean_batch', 'n/a')} |" if batched else "")
            )
        lines.append("")

    table("BentoML service (HTTP)", result["service"])
    after = (result.get("service_info_after") or {}).get("batching")
    if isinstance(after, dict) and after.get("observed"):
        lines += [
            f"Batching observed by the service over the sweep: {json.dumps(after['observed'])}",
            "",
        ]
    table("(b) naive server: PyTorch eager, one image per call (HTTP)", result["naive"])
    p = result.get("pipeline")
    if p:
        lines += [
            f"## (a) in-process pipeline: decode + preprocess + ONNX Runtime ({p['variant']}, "
            f"{', '.join(p['providers'])}, {p['threads']} threads)",
            "",
            "| batch | img/s |",
            "|---:|---:|",
            *[f"| {r['batch']} | {r['img_s']} |" for r in p["rows"]],
            "",
            f"Decode + preprocess alone: {p['decode_preprocess_img_s']} img/s.",
            "",
        ]
    r = result.get("ratios")
    if r:
        lines += [
            f"## Ratios at concurrency {r['concurrency']}",
            "",
            "| images/req | HTTP img/s | / (a) same batch | target | / (a) max batch | / (b) naive | target |",
            "|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def mark(row: dict, key: str) -> str:
            if key not in row:
                return "n/a"
            return f"{row[key]}" + (
                "" if f"{key}_met" not in row else (" ok" if row[f"{key}_met"] else " **missed**")
            )

        for k, row in r["by_images_per_request"].items():
            lines.append(
                f"| {k} | {row['http_img_s']} | {mark(row, 'vs_pipeline')} | "
                f"{row.get('vs_pipeline_target', 'n/a')} | {row.get('vs_pipeline_max_batch', 'n/a')} | "
                f"{mark(row, 'vs_naive')} | {row.get('vs_naive_target', 'n/a')} |"
            )
        lines.append("")
        per_run = [
            f"{k} img/req: / (a) {row.get('vs_pipeline_runs', 'n/a')}, / (b) {row.get('vs_naive_runs', 'n/a')}"
            for k, row in r["by_images_per_request"].items()
        ]
        if result.get("repeats", 1) > 1:
            lines += ["Ratios of each run: " + "; ".join(per_run) + ".", ""]
    return "\n".join(lines)
