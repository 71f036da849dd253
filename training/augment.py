"""Two-view augmentation pipelines of the papers, on torchvision transforms v2.

Views are uint8 CHW tensors: conversion to float and normalization happen on the batch in the
trainer (and, after export, inside the ONNX graph), so workers move 4x fewer bytes.

With `--device-augment` the data workers only crop and flip (`TwoViews(photometric=False)`), and
`BatchPhotometric` applies the rest of the recipe (colour jitter, grayscale, blur, solarize) to
whole batches on the training device, each sample with its own random parameters. On a GPU the
per-image colour jitter of the workers is what bounds the step rate (7 ms per image pair on one
core against under 1 ms for crop and flip); on the device it costs a few batched kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from training import methods


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
    """The two views of a method's paper (its registry entry's `views`).

    BYOL and Barlow Twins are asymmetric: blur p 1.0 / 0.1, solarize p 0.0 / 0.2. SimSiam:
    crop scale (0.2, 1), stronger saturation jitter, blur p 0.5 on both. On small (32x32)
    images blur is off, as in the CIFAR recipes. `crop_scale` replaces the crops' area range.
    """
    v1, v2_ = (ViewSpec(**overrides) for overrides in methods.get(method).views)
    if small_images:
        v1 = dataclasses.replace(v1, blur_p=0.0)
        v2_ = dataclasses.replace(v2_, blur_p=0.0)
    if crop_scale is not None:
        v1 = dataclasses.replace(v1, crop_scale=tuple(crop_scale))
        v2_ = dataclasses.replace(v2_, crop_scale=tuple(crop_scale))
    return v1, v2_


def blur_kernel_size(size: int) -> int:
    """The Gaussian blur's kernel: ~10% of the image, odd (23 at 224 px, 13 at 128)."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def build_view(spec: ViewSpec, size: int, photometric: bool = True) -> v2.Compose:
    """A v2 pipeline: uint8 CHW tensor (or PIL image) in, uint8 CHW tensor of `size` out.

    `photometric=False`: the crop and flip alone (BatchPhotometric does the rest on the batch).
    """
    kernel = blur_kernel_size(size)
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=spec.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
    ]
    if not photometric:
        steps.append(v2.ToDtype(torch.uint8, scale=True))
        return v2.Compose(steps)
    steps += [
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
        self,
        method: str,
        size: int,
        crop_scale: tuple[float, float] | None = None,
        photometric: bool = True,
    ) -> None:
        self.specs = view_specs(method, small_images=size <= 64, crop_scale=crop_scale)
        self.view1, self.view2 = (build_view(s, size, photometric) for s in self.specs)
        self.size = size

    def __call__(self, image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.view1(image), self.view2(image)


# -- the photometric half on whole batches ----------------------------------------------------
# Images are float NCHW in [0, 1]; a factor tensor holds one value per sample.
_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601, as torchvision's rgb_to_grayscale


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _per_sample(f: torch.Tensor) -> torch.Tensor:
    return f.view(-1, 1, 1, 1)


def adjust_brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * _per_sample(f)).clamp(0, 1)


def adjust_contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    f = _per_sample(f)
    return (f * x + (1 - f) * mean).clamp(0, 1)


