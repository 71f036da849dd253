"""The epochs of one schedule that ends within BUDGET seconds, from measure.sh's runs.

    python training/gpu/plan.py /tmp/gpu-plan      # prints EPOCHS=N (and how it got there)

Environment: BUDGET (seconds for the whole training process, default 470), MIN_EPOCHS (10),
MAX_EPOCHS (400), EVAL_EVERY (20), FULL_STEPS (steps per epoch of the real run: 73 for
Imagenette train at batch 128, the recipes' batch), FULL_EVAL_IMAGES (bank + queries of its
evaluations: 13,394).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from pathlib import Path


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plan(folder: Path, env: dict[str, str]) -> tuple[int, str]:
    budget = float(env.get("BUDGET", 470))
    full_steps = int(env.get("FULL_STEPS", 73))
    full_eval = int(env.get("FULL_EVAL_IMAGES", 9469 + 3925))
    eval_every = int(env.get("EVAL_EVERY", 20))
    a = records(folder / "device-augment" / "metrics.jsonl")
    b = records(folder / "workers" / "metrics.jsonl")
    wall_a, wall_b = (float(x) for x in (folder / "walls").read_text().split())
    start = next(r for r in a if r["kind"] == "start")
    epochs_a = [r["seconds"] for r in a if r["kind"] == "epoch"]
    epochs_b = [r["seconds"] for r in b if r["kind"] == "epoch"]
    evals = [r for r in a if r["kind"] == "eval"]
    if not epochs_a:
        raise SystemExit("error: the --device-augment measurement finished no epoch")
    images = start["train_images"] + start["held_out_images"]
    eval_s = evals[-1]["eval_seconds"] * full_eval / images if evals else 10.0
    # the first epoch warms up (cuDNN autotuning, worker start): the later ones are the rate
    later_a = statistics.median(epochs_a[1:] or epochs_a)
    epoch_s = later_a * full_steps / start["steps_per_epoch"]
    fixed = max(40.0, wall_a - sum(epochs_a) - sum(e["eval_seconds"] for e in evals)) * 1.3 + 15
    epochs = int((budget - fixed - eval_s) / (epoch_s * 1.05 + eval_s / eval_every))
    epochs = max(int(env.get("MIN_EPOCHS", 10)), min(int(env.get("MAX_EPOCHS", 400)), epochs))
    later_b = statistics.median(epochs_b[1:] or epochs_b) if epochs_b else float("nan")
    note = (
        f"# device-augment epochs {epochs_a} s, workers-only {epochs_b} s "
        f"({start['steps_per_epoch']} steps); workers / device-augment {later_b / later_a:.2f}x; "
        f"full epoch {epoch_s:.1f} s, evaluation {eval_s:.1f} s, fixed {fixed:.0f} s, budget {budget:.0f} s "
        f"(walls {wall_a:.0f} s / {wall_b:.0f} s)"
    )
    return epochs, note


if __name__ == "__main__":
    n, why = plan(Path(sys.argv[1]), dict(os.environ))
    print(why)
    print(f"EPOCHS={n}")
