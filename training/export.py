"""Export a trained encoder as a model package that `embedserve` serves without torch.

    python -m training.export --checkpoint runs/NAME/checkpoint.pt --out models/NAME

writes `models/NAME/` = `model.onnx` (fp32) + `model.fp16.onnx` (GPUs) + `model.int8.onnx` (CPUs
with VNNI) + `card.json` (see embedserve/card.schema.json), after checking every file:
ONNX Runtime (CPU) against PyTorch fp32 on real images preprocessed by `embedserve.preprocess`,
and a batch of 8 against 8 single-image runs, within the tolerances of `TOLERANCES`; with labels,
the kNN top-1 of each variant against model.onnx. A package that fails is not written and the
message gives the measured numbers. The package appears atomically (staged beside it, renamed).

The graph takes uint8 NHWC RGB images and does everything else itself: uint8 -> float,
mean/std normalization (`training.models.Normalize`, the trainer's own module), NHWC -> NCHW,
the backbone (no projector or predictor; BYOL's online encoder) and the L2 normalization.

The export in steps, one module each: the graph (training.onnx_graph), its variants
(training.variants), the checks against PyTorch (training.export_checks, on images from
training.export_data, with training.parity), the card (training.card) and the atomic
publication (training.publish); this module runs them in order and is the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from embedserve import package as pkg
from embedserve.preprocess import Preprocess
from training.card import build_card, knn_from_run, summary_line
from training.export_checks import (
    BATCH_CHECK,
    TOLERANCES,
    ExportRefused,
    check_file,
    check_session,
    int8_kernels,
    verify_with_embedserve,
)
from training.export_data import CheckImages, check_images, dataset_name, knn_section
from training.models import load_encoder
from training.onnx_graph import OPSET, export_onnx
from training.parity import torch_embeddings
from training.publish import publish, staging_folder
from training.variants import VARIANTS, make_variant


def export_package(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    variants: Sequence[str] = ("fp16", "int8"),
    data: str | None = None,
    parity_images: int = 32,
    calibration_images: int = 128,
    knn: bool = True,
    knn_limit: int | None = None,
    overwrite: bool = False,
    opset: int = OPSET,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Export, check and write a package; return its card. Raise ExportRefused (nothing written)
    when a file fails its check.

    `data`: a class-per-folder directory for the parity, calibration and kNN images (default:
    the run's --data when it can be read here; generated images otherwise, and no kNN).
    """
    checkpoint, out = Path(checkpoint), Path(out)
    name = name or out.name
    _check_arguments(out, variants, overwrite, parity_images, opset)
    graph, cfg, ck = load_encoder(checkpoint)
    pre = Preprocess(cfg.eval_resize, cfg.eval_size, cfg.eval_size)  # as the trainer evaluates
    images = check_images(cfg, pre, data, parity_images, calibration_images, log)
    reference = _reference(graph, images.parity, threads)  # NxD, PyTorch fp32
    staging = staging_folder(out)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            log(f"exporting {cfg.method} {cfg.backbone} ({cfg.eval_size} px, opset {opset})")
            sessions, checks, conversions = _write_files(
                staging, graph, cfg.eval_size, images, reference, variants, opset, threads,
                Path(scratch), log,
            )  # fmt: skip
            knn_metrics, knn_diffs = [], {}
            if knn and images.labelled is not None:
                log(f"kNN top-1 of every file on {dataset_name(images.labelled.data)}")
                knn_metrics, knn_diffs = knn_section(sessions, images.labelled, cfg, pre, knn_limit)
            elif cfg.data:
                knn_metrics = knn_from_run(ck, cfg, checkpoint, dataset_name(cfg.data))
        card = build_card(
            name, cfg, ck, checkpoint, pre, reference.shape[1], staging, opset, checks,
            conversions, knn_metrics, knn_diffs,
        )  # fmt: skip
        pkg.validate_card(card, f"the card of {name}")
        (staging / pkg.CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
        verify_with_embedserve(
            staging, images.parity[:BATCH_CHECK], reference[:BATCH_CHECK], threads
        )
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"wrote {out}: " + summary_line(card))
    return card


