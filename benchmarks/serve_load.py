"""Serving load benchmark: the BentoML service under a concurrency sweep, against what it could be.

In one run, on the same photos:
  - the service (`bentoml serve embedserve.service:EmbedService`, as `make serve` starts it) under
    a closed-loop sweep of concurrency x images per request: img/s, req/s, p50/p95/p99 latency;
  - (a) the in-process pipeline: decode + preprocess (embedserve.preprocess) + ONNX Runtime
    (Encoder.embed) at the same batch sizes and at the server's max batch size, with the
    server's variant, device and thread count; what HTTP serving can at best approach;
  - (b) the naive server a user writes first (benchmarks.naive_torch_server: PyTorch eager,
    one image per forward call, no batching) under the same sweep.
Ratios at concurrency 16 are checked against the targets: HTTP >= 0.85 of (a) with 8 images per
request, >= 0.6 of (a) with 1, and >= 2x (b). The load generator (benchmarks.http_load) is
one asyncio process sending pre-built multipart bodies; its CPU time per request is recorded.
Photos: ../shared/datasets/imagenette-160/val when present, else generated JPEGs (recorded).
Run it on a quiet machine: the load average before the run and after each point is recorded,
and the naive server's OpenMP threads slow down several-fold when another process takes a core.

    python -m benchmarks.serve_load            # full run -> benchmarks/results/serve_load.{json,md}
    python -m benchmarks.serve_load --quick    # smoke: 2 s points, concurrency 1 and 4 (to /tmp)
    python -m benchmarks.serve_load --env EMBEDSERVE_MAX_BATCH_SIZE=16 --skip-naive
    python -m benchmarks.serve_load --url http://127.0.0.1:3000   # a server already running

Two speed checks run alone (interleaved points, medians of --repeats, concurrency 16 and 8
images per request unless --concurrency / --images-per-request say otherwise):
  --json-vs-multipart  POST /v1/embeddings (JSON, base64 photos; floats and base64 answers)
                       against multipart POST /embed on one server, the same photos: target
                       JSON / multipart >= 0.9 -> benchmarks/results/serve_load_json.json
  --models-loaded N    the default model's /embed with one model loaded against N loaded (the
                       others idle: renamed copies of it) -> benchmarks/results/serve_load_models.json

    python -m benchmarks.serve_load --json-vs-multipart --duration 5 --repeats 3
    python -m benchmarks.serve_load --models-loaded 3 --duration 5 --repeats 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import synthetic
from benchmarks.common import (
    IMAGENETTE,
    RESULTS,
    ROOT,
    command,
    gpu_name,
    image_files,
    machine,
    machine_line,
)
from benchmarks.http_load import (
    BOUNDARY,
    LoadError,
    ServerProcess,
    content_type,
    embeddings_json_body,
    free_port,
    http_get,
    multipart_body,
    run_point,
    service_command,
)
from embedserve.package import Encoder, ModelPackage, PackageError, load_package
from embedserve.preprocess import preprocess_batch

IMAGENETTE_VAL = IMAGENETTE / "val"
RATIO_CONCURRENCY = 16
# Targets of the serving issue, at concurrency 16: HTTP img/s over (a) at the same batch size,
# by images per request, and HTTP img/s over the naive server (b).
PIPELINE_TARGETS = {8: 0.85, 1: 0.6}
NAIVE_TARGET = 2.0


# --- inputs --------------------------------------------------------------------------------


def load_jpegs(n: int) -> tuple[list[bytes], str]:
    """The bytes of `n` photos spread over Imagenette val's classes, or of `n` generated JPEGs
    when the dataset is absent; and a sentence saying which."""
    if IMAGENETTE_VAL.is_dir():
        paths = image_files(IMAGENETTE_VAL, (".jpeg", ".jpg"))
        step = max(1, len(paths) // n)
        chosen = paths[::step][:n]
        return [p.read_bytes() for p in chosen], (
            f"{len(chosen)} JPEG photos of {IMAGENETTE_VAL} (every {step}th file, 160x160, q80)"
        )
    return synthetic.jpegs(n), f"{n} generated 160x160 JPEGs (q80): the dataset was absent"


# --- the server and the sweep --------------------------------------------------------------


def get_info(url: str) -> dict:
    status, body = http_get(url.rstrip("/") + "/info", timeout=10)
    if status != 200:
        return {"error": f"GET /info: HTTP {status}"}
    return json.loads(body)


def batching_counters(url: str) -> dict | None:
    """The service's cumulative batching counters from /info (None when it reports none)."""
    try:
        batching = get_info(url).get("batching")
    except (OSError, ValueError):
        return None
    observed = batching.get("observed") if isinstance(batching, dict) else None
    return observed if isinstance(observed, dict) else None


