"""The training loop end to end on generated images: learning, exact resume, stopping rules,
atomic checkpoints and the command line."""

import json
import math
import os
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from training import checkpoint
from training import precision as precision_module
from training.config import TrainConfig
from training.methods import METHODS
from training.precision import resolve_precision
from training.train import build_parser, main
from training.trainer import Trainer, TrainingStopped

SMALL_HEADS = {
    "proj_dims": (128, 128, 128),
    "proj_hidden_dim": 128,
    "proj_dim": 64,
    "pred_hidden_dim": 64,
}


def small_config(data, out, **overrides) -> TrainConfig:
    base = dict(
        data=str(data),
        out=str(out),
        image_size=32,
        cifar_stem=False,
        batch_size=16,
        epochs=2,
        workers=0,
        progress=False,
        log_every=1,
        eval_every=0,
        **SMALL_HEADS,
    )
    return TrainConfig(**{**base, **overrides})


def init_checkpoint(data, out, **overrides) -> Path:
    """The checkpoint of a run's random initialisation (--stop-after-steps 0: no step taken)."""
    Trainer(small_config(data, out, stop_after_steps=0, precision="fp32", **overrides)).fit()
    return Path(out) / "checkpoint.pt"


def train_losses(out) -> list[float]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in lines if r["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_short_run_on_generated_images_lowers_the_loss(image_folder, tmp_path, method):
    cfg = small_config(
        image_folder, tmp_path, method=method, epochs=3, lr=0.1 if method == "simsiam" else None
    )
    summary = Trainer(cfg).fit()
    losses = train_losses(tmp_path)
    assert summary["finished"] and summary["steps"] == 3 * 6 == len(losses)
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first, f"{method}: loss went from {first:.4f} to {last:.4f}"
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "summary.json").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_resumed_run_equals_an_uninterrupted_one(image_folder, tmp_path, method):
    straight = small_config(image_folder, tmp_path / "straight", method=method, epochs=2)
    Trainer(straight).fit()

    # interrupted mid-epoch (step 4 of 6 in epoch 0), then resumed from the checkpoint
    interrupted = small_config(
        image_folder, tmp_path / "resumed", method=method, epochs=2, stop_after_steps=4
    )
    partial = Trainer(interrupted).fit()
    assert not partial["finished"] and partial["steps"] == 4
    resumed = Trainer(
        small_config(image_folder, tmp_path / "resumed"),
        resume=str(tmp_path / "resumed" / "checkpoint.pt"),
    )
    assert resumed.step == 4 and resumed.cfg.method == method  # the stored config wins
    assert resumed.fit()["finished"]

    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert a["step"] == b["step"] == 12
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    momentum_a = [s["momentum_buffer"] for s in a["optimizer"]["state"].values()]
    momentum_b = [s["momentum_buffer"] for s in b["optimizer"]["state"].values()]
    assert all(torch.equal(x, y) for x, y in zip(momentum_a, momentum_b, strict=True))
    assert train_losses(tmp_path / "straight")[4:] == train_losses(tmp_path / "resumed")[4:]


def test_stop_after_zero_steps_saves_the_initialisation(image_folder, tmp_path):
    """The random-initialisation baseline is exported from this checkpoint: no step, no update."""
    trainer = Trainer(small_config(image_folder, tmp_path, stop_after_steps=0))
    init = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    summary = trainer.fit()
    assert summary["steps"] == 0 and not summary["finished"]
    saved = checkpoint.load(tmp_path / "checkpoint.pt")
    assert saved["step"] == 0 and saved["model"].keys() == init.keys()
    assert all(torch.equal(saved["model"][k], v) for k, v in init.items())


