"""Command line: `python -m training.train --method simsiam --data DIR [options]`.

Distributed: `torchrun --nproc-per-node N -m training.train ...` (gloo on the CPU, nccl on CUDA).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import Field, fields
from typing import Any

from training.config import TrainConfig, load_recipe
from training.trainer import Trainer, TrainingStopped


def flag_options(f: Field, default: Any) -> dict[str, Any]:
    """add_argument's keywords for a TrainConfig field: its help and choices (config.opt), the
    type and arity from its annotation."""
    kwargs: dict[str, Any] = {
        "help": f.metadata["help"].replace("%", "%%"),  # argparse formats help with %
        "default": default,
        "dest": f.name,
    }
    if f.metadata.get("choices"):
        kwargs["choices"] = f.metadata["choices"]
    if isinstance(default, bool):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif f.type.startswith("tuple[int, ..."):  # knn_ks, proj_dims
        kwargs.update(type=int, nargs="+")
    elif f.type.startswith("tuple[float, float]"):  # crop_scale
        kwargs.update(type=float, nargs=2, metavar=("MIN", "MAX"))
    elif f.type in ("int", "int | None"):
        kwargs["type"] = int
    elif f.type in ("float", "float | None"):
        kwargs["type"] = float
    return kwargs


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.train",
        description="Train an image encoder without labels (Barlow Twins, BYOL or SimSiam).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        if "help" in f.metadata:  # every option (not `extra`, the run's records)
            p.add_argument(
                "--" + f.name.replace("_", "-"), **flag_options(f, getattr(defaults, f.name))
            )
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