def sweep(
    url: str,
    jpegs: list[bytes],
    concurrencies: list[int],
    images_per_request: list[int],
    duration: float,
    warmup: float,
    label: str,
) -> list[dict]:
    """Every (images per request, concurrency) point against `url`/embed; LoadError on failures."""
    rows = []
    for k in images_per_request:
        # distinct bodies cycling through every photo; built once, before timing
        bodies = [
            multipart_body([jpegs[(i + j) % len(jpegs)] for j in range(k)])
            for i in range(0, len(jpegs), k)
        ]
        for c in concurrencies:
            before = batching_counters(url)
            point = asyncio.run(
                run_point(
                    url.rstrip("/") + "/embed",
                    bodies,
                    content_type(BOUNDARY),
                    k,
                    c,
                    duration,
                    warmup,
                )
            ).as_dict()
            after = batching_counters(url)
            if before and after and after.get("model_calls", 0) > before.get("model_calls", 0):
                # images per model call over the point (warm-up and tail included)
                point["server_mean_batch"] = round(
                    (after["images"] - before["images"])
                    / (after["model_calls"] - before["model_calls"]),
                    1,
                )
            # the generator's share of one core: its CPU ms per request x requests per second
            point["client_cpu_cores"] = round(
                point["client_cpu_ms_per_request"] * point["req_s"] / 1000, 3
            )
            # includes the server and this client (about 2-3 on a 2-core machine under load);
            # much more means other processes were competing for the cores
            point["loadavg_1m"] = round(os.getloadavg()[0], 2)
            print(f"{label}: {json.dumps(point)}", flush=True)
            rows.append(point)
    return rows


def naive_command(port: int, size: int) -> list[str]:
    """The naive server (b), run from the repository root."""
    return [
        *(sys.executable, "-m", "benchmarks.naive_torch_server"),
        *("--port", str(port), "--size", str(size)),
    ]


# --- (a): the in-process pipeline ----------------------------------------------------------


def server_settings(info: dict, env: dict[str, str]) -> dict:
    """Package, variant, device, threads and max batch size of the server, from its /info and
    the environment it was given (the defaults of Encoder otherwise)."""
    batching = info.get("batching")
    max_batch = batching.get("max_batch_size") if isinstance(batching, dict) else None
    if max_batch is None and env.get("EMBEDSERVE_MAX_BATCH_SIZE"):
        max_batch = int(env["EMBEDSERVE_MAX_BATCH_SIZE"])
    threads = info.get("threads")
    if isinstance(threads, dict):  # {"intra_op": N, "decode": M}
        threads = threads.get("intra_op")
    if not isinstance(threads, int):
        threads = int(env.get("EMBEDSERVE_THREADS") or os.cpu_count() or 1)
    model = info.get("model")
    if isinstance(model, dict):  # the card's essentials
        model = model.get("name")
    provider = str(info.get("provider", ""))
    device = "cuda" if "CUDA" in provider else env.get("EMBEDSERVE_DEVICE", "cpu")
    return {
        "package": env.get("EMBEDSERVE_MODEL") or model,
        "variant": info.get("variant") or env.get("EMBEDSERVE_VARIANT") or "auto",
        "device": "cpu" if device == "auto" else device,
        "threads": threads,
        "max_batch_size": max_batch,
    }


