"""The `embedserve` command line: index build / add / info, search (text and --json, the same
answer as SearchIndex on the engine's embeddings), eval (report, plots, embedding cache), and
exit code 2 with the file's name for input errors."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embedserve.cli import main
from embedserve.index import SearchIndex
from embedserve.package import Encoder, load_package
from tests.conftest import make_pattern, write_image_folder
from tests.embedserve.test_package import tiny_model, write_package

ROOT = Path(__file__).resolve().parents[2]
ENGINE = ["--device", "cpu", "--variant", "fp32", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def built_index(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "idx"
    assert (
        main(
            ["index", "build", "--images", str(image_folder / "train"), "--out", str(out), *ENGINE]
        )
        == 0
    )
    return out


def search_json(capsys, index: Path, images: list[str], k: int = 5, extra=()) -> list[dict]:
    capsys.readouterr()
    code = main(["search", "--index", str(index), *images, "-k", str(k), "--json", *ENGINE, *extra])
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_build_writes_an_index_of_every_image_with_labels(built_index, image_folder):
    index = SearchIndex.load(built_index, load_package())
    assert len(index) == 96
    assert index.manifest["factory"] == "Flat" and index.manifest["metric"] == "inner_product"
    path, label = index.metadata([30])[0]
    assert (
        label == "class_1" and Path(path).parent == (image_folder / "train" / "class_1").resolve()
    )


def test_search_json_is_the_index_answer_on_the_engines_embeddings(
    built_index, image_folder, capsys
):
    queries = [str(p) for p in sorted((image_folder / "val" / "class_2").glob("*.png"))[:3]]
    answer = search_json(capsys, built_index, queries, k=5)
    encoder = Encoder(load_package(), variant="fp32", device="cpu", intra_op_threads=1)
    expected = SearchIndex.load(built_index).search(encoder.embed_images(queries), 5)
    assert [a["query"] for a in answer] == queries
    assert [[h["id"] for h in a["hits"]] for a in answer] == [
        [h["id"] for h in r] for r in expected
    ]
    for a, r in zip(answer, expected, strict=True):
        np.testing.assert_allclose(
            [h["score"] for h in a["hits"]], [h["score"] for h in r], atol=1e-6
        )
    assert all(h["label"].startswith("class_") for a in answer for h in a["hits"])


def test_search_text_lists_rank_score_id_label_and_path(built_index, image_folder, capsys):
    query = str(image_folder / "val" / "class_0" / "000.png")
    assert main(["search", "--index", str(built_index), query, "-k", "2", *ENGINE]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{query}:" and len(lines) == 3
    assert lines[1].split()[0] == "1." and "[class_0]" in lines[1]


def test_index_add_keeps_ids_and_appends(built_index, image_folder, tmp_path, capsys):
    index_dir = tmp_path / "idx"
    assert (
        main(
            [
                "index",
                "build",
                "--images",
                str(image_folder / "train"),
                "--out",
                str(index_dir),
                *ENGINE,
            ]
        )
        == 0
    )
    before = SearchIndex.load(index_dir).metadata(range(96))
    extra = write_image_folder(tmp_path / "extra", num_classes=2, per_class=3, seed=7)
    assert main(["index", "add", "--index", str(index_dir), "--images", str(extra), *ENGINE]) == 0
    assert "ids 96..101" in capsys.readouterr().out
    index = SearchIndex.load(index_dir)
    assert len(index) == 102 and index.metadata(range(96)) == before
    new = str(extra / "class_1" / "002.png")
    answer = search_json(capsys, index_dir, [new], k=1)
    assert answer[0]["hits"][0]["id"] == 101 and answer[0]["hits"][0]["path"] == str(
        Path(new).resolve()
    )


def test_building_over_an_existing_index_needs_overwrite(built_index, image_folder, capsys):
    code = main(
        [
            "index",
            "build",
            "--images",
            str(image_folder / "val"),
            "--out",
            str(built_index),
            *ENGINE,
        ]
    )
    assert code == 2 and "--overwrite" in capsys.readouterr().err


def test_a_flat_folder_builds_an_index_without_labels(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(make_pattern(i, 4, 40, rng)).save(tmp_path / f"{i}.png")
    assert (
        main(["index", "build", "--images", str(tmp_path), "--out", str(tmp_path / "idx"), *ENGINE])
        == 0
    )
    index = SearchIndex.load(tmp_path / "idx")
    assert [label for _, label in index.metadata(range(4))] == [None] * 4


def test_searching_with_another_model_is_refused_with_exit_2(
    built_index, image_folder, tmp_path, capsys
):
    other = write_package(tmp_path, "tiny", tiny_model())
    query = str(image_folder / "val" / "class_0" / "000.png")
    code = main(["search", "--index", str(built_index), query, "--model", str(other), *ENGINE])
    err = capsys.readouterr().err
    default = (ROOT / "models" / "DEFAULT").read_text().strip()  # the index's model
    assert code == 2 and default in err and "'tiny'" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["index", "build", "--images", "/nonexistent/dir", "--out", "x"], "/nonexistent/dir"),
        (["search", "--index", "/nonexistent/index", "q.png"], "/nonexistent/index"),
        (["eval", "--gallery", "/nonexistent/g", "--queries", "/nonexistent/q"], "/nonexistent/g"),
    ],
)
def test_input_errors_exit_2_and_name_the_file(argv, message, capsys):
    assert main([*argv, *ENGINE]) == 2
    assert message in capsys.readouterr().err


def test_a_query_that_is_not_an_image_exits_2_and_names_it(built_index, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_text("hello")
    assert main(["search", "--index", str(built_index), str(bad), *ENGINE]) == 2
    assert str(bad) in capsys.readouterr().err
    assert (
        main(["search", "--index", str(built_index), str(tmp_path / "missing.jpg"), *ENGINE]) == 2
    )
    assert "missing.jpg: no such file" in capsys.readouterr().err


# -- thumbnails, filters, search by id, delete, replace --------------------------------------------


def test_build_stores_a_thumbnail_of_every_image_unless_told_not_to(built_index, tmp_path):
    index = SearchIndex.load(built_index)
    thumb = Image.open(io.BytesIO(index.thumbnail(0)))
    assert thumb.format == "JPEG" and max(thumb.size) <= 128
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(make_pattern(i, 4, 300, rng)).save(tmp_path / f"{i}.png")
    for flags, expected in [(["--no-thumbnails"], None), (["--thumbnail-size", "32"], (32, 32))]:
        out = tmp_path / f"idx{len(flags)}"
        argv = ["index", "build", "--images", str(tmp_path), "--out", str(out), *flags, *ENGINE]
        assert main(argv) == 0
        stored = SearchIndex.load(out).thumbnail(0)
        assert (stored if expected is None else Image.open(io.BytesIO(stored)).size) == expected


def test_search_filters_label_path_prefix_and_min_score(built_index, image_folder, capsys):
    query = str(image_folder / "val" / "class_2" / "000.png")
    labels = ["--label", "class_0", "--label", "class_3"]
    hits = search_json(capsys, built_index, [query], k=8, extra=labels)[0]["hits"]
    assert len(hits) == 8 and {h["label"] for h in hits} <= {"class_0", "class_3"}
    prefix = str((image_folder / "train" / "class_1").resolve()) + "/01"
    hits = search_json(capsys, built_index, [query], k=30, extra=["--path-prefix", prefix])[0]
    assert len(hits["hits"]) == 10 and all(h["path"].startswith(prefix) for h in hits["hits"])
    every = search_json(capsys, built_index, [query], k=96)[0]["hits"]
    threshold = every[20]["score"]
    kept = search_json(capsys, built_index, [query], k=96, extra=["--min-score", str(threshold)])
    assert [h["id"] for h in kept[0]["hits"]] == [h["id"] for h in every if h["score"] >= threshold]
    assert main(["search", "--index", str(built_index), query, "--min-score", "1.5", *ENGINE]) == 2
    assert "--min-score must be between -1 and 1" in capsys.readouterr().err


def test_search_by_id_is_more_like_a_stored_item(built_index, capsys):
    answer = search_json(capsys, built_index, [], k=5, extra=["--id", "30"])
    expected = SearchIndex.load(built_index).search_by_id(30, 5)
    assert answer == [{"query": None, "id": 30, "hits": expected}]
    assert 30 not in [h["id"] for h in expected]
    assert main(["search", "--index", str(built_index), "--id", "30", "-k", "2", *ENGINE]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "more like id 30:" and len(lines) == 3
    assert main(["search", "--index", str(built_index), "--id", "999", *ENGINE]) == 2
    assert "--id 999: no live item" in capsys.readouterr().err
    assert main(["search", "--index", str(built_index), *ENGINE]) == 2
    assert "give query IMAGE files, or --id N" in capsys.readouterr().err
    assert main(["search", "--index", str(built_index), "q.png", "--id", "3", *ENGINE]) == 2


def test_index_delete_by_id_and_path_compacts_and_never_reuses_ids(
    built_index, image_folder, tmp_path, capsys
):
    index_dir = tmp_path / "idx"
    shutil.copytree(built_index, index_dir)
    path5 = SearchIndex.load(index_dir).item(5)["path"]
    relative = os.path.relpath(path5)  # a path as the user types it: matched by the file
    capsys.readouterr()
    argv = ["index", "delete", "--index", str(index_dir), "--id", "3", "--path", relative]
    assert main(argv) == 0
    assert "deleted 2 items" in capsys.readouterr().out
    index = SearchIndex.load(index_dir)
    assert len(index) == 94 and index.item(3) is None and index.item(5) is None
    assert index.manifest["count"] == 94  # compacted on save: no deleted vector is kept
    hits = search_json(capsys, index_dir, [path5], k=94)[0]["hits"]
    assert not {3, 5} & {h["id"] for h in hits}
    argv = ["index", "delete", "--index", str(index_dir), "--id", "3", "--id", "4"]
    assert main(argv + ["--path", "/no/such.png"]) == 2
    err = capsys.readouterr().err
    assert "no live item with id 3" in err and "no live item with path /no/such.png" in err
    assert SearchIndex.load(index_dir).item(4) is None  # the others were deleted
    assert main(["index", "delete", "--index", str(index_dir)]) == 2
    assert "nothing to delete" in capsys.readouterr().err
    extra = write_image_folder(tmp_path / "extra", num_classes=1, per_class=2, seed=9)
    assert main(["index", "add", "--index", str(index_dir), "--images", str(extra), *ENGINE]) == 0
    assert "ids 96..97" in capsys.readouterr().out  # never reused


def test_index_add_replace_swaps_the_items_of_the_same_files(tmp_path, capsys):
    folder = write_image_folder(tmp_path / "photos", num_classes=2, per_class=2, seed=4)
    index_dir = tmp_path / "idx"
    build = ["index", "build", "--images", str(folder), "--out", str(index_dir), *ENGINE]
    assert main(build) == 0
    add = ["index", "add", "--index", str(index_dir), "--images", str(folder), *ENGINE]
    assert main([*add, "--replace"]) == 0
    assert "ids 4..7, replacing 4 with the same paths" in capsys.readouterr().out
    index = SearchIndex.load(index_dir)
    assert len(index) == 4 and [index.item(i) for i in range(4)] == [None] * 4
    assert index.thumbnail(4) is not None
    assert main(add) == 0  # without --replace: a second item per file
    assert len(SearchIndex.load(index_dir)) == 8


def test_eval_writes_the_report_and_plots_and_reuses_cached_embeddings(
    image_folder, tmp_path, capsys
):
    out, cache = tmp_path / "eval", tmp_path / "cache"
    argv = [
        "eval",
        "--gallery",
        str(image_folder / "train"),
        "--queries",
        str(image_folder / "val"),
    ]
    argv += ["--out", str(out), "--cache", str(cache), "--repeats", "1", *ENGINE]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "weighted kNN top-1, k=20, T=0.07" in table and "HNSW32" in table
    report = json.loads((out / "eval.json").read_text())
    assert report["command"].startswith("embedserve eval --gallery")
    assert {(r["k"], r["temperature"]) for r in report["knn"]} == {
        (20, 0.07),
        (20, 0.1),
        (200, 0.07),
        (200, 0.1),
    }
    assert set(report["retrieval"]) == {"recall@1", "recall@5", "recall@10", "map@r"}
    assert report["retrieval"]["recall@1"] > 0.9  # the patterns are easy
    assert all(0 <= r["recall@10"] <= 1 and r["qps"] > 0 for r in report["ann"])
    for png in ("recall_qps.png", "retrieval_grid.png"):
        with Image.open(out / png) as img:
            assert img.format == "PNG" and min(img.size) > 100
    assert "linear" not in report  # only on request
    assert main([*argv, "--json", "--no-ann", "--linear"]) == 0  # the second run reads the cache
    second = json.loads(capsys.readouterr().out)
    assert "cached" in second["gallery"] and "cached" in second["queries"]
    assert second["knn"] == report["knn"] and second["retrieval"] == report["retrieval"]
    assert second["linear"]["test_images"] == report["queries"]["images"]
    assert second["linear"]["top1"] > 0.9  # the patterns are easy


def test_eval_refuses_unlabelled_folders(tmp_path, capsys):
    rng = np.random.default_rng(0)
    Image.fromarray(make_pattern(0, 2, 20, rng)).save(tmp_path / "a.png")
    assert main(["eval", "--gallery", str(tmp_path), "--queries", str(tmp_path), *ENGINE]) == 2
    assert "class-per-folder" in capsys.readouterr().err


def test_eval_linear_refuses_a_one_class_gallery_before_embedding(tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "only").mkdir()
    Image.fromarray(make_pattern(0, 2, 20, rng)).save(tmp_path / "only" / "a.png")
    argv = ["eval", "--gallery", str(tmp_path), "--queries", str(tmp_path), "--linear", *ENGINE]
    assert main(argv) == 2
    assert "--linear needs a gallery of at least two classes" in capsys.readouterr().err


def test_the_console_script_shows_help():
    proc = subprocess.run(
        [sys.executable, "-m", "embedserve.cli", "index", "build", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "--factory" in proc.stdout and "index-factory" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "embedserve.cli"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 2 and "COMMAND" in proc.stderr


@pytest.mark.integration
def test_eval_on_a_slice_of_imagenette(imagenette, tmp_path, capsys):
    """A small real evaluation: 15 train images per class as the gallery, 4 val per class."""
    for split, per_class in (("train", 15), ("val", 4)):
        for class_dir in sorted((imagenette / split).iterdir()):
            target = tmp_path / split / class_dir.name
            target.mkdir(parents=True)
            for src in sorted(class_dir.iterdir())[:per_class]:
                (target / src.name).symlink_to(src)
    argv = ["eval", "--gallery", str(tmp_path / "train"), "--queries", str(tmp_path / "val")]
    assert main([*argv, "--out", str(tmp_path / "out"), "--no-ann", *ENGINE]) == 0
    report = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert report["gallery"]["images"] == 150 and report["queries"]["images"] == 40
    knn = {(r["k"], r["temperature"]): r["top1"] for r in report["knn"]}
    # chance is 0.1; the 243-epoch default model got 0.825 here
    assert knn[20, 0.07] > 0.15


def test_eval_linear_without_scikit_learn_says_what_to_install(
    image_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    argv = ["eval", "--gallery", str(image_folder / "train"), "--queries"]
    argv += [str(image_folder / "val"), "--out", str(tmp_path), "--linear", *ENGINE]
    assert main(argv) == 2
    assert "pip install 'embedserve[eval]'" in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


def test_every_index_command_works_on_milvus_lite_with_the_folders_answers(
    built_index, image_folder, tmp_path, capsys
):
    """build / info / search / search --id / add --replace / delete on a *.db answer as on the
    FAISS folder built from the same images (the ids differ: Milvus's are time-based)."""
    db = str(tmp_path / "photos.db")
    train = str(image_folder / "train")
    assert main(["index", "build", "--images", train, "--out", db, *ENGINE]) == 0
    assert "MilvusIndex" in capsys.readouterr().out
    assert main(["index", "info", "--index", db]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["count"] == 96 and info["backend"] == "milvus" and info["factory"] == "Flat"
    query = [str(image_folder / "val" / "class_2" / "000.png")]
    labels = ["--label", "class_0", "--label", "class_3"]
    for extra in ((), labels):
        on_milvus = search_json(capsys, Path(db), query, k=8, extra=extra)[0]["hits"]
        on_faiss = search_json(capsys, built_index, query, k=8, extra=extra)[0]["hits"]
        assert [h["path"] for h in on_milvus] == [h["path"] for h in on_faiss]
        assert [h["score"] for h in on_milvus] == pytest.approx([h["score"] for h in on_faiss])
    first = on_milvus[0]
    by_id = search_json(capsys, Path(db), [], k=3, extra=["--id", str(first["id"])])[0]["hits"]
    assert len(by_id) == 3 and first["id"] not in [h["id"] for h in by_id]
    extra = write_image_folder(tmp_path / "extra", num_classes=1, per_class=2, seed=9)
    add = ["index", "add", "--index", db, "--images", str(extra), *ENGINE]
    assert main(add) == 0 and main([*add, "--replace"]) == 0
    assert "replacing 2 with the same paths" in capsys.readouterr().out
    delete = ["index", "delete", "--index", db, "--id", str(first["id"]), "--path", "/no.png"]
    assert main(delete) == 2  # one missing path: exit 2 after deleting the rest
    out, err = capsys.readouterr()
    assert "deleted 1 items" in out and "it now holds 97" in out and "/no.png" in err
    assert main(["index", "build", "--images", train, "--out", db, *ENGINE]) == 2
    assert "already has a collection" in capsys.readouterr().err
