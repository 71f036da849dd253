"""Decoding a request's images in a thread pool (Pillow releases the GIL), before batching:
a bad file fails only its own request, with one 4xx that names every bad file."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any

import numpy as np

from embedserve.http.errors import ClientError
from embedserve.http.forms import Upload, client_name
from embedserve.preprocess import ImageDecodeError, ImageTooLarge, UnsupportedImageFormat


def status_for(error: ImageDecodeError) -> int:
    """413 for too many pixels, 415 for a format that is not decoded, else 400."""
    if isinstance(error, ImageTooLarge):
        return 413
    if isinstance(error, UnsupportedImageFormat):
        return 415
    return 400


# the reason label of a refused request (embedserve.telemetry), by the status of its files
REASONS = {400: "bad_image", 413: "max_image_pixels", 415: "unsupported_image_format"}


async def decode_images(
    images: list[Upload],
    load: Callable[[bytes], Any],
    executor: Executor,
    field: str = "images",
    stack: bool = True,
) -> Any:
    """`load` (bytes -> preprocessed array) on every file in parallel on `executor`, stacked
    (or, without `stack`, the list of what `load` returned).

    Every file that raises ImageDecodeError is named in one ClientError (by its position in
    `field` and its file name: `images[1] (scan.pdf)`), whose status is the most specific of
    theirs (415 > 413 > 400); any other exception is raised as it is."""
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(
        *(loop.run_in_executor(executor, load, data) for _, data in images),
        return_exceptions=True,
    )
    problems = []
    for position, ((filename, _), result) in enumerate(zip(images, results, strict=True)):
        if isinstance(result, ImageDecodeError):
            name = client_name(position, filename, field)
            problems.append((status_for(result), name, str(result)))
        elif isinstance(result, BaseException):
            raise result
    if problems:
        status = max(s for s, _, _ in problems)  # 415 > 413 > 400: the most specific
        files = [{"file": name, "problem": why} for _, name, why in problems]
        summary = "; ".join(f"{f['file']}: {f['problem']}" for f in files)
        raise ClientError(status, summary, files, reason=REASONS[status])
    return np.stack(results) if stack else list(results)
