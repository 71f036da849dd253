"""Start a run from an earlier encoder: a training checkpoint, or an exported model package.

A run's checkpoint holds everything and `--resume` continues it exactly. Where the checkpoint is
gone but the exported package is kept (models/ is committed; runs/ is not), `--init-from
PACKAGE` starts a *new* run, with its own schedule and fresh heads, from the package's encoder.

The exported graph has every BatchNorm folded into the convolution before it
(y = W'x + b', W' = W * g / s, b' = beta - g * mu / s), so the BatchNorm parameters are not in
the file. They are rebuilt so that the network computes exactly the exported function in eval
mode and (nearly) the original one in training mode:

- the convolution gets W' (a scale of W; the BatchNorm after it removes the scale in training);
- the BatchNorm's running mean and variance are the per-channel mean m and variance v of W'x
  over training views; its gamma is sqrt(v + eps) and its beta m + b'.

In eval mode that BatchNorm maps W'x to W'x + b', whatever m and v are. In training mode it maps
W'x to std(W'x) * (W'x - batch mean) / batch std + m + b'; since std(W'x) ~ |g| and m + b' ~ beta,
that is the original layer up to the difference between batch and running statistics.
`init_from_package` checks the rebuilt encoder against ONNX Runtime on the same images and
refuses to train from it if they differ.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from embedserve.package import card_preprocess, lineage_epochs, sha256_file
from training import checkpoint
from training.config import TrainConfig
from training.data import EvalDataset, Samples, TwoViewDataset
from training.lineage import reference
from training.methods import MethodModel
from training.models import Normalize
from training.parity import backbone_min_cosine

PARITY_MIN_COSINE = 0.9999


def _conv_bn_pairs(backbone: nn.Module) -> list[tuple[str, nn.Conv2d, nn.BatchNorm2d]]:
    """Each convolution with the BatchNorm that follows it, in the order they run."""
    pairs: list[tuple[str, nn.Conv2d, nn.BatchNorm2d]] = []
    pending: tuple[str, nn.Conv2d] | None = None
    for name, m in backbone.named_modules():
        if isinstance(m, nn.Conv2d):
            if pending is not None:
                raise ValueError(f"{pending[0]} is not followed by a BatchNorm2d")
            pending = (name, m)
        elif isinstance(m, nn.BatchNorm2d):
            if pending is None:
                raise ValueError(f"BatchNorm2d {name} follows no convolution")
            pairs.append((pending[0], pending[1], m))
            pending = None
    if pending is not None:
        raise ValueError(f"{pending[0]} is not followed by a BatchNorm2d")
    return pairs


def _onnx_convs(model_path: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """(weight, bias) of each Conv node of an exported graph, in graph order."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(model_path)).graph
    init = {t.name: t for t in graph.initializer}
    convs = []
    for node in graph.node:
        if node.op_type != "Conv":
            continue
        if len(node.input) < 3 or node.input[1] not in init or node.input[2] not in init:
            raise ValueError(
                f"{model_path}: Conv node {node.name!r} has no constant weight and bias "
                "(not a graph exported with folded BatchNorms)"
            )
        w = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
        b = numpy_helper.to_array(init[node.input[2]]).astype(np.float32)
        convs.append((w, b))
    return convs


