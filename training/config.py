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

from training import methods
from training.methods import METHODS


def opt(default: Any, help_text: str, choices: tuple[str, ...] | None = None) -> Any:
    """A TrainConfig field with its command-line help (and choices): written once, here.

    `python -m training.train` builds its flags from these (training/train.py).
    """
    return field(default=default, metadata={"help": help_text, "choices": choices})


@dataclass
class TrainConfig:
    """Every option of a run; each field's help is its `--flag`'s (see `opt`). Head sizes,
    warm-up and augmentations left at None follow the method (its registry entry)."""

    method: str = opt("simsiam", "self-supervised method", choices=METHODS)
    data: str = opt(
        "",
        "class-per-folder image directory (uses its train/ and val/ or test/ when present, "
        "else holds out --holdout-fraction), or torchvision:cifar10",
    )
    data_root: str = opt(
        "data",
        "directory of torchvision's CIFAR-10 (with --data torchvision:cifar10)",
    )
    download: bool = opt(
        False,
        "let torchvision download CIFAR-10 into --data-root (needs the internet)",
    )
    in_memory: bool = opt(
        False,
        "decode every image once into memory (small datasets: ~0.7 GB for Imagenette-160)",
    )
    holdout_fraction: float = opt(
        0.1,
        "fraction of each class held out for monitoring when DIR has no val/ or test/",
    )
    holdout_from_train: bool = opt(
        False,
        "monitor on --holdout-fraction of train/ even when DIR has val/ or test/, which then "
        "stays unseen: tune on this, report on val/test",
    )
    backbone: str = opt(
        "resnet18",
        "torchvision model name (resnet18, resnet50, ...), classifier removed",
    )
    cifar_stem: bool = opt(
        False,
        "ResNet stem for 32x32 images: 3x3 stride-1 first conv and no max-pool",
    )
    init_from: str | None = opt(
        None,
        "start the encoder from an exported model package (models/NAME) or a training "
        "checkpoint: a new run (own schedule, fresh heads) from those weights, recorded in "
        "the card; not --resume, which continues a run exactly",
    )
    init_heads_from: str | None = opt(
        None,
        "with --init-from: start the heads (projector, predictor) from this training "
        "checkpoint of the same method and sizes instead of afresh, so that the encoder is "
        "not trained through random heads at the start (a fresh projector costs a restart "
        "0.3-2 kNN points); the encoder still comes from --init-from",
    )
    zero_init_residual: bool = opt(
        True,
        "start each ResNet residual branch's last BatchNorm at zero (blocks begin as the "
        "identity), as the official SimSiam and Barlow Twins code do",
    )
    image_size: int = opt(
        128,
        "training crop size, in pixels (and the evaluation input size, unless --eval-size)",
    )
    eval_size: int | None = opt(
        None,
        "evaluation input size, in pixels, and so the exported model's (default: "
        "--image-size); training below it (FixRes, Touvron et al. 2019) matches the apparent "
        "object size of random-resized-crop training to whole images at evaluation",
    )
    eval_resize: int | None = opt(
        None,
        "shorter side before the centre crop at evaluation (default: --eval-size)",
    )
    crop_scale: tuple[float, float] | None = opt(
        None,
        "area range MIN MAX of the training crops (RandomResizedCrop; default: the method's "
        "paper: 0.2 1 for simsiam, 0.08 1 for byol and barlow_twins)",
    )
    device_augment: bool = opt(
        False,
        "apply the photometric augmentations (colour jitter, grayscale, blur, solarize) to "
        "whole batches on the training device, each sample with its own parameters; the data "
        "workers only crop and flip. What keeps a GPU fed: per-image colour jitter on the CPU"
        " is the bottleneck there (7 ms per image pair and core against under 1 ms for crop "
        "and flip)",
    )
    epochs: int = opt(100, "number of epochs (the schedule spans all of them)")
    batch_size: int = opt(128, "global batch size, split over the ranks")
    optimizer: str = opt(
        "sgd",
        "sgd (short-budget default) or lars (the papers' large-batch optimizer)",
        choices=("sgd", "lars"),
    )
    lr: float | None = opt(
        None,
        "peak learning rate (default: 0.06 x batch/128 for sgd, 0.2 x batch/256 for lars)",
    )
    momentum: float = opt(0.9, "SGD/LARS momentum")
    weight_decay: float | None = opt(
        None,
        "weight decay, never on biases and norm parameters (default: 5e-4 sgd, 1.5e-6 lars)",
    )
    warmup_epochs: float | None = opt(
        None,
        "linear warm-up before the cosine decay (default: 0 for simsiam, else min(10, 10% of "
        "epochs))",
    )
    head_warmup_epochs: float = opt(
        0.0,
        "train only the heads (projector, predictor) for the first E epochs, at the peak "
        "learning rate, the encoder frozen (no gradient, its BatchNorm statistics still "
        "updated); the encoder's warm-up and cosine then span the remaining epochs. For "
        "--init-from, whose heads start random: fitted heads first keep their random "
        "gradients out of the trained encoder (0: off)",
    )
    lambd: float = opt(0.0051, "Barlow Twins weight of the off-diagonal term")
    tau_base: float = opt(0.99, "BYOL initial EMA decay, raised to 1 by a cosine schedule")
    proj_dims: tuple[int, ...] | None = opt(
        None,
        "Barlow Twins projector layer sizes (default 2048 2048 2048)",
    )
    proj_hidden_dim: int | None = opt(None, "BYOL projector hidden size (default 4096)")
    proj_dim: int | None = opt(None, "projection size (default: BYOL 256, SimSiam 2048)")
    pred_hidden_dim: int | None = opt(
        None,
        "predictor hidden size (default: BYOL 4096, SimSiam 512)",
    )
    precision: str = opt(
        "auto",
        "autocast: auto (bf16 on CUDA, and on CPUs with AVX512-BF16 or AMX where a "
        "convolution step measured at start-up runs >= 1.2x faster in bf16; fp16 on CUDA "
        "without bf16; fp32 on other CPUs, which emulate bf16 slowly or gain nothing from "
        "it), bf16, fp16 or fp32",
        choices=("auto", "bf16", "fp16", "fp32"),
    )
    channels_last: bool = opt(True, "NHWC memory format for the convolutions")
    device: str = opt(
        "auto",
        "auto (CUDA when available), cpu or cuda",
        choices=("auto", "cpu", "cuda"),
    )
    cpu_allocator: str = opt(
        "retain",
        "on the CPU, retain: glibc keeps freed memory for reuse instead of mapping and "
        "page-faulting large activations anew every step (5-8% faster bf16 steps, 22-34% "
        "faster fp32 steps here; the process keeps its peak memory); system: the C library's "
        "defaults",
        choices=("retain", "system"),
    )
    threads: int | None = opt(
        None,
        "intra-op threads of the training process (default on the CPU: cores minus workers)",
    )
    workers: int | None = opt(
        None,
        "data-loading worker processes per rank (0: augment in the training process; default:"
        " 0 on a CPU with <= 5 cores, where workers slow the step down, else (cores-2)//4; "
        "min(8, cores) on CUDA)",
    )
    eval_every: int = opt(1, "epochs between kNN evaluations on the held-out split (0: never)")
    eval_at_start: bool = opt(False, "also evaluate the random initialisation before training")
    knn_ks: tuple[int, ...] = opt((20, 200), "k values of the weighted kNN monitor")
    knn_temperature: float = opt(0.07, "temperature T of the kNN votes exp(sim/T)")
    out: str = opt("runs/run", "run directory: checkpoint.pt, metrics.jsonl, summary.json")
    seed: int = opt(
        0,
        "seed of the initialisation, the split, the data order and the augmentations",
    )
    ckpt_every_steps: int = opt(
        0,
        "also write the checkpoint every N steps (0: at the end of each epoch only)",
    )
    ckpt_every_epochs: int = opt(
        1,
        "write the checkpoint at the end of every N-th epoch and of the last (1: every epoch;"
        " raise it where epochs take seconds, as on a GPU)",
    )
    stop_after_steps: int | None = opt(
        None,
        "stop after N steps with a checkpoint, as if interrupted (resume with --resume); 0: "
        "the checkpoint of the random initialisation, before any step",
    )
    log_every: int = opt(10, "steps between metric lines in metrics.jsonl")
    collapse_threshold: float = opt(
        0.02,
        "stop when the embedding spread (per-dim std of normalized z x sqrt(D)) stays below "
        "this; 0: off",
    )
    collapse_patience: int = opt(50, "consecutive steps below --collapse-threshold before stopping")
    progress: bool = opt(True, "show the progress bar")
    # not an option: the command and recipe of the run, recorded for the card
    extra: dict[str, Any] = field(default_factory=dict)

    def resolved(self) -> TrainConfig:
        """A copy with every `None` default filled in for this method and optimizer."""
        c = TrainConfig(**asdict(self))
        method = methods.get(c.method)  # ValueError for an unknown one
        for k, v in method.head_defaults.items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if c.lr is None:
            c.lr = 0.06 * c.batch_size / 128 if c.optimizer == "sgd" else 0.2 * c.batch_size / 256
        if c.weight_decay is None:
            c.weight_decay = 5e-4 if c.optimizer == "sgd" else 1.5e-6
        if c.warmup_epochs is None:
            c.warmup_epochs = method.warmup_epochs(c.epochs)
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
