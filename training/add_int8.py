"""Add a checked int8 variant to an existing model package, from its fp32 model.onnx:

    python -m training.add_int8 models/NAME --data DATA --out DIR [--in-place]

writes a complete copy of the package to DIR (card updated: the variant's sha256, its parity
against the package's own model.onnx, which was checked against PyTorch at export, the kernels it
was checked on, its recipe), leaving models/NAME as it is unless --in-place is given. The recipe
is the exporter's (training.variants.quantize_int8).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from embedserve import package as pkg
from embedserve.preprocess import preprocess_batch
from training.data import load_splits
from training.export_checks import (
    BATCH_CHECK,
    TOLERANCES,
    ExportRefused,
    check_file,
    check_session,
    int8_kernels,
    verify_with_embedserve,
)
from training.export_data import Labelled, dataset_name, evenly, knn_by_file, split_names
from training.parity import run_session
from training.publish import publish, staging_folder
from training.variants import VARIANTS, quantize_int8


def add_int8(
    package: str | Path,
    data: str,
    out: str | Path | None = None,
    in_place: bool = False,
    overwrite: bool = False,
    parity_images: int = 32,
    calibration_images: int = 128,
    knn: bool = True,
    knn_limit: int | None = None,
    threads: int | None = None,
    log: Callable[[str], None] = print,
    command: str = "python -m training.add_int8",
) -> dict[str, Any]:
    """Make, check and add model.int8.onnx to a copy of `package` at `out` (or to the package
    itself with `in_place`); return the new card. The reference is the package's model.onnx,
    which was checked against PyTorch at export. Raise ExportRefused (nothing written) when the
    file fails the int8 tolerance."""

    src = pkg.load_package(package)
    for variant in src.variants:
        src.verify_file(variant)  # sha256 as the card says
    if in_place:
        out = src.path
    elif out is None or Path(out).resolve() == src.path.resolve():
        raise ValueError("give --out DIR (a new folder), or --in-place to modify the package")
    elif Path(out).exists() and not overwrite:
        raise FileExistsError(f"{out} exists: pass overwrite (--overwrite) to replace it")
    out = Path(out)
    if parity_images < BATCH_CHECK:
        raise ValueError(f"parity_images must be at least {BATCH_CHECK}")
    hp = src.card.get("training", {}).get("hyperparameters", {})
    holdout, seed = hp.get("holdout_fraction", 0.1), hp.get("seed", 0)
    train, held = load_splits(data, holdout, seed, download=False)
    bank_split, query_split = split_names(data, holdout, seed)
    pre = src.preprocess
    images = preprocess_batch(list(evenly(held, parity_images).items), pre)
    calibration = preprocess_batch(list(evenly(train, calibration_images).items), pre)
    source = f"{dataset_name(data)} {query_split}, preprocessed by embedserve.preprocess"
    fp32 = check_session("fp32", src.file(), threads)
    reference = run_session(fp32, images)
    file_name, target, precision = VARIANTS["int8"]
    staging = staging_folder(out)
    try:
        for f in src.path.iterdir():
            if f.is_file() and f.name != file_name:
                shutil.copy2(f, staging / f.name)
        dst = staging / file_name
        log(f"quantizing {src.file()} on {len(calibration)} calibration images")
        with tempfile.TemporaryDirectory() as scratch:
            conversion = quantize_int8(staging / pkg.MODEL_FILE, dst, calibration, Path(scratch))
        kernels = int8_kernels()
        session = check_session("int8", dst, threads, kernels)
        reference_name = "model.onnx (ONNX Runtime CPU, fp32)"
        check = check_file(
            file_name, session, images, reference, TOLERANCES["int8"], source, reference_name
        )
        check.update(kernels=kernels, reference=reference_name)
        entry: dict[str, Any] = {
            "file": file_name,
            "sha256": pkg.sha256_file(dst),
            "precision": precision,
            "target": target,
            "parity": check,
        }
        if knn:
            ks = sorted({m["k"] for m in src.card["metrics"]["knn"]}) or [20, 200]
            temperature = next((m["temperature"] for m in src.card["metrics"]["knn"]), 0.07)
            labelled = Labelled(data, train, held, bank_split, query_split)
            log(f"kNN top-1 of model.onnx and {file_name} on {dataset_name(data)}")
            top1 = knn_by_file(
                {"fp32": fp32, "int8": session}, labelled, pre, ks, temperature, knn_limit
            )
            diff = {str(k): round(top1["int8"][k] - top1["fp32"][k], 4) for k in ks}
            drop = -min(diff.values())
            if drop > TOLERANCES["int8"].max_knn_drop:
                raise ExportRefused(f"{file_name} loses {drop:.4f} kNN top-1: {diff}")
            entry["knn_top1_diff"] = diff
        # the reference, model.onnx, is the card's own sha256
        conversion["added"] = {
            "command": command,
            "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        entry["conversion"] = conversion
        card = json.loads((staging / pkg.CARD_FILE).read_text())
        card["variants"]["int8"] = entry
        pkg.validate_card(card, f"the card of {card['name']}")
        (staging / pkg.CARD_FILE).write_text(json.dumps(card, indent=1) + "\n")
        verify_with_embedserve(staging, images[:BATCH_CHECK], reference[:BATCH_CHECK], threads)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(
        f"wrote {out}: int8 min cosine {check['min_cosine']:.5f}, max abs "
        f"{check['max_abs_diff']:.3g} against model.onnx ({kernels} kernels)"
        + (f", kNN diff {entry['knn_top1_diff']}" if "knn_top1_diff" in entry else "")
    )
    return card


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.add_int8", description=__doc__.split("\n")[0]
    )
    a = p
    a.add_argument("package", help="the package folder or name, e.g. models/NAME")
    a.add_argument("--data", required=True, help="class-per-folder images (train/ and val/)")
    a.add_argument("--out", default=None, help="the folder to write the package copy to")
    a.add_argument("--in-place", action="store_true", help="modify the package itself")
    a.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    a.add_argument("--parity-images", type=int, default=32, help="held-out images checked")
    a.add_argument("--calibration-images", type=int, default=128, help="training images")
    a.add_argument("--knn", action=argparse.BooleanOptionalAction, default=True)
    a.add_argument("--knn-limit", type=int, default=None, help="at most this many per split")
    a.add_argument("--threads", type=int, default=None, help="ONNX Runtime CPU threads")
    return p


def main(argv: list[str] | None = None) -> int:

    args = build_parser().parse_args(argv)
    try:
        add_int8(
            args.package, args.data, args.out, in_place=args.in_place, overwrite=args.overwrite,
            parity_images=args.parity_images, calibration_images=args.calibration_images,
            knn=args.knn, knn_limit=args.knn_limit, threads=args.threads,
            command=" ".join(["python -m training.add_int8", *(sys.argv[1:] if argv is None else argv)]),
        )  # fmt: skip
    except ExportRefused as e:
        print(f"refused, nothing written: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, FileExistsError, ValueError, pkg.PackageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
