"""The FAISS side of a search index's ids: building, searching with selectors, removing.

Every index holds explicit ids, so an item keeps its id when others are deleted and removed:

    index = build_id_index(dim, "HNSW32")      # "IDMap2,HNSW32"; IVF indexes hold ids themselves
    add_with_ids(index, x, ids)                 # trains an untrained index on x first
    scores, ids = search(index, x, k, mask)     # exact top-k among mask[id] on a Flat index
    index = remove(index, ids)                  # remove_ids in place (Flat, IVF, PQ, SQ) ...
    index = rebuild(index, ids)                 # ... or a new index from the survivors (HNSW)
    index = convert_v1(index)                   # a format-1 index (sequential ids) in the new form

Non-IVF factories are wrapped as "IDMap2,<factory>" (reconstruct by id works); IVF factories use
their own add_with_ids with a hash-table direct map (reconstruct and remove_ids by id work).
Filters and deletions are FAISS selectors (an IDSelectorBitmap over the id space) passed in the
search parameters; since these parameters replace the index's own, they carry its nprobe
(IVF) or efSearch (HNSW), widened when the selector keeps a share s < 1 of the vectors: by
1 / sqrt(s) (nprobe up to every list, efSearch up to MAX_EF_SEARCH). The index's own setting
would find fewer matching vectors in the lists it probes (recall falls as the filter narrows);
widening by 1 / s would restore them but scans 1 / s as many list entries, several times the
time of an unfiltered search; the square root keeps a filtered search near the unfiltered time
and most of the recall (benchmarks.search_filters measures both). Indexes
whose search refuses a selector (PQ without IVF) are searched for more than k and filtered
afterwards.
"""

from __future__ import annotations

import faiss
import numpy as np

from embedserve.index_format import SearchIndexError

MAX_EF_SEARCH = 256  # the widest HNSW search a filter asks for (cost grows with efSearch)


def build_faiss_index(dim: int, factory: str) -> faiss.Index:
    """An empty inner-product FAISS index from an index-factory string (as given)."""
    try:
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise SearchIndexError(f"invalid FAISS factory string {factory!r}: {e}") from e


def set_search_parameters(index: faiss.Index, **params: int) -> None:
    """Set search-time parameters (nprobe for IVF, efSearch for HNSW) on any FAISS index."""
    space = faiss.ParameterSpace()
    for name, value in params.items():
        space.set_index_parameter(index, name, value)


def build_id_index(dim: int, factory: str) -> faiss.Index:
    """An empty index for `factory` that stores explicit ids (see the module's docstring)."""
    index = build_faiss_index(dim, factory)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index
    if isinstance(index, faiss.IndexIDMap2):
        return index
    return build_faiss_index(dim, f"IDMap2,{factory}")


def convert_v1(index: faiss.Index) -> faiss.Index:
    """A format-1 index (ids 0..n-1 by position, no id map) as an id index holding the same
    vectors under the same ids. Nothing is re-encoded or re-added: IVF gets its direct map,
    others are wrapped in an IDMap2 that maps id i to position i."""
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)
        return index
    wrapper = faiss.IndexIDMap2(faiss.IndexFlatIP(index.d))
    wrapper.index = index
    wrapper.referenced_objects = [index]  # keeps the wrapped index alive with the wrapper
    wrapper.ntotal = index.ntotal
    wrapper.is_trained = index.is_trained
    faiss.copy_array_to_vector(np.arange(index.ntotal, dtype=np.int64), wrapper.id_map)
    wrapper.construct_rev_map()
    return wrapper


def train_if_needed(index: faiss.Index, x: np.ndarray, factory: str) -> None:
    if not index.is_trained:
        try:
            index.train(x)
        except RuntimeError as e:
            raise SearchIndexError(
                f"cannot train a {factory!r} index on {len(x)} vectors: {e}"
            ) from e


def _core(index: faiss.Index) -> faiss.Index:
    """The index under any IDMap2 / pre-transform wrappers."""
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexIDMap2 | faiss.IndexIDMap | faiss.IndexPreTransform):
        index = faiss.downcast_index(index.index)
    return index


def bitmap(mask: np.ndarray) -> np.ndarray:
    """The bitmap of a bool mask over ids, as IDSelectorBitmap reads it."""
    return np.packbits(mask, bitorder="little")


def _params(
    index: faiss.Index, selector: faiss.IDSelector, share: float = 1.0
) -> faiss.SearchParameters:
    """Search parameters with this selector and the index's own nprobe / efSearch, widened by
    1 / sqrt(`share`) (`share`: the share of the index's vectors the selector keeps)."""
    widen = 1.0 / np.sqrt(min(1.0, max(share, 1e-6)))
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        nprobe = min(ivf.nlist, max(ivf.nprobe, round(ivf.nprobe * widen)))
        return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe, max_codes=ivf.max_codes)
    core = _core(index)
    if isinstance(core, faiss.IndexHNSW):
        ef = core.hnsw.efSearch
        ef = max(ef, min(MAX_EF_SEARCH, round(ef * widen)))
        return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
    return faiss.SearchParameters(sel=selector)


