"""Datasets: any class-per-folder directory, optionally decoded once into memory.

`--data DIR` takes a folder of class folders. If DIR holds `train/` and `val/` (or `test/`),
those are the training and held-out splits; otherwise a stratified fraction of DIR is held out
for monitoring. `torchvision:cifar10` uses torchvision's CIFAR10 (downloaded with --download).
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from embedserve.preprocess import Preprocess, decode, preprocess

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
# ImageNet statistics: the normalization the trainer applies and the exported graph embeds.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


@dataclass
class Samples:
    """Image sources (paths or uint8 HWC arrays) with integer labels."""

    items: Sequence  # paths, or a uint8 NxHxWx3 array / list of HxWx3 arrays
    labels: np.ndarray  # N, int64
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, idx: np.ndarray) -> Samples:
        items = (
            self.items[idx] if isinstance(self.items, np.ndarray) else [self.items[i] for i in idx]
        )
        return Samples(items, self.labels[idx], self.classes)


def scan_folder(root: str | os.PathLike) -> Samples:
    """List the images of a class-per-folder directory; sorted class names give the labels."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root} has no class folders (expected DIR/CLASS/IMAGE files)")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, _, files in os.walk(root / cls):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    if not paths:
        raise ValueError(f"{root} has class folders but no images ({', '.join(IMAGE_EXTENSIONS)})")
    return Samples(paths, np.asarray(labels, dtype=np.int64), classes)


def _decode_rgb(path: str) -> np.ndarray:
    return np.array(decode(path), dtype=np.uint8)


def load_into_memory(
    samples: Samples, workers: int = 4, desc: str = "decoding", progress: bool = True
) -> Samples:
    """Decode every image once (threads: Pillow releases the GIL). Same-sized images are stacked
    into one array, which forked data-loader workers share without copying."""
    if isinstance(samples.items, np.ndarray):
        return samples
    with ThreadPoolExecutor(workers) as pool:
        arrays = list(
            tqdm(
                pool.map(_decode_rgb, samples.items),
                total=len(samples),
                desc=desc,
                unit="img",
                leave=False,
                disable=not progress,
            )
        )
    if len({a.shape for a in arrays}) == 1:
        return Samples(np.stack(arrays), samples.labels, samples.classes)
    return Samples(arrays, samples.labels, samples.classes)


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, held_out): `fraction` of each class held out, chosen by `seed`."""
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_held = int(round(len(idx) * fraction))
        held.append(idx[:n_held])
        train.append(idx[n_held:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def _torchvision_cifar10(root: str, download: bool) -> tuple[Samples, Samples]:
    from torchvision.datasets import CIFAR10

    splits = []
    for train in (True, False):
        ds = CIFAR10(root, train=train, download=download)
        splits.append(
            Samples(np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64), list(ds.classes))
        )
    return splits[0], splits[1]


def load_splits(
    data: str,
    holdout_fraction: float = 0.1,
    seed: int = 0,
    data_root: str = "data",
    download: bool = False,
    holdout_from_train: bool = False,
) -> tuple[Samples, Samples]:
    """(train, held-out) samples for `--data`.

    The held-out split is the dataset's val/ or test/ when it has one; otherwise, or with
    `holdout_from_train` (tuning, which must never see the split reported), a stratified
    `holdout_fraction` of the training split.
    """
    if data == "torchvision:cifar10":
        train, held = _torchvision_cifar10(data_root, download)
    else:
        root = Path(data)
        train = held = None
        for held_name in ("val", "test"):
            if (root / "train").is_dir() and (root / held_name).is_dir():
                train, held = scan_folder(root / "train"), scan_folder(root / held_name)
                break
        if train is None:
            train = scan_folder(root)
    if held is not None and not holdout_from_train:
        return train, held
    train_idx, held_idx = stratified_split(train.labels, holdout_fraction, seed)
    return train.subset(train_idx), train.subset(held_idx)


def _load(item) -> np.ndarray | Image.Image:
    return item if isinstance(item, np.ndarray) else decode(item)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation: a function of (seed, epoch, index) alone, so the
    views do not depend on the number of workers, nor on where a resumed run restarted."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) & 0x7FFF_FFFF_FFFF


class TwoViewDataset(torch.utils.data.Dataset):
    """Returns (view1, view2) uint8 CHW tensors for a sample; set `epoch` before each epoch."""

    def __init__(self, samples: Samples, transform, seed: int = 0) -> None:
        self.samples, self.transform, self.seed, self.epoch = samples, transform, seed, 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = _load(self.samples.items[i])
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(image).permute(2, 0, 1)  # HWC -> CHW, no copy
        s = sample_seed(self.seed, self.epoch, i)
        torch.manual_seed(s)
        random.seed(s)
        return self.transform(image)


class EvalDataset(torch.utils.data.Dataset):
    """Deterministic preprocessing for evaluation: embedserve's, the server's own code."""

    def __init__(self, samples: Samples, pre: Preprocess) -> None:
        self.samples, self.pre = samples, pre

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        arr = preprocess(self.samples.items[i], self.pre)  # HxWx3 uint8
        return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1), int(
            self.samples.labels[i]
        )


class EpochSampler(torch.utils.data.Sampler[int]):
    """A permutation drawn from (seed, epoch), sharded over ranks, that can start mid-epoch.

    Every rank gets `len // world_size // batch * batch` indices (drop_last), so all ranks run
    the same number of steps.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world_size = (
            n,
            batch_size,
            seed,
            rank,
            world_size,
        )
        self.epoch, self.start_step = 0, 0
        self.steps_per_epoch = n // world_size // batch_size
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{n} training images are fewer than one batch of {batch_size} x {world_size} rank(s): "
                "lower --batch-size"
            )

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        per_rank = self.steps_per_epoch * self.batch_size
        mine = perm[self.rank :: self.world_size][:per_rank]
        return iter(mine[self.start_step * self.batch_size :].tolist())

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size
