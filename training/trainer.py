"""The method-agnostic training loop.

trainer = Trainer(TrainConfig(method="simsiam", data="path/to/images", epochs=5))
summary = trainer.fit()
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from embedserve.package import card_preprocess
from embedserve.preprocess import Preprocess
from training import checkpoint, warmstart
from training.allocator import retain_freed_memory
from training.augment import BatchPhotometric, TwoViews
from training.backbones import create_backbone
from training.config import TrainConfig
from training.data import (
    MEAN,
    STD,
    EpochSampler,
    EvalDataset,
    Samples,
    TwoViewDataset,
    load_into_memory,
    load_splits,
    sample_seed,
)
from training.distributed import DistInfo, all_reduce_mean, convert_sync_batchnorm, init_from_env
from training.knn import knn_accuracy
from training.methods import BYOL, BarlowTwins, SimSiam
from training.optim import build_optimizer, param_groups, set_lr, warmup_cosine


class TrainingStopped(RuntimeError):
    """Training cannot go on (a non-finite loss or a collapse); the message says what to change."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no usable CUDA device on this machine")
    return torch.device(name)


PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def cpu_description() -> dict[str, Any]:
    """The CPU's model name, usable cores and the flags that decide its kernels (bf16, VNNI)."""
    model, flags = None, set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model is None:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or "unknown"
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"model": model, "cores": cores, "flags": [f for f in wanted if f in flags]}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16 or AMX).

    Without either (AVX2-only CPUs such as AMD Zen 2/3 or older Intel cores), PyTorch emulates
    bf16 and an autocast step is several times slower than fp32, not faster.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


# bf16 must beat fp32 by this much in the probe below to be chosen by --precision auto: a
# margin over the probe's noise, so that a CPU where the two are close keeps fp32.
BF16_MIN_SPEEDUP = 1.2


