"""The method registry: every entry builds a model with the hooks the loop calls, and a method
the trainer has never heard of trains through the registry alone."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from training import methods
from training.augment import ViewSpec, view_specs
from training.config import TrainConfig
from training.heads import simsiam_projector
from training.methods import METHODS, REGISTRY, Method, MethodModel
from training.models import build_model, trainable_param_groups
from training.trainer import Trainer

from .test_trainer import SMALL_HEADS, small_config


@pytest.mark.parametrize("method", METHODS)
def test_each_entry_builds_its_model_with_the_loops_hooks(method):
    entry = REGISTRY[method]
    cfg = TrainConfig(method=method, **SMALL_HEADS).resolved()
    model = build_model(cfg)
    assert isinstance(model, entry.model) and isinstance(model, MethodModel)
    assert set(entry.head_defaults) <= {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(set(v) <= {f.name for f in dataclasses.fields(ViewSpec)} for v in entry.views)
    x = torch.randn(4, 3, 32, 32)
    loss, z = model.trained_module()(*model.step_inputs(x, x.flip(3)))
    assert loss.ndim == 0 and z.shape[0] == 4
    model.after_step(1, 10)
    model.after_encoder_init()
    assert all(isinstance(v, float) for v in model.step_metrics().values())
    fixed = [g for g in trainable_param_groups(model, cfg) if g["fixed_lr"]]
    assert bool(fixed) == bool(entry.fixed_lr_prefixes)


def test_an_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'swav': choose one of barlow_twins"):
        TrainConfig(method="swav").resolved()


class Toy(MethodModel):
    """A fourth method for the test: one projector, the two views pulled together."""

    def __init__(self, backbone, feature_dim: int, proj_dim: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = simsiam_projector(feature_dim, proj_dim)

    def forward(self, x1, x2):
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        return -F.cosine_similarity(z1, z2).mean(), z1.detach()

    def step_metrics(self) -> dict[str, float]:
        return {"toy": 1.0}


TOY = Method(
    name="toy",
    model=Toy,
    build=lambda backbone, dim, cfg, distributed: Toy(backbone, dim, cfg.proj_dim),
    head_defaults={"proj_dim": 16},
    views=({"blur_p": 0.5}, {"solarize_p": 0.5}),
    warmup_epochs=lambda epochs: 1.0,
)


def test_a_fourth_method_is_one_registry_entry(image_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(methods.REGISTRY, "toy", TOY)
    heads = {k: None for k in SMALL_HEADS}  # the entry's defaults, not the test's sizes
    cfg = small_config(image_folder, tmp_path, method="toy", epochs=1, stop_after_steps=2, **heads)
    assert cfg.resolved().proj_dim == 16 and cfg.resolved().warmup_epochs == 1.0
    assert view_specs("toy", small_images=False)[1].solarize_p == 0.5
    trainer = Trainer(cfg)
    assert isinstance(trainer.model, Toy)
    assert trainer.fit()["steps"] == 2
    log = (tmp_path / "metrics.jsonl").read_text()
    assert '"toy": 1.0' in log
