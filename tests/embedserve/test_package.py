"""Loading model packages: the card schema, name and DEFAULT resolution, and every refusal (sha256,
truncation, schema, ONNX inputs and outputs against the card). The models here are tiny graphs
written with onnx.helper, so these tests need no torch and run in milliseconds."""

from __future__ import annotations

import copy
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from embedserve import package as pkg
from embedserve.package import Encoder, PackageError, load_package, validate_card

SIZE, DIM = 16, 8
WEIGHTS = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)


def tiny_model(
    size: int = SIZE,
    dim: int = DIM,
    input_name: str = "images",
    output_name: str = "embeddings",
    input_type: int = TensorProto.UINT8,
    dynamic_batch: bool = True,
) -> onnx.ModelProto:
    """images uint8 [N, size, size, 3] -> L2-normalized (mean pixel @ WEIGHTS) [N, dim]."""
    batch = "N" if dynamic_batch else 1
    weights = np.resize(WEIGHTS, (3, dim)).astype(np.float32)
    nodes = [
        helper.make_node("Cast", [input_name], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x", "axes"], ["mean"], keepdims=0),  # Nx3
        helper.make_node("MatMul", ["mean", "w"], ["z"]),  # NxD
        helper.make_node("LpNormalization", ["z"], [output_name], axis=1, p=2),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info(input_name, input_type, [batch, size, size, 3])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch, dim])],
        [
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
            numpy_helper.from_array(weights, "w"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def reference_embeddings(images: np.ndarray) -> np.ndarray:
    z = images.astype(np.float64).mean(axis=(1, 2)) @ WEIGHTS.astype(np.float64)
    return z / np.linalg.norm(z, axis=1, keepdims=True)


def make_card(name: str, sha256: str, variants: dict | None = None) -> dict:
    """A complete card, valid against the schema."""
    parity = {
        "min_cosine": 1.0,
        "max_abs_diff": 0.0,
        "batch_max_abs_diff": 0.0,
        "images": {"count": 8, "source": "test"},
        "tolerance": {"min_cosine": 0.99999, "max_abs_diff": 1e-4, "batch_max_abs_diff": 1e-5},
    }
    return {
        "format_version": 1,
        "name": name,
        "method": "simsiam",
        "backbone": "tiny",
        "dataset": {"name": "generated", "source": "tests"},
        "embedding_dim": DIM,
        "input": {
            "name": "images",
            "height": SIZE,
            "width": SIZE,
            "channels": 3,
            "layout": "NHWC",
            "dtype": "uint8",
            "color": "RGB",
        },
        "output": {"name": "embeddings", "dtype": "float32", "l2_normalized": True},
        "preprocess": {
            "resize": SIZE,
            "crop": {"height": SIZE, "width": SIZE},
            "interpolation": "bilinear",
        },
        "normalization": {
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "in_graph": True,
        },
        "sha256": sha256,
        "parity": parity,
        "metrics": {
            "knn": [
                {
                    "k": 20,
                    "temperature": 0.07,
                    "top1": 0.5,
                    "dataset": "generated",
                    "split": "val",
                    "source": "test",
                }
            ]
        },
        "training": {
            "hyperparameters": {"lr": 0.1},
            "epochs": 1,
            "batch_size": 16,
            "duration_seconds": 1.5,
            "device": "cpu",
            "command": "python -m training.train --method simsiam",
        },
        "onnx": {"opset": 18, "producer": "onnx.helper", "versions": {"onnx": onnx.__version__}},
        "created": "2026-01-01T00:00:00Z",
        "variants": {v: {**info, "parity": parity} for v, info in (variants or {}).items()},
    }


def write_package(
    root: Path, name: str = "tiny", model: onnx.ModelProto | None = None, variants=("fp16", "int8")
) -> Path:
    """models/NAME with model.onnx, a copy of it per variant, and a valid card."""
    path = root / name
    path.mkdir(parents=True)
    onnx.save(model or tiny_model(), path / pkg.MODEL_FILE)
    info = {}
    for v in variants:
        shutil.copy(path / pkg.MODEL_FILE, path / f"model.{v}.onnx")
        info[v] = {
            "file": f"model.{v}.onnx",
            "sha256": pkg.sha256_file(path / f"model.{v}.onnx"),
            "precision": v,
            "target": "cuda" if v == "fp16" else "cpu",
        }
    card = make_card(name, pkg.sha256_file(path / pkg.MODEL_FILE), info)
    (path / pkg.CARD_FILE).write_text(json.dumps(card, indent=2))
    return path


def images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture
def models(tmp_path) -> Path:
    root = tmp_path / "models"
    write_package(root, "tiny")
    (root / "DEFAULT").write_text("tiny\n")
    return root


# -- the schema --------------------------------------------------------------------------------
def test_the_schema_is_valid_json_schema_and_accepts_a_complete_card():
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(pkg.card_schema())
    validate_card(
        make_card(
            "tiny",
            "0" * 64,
            {
                "int8": {
                    "file": "model.int8.onnx",
                    "sha256": "1" * 64,
                    "precision": "int8",
                    "target": "cpu",
                }
            },
        )
    )


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda c: c.pop("sha256"), "'sha256' is a required property"),
        (lambda c: c.pop("preprocess"), "'preprocess' is a required property"),
        (lambda c: c["input"].update(layout="NCHW"), "input/layout"),
        (lambda c: c["input"].update(dtype="float32"), "input/dtype"),
        (lambda c: c.update(sha256="abc"), "sha256"),
        (lambda c: c.update(embedding_dim=0), "embedding_dim"),
        (lambda c: c.update(format_version=2), "format_version"),
        (lambda c: c.update(method="simclr"), "method"),
        (lambda c: c["preprocess"].update(interpolation="area"), "preprocess/interpolation"),
        (lambda c: c["onnx"].update(opset=13), "onnx/opset"),
        (lambda c: c["variants"].update(bf16={}), "variants"),
        (lambda c: c["metrics"]["knn"][0].pop("k"), "metrics/knn/0"),
        (lambda c: c["training"].pop("command"), "training"),
        (lambda c: c.update(created="yesterday"), "created"),
        (lambda c: c.update(surprise=1), "Additional properties"),
    ],
)
def test_a_card_that_fails_the_schema_is_refused_naming_the_field(change, where):
    card = make_card("tiny", "0" * 64)
    change(card)
    with pytest.raises(PackageError, match="does not match the card schema") as e:
        validate_card(card)
    assert where in str(e.value)


