"""Augmentation throughput: the per-image two-view pipeline against --device-augment's split.

Both make the same views (the training recipe's crop, flip, colour jitter, grayscale, blur and
solarize; `tests/training/test_augment.py` checks the batched ops against torchvision's):

  - per_image: `TwoViews`, every step on one image at a time (what data workers run by default),
  - batched:   crop and flip per image (`TwoViews(photometric=False)`), then `BatchPhotometric`
               on the whole batch, on the CPU here and, where there is one, on the GPU.

Pairs of views per second for batches of real images decoded into memory, each figure the
median over --repeats, the configurations taking turns so that the shared machine's drift falls
on all of them alike. On the CPU this is the training process's own augmentation when it runs
without workers (the default on small machines); on a GPU the batched half runs on the device.

    python -m benchmarks.augment_throughput   # -> benchmarks/results/augment_throughput.json
    python -m benchmarks.augment_throughput --threads 2 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.common import IMAGENETTE, RESULTS, command, image_files, machine, write_json
from benchmarks.synthetic import patterns
from training.augment import BatchPhotometric, TwoViews

IMAGENETTE_TRAIN = IMAGENETTE / "train"


def load_images(folder: Path | None, n: int, seed: int = 0) -> list[torch.Tensor]:
    """`n` uint8 CHW images: spread over the folder's files when given, else generated."""
    if folder is None:
        return [torch.from_numpy(img).permute(2, 0, 1) for img in patterns(n, 160, seed=seed)]
    files = image_files(folder)
    if not files:
        raise SystemExit(f"error: no images under {folder}")
    picks = np.linspace(0, len(files) - 1, n).astype(int)
    return [
        torch.from_numpy(np.array(Image.open(files[i]).convert("RGB"))).permute(2, 0, 1)
        for i in picks
    ]


def per_image(views: TwoViews, images: list[torch.Tensor]):
    pairs = [views(im) for im in images]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


def batched(geometric: TwoViews, photometric, images, device: torch.device, seed: int):
    x1, x2 = per_image(geometric, images)
    gen = torch.Generator(device=device).manual_seed(seed)
    y1 = photometric[0](x1.to(device, non_blocking=True), gen)
    y2 = photometric[1](x2.to(device, non_blocking=True), gen)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return y1, y2


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--method", default="barlow_twins")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.4, 1.0), metavar=("MIN", "MAX"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--batches", type=int, default=3, help="timed batches per measurement")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    p.add_argument(
        "--data",
        default=str(IMAGENETTE_TRAIN) if IMAGENETTE_TRAIN.is_dir() else None,
        help="image folder (default: Imagenette train if present, else generated images)",
    )
    p.add_argument("--out", default=str(RESULTS / "augment_throughput.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    images = load_images(Path(args.data) if args.data else None, args.batch_size * args.batches)
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    crop = tuple(args.crop_scale)
    full = TwoViews(args.method, args.size, crop)
    geometric = TwoViews(args.method, args.size, crop, photometric=False)
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    photometric = {
        d.type: tuple(BatchPhotometric(s, args.size) for s in geometric.specs) for d in devices
    }

    def run(name: str) -> float:
        t0 = time.perf_counter()
        for k, batch in enumerate(batches):
            if name == "per_image":
                per_image(full, batch)
            else:
                device = torch.device(name.removeprefix("batched_"))
                batched(geometric, photometric[device.type], batch, device, seed=k)
        return len(images) / (time.perf_counter() - t0)

    names = ["per_image"] + [f"batched_{d.type}" for d in devices]
    for name in names:  # warm-up: first calls allocate and, on CUDA, load kernels
        run(name)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.repeats):
        for name in names:
            rates[name].append(round(run(name), 1))
    result = {
        "command": command("augment_throughput", sys.argv[1:] if argv is None else argv),
        "machine": machine(threads=torch.get_num_threads()),
        "torch": torch.__version__,
        "data": args.data or "generated",
        "method": args.method,
        "image_size": args.size,
        "batch_size": args.batch_size,
        "unit": "pairs of views per second",
        "protocol": f"median over {args.repeats} repeats of {args.batches} batches each, "
        "configurations interleaved, after one untimed round",
        "pairs_per_s": {name: statistics.median(r) for name, r in rates.items()},
        "runs": rates,
    }
    base = result["pairs_per_s"]["per_image"]
    result["ratio_to_per_image"] = {
        name: round(rate / base, 2) for name, rate in result["pairs_per_s"].items()
    }
    print(json.dumps({k: result[k] for k in ("pairs_per_s", "ratio_to_per_image")}))
    print(f"wrote {write_json(args.out, result)}")
    return result


if __name__ == "__main__":
    main()
