"""Distributed data parallel under torchrun: gloo on the CPU, nccl on CUDA.

torch's SyncBatchNorm runs on GPUs only; `CPUSyncBatchNorm` gives the same semantics on the
CPU (batch statistics of the global batch, with gradients flowing to every rank).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def autograd_all_reduce(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, differentiable: the backward pass sums the gradients over ranks too.

    (torch marks `torch.distributed.nn.functional.all_reduce` as deprecated in favour of a private
    module without autograd support; it is still the public autograd-aware collective.)
    """
    import warnings

    from torch.distributed.nn.functional import all_reduce

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return all_reduce(t)


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group that torchrun describes in the environment (no-op without it)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the batch over all ranks.

    The sums are reduced with the autograd-aware all-reduce, whose backward sums gradients over
    ranks, so together with DDP's gradient averaging each rank gets the gradient of the global
    batch's loss, as torch's (CUDA-only) SyncBatchNorm does.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.ndim < 2:
            raise ValueError(f"expected at least 2D input (N x C x ...), got {x.ndim}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        dims = [0] + list(range(2, x.ndim))  # all but channels
        shape = [1, -1] + [1] * (x.ndim - 2)
        xf = x.float()
        count = torch.tensor(float(x.numel() // x.shape[1]), device=x.device)
        stats = autograd_all_reduce(torch.cat([xf.sum(dims), (xf * xf).sum(dims), count.view(1)]))
        c = x.shape[1]
        n = stats[2 * c]
        mean, var = stats[:c] / n, (stats[c : 2 * c] / n - (stats[:c] / n) ** 2).clamp_min(0)
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked += 1
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1.0 / float(self.num_batches_tracked)
                )
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = (xf - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm becomes synchronized: torch's on CUDA, `CPUSyncBatchNorm` on the CPU."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    out = module
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, CPUSyncBatchNorm
    ):
        out = CPUSyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        out.train(module.training)
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.weight.requires_grad_(module.weight.requires_grad) if module.affine else None
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device))
    return out


def all_reduce_mean(value: float, device: torch.device) -> float:
    """Average a scalar over ranks (for logging)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()