def test_loading_refuses_a_card_that_fails_the_schema(models):
    card_path = models / "tiny" / pkg.CARD_FILE
    card = json.loads(card_path.read_text())
    card["input"]["layout"] = "NCHW"
    card_path.write_text(json.dumps(card))
    with pytest.raises(
        PackageError, match=r"card\.json does not match the card schema[\s\S]*input/layout"
    ):
        load_package("tiny", models)


def test_loading_refuses_a_card_that_is_not_json(models):
    (models / "tiny" / pkg.CARD_FILE).write_text("{not json")
    with pytest.raises(PackageError, match="not valid JSON"):
        load_package("tiny", models)


# -- finding a package ---------------------------------------------------------------------------
def test_a_package_is_found_by_default_by_name_and_by_path(models):
    by_default = load_package(None, models)
    by_name = load_package("tiny", models)
    by_path = load_package(str(models / "tiny"), models)
    assert by_default.path == by_name.path == models / "tiny"
    assert by_path.card == by_name.card and by_name.name == "tiny"
    assert by_name.variants == ["fp32", "fp16", "int8"]
    pre = by_name.preprocess
    assert (pre.resize, pre.crop_height, pre.crop_width, pre.interpolation) == (
        SIZE,
        SIZE,
        SIZE,
        "bilinear",
    )


def test_missing_default_and_unknown_names_are_explained(models, tmp_path):
    with pytest.raises(PackageError, match="packages there: tiny"):
        load_package("nope", models)
    (models / "DEFAULT").unlink()
    with pytest.raises(PackageError, match="no default model"):
        load_package(None, models)
    (models / "DEFAULT").write_text("../elsewhere\n")
    with pytest.raises(PackageError, match="must hold one folder name"):
        load_package(None, models)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PackageError, match="card.json is missing"):
        load_package(str(empty), models)


