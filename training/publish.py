"""A package appears atomically: staged in a folder beside its place, fsync'ed, then renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def staging_folder(out: Path) -> Path:
    """A new, empty folder beside `out` with the permissions of an ordinary folder."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; a package is an ordinary folder
    return staging


def publish(staging: Path, out: Path) -> None:
    """fsync the staged package and rename it into place (an existing one is moved aside first:
    a directory cannot be renamed over a non-empty one)."""
    _fsync_tree(staging)
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old)
    else:
        os.replace(staging, out)
    _fsync_tree(out.parent)


def _fsync_tree(root: Path) -> None:
    for path in [*root.iterdir(), root]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