def open_package(name: str | None) -> ModelPackage:
    """The package the server runs: by name or path, else models/DEFAULT (/info may name the
    model by something other than its folder)."""
    try:
        return load_package(name)
    except PackageError:
        return load_package(None)


def pipeline_rates(
    settings: dict, jpegs: list[bytes], batches: list[int], images: int, repeats: int
) -> dict:
    """(a): img/s of decode + preprocess + Encoder.embed on JPEG bytes, per batch size (median of
    `repeats` passes over at least `images` images), and of decode + preprocess alone."""
    package = open_package(settings["package"])
    encoder = Encoder(
        package, settings["variant"], settings["device"], intra_op_threads=settings["threads"]
    )
    pre = package.preprocess

    def timed(batch: int, work) -> tuple[float, list[float]]:
        chunks = [
            [jpegs[(i + j) % len(jpegs)] for j in range(batch)]
            for i in range(0, max(images, 4 * batch), batch)
        ]
        for c in chunks[:2]:
            work(c)  # warm-up
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for c in chunks:
                work(c)
            rates.append(len(chunks) * batch / (time.perf_counter() - t0))
        return round(statistics.median(rates), 1), [round(r, 1) for r in rates]

    rows = []
    for b in batches:
        rate, runs = timed(b, lambda c: encoder.embed(preprocess_batch(c, pre)))
        rows.append({"batch": b, "img_s": rate, "runs": runs})
        print(f"pipeline (a): batch {b}: {rate} img/s", flush=True)
    decode_rate, _ = timed(8, lambda c: preprocess_batch(c, pre))
    print(f"decode + preprocess alone: {decode_rate} img/s", flush=True)
    return {
        "package": package.name,
        "variant": encoder.variant,
        "providers": encoder.providers,
        "threads": settings["threads"],
        "rows": rows,
        "decode_preprocess_img_s": decode_rate,
        "input_size": package.card["input"]["height"],
    }


# --- ratios and the report -----------------------------------------------------------------


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


# --- speed checks: JSON against multipart, idle models --------------------------------------

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
    return {name: _median_rows([[p] for p in points])[0] for name, points in runs.items()}


def _ratio(rows: dict, num: str, den: str) -> dict:
    per_run = [
        round(a / b, 3)
        for a, b in zip(rows[num]["img_s_runs"], rows[den]["img_s_runs"], strict=True)
    ]
    return {"median": round(statistics.median(per_run), 3), "runs": per_run}


