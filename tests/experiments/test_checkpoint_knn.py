"""benchmarks.experiments.checkpoint_knn: the leave-one-out kNN on the training split, and the script."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

# after the skip: the script imports torch
from benchmarks.experiments import checkpoint_knn  # noqa: E402


def test_leave_one_out_excludes_the_query_itself():
    # class 0: two far-apart points, each next to a pair of class-1 points; with itself counted,
    # each class-0 point would vote for its own label at similarity 1 and win
    feats = torch.tensor(
        [[1.0, 0.0], [0.0, 1.0], [0.99, 0.14], [0.98, 0.2], [0.14, 0.99], [0.2, 0.98]]
    )
    labels = torch.tensor([0, 0, 1, 1, 1, 1])
    acc = checkpoint_knn.leave_one_out_top1(feats, labels, k=2, temperature=0.07, chunk=4)
    assert acc == pytest.approx(4 / 6)  # the class-1 points are right, the class-0 ones wrong


def test_leave_one_out_of_separated_clusters_is_perfect_and_chunking_changes_nothing():
    gen = torch.Generator().manual_seed(0)
    centres = torch.eye(4, 16) * 10
    labels = torch.arange(4).repeat_interleave(25)
    feats = centres[labels] + torch.randn(100, 16, generator=gen)
    assert checkpoint_knn.leave_one_out_top1(feats, labels, 20, 0.07) == 1.0
    noisy = torch.randn(100, 16, generator=gen)
    a = checkpoint_knn.leave_one_out_top1(noisy, labels, 5, 0.07, chunk=7)
    b = checkpoint_knn.leave_one_out_top1(noisy, labels, 5, 0.07, chunk=1024)
    assert a == b and a < 0.6  # random features: near chance


@pytest.mark.slow
def test_the_script_prints_one_line_per_checkpoint(image_folder, tmp_path, capsys):
    from tests.training.test_trainer import init_checkpoint

    ckpt = str(init_checkpoint(image_folder, tmp_path / "run"))
    argv = [ckpt, ckpt, "--data", str(image_folder), "--image-size", "32", "--k", "5"]
    assert checkpoint_knn.main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and lines[0]["train_loo"] == lines[1]["train_loo"]
    assert 0 <= lines[0]["train_loo"] <= 1 and 0 <= lines[0]["held"] <= 1


@pytest.mark.slow
def test_a_package_measures_as_its_checkpoint_and_at_other_input_sizes(
    image_folder, tmp_path, capsys
):
    from tests.training.test_trainer import small_config
    from training.export import export_package
    from training.trainer import Trainer

    # after one step: the graph of an untrained network (BatchNorms at their identity
    # initialisation) keeps no constant bias on its convolutions, which the rebuild needs
    Trainer(
        small_config(image_folder, tmp_path / "run", stop_after_steps=1, precision="fp32")
    ).fit()
    ckpt = tmp_path / "run" / "checkpoint.pt"
    package = tmp_path / "models" / "bt"
    export_package(
        ckpt, package, variants=(), knn=False, data=str(image_folder), parity_images=8,
        threads=1, log=lambda _: None,
    )  # fmt: skip
    common = ["--data", str(image_folder), "--k", "5"]
    assert checkpoint_knn.main([str(ckpt), str(package), *common, "--image-size", "32"]) == 0
    assert checkpoint_knn.main([str(package), *common, "--image-size", "48"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 3
    from_ckpt, from_package, larger = lines
    # the rebuilt encoder is the checkpoint's function (fp32 rounding aside)
    assert abs(from_ckpt["train_loo"] - from_package["train_loo"]) <= 0.02
    assert abs(from_ckpt["held"] - from_package["held"]) <= 0.02
    assert 0 <= larger["train_loo"] <= 1 and 0 <= larger["held"] <= 1
