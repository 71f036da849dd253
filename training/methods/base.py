"""What the trainer needs to know about a method: one `Method` entry per method (the registry is
`training.methods.REGISTRY`), and the hooks of `MethodModel` that the training loop calls.

The loop never asks which method it runs. A fourth method is one file in `training/methods/`
(its loss, a `MethodModel` subclass and a `Method` entry) and one line in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

# The augmentations of the BYOL paper (asymmetric views), which Barlow Twins also uses:
# ViewSpec fields (training.augment) that differ from its defaults, per view.
BYOL_VIEWS: tuple[dict[str, Any], dict[str, Any]] = (
    {"blur_p": 1.0, "solarize_p": 0.0},
    {"blur_p": 0.1, "solarize_p": 0.2},
)


def papers_warmup(epochs: int) -> float:
    """The BYOL and Barlow Twins warm-up: 10 epochs, at most 10% of a short run."""
    return min(10.0, 0.1 * epochs)


class MethodModel(nn.Module):
    """A method's model: `backbone` (the encoder that is exported) plus its heads.

    `forward(*step_inputs(x1, x2))` returns (loss, first view's projection). The hooks below
    default to what a method without a teacher needs; BYOL overrides them.
    """

    backbone: nn.Module

    def trained_module(self) -> nn.Module:
        """The module DistributedDataParallel wraps (BYOL: the online network, not the teacher)."""
        return self

    def step_inputs(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[Any, ...]:
        """The arguments of the wrapped module's forward; targets computed outside DDP go here."""
        return x1, x2

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimizer step (BYOL: the teacher's EMA update)."""

    def after_encoder_init(self) -> None:
        """Called after --init-from has loaded the encoder (BYOL: the teacher copies it)."""

    def step_metrics(self) -> dict[str, float]:
        """Extra values for each train line of metrics.jsonl (BYOL: tau)."""
        return {}


@dataclass(frozen=True)
class Method:
    """One registry entry.

    - `build(backbone, feature_dim, cfg, distributed)`: the model from a resolved TrainConfig;
    - `head_defaults`: TrainConfig head fields that this method fills in when left None;
    - `views`: ViewSpec overrides of the two augmented views (the paper's recipe);
    - `fixed_lr_prefixes`: parameters whose learning rate is not decayed (SimSiam's predictor);
    - `warmup_epochs(epochs)`: the default --warmup-epochs.
    """

    name: str
    model: type[MethodModel]
    build: Callable[[nn.Module, int, Any, bool], MethodModel]
    head_defaults: Mapping[str, Any]
    views: tuple[Mapping[str, Any], Mapping[str, Any]] = BYOL_VIEWS
    fixed_lr_prefixes: tuple[str, ...] = ()
    warmup_epochs: Callable[[int], float] = field(default=papers_warmup)
