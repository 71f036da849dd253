"""The speed checks of benchmarks.serve_load, each run alone: --json-vs-multipart (JSON
/v1/embeddings against multipart /embed on one server) and --models-loaded N (the default model
with one model loaded against N), their points interleaved, medians of --repeats.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.common import RESULTS
from benchmarks.http_load import (
    BOUNDARY,
    LoadError,
    content_type,
    embeddings_json_body,
    multipart_body,
    run_point,
    service_process,
)
from benchmarks.serve_load_baselines import open_package
from benchmarks.serve_load_report import header, median_rows
from benchmarks.serve_load_sweep import get_info, groups, load_jpegs
from embedserve.package import ModelPackage

JSON_TARGET = 0.9  # /v1/embeddings img/s over multipart /embed img/s, at concurrency 16, 8 img/req


def _point(url: str, path: str, bodies: list[bytes], ctype: str, k: int, c: int, args) -> dict:
    point = asyncio.run(
        run_point(url + path, bodies, ctype, k, c, args.duration, args.warmup)
    ).as_dict()
    point["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return point


def _interleaved(args, series: dict[str, tuple], k: int, c: int, label: str) -> dict:
    """Every series' point once per repeat, in a rotating order; medians and per-run values."""
    runs: dict[str, list[dict]] = {name: [] for name in series}
    names = list(series)
    for r in range(args.repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            url, path, bodies, ctype = series[name]
            point = _point(url, path, bodies, ctype, k, c, args)
            print(f"{label} run {r + 1} {name}: {json.dumps(point)}", flush=True)
            runs[name].append(point)
    return {name: median_rows([[p] for p in points])[0] for name, points in runs.items()}


def _ratio(rows: dict, num: str, den: str) -> dict:
    per_run = [
        round(a / b, 3)
        for a, b in zip(rows[num]["img_s_runs"], rows[den]["img_s_runs"], strict=True)
    ]
    return {"median": round(statistics.median(per_run), 3), "runs": per_run}


def json_vs_multipart(args, jpegs: list[bytes], env: dict[str, str], log_dir: Path) -> dict:
    """(a) /v1/embeddings JSON (float and base64 answers) against multipart /embed."""
    k, c = args.images_per_request[-1], args.concurrency[-1]
    requests = groups(jpegs, k)
    json_type = "application/json"
    with service_process(log_dir / "service.log", env, args.ready_timeout) as server:
        info = get_info(server.url)
        series = {
            "multipart_embed": (
                server.url,
                "/embed",
                [multipart_body(g) for g in requests],
                content_type(BOUNDARY),
            ),
            "json_v1_embeddings": (
                server.url,
                "/v1/embeddings",
                [embeddings_json_body(g) for g in requests],
                json_type,
            ),
            "json_v1_embeddings_base64": (
                server.url,
                "/v1/embeddings",
                [embeddings_json_body(g, "base64") for g in requests],
                json_type,
            ),
        }
        rows = _interleaved(args, series, k, c, "json-vs-multipart")
    ratio = _ratio(rows, "json_v1_embeddings", "multipart_embed")
    return {
        "check": "json_vs_multipart",
        "concurrency": c,
        "images_per_request": k,
        "service_info": {key: info.get(key) for key in ("model", "variant", "provider", "threads")},
        "rows": rows,
        "ratio_json_over_multipart": ratio,
        "ratio_json_base64_over_multipart": _ratio(
            rows, "json_v1_embeddings_base64", "multipart_embed"
        ),
        "target": JSON_TARGET,
        "met": ratio["median"] >= JSON_TARGET,
    }


def idle_copies(package: ModelPackage, n: int, root: Path) -> list[Path]:
    """`n` packages of `package`'s files (symlinked) under other card names."""
    out = []
    for i in range(n):
        dst = root / f"idle-{i + 1}"
        dst.mkdir(parents=True, exist_ok=True)
        for f in package.path.iterdir():
            if f.name != "card.json" and not (dst / f.name).exists():
                (dst / f.name).symlink_to(f.resolve())
        card = dict(package.card, name=f"{package.name}-idle-{i + 1}")
        (dst / "card.json").write_text(json.dumps(card, indent=2))
        out.append(dst)
    return out


def models_loaded(args, jpegs: list[bytes], env: dict[str, str], log_dir: Path) -> dict:
    """(b) the default model's /embed on a server of one model against one of N (the others
    idle); both servers run at once, their points interleaved (an idle server costs nothing)."""
    k, c, n = args.images_per_request[-1], args.concurrency[-1], args.models_loaded
    package = open_package(env.get("EMBEDSERVE_MODEL"))
    copies = idle_copies(package, n - 1, log_dir / "packages")
    one = {**env, "EMBEDSERVE_MODEL": str(package.path)}
    many = {k_: v for k_, v in env.items() if k_ != "EMBEDSERVE_MODEL"}
    many["EMBEDSERVE_MODELS"] = ",".join([str(package.path), *map(str, copies)])
    bodies = [multipart_body(g) for g in groups(jpegs, k)]
    with (
        service_process(log_dir / "one.log", one, args.ready_timeout) as first,
        service_process(log_dir / "many.log", many, args.ready_timeout) as second,
    ):
        from benchmarks.soak import worker_rss_mb

        served = list(get_info(second.url).get("models", {}))
        # resident memory of each server's worker, idle after its warm-up (the `idle` term of
        # the memory ceiling), and again after the measured points
        rss = {"one_model_idle_mb": worker_rss_mb(first.proc.pid)}
        rss[f"{n}_models_idle_mb"] = worker_rss_mb(second.proc.pid)
        ctype = content_type(BOUNDARY)
        series = {
            "one_model": (first.url, "/embed", bodies, ctype),
            f"{n}_models": (second.url, "/embed", bodies, ctype),
        }
        rows = _interleaved(args, series, k, c, "models-loaded")
        after = get_info(second.url).get("models", {})
        rss["one_model_after_mb"] = worker_rss_mb(first.proc.pid)
        rss[f"{n}_models_after_mb"] = worker_rss_mb(second.proc.pid)
    return {
        "check": "models_loaded",
        "models_loaded": n,
        "served": served,
        "worker_rss": rss,
        "images_by_model_after": {m: v["batching"]["observed"]["images"] for m, v in after.items()},
        "concurrency": c,
        "images_per_request": k,
        "rows": rows,
        f"ratio_{n}_models_over_one": _ratio(rows, f"{n}_models", "one_model"),
    }


def speed_check(args, argv, env: dict[str, str], log_dir: Path) -> int:
    """Run --json-vs-multipart or --models-loaded and write its JSON."""
    jpegs, source = load_jpegs(args.images)
    name = "serve_load_json" if args.json_vs_multipart else "serve_load_models"
    result = header(args, argv, env, source, [round(x, 2) for x in os.getloadavg()])
    try:
        check = json_vs_multipart if args.json_vs_multipart else models_loaded
        result.update(check(args, jpegs, env, log_dir))
    except LoadError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    out = Path(f"{args.out or RESULTS / name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("ratio", "met"))}))
    print(f"wrote {out}")
    return 0
