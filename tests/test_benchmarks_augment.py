"""benchmarks.augment_throughput measures both augmentation paths on the same images and
writes what it measured (generated images here: no dataset needed)."""

from __future__ import annotations

import json

import torch

from benchmarks import augment_throughput


def test_the_benchmark_times_both_paths_and_writes_ratios(tmp_path, monkeypatch):
    monkeypatch.setattr(augment_throughput, "IMAGENETTE_TRAIN", tmp_path / "absent")
    out = tmp_path / "aug.json"
    result = augment_throughput.main(
        ["--data", "", "--size", "32", "--batch-size", "4", "--batches", "2", "--repeats", "2",
         "--out", str(out)]
    )  # fmt: skip
    written = json.loads(out.read_text())
    assert written["pairs_per_s"] == result["pairs_per_s"]
    expected = {"per_image", "batched_cpu"} | (
        {"batched_cuda"} if torch.cuda.is_available() else set()
    )
    assert set(written["pairs_per_s"]) == expected
    assert all(len(runs) == 2 and min(runs) > 0 for runs in written["runs"].values())
    assert written["ratio_to_per_image"]["per_image"] == 1.0
    assert written["data"] == "generated" and written["batch_size"] == 4


def test_images_come_from_the_folder_when_given(tmp_path):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (20, 10), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    images = augment_throughput.load_images(tmp_path, 5)
    assert len(images) == 5 and images[0].shape == (3, 10, 20) and images[0].dtype == torch.uint8
    assert int(images[-1][0, 0, 0]) == 160  # the last pick is the last file
