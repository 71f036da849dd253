"""The training configuration: one dataclass, with per-method defaults from the papers.

Defaults follow the short-budget practice of the lightly CIFAR-10 / Imagenette benchmarks
(SGD, lr 0.06 x batch/128, momentum 0.9, weight decay 5e-4, cosine), which suits the small
batches of a CPU or a single GPU better than the papers' large-batch LARS recipes.
"""

from __future__ import annotations

import hashlib
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

# Per-method head sizes: the CIFAR / small-budget configurations of the reference code.
HEAD_DEFAULTS: dict[str, dict[str, Any]] = {
    "barlow_twins": {"proj_dims": (2048, 2048, 2048)},
    "byol": {"proj_hidden_dim": 4096, "proj_dim": 256, "pred_hidden_dim": 4096},
    "simsiam": {"proj_dim": 2048, "pred_hidden_dim": 512},
}


@dataclass
class TrainConfig:
    method: str = "simsiam"  # barlow_twins | byol | simsiam
    data: str = ""  # class-per-folder DIR (with train/ and val/ or test/), or torchvision:cifar10
    data_root: str = "data"  # where torchvision:cifar10 lives
    download: bool = False  # let torchvision download CIFAR-10 (needs the internet)
    in_memory: bool = False  # decode the dataset once into RAM (small datasets)
    holdout_fraction: float = 0.1  # held out for monitoring when DIR has no val/ or test/
    holdout_from_train: bool = False  # monitor on a holdout of train even when DIR has val/
    backbone: str = "resnet18"
    cifar_stem: bool = False  # 3x3 stride-1 first conv, no max-pool (32x32 images)
    init_from: str | None = None  # start the encoder from a model package or a checkpoint
    init_heads_from: str | None = None  # with init_from: the heads from a checkpoint, not fresh
    zero_init_residual: bool = (
        True  # residual blocks start as identity (official SimSiam/Barlow Twins code)
    )
    image_size: int = 128  # training crop size
    eval_size: int | None = None  # evaluation (and exported) input size (default image_size)
    eval_resize: int | None = (
        None  # shorter side before the centre crop at evaluation (default eval_size)
    )
    crop_scale: tuple[float, float] | None = (
        None  # RandomResizedCrop area range (default: the paper's)
    )
    device_augment: bool = False  # photometric augmentations on the batch, on the device
    epochs: int = 100
    batch_size: int = 128  # global, over all ranks
    optimizer: str = "sgd"  # sgd | lars
    lr: float | None = None  # default: 0.06 x batch_size / 128 (sgd), 0.2 x batch_size / 256 (lars)
    momentum: float = 0.9
    weight_decay: float | None = None  # default: 5e-4 (sgd), 1.5e-6 (lars)
    warmup_epochs: float | None = None  # default: 0 for SimSiam, else min(10, 10% of epochs)
    head_warmup_epochs: float = 0.0  # first epochs train the heads only, the encoder frozen
    lambd: float = 0.0051  # Barlow Twins off-diagonal weight
    tau_base: float = 0.99  # BYOL's initial EMA decay (0.996 for long runs)
    proj_dims: tuple[int, ...] | None = None  # Barlow Twins projector layers
    proj_hidden_dim: int | None = None  # BYOL projector hidden size
    proj_dim: int | None = None  # BYOL/SimSiam projection size
    pred_hidden_dim: int | None = None  # BYOL/SimSiam predictor hidden size
    # auto: bf16 on CUDA where supported (else fp16) and on CPUs with AVX512-BF16 or AMX where a
    # measured convolution step is >= 1.2x faster in bf16; fp32 on other CPUs | bf16 | fp16 | fp32
    precision: str = "auto"
    channels_last: bool = True
    device: str = "auto"  # auto | cpu | cuda
    cpu_allocator: str = "retain"  # retain | system (see training/allocator.py)
    threads: int | None = None  # intra-op threads of the training process (default: all cores)
    workers: int | None = None  # data-loading processes per rank (default: see default_workers)
    eval_every: int = 1  # epochs between kNN evaluations (0: never)
    eval_at_start: bool = False  # also evaluate the random initialisation
    knn_ks: tuple[int, ...] = (20, 200)
    knn_temperature: float = 0.07
    out: str = "runs/run"
    seed: int = 0
    ckpt_every_steps: int = 0  # also checkpoint every N steps (0: at epoch ends only)
    ckpt_every_epochs: int = 1  # checkpoint at the end of every N-th epoch (and of the last)
    stop_after_steps: int | None = None  # stop (with a checkpoint) after N steps, as if interrupted
    log_every: int = 10  # steps between metric lines
    collapse_threshold: float = 0.02  # stop when the embedding spread stays below this (0: off)
    collapse_patience: int = 50  # ... for this many consecutive steps
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every `None` default filled in for this method and optimizer."""
        c = TrainConfig(**asdict(self))
        if c.method not in HEAD_DEFAULTS:
            raise ValueError(
                f"unknown method {c.method!r}: choose one of {', '.join(HEAD_DEFAULTS)}"
            )
        for k, v in HEAD_DEFAULTS[c.method].items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if c.lr is None:
            c.lr = 0.06 * c.batch_size / 128 if c.optimizer == "sgd" else 0.2 * c.batch_size / 256
        if c.weight_decay is None:
            c.weight_decay = 5e-4 if c.optimizer == "sgd" else 1.5e-6
        if c.warmup_epochs is None:
            c.warmup_epochs = 0.0 if c.method == "simsiam" else min(10.0, 0.1 * c.epochs)
        if c.eval_size is None:
            c.eval_size = c.image_size
        if c.eval_resize is None:
            c.eval_resize = c.eval_size
        c.knn_ks = tuple(c.knn_ks)
        if c.cpu_allocator not in ("retain", "system"):
            raise ValueError(f"cpu_allocator must be retain or system, not {c.cpu_allocator!r}")
        if c.crop_scale is not None:
            c.crop_scale = tuple(c.crop_scale)
            if len(c.crop_scale) != 2 or not 0 < c.crop_scale[0] <= c.crop_scale[1] <= 1:
                raise ValueError(
                    f"crop_scale must be MIN MAX with 0 < MIN <= MAX <= 1, not {c.crop_scale}"
                )
        if not 0 <= c.head_warmup_epochs < c.epochs:
            raise ValueError(
                f"head_warmup_epochs must be >= 0 and below epochs ({c.epochs}), "
                f"not {c.head_warmup_epochs}"
            )
        if c.init_heads_from is not None and c.init_from is None:
            raise ValueError(
                "init_heads_from needs init_from: it replaces the fresh heads of a new run "
                "started from an earlier encoder"
            )
        if c.ckpt_every_epochs < 1:
            raise ValueError(f"ckpt_every_epochs must be >= 1, not {c.ckpt_every_epochs}")
        if c.proj_dims is not None:
            c.proj_dims = tuple(c.proj_dims)
        return c

    @staticmethod
    def default_workers(device_type: str, cores: int) -> int:
        """Data-loading workers when --workers is not given.

        On the CPU, workers take cores from the training step, and a worker competing with the
        step's threads slows it several times over (measured on 2 cores: 24 img/s with 0 workers,
        7-9 with 1 or 2), so small machines augment in the training process. A GPU run gives
        the workers the CPU.
        """
        if device_type == "cuda":
            return min(8, cores)
        return max(0, (cores - 2) // 4)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def load_recipe(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """A recipe file's options and its record for the card: `(options, {"path", "sha256"})`.

    A recipe is a TOML file whose keys are `TrainConfig` field names (`image_size = 96`), one
    file per trained model, holding every option of its run. Unknown keys are refused, so that
    a misspelt option cannot silently fall back to its default.

    Example (training/recipes/simsiam-resnet18-imagenette.toml):
        method = "simsiam"
        data = "../shared/datasets/imagenette-160"
        epochs = 100
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        options = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ValueError(f"recipe {path}: not valid TOML: {e}") from e
    known = {f.name for f in fields(TrainConfig)} - {"extra"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(
            f"recipe {path}: unknown option(s) {', '.join(unknown)}; the keys are the training "
            "options with underscores (python -m training.train --help)"
        )
    for key in ("knn_ks", "proj_dims", "crop_scale"):
        if isinstance(options.get(key), list):
            options[key] = tuple(options[key])
    record = {"path": _display_path(path), "sha256": hashlib.sha256(raw).hexdigest()}
    return options, record


def _display_path(path: Path) -> str:
    """The recipe's path relative to the working directory when it lies below it (portable)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
