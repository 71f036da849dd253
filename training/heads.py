"""Projector and predictor MLPs, one generic head and a constructor per paper.

Each constructor quotes the architecture sentence of its paper; sizes are configurable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class Layer:
    """One Linear layer of a head, with what follows it."""

    out_dim: int
    batch_norm: bool = True
    bn_affine: bool = True
    relu: bool = True
    bias: bool = False  # a Linear followed by BN needs no bias


class ProjectionHead(nn.Sequential):
    """Linear [-> BatchNorm1d] [-> ReLU] blocks, with named layers (`linear0`, `bn0`, ...)."""

    def __init__(self, in_dim: int, layers: Sequence[Layer]) -> None:
        super().__init__()
        dim = in_dim
        for i, layer in enumerate(layers):
            self.add_module(f"linear{i}", nn.Linear(dim, layer.out_dim, bias=layer.bias))
            if layer.batch_norm:
                self.add_module(f"bn{i}", nn.BatchNorm1d(layer.out_dim, affine=layer.bn_affine))
            if layer.relu:
                self.add_module(f"relu{i}", nn.ReLU(inplace=True))
            dim = layer.out_dim
        self.out_dim = dim


def barlow_twins_projector(in_dim: int, dims: Sequence[int] = (8192, 8192, 8192)) -> ProjectionHead:
    """ "The projector network has three linear layers, each with 8192 output units. The first
    two layers of the projector are followed by a batch normalization layer and rectified
    linear units." (Barlow Twins, sec. 2)"""
    *hidden, out = dims
    layers = [Layer(d) for d in hidden] + [Layer(out, batch_norm=False, relu=False)]
    return ProjectionHead(in_dim, layers)


def byol_projector(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> ProjectionHead:
    """ "a linear layer with output size 4096 followed by batch normalization, rectified linear
    units (ReLU), and a final linear layer with output dimension 256" (BYOL, sec. 3.3)"""
    return ProjectionHead(
        in_dim, [Layer(hidden_dim), Layer(out_dim, batch_norm=False, relu=False, bias=True)]
    )


def byol_predictor(dim: int = 256, hidden_dim: int = 4096) -> ProjectionHead:
    """ "The predictor q_theta uses the same architecture as g_theta" (BYOL, sec. 3.3)."""
    return byol_projector(dim, hidden_dim, dim)


def simsiam_projector(in_dim: int, dim: int = 2048, num_layers: int = 3) -> ProjectionHead:
    """ "The projection MLP has BN applied to each fully-connected (fc) layer, including its
    output fc. Its output fc has no ReLU. The hidden fc is 2048-d. This MLP has 3 layers."
    (SimSiam, sec. 4); the output BN has no affine parameters, as in the official code."""
    layers = [Layer(dim) for _ in range(num_layers - 1)]
    layers.append(Layer(dim, bn_affine=False, relu=False))
    return ProjectionHead(in_dim, layers)


def simsiam_predictor(dim: int = 2048, hidden_dim: int = 512) -> ProjectionHead:
    """ "The prediction MLP has BN applied to its hidden fc layers. Its output fc does not have
    BN or ReLU. This MLP has 2 layers. [...] the input and output of h is 2048-d, and h's hidden
    layer's dimension is 512, making h a bottleneck structure" (SimSiam, sec. 4)"""
    return ProjectionHead(
        dim, [Layer(hidden_dim), Layer(dim, batch_norm=False, relu=False, bias=True)]
    )
