"""Two-view augmentations: shapes, the papers' asymmetry and seeded determinism."""

import numpy as np
import pytest
import torch

from training.augment import TwoViews, view_specs


@pytest.fixture
def image():
    return torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 80, 96), dtype=np.uint8))


@pytest.mark.parametrize("method", ["barlow_twins", "byol", "simsiam"])
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
    for method in ("byol", "barlow_twins", "simsiam"):
        assert all(s.blur_p == 0.0 for s in view_specs(method, small_images=True))
    names = [type(t).__name__ for t in TwoViews("byol", 32).view1.transforms]
    assert "GaussianBlur" not in str(names) and "RandomApply" in names


def test_a_crop_scale_replaces_the_papers_on_both_views():
    s1, s2 = view_specs("byol", small_images=False, crop_scale=(0.4, 1.0))
    assert s1.crop_scale == s2.crop_scale == (0.4, 1.0)
    assert (s1.blur_p, s2.solarize_p) == (1.0, 0.2)  # the rest of the recipe is kept
    crop = TwoViews("simsiam", 48, crop_scale=(0.5, 0.9)).view2.transforms[1]
    assert type(crop).__name__ == "RandomResizedCrop" and tuple(crop.scale) == (0.5, 0.9)