def search(
    index: faiss.Index,
    x: np.ndarray,
    k: int,
    mask: np.ndarray | None = None,
    bits: np.ndarray | None = None,
    count: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k best of `index` for each row of x among the ids where `mask` (a bool array over
    the id space; ids beyond it excluded) is True; `bits` is the mask's bitmap and `count` its
    number of True ids (computed when not given). -1 ids where fewer are found. Without a
    mask, a plain search."""
    if mask is None:
        return index.search(x, k)
    if bits is None:
        bits = bitmap(mask)
    selector = faiss.IDSelectorBitmap(len(bits), faiss.swig_ptr(bits))
    share = (int(mask.sum()) if count is None else count) / max(1, index.ntotal)
    try:
        return index.search(x, k, params=_params(index, selector, share))
    except RuntimeError as e:
        if "selector" not in str(e) and "params" not in str(e):
            raise
    return _search_then_filter(index, x, k, mask)


def _search_then_filter(
    index: faiss.Index, x: np.ndarray, k: int, mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """For indexes that refuse selectors: search for more and more until k matching hits (or
    the whole index) come back, keeping the matching ones in order."""
    scores = np.full((len(x), k), -np.inf, np.float32)
    ids = np.full((len(x), k), -1, np.int64)
    todo = np.arange(len(x))
    fetch = min(max(4 * k, 64), index.ntotal)
    while len(todo):
        s, i = index.search(x[todo], fetch)
        keep = (i >= 0) & (i < len(mask))
        keep[keep] = mask[i[keep]]
        left = []
        for row, q in enumerate(todo):
            hit_s, hit_i = s[row][keep[row]][:k], i[row][keep[row]][:k]
            scores[q, : len(hit_i)], ids[q, : len(hit_i)] = hit_s, hit_i
            if len(hit_i) < k and fetch < index.ntotal:
                left.append(q)
        todo = np.asarray(left, np.int64)
        fetch = min(fetch * 4, index.ntotal)
    return scores, ids


def add_with_ids(index: faiss.Index, x: np.ndarray, ids: np.ndarray, factory: str) -> None:
    train_if_needed(index, x, factory)
    index.add_with_ids(x, ids)


def reconstruct(index: faiss.Index, item_id: int) -> np.ndarray:
    """The stored vector of an id (approximate for compressed indexes), float32 [1, D]."""
    return index.reconstruct(int(item_id)).reshape(1, -1)


def needs_rebuild(index: faiss.Index) -> bool:
    """Whether FAISS cannot remove vectors from this index in place (HNSW, NSG)."""
    return isinstance(_core(index), faiss.IndexHNSW | faiss.IndexNSG)


def rebuild(index: faiss.Index, ids: np.ndarray, factory: str) -> faiss.Index:
    """A new index of the same factory holding the vectors of `index` but those of `ids`;
    `index` is only read (searches may go on)."""
    return _rebuild(index, np.ascontiguousarray(ids, dtype=np.int64), factory)


def remove(index: faiss.Index, ids: np.ndarray, factory: str) -> faiss.Index:
    """`index` without the vectors of `ids` (which it holds): removed in place where FAISS can,
    else a new index of the same factory rebuilt from the survivors."""
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    if len(ids) == 0:
        return index
    if faiss.try_extract_index_ivf(index) is not None:
        # IVF with a hash-table direct map removes an IDSelectorArray's ids one by one
        selector = faiss.IDSelectorArray(len(ids), faiss.swig_ptr(ids))
    else:
        # every stored id is tested: a hash set (IDSelectorArray's test is a linear scan,
        # which made removing 10^5 of 10^6 Flat vectors take 50 s)
        selector = faiss.IDSelectorBatch(len(ids), faiss.swig_ptr(ids))
    try:
        index.remove_ids(selector)  # the save checks that the counts agree
    except RuntimeError:
        return _rebuild(index, ids, factory)
    return index


def _rebuild(index: faiss.Index, ids: np.ndarray, factory: str) -> faiss.Index:
    wrapper = faiss.downcast_index(index)
    if not isinstance(wrapper, faiss.IndexIDMap2):
        raise SearchIndexError(f"a {factory!r} index can neither remove nor rebuild")
    all_ids = faiss.vector_to_array(wrapper.id_map)
    keep = ~np.isin(all_ids, ids)
    fresh = build_id_index(index.d, factory)
    _copy_search_settings(index, fresh)
    inner, chunk = faiss.downcast_index(wrapper.index), 65536
    parts = [
        inner.reconstruct_n(start, min(chunk, len(all_ids) - start))[keep[start : start + chunk]]
        for start in range(0, len(all_ids), chunk)
    ]
    if keep.any():
        add_with_ids(fresh, np.vstack(parts).astype(np.float32), all_ids[keep], factory)
    return fresh


def _copy_search_settings(old: faiss.Index, new: faiss.Index) -> None:
    old_core, new_core = _core(old), _core(new)
    if isinstance(old_core, faiss.IndexHNSW) and isinstance(new_core, faiss.IndexHNSW):
        new_core.hnsw.efSearch = old_core.hnsw.efSearch
        new_core.hnsw.efConstruction = old_core.hnsw.efConstruction
