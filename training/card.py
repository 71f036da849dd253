"""card.json of a package (see embedserve/card.schema.json): the model's description, the checks'
numbers, and the training record read from the checkpoint and the run's metrics.jsonl (the
command, an equivalent command rebuilt from the configuration, the lineage as references).
"""

from __future__ import annotations

import json
import platform
import shlex
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torchvision

from embedserve import package as pkg
from embedserve.preprocess import Preprocess
from training.config import TrainConfig
from training.data import MEAN, STD
from training.export_data import dataset_name, split_names
from training.lineage import reference
from training.variants import VARIANTS


def build_card(
    name: str,
    cfg: TrainConfig,
    ck: dict[str, Any],
    checkpoint: Path,
    pre: Preprocess,
    embedding_dim: int,
    folder: Path,
    opset: int,
    checks: dict[str, dict[str, Any]],
    conversions: dict[str, dict[str, Any]],
    knn_metrics: list[dict[str, Any]],
    knn_diffs: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """card.json of the files in `folder` (see embedserve/card.schema.json)."""
    onnx_model = onnx.load(str(folder / pkg.MODEL_FILE), load_external_data=False)
    return {
        "format_version": 1,
        "name": name,
        "method": cfg.method,
        "backbone": cfg.backbone,
        "dataset": {"name": dataset_name(cfg.data) if cfg.data else "unknown", "source": cfg.data},
        "embedding_dim": int(embedding_dim),
        "input": {
            "name": pkg.INPUT_NAME,
            "height": pre.crop_height,
            "width": pre.crop_width,
            "channels": 3,
            "layout": "NHWC",
            "dtype": "uint8",
            "color": "RGB",
        },
        "output": {"name": pkg.OUTPUT_NAME, "dtype": "float32", "l2_normalized": True},
        "preprocess": {
            "resize": pre.resize,
            "crop": {"height": pre.crop_height, "width": pre.crop_width},
            "interpolation": pre.interpolation,
        },
        "normalization": {"mean": list(MEAN), "std": list(STD), "in_graph": True},
        "sha256": pkg.sha256_file(folder / pkg.MODEL_FILE),
        "parity": checks["fp32"],
        "metrics": {"knn": knn_metrics},
        "training": training_record(ck, cfg, checkpoint),
        "onnx": {
            "opset": opset,
            "producer": f"{onnx_model.producer_name} {onnx_model.producer_version}",
            "exporter": "torch.onnx.export (TorchScript exporter, dynamo=False)",
            "versions": versions(),
        },
        "created": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        "variants": {
            v: {
                "file": VARIANTS[v][0],
                "sha256": pkg.sha256_file(folder / VARIANTS[v][0]),
                "precision": VARIANTS[v][2],
                "target": VARIANTS[v][1],
                "parity": checks[v],
                **({"knn_top1_diff": knn_diffs[v]} if v in knn_diffs else {}),
                "conversion": conversions[v],
            }
            for v in conversions
        },
    }


def training_record(ck: dict[str, Any], cfg: TrainConfig, checkpoint: Path) -> dict[str, Any]:
    """The card's `training` section: whatever the checkpoint (and the run's log) records."""
    start = run_start(read_metrics(checkpoint.parent))
    epoch_times = [float(t) for t in ck.get("epoch_times", [])]
    command = (
        ck.get("command")
        or ck.get("config", {}).get("extra", {}).get("command")
        or start.get("command")
    )
    return {
        "hyperparameters": json.loads(json.dumps(asdict(cfg))),
        "epochs": int(ck.get("epoch", 0)),
        "epochs_planned": cfg.epochs,
        "steps": int(ck.get("step", 0)),
        "batch_size": cfg.batch_size,
        "duration_seconds": round(sum(epoch_times), 2) if epoch_times else None,
        "epoch_seconds": epoch_times,
        "device": ck.get("device") or start.get("device"),
        "world_size": start.get("world_size"),
        "command": " ".join(command) if isinstance(command, list) else command,
        "equivalent_command": equivalent_command(asdict(cfg)),
        # training/recipes/*.toml: the file that holds every option of the run (path, sha256)
        "recipe": cfg.extra.get("recipe"),
        **reproduction(cfg.extra.get("recipe"), ck.get("init_from")),
        "best_knn_during_training": ck.get("best_knn", {}),
        "torch_version": ck.get("torch_version"),
        "checkpoint": {"path": str(checkpoint), "sha256": pkg.sha256_file(checkpoint)},
        # where the encoder came from, as a reference (training/lineage.py), not a copy
        "init_from": reference(ck.get("init_from")),
        "total_epochs": int(ck.get("epoch", 0)) + pkg.lineage_epochs(ck.get("init_from")),
        # benchmarks.experiments.average: the encoder averages these checkpoints' encoders
        **({"averaged_from": ck["averaged_from"]} if ck.get("averaged_from") else {}),
    }


def reproduction(recipe: dict | None, init_from: dict | None) -> dict[str, str]:
    """A card's `reproduction` where no recipe reproduces the model: a run continuing another
    encoder (--init-from) reruns only as the whole chain of its stages."""
    if recipe or not init_from:
        return {}
    return {
        "reproduction": "no single recipe reproduces this model: it continues the encoder in "
        "init_from (a chain of schedules), each stage recorded in that source's own card"
    }


def equivalent_command(config: dict[str, Any]) -> str:
    """A `python -m training.train` command with this configuration, rebuilt from the checkpoint:
    the flags whose values differ from what the command line would default to (values that
    follow from the method, batch size, optimizer, epochs and image size are left out)."""
    primary = ("method", "batch_size", "optimizer", "epochs", "image_size", "eval_size")
    plain = asdict(TrainConfig())
    derived = asdict(TrainConfig(**{k: config[k] for k in primary if k in config}).resolved())
    parts = ["python", "-m", "training.train"]
    for f in fields(TrainConfig):
        if f.name in ("extra", "progress") or f.name not in config:
            continue
        value, default = config[f.name], (plain if f.name in primary else derived)[f.name]
        if isinstance(value, (list, tuple)) and isinstance(default, (list, tuple)):
            value, default = list(value), list(default)
        if value == default or value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + f.name.replace("_", "-"))
        elif isinstance(value, (list, tuple)):  # crop_scale is a tuple with no tuple default
            parts += [flag, *map(str, value)]
        else:
            parts += [flag, str(value)]
    return shlex.join(parts)


