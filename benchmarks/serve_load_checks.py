"""The speed checks of benchmarks.serve_load, each run alone: --json-vs-multipart (JSON
/v1/embeddings against multipart /embed on one server), --models-loaded N (the default model
with one model loaded against N) and --vs-bentoml-docs (the served default against the service
written from BentoML's documentation, benchmarks.bentoml_docs_service), their points
interleaved, medians of --repeats.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
from pathlib import Path

from benchmarks.common import RESULTS, ROOT
from benchmarks.http_load import (
    BOUNDARY,
    LoadError,
    ServerProcess,
    content_type,
    embeddings_json_body,
    free_port,
    multipart_body,
    run_point,
    service_process,
)
from benchmarks.serve_load_baselines import open_package
from benchmarks.serve_load_report import header, median_rows
from benchmarks.serve_load_sweep import get_info, groups, load_jpegs
from embedserve.package import ModelPackage

JSON_TARGET = 0.9  # /v1/embeddings img/s over multipart /embed img/s, at concurrency 16, 8 img/req
DOCS_TARGET = 1.5  # the served default's img/s over the BentoML-docs service's, concurrency 16


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


def docs_command(port: int) -> list[str]:
    """`bentoml serve` of the BentoML-docs baseline service, from this interpreter's environment."""
    bentoml = str(Path(sys.executable).parent / "bentoml")
    return [bentoml, "serve", "benchmarks.bentoml_docs_service:DocsEmbedder", "--port", str(port)]


def vs_bentoml_docs(args, jpegs: list[bytes], env: dict[str, str], log_dir: Path) -> dict:
    """(c) the served default (its `auto` variant) against the service a user writes from
    BentoML's documentation over the same package's fp32 model.onnx with the same ONNX Runtime
    threads, for each --images-per-request at --concurrency; both servers run at once (an idle
    one costs nothing), their points interleaved."""
    c = args.concurrency[-1]
    package = open_package(env.get("EMBEDSERVE_MODEL"))
    threads = env.get("EMBEDSERVE_THREADS", "2")
    ours = {**env, "EMBEDSERVE_MODEL": str(package.path), "EMBEDSERVE_THREADS": threads}
    docs_env = {"DOCS_MODEL": str(package.path), "DOCS_THREADS": threads}
    port = free_port()
    out: dict = {"check": "vs_bentoml_docs", "concurrency": c, "by_images_per_request": {}}
    with (
        service_process(log_dir / "service.log", ours, args.ready_timeout) as served,
        ServerProcess(
            docs_command(port),
            port,
            log_dir / "docs.log",
            docs_env,
            cwd=ROOT,
            ready_timeout=args.ready_timeout,
        ) as docs,
    ):
        info = get_info(served.url)
        out["service_info"] = {
            key: info.get(key) for key in ("model", "variant", "provider", "threads", "batching")
        }
        out["docs_service"] = {"model_file": str(package.path / "model.onnx"), "threads": threads}
        out["docs_service"]["max_batch_size"] = 32
        ctype = content_type(BOUNDARY)
        for k in args.images_per_request:
            bodies = [multipart_body(g) for g in groups(jpegs, k)]
            series = {
                "embedserve": (served.url, "/embed", bodies, ctype),
                "bentoml_docs": (docs.url, "/embed", bodies, ctype),
            }
            rows = _interleaved(args, series, k, c, f"vs-bentoml-docs {k} img/req")
            ratio = _ratio(rows, "embedserve", "bentoml_docs")
            out["by_images_per_request"][str(k)] = {
                "rows": rows,
                "ratio_embedserve_over_docs": ratio,
                "target": DOCS_TARGET,
                "met": ratio["median"] >= DOCS_TARGET,
            }
    return out


CHECKS = {
    "json_vs_multipart": ("serve_load_json", json_vs_multipart),
    "models_loaded": ("serve_load_models", models_loaded),
    "vs_bentoml_docs": ("serve_load_bentoml_docs", vs_bentoml_docs),
}


def speed_check(args, argv, env: dict[str, str], log_dir: Path) -> int:
    """Run --json-vs-multipart, --models-loaded or --vs-bentoml-docs and write its JSON."""
    jpegs, source = load_jpegs(args.images)
    chosen = next(name for name in CHECKS if getattr(args, name, None))
    name, check = CHECKS[chosen]
    result = header(args, argv, env, source, [round(x, 2) for x in os.getloadavg()])
    try:
        result.update(check(args, jpegs, env, log_dir))
    except LoadError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    out = Path(f"{args.out or RESULTS / name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    summary = {k: v for k, v in result.items() if k.startswith(("ratio", "met"))}
    for k, row in result.get("by_images_per_request", {}).items():
        summary[f"{k}_img_per_request"] = {n: v for n, v in row.items() if n != "rows"}
    print(json.dumps(summary))
    print(f"wrote {out}")
    return 0
