"""--init-from: a new run starts from an exported package's encoder (BatchNorms rebuilt from the
folded graph) or from a checkpoint's; the card records where the weights came from."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from embedserve.package import sha256_file
from training import checkpoint as ckpt_io
from training import warmstart
from training.backbones import create_backbone
from training.card import training_record
from training.export_data import generated_images
from training.methods import METHODS
from training.models import EmbeddingGraph, Normalize
from training.onnx_graph import export_onnx
from training.train import main
from training.trainer import Trainer
from training.warmstart import init_from_checkpoint, init_from_package, read_package

from .test_trainer import init_checkpoint, small_config

SIZE = 32


def uint8_nchw(n: int, seed: int) -> torch.Tensor:
    return torch.from_numpy(generated_images(n, SIZE, SIZE, seed=seed)).permute(0, 3, 1, 2)


@torch.no_grad()
def trained_like_backbone(seed: int = 0) -> nn.Module:
    """A ResNet-18 whose BatchNorms look trained: random gammas (some negative, one zero
    channel), betas, and running statistics accumulated over images in training mode."""
    torch.manual_seed(seed)
    backbone, _ = create_backbone("resnet18", zero_init_residual=True)
    bns = [m for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.weight.uniform_(0.3, 1.5).mul_(torch.where(torch.rand_like(bn.weight) < 0.2, -1, 1))
        bn.bias.normal_(0, 0.3)
        bn.momentum = None  # cumulative average: the statistics of all the images below
        bn.reset_running_stats()
    bns[3].weight[0] = 0.0  # a dead channel: W' = 0 in the graph
    normalize = Normalize()
    backbone.train()
    for seed_ in range(4):
        backbone(normalize(uint8_nchw(64, seed=100 + seed_)))
    return backbone.eval()


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[Path, nn.Module]:
    """An exported package of `trained_like_backbone` (model.onnx and a minimal card)."""
    pkg = tmp_path_factory.mktemp("models") / "bt-test"
    pkg.mkdir()
    original = trained_like_backbone()
    export_onnx(EmbeddingGraph(original).eval(), pkg / "model.onnx", SIZE, SIZE)
    card = {
        "name": "bt-test",
        "method": "barlow_twins",
        "backbone": "resnet18",
        "training": {"epochs": 7, "command": "python -m training.train --epochs 7"},
        "metrics": {"knn": [{"k": 20, "top1": 0.5}]},
        "preprocess": {
            "resize": SIZE,
            "crop": {"height": SIZE, "width": SIZE},
            "interpolation": "bilinear",
        },
    }
    (pkg / "card.json").write_text(json.dumps(card))
    return pkg, original


def test_the_package_encoder_is_rebuilt_exactly_in_eval_mode_and_closely_in_training_mode(
    package,
):
    pkg, original = package
    fresh, _ = create_backbone("resnet18", zero_init_residual=True)
    normalize = Normalize()
    record = init_from_package(
        fresh, pkg, uint8_nchw(256, seed=100), normalize, uint8_nchw(16, seed=7)
    )
    assert record["kind"] == "package" and record["name"] == "bt-test" and record["epochs"] == 7
    assert record["model_sha256"] == sha256_file(pkg / "model.onnx")
    assert record["parity_min_cosine"] > 0.9999

    x = normalize(uint8_nchw(32, seed=3))  # images neither step has seen
    with torch.no_grad():
        original.eval(), fresh.eval()
        torch.testing.assert_close(fresh(x), original(x), rtol=1e-3, atol=1e-4)
        # training mode normalizes by the batch: the rebuilt gammas and betas must stand in for
        # the lost ones. Measured: min cosine 0.968 (the statistics are taken in eval mode, the
        # original's in training mode); an identity BatchNorm with the folded bias gives 0.37.
        original = copy.deepcopy(original).train()  # a training-mode pass updates statistics
        cos = nn.functional.cosine_similarity(fresh.train()(x), original(x), dim=1)
    assert cos.min() > 0.95, cos


def test_a_package_of_another_architecture_or_no_package_is_refused(
    package, image_folder, tmp_path, capsys
):
    pkg, _ = package
    other, _ = create_backbone("resnet34")
    images = uint8_nchw(8, seed=1)
    with pytest.raises(ValueError, match="the graph has 20 convolutions, the backbone 36"):
        init_from_package(other, pkg, images, Normalize(), images)
    with pytest.raises(FileNotFoundError, match="no card.json and model.onnx"):
        read_package(tmp_path)
    argv = ["--data", str(image_folder), "--image-size", "32", "--batch-size", "16"]
    argv += ["--out", str(tmp_path / "run")]
    assert main([*argv, "--no-progress", "--init-from", str(tmp_path / "nowhere")]) == 2
    assert "--init-from" in capsys.readouterr().err


@pytest.mark.slow
def one_step_from(pkg: Path, image_folder, out: Path, **overrides):
    """A Barlow Twins run of one fp32 step, on one thread, started from package `pkg`."""
    return small_config(
        image_folder,
        out,
        method="barlow_twins",
        init_from=str(pkg),
        stop_after_steps=1,
        precision="fp32",
        threads=1,
        **overrides,
    )


def test_a_run_started_from_a_package_records_it_and_resumes_without_it(
    package, image_folder, tmp_path
):
    pkg, original = package
    local = tmp_path / "bt-test"
    shutil.copytree(pkg, local)
    cfg = one_step_from(local, image_folder, tmp_path / "run")
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg)
        x = Normalize()(uint8_nchw(8, seed=5))
        with torch.no_grad():
            backbone = trainer.model.backbone.eval()
            torch.testing.assert_close(
                backbone(x.contiguous(memory_format=torch.channels_last)),
                original(x),
                rtol=1e-3,
                atol=1e-4,
            )
        trainer.fit()
        ckpt = tmp_path / "run" / "checkpoint.pt"
        ck = ckpt_io.load(ckpt)
        assert ck["init_from"]["name"] == "bt-test" and ck["init_from"]["epochs"] == 7
        # a reference to the package: its own lineage stays in its card, not copied
        assert ck["init_from"]["total_epochs"] == 7 and "init_from" not in ck["init_from"]
        record = training_record(ck, trainer.cfg, ckpt)
        assert record["init_from"]["model_sha256"] == sha256_file(pkg / "model.onnx")
        assert "command" not in record["init_from"] and "metrics" not in record["init_from"]
        assert record["epochs"] == 0 and record["total_epochs"] == 7  # 1 step of epoch 1
        assert record["recipe"] is None and "no single recipe" in record["reproduction"]

        # the package may be gone (re-exported over) by the time the run is resumed
        shutil.rmtree(local)
        resumed = Trainer(small_config(image_folder, tmp_path / "run"), resume=str(ckpt))
        assert resumed.init_record == ck["init_from"]
    finally:
        torch.set_num_threads(threads)

    # a checkpoint is a source too: its backbone, nothing else
    fresh, _ = create_backbone("resnet18", zero_init_residual=True)
    rec = init_from_checkpoint(fresh, ckpt)
    assert rec["kind"] == "checkpoint" and rec["init_from"]["name"] == "bt-test"
    for name, p in fresh.state_dict().items():
        torch.testing.assert_close(p, ck["model"]["backbone." + name])


def test_a_run_may_train_below_the_packages_input_size(package, image_folder, tmp_path):
    """FixRes-style fine-tuning: crops smaller than the package's input. The parity check runs
    at the card's size (the graph's fixed input), the run's kNN at --eval-size."""
    pkg, _ = package
    cfg = one_step_from(pkg, image_folder, tmp_path / "run", image_size=SIZE - 8, eval_size=SIZE)
    threads = torch.get_num_threads()
    try:
        trainer = Trainer(cfg)
        assert trainer.init_record["parity_min_cosine"] > 0.9999
        sizes = []
        hook = trainer.model.backbone.register_forward_pre_hook(
            lambda _m, args: sizes.append(tuple(args[0].shape[-2:]))
        )
        trainer.features(trainer.train_samples)
        hook.remove()
        assert set(sizes) == {(SIZE, SIZE)}  # evaluation at --eval-size, not --image-size
        trainer.fit()
    finally:
        torch.set_num_threads(threads)
    ck = ckpt_io.load(tmp_path / "run" / "checkpoint.pt")
    assert ck["config"]["image_size"] == SIZE - 8 and ck["config"]["eval_size"] == SIZE


