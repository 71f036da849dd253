"""The load sweep of benchmarks.serve_load: the photos, a server's /info, and the closed-loop
sweep of concurrency x images per request against a server's /embed (benchmarks.http_load).
"""

from __future__ import annotations

import asyncio
import json
import os

from benchmarks import synthetic
from benchmarks.common import IMAGENETTE, image_files
from benchmarks.http_load import BOUNDARY, content_type, http_get, multipart_body, run_point

IMAGENETTE_VAL = IMAGENETTE / "val"


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


def groups(jpegs: list[bytes], k: int, total: int | None = None) -> list[list[bytes]]:
    """Groups of `k` photos cycling through `jpegs`, starting every `k`-th photo up to `total`
    (default: all of them) - a request's or a batch's images."""
    n = len(jpegs)
    stop = n if total is None else total
    return [[jpegs[(i + j) % n] for j in range(k)] for i in range(0, stop, k)]


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
        bodies = [multipart_body(g) for g in groups(jpegs, k)]
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
