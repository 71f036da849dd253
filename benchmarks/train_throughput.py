"""Training throughput: the project's loop against a plain loop of the same model, in one run.

For each method x backbone x image size, the same `Trainer.train_step` runs as
  - plain:   fp32, contiguous memory, the C library's allocator (what a first implementation
             would do),
  - project: the training defaults (precision auto: bf16 autocast where the CPU has bf16
             arithmetic, AVX512-BF16 or AMX, and a measured convolution step runs at least
             1.2x faster in bf16, else fp32; channels_last; the retained CPU allocator),
and with --ablation also each optimization alone (fp32 + retained allocator; bf16 +
channels_last with the system allocator, bf16 whatever the CPU). Every measurement runs in a
fresh process (the allocator setting is process-wide), on synthetic uint8 batches (model compute
only), and the configurations take turns, repeat after repeat, so that the shared machine's
drift falls on all of them alike; each figure is the median over the repeats. It then measures
whether data loading keeps up: the two-view augmentation pipeline alone (pairs/s by worker
count) and the real loader feeding the real step.

    python -m benchmarks.train_throughput     # -> benchmarks/results/train_throughput.json
    python -m benchmarks.train_throughput --methods simsiam --sizes 128 --repeats 3 --ablation
    python -m benchmarks.train_throughput --end-to-end --sizes 96 128   # seconds per epoch
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import IMAGENETTE, RESULTS, ROOT, command, image_files, machine, write_json
from benchmarks.synthetic import write_image_folder
from training.config import TrainConfig
from training.trainer import (
    Trainer,
    cpu_bf16_speedup,
    cpu_has_native_bf16,
    precision_name,
    resolve_precision,
)


def _generated_folder(root: Path) -> Path:
    write_image_folder(root / "train", per_class=48, size=160, seed=0)
    write_image_folder(root / "val", per_class=8, size=160, seed=1)
    return root


# The configurations compared: TrainConfig overrides of the training defaults.
CONFIGS = {
    "plain": {"precision": "fp32", "channels_last": False, "cpu_allocator": "system"},
    "project": {},
}
ABLATION = {
    "fp32+allocator": {"precision": "fp32", "channels_last": False},
    "bf16+channels_last": {"precision": "bf16", "cpu_allocator": "system"},
}


def step_rate(trainer: Trainer, batch: int, size: int, warmup: int, steps: int) -> float:
    """Images/s (an image = one two-view pair) of `trainer.train_step` on random uint8 batches."""
    g = torch.Generator().manual_seed(0)
    x1 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    x2 = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
    trainer.model.train()
    for _ in range(warmup):
        trainer.train_step(x1, x2)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x1, x2)
    return batch * steps / (time.perf_counter() - t0)


def make_trainer(
    method: str,
    backbone: str,
    size: int,
    batch_size: int,
    data: str,
    out: str,
    overrides: dict,
    in_memory: bool = False,
) -> Trainer:
    cfg = TrainConfig(
        method=method,
        backbone=backbone,
        data=data,
        image_size=size,
        cifar_stem=size <= 32,
        batch_size=batch_size,
        epochs=1,
        workers=0,
        progress=False,
        eval_every=0,
        in_memory=in_memory,
        out=out,
        **overrides,
    )
    return Trainer(cfg)


def measure_in_child(job: dict) -> float:
    """One measurement in a fresh Python process (`--measure JOB`); returns its images/s."""
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.train_throughput", "--measure", json.dumps(job)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if out.returncode != 0:
        raise RuntimeError(f"measurement {job} failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def measure(job: dict) -> None:
    """The child's side: build the trainer, time its step, print images/s."""
    with tempfile.TemporaryDirectory() as tmp:
        trainer = make_trainer(
            job["method"],
            job["backbone"],
            job["size"],
            job["batch_size"],
            job["data"],
            str(Path(tmp) / "run"),
            job["overrides"],
        )
        if job.get("end_to_end"):
            print(end_to_end_rate(trainer, 0, job["steps"], warmup=job["warmup"]))
        else:
            print(step_rate(trainer, job["batch_size"], job["size"], job["warmup"], job["steps"]))


def loader_rate(trainer: Trainer, workers: int, batches: int) -> float:
    """Pairs/s of the two-view data loader alone."""
    trainer.cfg.workers = workers
    it = iter(trainer._loader())
    next(it)  # start-up (worker fork) is not throughput
    t0 = time.perf_counter()
    n = 0
    for _ in range(batches):
        x1, _ = next(it)
        n += x1.shape[0]
    return n / (time.perf_counter() - t0)


