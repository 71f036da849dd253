"""SearchIndex filters, "more like this" and min_score: a filtered Flat search is the exact top-k
among the matching items (numpy brute force), approximate indexes keep a sane filtered recall,
an index whose search takes no selector is filtered after searching, and a search by id uses the
stored vector and leaves the item out."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from embedserve.index import ItemNotFound, SearchIndex, SearchIndexError
from tests.embedserve.test_index import DIM, fake_package, filled_index, unit_rows
from tests.embedserve.test_index_delete import ids_of

# -- filters ----------------------------------------------------------------------------------


def labelled(n: int, factory: str = "Flat", dim: int = DIM, **params) -> SearchIndex:
    index = SearchIndex.create(fake_package(dim=dim), factory, params or None)
    paths = [f"{'a' if i % 4 else 'b'}/{i % 7}/{i}.png" for i in range(n)]
    index.add(unit_rows(n, 0, dim), paths, [f"c{i % 10}" for i in range(n)])
    return index


def brute_force(queries, gallery, allowed: np.ndarray, k: int):
    scores = queries @ gallery.T
    scores[:, ~allowed] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return [[i for i in row if allowed[i]] for row in order], scores


@pytest.mark.parametrize(
    "labels, prefix",
    [
        (["c3"], None),
        (["c1", "c7", "nope"], None),
        (None, "a/2/"),
        (["c0", "c5"], "b/"),
        (None, None),
    ],
)
def test_a_filtered_flat_search_is_the_exact_top_k_among_the_matching_items(labels, prefix):
    n = 3000
    index = labelled(n)
    deleted = np.random.default_rng(1).choice(n, 300, replace=False)
    index.delete(ids=deleted.tolist())
    index.add(unit_rows(50, 9), [f"a/2/new{i}" for i in range(50)], ["c3"] * 50)  # pending rows
    gallery = np.vstack([unit_rows(n, 0), unit_rows(50, 9)])
    paths = [f"{'a' if i % 4 else 'b'}/{i % 7}/{i}.png" for i in range(n)]
    paths += [f"a/2/new{i}" for i in range(50)]
    label_of = [f"c{i % 10}" for i in range(n)] + ["c3"] * 50
    allowed = np.ones(n + 50, bool)
    allowed[deleted] = False
    if labels:
        allowed &= np.isin(label_of, labels)
    if prefix:
        allowed &= np.array([p.startswith(prefix) for p in paths])
    assert allowed.sum() > 40
    queries = unit_rows(20, 3)
    hits = index.search(queries, 25, labels=labels, path_prefix=prefix)
    expected, scores = brute_force(queries, gallery, allowed, 25)
    for q, row in enumerate(hits):
        assert len(row) == 25  # not fewer when enough match
        assert ids_of(row) == expected[q]
        np.testing.assert_allclose([h["score"] for h in row], scores[q, expected[q]], atol=1e-5)
        assert all(allowed[h["id"]] and h["path"] == paths[h["id"]] for h in row)


def test_a_filter_matching_fewer_than_k_returns_all_of_them_and_no_match_returns_none():
    index = labelled(100)
    hits = index.search(unit_rows(2, 1), 50, labels=["c4"], path_prefix="a/")
    expected = {i for i in range(100) if i % 10 == 4 and i % 4}
    assert [set(ids_of(row)) for row in hits] == [expected, expected]
    assert index.search(unit_rows(2, 1), 5, labels=["none"]) == [[], []]
    assert index.search(unit_rows(1, 1), 50, labels="c4") == index.search(
        unit_rows(1, 1), 50, labels=["c4"]
    )
    assert list(index.labels()) == [f"c{i}" for i in range(10)]
    assert index.search(unit_rows(1, 1), 5, path_prefix="zzz") == [[]]
    assert (
        index.search(unit_rows(1, 1), 5, path_prefix="a/3/3")[0]
        == index.search(unit_rows(1, 1), 5, path_prefix="a/3/3")[0]
    )


def test_path_prefix_is_literal_and_works_before_and_after_a_save(tmp_path):
    index = SearchIndex.create(fake_package())
    names = ["p_x/1", "p%x/2", "p_x/3", "pax/4", "p_x", "p_\U0001f600/5", "q/6"]
    index.add(unit_rows(len(names), 0), names)
    for _ in range(2):
        hits = index.search(unit_rows(1, 0), 10, path_prefix="p_x")[0]
        assert sorted(h["path"] for h in hits) == ["p_x", "p_x/1", "p_x/3"]
        hits = index.search(unit_rows(1, 0), 10, path_prefix="p_\U0001f600")[0]
        assert [h["path"] for h in hits] == ["p_\U0001f600/5"]
        index.save(tmp_path / "idx")
        index = SearchIndex.load(tmp_path / "idx")


@pytest.mark.parametrize(
    "factory, params", [("IVF32,Flat", {"nprobe": 8}), ("HNSW16", {"efSearch": 64})]
)
def test_filtered_recall_of_approximate_indexes_is_sane(factory, params):
    dim = 32
    index = labelled(4000, factory, dim, **params)
    gallery, queries = unit_rows(4000, 0, dim), unit_rows(50, 1, dim)

    def recall(hits, expected) -> float:
        return np.mean(
            [len(set(ids_of(r)) & set(e)) / 10 for r, e in zip(hits, expected, strict=True)]
        )

    unfiltered = recall(
        index.search(queries, 10), brute_force(queries, gallery, np.ones(4000, bool), 10)[0]
    )
    index.delete(ids=list(range(0, 4000, 10)))  # 10% deleted
    allowed = np.array([i % 10 == 3 for i in range(4000)])  # a 10% label filter
    expected, _ = brute_force(queries, gallery, allowed, 10)
    hits = index.search(queries, 10, labels=["c3"])
    assert all(allowed[h["id"]] for row in hits for h in row)
    assert all(len(row) == 10 for row in hits)
    # random 32-d data: IVF32 nprobe 8 finds 0.71 of the top 10; with the filter the search
    # is widened (nprobe 8 / sqrt(0.1) = 26 lists) and finds 0.98 of the filtered top 10
    # (without widening, 0.59: they lie farther away, in more lists); HNSW 0.99 and 0.99
    assert recall(hits, expected) >= unfiltered - 0.05 and recall(hits, expected) >= 0.9
    # the index's own nprobe / efSearch are carried into the filtered search
    core = faiss.try_extract_index_ivf(index.index)
    if core is not None:
        core.nprobe = 32  # every list: exact
        hits = index.search(queries, 10, labels=["c3"])
        assert [ids_of(r) for r in hits] == expected


# -- more like this, min_score ----------------------------------------------------------------


@pytest.mark.parametrize("factory", ["Flat", "IVF4,Flat", "HNSW16"])
def test_search_by_id_uses_the_stored_vector_and_excludes_the_item(factory):
    index = filled_index(300, factory, nprobe=4) if "IVF" in factory else filled_index(300, factory)
    gallery = unit_rows(300, 0)
    hits = index.search_by_id(17, k=5)
    assert 17 not in ids_of(hits) and len(hits) == 5
    expected = index.search(gallery[[17]], 6)[0]
    assert ids_of(hits) == [i for i in ids_of(expected) if i != 17][:5]
    filtered = index.search_by_id(17, k=5, labels=["c1"])
    assert all(h["label"] == "c1" and h["id"] != 17 for h in filtered) and len(filtered) == 5
    index.delete(ids=[17])
    with pytest.raises(ItemNotFound, match="no item with id 17"):
        index.search_by_id(17)
    with pytest.raises(KeyError):
        index.search_by_id(12345)
    assert issubclass(ItemNotFound, SearchIndexError)


def test_min_score_keeps_only_hits_at_or_above_it():
    index = filled_index(500)
    queries = unit_rows(5, 2)
    full = index.search(queries, 50)
    for threshold in (0.2, 0.6, 1.01):
        hits = index.search(queries, 50, min_score=threshold)
        for row, all_row in zip(hits, full, strict=True):
            assert row == [h for h in all_row if h["score"] >= threshold]
    assert len(index.search_by_id(3, 500, min_score=-1.0)) == 499


def test_an_index_whose_search_refuses_selectors_is_filtered_after_searching():
    index = labelled(2000, "PQ4x4")  # IndexPQ's search takes no selector
    index.delete(ids=list(range(0, 2000, 10)))
    hits = index.search(unit_rows(10, 1), 10, labels=["c3"], path_prefix="a/")
    assert all(len(row) == 10 for row in hits)
    assert all(h["label"] == "c3" and h["path"].startswith("a/") for row in hits for h in row)
    assert index.search(unit_rows(1, 1), 10, labels=["nope"]) == [[]]


def test_the_search_parameters_travel_with_the_selector():
    from embedserve import index_ids

    hnsw = SearchIndex.create(fake_package(), "HNSW16", {"efSearch": 77})
    ivf = SearchIndex.create(fake_package(), "IVF4,Flat", {"nprobe": 3})
    selector = faiss.IDSelectorAll()
    assert index_ids._params(hnsw.index, selector).efSearch == 77
    assert index_ids._params(ivf.index, selector).nprobe == 3
    # a selector keeping a share s of the vectors widens the search by 1 / sqrt(s)
    assert index_ids._params(hnsw.index, selector, 0.25).efSearch == 154
    assert index_ids._params(hnsw.index, selector, 1e-9).efSearch == index_ids.MAX_EF_SEARCH
    assert index_ids._params(ivf.index, selector, 0.25).nprobe == 4  # every list, no more
    assert index_ids._params(ivf.index, selector, 1.0).nprobe == 3
    assert isinstance(hnsw.index, faiss.IndexIDMap2)  # not IVF: an IDMap2 holds the ids
    assert faiss.extract_index_ivf(ivf.index).direct_map.type == faiss.DirectMap.Hashtable
