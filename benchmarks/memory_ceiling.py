"""Peak resident memory of a worker under the worst requests the default limits allow.

Each request holds `max_images_per_request` images that each declare just under
`max_image_pixels`, all within `max_request_bytes`. Two floods, each sent at once:
  - decoding: `--decode-concurrency` requests of PNGs (no reduced decoding; 8.5 MB bodies),
  - bodies: `--body-concurrency` requests of JPEGs (Pillow's draft mode; 40 MB bodies), far more
    than `max_inflight_bytes` admits: the rest must get 503 at once.
The worker's RSS is sampled every 50 ms; the report gives idle, peak and peak - idle, against
the ceiling of docs/serving.md: idle + 4 x max_inflight_bytes + decode threads x 8 B x max_image_pixels.

    python -m benchmarks.memory_ceiling   # -> benchmarks/results/memory_ceiling.json
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from benchmarks.common import RESULTS, command, machine
from benchmarks.http_load import (
    BOUNDARY,
    content_type,
    multipart_body,
    service_process,
)
from benchmarks.soak import SERVER_ENV, worker_rss_mb
from embedserve.config import ServeConfig


def big_image(fmt: str, pixels: int) -> bytes:
    side = int(pixels**0.5) - 1  # just under the limit
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, fmt, quality=50)
    return buf.getvalue()


def post(url: str, body: bytes) -> int | str:
    """The answer's status; "reset" when the server closed the connection while the body was
    still being sent (how an early 503 reaches a client that does not read while it sends)."""
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type(BOUNDARY)}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (ConnectionResetError, BrokenPipeError, urllib.error.URLError):
        return "reset"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decode-concurrency", type=int, default=4)
    parser.add_argument("--body-concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    cfg = ServeConfig()
    log = Path("/tmp/memory-ceiling-server.log")
    results = {}
    with service_process(log, SERVER_ENV) as s:
        idle = worker_rss_mb(s.proc.pid)
        ceiling = round(
            idle
            + (4 * cfg.max_inflight_bytes + cfg.decoder_threads * 8 * cfg.max_image_pixels) / 1e6,
            1,
        )
        for fmt, concurrency in (("PNG", args.decode_concurrency), ("JPEG", args.body_concurrency)):
            image = big_image(fmt, cfg.max_image_pixels)
            count = min(cfg.max_images_per_request, cfg.max_request_bytes // (len(image) + 200))
            body = multipart_body([image] * count)
            peak, done = idle, threading.Event()

            def sample(pid=s.proc.pid, done=done) -> None:
                nonlocal peak
                while not done.is_set():
                    peak = max(peak, worker_rss_mb(pid))
                    time.sleep(0.05)

            sampler = threading.Thread(target=sample)
            sampler.start()
            start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                statuses = list(
                    pool.map(post, [s.url + "/embed"] * concurrency, [body] * concurrency)
                )
            done.set()
            sampler.join()
            results[fmt] = {
                "image_bytes": len(image),
                "images_per_request": count,
                "body_mb": round(len(body) / 1e6, 1),
                "concurrent_requests": concurrency,
                "statuses": {str(k): statuses.count(k) for k in sorted(set(statuses), key=str)},
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb": peak,
                "peak_over_idle_mb": round(peak - idle, 1),
                "within_ceiling": peak <= ceiling,
            }
            print(fmt, results[fmt], flush=True)
    report = {
        "command": command("memory_ceiling", sys.argv[1:]),
        "machine": machine(),
        "limits": {
            "max_image_pixels": cfg.max_image_pixels,
            "max_images_per_request": cfg.max_images_per_request,
            "max_request_bytes": cfg.max_request_bytes,
            "max_inflight_bytes": cfg.max_inflight_bytes,
            "decode_threads": cfg.decoder_threads,
        },
        "idle_rss_mb": idle,
        "ceiling_mb": ceiling,
        "ceiling": "idle + 4 x max_inflight_bytes + decode_threads x 8 B x max_image_pixels",
        "worst": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_ceiling.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if all(r["within_ceiling"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
