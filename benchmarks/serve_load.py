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
import json
import os
import sys
import tempfile
from pathlib import Path

from benchmarks.common import RESULTS, ROOT, gpu_name
from benchmarks.http_load import LoadError, ServerProcess, free_port, service_process
from benchmarks.serve_load_baselines import (
    naive_command,
    open_package,
    pipeline_rates,
    server_settings,
)
from benchmarks.serve_load_checks import speed_check
from benchmarks.serve_load_report import RATIO_CONCURRENCY, combine, header, markdown, ratios
from benchmarks.serve_load_sweep import get_info, load_jpegs, sweep


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

    def service_sweep(url: str) -> list[dict]:
        k, c = args.images_per_request, args.concurrency
        return sweep(url, jpegs, c, k, label="service", **sweep_args)

    if args.url:
        info = get_info(args.url)
        result["service_info"] = info
        result["service"] = service_sweep(args.url)
    elif not args.skip_service:
        with service_process(log_dir / "service.log", env, args.ready_timeout) as server:
            info = get_info(server.url)
            result["service_info"] = info
            print(f"service /info: {json.dumps(info)}", flush=True)
            try:
                result["service"] = service_sweep(server.url)
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
    check.add_argument(
        "--vs-bentoml-docs",
        action="store_true",
        help="only the served default against the service written from BentoML's docs "
        "(benchmarks.bentoml_docs_service; concurrency 16, 1 and 8 img/req)",
    )
    args = p.parse_args(argv)
    if args.json_vs_multipart or args.models_loaded or args.vs_bentoml_docs:
        if args.models_loaded is not None and args.models_loaded < 2:
            p.error("--models-loaded needs N >= 2")
        if args.concurrency is None:
            args.concurrency = [RATIO_CONCURRENCY]
        if "--images-per-request" not in (argv if argv is not None else sys.argv):
            args.images_per_request = [1, 8] if args.vs_bentoml_docs else [8]
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

    result = header(args, argv, env, source, loadavg)
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