def fake_cpu(monkeypatch, *, avx512_bf16: bool, amx: bool, bf16_speedup: float = 2.0) -> list:
    """CPU flags as given, and a bf16 probe that measures `bf16_speedup`; returns the probe's
    calls, so that a test can tell whether auto measured at all."""
    calls = []
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(
        precision_module, "cpu_bf16_speedup", lambda: calls.append(1) or bf16_speedup
    )
    return calls


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "expected"),
    [(True, False, torch.bfloat16), (False, True, torch.bfloat16), (False, False, None)],
)
def test_auto_precision_on_the_cpu_is_bf16_only_where_the_cpu_has_bf16(
    monkeypatch, avx512_bf16, amx, expected
):
    """An AVX2-only CPU emulates bf16 (a training step 14x slower than fp32 on a Zen 3 core,
    benchmarks/results/train_throughput-avx2.json): auto must pick fp32 there, without even
    measuring."""
    probe_calls = fake_cpu(monkeypatch, avx512_bf16=avx512_bf16, amx=amx, bf16_speedup=2.0)
    assert resolve_precision("auto", torch.device("cpu")) == expected
    assert bool(probe_calls) == (avx512_bf16 or amx)


@pytest.mark.parametrize(
    ("speedup", "expected"), [(2.0, torch.bfloat16), (1.1, None), (0.55, None)]
)
def test_auto_precision_keeps_fp32_where_bf16_measures_no_faster(monkeypatch, speedup, expected):
    """A Xeon that shows AVX512-BF16 but no AMX ran the step 0.8x as fast in bf16 as in fp32
    (benchmarks/results/train_throughput-xeon.json): the flags alone would pick bf16 there."""
    fake_cpu(monkeypatch, avx512_bf16=True, amx=False, bf16_speedup=speedup)
    assert resolve_precision("auto", torch.device("cpu")) == expected


def test_the_bf16_probe_measures_a_ratio_and_leaves_the_global_rng_alone():
    rng = torch.get_rng_state()
    speedup = precision_module.cpu_bf16_speedup.__wrapped__(reps=1)  # uncached, one timing each
    assert math.isfinite(speedup) and speedup > 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_an_explicit_precision_is_kept_whatever_the_cpu(monkeypatch):
    probe_calls = fake_cpu(monkeypatch, avx512_bf16=True, amx=False, bf16_speedup=0.5)
    cpu = torch.device("cpu")
    assert resolve_precision("bf16", cpu) == torch.bfloat16
    assert resolve_precision("fp32", cpu) is None
    assert not probe_calls


@pytest.mark.parametrize(
    ("bf16_cpu", "speedup", "name", "recorded"),
    [(False, 2.0, "fp32", None), (True, 2.0, "bf16", 2.0), (True, 0.8, "fp32", 0.8)],
)
def test_the_start_record_names_the_precision_auto_resolved_to(
    image_folder, tmp_path, monkeypatch, bf16_cpu, speedup, name, recorded
):
    fake_cpu(monkeypatch, avx512_bf16=bf16_cpu, amx=False, bf16_speedup=speedup)
    Trainer(small_config(image_folder, tmp_path, device="cpu", stop_after_steps=0)).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    start = next(r for r in records if r["kind"] == "start")
    assert start["config"]["precision"] == "auto" and start["precision"] == name
    assert start["cpu_bf16_speedup"] == recorded


def test_a_diverging_run_stops_with_a_clear_message(image_folder, tmp_path):
    cfg = small_config(
        image_folder, tmp_path, method="simsiam", lr=1e30, precision="fp32", epochs=1
    )
    with pytest.raises(TrainingStopped, match="diverged"):
        Trainer(cfg).fit()


def test_a_collapsed_representation_stops_the_run(image_folder, tmp_path):
    # a threshold above any real spread: the detector must fire after `patience` steps
    cfg = small_config(
        image_folder, tmp_path, method="byol", collapse_threshold=100.0, collapse_patience=3
    )
    with pytest.raises(TrainingStopped, match="collapse at step 3"):
        Trainer(cfg).fit()


