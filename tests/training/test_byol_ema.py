"""BYOL's EMA teacher and its cosine tau schedule."""

import pytest
import torch
from torch import nn

from training.backbones import create_backbone
from training.methods import BYOL, cosine_tau, ema_update


def test_tau_schedule_end_points():
    assert cosine_tau(0, 100, 0.99) == pytest.approx(0.99)
    assert cosine_tau(50, 100, 0.99) == pytest.approx(0.995)
    assert cosine_tau(100, 100, 0.99) == pytest.approx(1.0)
    assert cosine_tau(10, 100, 0.99) < cosine_tau(20, 100, 0.99)


def _pair():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(
        nn.Linear(3, 4), nn.BatchNorm1d(4)
    )


@pytest.mark.parametrize(("tau", "weight_of_teacher"), [(1.0, 1.0), (0.0, 0.0), (0.75, 0.75)])
def test_ema_update_mixes_teacher_and_student(tau, weight_of_teacher):
    teacher, student = _pair()
    before_t = [p.clone() for p in teacher.parameters()]
    student[1].running_mean.fill_(3.0)
    ema_update(teacher, student, tau)
    for p_t, b_t, p_s in zip(teacher.parameters(), before_t, student.parameters(), strict=True):
        torch.testing.assert_close(p_t, weight_of_teacher * b_t + (1 - weight_of_teacher) * p_s)
        assert p_t.grad_fn is None
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)  # buffers are copied


def test_byol_teacher_starts_equal_has_no_grad_and_freezes_at_the_last_step():
    backbone, dim = create_backbone("resnet18", cifar_stem=True)
    model = BYOL(backbone, dim, proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    assert all(not p.requires_grad for p in model.teacher_backbone.parameters())
    for p_t, p_s in zip(
        model.teacher_backbone.parameters(), model.backbone.parameters(), strict=True
    ):
        assert torch.equal(p_t, p_s)
    x1, x2 = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)
    loss, _ = model(x1, x2)
    loss.backward()
    assert all(p.grad is None for p in model.teacher_projector.parameters())
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.add_(1.0)
    frozen = [p.clone() for p in model.teacher_backbone.parameters()]
    model.update_teacher(step=100, total_steps=100)  # tau = 1: the teacher does not move
    assert model.tau == pytest.approx(1.0)
    for p, f in zip(model.teacher_backbone.parameters(), frozen, strict=True):
        assert torch.equal(p, f)
    model.update_teacher(step=0, total_steps=100)  # tau = tau_base: it moves towards the student
    assert not all(
        torch.equal(p, f) for p, f in zip(model.teacher_backbone.parameters(), frozen, strict=True)
    )
