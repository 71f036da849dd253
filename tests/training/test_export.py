"""Export end to end: train a few steps, export, load with embedserve, embed the same image files,
compare with PyTorch; and the refusals (failed parity, a failing variant, an existing package)."""

from __future__ import annotations

import json
import shlex
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from embedserve import package as pkg
from embedserve.preprocess import preprocess_batch
from training import card as card_module
from training import export
from training.card import equivalent_command, reproduction
from training.config import TrainConfig, load_recipe
from training.export import export_package
from training.export_checks import TOLERANCES, ExportRefused
from training.models import EmbeddingGraph, Normalize, load_encoder
from training.parity import batch_consistency, cpu_session, parity, run_session, torch_embeddings
from training.train import build_parser
from training.trainer import Trainer

from .test_trainer import small_config

ROOT = Path(__file__).resolve().parents[2]

FAST = {"parity_images": 8, "calibration_images": 16, "threads": 1, "log": lambda _: None}


def val_files(image_folder: Path) -> list[Path]:
    return sorted((image_folder / "val").rglob("*.png"))


@pytest.fixture(scope="module")
def trained(image_folder, tmp_path_factory) -> Path:
    """A BYOL checkpoint after 2 steps: its teacher already differs from the online encoder."""
    out = tmp_path_factory.mktemp("run")
    cfg = small_config(
        image_folder,
        out,
        method="byol",
        epochs=1,
        stop_after_steps=2,
        precision="fp32",
        threads=1,  # far faster than two on the shared cores of a test run
    )
    threads = torch.get_num_threads()
    try:
        Trainer(cfg).fit()
    finally:
        torch.set_num_threads(threads)  # cfg.threads is process-wide
    return out / "checkpoint.pt"


@pytest.fixture(scope="module")
def exported(trained, image_folder, tmp_path_factory) -> Path:
    """The package of `trained`, with both variants and kNN on the generated images."""
    models = tmp_path_factory.mktemp("models")
    export_package(trained, models / "byol-test", data=str(image_folder), **FAST)
    (models / "DEFAULT").write_text("byol-test\n")
    return models / "byol-test"


@pytest.mark.slow
def test_the_exported_package_embeds_files_as_pytorch_does(trained, exported, image_folder):
    package = pkg.load_package("byol-test", exported.parent)  # by name, schema-validated
    card = package.card
    files = val_files(image_folder)[:12]
    graph, cfg, ck = load_encoder(trained)
    inputs = preprocess_batch(files, package.preprocess)
    reference = torch_embeddings(graph, inputs)
    for variant in package.variants:
        encoder = pkg.Encoder(package, variant=variant, device="cpu", intra_op_threads=2)
        min_cos, max_abs = parity(reference, encoder.embed_images(files))
        tolerance = TOLERANCES[variant]
        assert min_cos >= tolerance.min_cosine and max_abs <= tolerance.max_abs_diff, (
            variant,
            min_cos,
            max_abs,
        )
        recorded = card["parity"] if variant == "fp32" else card["variants"][variant]["parity"]
        assert recorded["min_cosine"] >= tolerance.min_cosine
        assert recorded["tolerance"] == asdict(tolerance)
    # the fp32 graph is the online encoder (BYOL's teacher is left out) with the trainer's normalization
    model_ref = torch.nn.functional.normalize(
        graph.backbone(Normalize()(torch.from_numpy(inputs).permute(0, 3, 1, 2))), dim=1
    )
    fp32 = pkg.Encoder(package, variant="fp32", device="cpu").embed(inputs)
    assert np.abs(fp32 - model_ref.detach().numpy()).max() <= 1e-4
    teacher = (
        torch.nn.functional.normalize(graph_teacher(trained)(torch.from_numpy(inputs)), dim=1)
        .detach()
        .numpy()
    )
    assert np.abs(fp32 - teacher).max() > 1e-3


def graph_teacher(checkpoint: Path) -> torch.nn.Module:
    from training.trainer import build_model

    ck = torch.load(checkpoint, map_location="cpu", weights_only=False)
    model = build_model(TrainConfig.from_dict(ck["config"]).resolved())
    model.load_state_dict(ck["model"])
    return EmbeddingGraph(model.teacher_backbone).eval()