def test_online_knn_evaluation_is_logged(image_folder, tmp_path):
    cfg = small_config(
        image_folder,
        tmp_path,
        method="simsiam",
        epochs=1,
        eval_every=1,
        eval_at_start=True,
        knn_ks=(5, 20),
    )
    summary = Trainer(cfg).fit()
    evals = [
        json.loads(line)
        for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
        if '"eval"' in line
    ]
    assert [e["tag"] for e in evals] == ["init", "epoch"]
    assert all(0.0 <= e["knn_top1_k5"] <= 1.0 and "knn_top1_k20" in e for e in evals)
    # the generated classes are easy: even the random network is far above chance (0.25)
    assert summary["best_knn"]["knn_top1_k5"] > 0.5


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"step": 1}, path)

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_every_config_field_has_a_documented_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for flag in (
        "--method",
        "--data",
        "--in-memory",
        "--cifar-stem",
        "--optimizer",
        "--precision",
        "--resume",
        "--eval-every",
        "--knn-ks",
        "--collapse-threshold",
        "--workers",
        "--channels-last",
    ):
        assert flag in text


def test_each_options_help_is_written_once_on_its_field_and_shown_by_help(capsys):
    """training/config.py holds every option's help (config.opt); the parser is built from it."""
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    options = [f for f in fields(TrainConfig) if f.name != "extra"]
    for f in options:
        assert f.metadata.get("help"), f"{f.name}: no help on its field"
        assert "--" + f.name.replace("_", "-") in text
        first_words = " ".join(f.metadata["help"].split()[:6])
        assert first_words in text, f.name
    # the warm start that made the shipped default (its last stage used both)
    for flag, words in (("--init-from", "exported model package"), ("--init-heads-from", "heads")):
        assert flag in text and words in text


def test_cli_errors_name_the_problem(tmp_path, capsys):
    assert main(["--method", "byol"]) == 2
    assert "--data is required" in capsys.readouterr().err
    assert (
        main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run"), "--no-progress"])
        == 2
    )
    assert "not found" in capsys.readouterr().err
    bad_crop = ["--data", str(tmp_path), "--out", str(tmp_path / "r"), "--crop-scale", "0.9", "0.5"]
    assert main(bad_crop) == 2
    assert "crop_scale must be MIN MAX" in capsys.readouterr().err


def test_cli_trains_and_records_its_command(image_folder, tmp_path):
    argv = [
        "--method",
        "simsiam",
        "--data",
        str(image_folder),
        "--out",
        str(tmp_path),
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--epochs",
        "1",
        "--eval-every",
        "0",
        "--no-progress",
        "--workers",
        "0",
        "--proj-dim",
        "64",
        "--pred-hidden-dim",
        "16",
        "--crop-scale",
        "0.4",
        "1",
    ]
    assert main(argv) == 0
    ck = checkpoint.load(tmp_path / "checkpoint.pt")
    assert tuple(ck["config"]["crop_scale"]) == (0.4, 1.0)
    assert ck["config"]["extra"]["command"] == "python -m training.train " + " ".join(argv)
    assert ck["epoch"] == 1 and ck["step"] == 6


@pytest.mark.slow
def test_device_augment_trains_and_resumes_exactly(image_folder, tmp_path):
    """--device-augment: workers crop and flip, the batch gets the photometric half on the device
    (the CPU here), with views drawn from (seed, step) so that a resumed run equals a straight one."""
    straight = small_config(
        image_folder, tmp_path / "straight", method="barlow_twins", device_augment=True
    )
    trainer = Trainer(straight)
    assert trainer.photometric is not None
    assert [type(t).__name__ for t in trainer.dataset.transform.view1.transforms][-1] == "ToDtype"
    assert trainer.fit()["finished"]
    Trainer(
        small_config(
            image_folder,
            tmp_path / "resumed",
            method="barlow_twins",
            device_augment=True,
            stop_after_steps=4,
        )
    ).fit()
    Trainer(
        small_config(image_folder, tmp_path / "resumed"),
        resume=str(tmp_path / "resumed" / "checkpoint.pt"),
    ).fit()
    a = checkpoint.load(tmp_path / "straight" / "checkpoint.pt")
    b = checkpoint.load(tmp_path / "resumed" / "checkpoint.pt")
    assert b["config"]["device_augment"] and a["step"] == b["step"] == 12
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # the views differ from those of the worker pipeline: the same seed without the flag trains
    # other weights
    Trainer(small_config(image_folder, tmp_path / "workers", method="barlow_twins")).fit()
    c = checkpoint.load(tmp_path / "workers" / "checkpoint.pt")
    assert not torch.equal(a["model"]["backbone.conv1.weight"], c["model"]["backbone.conv1.weight"])


