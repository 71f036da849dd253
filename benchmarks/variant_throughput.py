"""CPU throughput of a model package's variants (fp32, fp16, int8) against fp32, in one run.

Real photos (Imagenette val when present, else generated images) are preprocessed once; each
variant then embeds batches of 1, 8 and 32 with ONNX Runtime on the CPU, warmed up, timed as the
median of several repeats. Model compute only: decoding is the server benchmark's business.

    python benchmarks/variant_throughput.py [--package NAME] [--threads 2]
    # -> benchmarks/results/variant_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embedserve.package import Encoder, cpu_flags, cpu_has_vnni, load_package  # noqa: E402
from embedserve.preprocess import preprocess  # noqa: E402

IMAGENETTE_VAL = ROOT.parent / "shared" / "datasets" / "imagenette-160" / "val"


def images(pre, n: int) -> np.ndarray:
    if IMAGENETTE_VAL.is_dir():
        paths = sorted(
            p for p in IMAGENETTE_VAL.rglob("*") if p.suffix.lower() in (".jpeg", ".jpg", ".png")
        )[:n]
        return np.stack([preprocess(p, pre) for p in paths])
    rng = np.random.default_rng(0)
    return np.stack(
        [preprocess(rng.integers(0, 256, (160, 160, 3), dtype=np.uint8), pre) for _ in range(n)]
    )


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--package", default=None, help="name or path (default: models/DEFAULT)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--images", type=int, default=256, help="images embedded per timed repeat")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "variant_throughput.json")
    )
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
    result = {
        "package": package.name,
        "threads": args.threads,
        "cpu_vnni": cpu_has_vnni(),
        "cpu_avx2": "avx2" in cpu_flags(),
        "platform": platform.platform(),
        "unit": "images/s, preprocessed uint8 input, ONNX Runtime CPU",
        "input": f"{package.card['input']['height']}x{package.card['input']['width']}",
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
