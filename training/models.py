"""Model building: a method's model from a resolved config (through the method registry), the
DistributedDataParallel wrapper, the optimizer's parameter groups, and the two modules that also
go into the exported graph (`Normalize`, `EmbeddingGraph`).

`load_encoder` rebuilds the exported computation from a checkpoint (for training.export).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import checkpoint as ckpt_io
from training import methods
from training.backbones import create_backbone
from training.config import TrainConfig
from training.data import MEAN, STD
from training.methods import MethodModel
from training.optim import param_groups


def build_model(cfg: TrainConfig, distributed: bool = False) -> MethodModel:
    """The method's model (backbone + heads) from a resolved config."""
    backbone, feature_dim = create_backbone(cfg.backbone, cfg.cifar_stem, cfg.zero_init_residual)
    return methods.get(cfg.method).build(backbone, feature_dim, cfg, distributed)


def wrap_ddp(model: MethodModel, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the trained part of the model (for BYOL, not the teacher)."""
    return nn.parallel.DistributedDataParallel(
        model.trained_module(), device_ids=[device.index] if device.type == "cuda" else None
    )


def trainable_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Parameter groups of the optimizer; the method's fixed-lr prefixes keep the base lr."""
    fixed = methods.get(cfg.method).fixed_lr_prefixes  # SimSiam: predictor lr not decayed
    return param_groups([("", model)], cfg.weight_decay, fixed_lr_prefixes=fixed)


class Normalize(nn.Module):
    """uint8 NCHW (or NHWC with `channels_last_input`) -> normalized float NCHW.

    The same module goes into the exported graph, so the constants live in one place.
    """

    def __init__(self, mean=MEAN, std=STD) -> None:
        super().__init__()
        self.register_buffer(
            "scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift


class EmbeddingGraph(nn.Module):
    """uint8 NHWC RGB images -> L2-normalized float32 embeddings: the exported computation."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.normalize = Normalize()  # the trainer's constants (training.data.MEAN / STD)
        self.backbone = backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.normalize(images.permute(0, 3, 1, 2))  # NxHxWx3 uint8 -> Nx3xHxW float
        return F.normalize(self.backbone(x), dim=1)  # NxD


def load_encoder(path: str | os.PathLike) -> tuple[EmbeddingGraph, TrainConfig, dict[str, Any]]:
    """The fp32 embedding graph (eval mode) of a trainer checkpoint, its config and the checkpoint.

    Also takes an encoder-only checkpoint (`python -m training.checkpoint encoder`): the graph
    needs the backbone alone.
    """
    ck = ckpt_io.load(path)
    cfg = TrainConfig.from_dict(ck["config"]).resolved()
    model = build_model(cfg)
    if ck.get("encoder_only"):  # fp16 weights are cast back by load_state_dict
        model.backbone.load_state_dict(ckpt_io.backbone_state(ck))
    else:
        model.load_state_dict(ck["model"])
    graph = EmbeddingGraph(model.backbone).float().to(memory_format=torch.contiguous_format)
    return graph.eval(), cfg, ck
