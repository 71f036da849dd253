"""Atomic checkpoints: written beside the target, fsync'ed, then renamed over it.

A crash while saving leaves the previous checkpoint intact.

`python -m training.checkpoint encoder IN OUT [--fp16]` writes the encoder alone (no heads, no
optimizer, a quarter of a Barlow Twins checkpoint, an eighth in fp16): what `training.export` and
`--init-from` read, small enough to move between machines.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_atomic(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same directory, fsync, then os.replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def rng_states() -> dict[str, Any]:
    states = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),  # noqa: NPY002 (the global state other code may use)
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])  # noqa: NPY002
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def load(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint written by the trainer (it holds numpy and python RNG states)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    return torch.load(path, map_location="cpu", weights_only=False)


BACKBONE = "backbone."


def backbone_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone's own state dict (the model's backbone.* tensors, prefix removed)."""
    return {k[len(BACKBONE) :]: v for k, v in state["model"].items() if k.startswith(BACKBONE)}


def encoder_only(state: dict[str, Any], fp16: bool = False) -> dict[str, Any]:
    """A trainer checkpoint reduced to its encoder (the model's backbone.* tensors) and records.

    `fp16`: floating-point weights rounded to fp16 (half the bytes; relative error 2^-11), for
    transfers; loaders cast them back to fp32. It cannot be resumed, only exported or used by
    --init-from.
    """
    model = {
        BACKBONE + k: v.half() if fp16 and v.is_floating_point() else v
        for k, v in backbone_state(state).items()
    }
    if not model:
        raise ValueError("the checkpoint's model has no backbone.* weights")
    kept = ("config", "step", "epoch", "best_knn", "epoch_times", "torch_version", "init_from")
    return {
        **{k: state[k] for k in kept if k in state},
        "model": model,
        "encoder_only": {"fp16": fp16, "step_in_epoch": state.get("step_in_epoch", 0)},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m training.checkpoint",
        description="Checkpoint tools. encoder: keep the encoder alone (for export or --init-from).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    enc = sub.add_parser("encoder", help="write the encoder alone: no heads, no optimizer")
    enc.add_argument("checkpoint", help="a trainer checkpoint (runs/NAME/checkpoint.pt)")
    enc.add_argument("out", help="where to write the encoder-only checkpoint")
    enc.add_argument("--fp16", action="store_true", help="round the weights to fp16 (half size)")
    args = p.parse_args(argv)
    try:
        state = encoder_only(load(args.checkpoint), fp16=args.fp16)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save_atomic(state, args.out)
    print(f"wrote {args.out}: epoch {state.get('epoch')}, {len(state['model'])} tensors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
