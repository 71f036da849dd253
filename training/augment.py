"""Two-view augmentation pipelines of the papers, on torchvision transforms v2.

Views are uint8 CHW tensors: conversion to float and normalization happen on the batch in the
trainer (and, after export, inside the ONNX graph), so workers move 4x fewer bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class ViewSpec:
    """The random augmentation of one view."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    jitter: tuple[float, float, float, float] = (
        0.4,
        0.4,
        0.2,
        0.1,
    )  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    solarize_p: float = 0.0
    flip_p: float = 0.5


def view_specs(
    method: str, small_images: bool, crop_scale: tuple[float, float] | None = None
) -> tuple[ViewSpec, ViewSpec]:
    """The two views of a method's paper.

    BYOL and Barlow Twins are asymmetric: blur p 1.0 / 0.1, solarize p 0.0 / 0.2. SimSiam:
    crop scale (0.2, 1), stronger saturation jitter, blur p 0.5 on both. On small (32x32)
    images blur is off, as in the CIFAR recipes. `crop_scale` replaces the crops' area range.
    """
    if method in ("byol", "barlow_twins"):
        v1 = ViewSpec(blur_p=1.0, solarize_p=0.0)
        v2_ = ViewSpec(blur_p=0.1, solarize_p=0.2)
    elif method == "simsiam":
        v1 = v2_ = ViewSpec(crop_scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), blur_p=0.5)
    else:
        raise ValueError(f"unknown method {method!r}")
    if small_images:
        v1 = dataclasses.replace(v1, blur_p=0.0)
        v2_ = dataclasses.replace(v2_, blur_p=0.0)
    if crop_scale is not None:
        v1 = dataclasses.replace(v1, crop_scale=tuple(crop_scale))
        v2_ = dataclasses.replace(v2_, crop_scale=tuple(crop_scale))
    return v1, v2_


def build_view(spec: ViewSpec, size: int) -> v2.Compose:
    """A v2 pipeline: uint8 CHW tensor (or PIL image) in, uint8 CHW tensor of `size` out."""
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # ~10% of the image, odd (23 at 224 px)
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=spec.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
        v2.RandomApply([v2.ColorJitter(*spec.jitter)], p=spec.jitter_p),
        v2.RandomGrayscale(spec.grayscale_p),
    ]
    if spec.blur_p > 0:
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=spec.blur_p))
    if spec.solarize_p > 0:
        steps.append(v2.RandomSolarize(threshold=128, p=spec.solarize_p))
    steps.append(v2.ToDtype(torch.uint8, scale=True))
    return v2.Compose(steps)


class TwoViews:
    """Callable: image -> (view1, view2), each uint8 CHW of the training size."""

    def __init__(
        self, method: str, size: int, crop_scale: tuple[float, float] | None = None
    ) -> None:
        s1, s2 = view_specs(method, small_images=size <= 64, crop_scale=crop_scale)
        self.view1, self.view2 = build_view(s1, size), build_view(s2, size)
        self.size = size

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)
