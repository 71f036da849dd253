"""Weight averaging of encoders: `python -m benchmarks.experiments.average OUT CKPT CKPT [...]
--data DIR`. An experiment: no shipped model is an average.

Averages the encoder weights of several training checkpoints of one network (a run's last
epochs, or restarts from the same package: stochastic weight averaging, Izmailov et al. 2018;
"model soups", Wortsman et al. 2022) into an encoder-only checkpoint that `training.export
--checkpoint` and `--init-from` take like any other. Averaging only makes sense for encoders
that share an ancestor close by (the same run, or runs started from the same weights): two
independently trained networks are not aligned unit for unit.

An average of BatchNorm running statistics is not the statistics of the averaged network, so
they are measured again (`torch.optim.swa_utils.update_bn`): the network runs in training mode,
without gradients, over `--bn-images` training images spread over the classes, two augmented
views each as in training, and each BatchNorm keeps the mean and variance over all of them.
`--bn-images 0` keeps the weighted average of the statistics instead.

The output records its sources (path, sha256, epochs, weight) and the command in
`averaged_from`; the exported card keeps it under `training.averaged_from`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from embedserve.package import lineage_epochs, sha256_file
from training import checkpoint
from training.augment import TwoViews
from training.backbones import create_backbone
from training.config import TrainConfig
from training.data import TwoViewDataset, load_splits
from training.models import Normalize


def average_states(
    states: list[dict[str, torch.Tensor]], weights: list[float] | None = None
) -> dict[str, torch.Tensor]:
    """The weighted average of state dicts with the same keys and shapes (weights sum to 1).

    Floating-point tensors (fp16 encoder-only copies too) are averaged in fp32; integer ones
    (BatchNorm's num_batches_tracked) are taken from the first state.
    """
    if not states:
        raise ValueError("nothing to average: give at least one checkpoint")
    weights = [1.0 / len(states)] * len(states) if weights is None else list(weights)
    if len(weights) != len(states):
        raise ValueError(f"{len(weights)} weights for {len(states)} checkpoints")
    if any(w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise ValueError(f"the weights must be >= 0 and sum to 1, not {weights}")
    first = states[0]
    for i, s in enumerate(states[1:], 2):
        if s.keys() != first.keys():
            diff = sorted(s.keys() ^ first.keys())
            raise ValueError(f"checkpoint {i} has other tensors than the first: {diff[:4]}")
        for k, v in s.items():
            if v.shape != first[k].shape:
                raise ValueError(
                    f"checkpoint {i}: {k} is {tuple(v.shape)}, {tuple(first[k].shape)} in the first"
                )
    out = {}
    for k, v in first.items():
        if v.is_floating_point():
            out[k] = sum(w * s[k].float() for w, s in zip(weights, states, strict=True))
        else:
            out[k] = v.clone()
    return out


class _Views(torch.utils.data.Dataset):
    """Both augmented views of each sample, as separate items, normalized for the network."""

    def __init__(self, pairs: TwoViewDataset, normalize: nn.Module) -> None:
        self.pairs, self.normalize = pairs, normalize

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def __getitem__(self, i: int) -> torch.Tensor:
        view = self.pairs[i // 2][i % 2]
        return self.normalize(view.unsqueeze(0))[0]


def recalibrate_batchnorm(
    backbone: nn.Module, cfg: TrainConfig, images: int, batch_size: int = 64
) -> dict[str, Any]:
    """Measure every BatchNorm's running statistics anew over training views (see the module)."""
    train, _ = load_splits(
        cfg.data, cfg.holdout_fraction, cfg.seed, cfg.data_root, False, cfg.holdout_from_train
    )
    picks = np.unique(np.linspace(0, len(train) - 1, min(len(train), images)).astype(int))
    pairs = TwoViewDataset(
        train.subset(picks), TwoViews(cfg.method, cfg.image_size, cfg.crop_scale), cfg.seed
    )
    loader = torch.utils.data.DataLoader(
        _Views(pairs, Normalize()), batch_size=batch_size, shuffle=False
    )
    update_bn(loader, backbone)
    return {"images": len(picks), "views": 2 * len(picks), "data": cfg.data}


def average_checkpoints(
    paths: list[str | Path],
    weights: list[float] | None = None,
    bn_images: int = 1024,
    data: str | None = None,
) -> dict[str, Any]:
    """An encoder-only checkpoint of the average of `paths` (the last one gives the config)."""
    loaded = [checkpoint.load(p) for p in paths]
    states = []
    for p, st in zip(paths, loaded, strict=True):
        weights_ = checkpoint.backbone_state(st)
        if not weights_:
            raise ValueError(f"{p}: the checkpoint's model has no backbone.* weights")
        states.append(weights_)
    methods = {st.get("config", {}).get("method") for st in loaded}
    if len(methods) != 1:
        raise ValueError(
            f"the checkpoints come from different methods: {sorted(map(str, methods))}"
        )
    weights = [1.0 / len(paths)] * len(paths) if weights is None else weights
    averaged = average_states(states, weights)
    main = loaded[-1]
    cfg = TrainConfig.from_dict(main["config"]).resolved()
    if data is not None:
        cfg.data = data
    backbone, _ = create_backbone(cfg.backbone, cifar_stem=cfg.cifar_stem)
    backbone.load_state_dict(averaged)
    bn: dict[str, Any] = {"recalibrated": False}
    if bn_images > 0 and any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in backbone.modules()
    ):
        bn = {"recalibrated": True, **recalibrate_batchnorm(backbone, cfg, bn_images)}
    state = checkpoint.encoder_only(
        {**main, "model": {"backbone." + k: v for k, v in backbone.state_dict().items()}}
    )
    state["averaged_from"] = {
        "sources": [
            {
                "path": str(p),
                "sha256": sha256_file(p),
                "epochs": st.get("epoch"),
                "total_epochs": int(st.get("epoch") or 0) + lineage_epochs(st.get("init_from")),
                "weight": round(float(w), 6),
            }
            for p, st, w in zip(paths, loaded, weights, strict=True)
        ],
        "batchnorm": bn,
    }
    return state


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.experiments.average",
        description="Average the encoders of several checkpoints of one network into an "
        "encoder-only checkpoint (for training.export or --init-from); BatchNorm statistics "
        "are measured again on training views.",
    )
    p.add_argument("out", help="where to write the averaged encoder-only checkpoint")
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="training or encoder-only checkpoints; the last "
        "one's configuration and records go with the average",
    )
    p.add_argument(
        "--weights",
        type=float,
        nargs="+",
        help="one weight per checkpoint, summing to 1 (default: equal)",
    )
    p.add_argument(
        "--bn-images",
        type=int,
        default=1024,
        help="training images (two views each) "
        "for the BatchNorm statistics (0: average the statistics instead)",
    )
    p.add_argument(
        "--data",
        help="the training data for the BatchNorm statistics (default: the "
        "last checkpoint's --data)",
    )
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if len(args.checkpoints) < 2:
        print("error: give at least two checkpoints to average", file=sys.stderr)
        return 2
    if args.bn_images < 0:
        print(f"error: --bn-images must be >= 0, not {args.bn_images}", file=sys.stderr)
        return 2
    try:
        state = average_checkpoints(args.checkpoints, args.weights, args.bn_images, args.data)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state["averaged_from"]["command"] = shlex.join(
        [
            "python",
            "-m",
            "benchmarks.experiments.average",
            *(argv if argv is not None else sys.argv[1:]),
        ]
    )
    checkpoint.save_atomic(state, args.out)
    sources = ", ".join(
        f"{s['path']} (epoch {s['epochs']}, weight {s['weight']:.3g})"
        for s in state["averaged_from"]["sources"]
    )
    print(
        f"wrote {args.out}: the average of {sources}; BatchNorm {state['averaged_from']['batchnorm']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
