"""kNN top-1 of checkpoints' encoders, on the training split alone and on the held-out split.

    python -m benchmarks.experiments.checkpoint_knn runs/A/checkpoint.pt runs/B/enc.pt [...] \
        --data ../shared/datasets/imagenette-160 [--image-size 128] [--precision fp32]

For choosing between encoders (training checkpoints, encoder-only copies, `benchmarks.experiments.average`
outputs) without looking at the split that is reported: `train_loo` is the leave-one-out
weighted kNN over the training split (each training image queries all the others; 9,469
queries on Imagenette, a standard error of about 0.45 point), `held` the usual monitor
(training split as the gallery, val as the queries), printed for the record. Features are the
backbone's in eval mode, preprocessed as the server does (resize, centre crop). One JSON line
per checkpoint.

A model package directory (`models/NAME`) is taken too: its encoder is rebuilt from the folded
graph as `--init-from` does (exact in eval mode), so that it can be measured at other input
sizes than its graph's, e.g. for the train/test resolution discrepancy (FixRes, Touvron et al.
2019): `--image-size 160` feeds Imagenette's 160 px images whole.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from embedserve.package import card_preprocess
from embedserve.preprocess import Preprocess
from training import checkpoint, warmstart
from training.backbones import create_backbone
from training.config import TrainConfig
from training.data import EvalDataset, Samples, load_splits
from training.knn import knn_accuracy
from training.models import Normalize


@torch.no_grad()
def features(backbone, samples: Samples, pre: Preprocess, bf16: bool) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(EvalDataset(samples, pre), batch_size=128)
    normalize, out = Normalize(), []
    for x, _ in loader:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out.append(backbone(normalize(x).contiguous(memory_format=torch.channels_last)).float())
    return torch.cat(out)


@torch.no_grad()
def leave_one_out_top1(
    feats: torch.Tensor, labels: torch.Tensor, k: int, temperature: float, chunk: int = 1024
) -> float:
    """Each row queries all the others (itself excluded): weighted kNN top-1."""
    z = F.normalize(feats.float(), dim=1)
    classes = int(labels.max()) + 1
    correct = 0
    for start in range(0, len(z), chunk):
        q = z[start : start + chunk]
        sim = q @ z.T
        rows = torch.arange(len(q))
        sim[rows, start + rows] = -float("inf")
        top, idx = sim.topk(k, dim=1)
        votes = torch.zeros(len(q), classes).scatter_add_(1, labels[idx], (top / temperature).exp())
        correct += int((votes.argmax(1) == labels[start : start + chunk]).sum())
    return correct / len(z)


def package_backbone(path: str, train: Samples) -> tuple[torch.nn.Module, dict]:
    """The encoder of an exported package, rebuilt in PyTorch (training/warmstart.py); in eval
    mode it computes the graph's function whatever images rebuild the BatchNorms."""
    _, card = warmstart.read_package(path)
    if card.get("backbone") is None:
        raise ValueError(f"{path}: the card names no backbone")
    backbone, _ = create_backbone(card["backbone"])
    ds = EvalDataset(train, card_preprocess(card))
    picks = torch.linspace(0, len(ds) - 1, min(len(ds), 256)).long().tolist()
    images = torch.stack([ds[i][0] for i in picks])
    record = warmstart.init_from_package(backbone, path, images, Normalize(), images[:32])
    return backbone, {"epoch": card.get("training", {}).get("epochs"), "package": record["name"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="training or encoder-only checkpoints, or package directories",
    )
    p.add_argument("--data", required=True, help="class-per-folder directory with train/ and val/")
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--eval-resize", type=int, help="shorter side before the crop (default: size)")
    p.add_argument("--k", type=int, default=20)
    p.add_argument("--temperature", type=float, default=0.07)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, held = load_splits(args.data)
    pre = Preprocess(args.eval_resize or args.image_size, args.image_size, args.image_size)
    train_labels, held_labels = torch.as_tensor(train.labels), torch.as_tensor(held.labels)
    for path in args.checkpoints:
        t0 = time.perf_counter()
        if Path(path).is_dir():
            backbone, state = package_backbone(path, train)
        else:
            state = checkpoint.load(path)
            cfg = TrainConfig.from_dict(state.get("config", {}))
            backbone, _ = create_backbone(cfg.backbone, cifar_stem=cfg.cifar_stem)
            backbone.load_state_dict(checkpoint.backbone_state(state))  # fp16: cast on copy
        backbone = backbone.eval().to(memory_format=torch.channels_last)
        bf16 = args.precision == "bf16"
        bank = features(backbone, train, pre, bf16)
        queries = features(backbone, held, pre, bf16)
        held_acc = knn_accuracy(
            queries, held_labels, bank, train_labels, (args.k,), args.temperature
        )[args.k]
        loo = leave_one_out_top1(bank, train_labels, args.k, args.temperature)
        print(
            json.dumps(
                {
                    "checkpoint": path,
                    "epoch": state.get("epoch"),
                    "train_loo": round(loo, 4),
                    "held": round(held_acc, 4),
                    "k": args.k,
                    "temperature": args.temperature,
                    "precision": args.precision,
                    "seconds": round(time.perf_counter() - t0, 1),
                }
            ),
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
