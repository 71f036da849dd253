"""SimSiam (Chen & He, 2021): a predictor and a stop-gradient, no momentum teacher."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.heads import simsiam_predictor, simsiam_projector
from training.methods.base import Method, MethodModel


def simsiam_loss(
    p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor
) -> torch.Tensor:
    """Symmetric negative cosine similarity, in [-1, 1].

    loss = -(mean cos(p1, z2) + mean cos(p2, z1)) / 2, with the targets z detached here
    (the stop-gradient is what prevents collapse).

    Example:
        >>> z = torch.randn(8, 4)
        >>> round(float(simsiam_loss(z, z, z, z)), 4)
        -1.0
    """
    z1, z2 = z1.detach(), z2.detach()  # stop-gradient
    cos12 = F.cosine_similarity(p1.float(), z2.float(), dim=-1).mean()
    cos21 = F.cosine_similarity(p2.float(), z1.float(), dim=-1).mean()
    return -(cos12 + cos21) / 2


class SimSiam(MethodModel):
    """Backbone + projector (encoder f) and predictor h."""

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        proj_dim: int = 2048,
        pred_hidden_dim: int = 512,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = simsiam_projector(feature_dim, proj_dim)
        self.predictor = simsiam_predictor(proj_dim, pred_hidden_dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z1 = self.projector(self.backbone(x1))  # NxD
        z2 = self.projector(self.backbone(x2))  # NxD
        p1, p2 = self.predictor(z1), self.predictor(z2)  # NxD
        return simsiam_loss(p1, p2, z1, z2), z1.detach()


METHOD = Method(
    name="simsiam",
    model=SimSiam,
    build=lambda backbone, dim, cfg, distributed: SimSiam(
        backbone, dim, cfg.proj_dim, cfg.pred_hidden_dim
    ),
    head_defaults={"proj_dim": 2048, "pred_hidden_dim": 512},
    # both views alike: crops from 20% of the image, stronger saturation jitter, blur p 0.5
    views=({"crop_scale": (0.2, 1.0), "jitter": (0.4, 0.4, 0.4, 0.1), "blur_p": 0.5},) * 2,
    fixed_lr_prefixes=("predictor",),  # the paper: the predictor's lr is not decayed
    warmup_epochs=lambda epochs: 0.0,
)