@pytest.mark.slow
def test_the_card_describes_the_model_and_passes_the_schema(exported, trained):
    card = json.loads((exported / "card.json").read_text())
    pkg.validate_card(card)
    assert (
        card["name"] == "byol-test" and card["method"] == "byol" and card["backbone"] == "resnet18"
    )
    assert card["embedding_dim"] == 512
    assert card["input"] == {
        "name": "images",
        "height": 32,
        "width": 32,
        "channels": 3,
        "layout": "NHWC",
        "dtype": "uint8",
        "color": "RGB",
    }
    assert card["preprocess"] == {
        "resize": 32,
        "crop": {"height": 32, "width": 32},
        "interpolation": "bilinear",
    }
    assert card["sha256"] == pkg.sha256_file(exported / "model.onnx")
    for v, info in card["variants"].items():
        assert info["sha256"] == pkg.sha256_file(exported / info["file"])
        assert set(info["knn_top1_diff"]) == {"20", "200"}, v
    assert {m["k"] for m in card["metrics"]["knn"]} == {20, 200}
    assert all(m["split"] == "val" and m["bank_split"] == "train" for m in card["metrics"]["knn"])
    training = card["training"]
    assert training["steps"] == 2 and training["batch_size"] == 16
    assert training["hyperparameters"]["method"] == "byol" and training["device"] == "cpu"
    assert training["checkpoint"]["sha256"] == pkg.sha256_file(trained)
    assert card["onnx"]["opset"] >= 17 and set(card["onnx"]["versions"]) >= {
        "torch",
        "onnx",
        "onnxruntime",
    }


