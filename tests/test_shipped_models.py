"""The model packages committed in models/: each loads, verifies, embeds within its card's parity
and reproduces its card's kNN figures; models/ holds only packages and DEFAULT, under 200 MB."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.synthetic import make_pattern
from embedserve.package import (
    Encoder,
    cpu_has_vnni,
    int8_is_7bit,
    lineage_epochs,
    load_package,
    validate_card,
)

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
PACKAGES = sorted(p.parent.name for p in MODELS.glob("*/card.json"))


def test_models_holds_only_packages_and_default_under_200_mb():
    strays = [p.name for p in MODELS.iterdir() if p.name != "DEFAULT" and p.name not in PACKAGES]
    assert not strays, f"models/ holds more than package folders and DEFAULT: {strays}"
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total < 200 * 2**20, f"models/ holds {total / 2**20:.1f} MiB"


def test_the_default_package_is_a_shipped_one_with_fp16_for_cuda():
    package = load_package(models_dir=MODELS)
    assert (MODELS / "DEFAULT").read_text().strip() == package.path.name in PACKAGES
    assert "fp16" in package.variants  # what CUDA serves


@pytest.mark.parametrize("name", PACKAGES)
def test_every_package_loads_and_every_variant_embeds(name):
    package = load_package(name, models_dir=MODELS)
    assert {"fp32", "int8"} <= set(package.variants)  # every package has its int8 file
    rng = np.random.default_rng(0)
    images = [make_pattern(c, 4, 96, rng) for c in range(4)]
    reference = None
    for variant in package.variants:
        enc = Encoder(package, variant=variant, device="cpu", intra_op_threads=2)
        vectors = enc.embed_images(images)
        assert vectors.shape == (4, package.embedding_dim) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3)
        if reference is None:
            reference = vectors
        else:  # every variant agrees with fp32 on these images
            assert float((vectors * reference).sum(1).min()) > 0.98, variant


@pytest.mark.parametrize("name", PACKAGES)
def test_a_package_trained_from_a_recipe_names_the_committed_recipe_file(name):
    """training.recipe (path, sha256) points at the recipe in the repository, unchanged since the
    run: rerunning it reproduces the run's schedule (a package made by chained warm starts has
    none, and its card says so)."""
    card = load_package(name, models_dir=MODELS).card
    record = card["training"].get("recipe")
    if record is None:  # a chain of warm starts: the card says so and where its stages are
        assert card["training"].get("init_from"), f"{name}: neither a recipe nor a lineage"
        assert "no single recipe" in card["training"].get("reproduction", ""), name
        return
    recipe = ROOT / record["path"]
    assert recipe.is_file(), f"{name}: its recipe {record['path']} is not in the repository"
    assert hashlib.sha256(recipe.read_bytes()).hexdigest() == record["sha256"], name


@pytest.mark.integration
@pytest.mark.parametrize(
    ("name", "variant"),
    [(n, v) for n in PACKAGES for v in load_package(n, models_dir=MODELS).variants if v != "fp32"],
)
def test_every_package_embeds_real_photos_within_its_recorded_parity(imagenette, name, variant):
    package = load_package(name, models_dir=MODELS)
    if variant == "int8" and not (cpu_has_vnni() or int8_is_7bit(package.card)):
        pytest.skip(
            "no VNNI on this CPU and 8-bit int8 weights: ONNX Runtime's int8 kernels saturate "
            "here (min cosine 0.817 on an AVX2 Zen 3, docs/history.md), so the card's int8 parity "
            "is a VNNI CPU's and the server serves fp32 here (7-bit weights run everywhere)"
        )
    paths = sorted((imagenette / "val").rglob("*.jpg"))[::250][:16]
    assert len(paths) == 16
    fp32 = Encoder(package, variant="fp32", device="cpu", intra_op_threads=2)
    batch = fp32.embed_images(paths)
    singles = np.concatenate([fp32.embed_images([p]) for p in paths[:4]])
    np.testing.assert_allclose(batch[:4], singles, atol=1e-5)
    record = package.card["variants"][variant]
    vectors = Encoder(package, variant=variant, device="cpu", intra_op_threads=2).embed_images(
        paths
    )
    min_cosine = float((vectors * batch).sum(1).min())
    assert min_cosine >= record["parity"]["tolerance"]["min_cosine"], (variant, min_cosine)


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("name", PACKAGES)
def test_embedserve_eval_reproduces_every_knn_figure_of_a_card(imagenette, tmp_path, name):
    """Each number in the card within 0.5 points of `embedserve eval` on the exported package
    (all of Imagenette train as the gallery, all of val as the queries)."""
    from embedserve.cli import main

    package = load_package(name, models_dir=MODELS)
    card_knn = package.card["metrics"]["knn"]
    assert card_knn, f"the card of {name} has no kNN figures"
    assert {(m["dataset"], m["bank_split"], m["split"]) for m in card_knn} == {
        ("imagenette-160", "train", "val")
    }
    argv = ["eval", "--model", name]
    argv += ["--gallery", str(imagenette / "train"), "--queries", str(imagenette / "val")]
    argv += ["--out", str(tmp_path), "--no-ann", "--grid-rows", "2", "--quiet"]
    argv += ["--variant", "fp32", "--device", "cpu", "--threads", "2"]
    assert main(argv) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    measured = {(r["k"], r["temperature"]): r["top1"] for r in report["knn"]}
    for m in card_knn:
        assert abs(measured[m["k"], m["temperature"]] - m["top1"]) <= 0.005, (m, measured)


@pytest.mark.parametrize(
    "card_path", sorted(MODELS.glob("*/card.json")), ids=lambda p: p.parent.name
)
def test_a_shipped_card_validates_and_refers_to_its_lineage_under_9_kb(card_path):
    """The lineage of warm starts is written as references (training/lineage.py), not nested
    copies of every ancestor's record: the card stays small however long the chain."""
    card = json.loads(card_path.read_text())
    validate_card(card, str(card_path))
    assert card_path.stat().st_size < 9 * 1024, f"{card_path}: {card_path.stat().st_size} bytes"
    source = card["training"].get("init_from")
    if source:
        assert "total_epochs" in source
        if source.get("kind") == "package":
            assert "init_from" not in source  # its lineage is in its own card
        total = card["training"]["epochs"] + lineage_epochs(source)
        assert card["training"]["total_epochs"] == total