# -- serving -------------------------------------------------------------------------------------
def test_an_encoder_embeds_arrays_and_files_as_the_model_computes(models, tmp_path):
    encoder = Encoder(
        load_package("tiny", models), variant="fp32", device="cpu", intra_op_threads=1
    )
    assert encoder.providers == ["CPUExecutionProvider"] and encoder.variant == "fp32"
    batch = images(5)
    out = encoder.embed(batch)
    assert out.dtype == np.float32 and out.shape == (5, DIM)
    np.testing.assert_allclose(out, reference_embeddings(batch), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-5)
    assert encoder.embed(batch[:0]).shape == (0, DIM)

    paths = []
    for i, img in enumerate(images(3, seed=1)):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(img).resize((2 * SIZE, 3 * SIZE)).save(paths[-1])
    from_files = encoder.embed_images(paths)
    from embedserve.preprocess import preprocess_batch

    np.testing.assert_allclose(
        from_files, encoder.embed(preprocess_batch(paths, encoder.package.preprocess))
    )


def test_an_encoder_refuses_input_of_the_wrong_size_or_type(models):
    encoder = Encoder(load_package("tiny", models), variant="fp32", device="cpu")
    with pytest.raises(ValueError, match=r"uint8 \[N, 16, 16, 3\]"):
        encoder.embed(images(2).astype(np.float32))
    with pytest.raises(ValueError, match="got uint8"):
        encoder.embed(images(2)[:, :8])


def test_cpu_flags_are_read_from_the_x86_and_arm_lines_of_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("model name\t: AMD EPYC avx512_vnni\nflags\t\t: fpu sse4_2 avx2 fma\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert pkg.cpu_flags(x86) == {"fpu", "sse4_2", "avx2", "fma"}  # not the model name's words
    assert pkg.cpu_flags(arm) == {"fp", "asimd", "asimddp"}
    assert pkg.cpu_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(
    ("flags", "vnni"),
    [
        ({"avx2", "avx512_vnni"}, True),
        ({"avx2", "avx_vnni"}, True),
        ({"asimd", "asimddp"}, True),
        ({"avx2", "avx512f"}, False),  # u8s8 saturates without VNNI: off the card's parity
        ({"asimd"}, False),
        (set(), False),  # not Linux: nothing known, fp32
    ],
)
def test_vnni_is_read_from_the_cpu_flags(monkeypatch, flags, vnni):
    monkeypatch.setattr(pkg, "cpu_flags", lambda: flags)
    assert pkg.cpu_has_vnni() is vnni


def test_int8_asked_for_on_a_cpu_without_vnni_opens_with_a_warning(models, monkeypatch):
    package = load_package("tiny", models)
    monkeypatch.setattr(pkg, "cpu_has_vnni", lambda: False)
    with pytest.warns(RuntimeWarning, match="int8 on a CPU without VNNI.*card's parity"):
        assert Encoder(package, variant="int8", device="cpu").variant == "int8"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto picks fp32 there, silently
        assert Encoder(package, variant="auto", device="cpu").variant == "fp32"
        monkeypatch.setattr(pkg, "cpu_has_vnni", lambda: True)
        assert Encoder(package, variant="int8", device="cpu").variant == "int8"


def test_each_variant_is_chosen_by_device_and_verified_when_opened(models, monkeypatch):
    package = load_package("tiny", models)
    assert package.choose_variant("cuda") == "fp16"
    monkeypatch.setattr(pkg, "cpu_has_vnni", lambda: False)
    assert package.choose_variant("cpu") == "fp32"
    monkeypatch.setattr(pkg, "cpu_has_vnni", lambda: True)
    assert package.choose_variant("cpu") == "int8"
    for variant in package.variants:
        assert Encoder(package, variant=variant, device="cpu").variant == variant
    with pytest.raises(PackageError, match="no 'bf16' variant"):
        Encoder(package, variant="bf16", device="cpu")

    fp32_only = copy.deepcopy(package.card)
    fp32_only["variants"] = {}
    assert pkg.ModelPackage(package.path, fp32_only).choose_variant("cuda") == "fp32"


def test_auto_device_runs_where_a_session_really_starts(models):
    encoder = Encoder(load_package("tiny", models), device="auto")
    expected = (
        "fp16"
        if "CUDAExecutionProvider" in encoder.providers
        else encoder.package.choose_variant("cpu")
    )
    assert encoder.variant == expected
    assert encoder.embed(images(2)).shape == (2, DIM)


# -- refusals ------------------------------------------------------------------------------------
def test_a_tampered_model_is_refused(models):
    path = models / "tiny" / pkg.MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(
        PackageError,
        match=r"model\.onnx: sha256 [0-9a-f]{64} differs from the card's .*refusing to serve",
    ):
        Encoder(load_package("tiny", models), variant="fp32", device="cpu")


def test_a_truncated_model_is_refused(models):
    path = models / "tiny" / pkg.MODEL_FILE
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PackageError, match=r"modified or truncated"):
        Encoder(load_package("tiny", models), variant="fp32", device="cpu")


