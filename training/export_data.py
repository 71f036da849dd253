"""The images an export measures on: parity images and int8 calibration images (real ones from the
run's data when it can be read here, generated ones otherwise), and the kNN top-1 of every file
when labels are available.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from PIL import Image
from tqdm import tqdm

from embedserve.preprocess import Preprocess, preprocess_batch
from training.config import TrainConfig
from training.data import Samples, load_splits
from training.export_checks import TOLERANCES, ExportRefused
from training.knn import knn_accuracy
from training.parity import run_session
from training.variants import VARIANTS


def generated_images(n: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random colour fields with noise (uint8 NHWC), for when there is no dataset."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, height, width, 3), np.uint8)
    for i in range(n):
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), np.float32)
        out[i] = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
    return out


def evenly(samples: Samples, n: int | None) -> Samples:
    """At most n samples, evenly spaced (the samples are sorted by class: all classes appear)."""
    if n is None or n >= len(samples):
        return samples
    return samples.subset(np.linspace(0, len(samples) - 1, n).round().astype(np.int64))


def split_names(data: str, holdout_fraction: float, seed: int) -> tuple[str, str]:
    """Names of the (bank, query) splits that training.data.load_splits returns for `data`."""
    if data == "torchvision:cifar10":
        return "train", "test"
    root = Path(data)
    for held in ("val", "test"):
        if (root / "train").is_dir() and (root / held).is_dir():
            return "train", held
    return (
        f"all but {holdout_fraction:g} of each class",
        f"held-out {holdout_fraction:g} of each class (seed {seed})",
    )


def dataset_name(data: str) -> str:
    return "cifar10" if data == "torchvision:cifar10" else (Path(data).resolve().name or data)


@dataclass
class Labelled:
    """The labelled splits used for parity images, calibration and kNN."""

    data: str
    train: Samples
    held: Samples
    bank_split: str
    query_split: str


def load_labelled(data: str, cfg: TrainConfig) -> Labelled:
    train, held = load_splits(data, cfg.holdout_fraction, cfg.seed, cfg.data_root, download=False)
    bank_split, query_split = split_names(data, cfg.holdout_fraction, cfg.seed)
    return Labelled(data, train, held, bank_split, query_split)


@dataclass
class CheckImages:
    """Images for the checks: parity against PyTorch, int8 calibration, and (with labels) kNN."""

    parity: np.ndarray  # uint8 NHWC, held-out images
    calibration: np.ndarray  # uint8 NHWC, training images
    source: str  # what they are, for the card
    labelled: Labelled | None  # the splits, when the data could be read


def check_images(
    cfg: TrainConfig,
    pre: Preprocess,
    data: str | None,
    parity_images: int,
    calibration_images: int,
    log: Callable[[str], None],
) -> CheckImages:
    """Real images when `data` (else the run's --data) can be read here, generated ones otherwise."""
    source = data or cfg.data
    try:
        labelled = load_labelled(source, cfg) if source else None
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if data:  # asked for explicitly: an error, not a fallback
            raise
        log(f"the run's data {source!r} cannot be read here ({e}): generated images, no kNN")
        labelled = None
    if labelled is None:
        size = pre.crop_height
        return CheckImages(
            generated_images(parity_images, size, size, seed=1),
            generated_images(calibration_images, size, size, seed=2),
            "generated colour fields (no dataset)",
            None,
        )
    return CheckImages(
        preprocess_batch(list(evenly(labelled.held, parity_images).items), pre),
        preprocess_batch(list(evenly(labelled.train, calibration_images).items), pre),
        f"{dataset_name(source)} {labelled.query_split}, preprocessed by embedserve.preprocess",
        labelled,
    )


def knn_by_file(
    sessions: dict[str, ort.InferenceSession],
    labelled: Labelled,
    pre: Preprocess,
    ks: Sequence[int],
    temperature: float,
    limit: int | None,
    chunk: int = 128,
) -> dict[str, dict[int, float]]:
    """Weighted kNN top-1 (training split as the bank, held-out as queries) of every file; images
    are decoded once and run through every session."""

    def features(samples: Samples, desc: str) -> dict[str, torch.Tensor]:
        feats: dict[str, list[np.ndarray]] = {name: [] for name in sessions}
        for i in tqdm(range(0, len(samples), chunk), desc=desc, unit="chunk", leave=False):
            images = preprocess_batch(list(samples.items[i : i + chunk]), pre)
            for name, session in sessions.items():
                feats[name].append(run_session(session, images))
        return {name: torch.from_numpy(np.concatenate(f)) for name, f in feats.items()}

    bank, queries = evenly(labelled.train, limit), evenly(labelled.held, limit)
    bank_feats, query_feats = features(bank, "kNN bank"), features(queries, "kNN queries")
    bank_labels, query_labels = torch.from_numpy(bank.labels), torch.from_numpy(queries.labels)
    return {
        name: knn_accuracy(
            query_feats[name], query_labels, bank_feats[name], bank_labels, tuple(ks), temperature
        )
        for name in sessions
    }


def knn_section(
    sessions: dict[str, ort.InferenceSession],
    labelled: Labelled,
    cfg: TrainConfig,
    pre: Preprocess,
    limit: int | None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """The card's kNN metrics of model.onnx and each variant's difference to them; raise
    ExportRefused when a variant loses more than its tolerance allows."""
    top1 = knn_by_file(sessions, labelled, pre, cfg.knn_ks, cfg.knn_temperature, limit)
    limited = f", at most {limit} images per split" if limit else ""
    metrics = [
        {
            "k": k,
            "temperature": cfg.knn_temperature,
            "top1": round(acc, 4),
            "dataset": dataset_name(labelled.data),
            "split": labelled.query_split,
            "bank_split": labelled.bank_split,
            "source": f"measured on model.onnx (ONNX Runtime CPU) at export{limited}",
        }
        for k, acc in top1["fp32"].items()
    ]
    diffs = {}
    for variant in (v for v in sessions if v != "fp32"):
        diff = {k: top1[variant][k] - top1["fp32"][k] for k in cfg.knn_ks}
        diffs[variant] = {str(k): round(d, 4) for k, d in diff.items()}
        drop, allowed = -min(diff.values()), TOLERANCES[variant].max_knn_drop
        if allowed is not None and drop > allowed:
            raise ExportRefused(
                f"{VARIANTS[variant][0]} loses {drop:.4f} kNN top-1 against model.onnx "
                f"(needs <= {allowed}): {diffs[variant]}"
            )
    return metrics, diffs