@functools.cache
def cpu_bf16_speedup(reps: int = 5) -> float:
    """fp32 time / bf16-autocast time of a convolution's forward and backward pass on this CPU.

    The CPU flags alone do not tell: a Zen 5 (AVX512-BF16, no AMX) runs the training step 2x
    faster in bf16, while a virtualised Xeon that shows AVX512-BF16 but no AMX ran it 0.8x as
    fast as fp32 (matmuls 163 against 321 GFLOP/s). A 3x3 convolution of 64 channels on
    channels_last activations (what a ResNet's step is mostly made of), median of `reps`
    timings each; 0.1-0.2 s here, once per process. Uses its own random generator, so the
    global RNG is untouched.
    """
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(64, 64, 3, 3, generator=gen) / 24).requires_grad_()
    x = torch.randn(8, 64, 32, 32, generator=gen).to(memory_format=torch.channels_last)
    x.requires_grad_()

    def median_seconds(dtype: torch.dtype | None) -> float:
        def once() -> None:
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                out = F.conv2d(x, weight, padding=1)
            out.float().sum().backward()

        once()  # warm-up: oneDNN picks and caches its kernel
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
        return sorted(times)[reps // 2]

    return median_seconds(None) / median_seconds(torch.bfloat16)


def measures_bf16(precision: str, device: torch.device) -> bool:
    """Whether resolving `precision` on `device` runs the bf16 probe (cpu_bf16_speedup): auto on a
    CPU with bf16 arithmetic; without it bf16 is emulated and fp32 is taken unmeasured."""
    return precision == "auto" and device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None for fp32).

    auto: bf16 on CUDA where supported (fp16 otherwise); on the CPU, bf16 where the CPU has bf16
    arithmetic and a measured convolution step is at least BF16_MIN_SPEEDUP times faster in
    bf16 than in fp32 (cpu_bf16_speedup), else fp32.
    """
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if measures_bf16(precision, device) and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP:
            return torch.bfloat16
        return None
    return PRECISIONS[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    """bf16, fp16 or fp32: what an autocast dtype from resolve_precision stands for."""
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def build_model(cfg: TrainConfig, distributed: bool = False) -> nn.Module:
    """The method's model (backbone + heads) from a resolved config."""
    backbone, feature_dim = create_backbone(cfg.backbone, cfg.cifar_stem, cfg.zero_init_residual)
    if cfg.method == "barlow_twins":
        return BarlowTwins(backbone, feature_dim, cfg.proj_dims, cfg.lambd, distributed=distributed)
    if cfg.method == "byol":
        return BYOL(
            backbone,
            feature_dim,
            cfg.proj_hidden_dim,
            cfg.proj_dim,
            cfg.pred_hidden_dim,
            cfg.tau_base,
        )
    if cfg.method == "simsiam":
        return SimSiam(backbone, feature_dim, cfg.proj_dim, cfg.pred_hidden_dim)
    raise ValueError(f"unknown method {cfg.method!r}")


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around the trained part of the model (for BYOL, not the teacher)."""
    trained = model.online_network() if isinstance(model, BYOL) else model
    return nn.parallel.DistributedDataParallel(
        trained, device_ids=[device.index] if device.type == "cuda" else None
    )


def trainable_param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    fixed = ("predictor",) if cfg.method == "simsiam" else ()  # SimSiam: predictor lr not decayed
    return param_groups([("", model)], cfg.weight_decay, fixed_lr_prefixes=fixed)


class Normalize(nn.Module):
    """uint8 NCHW (or NHWC with `channels_last_input`) -> normalized float NCHW.

    The same module goes into the exported graph, so the constants live in one place.
    """

    def __init__(self, mean=MEAN, std=STD) -> None:
        super().__init__()
        self.register_buffer(
            "scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer(
            "shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1), persistent=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() * self.scale - self.shift


def embedding_spread(z: torch.Tensor) -> torch.Tensor:
    """Mean per-dimension std of L2-normalized embeddings, times sqrt(D) (a 0-d tensor).

    About 1 for embeddings spread over the sphere, 0 for a collapsed encoder. Kept on the
    device: the trainer reads it once per log window, not once per step.
    """
    zn = F.normalize(z.float(), dim=1)
    return zn.std(0).mean() * math.sqrt(z.shape[1])


class MetricsLog:
    """JSON lines, one object per line, appended and flushed (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, **record: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # augmentation is per sample: one thread per worker process


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        self.resume_state = None
        if resume is not None:
            self.resume_state = checkpoint.load(resume)
            cfg = TrainConfig.from_dict(
                {
                    **self.resume_state["config"],
                    "out": cfg.out,
                    "progress": cfg.progress,
                    "workers": cfg.workers,
                    "stop_after_steps": cfg.stop_after_steps,
                }
            )
        self.cfg = cfg = cfg.resolved()
        self.device = resolve_device(cfg.device)
        cores = os.cpu_count() or 1
        if cfg.workers is None:
            cfg.workers = TrainConfig.default_workers(self.device.type, cores)
        if cfg.threads is None and self.device.type == "cpu":
            cfg.threads = max(1, cores - cfg.workers)  # workers and step threads share the cores
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.retained_allocator = (
            self.device.type == "cpu" and cfg.cpu_allocator == "retain" and retain_freed_memory()
        )
        self.dist: DistInfo = init_from_env(self.device)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = True  # fixed input sizes: pick the fastest kernels
        self.amp_dtype = resolve_precision(cfg.precision, self.device)
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(self.out / "metrics.jsonl", self.dist.is_main)

        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)  # noqa: NPY002 (seed the global RNG that libraries may use)
        train, held = load_splits(
            cfg.data,
            cfg.holdout_fraction,
            cfg.seed,
            cfg.data_root,
            cfg.download,
            cfg.holdout_from_train,
        )
        if cfg.in_memory:
            train = load_into_memory(train, desc="decoding train", progress=cfg.progress)
            held = load_into_memory(held, desc="decoding held-out", progress=cfg.progress)
        self.train_samples, self.held_samples = train, held

        per_rank_batch = cfg.batch_size // self.dist.world_size
        if per_rank_batch * self.dist.world_size != cfg.batch_size or per_rank_batch < 2:
            raise ValueError(
                f"--batch-size {cfg.batch_size} must be a multiple of {self.dist.world_size} ranks, >= 2 each"
            )
        views = TwoViews(
            cfg.method, cfg.image_size, cfg.crop_scale, photometric=not cfg.device_augment
        )
        self.dataset = TwoViewDataset(train, views, cfg.seed)
        # --device-augment: the photometric half of each view, on the batch, on the device
        self.photometric = (
            tuple(BatchPhotometric(spec, cfg.image_size) for spec in views.specs)
            if cfg.device_augment
            else None
        )
        self.sampler = EpochSampler(
            len(train), per_rank_batch, cfg.seed, self.dist.rank, self.dist.world_size
        )
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.warmup_steps = round(cfg.warmup_epochs * self.steps_per_epoch)
        # --head-warmup-epochs: the heads alone first; the encoder's schedule starts after them
        self.head_steps = round(cfg.head_warmup_epochs * self.steps_per_epoch)
        if self.head_steps and self.dist.enabled:
            raise ValueError(
                "--head-warmup-epochs needs a single process: DistributedDataParallel cannot "
                "freeze the encoder for part of a run"
            )

        model = build_model(cfg, distributed=self.dist.enabled)
        self.init_record = self.resume_state.get("init_from") if self.resume_state else None
        if cfg.init_from and self.resume_state is None:
            self.init_record = self._init_weights(model, cfg.init_from)
            if cfg.init_heads_from:
                heads = warmstart.init_heads_from_checkpoint(model, cfg.init_heads_from, cfg.method)
                self.init_record = {**self.init_record, "heads_from": heads}
                tqdm.write(f"initialised the heads from {cfg.init_heads_from}: {json.dumps(heads)}")
        if self.dist.enabled:
            model = convert_sync_batchnorm(model, self.device)
        model = model.to(self.device)
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.normalize = Normalize().to(self.device)
        self.optimizer = build_optimizer(
            cfg.optimizer,
            trainable_param_groups(model, cfg),
            cfg.lr,
            cfg.momentum,
            cfg.weight_decay,
        )
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best_knn: dict[str, float] = {}
        self.epoch_times: list[float] = []
        self._low_spread_steps = 0
        if self.resume_state is not None:
            self._restore(self.resume_state)
        self.ddp = wrap_ddp(model, self.device) if self.dist.enabled else model

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "step": self.step,
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "best_knn": self.best_knn,
            "epoch_times": self.epoch_times,
            "rng": checkpoint.rng_states(),
            "torch_version": torch.__version__,
            "init_from": self.init_record,
        }

    def _init_weights(self, model: nn.Module, source: str) -> dict[str, Any]:
        """Load an earlier encoder into the freshly built model (see training/warmstart.py)."""
        if Path(source).is_file() and Path(source).suffix != ".onnx":
            record = warmstart.init_from_checkpoint(model.backbone, source)
        else:
            # 1,024 images spread over the training set (it is ordered by class), 2 views each:
            # the BatchNorm statistics
            picks = np.linspace(0, len(self.dataset) - 1, min(len(self.dataset), 1024))
            views = torch.cat([torch.stack(self.dataset[int(i)]) for i in picks])
            if self.photometric is not None:  # --device-augment: the rest of each view's recipe
                gen = torch.Generator().manual_seed(self.cfg.seed)
                first, second = (self.photometric[v](views[v::2], gen) for v in (0, 1))
                views = torch.stack((first, second), 1).flatten(0, 1)
            # the parity images as the package's card preprocesses them: its graph takes its
            # own input size, which need not be this run's --image-size (nor --eval-size)
            pre = card_preprocess(warmstart.read_package(source)[1])
            check = EvalDataset(self.train_samples, pre)
            check_images = torch.stack([check[i][0] for i in range(min(len(check), 32))])
            normalize = Normalize()
            record = warmstart.init_from_package(
                model.backbone, source, views, normalize, check_images
            )
        if isinstance(model, BYOL):  # the teacher starts as a copy of the online network
            model.teacher_backbone.load_state_dict(model.backbone.state_dict())
        tqdm.write(f"initialised the encoder from {source}: {json.dumps(record)[:300]}")
        return record

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.step_in_epoch = (
            state["step"],
            state["epoch"],
            state["step_in_epoch"],
        )
        self.best_knn, self.epoch_times = state.get("best_knn", {}), state.get("epoch_times", [])
        checkpoint.set_rng_states(state["rng"])

    def save_checkpoint(self) -> None:
        if self.dist.is_main:
            checkpoint.save_atomic(self.state_dict(), self.out / "checkpoint.pt")

    # -- steps -----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x.to(self.device, non_blocking=True))
        return x.contiguous(memory_format=torch.channels_last) if self.cfg.channels_last else x

    def train_step(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch of uint8 view pairs; returns (loss, first-view projection)."""
        heads_only = self.step < self.head_steps
        if self.head_steps and self.step <= self.head_steps:
            # frozen through the heads-only steps (a resumed run's too), released at the boundary
            self._freeze_encoder(heads_only)
        if heads_only:
            lr = self.cfg.lr
        else:
            lr = warmup_cosine(
                self.step - self.head_steps,
                self.total_steps - self.head_steps,
                self.warmup_steps,
                self.cfg.lr,
            )
        set_lr(self.optimizer, lr, self.cfg.lr)
        if self.photometric is not None:
            # seeded by (seed, rank, step) alone, so a resumed run draws the same views
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sample_seed(self.cfg.seed, self.step, self.dist.rank))
            x1 = self.photometric[0](x1.to(self.device, non_blocking=True), gen)
            x2 = self.photometric[1](x2.to(self.device, non_blocking=True), gen)
        x1, x2 = self._prepare(x1), self._prepare(x2)
        with self._autocast():
            if isinstance(self.model, BYOL):  # the teacher runs outside the DDP-wrapped network
                loss, z = self.ddp(x1, x2, self.model.targets(x1, x2))
            else:
                loss, z = self.ddp(x1, x2)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.step += 1
        if isinstance(self.model, BYOL):
            self.model.update_teacher(self.step, self.total_steps)
        return loss.detach(), z

    def _freeze_encoder(self, frozen: bool) -> None:
        """Freeze or release the encoder's parameters (--head-warmup-epochs).

        A frozen encoder builds no autograd graph (its forward pass costs no activation memory
        and its backward pass is skipped), gets no gradient, so neither the optimizer nor weight
        decay touches it; in training mode its BatchNorm running statistics still follow the
        batches."""
        for p in self.model.backbone.parameters():
            p.requires_grad_(not frozen)

    def _check_health(self, loss: float, spread: float) -> None:
        if not math.isfinite(loss):
            raise TrainingStopped(
                f"loss is {loss} at step {self.step} (epoch {self.epoch}, lr {self.optimizer.param_groups[0]['lr']:.4g}): "
                "training diverged. Lower --lr, add --warmup-epochs, or use --precision fp32; "
                f"the last good checkpoint is {self.out / 'checkpoint.pt'}"
            )
        if self.cfg.collapse_threshold > 0 and spread < self.cfg.collapse_threshold:
            self._low_spread_steps += 1
            if self._low_spread_steps >= self.cfg.collapse_patience:
                raise TrainingStopped(
                    f"representation collapse at step {self.step}: the per-dimension std of normalized "
                    f"embeddings (x sqrt(D)) has been {spread:.4f} < {self.cfg.collapse_threshold} for "
                    f"{self._low_spread_steps} steps. Check the augmentations, lower --lr or raise --weight-decay."
                )
        else:
            self._low_spread_steps = 0

    # -- evaluation ------------------------------------------------------------------------
    @torch.no_grad()
    def features(
        self, samples: Samples, batch_size: int = 256
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone features (float32, NxD) of samples, preprocessed as the server does."""
        pre = Preprocess(self.cfg.eval_resize, self.cfg.eval_size, self.cfg.eval_size)
        loader = torch.utils.data.DataLoader(
            EvalDataset(samples, pre),
            batch_size=batch_size,
            num_workers=self.cfg.workers,
            worker_init_fn=_worker_init if self.cfg.workers else None,
        )
        backbone = self.model.backbone
        was_training = backbone.training
        backbone.eval()
        feats, labels = [], []
        try:
            for x, y in loader:
                with self._autocast():
                    feats.append(backbone(self._prepare(x)).float().cpu())
                labels.append(y)
        finally:
            backbone.train(was_training)
        return torch.cat(feats), torch.cat(labels)

    def evaluate(self) -> dict[str, float]:
        """Weighted kNN top-1 of backbone features: training split as the bank, held-out as queries."""
        t0 = time.perf_counter()
        bank, bank_labels = self.features(self.train_samples)
        queries, query_labels = self.features(self.held_samples)
        acc = knn_accuracy(
            queries, query_labels, bank, bank_labels, self.cfg.knn_ks, self.cfg.knn_temperature
        )
        result = {f"knn_top1_k{k}": round(v, 4) for k, v in acc.items()}
        result["eval_seconds"] = round(time.perf_counter() - t0, 1)
        return result

    # -- the loop --------------------------------------------------------------------------
    def _loader(self) -> torch.utils.data.DataLoader:
        self.dataset.epoch = self.epoch
        self.sampler.set_epoch(self.epoch, self.step_in_epoch)
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.sampler.batch_size,
            sampler=self.sampler,
            num_workers=self.cfg.workers,
            worker_init_fn=_worker_init if self.cfg.workers else None,
            pin_memory=self.device.type == "cuda",
            drop_last=True,
            prefetch_factor=4 if self.cfg.workers else None,
        )

    def _run_eval(self, tag: str) -> None:
        if self.dist.is_main:
            result = self.evaluate()
            if tag != "init":  # the best of the trained weights, not of the random initialisation
                for k, v in result.items():
                    if k.startswith("knn") and v > self.best_knn.get(k, -1):
                        self.best_knn[k] = v
            self.log.write(kind="eval", epoch=self.epoch, step=self.step, tag=tag, **result)
            tqdm.write(
                f"[{tag}] epoch {self.epoch}: " + ", ".join(f"{k}={v}" for k, v in result.items())
            )
        if self.dist.enabled:
            torch.distributed.barrier()

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.dist.is_main:
            self.log.write(
                kind="start",
                config=asdict(cfg),
                resumed_at_step=self.step,
                device=str(self.device),
                # every stretch of a run (start or resume) names the CPU it ran on
                cpu=cpu_description(),
                precision=precision_name(self.amp_dtype),
                # what precision auto measured on this CPU (None where it measured nothing)
                cpu_bf16_speedup=round(cpu_bf16_speedup(), 2)
                if measures_bf16(cfg.precision, self.device)
                else None,
                retained_allocator=self.retained_allocator,
                world_size=self.dist.world_size,
                train_images=len(self.train_samples),
                held_out_images=len(self.held_samples),
                steps_per_epoch=self.steps_per_epoch,
                init_from=self.init_record,
            )
        if cfg.eval_at_start and self.step == 0 and cfg.eval_every:
            self._run_eval("init")
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (cfg.progress and self.dist.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        per_step_images = cfg.batch_size
        # --stop-after-steps 0: the checkpoint of the initialisation itself (a baseline to export)
        stopped_early = cfg.stop_after_steps == 0 and self.step == 0
        try:
            while self.epoch < cfg.epochs and not stopped_early:
                self.model.train()
                epoch_start = time.perf_counter()
                window_start, window_steps, window_loss, window_spread = (
                    time.perf_counter(),
                    0,
                    [],
                    [],
                )
                for x1, x2 in self._loader():
                    loss, z = self.train_step(x1, x2)
                    self.step_in_epoch += 1
                    window_steps += 1
                    window_loss.append(loss)
                    window_spread.append(embedding_spread(z))
                    bar.update(1)
                    last_of_epoch = self.step_in_epoch == self.steps_per_epoch
                    if window_steps == cfg.log_every or last_of_epoch:
                        losses = torch.stack(window_loss).float().cpu()
                        spreads = torch.stack(window_spread).cpu().tolist()
                        mean_loss = all_reduce_mean(float(losses.mean()), self.device)
                        for l_, s_ in zip(losses.tolist(), spreads, strict=True):
                            self._check_health(l_, s_)
                        elapsed = time.perf_counter() - window_start
                        img_s = window_steps * per_step_images / elapsed
                        lr = self.optimizer.param_groups[0]["lr"]
                        spread = float(np.mean(spreads))
                        bar.set_postfix(
                            epoch=self.epoch,
                            loss=f"{mean_loss:.4f}",
                            lr=f"{lr:.4f}",
                            img_s=f"{img_s:.0f}",
                            spread=f"{spread:.3f}",
                        )
                        self.log.write(
                            kind="train",
                            epoch=self.epoch,
                            step=self.step,
                            loss=mean_loss,
                            lr=lr,
                            img_per_s=round(img_s, 1),
                            embedding_spread=round(spread, 4),
                            **({"tau": self.model.tau} if isinstance(self.model, BYOL) else {}),
                        )
                        window_start, window_steps, window_loss, window_spread = (
                            time.perf_counter(),
                            0,
                            [],
                            [],
                        )
                    if (
                        cfg.stop_after_steps is not None
                        and self.step >= cfg.stop_after_steps
                        and not last_of_epoch
                    ):
                        stopped_early = True
                        break
                    if (
                        cfg.ckpt_every_steps
                        and self.step % cfg.ckpt_every_steps == 0
                        and not last_of_epoch
                    ):
                        self.save_checkpoint()
                if stopped_early:
                    break
                self.epoch_times.append(round(time.perf_counter() - epoch_start, 2))
                self.epoch += 1
                self.step_in_epoch = 0
                if cfg.eval_every and (
                    self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs
                ):
                    self._run_eval("epoch")
                if self.dist.is_main:
                    self.log.write(
                        kind="epoch", epoch=self.epoch, step=self.step, seconds=self.epoch_times[-1]
                    )
                if self.epoch % cfg.ckpt_every_epochs == 0 or self.epoch == cfg.epochs:
                    self.save_checkpoint()
                if cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps:
                    stopped_early = self.epoch < cfg.epochs
                    break
        except KeyboardInterrupt:
            tqdm.write(
                f"interrupted at step {self.step}: saving {self.out / 'checkpoint.pt'} (resume with --resume)"
            )
            self.save_checkpoint()
            raise
        finally:
            bar.close()
        if stopped_early:
            self.save_checkpoint()
        summary = {
            "method": cfg.method,
            "backbone": cfg.backbone,
            "epochs_done": self.epoch,
            "steps": self.step,
            "finished": self.epoch >= cfg.epochs,
            "epoch_seconds": self.epoch_times,
            "best_knn": self.best_knn,
            "device": str(self.device),
            "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            self.log.write(kind="end", **summary)
            with open(self.out / "summary.json", "w") as f:
                json.dump(summary, f, indent=2)
        return summary
