"""Recipes: one TOML file per trained model holds every option of its run (`--recipe FILE`)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from training import checkpoint
from training.config import TrainConfig, load_recipe
from training.train import main

RECIPES = sorted((Path(__file__).resolve().parents[2] / "training" / "recipes").glob("*.toml"))


def write_recipe(path: Path, data: Path, out: Path, **extra) -> Path:
    lines = [
        'method = "simsiam"',
        f'data = "{data}"',
        f'out = "{out}"',
        "image_size = 32",
        "batch_size = 16",
        "epochs = 2",
        "eval_every = 0",
        "workers = 0",
        "proj_dim = 64",
        "pred_hidden_dim = 16",
        "crop_scale = [0.4, 1.0]",
        *(f"{k} = {v}" for k, v in extra.items()),
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_recipe_sets_every_option_and_the_checkpoint_records_it(image_folder, tmp_path):
    recipe = write_recipe(tmp_path / "r.toml", image_folder, tmp_path / "run", seed=3)
    # a flag beside the recipe overrides it (here: stop after one epoch of the two)
    assert main(["--recipe", str(recipe), "--epochs", "1", "--no-progress"]) == 0
    ck = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    cfg = ck["config"]
    assert cfg["method"] == "simsiam" and cfg["seed"] == 3 and cfg["pred_hidden_dim"] == 16
    assert tuple(cfg["crop_scale"]) == (0.4, 1.0)
    assert cfg["epochs"] == 1 and ck["epoch"] == 1
    record = cfg["extra"]["recipe"]
    assert record["sha256"] == hashlib.sha256(recipe.read_bytes()).hexdigest()
    assert Path(record["path"]).name == "r.toml"


def test_a_recipe_with_an_unknown_or_invalid_option_is_refused(tmp_path, capsys):
    bad = write_recipe(tmp_path / "bad.toml", tmp_path, tmp_path / "run", image_sise=64)
    assert main(["--recipe", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "unknown option(s) image_sise" in err and "bad.toml" in err
    (tmp_path / "broken.toml").write_text("method = \n")
    assert main(["--recipe", str(tmp_path / "broken.toml")]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["--recipe", str(tmp_path / "absent.toml")]) == 2
    assert "absent.toml" in capsys.readouterr().err


def test_the_recipe_record_names_a_path_below_the_working_directory_relatively(
    tmp_path, monkeypatch
):
    (tmp_path / "recipes").mkdir()
    recipe = write_recipe(tmp_path / "recipes" / "x.toml", tmp_path, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    _, record = load_recipe(recipe)
    assert record["path"] == str(Path("recipes") / "x.toml")


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.stem for r in RECIPES])
def test_every_shipped_recipe_resolves_to_a_complete_run(recipe):
    options, record = load_recipe(recipe)
    for key in ("method", "data", "out", "epochs", "batch_size", "image_size", "eval_size", "lr"):
        assert key in options, f"{recipe.name} leaves {key} to a default"
    cfg = TrainConfig(**options).resolved()
    assert cfg.method in recipe.stem.replace("-", "_")
    assert len(record["sha256"]) == 64


def test_the_three_method_recipes_share_one_budget():
    """The equal-budget comparison: same epochs, batch size and resolution plan for all three."""
    plans = {}
    for recipe in RECIPES:
        options, _ = load_recipe(recipe)
        plans[options["method"]] = tuple(
            options.get(k) for k in ("epochs", "batch_size", "image_size", "eval_size")
        )
    if len(plans) < 3:
        pytest.skip(f"only {sorted(plans)} have recipes so far")
    assert len(set(plans.values())) == 1, plans
