"""Two gloo processes give the gradients of one process on the concatenated batch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.distributed import CPUSyncBatchNorm, convert_sync_batchnorm
from training.methods import METHODS
from training.models import build_model

ROOT = Path(__file__).resolve().parents[2]


def config_for(method: str) -> TrainConfig:
    return TrainConfig(
        method=method,
        backbone="resnet18",
        proj_dims=(64, 64, 64),
        proj_hidden_dim=64,
        proj_dim=32,
        pred_hidden_dim=16,
    ).resolved()


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 3, 32, 32, generator=g), torch.randn(16, 3, 32, 32, generator=g)


def test_cpu_sync_batchnorm_is_plain_batchnorm_in_one_process():
    bn = torch.nn.BatchNorm2d(4)
    converted = convert_sync_batchnorm(torch.nn.Sequential(bn), torch.device("cpu"))
    assert isinstance(converted[0], CPUSyncBatchNorm)
    x = torch.randn(8, 4, 5, 5)
    torch.testing.assert_close(converted[0](x), bn(x))


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_gloo_ranks_match_one_process_on_the_whole_batch(method, tmp_path):
    out = tmp_path / "ddp.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "tests.training.ddp_worker",
        method,
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)

    torch.manual_seed(0)
    model = build_model(config_for(method))
    x1, x2 = fixed_batch()
    loss, _ = model(x1, x2)
    loss.backward()
    single = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    assert ddp["grads"].keys() == single.keys()
    if method == "barlow_twins":  # each rank computes the global batch's loss
        torch.testing.assert_close(ddp["loss"], loss.detach(), rtol=1e-4, atol=1e-4)
    # Per tensor, the relative error of the whole gradient: summation orders differ between one
    # process and two, so single elements may differ by float rounding, never the gradient.
    # A gradient that is zero in theory (a bias followed by BatchNorm) is pure rounding noise in
    # both runs: the floor keeps it from dominating.
    floor = 1e-3 * torch.stack([g.norm() for g in single.values()]).median()
    errors = {
        n: float((ddp["grads"][n] - g).norm() / (g.norm() + floor)) for n, g in single.items()
    }
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-3, f"{worst}: relative gradient error {errors[worst]:.2e}"
    # a plain (non-autograd) reduction or per-rank BatchNorm would be off by far more than that
    assert sum(errors.values()) / len(errors) < 1e-4
