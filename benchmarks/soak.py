"""Soak test: the real server under a closed loop of 64 concurrent clients for 10 minutes, on
loopback, with real photos (Imagenette val JPEGs, one per request).

Reports requests served, errors by kind (a documented 503 back-pressure answer counts apart),
latency percentiles, and the worker's resident memory (RSS) sampled every few seconds: after
warm-up and at the end. Pass: no error other than 503, RSS growth after warm-up under 50 MB.

    python -m benchmarks.soak             # 10 minutes -> benchmarks/results/soak.{json,md}
    python -m benchmarks.soak --minutes 0.3 --out /tmp/soak   # a short check
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import sys
import time
from pathlib import Path

import psutil

from benchmarks.common import (
    IMAGENETTE,
    RESULTS,
    command,
    image_files,
    machine,
    machine_line,
)
from benchmarks.http_load import (
    BOUNDARY,
    content_type,
    latency_summary_ms,
    multipart_body,
    service_process,
)

PHOTOS = IMAGENETTE / "val"
# what the serving benchmarks run the service with: on the CPU, no access log
SERVER_ENV = {"EMBEDSERVE_ACCESS_LOG": "false", "EMBEDSERVE_DEVICE": "cpu"}


def worker_rss_mb(server_pid: int) -> float:
    """Resident memory of the BentoML worker processes (MB)."""
    total = 0
    for p in psutil.Process(server_pid).children(recursive=True):
        try:
            if "_bentoml_impl.worker.service" in " ".join(p.cmdline()):
                total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 1e6, 1)


async def soak(
    url: str, bodies: list[bytes], concurrency: int, seconds: float, sample, every: float
) -> dict:
    import aiohttp

    statuses: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    samples: list[tuple[float, float]] = []
    first_errors: list[str] = []
    stop = False
    start = time.perf_counter()

    async def client(i: int) -> None:
        n = i
        while not stop:
            body = bodies[n % len(bodies)]
            n += concurrency
            t0 = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    payload = await r.read()
                    key = str(r.status)
                    if r.status not in (200, 503) and len(first_errors) < 5:
                        first_errors.append(f"{r.status}: {payload[:200]!r}")
            except (TimeoutError, aiohttp.ClientError) as e:
                key = type(e).__name__
                if len(first_errors) < 5:
                    first_errors.append(f"{key}: {e}")
            statuses[key] += 1
            if key == "200":
                latencies.append(time.perf_counter() - t0)

    async def sampler() -> None:
        while not stop:
            samples.append((round(time.perf_counter() - start, 1), sample()))
            await asyncio.sleep(every)

    headers = {"Content-Type": content_type(BOUNDARY)}
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(client(i)) for i in range(concurrency)]
        tasks.append(asyncio.create_task(sampler()))
        await asyncio.sleep(seconds)
        stop = True
        await asyncio.gather(*tasks)
    samples.append((round(time.perf_counter() - start, 1), sample()))
    return {
        "statuses": dict(statuses),
        "latencies": latencies,
        "rss_samples_mb": samples,
        "first_errors": first_errors,
        "elapsed_s": round(time.perf_counter() - start, 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--warmup-s", type=float, default=60.0, help="RSS baseline after this")
    parser.add_argument("--sample-every", type=float, default=5.0)
    parser.add_argument("--photos", type=Path, default=PHOTOS)
    parser.add_argument("--max-photos", type=int, default=500)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    files = image_files(args.photos, (".jpg", ".jpeg"))
    files = files[:: max(1, len(files) // args.max_photos)][: args.max_photos]  # every class
    if not files:
        raise SystemExit(f"no JPEG photos under {args.photos}")
    bodies = [multipart_body([f.read_bytes()]) for f in files]
    args.out.mkdir(parents=True, exist_ok=True)
    log = Path("/tmp") / f"soak-server-{os.getpid()}.log"
    with service_process(log, SERVER_ENV) as server:
        result = asyncio.run(
            soak(
                server.url + "/embed",
                bodies,
                args.concurrency,
                args.minutes * 60,
                lambda: worker_rss_mb(server.proc.pid),
                args.sample_every,
            )
        )
    samples = result.pop("rss_samples_mb")
    latencies = result.pop("latencies")
    after_warmup = next((rss for t, rss in samples if t >= args.warmup_s), samples[-1][1])
    end = samples[-1][1]
    peak = max(rss for _, rss in samples)
    statuses = result["statuses"]
    errors = sum(n for k, n in statuses.items() if k not in ("200", "503"))
    report = {
        "command": command("soak", sys.argv[1:]),
        "machine": machine(),
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "photos": len(files),
        "requests": sum(statuses.values()),
        "served_200": statuses.get("200", 0),
        "back_pressure_503": statuses.get("503", 0),
        "errors": errors,
        "statuses": statuses,
        "first_errors": result["first_errors"],
        "req_s": round(statuses.get("200", 0) / result["elapsed_s"], 1),
        **latency_summary_ms(latencies),
        "rss_mb": {
            "after_warmup": after_warmup,
            "end": end,
            "peak": peak,
            "growth_after_warmup": round(end - after_warmup, 1),
        },
        "rss_samples_mb": samples,
    }
    report["pass"] = errors == 0 and report["rss_mb"]["growth_after_warmup"] < 50
    (args.out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    rss = report["rss_mb"]
    (args.out / "soak.md").write_text(
        f"# Soak: {args.minutes:g} min, concurrency {args.concurrency}, real photos\n\n"
        f"`{report['command']}` on {machine_line(report['machine'])}; {len(files)} Imagenette val "
        "JPEGs, one per request, POST /embed on loopback; the default model on the CPU.\n\n"
        "| requests | 200 | 503 (back-pressure) | errors | req/s | p50 | p95 | p99 |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| {report['requests']} | {report['served_200']} | {report['back_pressure_503']} | "
        f"{errors} | {report['req_s']} | {report['p50_ms']} ms | {report['p95_ms']} ms | "
        f"{report['p99_ms']} ms |\n\n"
        f"Worker RSS: {rss['after_warmup']} MB after {args.warmup_s:g} s of warm-up, "
        f"{rss['end']} MB at the end (growth {rss['growth_after_warmup']} MB), "
        f"peak {rss['peak']} MB. Result: {'PASS' if report['pass'] else 'FAIL'}.\n"
    )
    print(json.dumps({k: v for k, v in report.items() if k != "rss_samples_mb"}, indent=2))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
