"""Backbones from torchvision by name, with the classifier removed.

backbone, feature_dim = create_backbone("resnet18", cifar_stem=True)
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn


def _strip_classifier(model: nn.Module) -> int:
    """Replace the classification layer by an identity; return the feature size it received."""
    for attr in ("fc", "head", "heads", "classifier"):
        layer = getattr(model, attr, None)
        if layer is None:
            continue
        linears = (
            [m for m in layer.modules() if isinstance(m, nn.Linear)]
            if not isinstance(layer, nn.Linear)
            else [layer]
        )
        if not linears:
            continue
        setattr(model, attr, nn.Identity())
        return linears[0].in_features
    raise ValueError(
        f"{type(model).__name__}: no classifier layer (fc, head, heads, classifier) found"
    )


def create_backbone(
    name: str = "resnet18", cifar_stem: bool = False, zero_init_residual: bool = False
) -> tuple[nn.Module, int]:
    """A randomly initialised torchvision model without its classifier, and its feature size.

    `cifar_stem` replaces a ResNet's first convolution by a 3x3 stride-1 one and drops the
    max-pool, as is usual for 32x32 images. `zero_init_residual` (ResNets) starts the last
    BatchNorm of every residual branch at zero, so each block starts as the identity, as the
    official SimSiam code does (ignored for other families). No weights are ever downloaded.
    """
    is_resnet = name.startswith(("resnet", "resnext", "wide_resnet"))
    kwargs = {"zero_init_residual": True} if zero_init_residual and is_resnet else {}
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except ValueError as e:
        known = ", ".join(sorted(torchvision.models.list_models(torchvision.models)))
        raise ValueError(f"unknown backbone {name!r}; torchvision knows: {known}") from e
    if cifar_stem:
        if not isinstance(getattr(model, "conv1", None), nn.Conv2d):
            raise ValueError(f"--cifar-stem needs a ResNet-style backbone with conv1, not {name!r}")
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    feature_dim = _strip_classifier(model)
    return model, feature_dim


@torch.no_grad()
def output_dim(model: nn.Module, image_size: int = 64) -> int:
    """The feature size measured by a forward pass (used to check `create_backbone`)."""
    was_training = model.training
    model.eval()
    out = model(torch.zeros(2, 3, image_size, image_size))
    model.train(was_training)
    return out.shape[1]