def test_checkpoints_every_n_epochs_and_at_the_last(image_folder, tmp_path, monkeypatch):
    saved_at = []
    real = Trainer.save_checkpoint
    monkeypatch.setattr(
        Trainer, "save_checkpoint", lambda self: saved_at.append(self.epoch) or real(self)
    )
    Trainer(small_config(image_folder, tmp_path, epochs=5, ckpt_every_epochs=2)).fit()
    assert saved_at == [2, 4, 5]
    with pytest.raises(ValueError, match="ckpt_every_epochs"):
        small_config(image_folder, tmp_path, ckpt_every_epochs=0).resolved()


@pytest.mark.parametrize("fp16", [False, True])
def test_an_encoder_only_checkpoint_keeps_the_backbone_and_starts_a_run(
    image_folder, tmp_path, fp16
):
    Trainer(small_config(image_folder, tmp_path / "run", epochs=1)).fit()
    full = tmp_path / "run" / "checkpoint.pt"
    slim = tmp_path / "encoder.pt"
    assert checkpoint.main(["encoder", str(full), str(slim)] + (["--fp16"] if fp16 else [])) == 0
    a, b = checkpoint.load(full), checkpoint.load(slim)
    assert set(b["model"]) == {k for k in a["model"] if k.startswith("backbone.")}
    assert "optimizer" not in b and b["epoch"] == 1 and b["encoder_only"]["fp16"] == fp16
    assert slim.stat().st_size < full.stat().st_size / (4 if fp16 else 2)
    w_full, w_slim = a["model"]["backbone.conv1.weight"], b["model"]["backbone.conv1.weight"]
    assert w_slim.dtype == (torch.float16 if fp16 else torch.float32)
    torch.testing.assert_close(w_slim.float(), w_full, atol=1e-3 if fp16 else 0, rtol=0)
    # --init-from the encoder-only checkpoint: the new run's encoder holds its weights
    run = Trainer(small_config(image_folder, tmp_path / "next", init_from=str(slim)))
    assert run.init_record["kind"] == "checkpoint" and run.init_record["epochs"] == 1
    assert torch.equal(run.model.backbone.conv1.weight.detach(), w_slim.float())
    # and training.export builds the same embedding graph from it as from the full checkpoint
    from training.models import load_encoder

    images = torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        want, got = load_encoder(full)[0](images), load_encoder(slim)[0](images)
    torch.testing.assert_close(got, want, atol=2e-3 if fp16 else 1e-6, rtol=0)


def test_encoder_only_refuses_a_checkpoint_without_an_encoder(tmp_path, capsys):
    checkpoint.save_atomic({"model": {"projector.0.weight": torch.zeros(2)}}, tmp_path / "x.pt")
    assert checkpoint.main(["encoder", str(tmp_path / "x.pt"), str(tmp_path / "y.pt")]) == 2
    assert "no backbone" in capsys.readouterr().err and not (tmp_path / "y.pt").exists()


