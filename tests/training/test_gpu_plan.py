"""training/gpu/plan.py: the epochs of a schedule that fits a time budget, from measured runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.gpu import plan  # training/gpu/ has no __init__.py: a namespace package


def write_measurements(folder: Path, epoch_s: list[float], eval_s: float, steps: int = 100):
    for name, epochs in (("device-augment", epoch_s), ("workers", [3 * e for e in epoch_s[:2]])):
        run = folder / name
        run.mkdir(parents=True)
        lines = [
            {"kind": "start", "steps_per_epoch": steps, "train_images": 900, "held_out_images": 100}
        ]
        lines += [{"kind": "epoch", "seconds": s} for s in epochs]
        if name == "device-augment":
            lines.append({"kind": "eval", "eval_seconds": eval_s})
        (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    (folder / "walls").write_text(f"{sum(epoch_s) + eval_s + 30} 50\n")


def test_the_schedule_fits_the_budget_with_its_evaluations(tmp_path):
    # later epochs 2 s for 100 steps -> 1.46 s for 73; evaluation 1 s per 1,000 images -> 13.4 s
    write_measurements(tmp_path, [5.0, 2.0, 2.0], eval_s=1.0)
    epochs, note = plan.plan(tmp_path, {"BUDGET": "470"})
    fixed, epoch_s, eval_s = 40 * 1.3 + 15, 2.0 * 0.73, 13.394
    assert epochs == int((470 - fixed - eval_s) / (epoch_s * 1.05 + eval_s / 20))
    assert fixed + eval_s * (1 + epochs / 20) + epochs * epoch_s <= 470
    assert "3.00x" in note  # the workers' epochs were 3x longer


def test_the_bounds_hold(tmp_path):
    write_measurements(tmp_path, [5.0, 2.0, 2.0], eval_s=1.0)
    assert plan.plan(tmp_path, {"BUDGET": "100000", "MAX_EPOCHS": "300"})[0] == 300
    assert plan.plan(tmp_path, {"BUDGET": "10", "MIN_EPOCHS": "7"})[0] == 7


def test_a_measurement_without_epochs_is_an_error(tmp_path):
    write_measurements(tmp_path, [], eval_s=1.0)
    with pytest.raises(SystemExit, match="no epoch"):
        plan.plan(tmp_path, {})
