"""benchmarks/checkpoint_knn.py: the leave-one-out kNN on the training split, and the script."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import checkpoint_knn  # noqa: E402


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
    from .training.test_trainer import init_checkpoint

    ckpt = str(init_checkpoint(image_folder, tmp_path / "run"))
    argv = [ckpt, ckpt, "--data", str(image_folder), "--image-size", "32", "--k", "5"]
    assert checkpoint_knn.main(argv) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and lines[0]["train_loo"] == lines[1]["train_loo"]
    assert 0 <= lines[0]["train_loo"] <= 1 and 0 <= lines[0]["held"] <= 1