def test_head_warmup_trains_the_heads_alone_then_the_encoder(image_folder, tmp_path):
    """--head-warmup-epochs 1 of 2: the first epoch (6 steps) leaves every encoder weight as it
    was and moves the projector, at the peak lr; the encoder's own warm-up and cosine then run
    over the second epoch, and a run resumed at the boundary carries on into it."""
    cfg = small_config(
        image_folder,
        tmp_path,
        method="barlow_twins",
        lr=0.1,
        warmup_epochs=0.5,
        head_warmup_epochs=1,
        stop_after_steps=6,
    )
    trainer = Trainer(cfg)
    encoder = {k: v.clone() for k, v in trainer.model.backbone.named_parameters()}
    stats = {k: v.clone() for k, v in trainer.model.backbone.named_buffers() if "running" in k}
    heads = {k: v.clone() for k, v in trainer.model.projector.named_parameters()}
    assert not trainer.fit()["finished"]
    after = checkpoint.load(tmp_path / "checkpoint.pt")["model"]
    assert all(torch.equal(after[f"backbone.{k}"], v) for k, v in encoder.items())
    assert any(not torch.equal(after[f"backbone.{k}"], v) for k, v in stats.items())
    assert all(not torch.equal(after[f"projector.{k}"], v) for k, v in heads.items())
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in lines if r["kind"] == "train"] == [0.1] * 6

    resumed = Trainer(small_config(image_folder, tmp_path), resume=str(tmp_path / "checkpoint.pt"))
    assert resumed.fit()["finished"]
    final = checkpoint.load(tmp_path / "checkpoint.pt")["model"]
    assert all(not torch.equal(final[f"backbone.{k}"], v) for k, v in encoder.items() if v.ndim > 1)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    encoder_lrs = [r["lr"] for r in lines if r["kind"] == "train"][6:]
    # the encoder's schedule restarts at step 6: warm-up over 3 steps from 0, then cosine down
    assert encoder_lrs[:3] == pytest.approx([0.0, 0.1 / 3, 0.2 / 3])
    assert encoder_lrs[3] == pytest.approx(0.1) and encoder_lrs[3:] == sorted(encoder_lrs[3:])[::-1]


@pytest.mark.parametrize("head_warmup_epochs", [-1, 2, 3.5])
def test_head_warmup_must_leave_epochs_for_the_encoder(tmp_path, head_warmup_epochs):
    cfg = TrainConfig(epochs=2, head_warmup_epochs=head_warmup_epochs)
    with pytest.raises(ValueError, match="head_warmup_epochs must be >= 0 and below epochs"):
        cfg.resolved()


# The checkpoint format that --resume reads: a run stopped by older code resumes with this one.
CHECKPOINT_KEYS = {
    "config", "model", "optimizer", "scaler", "step", "epoch", "step_in_epoch", "best_knn",
    "epoch_times", "rng", "torch_version", "init_from",
}  # fmt: skip
MODEL_PARTS = {
    "barlow_twins": ["backbone", "projector"],
    "byol": ["backbone", "projector", "predictor", "teacher_backbone", "teacher_projector"],
    "simsiam": ["backbone", "projector", "predictor"],
}


@pytest.mark.parametrize("method", METHODS)
def test_the_checkpoint_format_stays_what_resume_reads(image_folder, tmp_path, method):
    if method not in MODEL_PARTS:
        pytest.skip(f"{method}: a method newer than this format pin")
    ck = checkpoint.load(init_checkpoint(image_folder, tmp_path, method=method))
    assert set(ck) == CHECKPOINT_KEYS
    parts = list(dict.fromkeys(k.split(".")[0] for k in ck["model"]))
    assert parts == MODEL_PARTS[method]
    assert list(ck["config"]) == [f.name for f in fields(TrainConfig)]
    groups = [(g["weight_decay"] > 0, g["fixed_lr"]) for g in ck["optimizer"]["param_groups"]]
    fixed = [(True, True), (False, True)] if method == "simsiam" else []
    assert groups == [(True, False), *fixed[:1], (False, False), *fixed[1:]]
