"""Scanning folders of images (labels from class folders, none from a flat folder) and embedding
them in batches through the server's engine, skipping files that are not images."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from embedserve.imagefolder import ImageFolderError, embed_files, scan_images
from embedserve.package import Encoder, load_package
from tests.conftest import make_pattern


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(load_package(), variant="fp32", device="cpu", intra_op_threads=1)


def test_class_folders_give_labels_and_a_sorted_order(image_folder):
    images = scan_images(image_folder / "train")
    assert len(images.paths) == 4 * 24
    assert images.paths == sorted(images.paths, key=str)
    assert images.classes == ["class_0", "class_1", "class_2", "class_3"]
    assert images.labels[0] == "class_0" and images.labels[-1] == "class_3"
    assert images.label_indices().tolist() == [i // 24 for i in range(96)]


def test_a_flat_folder_gives_no_labels_and_skips_hidden_and_non_images(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("b.PNG", "a.jpg", ".hidden.png"):
        Image.fromarray(make_pattern(0, 2, 20, rng)).save(tmp_path / name, format="PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    images = scan_images(tmp_path)
    assert [p.name for p in images.paths] == ["a.jpg", "b.PNG"]
    assert images.labels == [None, None] and images.classes == []


def test_a_missing_or_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ImageFolderError, match="not a folder"):
        scan_images(tmp_path / "nope")
    with pytest.raises(ImageFolderError, match="no image files"):
        scan_images(tmp_path)


def test_embedding_files_equals_the_engine_on_the_same_files(encoder, image_folder):
    paths = scan_images(image_folder / "val").paths[:10]
    result = embed_files(encoder, paths, batch_size=4, threads=2, progress=False)
    np.testing.assert_allclose(result.embeddings, encoder.embed_images(paths), atol=1e-5)
    assert result.ok.tolist() == list(range(10)) and result.failed == []
    assert result.embeddings.dtype == np.float32 and result.images_per_second > 0


def test_a_bad_image_is_skipped_with_a_warning_that_names_it(encoder, image_folder, tmp_path):
    paths = scan_images(image_folder / "val").paths[:5]
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a jpeg")
    with pytest.warns(UserWarning, match="broken.jpg"):
        result = embed_files(encoder, [*paths[:2], bad, *paths[2:]], batch_size=2, progress=False)
    assert result.ok.tolist() == [0, 1, 3, 4, 5]
    assert len(result.failed) == 1 and result.failed[0][0] == str(bad)
    np.testing.assert_allclose(result.embeddings, encoder.embed_images(paths), atol=1e-5)
