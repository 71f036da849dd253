"""What a run watches and writes: the embedding spread (a collapse detector), the stopping
rules (a non-finite loss, a collapse) and the metrics log."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F


class TrainingStopped(RuntimeError):
    """Training cannot go on (a non-finite loss or a collapse); the message says what to change."""


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalized embeddings, times sqrt(D) (a 0-d tensor).

    About 1 for embeddings spread over the sphere, 0 for a collapsed encoder. Kept on the
    device: the trainer reads it once per log window, not once per step.
    """
    zn = F.normalize(z.float(), dim=1)
    return zn.std(0).mean() * math.sqrt(z.shape[1])


class MetricsLog:
    """JSON lines, one object per line, appended and flushed (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


class HealthCheck:
    """Stops a run whose loss is not finite, or whose embedding spread stays below `threshold`
    for `patience` consecutive steps (0: no collapse check)."""

    def __init__(self, threshold: float, patience: int) -> None:
        self.threshold, self.patience = threshold, patience
        self.low_spread_steps = 0

    def __call__(self, loss: float, spread: float, where: str, checkpoint: Path) -> None:
        """`where`: the step, epoch and lr, for the message."""
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"loss is {loss} at {where}: training diverged. Lower --lr, add "
                "--warmup-epochs, or use --precision fp32; the last good checkpoint is "
                f"{checkpoint}"
            )
        if self.threshold > 0 and spread < self.threshold:
            self.low_spread_steps += 1
            if self.low_spread_steps >= self.patience:
                raise TrainingStopped(
                    f"representation collapse at {where}: the per-dimension std of normalized "
                    f"embeddings (x sqrt(D)) has been {spread:.4f} < {self.threshold} for "
                    f"{self.low_spread_steps} steps. Check the augmentations, lower --lr or "
                    "raise --weight-decay."
                )
        else:
            self.low_spread_steps = 0


class LogWindow:
    """The steps since the last train line of the log: their losses and embedding spreads
    (0-d device tensors, read once per window, not once per step) and when it began."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.losses: list[torch.Tensor] = []
        self.spreads: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, z: torch.Tensor) -> None:
        self.losses.append(loss)
        self.spreads.append(embedding_spread(z))

    @property
    def steps(self) -> int:
        return len(self.losses)

    def read(self) -> tuple[torch.Tensor, list[float], float]:
        """(the losses as a float CPU tensor, the spreads, the seconds since the start)."""
        losses = torch.stack(self.losses).float().cpu()
        spreads = torch.stack(self.spreads).cpu().tolist()
        return losses, spreads, time.perf_counter() - self.start
