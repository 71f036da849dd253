"""The training device and precision: which device, which autocast dtype (`--precision auto`
measures bf16 against fp32 on CPUs that have bf16 arithmetic), and what the CPU is, for the log.
"""

from __future__ import annotations

import functools
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no usable CUDA device on this machine")
    return torch.device(name)


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cpu_description() -> dict[str, Any]:
    """The CPU's model name, usable cores and the flags that decide its kernels (bf16, VNNI)."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "flags": [f for f in wanted if f in flags]}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    Without either (AVX2-only CPUs such as AMD Zen 2/3 or older Intel cores), PyTorch emulates
    bf16 and an autocast step is several times slower than fp32, not faster.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# bf16 must beat fp32 by this much in the probe below to be chosen by --precision auto: a
# margin over the probe's noise, so that a CPU where the two are close keeps fp32.
BF16_MIN_SPEEDUP = 1.2


@functools.cache
def cpu_bf16_speedup(reps: int = 7) -> float:
    """fp32 time / bf16-autocast time of a convolution's forward and backward pass on this CPU.

    The CPU flags alone do not tell: a Zen 5 (AVX512-BF16, no AMX) runs the training step 2x
    faster in bf16, while a virtualised Xeon that shows AVX512-BF16 but no AMX ran it 0.8x as
    fast as fp32 (matmuls 163 against 321 GFLOP/s). A 3x3 convolution of 64 channels on
    channels_last activations (what a ResNet's step is mostly made of), timed `reps` times in
    each precision, the two interleaved, and the median of the paired ratios taken: other work
    starting or stopping during the probe slows both sides of a pair alike (timed in two blocks,
    a probe beside an ending `embedserve eval` read 0.68 on a CPU that measures 1.3-1.5 alone).
    Under a second, once per process. Uses its own random generator: the global RNG is untouched.
    """
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 64, 3, 3, generator=gen) / 24).requires_grad_()
    x = torch.randn(8, 64, 32, 32, generator=gen).to(memory_format=torch.channels_last)
    x.requires_grad_()

    def seconds(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = F.conv2d(x, weight, padding=1)
        out.float().sum().backward()
        return time.perf_counter() - start

    seconds(None), seconds(torch.bfloat16)  # warm-up: oneDNN picks and caches its kernels
    ratios = sorted(seconds(None) / seconds(torch.bfloat16) for _ in range(reps))
    return ratios[reps // 2]


def measures_bf16(precision: str, device: torch.device) -> bool:
    """Whether resolving `precision` on `device` runs the bf16 probe (cpu_bf16_speedup): auto on a
    CPU with bf16 arithmetic; without it bf16 is emulated and fp32 is taken unmeasured."""
    return precision == "auto" and device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None for fp32).

    auto: bf16 on CUDA where supported (fp16 otherwise); on the CPU, bf16 where the CPU has bf16
    arithmetic and a measured convolution step is at least BF16_MIN_SPEEDUP times faster in
    bf16 than in fp32 (cpu_bf16_speedup), else fp32.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if measures_bf16(precision, device) and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP:
            return torch.bfloat16
        return None
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """bf16, fp16 or fp32: what an autocast dtype from resolve_precision stands for."""
    return next(name for name, d in PRECISIONS.items() if d == dtype)
