"""Folders of images: finding them (with labels from class folders) and embedding them in batches.

    images = scan_images("photos/")                      # sorted paths; labels from class folders
    result = embed_files(encoder, images.paths)          # the server's preprocessing, batched
    result.embeddings                                    # float32 [N_ok, D]
    result.ok                                            # which paths they belong to
    result.failed                                        # [(path, reason)] of files skipped

Class-per-folder (`root/<class>/.../*.jpg`) gives each image the name of its first-level folder
as its label; an image directly in `root` has no label (a flat folder gives none).
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from embedserve.package import Encoder
from embedserve.preprocess import ImageDecodeError, preprocess
from embedserve.thumbnails import preprocess_with_thumbnail

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
)


class ImageFolderError(ValueError):
    """A folder of images that cannot be used (missing, or without any image)."""


@dataclass(frozen=True)
class ImageSet:
    """Image files in a stable (sorted) order with their labels (None where there is none)."""

    root: Path
    paths: list[Path]
    labels: list[str | None]

    @property
    def classes(self) -> list[str]:
        """The sorted distinct labels: a label's position is its class index."""
        return sorted({label for label in self.labels if label is not None})

    def label_indices(self) -> np.ndarray:
        """int64 [N]: each image's class index (-1 without a label)."""
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index.get(label, -1) for label in self.labels], np.int64)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_images(root: str | os.PathLike) -> ImageSet:
    """Every image file under `root` (recursively, hidden entries skipped), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise ImageFolderError(f"{root}: not a folder of images")
    found: list[tuple[Path, str | None]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        label = rel.parts[0] if rel.parts else None
        found += [(Path(dirpath) / f, label) for f in filenames if is_image_file(Path(f))]
    if not found:
        raise ImageFolderError(
            f"{root}: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) found"
        )
    found.sort(key=lambda item: str(item[0]))
    return ImageSet(root, [p for p, _ in found], [label for _, label in found])


@dataclass
class EmbedResult:
    """What `embed_files` made of a list of files."""

    embeddings: np.ndarray  # float32 [N_ok, D], rows in the order of `ok`
    ok: np.ndarray  # int64 [N_ok]: positions in the input list of the embedded files
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason) of skipped files
    seconds: float = 0.0
    # JPEG thumbnails of the embedded files, in the order of `ok` (embedserve.thumbnails); None
    # when none were asked for
    thumbnails: list[bytes] | None = None

    @property
    def images_per_second(self) -> float:
        return len(self.ok) / self.seconds if self.seconds > 0 else 0.0


def _load(path: Path, encoder: Encoder, thumbnails: int = 0) -> Any:
    """The model input of one file (with its thumbnail when `thumbnails` > 0: a pair), or the
    reason it cannot be read."""
    try:
        if thumbnails > 0:
            return preprocess_with_thumbnail(path, encoder.package.preprocess, thumbnails)
        return preprocess(path, encoder.package.preprocess)
    except (ImageDecodeError, OSError) as e:
        return str(e)


def embed_files(
    encoder: Encoder,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 32,
    threads: int = 2,
    progress: bool = True,
    desc: str = "embedding",
    thumbnails: int = 0,
) -> EmbedResult:
    """Embed image files with the server's preprocessing, `batch_size` images per model call;
    with `thumbnails` > 0, also a JPEG thumbnail of each (that many pixels on its longer side)
    made from the same decoded image.

    Decoding runs in `threads` threads (Pillow releases the GIL), one batch ahead of the model, so
    at most two batches of decoded images are in memory. A file that cannot be decoded is skipped
    with a warning that names it; the result lists it in `failed`.
    """
    from tqdm import tqdm  # imported here: only folder embedding needs it

    paths = [Path(p) for p in paths]
    dim = encoder.package.embedding_dim
    chunks: list[np.ndarray] = []
    ok: list[int] = []
    thumbs: list[bytes] = []
    failed: list[tuple[str, str]] = []
    start = time.perf_counter()
    bar = tqdm(total=len(paths), unit="img", desc=desc, disable=not progress, file=sys.stderr)
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        pending: deque[tuple[int, list[Future]]] = deque()
        batch_starts = iter(range(0, len(paths), batch_size))

        def submit_next() -> None:
            first = next(batch_starts, None)
            if first is not None:
                batch = paths[first : first + batch_size]
                pending.append((first, [pool.submit(_load, p, encoder, thumbnails) for p in batch]))

        submit_next()
        while pending:
            submit_next()  # decode the next batch while this one runs through the model
            first, futures = pending.popleft()
            images, positions = [], []
            for offset, future in enumerate(futures):
                item = future.result()
                if isinstance(item, str):
                    failed.append((str(paths[first + offset]), item))
                    warnings.warn(f"skipped {paths[first + offset]}: {item}", stacklevel=2)
                else:
                    if thumbnails > 0:
                        item, thumbnail = item
                        thumbs.append(thumbnail)
                    images.append(item)
                    positions.append(first + offset)
            if images:
                chunks.append(encoder.embed(np.stack(images)))
                ok += positions
            bar.update(len(futures))
    bar.close()
    embeddings = np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)
    return EmbedResult(
        embeddings.astype(np.float32, copy=False),
        np.array(ok, np.int64),
        failed,
        time.perf_counter() - start,
        thumbs if thumbnails > 0 else None,
    )