def adjust_saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    f = _per_sample(f)
    return (f * x + (1 - f) * _gray(x)).clamp(0, 1)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """NCHW RGB in [0, 1] -> NCHW HSV, hue in [0, 1)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.amax(1), x.amin(1)
    delta = maxc - minc
    s = torch.where(maxc > 0, delta / maxc.clamp_min(1e-12), torch.zeros_like(maxc))
    d = delta.clamp_min(1e-12)
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, torch.remainder(h / 6.0, 1.0), torch.zeros_like(h))
    return torch.stack((h, s, maxc), 1)


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """NCHW HSV (hue in [0, 1)) -> NCHW RGB in [0, 1]."""
    h, s, v = x.unbind(1)
    h6 = torch.remainder(h, 1.0) * 6.0
    i = torch.floor(h6)
    f = h6 - i
    sector = i.long() % 6
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    # (r, g, b) of each of the six hue sectors
    table = (
        (v, t, p),
        (q, v, p),
        (p, v, t),
        (p, q, v),
        (t, p, v),
        (v, p, q),
    )
    out = torch.zeros_like(x)
    for k, rgb in enumerate(table):
        mask = (sector == k).unsqueeze(1)
        out = torch.where(mask, torch.stack(rgb, 1), out)
    return out


def adjust_hue(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    hsv = rgb_to_hsv(x)
    h = torch.remainder(hsv[:, 0] + f.view(-1, 1, 1), 1.0)
    return hsv_to_rgb(torch.stack((h, hsv[:, 1], hsv[:, 2]), 1))


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding (as torchvision)."""
    n, c, hgt, wid = x.shape
    radius = kernel // 2
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    w = torch.exp(-0.5 * (t.view(1, -1) / sigma.view(-1, 1).to(x.dtype)) ** 2)
    w = (w / w.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*c, kernel)
    y = F.pad(x.reshape(1, n * c, hgt, wid), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, w.view(n * c, 1, 1, kernel), groups=n * c)
    y = F.conv2d(y, w.view(n * c, 1, kernel, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def _where(mask: torch.Tensor) -> torch.Tensor:
    return mask.nonzero().view(-1)


_JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


class BatchPhotometric:
    """The photometric steps of a ViewSpec on a batch, with per-sample random parameters.

    The same distribution as the v2 pipeline of `build_view`: colour jitter with probability
    `jitter_p` (brightness, contrast, saturation and hue factors drawn uniformly, applied in a
    random order of the four per sample), grayscale, Gaussian blur (sigma in [0.1, 2]) and
    solarization (at 128 of 255). Input: uint8 NCHW on any device, output float NCHW in
    [0, 255] on the same device (what the trainer's Normalize takes). The randomness comes
    from `generator` alone, which must live on the batch's device.
    """

    def __init__(self, spec: ViewSpec, size: int) -> None:
        self.spec, self.kernel = spec, blur_kernel_size(size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        s, n, dev = self.spec, images.shape[0], images.device

        def uniform(lo: float, hi: float) -> torch.Tensor:
            return lo + (hi - lo) * torch.rand(n, generator=generator, device=dev)

        def chosen(p: float) -> torch.Tensor:
            return (torch.rand(n, generator=generator, device=dev) < p).view(-1, 1, 1, 1)

        x = images.float() / 255.0
        b, c, sat, hue = s.jitter
        factors = (
            uniform(max(0.0, 1 - b), 1 + b),
            uniform(max(0.0, 1 - c), 1 + c),
            uniform(max(0.0, 1 - sat), 1 + sat),
            uniform(-hue, hue),
        )
        jitter = chosen(s.jitter_p)
        order = torch.argsort(torch.rand(n, 4, generator=generator, device=dev), dim=1)
        # each op runs on the samples that take it at this position alone (4 op runs in all)
        for position in range(4):
            y = x.clone()
            for k, op in enumerate(_JITTER_OPS):
                idx = _where(jitter.view(-1) & (order[:, position] == k))
                if idx.numel():
                    y[idx] = op(x[idx], factors[k][idx])
            x = y
        x = torch.where(chosen(s.grayscale_p), _gray(x).expand_as(x), x)
        if s.blur_p > 0:
            sigma, idx = uniform(0.1, 2.0), _where(chosen(s.blur_p).view(-1))
            if idx.numel():
                x[idx] = gaussian_blur(x[idx], sigma[idx], self.kernel)
        if s.solarize_p > 0:
            x = torch.where(chosen(s.solarize_p) & (x >= 128 / 255), 1.0 - x, x)
        return x * 255.0
