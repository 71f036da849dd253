"""Run by `torchrun` from test_distributed.py: one training step's gradients under DDP.

Each rank builds the same model (same seed), wraps it exactly as the trainer does (synchronized
BatchNorm, DDP around the method's trained module, the distributed Barlow Twins loss), computes the loss on its half of a fixed
batch and back-propagates. Rank 0 saves the gradients, which DDP has averaged over the ranks.
"""

import sys

import torch
import torch.distributed as dist

from tests.training.test_distributed import config_for, fixed_batch
from training.distributed import convert_sync_batchnorm, init_from_env
from training.models import build_model, wrap_ddp


def main(method: str, out: str) -> None:
    info = init_from_env(torch.device("cpu"))
    assert info.world_size == 2, "run with torchrun --nproc-per-node 2"
    torch.manual_seed(0)
    model = convert_sync_batchnorm(
        build_model(config_for(method), distributed=True), torch.device("cpu")
    )
    ddp = wrap_ddp(model, torch.device("cpu"))
    x1, x2 = fixed_batch()
    half = x1.shape[0] // 2
    x1, x2 = (
        x1[info.rank * half : (info.rank + 1) * half],
        x2[info.rank * half : (info.rank + 1) * half],
    )
    loss, _ = ddp(*model.step_inputs(x1, x2))  # BYOL: the teacher's targets, outside DDP
    loss.backward()
    if info.rank == 0:
        torch.save(
            {
                "loss": loss.detach(),
                "grads": {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
            },
            out,
        )
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
