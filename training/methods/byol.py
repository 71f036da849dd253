"""BYOL (Grill et al., 2020): an online network with a predictor regresses an EMA teacher."""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.heads import byol_predictor, byol_projector
from training.methods.base import Method, MethodModel


def byol_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """Symmetric BYOL regression loss, in [0, 8].

    loss = mean_batch[(2 - 2 cos(p1, z2)) + (2 - 2 cos(p2, z1))], with the teacher's
    projections z detached here.

    Example:
        >>> z = torch.randn(8, 4)
        >>> round(float(byol_loss(z, z, z, z)), 4)
        0.0
    """
    z1, z2 = z1.detach(), z2.detach()  # targets come from the teacher: no gradient
    loss12 = 2 - 2 * F.cosine_similarity(p1.float(), z2.float(), dim=-1)  # N
    loss21 = 2 - 2 * F.cosine_similarity(p2.float(), z1.float(), dim=-1)  # N
    return (loss12 + loss21).mean()


def cosine_tau(step: int, total_steps: int, tau_base: float = 0.99) -> float:
    """BYOL's EMA decay: tau_k = 1 - (1 - tau_base) * (cos(pi k / K) + 1) / 2.

    Starts at tau_base and reaches 1 at the last step.
    """
    if total_steps <= 0:
        return tau_base
    k = min(max(step, 0), total_steps)
    return 1 - (1 - tau_base) * (math.cos(math.pi * k / total_steps) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """theta_teacher <- tau * theta_teacher + (1 - tau) * theta_student, without autograd.

    Buffers (BatchNorm running statistics) are copied, not averaged.
    """
    t_params = [p for p in teacher.parameters()]
    s_params = [p.detach() for p in student.parameters()]
    torch._foreach_lerp_(t_params, s_params, 1.0 - tau)
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        tb.copy_(sb)


def _online_loss(
    online: nn.Module,
    x1: torch.Tensor,
    x2: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    z1_online = online.projector(online.backbone(x1))  # NxD
    z2_online = online.projector(online.backbone(x2))  # NxD
    p1, p2 = online.predictor(z1_online), online.predictor(z2_online)  # NxD
    z1, z2 = targets  # teacher projections, NxD, no gradient
    return byol_loss(p1, p2, z1, z2), z1_online.detach()


class _Online(nn.Module):
    def __init__(self, backbone: nn.Module, projector: nn.Module, predictor: nn.Module) -> None:
        super().__init__()
        self.backbone, self.projector, self.predictor = backbone, projector, predictor

    def forward(
        self, x1: torch.Tensor, x2: torch.Tensor, targets: tuple[torch.Tensor, torch.Tensor]
    ):
        return _online_loss(self, x1, x2, targets)


class BYOL(MethodModel):
    """Online network (backbone, projector, predictor) and its EMA teacher (backbone, projector).

    `update_teacher(step, total_steps)` must be called after every optimizer step (the
    `after_step` hook).
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_hidden_dim: int = 4096,
        proj_dim: int = 256,
        pred_hidden_dim: int = 4096,
        tau_base: float = 0.99,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = byol_projector(feature_dim, proj_hidden_dim, proj_dim)
        self.predictor = byol_predictor(proj_dim, pred_hidden_dim)
        self.teacher_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
        self.teacher_projector = copy.deepcopy(self.projector).requires_grad_(False)
        self.tau_base = tau_base
        self.tau = tau_base

    @torch.no_grad()
    def targets(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's projections of both views (no gradient).

        Under DDP the trainer wraps `online_network()` only and calls this outside it: with the
        teacher inside the wrapped module, DDP's gradient synchronization silently stopped
        (torch 2.14, gloo; pinned by tests/training/test_distributed.py).
        """
        return self.teacher_projector(self.teacher_backbone(x1)), self.teacher_projector(
            self.teacher_backbone(x2)
        )

    def forward(
        self,
        x1: torch.Tensor,
        x2: torch.Tensor,
        targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss of two views and the first view's online projection."""
        return _online_loss(self, x1, x2, self.targets(x1, x2) if targets is None else targets)

    def online_network(self) -> nn.Module:
        """The trained part alone (shared parameters), for DDP to wrap: forward(x1, x2, targets)."""
        return _Online(self.backbone, self.projector, self.predictor)

    def update_teacher(self, step: int, total_steps: int) -> None:
        self.tau = cosine_tau(step, total_steps, self.tau_base)
        ema_update(self.teacher_backbone, self.backbone, self.tau)
        ema_update(self.teacher_projector, self.projector, self.tau)

    # -- the trainer's hooks (training.methods.base.MethodModel) ---------------------------
    def trained_module(self) -> nn.Module:
        return self.online_network()

    def step_inputs(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[Any, ...]:
        return x1, x2, self.targets(x1, x2)  # the teacher runs outside the DDP-wrapped network

    def after_step(self, step: int, total_steps: int) -> None:
        self.update_teacher(step, total_steps)

    def after_encoder_init(self) -> None:
        self.teacher_backbone.load_state_dict(self.backbone.state_dict())

    def step_metrics(self) -> dict[str, float]:
        return {"tau": self.tau}


METHOD = Method(
    name="byol",
    model=BYOL,
    build=lambda backbone, dim, cfg, distributed: BYOL(
        backbone, dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_hidden_dim, cfg.tau_base
    ),
    head_defaults={"proj_hidden_dim": 4096, "proj_dim": 256, "pred_hidden_dim": 4096},
)