def _check_arguments(
    out: Path, variants: Sequence[str], overwrite: bool, parity_images: int, opset: int
) -> None:
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(
            f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}"
        )
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite (--overwrite) to replace it")
    if parity_images < BATCH_CHECK:
        raise ValueError(f"parity_images must be at least {BATCH_CHECK}")
    if opset < 17:
        raise ValueError(f"opset must be 17 or later, not {opset}")


def _reference(graph: torch.nn.Module, images: np.ndarray, threads: int | None) -> np.ndarray:
    """PyTorch fp32 embeddings of the parity images, on `threads` threads."""
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads or previous_threads)
    try:
        return torch_embeddings(graph, images)
    finally:
        torch.set_num_threads(previous_threads)  # a process-wide setting: leave it as found


def _write_files(
    staging: Path,
    graph: torch.nn.Module,
    size: int,
    images: CheckImages,
    reference: np.ndarray,
    variants: Sequence[str],
    opset: int,
    threads: int | None,
    scratch: Path,
    log: Callable[[str], None],
) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """model.onnx and each variant, each checked against `reference` as it is written; returns
    (ONNX Runtime sessions, check results, how each variant was made), by variant."""
    model_path = staging / pkg.MODEL_FILE
    sessions, checks, conversions = {}, {}, {}
    for variant in ("fp32", *variants):  # model.onnx first: the variants are made from it
        if variant == "fp32":
            path = model_path
            export_onnx(graph, path, size, size, opset)
        else:
            log(f"making and checking the {variant} variant")
            path = staging / VARIANTS[variant][0]
            conversions[variant] = make_variant(
                variant, model_path, path, images.calibration, scratch
            )
        kernels = int8_kernels() if variant == "int8" else None  # see int8_kernels
        sessions[variant] = check_session(variant, path, threads, kernels)
        checks[variant] = check_file(
            path.name, sessions[variant], images.parity, reference, TOLERANCES[variant],
            images.source,
        )  # fmt: skip
        if kernels:
            checks[variant]["kernels"] = kernels
    return sessions, checks, conversions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.export",
        description="Export a trainer checkpoint as a checked ONNX model package (model.onnx, variants, card.json).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="the trainer's checkpoint.pt")
    p.add_argument("--out", required=True, help="the package folder to write, e.g. models/NAME")
    p.add_argument(
        "--name", default=None, help="package name in the card (default: the folder name)"
    )
    p.add_argument(
        "--variants",
        nargs="*",
        default=["fp16", "int8"],
        choices=sorted(VARIANTS),
        help="variants besides model.onnx (none: --variants with no value)",
    )
    p.add_argument(
        "--data",
        default=None,
        help="class-per-folder images for parity, calibration and kNN (default: the run's --data when present)",
    )
    p.add_argument(
        "--parity-images", type=int, default=32, help="held-out images compared with PyTorch"
    )
    p.add_argument(
        "--calibration-images", type=int, default=128, help="training images that calibrate int8"
    )
    p.add_argument(
        "--knn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure kNN top-1 of every file (needs labels)",
    )
    p.add_argument(
        "--knn-limit",
        type=int,
        default=None,
        help="at most this many bank and query images for kNN (default: all)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing package")
    p.add_argument("--opset", type=int, default=OPSET, help="ONNX opset (17 or later)")
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for PyTorch and ONNX Runtime"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        export_package(
            args.checkpoint,
            args.out,
            name=args.name,
            variants=args.variants,
            data=args.data,
            parity_images=args.parity_images,
            calibration_images=args.calibration_images,
            knn=args.knn,
            knn_limit=args.knn_limit,
            overwrite=args.overwrite,
            opset=args.opset,
            threads=args.threads,
        )
    except ExportRefused as e:
        print(f"refused, nothing written to {args.out}: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, FileExistsError, ValueError, pkg.PackageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
