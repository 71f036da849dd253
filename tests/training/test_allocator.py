"""The CPU allocator setting: large freed blocks stay in the process for reuse, and the trainer
applies it only where asked."""

import ctypes
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.training.test_trainer import small_config
from training.config import TrainConfig
from training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

# Runs in a child process: the setting is process-wide and must not leak into the test run.
PROBE = textwrap.dedent(
    """
    import ctypes, json, sys
    import numpy as np

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    if sys.argv[1] == "retain":
        from training.allocator import retain_freed_memory
        assert retain_freed_memory()
    block = np.ones(64 << 20, dtype=np.uint8)  # 64 MiB, above glibc's largest mmap threshold
    live = libc.mallinfo2()
    del block
    freed = libc.mallinfo2()
    print(json.dumps({"mmapped_live": live.hblkhd, "heap_after_free": freed.arena}))
    """
)


def probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, cwd=ROOT
    )
    return json.loads(out.stdout)


@pytest.mark.skipif(not GLIBC, reason="the setting exists only in glibc's malloc")
def test_retained_allocator_keeps_large_blocks_in_the_heap():
    system, retained = probe("system"), probe("retain")
    # by default the 64 MiB block is its own mapping, unmapped when freed ...
    assert system["mmapped_live"] >= 64 << 20
    assert system["heap_after_free"] < 64 << 20
    # ... retained, it comes from the heap and stays there for the next step
    assert retained["mmapped_live"] < 64 << 20
    assert retained["heap_after_free"] >= 64 << 20


def test_trainer_applies_the_setting_only_on_request(image_folder, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr("training.trainer.retain_freed_memory", lambda: calls.append(1) or True)
    trainer = Trainer(small_config(image_folder, tmp_path / "a"))
    assert trainer.retained_allocator and calls == [1]
    trainer = Trainer(small_config(image_folder, tmp_path / "b", cpu_allocator="system"))
    assert not trainer.retained_allocator and calls == [1]
    with pytest.raises(ValueError, match="cpu_allocator must be retain or system"):
        TrainConfig(cpu_allocator="jemalloc").resolved()


def test_retain_is_a_no_op_without_glibc(monkeypatch):
    from training import allocator

    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("musl", "1.2"))
    monkeypatch.setattr(ctypes, "CDLL", lambda *a: pytest.fail("libc must not be touched"))
    assert allocator.retain_freed_memory() is False
