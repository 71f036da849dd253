"""Two-view augmentations: shapes, the papers' asymmetry and seeded determinism."""

import numpy as np
import pytest
import torch

from training.augment import TwoViews, view_specs
from training.methods import METHODS


@pytest.fixture
def image():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 80, 96), dtype=np.uint8))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("size", [32, 64])
def test_views_are_uint8_of_the_training_size(method, size, image):
    v1, v2 = TwoViews(method, size)(image)
    assert v1.shape == v2.shape == (3, size, size)
    assert v1.dtype == v2.dtype == torch.uint8
    assert not torch.equal(v1, v2)


def test_same_seed_same_views_other_seed_other_views(image):
    aug = TwoViews("byol", 48)
    torch.manual_seed(3)
    a = aug(image)
    torch.manual_seed(3)
    b = aug(image)
    torch.manual_seed(4)
    c = aug(image)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_byol_and_barlow_twins_are_asymmetric_simsiam_is_not():
    for method in ("byol", "barlow_twins"):
        s1, s2 = view_specs(method, small_images=False)
        assert (s1.blur_p, s2.blur_p, s1.solarize_p, s2.solarize_p) == (1.0, 0.1, 0.0, 0.2)
        assert s1.crop_scale == (0.08, 1.0)
    s1, s2 = view_specs("simsiam", small_images=False)
    assert s1 == s2 and s1.crop_scale == (0.2, 1.0) and s1.blur_p == 0.5


def test_small_images_have_no_blur():
    for method in METHODS:
        assert all(s.blur_p == 0.0 for s in view_specs(method, small_images=True))
    names = [type(t).__name__ for t in TwoViews("byol", 32).view1.transforms]
    assert "GaussianBlur" not in str(names) and "RandomApply" in names


def test_a_crop_scale_replaces_the_papers_on_both_views():
    s1, s2 = view_specs("byol", small_images=False, crop_scale=(0.4, 1.0))
    assert s1.crop_scale == s2.crop_scale == (0.4, 1.0)
    assert (s1.blur_p, s2.solarize_p) == (1.0, 0.2)  # the rest of the recipe is kept
    crop = TwoViews("simsiam", 48, crop_scale=(0.5, 0.9)).view2.transforms[1]
    assert type(crop).__name__ == "RandomResizedCrop" and tuple(crop.scale) == (0.5, 0.9)


# -- the photometric half on whole batches (--device-augment) ----------------------------------
from torchvision.transforms.v2 import functional as TF  # noqa: E402

from training.augment import (  # noqa: E402
    BatchPhotometric,
    ViewSpec,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    gaussian_blur,
)


@pytest.fixture
def batch():
    """Four float RGB images in [0, 1] with smooth regions, edges, grays and saturated colours."""
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.random((4, 3, 24, 28), dtype=np.float32))
    x[0, :, :8] = 0.5  # gray block (zero saturation: hue undefined)
    x[1, 0], x[1, 1:] = 1.0, 0.0  # pure red
    x[2, :, :, :10] = torch.linspace(0, 1, 10)  # ramp
    return x


@pytest.mark.parametrize(
    ("ours", "theirs", "factors"),
    [
        (adjust_brightness, TF.adjust_brightness, (0.6, 1.0, 1.4, 0.0)),
        (adjust_contrast, TF.adjust_contrast, (0.6, 1.0, 1.4, 0.0)),
        (adjust_saturation, TF.adjust_saturation, (0.6, 1.0, 1.2, 0.0)),
        (adjust_hue, TF.adjust_hue, (-0.1, 0.0, 0.05, 0.1)),
    ],
)
def test_each_jitter_op_matches_torchvision_per_sample(batch, ours, theirs, factors):
    f = torch.tensor(factors)
    got = ours(batch, f)
    want = torch.stack([theirs(img, float(fi)) for img, fi in zip(batch, f, strict=True)])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)  # 1/40 of a uint8 level


def test_blur_matches_torchvision_with_a_sigma_per_sample(batch):
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    got = gaussian_blur(batch, sigma, kernel=7)
    want = torch.stack(
        [TF.gaussian_blur(img, [7, 7], [float(s)] * 2) for img, s in zip(batch, sigma, strict=True)]
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def _uint8_batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def test_batch_photometric_is_seeded_per_sample_and_keeps_the_range():
    aug = BatchPhotometric(ViewSpec(blur_p=0.5, solarize_p=0.5), size=16)
    x = _uint8_batch()
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert float(a.min()) >= 0.0 and float(a.max()) <= 255.0
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per-sample parameters: two copies of one image in a batch come out different
    same = x[:1].expand(8, -1, -1, -1)
    out = aug(same, torch.Generator().manual_seed(0))
    assert len({tuple(o.flatten()[:50].tolist()) for o in out}) > 1


def test_batch_photometric_with_every_probability_zero_is_the_identity():
    spec = ViewSpec(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
    x = _uint8_batch()
    out = BatchPhotometric(spec, size=16)(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x.float(), atol=1e-4, rtol=0)


def test_batch_photometric_grayscale_and_solarize_at_probability_one():
    x = _uint8_batch()
    gray = BatchPhotometric(ViewSpec(jitter_p=0.0, grayscale_p=1.0), 16)(
        x, torch.Generator().manual_seed(0)
    )
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    torch.testing.assert_close(gray, TF.rgb_to_grayscale(x.float(), 3), atol=0.05, rtol=0)
    sol = BatchPhotometric(ViewSpec(jitter_p=0.0, grayscale_p=0.0, solarize_p=1.0), 16)(
        x, torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(sol, TF.solarize(x, 128).float(), atol=0.05, rtol=0)


def test_batch_photometric_applies_jitter_to_about_p_of_the_samples():
    spec = ViewSpec(jitter_p=0.8, grayscale_p=0.0)
    x = _uint8_batch(n=2000)
    out = BatchPhotometric(spec, 16)(x, torch.Generator().manual_seed(0))
    changed = (out - x.float()).abs().flatten(1).amax(1) > 0.5
    assert 0.75 < float(changed.float().mean()) < 0.85


def test_geometric_only_views_crop_and_flip_and_nothing_else(image):
    views = TwoViews("barlow_twins", 48, photometric=False)
    names = [type(t).__name__ for t in views.view1.transforms]
    assert names == ["ToImage", "RandomResizedCrop", "RandomHorizontalFlip", "ToDtype"]
    v1, v2 = views(image)
    assert v1.shape == v2.shape == (3, 48, 48) and v1.dtype == torch.uint8
    assert views.specs == view_specs("barlow_twins", small_images=True)
