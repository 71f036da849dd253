"""What the `embedserve` commands share: the usage error, the engine and thumbnail options, the
encoder, and embedding a folder (with thumbnails)."""

from __future__ import annotations

import argparse
import sys

from embedserve.config import DEFAULT_THUMBNAIL_SIZE, MAX_THUMBNAIL_SIZE
from embedserve.imagefolder import embed_files, scan_images
from embedserve.package import Encoder, load_package

USAGE_ERROR = 2


class UsageError(Exception):
    """A bad argument or input; reported in one line with exit code 2."""


# -- shared options ---------------------------------------------------------------------------


def add_engine_options(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where the encoder runs (default: auto: CUDA where a GPU is present and CUDA really "
        "starts, else the CPU, without trying CUDA where no GPU is present)",
    )
    p.add_argument(
        "--variant",
        default="auto",
        help="model variant: auto (int8 on a VNNI CPU, fp16 on CUDA), fp32, fp16 or int8",
    )
    p.add_argument("--batch-size", type=int, default=32, help="images per model call (32)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="threads for decoding, ONNX Runtime and FAISS (default: all cores)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_thumbnail_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-thumbnails",
        action="store_true",
        help="store no thumbnails (default: a small JPEG of each image, for the search page and "
        "GET /index/items/{id}/thumbnail)",
    )
    p.add_argument(
        "--thumbnail-size",
        type=int,
        default=DEFAULT_THUMBNAIL_SIZE,
        help=f"the thumbnails' longer side in pixels ({DEFAULT_THUMBNAIL_SIZE})",
    )


def configure_threads(threads: int | None) -> int:
    import os

    import faiss

    threads = threads or os.cpu_count() or 1
    if threads < 1:
        raise UsageError(f"--threads must be at least 1, got {threads}")
    faiss.omp_set_num_threads(threads)
    return threads


def make_encoder(args: argparse.Namespace, model: str | None) -> Encoder:
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    package = load_package(model)
    return Encoder(package, variant=args.variant, device=args.device, intra_op_threads=args.threads)


def show_progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def embed_folder(args: argparse.Namespace, encoder: Encoder, folder: str):
    """Scan and embed a folder (with thumbnails unless --no-thumbnails); returns the images and
    the EmbedResult."""
    if not args.no_thumbnails and not 1 <= args.thumbnail_size <= MAX_THUMBNAIL_SIZE:
        raise UsageError(
            f"--thumbnail-size must be between 1 and {MAX_THUMBNAIL_SIZE}, got "
            f"{args.thumbnail_size} (--no-thumbnails stores none)"
        )
    images = scan_images(folder)
    result = embed_files(
        encoder,
        images.paths,
        batch_size=args.batch_size,
        threads=args.threads,
        progress=show_progress(args),
        thumbnails=0 if args.no_thumbnails else args.thumbnail_size,
    )
    rate = f"{result.images_per_second:.1f} img/s"
    print(
        f"embedded {len(result.ok)} of {len(images.paths)} images from {folder} in "
        f"{result.seconds:.1f} s ({rate}); {len(result.failed)} skipped",
        file=sys.stderr,
    )
    return images, result