def read_package(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """(model.onnx, card) of a package directory (or of the model.onnx inside one)."""
    path = Path(path)
    pkg = path.parent if path.suffix == ".onnx" else path
    card_path, model = pkg / "card.json", pkg / "model.onnx"
    if not card_path.is_file() or not model.is_file():
        raise FileNotFoundError(f"--init-from {path}: no card.json and model.onnx in {pkg}")
    return model, json.loads(card_path.read_text())


@torch.no_grad()
def init_from_package(
    backbone: nn.Module,
    package: str | Path,
    views: torch.Tensor,
    prepare,
    check_images: torch.Tensor,
) -> dict[str, Any]:
    """Load a package's encoder into `backbone` (a freshly built one of the same architecture).

    `views`: uint8 NCHW training views whose statistics rebuild the BatchNorms; `prepare`
    turns uint8 NCHW into the backbone's input; `check_images`: uint8 NCHW images on which the
    rebuilt encoder must match ONNX Runtime. Returns the record of where the weights came from.
    """
    model_path, card = read_package(package)
    convs = _onnx_convs(model_path)
    pairs = _conv_bn_pairs(backbone)
    if len(convs) != len(pairs):
        raise ValueError(
            f"--init-from {package}: the graph has {len(convs)} convolutions, the backbone "
            f"{len(pairs)} (card: backbone {card.get('backbone')!r})"
        )
    for (name, conv, bn), (w, b) in zip(pairs, convs, strict=True):
        if tuple(conv.weight.shape) != w.shape:
            raise ValueError(
                f"--init-from {package}: {name} is {tuple(conv.weight.shape)} here and {w.shape} "
                f"in the graph (card: backbone {card.get('backbone')!r})"
            )
        conv.weight.copy_(torch.from_numpy(w))
        # identity BatchNorm plus the folded bias, for measuring W'x in eval mode
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
        bn.weight.fill_(1.0)
        bn.bias.copy_(torch.from_numpy(b))

    sums: dict[nn.BatchNorm2d, list[torch.Tensor]] = {}

    def collect(module, inputs, _output):
        x = inputs[0].float()
        acc = sums.setdefault(module, [torch.zeros(()), 0, 0])
        acc[0] = acc[0] + x.sum(dim=(0, 2, 3))
        acc[1] = acc[1] + (x * x).sum(dim=(0, 2, 3))
        acc[2] += x.numel() // x.shape[1]

    was_training = backbone.training
    backbone.eval()
    hooks = [bn.register_forward_hook(collect) for _, _, bn in pairs]
    try:
        for i in range(0, len(views), 64):
            backbone(prepare(views[i : i + 64]))
    finally:
        for h in hooks:
            h.remove()
    for _, _, bn in pairs:
        s, ss, n = sums[bn]
        mean = s / n
        var = (ss / n - mean * mean).clamp_min(0.0)
        bn.running_mean.copy_(mean)
        bn.running_var.copy_(var)
        bn.weight.copy_(torch.sqrt(var + bn.eps))
        bn.bias.add_(mean)

    cosine = backbone_min_cosine(backbone, model_path, check_images)
    backbone.train(was_training)
    if cosine < PARITY_MIN_COSINE:
        raise ValueError(
            f"--init-from {package}: the rebuilt encoder differs from model.onnx "
            f"(min cosine {cosine:.6f} < {PARITY_MIN_COSINE}); not a graph of this backbone?"
        )
    training = card.get("training", {})
    epochs, total = training.get("epochs"), training.get("total_epochs")
    if total is None:  # a card from before total_epochs
        total = int(epochs or 0) + lineage_epochs(training.get("init_from"))
    return {
        "kind": "package",
        "path": str(package),
        "name": card.get("name"),
        "model_sha256": sha256_file(model_path),
        "method": card.get("method"),
        "epochs": epochs,
        # a reference: the package's own lineage stays in its card (training/lineage.py)
        "total_epochs": int(total),
        "command": training.get("command"),
        "metrics": card.get("metrics"),
        "parity_min_cosine": cosine,
        "batchnorm_statistics_images": int(len(views)),
    }


def init_from_checkpoint(backbone: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load the backbone of a training checkpoint (heads, optimizer and schedule start afresh)."""
    state = checkpoint.load(path)
    weights = checkpoint.backbone_state(state)
    if not weights:
        raise ValueError(f"--init-from {path}: the checkpoint's model has no backbone.* weights")
    backbone.load_state_dict(weights)
    cfg = state.get("config", {})
    return {
        "kind": "checkpoint",
        "path": str(path),
        "checkpoint_sha256": sha256_file(path),
        "method": cfg.get("method"),
        "epochs": state.get("epoch"),
        "total_epochs": int(state.get("epoch") or 0) + lineage_epochs(state.get("init_from")),
        "command": cfg.get("extra", {}).get("command"),
        "init_from": reference(state.get("init_from")),
        **({"encoder_only": state["encoder_only"]} if state.get("encoder_only") else {}),
    }


def _is_encoder(key: str) -> bool:
    return key.startswith(checkpoint.BACKBONE) or key.startswith("teacher_" + checkpoint.BACKBONE)


def init_heads_from_checkpoint(model: nn.Module, path: str | Path, method: str) -> dict[str, Any]:
    """Load the heads (every weight outside the encoder) of a training checkpoint into `model`.

    A restart from an exported package otherwise begins with random heads, and the first
    gradients through them move the encoder away from where it was. Heads trained with a
    nearby encoder (an earlier restart from the same package, say) start close to adapted. The
    checkpoint must be of the same method, with heads of the same sizes.
    """
    state = checkpoint.load(path)
    theirs = state.get("config", {}).get("method")
    if theirs != method:
        raise ValueError(f"--init-heads-from {path}: a {theirs} checkpoint, this run is {method}")
    heads = {k: v for k, v in state["model"].items() if not _is_encoder(k)}
    ours = {k: v for k, v in model.state_dict().items() if not _is_encoder(k)}
    if not heads:
        raise ValueError(f"--init-heads-from {path}: the checkpoint has no head weights")
    if heads.keys() != ours.keys():
        missing, extra = sorted(ours.keys() - heads.keys()), sorted(heads.keys() - ours.keys())
        raise ValueError(
            f"--init-heads-from {path}: the heads differ; missing {missing[:4]}, "
            f"unexpected {extra[:4]}"
        )
    for k, v in heads.items():
        if v.shape != ours[k].shape:
            raise ValueError(
                f"--init-heads-from {path}: {k} is {tuple(v.shape)} there and "
                f"{tuple(ours[k].shape)} here (check --proj-dims and the other head sizes)"
            )
    model.load_state_dict(heads, strict=False)  # BYOL: the teacher's projector comes too
    return {
        "path": str(path),
        "checkpoint_sha256": sha256_file(path),
        "epochs": state.get("epoch"),
        "tensors": len(heads),
        "command": state.get("config", {}).get("extra", {}).get("command"),
    }


def warm_start(
    model: MethodModel,
    cfg: TrainConfig,
    dataset: TwoViewDataset,
    photometric: tuple[nn.Module, nn.Module] | None,
    train_samples: Samples,
) -> dict[str, Any]:
    """--init-from (and --init-heads-from) for a freshly built model; the record of the sources.

    `dataset` and `photometric` give the training views whose statistics rebuild a package's
    BatchNorms; `train_samples` the images on which the rebuilt encoder is checked.
    """
    source = cfg.init_from
    if Path(source).is_file() and Path(source).suffix != ".onnx":
        record = init_from_checkpoint(model.backbone, source)
    else:
        views = training_views(dataset, photometric, cfg.seed)
        # the parity images as the package's card preprocesses them: its graph takes its
        # own input size, which need not be this run's --image-size (nor --eval-size)
        check = EvalDataset(train_samples, card_preprocess(read_package(source)[1]))
        check_images = torch.stack([check[i][0] for i in range(min(len(check), 32))])
        record = init_from_package(model.backbone, source, views, Normalize(), check_images)
    model.after_encoder_init()  # BYOL: the teacher starts as a copy of the online network
    tqdm.write(f"initialised the encoder from {source}: {json.dumps(record)[:300]}")
    if cfg.init_heads_from:
        heads = init_heads_from_checkpoint(model, cfg.init_heads_from, cfg.method)
        record = {**record, "heads_from": heads}
        tqdm.write(f"initialised the heads from {cfg.init_heads_from}: {json.dumps(heads)}")
    return record


def training_views(
    dataset: TwoViewDataset, photometric: tuple[nn.Module, nn.Module] | None, seed: int
) -> torch.Tensor:
    """1,024 images spread over the training set (it is ordered by class), 2 views each, with
    the whole augmentation recipe: what the BatchNorm statistics are measured on."""
    picks = np.linspace(0, len(dataset) - 1, min(len(dataset), 1024))
    views = torch.cat([torch.stack(dataset[int(i)]) for i in picks])
    if photometric is not None:  # --device-augment: the rest of each view's recipe
        gen = torch.Generator().manual_seed(seed)
        first, second = (photometric[v](views[v::2], gen) for v in (0, 1))
        views = torch.stack((first, second), 1).flatten(0, 1)
    return views
