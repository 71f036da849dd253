"""What the benchmark scripts share: the repository's paths, the machine a result was measured
on, the image files of a folder, how a result is written, and a timed rate of queries.

Standard library only at import (the CPU flags import embedserve when asked for): every script
imports it.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATASETS = ROOT.parent / "shared" / "datasets"
IMAGENETTE = DATASETS / "imagenette-160"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
# The flags that decide the fast paths: bf16 training (avx512_bf16, amx_tile), int8 inference
# (avx512_vnni, avx_vnni), and the AVX2-only baseline.
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def image_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The image files below `folder`, sorted (class folders and all)."""
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes)


def cpu_model(cpuinfo: str | os.PathLike = "/proc/cpuinfo") -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS the CPU shows."""
    from embedserve.package import cpu_flags as all_flags  # onnxruntime: only when asked

    shown = all_flags()
    return [f for f in CPU_FLAGS if f in shown]


def cores() -> int:
    """The cores this process may run on (its affinity), else the machine's."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def gpu_name() -> str | None:
    """The first GPU's name from nvidia-smi, or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = out.stdout.strip().splitlines()
    return names[0].strip() if out.returncode == 0 and names else None


def machine(**extra: Any) -> dict[str, Any]:
    """What a result was measured on: CPU model, cores, platform, CPU flags (of CPU_FLAGS), GPU
    (nvidia-smi's name, None without one); plus `extra`."""
    return {
        "cpu_model": cpu_model(),
        "cores": cores(),
        "platform": platform.platform(),
        "cpu_flags": cpu_flags(),
        "gpu": gpu_name(),
        **extra,
    }


def machine_line(m: dict[str, Any]) -> str:
    """A `machine()` record in words, for the markdown reports."""
    flags = ", ".join(m.get("cpu_flags") or []) or "none of " + "/".join(CPU_FLAGS)
    return (
        f"{m['cpu_model']}, {m['cores']} cores (flags: {flags}), {m['platform']}; "
        f"GPU: {m.get('gpu') or 'none'}"
    )


def command(module: str, argv: Sequence[str]) -> str:
    """The command line that reruns a benchmark: `python -m benchmarks.MODULE ARGS`."""
    return shlex.join(["python", "-m", f"benchmarks.{module}", *argv])


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """`data` as indented JSON at `path` (folders made); the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def median_rate(
    search: Callable[[Any], Any], queries: Sequence, batch: int, repeats: int, min_time: float
) -> float:
    """Queries per second of `search(batch_of_queries)`, `batch` queries per call: the median of
    `repeats` timed runs of at least `min_time` seconds each, after one warm-up call."""
    batches = [queries[i : i + batch] for i in range(0, len(queries) - batch + 1, batch)]
    search(batches[0])  # warm-up
    rates = []
    for _ in range(repeats):
        done, start, i = 0, time.perf_counter(), 0
        while True:
            search(batches[i % len(batches)])
            done += batch
            i += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        rates.append(done / elapsed)
    return statistics.median(rates)
