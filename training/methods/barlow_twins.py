"""Barlow Twins (Zbontar et al., 2021): redundancy reduction.

The cross-correlation matrix of the two views' standardized embeddings is pushed to the
identity: the diagonal to 1 (invariance to augmentation), the off-diagonal to 0 (decorrelation).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from training.distributed import autograd_all_reduce
from training.heads import barlow_twins_projector
from training.methods.base import Method, MethodModel

BN_EPS = 1e-5  # as nn.BatchNorm1d uses


def _all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks with a backward pass (the autograd-aware collective).

    A plain `dist.all_reduce` has no gradient path to the other ranks' samples, and DDP's
    gradient averaging then silently scales the correlation term by 1/world_size.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return autograd_all_reduce(t)
    return t


def barlow_twins_loss(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float = 0.0051, distributed: bool = False
) -> torch.Tensor:
    """Barlow Twins loss of two batches of embeddings.

    loss = sum_i (1 - c_ii)^2 + lambd * sum_{i != j} c_ij^2, where c = zn1.T @ zn2 / N and zn is
    z standardized per feature over the batch (biased variance, eps 1e-5).

    With `distributed=True` (and an initialized process group) the batch statistics and the
    cross-correlation are summed over all ranks, so each rank returns the loss of the global
    batch and gradients flow to every rank's samples.

    Example:
        >>> z = torch.randn(64, 16)
        >>> float(barlow_twins_loss(z, z, lambd=0.0)) < 1e-3
        True
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(
            f"z1 and z2 must both be N x D, got {tuple(z1.shape)} and {tuple(z2.shape)}"
        )
    with torch.autocast(z1.device.type, enabled=False):  # the correlation is sensitive: fp32 only
        return _barlow_twins_loss_fp32(z1.float(), z2.float(), lambd, distributed)


def _barlow_twins_loss_fp32(
    z1: torch.Tensor, z2: torch.Tensor, lambd: float, distributed: bool
) -> torch.Tensor:
    reduce = _all_reduce_sum if distributed else (lambda t: t)
    n = reduce(torch.tensor(float(z1.shape[0]), device=z1.device))

    def standardize(z: torch.Tensor) -> torch.Tensor:  # NxD -> NxD
        mean = reduce(z.sum(0)) / n  # D
        centered = z - mean  # NxD
        var = reduce((centered * centered).sum(0)) / n  # D, biased (two-pass: numerically stable)
        return centered / torch.sqrt(var + BN_EPS)

    c = reduce(standardize(z1).T @ standardize(z2)) / n  # DxD
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = c.pow(2).sum() - torch.diagonal(c).pow(2).sum()
    return on_diag + lambd * off_diag


class BarlowTwins(MethodModel):
    """Backbone + projector; the loss is symmetric, so no predictor and no teacher."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_dims: tuple[int, ...] = (2048, 2048, 2048),
        lambd: float = 0.0051,
        distributed: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = barlow_twins_projector(feature_dim, proj_dims)
        self.lambd = lambd
        self.distributed = distributed

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the loss and the first view's projection (for health metrics)."""
        z1 = self.projector(self.backbone(x1))  # NxD
        z2 = self.projector(self.backbone(x2))  # NxD
        return barlow_twins_loss(z1, z2, self.lambd, self.distributed), z1.detach()


METHOD = Method(
    name="barlow_twins",
    model=BarlowTwins,
    build=lambda backbone, dim, cfg, distributed: BarlowTwins(
        backbone, dim, cfg.proj_dims, cfg.lambd, distributed=distributed
    ),
    head_defaults={"proj_dims": (2048, 2048, 2048)},
)
