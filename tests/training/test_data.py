"""Class-per-folder data, held-out splits, in-memory decoding and the epoch sampler."""

import numpy as np
import pytest
import torch

from training.augment import TwoViews
from training.data import (
    EpochSampler,
    TwoViewDataset,
    load_into_memory,
    load_splits,
    scan_folder,
    stratified_split,
)


def test_scan_folder_sorts_classes_into_labels(image_folder):
    s = scan_folder(image_folder / "train")
    assert s.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert len(s) == 96 and np.bincount(s.labels).tolist() == [24] * 4
    assert all(f"class_{label}" in path for path, label in zip(s.items, s.labels, strict=True))


def test_scan_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        scan_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class folders"):
        scan_folder(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no images"):
        scan_folder(tmp_path)


def test_train_and_val_folders_are_the_splits(image_folder):
    train, held = load_splits(str(image_folder))
    assert len(train) == 96 and len(held) == 32


def test_holdout_from_train_never_touches_val(image_folder):
    train, held = load_splits(
        str(image_folder), holdout_fraction=0.25, seed=0, holdout_from_train=True
    )
    val = set(scan_folder(image_folder / "val").items)
    assert len(train) == 72 and len(held) == 24
    assert not (set(train.items) | set(held.items)) & val
    assert not set(train.items) & set(held.items)


def test_a_flat_folder_gets_a_stratified_disjoint_holdout(image_folder):
    train, held = load_splits(str(image_folder / "train"), holdout_fraction=0.25, seed=0)
    assert np.bincount(held.labels).tolist() == [6] * 4
    assert not set(train.items) & set(held.items)
    a, b = stratified_split(train.labels, 0.5, seed=1), stratified_split(train.labels, 0.5, seed=1)
    assert np.array_equal(a[1], b[1])


def test_in_memory_equals_decoding_on_demand(image_folder):
    lazy = scan_folder(image_folder / "val")
    cached = load_into_memory(lazy)
    assert isinstance(cached.items, np.ndarray) and cached.items.shape == (32, 40, 40, 3)
    aug = TwoViews("simsiam", 32)
    a, b = TwoViewDataset(lazy, aug, seed=5), TwoViewDataset(cached, aug, seed=5)
    for i in (0, 17):
        assert all(torch.equal(x, y) for x, y in zip(a[i], b[i], strict=True))


def test_views_depend_on_seed_epoch_and_index_only(image_folder):
    ds = TwoViewDataset(scan_folder(image_folder / "val"), TwoViews("byol", 32), seed=0)
    first = ds[3]
    ds[7]  # drawing other samples in between changes nothing
    assert torch.equal(ds[3][0], first[0])
    ds.epoch = 1
    assert not torch.equal(ds[3][0], first[0])


def test_epoch_sampler_shards_resumes_and_reshuffles():
    full = list(EpochSampler(100, 10, seed=0))
    assert len(full) == 100 and sorted(full) == list(range(100))
    r0, r1 = (
        list(EpochSampler(100, 10, seed=0, rank=0, world_size=2)),
        list(EpochSampler(100, 10, seed=0, rank=1, world_size=2)),
    )
    assert len(r0) == len(r1) == 50 and not set(r0) & set(r1)
    s = EpochSampler(100, 10, seed=0)
    s.set_epoch(0, start_step=3)
    assert list(s) == full[30:] and len(s) == 70
    s.set_epoch(1)
    assert list(s) != full


def test_epoch_sampler_refuses_a_batch_larger_than_the_data():
    with pytest.raises(ValueError, match="lower --batch-size"):
        EpochSampler(10, 16)