@pytest.mark.slow
def test_the_graph_takes_uint8_nhwc_with_a_dynamic_batch_and_passes_the_checker(exported):
    model = onnx.load(str(exported / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    (inp,), (out,) = model.graph.input, model.graph.output
    dims = [d.dim_param or d.dim_value for d in inp.type.tensor_type.shape.dim]
    assert inp.name == "images" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert dims[1:] == [32, 32, 3] and isinstance(dims[0], str)
    assert out.name == "embeddings" and out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    session = cpu_session(exported / "model.onnx", threads=2)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    assert (
        batch_consistency(lambda x: run_session(session, x), images)
        <= TOLERANCES["fp32"].batch_max_abs_diff
    )


def test_parity_and_batch_checks_measure_what_they_say():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(4, 16)).astype(np.float32)
    assert parity(ref, ref) == pytest.approx((1.0, 0.0))
    off = ref.copy()
    off[2] = -off[2]
    min_cos, max_abs = parity(ref, off)
    assert min_cos == pytest.approx(-1.0) and max_abs == pytest.approx(2 * np.abs(ref[2]).max())
    assert batch_consistency(lambda x: x * 2.0, ref) == 0.0
    assert batch_consistency(lambda x: x - x.mean(0), ref) > 0.1  # depends on the rest of the batch


@pytest.mark.slow
def test_a_graph_that_disagrees_with_pytorch_is_refused_and_nothing_is_written(
    trained, image_folder, tmp_path, monkeypatch
):
    real_export = export.export_onnx

    def export_a_wrong_graph(graph, path, height, width, opset=export.OPSET):
        wrong = EmbeddingGraph(graph.backbone)
        wrong.normalize.shift.zero_()  # forgets the mean subtraction
        real_export(wrong, path, height, width, opset)

    monkeypatch.setattr(export, "export_onnx", export_a_wrong_graph)
    out = tmp_path / "models" / "wrong"
    with pytest.raises(ExportRefused) as e:
        export_package(trained, out, data=str(image_folder), variants=(), knn=False, **FAST)
    message = str(e.value)
    assert "model.onnx fails the check against PyTorch fp32 on 8 images" in message
    assert (
        "min cosine 0." in message and "needs >= 0.99999" in message and "max abs diff" in message
    )
    assert not out.exists() and list(out.parent.iterdir()) == []  # no package, no staging left


@pytest.mark.slow
def test_a_variant_outside_its_tolerance_is_refused_with_the_numbers(
    trained, image_folder, tmp_path, monkeypatch
):
    strict = replace(TOLERANCES["int8"], min_cosine=1.0, max_abs_diff=0.0)
    monkeypatch.setitem(TOLERANCES, "int8", strict)
    out = tmp_path / "models" / "strict"
    with pytest.raises(
        ExportRefused, match=r"model\.int8\.onnx fails .* min cosine 0\.\d+ \(needs >= 1\.0\)"
    ):
        export_package(trained, out, data=str(image_folder), variants=("int8",), knn=False, **FAST)
    assert not out.exists() and list(out.parent.iterdir()) == []


@pytest.mark.slow
def test_the_command_line_replaces_a_package_only_when_told(trained, exported, tmp_path, capsys):
    target = tmp_path / "models" / "copy"
    shutil.copytree(exported, target)
    argv = [
        "--checkpoint",
        str(trained),
        "--out",
        str(target),
        "--variants",
        "--no-knn",
        "--threads",
        "1",
    ]
    assert export.main([*argv, "--parity-images", "8"]) == 2
    assert "exists: pass overwrite (--overwrite)" in capsys.readouterr().err
    assert export.main([*argv, "--parity-images", "8", "--overwrite"]) == 0
    card = json.loads((target / "card.json").read_text())
    assert card["variants"] == {} and card["metrics"]["knn"] == []  # no eval at step 2 in the log
    # without --data, the run's own data gives the parity images
    assert card["parity"]["images"]["source"].endswith("val, preprocessed by embedserve.preprocess")
    assert sorted(p.name for p in target.iterdir()) == ["card.json", "model.onnx"]
    assert [p.name for p in target.parent.iterdir()] == ["copy"]  # nothing staged or set aside left


def rebuilt(command: str, cfg: TrainConfig) -> TrainConfig:
    """The resolved configuration that `python -m training.train` builds from `command`."""
    args = vars(build_parser().parse_args(shlex.split(command)[3:]))
    args.pop("resume"), args.pop("recipe")
    return TrainConfig(**{**args, "progress": cfg.progress}).resolved()


def test_the_equivalent_command_rebuilds_the_configuration():
    cfg = TrainConfig(
        method="byol", data="d", epochs=7, batch_size=32, lr=0.5, cifar_stem=True, knn_ks=(5,)
    )
    command = equivalent_command(asdict(cfg.resolved()))
    assert asdict(rebuilt(command, cfg)) == asdict(cfg.resolved())
    assert "--lr 0.5" in command and "--weight-decay" not in command  # only what was chosen

    # trained below the evaluation size: --eval-size is named, --eval-resize follows from it
    fixres = TrainConfig(method="barlow_twins", data="d", image_size=96, eval_size=128)
    command = equivalent_command(asdict(fixres.resolved()))
    assert "--eval-size 128" in command and "--eval-resize" not in command
    assert asdict(rebuilt(command, fixres)) == asdict(fixres.resolved())


@pytest.mark.parametrize("recipe", sorted((ROOT / "training" / "recipes").glob("*.toml")))
def test_the_equivalent_command_of_each_recipe_rebuilds_it(recipe):
    """A shipped card's equivalent command, rebuilt from a recipe's configuration (tuple options
    such as crop_scale included), parses back to the same configuration."""
    options, _ = load_recipe(recipe)
    cfg = TrainConfig(**options)
    command = equivalent_command(asdict(cfg))
    assert asdict(rebuilt(command, cfg)) == asdict(cfg.resolved()), command


def test_a_card_says_when_no_single_recipe_reproduces_its_model():
    recipe = {"path": "training/recipes/x.toml", "sha256": "0" * 64}
    source = {"kind": "package", "name": "earlier", "epochs": 7, "total_epochs": 7}
    assert reproduction(recipe, None) == {} and reproduction(recipe, source) == {}
    assert reproduction(None, None) == {}  # a run from random weights: its command reruns it
    assert "no single recipe" in reproduction(None, source)["reproduction"]


@pytest.mark.slow
def test_a_run_trained_below_its_eval_size_exports_at_the_eval_size(image_folder, tmp_path):
    """--image-size 24 --eval-size 32: the graph, the card and the parity images are 32 px."""
    cfg = small_config(
        image_folder,
        tmp_path / "run",
        method="barlow_twins",
        image_size=24,
        eval_size=32,
        stop_after_steps=1,
        precision="fp32",
        threads=1,
    )
    threads = torch.get_num_threads()
    try:
        Trainer(cfg).fit()
    finally:
        torch.set_num_threads(threads)
    card = export_package(
        tmp_path / "run" / "checkpoint.pt",
        tmp_path / "models" / "bt-fixres",
        variants=(),
        knn=False,
        data=str(image_folder),
        **FAST,
    )
    assert (card["input"]["height"], card["input"]["width"]) == (32, 32)
    assert card["preprocess"]["resize"] == 32
    assert card["preprocess"]["crop"] == {"height": 32, "width": 32}
    dims = onnx.load(str(tmp_path / "models" / "bt-fixres" / "model.onnx")).graph.input[0]
    assert [d.dim_value for d in dims.type.tensor_type.shape.dim][1:] == [32, 32, 3]
    assert card["parity"]["min_cosine"] >= TOLERANCES["fp32"].min_cosine


def test_the_runs_own_knn_names_the_precision_auto_resolved_to(tmp_path):
    """Without a kNN pass at export, the card takes the run's evaluation at the checkpoint's step,
    and says which precision measured it: what "auto" became on that machine, not "auto"."""
    records = [
        {"kind": "start", "config": {"precision": "auto"}, "precision": "fp32"},
        {"kind": "eval", "step": 3, "knn_top1_k20": 0.5, "knn_top1_k200": 0.4},
        {"kind": "eval", "step": 6, "knn_top1_k20": 0.7, "knn_top1_k200": 0.6},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = TrainConfig(data=str(tmp_path / "imagenette"), knn_ks=(20, 200))
    knn = card_module.knn_from_run({"step": 6}, cfg, tmp_path / "checkpoint.pt", "imagenette")
    assert [(m["k"], m["top1"]) for m in knn] == [(20, 0.7), (200, 0.6)]
    assert all(m["source"] == "trainer evaluation at step 6 (PyTorch, fp32 precision)" for m in knn)
    assert (
        card_module.knn_from_run({"step": 5}, cfg, tmp_path / "checkpoint.pt", "imagenette") == []
    )


def test_the_int8_check_runs_on_vnni_kernels_or_on_the_simulation(monkeypatch, tmp_path):
    from training import export_checks

    monkeypatch.setattr(pkg, "cpu_has_vnni", lambda: True)
    assert export_checks.int8_kernels() == "vnni"
    monkeypatch.setattr(pkg, "cpu_has_vnni", lambda: False)
    assert export_checks.int8_kernels() == "simulated"
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [onnx.helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
        ),
        ir_version=8,
        opset_imports=[onnx.helper.make_opsetid("", 17)],
    )
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    disabled = export_checks.ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    level = {}
    real = export_checks.ort.InferenceSession

    def spy(p, options, providers):
        level[Path(p).name] = options.graph_optimization_level
        return real(p, options, providers=providers)

    monkeypatch.setattr(export_checks.ort, "InferenceSession", spy)
    export_checks.check_session("int8", path, 1)  # no VNNI: simulated
    assert level["m.onnx"] == disabled
    export_checks.check_session("int8", path, 1, kernels="vnni")
    assert level["m.onnx"] != disabled
    export_checks.check_session("fp32", path, 1)
    assert level["m.onnx"] != disabled


def test_the_exported_card_says_which_kernels_checked_int8(exported):
    from training.export_checks import int8_kernels

    card = json.loads((exported / "card.json").read_text())
    assert card["variants"]["int8"]["parity"]["kernels"] == int8_kernels()  # this CPU's
    assert "kernels" not in card["variants"]["fp16"]["parity"]
    weights = [
        onnx.numpy_helper.to_array(t)
        for t in onnx.load(str(exported / "model.int8.onnx")).graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4
    ]
    # 7-bit weights (reduce_range): no pair of u8 x s8 products saturates an int16 lane
    assert weights and max(int(np.abs(w.astype(int)).max()) for w in weights) <= 64
    conversion = card["variants"]["int8"]["conversion"]
    assert conversion["weights"] == "int8 per channel, 7-bit (reduce_range)"
    assert conversion["bias_correction"]["convs"] == len(weights)  # all but the fp32 stem
    assert len(conversion["fp32_nodes"]) == 1 and card["variants"]["int8"]["parity"]["kernels"]


@pytest.mark.slow
def test_add_int8_writes_a_checked_copy_and_leaves_the_package_alone(
    trained, image_folder, tmp_path, monkeypatch, capsys
):
    from training import add_int8, variants

    source = tmp_path / "models" / "plain"
    export_package(trained, source, data=str(image_folder), variants=("fp16",), knn=False, **FAST)
    before = {p.name: p.read_bytes() for p in source.iterdir()}
    monkeypatch.setattr(pkg, "cpu_has_vnni", lambda: False)  # as on an AVX2-only exporter
    argv = [str(source), "--data", str(image_folder), "--parity-images", "8"]
    argv += ["--calibration-images", "16", "--threads", "1"]
    assert add_int8.main(argv) == 2  # neither --out nor --in-place
    assert "--in-place" in capsys.readouterr().err
    copy = tmp_path / "copy"
    assert add_int8.main([*argv, "--out", str(copy)]) == 0
    assert {p.name: p.read_bytes() for p in source.iterdir()} == before  # untouched
    package = pkg.load_package(copy)
    assert package.variants == ["fp32", "fp16", "int8"]
    package.verify_file("int8")  # the card's sha256
    entry = package.card["variants"]["int8"]
    assert entry["parity"]["kernels"] == "simulated"
    assert entry["parity"]["reference"].startswith("model.onnx")
    assert entry["parity"]["images"]["count"] == 8 and set(entry["knn_top1_diff"]) == {"20", "200"}
    assert entry["conversion"]["weights"] == variants.WEIGHTS_7BIT
    assert entry["conversion"]["added"]["command"] == " ".join(
        ["python -m training.add_int8", *argv, "--out", str(copy)]
    )
    for name in ("model.onnx", "model.fp16.onnx"):
        assert (copy / name).read_bytes() == before[name]
    assert package.choose_variant("cpu") == "int8"  # 7-bit weights: auto serves it without VNNI
    assert add_int8.main([*argv, "--out", str(copy)]) == 2  # exists
    assert add_int8.main([*argv, "--in-place", "--no-knn"]) == 0
    assert pkg.load_package(source).variants == ["fp32", "fp16", "int8"]