def end_to_end_rate(trainer: Trainer, workers: int, steps: int, warmup: int = 2) -> float:
    """Images/s of the real loader feeding the real step (what a training run gets)."""
    trainer.cfg.workers = workers
    it = iter(trainer._loader())
    for _ in range(warmup):
        trainer.train_step(*next(it))
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(*next(it))
    return steps * trainer.sampler.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--methods", nargs="+", default=["barlow_twins", "byol", "simsiam"])
    p.add_argument("--backbones", nargs="+", default=["resnet18"])
    p.add_argument("--sizes", nargs="+", type=int, default=[32, 128], help="32 uses the CIFAR stem")
    p.add_argument("--batch-size", type=int, default=128, help="the training default")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps in each process")
    p.add_argument("--steps", type=int, default=3, help="timed steps in each process")
    p.add_argument("--repeats", type=int, default=3, help="processes per configuration")
    p.add_argument(
        "--ablation",
        action="store_true",
        help="also measure each optimization alone: " + ", ".join(ABLATION),
    )
    p.add_argument(
        "--data",
        default=str(IMAGENETTE) if IMAGENETTE.is_dir() else None,
        help="image folder for the data-loading measurements (default: Imagenette if present, else generated)",
    )
    p.add_argument("--out", default=str(RESULTS / "train_throughput.json"))
    p.add_argument(
        "--end-to-end",
        action="store_true",
        help="time what a training run gets instead: the real loader (decoding and augmenting "
        "in the training process, as on a small CPU) feeding the real step, with the project's "
        "defaults only; seconds per epoch follow from it (the epoch plan of a recipe)",
    )
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one measurement, in a child
    args = p.parse_args()
    if args.measure:
        measure(json.loads(args.measure))
        return

    tmp = tempfile.TemporaryDirectory()
    data = args.data or str(_generated_folder(Path(tmp.name) / "data"))
    configs = {**CONFIGS, **(ABLATION if args.ablation else {})}
    if args.end_to_end:
        configs = {"project": {}}
    results = {
        "command": command("train_throughput", sys.argv[1:]),
        "machine": machine(
            threads=torch.get_num_threads(),
            cpu_native_bf16=cpu_has_native_bf16(),
            # the probe behind precision auto on the CPU (fp32 / bf16 time of a convolution step)
            cpu_bf16_speedup=round(cpu_bf16_speedup(), 2) if cpu_has_native_bf16() else None,
        ),
        # what the project's precision "auto" became on the device the steps run on
        "project_precision": precision_name(
            resolve_precision("auto", torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        ),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "data": data,
        "unit": "images/s, one image = one pair of views (two forward and backward passes)",
        "configs": configs,
        "protocol": f"each figure: median over {args.repeats} fresh processes, each {args.warmup} "
        f"untimed then {args.steps} timed steps; configurations interleaved",
        "model_only": [],
        "data_loading": [],
    }

    for backbone in args.backbones:
        for size in args.sizes:
            for method in args.methods:
                row = {"method": method, "backbone": backbone, "image_size": size}
                runs: dict[str, list[float]] = {name: [] for name in configs}
                for _ in range(args.repeats):
                    for name, overrides in configs.items():
                        job = {
                            "method": method,
                            "backbone": backbone,
                            "size": size,
                            "batch_size": args.batch_size,
                            "data": data,
                            "overrides": overrides,
                            "warmup": args.warmup,
                            "steps": args.steps,
                            "end_to_end": args.end_to_end,
                        }
                        runs[name].append(round(measure_in_child(job), 1))
                for name, rates in runs.items():
                    row[f"{name}_img_s"] = round(statistics.median(rates), 1)
                    row[f"{name}_runs"] = rates
                if args.end_to_end:
                    train_images = _count_train_images(data)
                    row["train_images"] = train_images
                    row["epoch_s"] = round(train_images / row["project_img_s"], 1)
                for name in configs:
                    if name != "plain" and "plain" in configs:
                        key = "ratio" if name == "project" else f"{name}_ratio"
                        row[key] = round(row[f"{name}_img_s"] / row["plain_img_s"], 2)
                print(json.dumps(row), flush=True)
                results["model_only"].append(row)

    if args.end_to_end:
        results["unit"] = "images/s of the real loader feeding the real step (workers 0)"
        _write(results, args.out)
        return
    # Does data loading keep up? Pipeline alone, then the real loader feeding the real step.
    size = max(args.sizes)
    trainer = make_trainer(
        args.methods[-1],
        args.backbones[0],
        size,
        args.batch_size,
        data,
        str(Path(tmp.name) / "run"),
        {},
        in_memory=True,
    )
    model_rate = next(
        r["project_img_s"]
        for r in results["model_only"]
        if r["image_size"] == size and r["method"] == args.methods[-1]
    )
    row = {"method": args.methods[-1], "image_size": size, "model_only_img_s": model_rate}
    for workers in (0, 1, 2):
        row[f"pipeline_pairs_s_workers{workers}"] = round(
            loader_rate(trainer, workers, batches=6), 1
        )
    for workers in (0, 1, 2):
        row[f"end_to_end_img_s_workers{workers}"] = round(
            end_to_end_rate(trainer, workers, steps=6), 1
        )
    print(json.dumps(row), flush=True)
    results["data_loading"].append(row)

    _write(results, args.out)


def _write(results: dict, out: str) -> None:
    print(f"wrote {write_json(out, results)}")


def _count_train_images(data: str) -> int:
    """Images of the training split of a class-per-folder directory (its train/ if present)."""
    root = Path(data) / "train" if (Path(data) / "train").is_dir() else Path(data)
    return len(image_files(root))


if __name__ == "__main__":
    main()
