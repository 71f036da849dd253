"""Peak resident memory of a worker under the worst requests the default limits allow.

Each request holds `max_images_per_request` images that each declare just under
`max_image_pixels` (PNG: no reduced decoding; JPEG: Pillow's draft mode), all within
`max_request_bytes`; `--concurrency` of them are sent at once. The worker's RSS is sampled every
50 ms; the report gives idle, peak and peak - idle.

    .venv/bin/python benchmarks/memory_ceiling.py   # -> benchmarks/results/memory_ceiling.json
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from http_load import BOUNDARY, ServerProcess, content_type, free_port, multipart_body  # noqa: E402
from soak import BENTOML, REPO, worker_rss_mb  # noqa: E402

from embedserve.config import ServeConfig  # noqa: E402


def big_image(fmt: str, pixels: int) -> bytes:
    side = int(pixels**0.5) - 1  # just under the limit
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 130, 140)).save(buf, fmt, quality=50)
    return buf.getvalue()


def post(url: str, body: bytes) -> int:
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type(BOUNDARY)}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    cfg = ServeConfig()
    port = free_port()
    cmd = [str(BENTOML), "serve", "embedserve.service:EmbedService", "--port", str(port)]
    env = {"EMBEDSERVE_ACCESS_LOG": "false", "EMBEDSERVE_DEVICE": "cpu"}
    results = {}
    with ServerProcess(cmd, port, Path("/tmp/memory-ceiling-server.log"), env=env, cwd=REPO) as s:
        idle = worker_rss_mb(s.proc.pid)
        for fmt in ("PNG", "JPEG"):
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
            with ThreadPoolExecutor(args.concurrency) as pool:
                statuses = list(
                    pool.map(post, [s.url + "/embed"] * args.concurrency, [body] * args.concurrency)
                )
            done.set()
            sampler.join()
            results[fmt] = {
                "image_bytes": len(image),
                "images_per_request": count,
                "body_mb": round(len(body) / 1e6, 1),
                "concurrent_requests": args.concurrency,
                "statuses": statuses,
                "seconds": round(time.perf_counter() - start, 1),
                "peak_rss_mb": peak,
                "peak_over_idle_mb": round(peak - idle, 1),
            }
            print(fmt, results[fmt], flush=True)
    report = {
        "command": " ".join(["python", "benchmarks/memory_ceiling.py", *sys.argv[1:]]),
        "limits": {
            "max_image_pixels": cfg.max_image_pixels,
            "max_images_per_request": cfg.max_images_per_request,
            "max_request_bytes": cfg.max_request_bytes,
            "decode_threads": cfg.decoder_threads,
        },
        "idle_rss_mb": idle,
        "worst": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory_ceiling.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
