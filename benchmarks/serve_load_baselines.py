"""The baselines of benchmarks.serve_load: (a) the in-process pipeline (decode + preprocess +
ONNX Runtime, with the server's settings) and (b) the naive server's command line.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

from benchmarks.serve_load_sweep import groups
from embedserve.package import Encoder, ModelPackage, PackageError, load_package
from embedserve.preprocess import preprocess_batch


def naive_command(port: int, size: int) -> list[str]:
    """The naive server (b), run from the repository root."""
    return [
        *(sys.executable, "-m", "benchmarks.naive_torch_server"),
        *("--port", str(port), "--size", str(size)),
    ]


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
        chunks = groups(jpegs, batch, max(images, 4 * batch))
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
