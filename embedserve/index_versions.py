"""The version folders of a search index: reading the live one, writing the next atomically.

    version, manifest, faiss_index = read_version(path)
    version = write_version(path, faiss_index, manifest, write_metadata, committed, checkpoint)

A save writes a new version in a temporary folder, fsyncs it, renames it into place, then
replaces CURRENT atomically (os.replace) and removes the old version and any leftovers of
crashed saves. A crash at any point leaves CURRENT naming a complete version: the old one until
the replace, the new one after. The caller holds the folder's flock (INDEX_DIR/.lock) and
decides what happens at the commit (`committed`: reopen the metadata, empty the log).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss

from embedserve.index_format import (
    CURRENT_FILE,
    INDEX_FILE,
    LOCK_FILE,
    LOG_FILE,
    LOG_LOCK_FILE,
    MANIFEST_FILE,
    METADATA_FILE,
    SearchIndexError,
    fsync,
)


def current_version(path: Path) -> Path:
    """The live version folder that CURRENT names (which may have just been removed)."""
    pointer = path / CURRENT_FILE
    if not pointer.is_file():
        raise SearchIndexError(
            f"{path}: no search index here ({CURRENT_FILE} is missing; build one with "
            f"`embedserve index build`)"
        )
    name = pointer.read_text().strip()
    if not name or "/" in name or name.startswith("."):
        raise SearchIndexError(f"{pointer}: does not name a version folder ({name!r})")
    return path / name


def read_version(path: Path) -> tuple[Path, dict[str, Any], faiss.Index]:
    """The live version folder, its manifest and its FAISS index."""
    for _ in range(5):  # a concurrent save may remove the version CURRENT named a moment ago
        version = current_version(path)
        if not version.is_dir():
            time.sleep(0.05)
            continue
        try:
            manifest = json.loads((version / MANIFEST_FILE).read_text())
            faiss_index = faiss.read_index(str(version / INDEX_FILE))
        except (OSError, json.JSONDecodeError, RuntimeError) as e:
            if not version.is_dir():
                continue
            raise SearchIndexError(f"{version}: cannot read the index: {e}") from e
        return version, manifest, faiss_index
    raise SearchIndexError(f"{path}: {CURRENT_FILE} names a version folder that does not exist")


def live_version_name(path: Path) -> str | None:
    pointer = path / CURRENT_FILE
    return pointer.read_text().strip() if pointer.is_file() else None


def write_version(
    path: Path,
    faiss_index: faiss.Index,
    manifest: dict[str, Any],
    write_metadata: Callable[[Path], None],
    committed: Callable[[Path], None],
    checkpoint: Callable[[str], None],
) -> Path:
    """Write the next version of the index folder `path` and make it live; returns its folder.
    `checkpoint(step)` is called between the steps (tests kill a save there)."""
    live = live_version_name(path)
    sequence = int(live[1:7]) + 1 if live and live[1:7].isdigit() else 1
    tmp = path / f".tmp-{secrets.token_hex(4)}"
    tmp.mkdir()
    checkpoint("temp-dir-created")
    faiss.write_index(faiss_index, str(tmp / INDEX_FILE))
    checkpoint("index-written")
    write_metadata(tmp / METADATA_FILE)
    checkpoint("metadata-written")
    (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
    checkpoint("manifest-written")
    for name in (INDEX_FILE, METADATA_FILE, MANIFEST_FILE):
        fsync(tmp / name)
    fsync(tmp)
    checkpoint("files-synced")
    version = path / f"v{sequence:06d}-{secrets.token_hex(4)}"
    os.rename(tmp, version)
    fsync(path)
    checkpoint("version-renamed")
    pointer_tmp = path / f".{CURRENT_FILE}.tmp"
    with open(pointer_tmp, "w") as f:
        f.write(version.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    checkpoint("pointer-written")
    os.replace(pointer_tmp, path / CURRENT_FILE)  # the commit point
    fsync(path)
    checkpoint("pointer-replaced")
    committed(version)
    keep = (version.name, CURRENT_FILE, LOCK_FILE, LOG_FILE, LOG_LOCK_FILE)
    for entry in path.iterdir():  # the old version and any leftovers of crashed saves
        if entry.name not in keep:
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    checkpoint("cleaned")
    return version
