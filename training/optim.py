"""Optimizers and the learning-rate schedule.

Biases and normalization parameters (every parameter with fewer than 2 dimensions) get neither
weight decay nor LARS adaptation, as in the BYOL and Barlow Twins papers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


def warmup_cosine(
    step: int, total_steps: int, warmup_steps: int, base_lr: float, final_lr: float = 0.0
) -> float:
    """Linear warm-up from 0 to `base_lr` over `warmup_steps`, then cosine decay to `final_lr`."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return final_lr + (base_lr - final_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(
    named_modules: Iterable[tuple[str, nn.Module]],
    weight_decay: float,
    fixed_lr_prefixes: tuple[str, ...] = (),
) -> list[dict]:
    """Split trainable parameters into groups.

    - weights (ndim >= 2): weight decay and LARS adaptation;
    - biases and norm parameters (ndim < 2): neither;
    - parameters under one of `fixed_lr_prefixes` (SimSiam's predictor) keep the base lr.
    """
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for prefix, module in named_modules:
        for name, p in module.named_parameters(prefix=prefix):
            if not p.requires_grad:
                continue
            regular = p.ndim >= 2
            fixed = any(name.startswith(f) for f in fixed_lr_prefixes)
            groups.setdefault((regular, fixed), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if regular else 0.0,
            "lars_adapt": regular,
            "fixed_lr": fixed,
        }
        for (regular, fixed), params in sorted(
            groups.items(), key=lambda kv: (not kv[0][0], kv[0][1])
        )
    ]


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017).

    For a group with `lars_adapt=True`, the update of each parameter w with gradient g is
    scaled by the trust ratio eta * ||w|| / ||g + wd * w|| (when both norms are non-zero);
    groups with `lars_adapt=False` (biases, norms) are plain SGD with momentum.
    """

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
    ) -> None:
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars_adapt=True
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if group["weight_decay"] != 0:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                if group["lars_adapt"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d_p)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0),
                        group["eta"] * w_norm / g_norm,
                        torch.ones_like(w_norm),
                    )
                    d_p = d_p.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.clone(d_p).detach()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(d_p)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def build_optimizer(
    name: str, groups: list[dict], lr: float, momentum: float, weight_decay: float
) -> torch.optim.Optimizer:
    """`sgd` (torch's SGD with momentum) or `lars`; `groups` come from `param_groups`."""
    if name == "sgd":
        # torch's SGD ignores the extra keys of our groups (lars_adapt, fixed_lr) and keeps them.
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose sgd or lars")


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """Apply the scheduled lr to every group, except fixed-lr groups that keep `base_lr`."""
    for group in optimizer.param_groups:
        group["lr"] = base_lr if group.get("fixed_lr") else lr
