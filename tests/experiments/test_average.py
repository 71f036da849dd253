"""benchmarks.experiments.average: weighted averages of encoders, BatchNorm statistics
measured again."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from benchmarks.experiments.average import _Views, average_checkpoints, average_states, main
from embedserve.package import sha256_file
from tests.training.test_trainer import init_checkpoint
from training import checkpoint as ckpt_io
from training.augment import TwoViews
from training.card import training_record
from training.config import TrainConfig
from training.data import TwoViewDataset, load_splits
from training.models import Normalize


@pytest.fixture(scope="module")
def two(image_folder, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("avg")
    return (
        init_checkpoint(image_folder, root / "a", method="barlow_twins", seed=1),
        init_checkpoint(image_folder, root / "b", method="barlow_twins", seed=2),
    )


def test_average_states_weights_each_tensor_and_refuses_mismatches():
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(7)}
    out = average_states([a, b], [0.25, 0.75])
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 1.0]))
    assert int(out["n"]) == 3  # integer buffers: the first state's
    torch.testing.assert_close(average_states([a, b])["w"], torch.tensor([1.0, 2.0]))
    half = {"w": torch.tensor([2.0, 0.0]).half(), "n": torch.tensor(7)}
    assert average_states([a, half])["w"].dtype == torch.float32
    with pytest.raises(ValueError, match="sum to 1"):
        average_states([a, b], [0.5, 0.6])
    with pytest.raises(ValueError, match="2 weights for 1"):
        average_states([a], [0.5, 0.5])
    with pytest.raises(ValueError, match="other tensors than the first"):
        average_states([a, {"w": b["w"]}])
    with pytest.raises(ValueError, match=r"w is \(3,\), \(2,\) in the first"):
        average_states([a, {"w": torch.zeros(3), "n": b["n"]}])


def test_the_average_has_the_mean_weights_and_batchnorm_statistics_of_its_own(two, image_folder):
    a, b = (ckpt_io.backbone_state(ckpt_io.load(p)) for p in two)
    state = average_checkpoints(list(two), bn_images=32)
    enc = ckpt_io.backbone_state(state)
    torch.testing.assert_close(enc["conv1.weight"], (a["conv1.weight"] + b["conv1.weight"]) / 2)
    assert state["encoder_only"] and state["averaged_from"]["batchnorm"]["views"] == 64
    sources = state["averaged_from"]["sources"]
    assert [s["sha256"] for s in sources] == [sha256_file(p) for p in two]
    assert [s["weight"] for s in sources] == [0.5, 0.5]

    # bn1's running mean is the mean of conv1's output over the 64 calibration views (one batch)
    cfg = TrainConfig.from_dict(ckpt_io.load(two[1])["config"]).resolved()
    train, _ = load_splits(cfg.data, cfg.holdout_fraction, cfg.seed)
    picks = torch.linspace(0, len(train) - 1, 32).long().numpy()
    views = _Views(
        TwoViewDataset(
            train.subset(picks), TwoViews(cfg.method, cfg.image_size, cfg.crop_scale), cfg.seed
        ),
        Normalize(),
    )
    x = torch.stack([views[i] for i in range(len(views))])
    conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    conv1.weight.data = enc["conv1.weight"]
    with torch.no_grad():
        y = conv1(x)
    torch.testing.assert_close(enc["bn1.running_mean"], y.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    averaged_stats = (a["bn1.running_mean"] + b["bn1.running_mean"]) / 2
    assert not torch.allclose(enc["bn1.running_mean"], averaged_stats, atol=1e-3)

    # --bn-images 0: the weighted average of the statistics
    plain = ckpt_io.backbone_state(average_checkpoints(list(two), [0.25, 0.75], bn_images=0))
    torch.testing.assert_close(
        plain["bn1.running_var"], 0.25 * a["bn1.running_var"] + 0.75 * b["bn1.running_var"]
    )


def test_the_command_writes_a_checkpoint_that_export_records(two, image_folder, tmp_path, capsys):
    out = tmp_path / "avg.pt"
    assert main([str(out), *map(str, two), "--weights", "0.4", "0.6", "--bn-images", "8"]) == 0
    assert "wrote" in capsys.readouterr().out
    ck = ckpt_io.load(out)
    assert ck["averaged_from"]["command"].startswith("python -m benchmarks.experiments.average ")
    cfg = TrainConfig.from_dict(ck["config"]).resolved()
    record = training_record(ck, cfg, out)
    assert [s["weight"] for s in record["averaged_from"]["sources"]] == [0.4, 0.6]
    assert record["averaged_from"]["batchnorm"] == {
        "recalibrated": True,
        "images": 8,
        "views": 16,
        "data": str(image_folder),
    }


def test_the_command_refuses_one_checkpoint_other_methods_and_bad_weights(
    two, image_folder, tmp_path, capsys
):
    out = tmp_path / "avg.pt"
    assert main([str(out), str(two[0])]) == 2
    assert "at least two" in capsys.readouterr().err
    simsiam = init_checkpoint(image_folder, tmp_path / "ss", method="simsiam")
    assert main([str(out), str(two[0]), str(simsiam), "--bn-images", "0"]) == 2
    assert "different methods" in capsys.readouterr().err
    assert main([str(out), *map(str, two), "--weights", "1", "1"]) == 2
    assert "sum to 1" in capsys.readouterr().err
    assert main([str(out), str(two[0]), str(tmp_path / "none.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not out.exists()