def test_a_tampered_variant_is_refused_and_a_missing_one_named(models):
    package = load_package("tiny", models)
    (models / "tiny" / "model.int8.onnx").write_bytes(b"not a model")
    with pytest.raises(PackageError, match=r"model\.int8\.onnx: sha256"):
        Encoder(package, variant="int8", device="cpu")
    (models / "tiny" / "model.fp16.onnx").unlink()
    with pytest.raises(PackageError, match=r"model\.fp16\.onnx: missing"):
        package.verify_file("fp16")


def test_a_model_that_onnx_runtime_cannot_read_is_refused_even_with_a_matching_sha256(models):
    path = models / "tiny" / pkg.MODEL_FILE
    path.write_bytes(path.read_bytes()[:100])  # truncated, and the card updated to match
    card_path = models / "tiny" / pkg.CARD_FILE
    card = json.loads(card_path.read_text())
    card["sha256"] = pkg.sha256_file(path)
    card_path.write_text(json.dumps(card))
    with pytest.raises(PackageError, match="ONNX Runtime cannot load it"):
        Encoder(load_package("tiny", models), variant="fp32", device="cpu")


@pytest.mark.parametrize(
    ("model_kwargs", "message"),
    [
        (
            {"size": 24},
            r"input 'images' tensor\(uint8\) \['N', 24, 24, 3\], the card says 'images' tensor\(uint8\) \[N, 16, 16, 3\]",
        ),
        ({"input_name": "pixels"}, "input 'pixels'"),
        ({"input_type": TensorProto.FLOAT}, r"input 'images' tensor\(float\)"),
        (
            {"dim": 4},
            r"output 'embeddings' tensor\(float\) \['N', 4\], the card says 'embeddings' tensor\(float\) \[N, 8\]",
        ),
        ({"output_name": "features"}, "output 'features'"),
        ({"dynamic_batch": False}, r"\[1, 16, 16, 3\]"),
    ],
)
def test_a_model_whose_inputs_or_outputs_differ_from_the_card_is_refused(
    tmp_path, model_kwargs, message
):
    root = tmp_path / "models"
    write_package(root, "odd", model=tiny_model(**model_kwargs), variants=())
    with pytest.raises(PackageError, match="does not match its card") as e:
        Encoder(load_package("odd", root), variant="fp32", device="cpu")
    assert e.match(message)


def test_the_command_line_verifies_every_file_and_refuses_a_tampered_one(models, capsys):
    assert pkg.main([str(models / "tiny")]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (") == 3 and "kNN top-1 k=20 0.5 (generated val)" in out
    (models / "tiny" / "model.int8.onnx").write_bytes(b"tampered")
    assert pkg.main([str(models / "tiny")]) == 1
    assert "refused: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("conversion", "flags", "chosen"),
    [
        (None, {"avx2", "avx512_vnni"}, "int8"),  # a card from before the recipe was recorded
        (None, {"avx2"}, "fp32"),
        ({"weights": "int8 per channel"}, {"avx2"}, "fp32"),  # 8-bit: saturates without VNNI
        ({"weights": "int8 per channel"}, {"avx2", "avx_vnni"}, "int8"),
        ({"weights": "int8 per channel, 7-bit (reduce_range)"}, {"avx2"}, "int8"),
        ({"weights": "int8 per channel, 7-bit (reduce_range)"}, set(), "int8"),
        ({"weights": "int8 per channel, 7-bit (reduce_range)"}, {"avx512_vnni"}, "int8"),
    ],
)
def test_auto_serves_7bit_int8_on_every_cpu_and_8bit_only_with_vnni(
    models, monkeypatch, conversion, flags, chosen
):
    card = copy.deepcopy(load_package("tiny", models).card)
    if conversion is not None:
        card["variants"]["int8"]["conversion"] = conversion
    (models / "tiny" / "card.json").write_text(json.dumps(card))
    package = load_package("tiny", models)  # the card passes the schema
    monkeypatch.setattr(pkg, "cpu_flags", lambda: flags)
    assert package.choose_variant("cpu") == chosen
    assert package.choose_variant("cuda") == "fp16"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a 7-bit int8 file opens without the VNNI warning
        if chosen == "int8":
            assert Encoder(package, variant="int8", device="cpu").variant == "int8"