def test_device_augment_rebuilds_the_batchnorms_from_fully_augmented_views(
    package, image_folder, tmp_path, monkeypatch
):
    """With --device-augment the workers' views are only cropped and flipped: the BatchNorm
    statistics must still come from views with the photometric half applied, as in training."""
    pkg, original = package
    seen = {}
    real = warmstart.init_from_package

    def spy(backbone, package, views, prepare, check_images):
        seen["views"] = views
        return real(backbone, package, views, prepare, check_images)

    monkeypatch.setattr(warmstart, "init_from_package", spy)
    cfg = small_config(
        image_folder,
        tmp_path / "run",
        method="barlow_twins",
        init_from=str(pkg),
        device_augment=True,
        precision="fp32",
    )
    trainer = Trainer(cfg)
    views = seen["views"]
    assert views.dtype == torch.float32 and float(views.max()) <= 255.0
    assert views.shape[0] == 2 * min(len(trainer.dataset), 1024)
    # crop and flip alone give uint8 views; the colour jitter and blur make fractional values
    assert not torch.equal(views, views.round())
    x = Normalize()(uint8_nchw(8, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(
            trainer.model.backbone.eval()(x.contiguous(memory_format=torch.channels_last)),
            original(x),
            rtol=1e-3,
            atol=1e-4,
        )


def _part(state: dict, prefix: str) -> dict:
    return {k: v for k, v in state.items() if k.startswith(prefix)}


@pytest.mark.parametrize("method", METHODS)
def test_init_heads_from_takes_the_heads_of_one_checkpoint_and_the_encoder_of_another(
    image_folder, tmp_path, method
):
    encoder_src = init_checkpoint(image_folder, tmp_path / "a", method=method, seed=1)
    heads_src = init_checkpoint(image_folder, tmp_path / "b", method=method, seed=2)
    a, b = ckpt_io.load(encoder_src)["model"], ckpt_io.load(heads_src)["model"]
    cfg = small_config(
        image_folder,
        tmp_path / "run",
        method=method,
        init_from=str(encoder_src),
        init_heads_from=str(heads_src),
        precision="fp32",
    )
    trainer = Trainer(cfg)
    ours = trainer.model.state_dict()
    heads = [k for k in ours if not k.startswith(("backbone.", "teacher_backbone."))]
    assert heads and any(k.startswith("projector.") for k in heads)
    if method == "byol":  # the predictor and the teacher's projector come with the heads
        assert any(k.startswith("predictor.") for k in heads)
        assert any(k.startswith("teacher_projector.") for k in heads)
    for k in heads:
        torch.testing.assert_close(ours[k], b[k], msg=k)
    differs = [k for k in heads if ours[k].is_floating_point() and not torch.equal(a[k], b[k])]
    assert differs  # the two sources' heads differ: the test can tell which one was loaded
    for k, v in _part(ours, "backbone.").items():
        torch.testing.assert_close(v, a[k], msg=k)
    rec = trainer.init_record["heads_from"]
    assert rec["path"] == str(heads_src) and rec["checkpoint_sha256"] == sha256_file(heads_src)
    assert rec["tensors"] == len(heads)


def test_init_heads_from_refuses_other_methods_other_sizes_and_a_missing_init_from(
    image_folder, tmp_path
):
    bt = init_checkpoint(image_folder, tmp_path / "bt", method="barlow_twins")
    simsiam = init_checkpoint(image_folder, tmp_path / "ss", method="simsiam")

    def start(out: str, heads: Path, **overrides) -> None:
        cfg = small_config(
            image_folder,
            tmp_path / out,
            method="barlow_twins",
            init_from=str(bt),
            init_heads_from=str(heads),
            **overrides,
        )
        Trainer(cfg)

    with pytest.raises(ValueError, match="a simsiam checkpoint, this run is barlow_twins"):
        start("r1", simsiam)
    with pytest.raises(
        ValueError, match=r"projector\.linear0\.weight is \(128, 512\) there and \(64, 512\)"
    ):
        start("r2", bt, proj_dims=(64, 64, 64))
    with pytest.raises(ValueError, match="init_heads_from needs init_from"):
        small_config(image_folder, tmp_path / "r3", init_heads_from=str(bt)).resolved()
