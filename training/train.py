"""Command line: `python -m training.train --method simsiam --data DIR [options]`.

Distributed: `torchrun --nproc-per-node N -m training.train ...` (gloo on the CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from training.config import TrainConfig, load_recipe
from training.methods import METHODS
from training.trainer import Trainer, TrainingStopped

HELP = {
    "method": "self-supervised method",
    "data": "class-per-folder image directory (uses its train/ and val/ or test/ when present, "
    "else holds out --holdout-fraction), or torchvision:cifar10",
    "data_root": "directory of torchvision's CIFAR-10 (with --data torchvision:cifar10)",
    "download": "let torchvision download CIFAR-10 into --data-root (needs the internet)",
    "in_memory": "decode every image once into memory (small datasets: ~0.7 GB for Imagenette-160)",
    "holdout_fraction": "fraction of each class held out for monitoring when DIR has no val/ or test/",
    "holdout_from_train": "monitor on --holdout-fraction of train/ even when DIR has val/ or test/, "
    "which then stays unseen: tune on this, report on val/test",
    "backbone": "torchvision model name (resnet18, resnet50, ...), classifier removed",
    "cifar_stem": "ResNet stem for 32x32 images: 3x3 stride-1 first conv and no max-pool",
    "zero_init_residual": "start each ResNet residual branch's last BatchNorm at zero (blocks begin as the identity), "
    "as the official SimSiam and Barlow Twins code do",
    "image_size": "training crop size, in pixels (and the evaluation input size, unless --eval-size)",
    "eval_size": "evaluation input size, in pixels, and so the exported model's (default: "
    "--image-size); training below it (FixRes, Touvron et al. 2019) matches the apparent object "
    "size of random-resized-crop training to whole images at evaluation",
    "eval_resize": "shorter side before the centre crop at evaluation (default: --eval-size)",
    "crop_scale": "area range MIN MAX of the training crops (RandomResizedCrop; default: the "
    "method's paper: 0.2 1 for simsiam, 0.08 1 for byol and barlow_twins)",
    "device_augment": "apply the photometric augmentations (colour jitter, grayscale, blur, solarize) "
    "to whole batches on the training device, each sample with its own parameters; the data "
    "workers only crop and flip. What keeps a GPU fed: per-image colour jitter on the CPU is the "
    "bottleneck there (7 ms per image pair and core against under 1 ms for crop and flip)",
    "epochs": "number of epochs (the schedule spans all of them)",
    "batch_size": "global batch size, split over the ranks",
    "optimizer": "sgd (short-budget default) or lars (the papers' large-batch optimizer)",
    "lr": "peak learning rate (default: 0.06 x batch/128 for sgd, 0.2 x batch/256 for lars)",
    "momentum": "SGD/LARS momentum",
    "weight_decay": "weight decay, never on biases and norm parameters (default: 5e-4 sgd, 1.5e-6 lars)",
    "warmup_epochs": "linear warm-up before the cosine decay (default: 0 for simsiam, else min(10, 10%% of epochs))",
    "head_warmup_epochs": "train only the heads (projector, predictor) for the first E epochs, "
    "at the peak learning rate, the encoder frozen (no gradient, its BatchNorm statistics still "
    "updated); the encoder's warm-up and cosine then span the remaining epochs. For --init-from, "
    "whose heads start random: fitted heads first keep their random gradients out of the "
    "trained encoder (0: off)",
    "lambd": "Barlow Twins weight of the off-diagonal term",
    "tau_base": "BYOL initial EMA decay, raised to 1 by a cosine schedule",
    "proj_dims": "Barlow Twins projector layer sizes (default 2048 2048 2048)",
    "proj_hidden_dim": "BYOL projector hidden size (default 4096)",
    "proj_dim": "projection size (default: BYOL 256, SimSiam 2048)",
    "pred_hidden_dim": "predictor hidden size (default: BYOL 4096, SimSiam 512)",
    "precision": "autocast: auto (bf16 on CUDA, and on CPUs with AVX512-BF16 or AMX where a convolution step measured at start-up runs >= 1.2x faster in bf16; fp16 on CUDA without bf16; fp32 on other CPUs, which emulate bf16 slowly or gain nothing from it), bf16, fp16 or fp32",
    "channels_last": "NHWC memory format for the convolutions",
    "device": "auto (CUDA when available), cpu or cuda",
    "cpu_allocator": "on the CPU, retain: glibc keeps freed memory for reuse instead of mapping and "
    "page-faulting large activations anew every step (5-8%% faster bf16 steps, 22-34%% faster fp32 steps here; the process keeps its peak "
    "memory); system: the C library's defaults",
    "workers": "data-loading worker processes per rank (0: augment in the training process; "
    "default: 0 on a CPU with <= 5 cores, where workers slow the step down, else (cores-2)//4; min(8, cores) on CUDA)",
    "threads": "intra-op threads of the training process (default on the CPU: cores minus workers)",
    "eval_every": "epochs between kNN evaluations on the held-out split (0: never)",
    "eval_at_start": "also evaluate the random initialisation before training",
    "knn_ks": "k values of the weighted kNN monitor",
    "knn_temperature": "temperature T of the kNN votes exp(sim/T)",
    "out": "run directory: checkpoint.pt, metrics.jsonl, summary.json",
    "init_from": "start the encoder from an exported model package (models/NAME) or a training "
    "checkpoint: a new run (own schedule, fresh heads) from those weights, recorded in the card; "
    "not --resume, which continues a run exactly",
    "init_heads_from": "with --init-from: start the heads (projector, predictor) from this "
    "training checkpoint of the same method and sizes instead of afresh, so that the encoder is "
    "not trained through random heads at the start (a fresh projector costs a restart 0.3-2 "
    "kNN points); the encoder still comes from --init-from",
    "seed": "seed of the initialisation, the split, the data order and the augmentations",
    "ckpt_every_steps": "also write the checkpoint every N steps (0: at the end of each epoch only)",
    "ckpt_every_epochs": "write the checkpoint at the end of every N-th epoch and of the last "
    "(1: every epoch; raise it where epochs take seconds, as on a GPU)",
    "stop_after_steps": "stop after N steps with a checkpoint, as if interrupted (resume with "
    "--resume); 0: the checkpoint of the random initialisation, before any step",
    "log_every": "steps between metric lines in metrics.jsonl",
    "collapse_threshold": "stop when the embedding spread (per-dim std of normalized z x sqrt(D)) stays below this; 0: off",
    "collapse_patience": "consecutive steps below --collapse-threshold before stopping",
    "progress": "show the progress bar",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train an image encoder without labels (Barlow Twins, BYOL or SimSiam).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if f.name == "extra":
            continue
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        kwargs: dict = {"help": HELP[f.name], "default": default, "dest": f.name}
        if f.name == "method":
            kwargs["choices"] = METHODS
        elif f.name in ("optimizer",):
            kwargs["choices"] = ("sgd", "lars")
        elif f.name == "precision":
            kwargs["choices"] = ("auto", "bf16", "fp16", "fp32")
        elif f.name == "device":
            kwargs["choices"] = ("auto", "cpu", "cuda")
        elif f.name == "cpu_allocator":
            kwargs["choices"] = ("retain", "system")
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name in ("knn_ks", "proj_dims"):
            kwargs.update(type=int, nargs="+")
        elif f.name == "crop_scale":
            kwargs.update(type=float, nargs=2, metavar=("MIN", "MAX"))
        elif f.type in ("int", "int | None") or isinstance(default, int):
            kwargs["type"] = int
        elif f.type in ("float", "float | None") or isinstance(default, float):
            kwargs["type"] = float
        p.add_argument(flag, **kwargs)
    p.add_argument(
        "--recipe",
        metavar="FILE",
        help="a recipe (TOML, keys = these options with underscores) holding every option of a "
        "run, e.g. training/recipes/simsiam-resnet18-imagenette.toml; flags given beside it "
        "override it; the card records its path and sha256 under training.recipe",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="CKPT",
        help="continue a stopped run exactly (model, teacher, optimizer, schedule, step, RNG); "
        "without a path, OUT/checkpoint.pt",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    recipe_record = None
    if args.recipe:
        try:
            options, recipe_record = load_recipe(args.recipe)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        parser.set_defaults(**options)  # the recipe's values; flags beside it still win
        args = parser.parse_args(argv)
    args.__dict__.pop("recipe")
    resume = args.__dict__.pop("resume")
    cfg = TrainConfig(**vars(args))
    if recipe_record is not None:
        cfg.extra["recipe"] = recipe_record
    # the exact command, for the model card
    cfg.extra["command"] = " ".join(
        ["python -m training.train", *(argv if argv is not None else sys.argv[1:])]
    )
    if resume == "auto":
        resume = f"{cfg.out}/checkpoint.pt"
    if resume is None and not cfg.data:
        print(
            "error: --data is required (a class-per-folder directory, or torchvision:cifar10)",
            file=sys.stderr,
        )
        return 2
    try:
        summary = Trainer(cfg, resume=resume).fit()
    except TrainingStopped as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"done: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
