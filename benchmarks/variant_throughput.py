"""CPU throughput of a model package's variants (fp32, fp16, int8) against fp32, in one run.

Real photos (Imagenette val when present, else generated images) are preprocessed once; each
variant then embeds batches of 1, 8 and 32 with ONNX Runtime on the CPU, warmed up, timed as the
median of several repeats. Model compute only: decoding is the server benchmark's business.
Then, on this CPU, how far each variant's embeddings are from fp32's (cosine per image, on
--parity-images photos spread over all classes) against the min cosine its card allows: the
card's parity was measured on the exporting machine, and int8 kernels differ by instruction set.

    python -m benchmarks.variant_throughput [--package NAME] [--threads 2]
    # -> benchmarks/results/variant_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

from benchmarks.common import IMAGENETTE, RESULTS, command, image_files, machine, write_json
from benchmarks.synthetic import patterns
from embedserve.package import Encoder, cpu_has_vnni, load_package
from embedserve.preprocess import preprocess

IMAGENETTE_VAL = IMAGENETTE / "val"


def images(pre, n: int, spread: bool = False) -> np.ndarray:
    """n preprocessed photos: the first n of Imagenette val (spread: n picked evenly over all of
    it), else generated images."""
    if IMAGENETTE_VAL.is_dir():
        paths = image_files(IMAGENETTE_VAL)
        if spread:
            paths = [
                paths[i] for i in np.linspace(0, len(paths) - 1, min(n, len(paths))).astype(int)
            ]
        return np.stack([preprocess(p, pre) for p in paths[:n]])
    return np.stack([preprocess(img, pre) for img in patterns(n, 160)])


def variant_parity(package, data: np.ndarray, threads: int | None) -> dict[str, dict]:
    """Per variant: cosine of its embeddings to fp32's on this CPU, and the share of images under
    the min cosine of the card's parity tolerance."""

    def embed(variant: str) -> np.ndarray:
        enc = Encoder(package, variant=variant, device="cpu", intra_op_threads=threads)
        return np.concatenate([enc.embed(data[i : i + 32]) for i in range(0, len(data), 32)])

    reference = embed("fp32")
    result = {}
    for variant in package.variants:
        if variant == "fp32":
            continue
        cos = (embed(variant) * reference).sum(1)
        floor = package.card["variants"][variant]["parity"]["tolerance"]["min_cosine"]
        result[variant] = {
            "min_cosine": round(float(cos.min()), 4),
            "p1_cosine": round(float(np.percentile(cos, 1)), 4),
            "median_cosine": round(float(np.median(cos)), 5),
            "card_min_cosine": floor,
            "share_under_card_min": round(float((cos < floor).mean()), 4),
        }
    return result


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--package", default=None, help="name or path (default: models/DEFAULT)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--images", type=int, default=256, help="images embedded per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--parity-images", type=int, default=1024, help="0: skip the parity check")
    p.add_argument("--out", default=str(RESULTS / "variant_throughput.json"))
    args = p.parse_args()

    package = load_package(args.package)
    data = images(package.preprocess, args.images)
    rows = []
    for batch in args.batches:
        row: dict = {"batch": batch}
        for variant in package.variants:
            enc = Encoder(package, variant=variant, device="cpu", intra_op_threads=args.threads)
            chunks = [data[i : i + batch] for i in range(0, len(data) - batch + 1, batch)]
            for c in chunks[:3]:
                enc.embed(c)  # warm-up
            rates = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                for c in chunks:
                    enc.embed(c)
                rates.append(sum(len(c) for c in chunks) / (time.perf_counter() - t0))
            row[f"{variant}_img_s"] = round(statistics.median(rates), 1)
            row[f"{variant}_runs"] = [round(r, 1) for r in rates]
        for variant in package.variants:
            row[f"{variant}_vs_fp32"] = round(row[f"{variant}_img_s"] / row["fp32_img_s"], 2)
        print(json.dumps({k: v for k, v in row.items() if not k.endswith("_runs")}), flush=True)
        rows.append(row)
    parity = (
        variant_parity(
            package, images(package.preprocess, args.parity_images, spread=True), args.threads
        )
        if args.parity_images
        else {}
    )
    for variant, row in parity.items():
        print(json.dumps({"parity": variant, **row}), flush=True)
    result = {
        "command": command("variant_throughput", sys.argv[1:]),
        "package": package.name,
        "threads": args.threads,
        "machine": machine(cpu_vnni=cpu_has_vnni()),  # what int8 speed and parity depend on
        "unit": "images/s, preprocessed uint8 input, ONNX Runtime CPU",
        "input": f"{package.card['input']['height']}x{package.card['input']['width']}",
        "rows": rows,
        "parity": parity,
        "parity_images": f"{args.parity_images} "
        + ("Imagenette val photos, evenly spread" if IMAGENETTE_VAL.is_dir() else "generated"),
    }
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