def knn_from_run(
    ck: dict[str, Any], cfg: TrainConfig, checkpoint: Path, dataset: str
) -> list[dict[str, Any]]:
    """kNN numbers of the training run when none were measured here: the evaluation logged in the
    run's metrics.jsonl at the checkpoint's step, i.e. of these weights (else none)."""
    bank_split, query_split = split_names(cfg.data, cfg.holdout_fraction, cfg.seed)
    common = {
        "temperature": cfg.knn_temperature,
        "dataset": dataset,
        "split": query_split,
        "bank_split": bank_split,
    }
    records = read_metrics(checkpoint.parent)
    # the precision "auto" resolved to (logged by runs from 2026-11-23)
    precision = run_start(records).get("precision", cfg.precision)
    for record in reversed(records):
        if record.get("kind") == "eval" and record.get("step") == ck.get("step"):
            return [
                {
                    "k": k,
                    "top1": record[f"knn_top1_k{k}"],
                    **common,
                    "source": f"trainer evaluation at step {ck['step']} (PyTorch, {precision} precision)",
                }
                for k in cfg.knn_ks
                if f"knn_top1_k{k}" in record
            ]
    return []  # best_knn may belong to an earlier epoch: not these weights


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The run's metrics.jsonl records beside the checkpoint (empty when absent)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    return records


def run_start(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The run's start record (its config, device and precision), or {} when there is none."""
    return next((r for r in records if r.get("kind") == "start"), {})


def versions() -> dict[str, str]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
    }


def summary_line(card: dict[str, Any]) -> str:
    parts = [
        f"fp32 min cosine {card['parity']['min_cosine']:.7f} max abs {card['parity']['max_abs_diff']:.2g}"
    ]
    for v, info in card["variants"].items():
        p = info["parity"]
        parts.append(
            f"{v} min cosine {p['min_cosine']:.5f} max abs {p['max_abs_diff']:.2g}"
            + (f" kNN diff {info['knn_top1_diff']}" if "knn_top1_diff" in info else "")
        )
    knn = ", ".join(f"k={m['k']} {m['top1']}" for m in card["metrics"]["knn"])
    return "; ".join(parts) + (f"; kNN top-1 {knn}" if knn else "")
