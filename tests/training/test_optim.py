"""Learning-rate schedule, parameter groups and LARS."""

import pytest
import torch
from torch import nn

from training.optim import LARS, build_optimizer, param_groups, set_lr, warmup_cosine


def test_warmup_cosine_end_points():
    assert warmup_cosine(0, 100, 10, 1.0) == 0.0
    assert warmup_cosine(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 10, 1.0, final_lr=0.01) == pytest.approx(0.01)
    assert warmup_cosine(0, 100, 0, 1.0) == pytest.approx(1.0)
    lrs = [warmup_cosine(s, 100, 10, 1.0) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))


def _model():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))


def test_biases_and_norms_get_no_weight_decay_and_no_adaptation():
    model = _model()
    groups = param_groups([("", model)], weight_decay=0.1)
    by_adapt = {g["lars_adapt"]: g for g in groups}
    assert {p.ndim for p in by_adapt[True]["params"]} == {4, 2}
    assert by_adapt[True]["weight_decay"] == 0.1
    assert all(
        p.ndim == 1 for p in by_adapt[False]["params"]
    )  # conv/linear biases, BN weight and bias
    assert len(by_adapt[False]["params"]) == 4
    assert by_adapt[False]["weight_decay"] == 0.0


def test_fixed_lr_groups_keep_the_base_lr():
    model = nn.ModuleDict({"backbone": nn.Linear(2, 2), "predictor": nn.Linear(2, 2)})
    opt = build_optimizer(
        "sgd", param_groups([("", model)], 0.0, fixed_lr_prefixes=("predictor",)), 1.0, 0.9, 0.0
    )
    set_lr(opt, 0.1, base_lr=1.0)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs[id(model["predictor"].weight)] == 1.0
    assert lrs[id(model["backbone"].weight)] == 0.1


def test_lars_step_is_the_trust_ratio_times_the_weight_norm():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 5))
    w.grad = torch.randn(5, 5) * 1000  # the gradient scale must not matter
    before = w.detach().clone()
    LARS([{"params": [w], "lars_adapt": True, "weight_decay": 0.0}], lr=0.5, eta=0.01).step()
    step_norm = torch.linalg.vector_norm(w.detach() - before)
    assert float(step_norm) == pytest.approx(
        0.5 * 0.01 * float(torch.linalg.vector_norm(before)), rel=1e-5
    )


def test_lars_without_adaptation_is_sgd_with_momentum():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(4))
    b.data.copy_(a.data)
    lars = LARS([{"params": [a], "lars_adapt": False, "weight_decay": 0.0}], lr=0.1, momentum=0.9)
    sgd = torch.optim.SGD([b], lr=0.1, momentum=0.9)
    for _ in range(3):
        g = torch.randn(4)
        a.grad, b.grad = g.clone(), g.clone()
        lars.step()
        sgd.step()
    torch.testing.assert_close(a, b)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer("adam", param_groups([("", _model())], 0.0), 0.1, 0.9, 0.0)
