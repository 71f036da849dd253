"""The method-agnostic training loop.

trainer = Trainer(TrainConfig(method="simsiam", data="path/to/images", epochs=5))
summary = trainer.fit()

What depends on the method (the model, what DDP wraps, a teacher's targets and update, extra
metrics) comes from the method's model hooks (training/methods/base.py); the loop never asks
which method it runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from embedserve.preprocess import Preprocess
from training import checkpoint, precision, warmstart
from training.allocator import retain_freed_memory
from training.augment import BatchPhotometric, TwoViews
from training.config import TrainConfig
from training.data import (
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
from training.models import Normalize, build_model, trainable_param_groups, wrap_ddp
from training.monitor import HealthCheck, LogWindow, MetricsLog
from training.monitor import TrainingStopped as TrainingStopped  # re-exported (train.py)
from training.optim import build_optimizer, set_lr, warmup_cosine
from training.precision import cpu_bf16_speedup as cpu_bf16_speedup  # re-exported (benchmarks)
from training.precision import cpu_has_native_bf16 as cpu_has_native_bf16  # re-exported
from training.precision import precision_name, resolve_device, resolve_precision

# the options a resumed run takes from its command line; everything else from the checkpoint
RESUME_OVERRIDES = ("out", "progress", "workers", "stop_after_steps")


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # augmentation is per sample: one thread per worker process


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None) -> None:
        self.resume_state = checkpoint.load(resume) if resume is not None else None
        if self.resume_state is not None:
            stored = self.resume_state["config"]
            cfg = TrainConfig.from_dict(
                {**stored, **{k: getattr(cfg, k) for k in RESUME_OVERRIDES}}
            )
        self.cfg = cfg = cfg.resolved()
        self._setup_runtime()
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = MetricsLog(self.out / "metrics.jsonl", self.dist.is_main)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)  # noqa: NPY002 (seed the global RNG that libraries may use)
        self._setup_data()
        self._setup_schedule()
        self._setup_model()
        self.step, self.epoch, self.step_in_epoch = 0, 0, 0
        self.best_knn: dict[str, float] = {}
        self.epoch_times: list[float] = []
        self.health = HealthCheck(cfg.collapse_threshold, cfg.collapse_patience)
        if self.resume_state is not None:
            self._restore(self.resume_state)
        self.ddp = wrap_ddp(self.model, self.device) if self.dist.enabled else self.model

    # -- set-up ----------------------------------------------------------------------------
    def _setup_runtime(self) -> None:
        """Device, threads, allocator, process group and autocast dtype."""
        cfg = self.cfg
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

    def _setup_data(self) -> None:
        """The splits, the two-view dataset (and --device-augment's batch half), the sampler."""
        cfg = self.cfg
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
                f"--batch-size {cfg.batch_size} must be a multiple of "
                f"{self.dist.world_size} ranks, >= 2 each"
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

    def _setup_schedule(self) -> None:
        cfg = self.cfg
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

    def _setup_model(self) -> None:
        """The model (warm-started by --init-from), the optimizer and the gradient scaler."""
        cfg = self.cfg
        model = build_model(cfg, distributed=self.dist.enabled)
        self.init_record = self.resume_state.get("init_from") if self.resume_state else None
        if cfg.init_from and self.resume_state is None:
            self.init_record = warmstart.warm_start(
                model, cfg, self.dataset, self.photometric, self.train_samples
            )
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

    def _learning_rate(self) -> float:
        """The peak lr through --head-warmup-epochs, then the encoder's warm-up and cosine."""
        if self.step < self.head_steps:
            return self.cfg.lr
        return warmup_cosine(
            self.step - self.head_steps,
            self.total_steps - self.head_steps,
            self.warmup_steps,
            self.cfg.lr,
        )

    def train_step(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on a batch of uint8 view pairs; returns (loss, first-view projection)."""
        if self.head_steps and self.step <= self.head_steps:
            # frozen through the heads-only steps (a resumed run's too), released at the boundary
            self._freeze_encoder(self.step < self.head_steps)
        set_lr(self.optimizer, self._learning_rate(), self.cfg.lr)
        if self.photometric is not None:
            # seeded by (seed, rank, step) alone, so a resumed run draws the same views
            gen = torch.Generator(device=self.device)
            gen.manual_seed(sample_seed(self.cfg.seed, self.step, self.dist.rank))
            x1 = self.photometric[0](x1.to(self.device, non_blocking=True), gen)
            x2 = self.photometric[1](x2.to(self.device, non_blocking=True), gen)
        x1, x2 = self._prepare(x1), self._prepare(x2)
        with self._autocast():
            loss, z = self.ddp(*self.model.step_inputs(x1, x2))
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.step += 1
        self.model.after_step(self.step, self.total_steps)
        return loss.detach(), z

    def _freeze_encoder(self, frozen: bool) -> None:
        """Freeze or release the encoder's parameters (--head-warmup-epochs).

        A frozen encoder builds no autograd graph (its forward pass costs no activation memory
        and its backward pass is skipped), gets no gradient, so neither the optimizer nor weight
        decay touches it; in training mode its BatchNorm running statistics still follow the
        batches."""
        for p in self.model.backbone.parameters():
            p.requires_grad_(not frozen)

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

    def _log_start(self) -> None:
        cfg = self.cfg
        if not self.dist.is_main:
            return
        measured = precision.measures_bf16(cfg.precision, self.device)
        self.log.write(
            kind="start",
            config=asdict(cfg),
            resumed_at_step=self.step,
            device=str(self.device),
            # every stretch of a run (start or resume) names the CPU it ran on
            cpu=precision.cpu_description(),
            precision=precision_name(self.amp_dtype),
            # what precision auto measured on this CPU (None where it measured nothing)
            cpu_bf16_speedup=round(precision.cpu_bf16_speedup(), 2) if measured else None,
            retained_allocator=self.retained_allocator,
            world_size=self.dist.world_size,
            train_images=len(self.train_samples),
            held_out_images=len(self.held_samples),
            steps_per_epoch=self.steps_per_epoch,
            init_from=self.init_record,
        )

    def _log_window(self, window: LogWindow, bar: tqdm) -> None:
        """One train line for the steps of `window`, after checking their loss and spread."""
        losses, spreads, elapsed = window.read()
        mean_loss = all_reduce_mean(float(losses.mean()), self.device)
        lr = self.optimizer.param_groups[0]["lr"]
        where = f"step {self.step} (epoch {self.epoch}, lr {lr:.4g})"
        for loss, spread in zip(losses.tolist(), spreads, strict=True):
            self.health(loss, spread, where, self.out / "checkpoint.pt")
        img_s = window.steps * self.cfg.batch_size / elapsed
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
            **self.model.step_metrics(),  # BYOL: tau
        )
        window.reset()

    def _train_epoch(self, bar: tqdm) -> bool:
        """The rest of the current epoch's steps; False when --stop-after-steps stopped it."""
        cfg = self.cfg
        window = LogWindow()
        for x1, x2 in self._loader():
            loss, z = self.train_step(x1, x2)
            self.step_in_epoch += 1
            window.add(loss, z)
            bar.update(1)
            last_of_epoch = self.step_in_epoch == self.steps_per_epoch
            if window.steps == cfg.log_every or last_of_epoch:
                self._log_window(window, bar)
            if last_of_epoch:
                continue
            if cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps:
                return False
            if cfg.ckpt_every_steps and self.step % cfg.ckpt_every_steps == 0:
                self.save_checkpoint()
        return True

    def _end_epoch(self, seconds: float) -> None:
        """Count the epoch, evaluate, log and checkpoint as the options ask."""
        cfg = self.cfg
        self.epoch_times.append(round(seconds, 2))
        self.epoch += 1
        self.step_in_epoch = 0
        if cfg.eval_every and (self.epoch % cfg.eval_every == 0 or self.epoch == cfg.epochs):
            self._run_eval("epoch")
        if self.dist.is_main:
            self.log.write(
                kind="epoch", epoch=self.epoch, step=self.step, seconds=self.epoch_times[-1]
            )
        if self.epoch % cfg.ckpt_every_epochs == 0 or self.epoch == cfg.epochs:
            self.save_checkpoint()

    def _train(self, bar: tqdm) -> bool:
        """Epochs until the last or a stop; True when stopped early (--stop-after-steps)."""
        cfg = self.cfg
        # --stop-after-steps 0: the checkpoint of the initialisation itself (a baseline to export)
        if cfg.stop_after_steps == 0 and self.step == 0:
            return True
        while self.epoch < cfg.epochs:
            self.model.train()
            epoch_start = time.perf_counter()
            if not self._train_epoch(bar):
                return True
            self._end_epoch(time.perf_counter() - epoch_start)
            if cfg.stop_after_steps is not None and self.step >= cfg.stop_after_steps:
                return self.epoch < cfg.epochs
        return False

    def fit(self) -> dict[str, Any]:
        cfg = self.cfg
        self._log_start()
        if cfg.eval_at_start and self.step == 0 and cfg.eval_every:
            self._run_eval("init")
        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            disable=not (cfg.progress and self.dist.is_main),
            unit="step",
            dynamic_ncols=True,
        )
        try:
            stopped_early = self._train(bar)
        except KeyboardInterrupt:
            tqdm.write(
                f"interrupted at step {self.step}: saving {self.out / 'checkpoint.pt'} "
                "(resume with --resume)"
            )
            self.save_checkpoint()
            raise
        finally:
            bar.close()
        if stopped_early:
            self.save_checkpoint()
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        """The run's summary: logged, written to summary.json and returned."""
        summary = {
            "method": self.cfg.method,
            "backbone": self.cfg.backbone,
            "epochs_done": self.epoch,
            "steps": self.step,
            "finished": self.epoch >= self.cfg.epochs,
            "epoch_seconds": self.epoch_times,
            "best_knn": self.best_knn,
            "device": str(self.device),
            "world_size": self.dist.world_size,
        }
        if self.dist.is_main:
            self.log.write(kind="end", **summary)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
