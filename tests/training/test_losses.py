"""The three losses: hand-checkable values, the properties of REFERENCE.md, stop-gradients."""

import pytest
import torch
from torch import nn

from training.methods import barlow_twins_loss, byol_loss, simsiam_loss

# Four samples whose two features are standardized and uncorrelated: c = I for (z, z).
Z_ORTHO = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def reference_barlow_twins(z1, z2, lambd):
    """The paper's pseudocode, term by term, with BatchNorm1d(affine=False) standardization."""
    bn = nn.BatchNorm1d(z1.shape[1], affine=False).train()
    c = bn(z1).T @ bn(z2) / z1.shape[0]
    on_diag = (torch.diagonal(c) - 1).pow(2).sum()
    off_diag = (c - torch.diag(torch.diagonal(c))).pow(2).sum()
    return on_diag + lambd * off_diag


class TestBarlowTwins:
    def test_identical_decorrelated_views_give_zero(self):
        assert float(barlow_twins_loss(Z_ORTHO, Z_ORTHO)) == pytest.approx(0.0, abs=1e-8)

    def test_anticorrelated_views_give_four_per_feature(self):
        # c = -I: each diagonal term is (1 - (-1))^2 = 4, two features -> 8
        assert float(barlow_twins_loss(Z_ORTHO, -Z_ORTHO)) == pytest.approx(8.0, rel=1e-4)

    def test_swapped_features_put_the_correlation_off_diagonal(self):
        # c = [[0, 1], [1, 0]]: diagonal (1 - 0)^2 x 2 = 2, off-diagonal lambd x (1 + 1)
        lambd = 0.25
        loss = barlow_twins_loss(Z_ORTHO, Z_ORTHO.flip(1), lambd=lambd)
        assert float(loss) == pytest.approx(2 + 2 * lambd, rel=1e-4)

    @pytest.mark.parametrize("seed", range(3))
    def test_matches_the_papers_formula(self, seed):
        g = torch.Generator().manual_seed(seed)
        z1, z2 = torch.randn(32, 16, generator=g), torch.randn(32, 16, generator=g)
        ours, ref = barlow_twins_loss(z1, z2, 0.0051), reference_barlow_twins(z1, z2, 0.0051)
        assert float(ours) == pytest.approx(float(ref), rel=1e-5)

    def test_invariant_to_an_affine_rescaling_of_its_inputs(self):
        g = torch.Generator().manual_seed(0)
        z1, z2 = (
            torch.randn(64, 8, generator=g),
            torch.randn(64, 8, generator=g) + 0.5 * torch.randn(64, 8, generator=g),
        )
        scale1, shift1 = torch.rand(8, generator=g) * 10 + 0.1, torch.randn(8, generator=g) * 100
        scale2, shift2 = torch.rand(8, generator=g) * 10 + 0.1, torch.randn(8, generator=g) * 100
        base = barlow_twins_loss(z1, z2)
        rescaled = barlow_twins_loss(z1 * scale1 + shift1, z2 * scale2 + shift2)
        assert float(rescaled) == pytest.approx(float(base), rel=1e-3)

    def test_is_computed_in_fp32_under_bf16_autocast(self):
        g = torch.Generator().manual_seed(0)
        z1, z2 = torch.randn(64, 32, generator=g), torch.randn(64, 32, generator=g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = barlow_twins_loss(z1, z2)
        assert loss.dtype == torch.float32
        assert float(loss) == pytest.approx(float(barlow_twins_loss(z1, z2)), rel=1e-6)

    def test_gradient_reaches_both_views(self):
        z1, z2 = torch.randn(16, 4, requires_grad=True), torch.randn(16, 4, requires_grad=True)
        barlow_twins_loss(z1, z2).backward()
        assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0

    def test_rejects_mismatched_shapes(self):
        with pytest.raises(ValueError, match="N x D"):
            barlow_twins_loss(torch.randn(4, 3), torch.randn(4, 2))


@pytest.mark.parametrize(
    ("loss_fn", "aligned", "opposite", "low", "high"),
    [(simsiam_loss, -1.0, 1.0, -1.0, 1.0), (byol_loss, 0.0, 8.0, 0.0, 8.0)],
    ids=["simsiam", "byol"],
)
class TestPredictorLosses:
    def test_aligned_and_opposite_predictions(self, loss_fn, aligned, opposite, low, high):
        z = torch.randn(8, 5)
        assert float(loss_fn(z, z, z, z)) == pytest.approx(aligned, abs=1e-5)
        assert float(loss_fn(-z, -z, z, z)) == pytest.approx(opposite, abs=1e-5)

    def test_orthogonal_predictions_are_halfway(self, loss_fn, aligned, opposite, low, high):
        p = torch.tensor([[1.0, 0.0]])
        z = torch.tensor([[0.0, 3.0]])
        assert float(loss_fn(p, p, z, z)) == pytest.approx((aligned + opposite) / 2, abs=1e-6)

    @pytest.mark.parametrize("seed", range(5))
    def test_stays_in_its_range(self, loss_fn, aligned, opposite, low, high, seed):
        g = torch.Generator().manual_seed(seed)
        p1, p2, z1, z2 = (torch.randn(16, 7, generator=g) * 10 for _ in range(4))
        value = float(loss_fn(p1, p2, z1, z2))
        assert low <= value <= high

    def test_no_gradient_reaches_a_target(self, loss_fn, aligned, opposite, low, high):
        p1, p2, z1, z2 = (torch.randn(6, 3, requires_grad=True) for _ in range(4))
        loss = loss_fn(p1, p2, z1, z2)
        assert loss.ndim == 0
        loss.backward()
        assert z1.grad is None and z2.grad is None
        assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