def json_vs_multipart(args, jpegs: list[bytes], env: dict[str, str], log_dir: Path) -> dict:
    """(a) /v1/embeddings JSON (float and base64 answers) against multipart /embed."""
    k, c = args.images_per_request[-1], args.concurrency[-1]
    groups = [[jpegs[(i + j) % len(jpegs)] for j in range(k)] for i in range(0, len(jpegs), k)]
    json_type = "application/json"
    port = free_port()
    with ServerProcess(
        service_command(port),
        port,
        log_dir / "service.log",
        env,
        cwd=ROOT,
        ready_timeout=args.ready_timeout,
    ) as server:
        info = get_info(server.url)
        series = {
            "multipart_embed": (
                server.url,
                "/embed",
                [multipart_body(g) for g in groups],
                content_type(BOUNDARY),
            ),
            "json_v1_embeddings": (
                server.url,
                "/v1/embeddings",
                [embeddings_json_body(g) for g in groups],
                json_type,
            ),
            "json_v1_embeddings_base64": (
                server.url,
                "/v1/embeddings",
                [embeddings_json_body(g, "base64") for g in groups],
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
    bodies = [
        multipart_body([jpegs[(i + j) % len(jpegs)] for j in range(k)])
        for i in range(0, len(jpegs), k)
    ]
    ports = free_port(), free_port()
    with (
        ServerProcess(
            service_command(ports[0]),
            ports[0],
            log_dir / "one.log",
            one,
            cwd=ROOT,
            ready_timeout=args.ready_timeout,
        ) as first,
        ServerProcess(
            service_command(ports[1]),
            ports[1],
            log_dir / "many.log",
            many,
            cwd=ROOT,
            ready_timeout=args.ready_timeout,
        ) as second,
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
    result = {
        "command": command("serve_load", sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "images": source,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeats": args.repeats,
        "server_env": env,
    }
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


# --- main ----------------------------------------------------------------------------------


def parse_env(items: list[str]) -> dict[str, str]:
    env = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--env wants KEY=VALUE, not {item!r}")
        env[key] = value
    return env


def measure(args, jpegs: list[bytes], env: dict[str, str], log_dir: Path, sweep_args) -> dict:
    """One complete measurement: the service sweep, (a), the naive sweep and their ratios."""
    log_dir.mkdir(parents=True, exist_ok=True)
    result: dict = {"gpu": None, "service_info": None, "service": [], "pipeline": None}
    result.update({"naive_info": None, "naive": [], "ratios": {}})
    info: dict = {}
    if args.url:
        info = get_info(args.url)
        result["service_info"] = info
        result["service"] = sweep(
            args.url,
            jpegs,
            args.concurrency,
            args.images_per_request,
            label="service",
            **sweep_args,
        )
    elif not args.skip_service:
        port = free_port()
        with ServerProcess(
            service_command(port),
            port,
            log_dir / "service.log",
            env,
            cwd=ROOT,
            ready_timeout=args.ready_timeout,
        ) as server:
            info = get_info(server.url)
            result["service_info"] = info
            print(f"service /info: {json.dumps(info)}", flush=True)
            try:
                result["service"] = sweep(
                    server.url,
                    jpegs,
                    args.concurrency,
                    args.images_per_request,
                    label="service",
                    **sweep_args,
                )
                result["service_info_after"] = get_info(server.url)
            except LoadError:
                print(f"service log {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
                raise
    settings = server_settings(info, env)
    if "CUDA" in str(info.get("provider", "")):
        result["gpu"] = gpu_name()
    # (a) runs while no server is loaded (an external --url server is idle by now)
    batches = sorted(
        {
            *args.images_per_request,
            *([settings["max_batch_size"]] if settings["max_batch_size"] else []),
        }
    )
    if not args.skip_pipeline:
        result["pipeline"] = pipeline_rates(
            settings, jpegs, batches, images=args.images, repeats=args.pipeline_repeats
        )
    if not args.skip_naive:
        port = free_port()
        # the naive model sees the same pixels as the package's model
        size = open_package(settings["package"]).card["input"]["height"]
        with ServerProcess(
            naive_command(port, size),
            port,
            log_dir / "naive.log",
            cwd=ROOT,
            ready_timeout=args.ready_timeout,
        ) as server:
            result["naive_info"] = get_info(server.url)
            try:
                result["naive"] = sweep(
                    server.url,
                    jpegs,
                    args.naive_concurrency or args.concurrency,
                    args.images_per_request,
                    label="naive",
                    **sweep_args,
                )
            except LoadError:
                print(f"naive log {server.log_path}:\n{server.log_tail()}", file=sys.stderr)
                raise
    result["ratios"] = ratios(
        result["service"], result["naive"], result["pipeline"], settings["max_batch_size"]
    )
    return result


_ROW_STATS = ("img_s", "req_s", "p50_ms", "p95_ms", "p99_ms", "mean_ms")
_ROW_STATS += ("client_cpu_ms_per_request", "server_mean_batch")


def _median_rows(runs_rows: list[list[dict]]) -> list[dict]:
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
    result["service"] = _median_rows([r["service"] for r in runs])
    result["naive"] = _median_rows([r["naive"] for r in runs])
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--url", help="benchmark this running server instead of starting the service")
    p.add_argument("--duration", type=float, help="seconds measured per point (10; quick 2)")
    p.add_argument("--warmup", type=float, help="seconds of load before each point (2; quick 1)")
    p.add_argument(
        "--concurrency", type=int, nargs="+", help="closed-loop workers (1 4 16 64; quick 1 4)"
    )
    p.add_argument("--images-per-request", type=int, nargs="+", default=[1, 8])
    p.add_argument(
        "--naive-concurrency",
        type=int,
        nargs="+",
        default=None,
        help="concurrency sweep of the naive server (default: --concurrency)",
    )
    p.add_argument("--skip-naive", action="store_true", help="do not run the naive server (b)")
    p.add_argument("--skip-service", action="store_true", help="only (a) and (b)")
    p.add_argument("--skip-pipeline", action="store_true", help="do not measure (a)")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment of the started service (repeatable), e.g. EMBEDSERVE_MAX_BATCH_SIZE=32",
    )
    p.add_argument("--images", type=int, help="distinct photos cycled through (256; quick 64)")
    p.add_argument("--pipeline-repeats", type=int, help="repeats of (a) (5; quick 2)")
    p.add_argument("--ready-timeout", type=float, default=180.0)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="complete runs; the report gives medians, ratios taken within each run (3; quick 1)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 s points, concurrency 1 and 4, to /tmp (explicit options win)",
    )
    p.add_argument(
        "--out", help="output path without suffix (default: benchmarks/results/serve_load)"
    )
    p.add_argument("--log-dir", help="server logs (default: a new folder in /tmp)")
    check = p.add_mutually_exclusive_group()
    check.add_argument(
        "--json-vs-multipart",
        action="store_true",
        help="only /v1/embeddings JSON against multipart /embed (concurrency 16, 8 img/req)",
    )
    check.add_argument(
        "--models-loaded",
        type=int,
        metavar="N",
        help="only the default model with 1 model loaded against N loaded (N >= 2)",
    )
    args = p.parse_args(argv)
    if args.json_vs_multipart or args.models_loaded:
        if args.models_loaded is not None and args.models_loaded < 2:
            p.error("--models-loaded needs N >= 2")
        if args.concurrency is None:
            args.concurrency = [RATIO_CONCURRENCY]
        if "--images-per-request" not in (argv if argv is not None else sys.argv):
            args.images_per_request = [8]
        args.duration = args.duration or 5.0
        args.warmup = args.warmup or 1.0
        args.images = args.images or 128
        env = parse_env(args.env)
        log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="serve_load-"))
        return speed_check(args, argv, env, log_dir)
    defaults = dict(duration=10.0, warmup=2.0, concurrency=[1, 4, 16, 64], images=256)
    defaults["pipeline_repeats"] = 5
    if args.quick:
        defaults.update(duration=2.0, warmup=1.0, concurrency=[1, 4], images=64)
        defaults["pipeline_repeats"] = 2
        if "--repeats" not in (argv if argv is not None else sys.argv):
            args.repeats = 1
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    out = Path(
        args.out
        or (
            Path(tempfile.gettempdir()) / "serve_load.quick"
            if args.quick
            else RESULTS / "serve_load"
        )
    )
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="serve_load-"))
    env = parse_env(args.env)
    loadavg = [round(x, 2) for x in os.getloadavg()]
    if loadavg[0] > 0.5:
        print(
            f"warning: load average {loadavg[0]} before starting: other processes are using "
            "the cores, the results will be low and noisy (the naive server's OpenMP threads "
            "suffer most)",
            file=sys.stderr,
        )
    jpegs, source = load_jpegs(args.images)
    print(f"photos: {source}; server logs in {log_dir}", flush=True)
    sweep_args = dict(duration=args.duration, warmup=args.warmup)

    result: dict = {
        "command": command("serve_load", sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "loadavg_at_start": loadavg,
        "images": source,
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeats": args.repeats,
        "server_env": env,
    }
    runs = []
    try:
        for r in range(args.repeats):
            if args.repeats > 1:
                print(f"--- repeat {r + 1} of {args.repeats}", flush=True)
            runs.append(measure(args, jpegs, env, log_dir / f"run{r + 1}", sweep_args))
    except LoadError as e:
        print(f"FAILED: {e}", file=sys.stderr)
        return 1
    result.update(combine(runs))
    out.parent.mkdir(parents=True, exist_ok=True)
    json_path, md_path = Path(f"{out}.json"), Path(f"{out}.md")
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(markdown(result))
    print(json.dumps(result["ratios"], indent=2))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
