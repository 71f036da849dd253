"""Backbones by name and the papers' heads."""

import pytest
import torch

from training.backbones import create_backbone, output_dim
from training.heads import (
    barlow_twins_projector,
    byol_predictor,
    byol_projector,
    simsiam_predictor,
    simsiam_projector,
)


@pytest.mark.parametrize(
    ("name", "dim"), [("resnet18", 512), ("resnet50", 2048), ("mobilenet_v3_small", 576)]
)
def test_feature_size_is_known_from_the_backbone(name, dim):
    model, feature_dim = create_backbone(name)
    assert feature_dim == dim
    assert output_dim(model) == dim


def test_cifar_stem_keeps_the_resolution_of_small_images():
    model, _ = create_backbone("resnet18", cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    trunk = torch.nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    assert trunk(torch.zeros(1, 3, 32, 32)).shape[-1] == 32  # the ImageNet stem would give 8


def test_unknown_backbone_lists_the_known_ones():
    with pytest.raises(ValueError, match="resnet18"):
        create_backbone("resnet_does_not_exist")


def test_heads_follow_the_papers():
    bt = barlow_twins_projector(512, (64, 64, 32))
    assert [n for n, _ in bt.named_children()] == [
        "linear0",
        "bn0",
        "relu0",
        "linear1",
        "bn1",
        "relu1",
        "linear2",
    ]
    assert bt.out_dim == 32
    byol = byol_projector(512, 128, 16)
    assert [n for n, _ in byol.named_children()] == ["linear0", "bn0", "relu0", "linear1"]
    assert byol_predictor(16, 64).out_dim == 16
    ss = simsiam_projector(512, 64)
    assert not ss.bn2.affine and not hasattr(ss, "relu2")  # output BN without affine, no ReLU
    pred = simsiam_predictor(64, 16)
    assert pred.linear0.out_features == 16 and pred.out_dim == 64  # bottleneck
    for head, in_dim in [(bt, 512), (byol, 512), (ss, 512), (pred, 64)]:
        assert head(torch.randn(4, in_dim)).shape == (4, head.out_dim)


def test_zero_init_residual_starts_every_block_as_the_identity():
    model, _ = create_backbone("resnet18", zero_init_residual=True)
    assert all(
        float(block.bn2.weight.detach().abs().sum()) == 0
        for layer in (model.layer1, model.layer4)
        for block in layer
    )
    plain, _ = create_backbone("resnet18")
    assert float(plain.layer1[0].bn2.weight.detach().abs().sum()) > 0
    create_backbone("mobilenet_v3_small", zero_init_residual=True)  # other families ignore it
