"""The serving-path index of one model version's item vectors: exact or HNSW, in memory.

Why not LanceDB's own query: it costs 2-4 ms per query however small the table (planning, a
scan task, Arrow output), while serving asks one query per request. LanceDB stays the store of
record (vectors, category, price); this index is built from it and answers in microseconds:

- **exact** (up to ``EXACT_MAX_ROWS``): a scan of the normalised vectors (``faiss.knn``, one
  thread), exact by construction and, at that size, about as fast as a graph walk.
- **hnsw** (above ``EXACT_MAX_ROWS``): faiss ``IndexHNSWFlat`` with inner product. faiss-cpu
  rather than hnswlib: well kept (wheels for every platform), inner product built in, and
  filtered search through an ``IDSelector`` evaluated inside the graph walk.

Similarity is the cosine, as LanceDB's ``cosine`` distance reports it (``1 - distance``): the
stored vectors and every query are L2-normalised, so the inner product *is* the cosine.

Recall is measured, never assumed: ``measure_recall`` compares recall@10 of the graph with
exact search on a sample of queries (half catalogue vectors, half "user-like" mixtures of three
catalogue vectors), and when ``ef_search`` is not fixed the smallest one on ``EF_LADDER`` that
reaches ``target_recall`` is chosen. Callers refuse to serve a graph measured below
``MIN_RECALL`` (``LowRecallError``) unless told otherwise.

Updates (``upsert``): a new item is added to the graph; an item whose vector changed gets a new
graph node and its old node is marked dead (HNSW cannot delete). Dead nodes are filtered out of
every search by an ``IDSelectorBitmap``; when they pass ``REBUILD_DEAD_SHARE`` of the nodes the
graph is rebuilt from the live rows (inside the update, under the lock: searches wait for it,
seconds at 100k rows, minutes at 1M; a rebuild job avoids that). A change of category or price
alone touches no node.

Filters (category, price range): the matching rows are found from row lists per category and
a price order (so a filter costs what it matches, not the catalogue). When at most
``EXACT_SUBSET_ROWS`` rows match, they are scored exactly (a small scan beats a graph walk that
must skip almost every node); otherwise the graph is walked with a bitmap of them as its
selector, and if that yields fewer than ``k`` while more match (a selective filter can starve
the walk) the matching rows are scored exactly. A filter passing a share ``s`` of the rows
walks with ``ef_search / s`` candidates (at most ``MAX_FILTERED_EF``), which keeps filtered
recall close to unfiltered recall. Either way ``k`` items come back when ``k`` match.
"""

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from aiplatform.core.errors import UserInputError

log = logging.getLogger(__name__)

EXACT_MAX_ROWS = 10_000
"""Catalogues up to this size are searched exactly: at 10k x 64 one query costs about what a
graph walk does (benchmarks/retrieval.py --quick), with perfect recall and nothing to build."""
EXACT_SUBSET_ROWS = 20_000
"""A filter matching at most this many rows is answered exactly over those rows."""
MIN_RECALL = 0.95
"""Below this measured recall@10 an HNSW graph is not served unless overridden."""
TARGET_RECALL = 0.97
"""``ef_search`` is tuned to reach this (a margin over ``MIN_RECALL`` for sampling noise)."""
EF_LADDER = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
MAX_FILTERED_EF = 1024
REBUILD_DEAD_SHARE = 0.2
RECALL_K = 10
RECALL_QUERIES = 1000
_NO_CATEGORY = -1


class LowRecallError(UserInputError):
    """The measured recall of an index is below the threshold it would be served at."""


@dataclass(frozen=True)
class HnswParams:
    """Graph parameters. ``ef_search=None``: tuned at build time to reach ``target_recall``."""

    m: int = 32
    ef_construction: int = 80
    ef_search: int | None = None
    target_recall: float = TARGET_RECALL


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), as float32, C-contiguous."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(x, axis=-1, keepdims=True)
    return np.ascontiguousarray(x / np.where(norms > 0, norms, 1.0), dtype=np.float32)


def check_price_range(price_min: float | None, price_max: float | None) -> None:
    """Refuse a price range that cannot match anything because it is malformed."""
    for name, value in (("price_min", price_min), ("price_max", price_max)):
        if value is not None and (not isinstance(value, (int, float, np.number)) or np.isnan(value)):
            raise UserInputError(f"{name} must be a number, got {value!r}")
    if price_min is not None and price_max is not None and price_min > price_max:
        raise UserInputError(
            f"price_min ({price_min}) is greater than price_max ({price_max}); "
            "pass price_min <= price_max"
        )


def _topk(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest finite scores, best first."""
    k = min(k, scores.shape[0])
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    part = np.argpartition(-scores, k - 1)[:k] if k < scores.shape[0] else np.arange(scores.shape[0])
    order = part[np.argsort(-scores[part], kind="stable")]
    return order[np.isfinite(scores[order])]


class VectorIndex:
    """Item vectors with their category and price, searchable exactly or through an HNSW graph.

    Rows live at fixed positions (the faiss node ids); ``_pos`` maps an item id to its live
    position. All public methods hold one lock, so searches never see a half-applied update.
    """

    def __init__(self, dim: int, kind: str, hnsw: HnswParams = HnswParams()) -> None:
        if kind not in ("exact", "hnsw"):
            raise UserInputError(f"index kind {kind!r} is unknown; use 'exact' or 'hnsw'")
        self.dim, self.kind, self.hnsw = int(dim), kind, hnsw
        self.ef_search = hnsw.ef_search or EF_LADDER[0]
        self.recall: float | None = 1.0 if kind == "exact" else None
        self.recall_n = 0
        self.build_seconds = 0.0
        self._n = 0
        self._vecs = np.zeros((0, self.dim), np.float32)
        self._alive = np.zeros(0, bool)
        self._cat = np.zeros(0, np.int32)
        self._price = np.zeros(0, np.float64)
        self._ids = np.zeros(0, object)
        self._pos: dict[str, int] = {}
        self._cat_code: dict[str, int] = {}
        self._dead = 0
        self._graph: Any = None
        self._alive_sel: tuple[Any, np.ndarray] | None = None
        self._by_cat: dict[int, np.ndarray] | None = None
        self._by_price: tuple[np.ndarray, np.ndarray, int] | None = None
        self._lock = threading.RLock()

    # ---- construction ------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        vectors: np.ndarray,
        categories: Sequence[str | None] | None = None,
        prices: Sequence[float] | np.ndarray | None = None,
        *,
        kind: str = "auto",
        exact_max_rows: int = EXACT_MAX_ROWS,
        hnsw: HnswParams = HnswParams(),
        measure: bool = True,
    ) -> "VectorIndex":
        """Index ``vectors`` (one row per id); ``kind='auto'`` picks exact or hnsw by size.
        For hnsw the recall is measured (and ``ef_search`` tuned) unless ``measure=False``."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise UserInputError(f"vectors: expected a 2-D array (items x dim), got shape {vectors.shape}")
        if kind == "auto":
            kind = "exact" if vectors.shape[0] <= exact_max_rows else "hnsw"
        index = cls(vectors.shape[1], kind, hnsw)
        start = time.perf_counter()
        with index._lock:
            index._append(list(map(str, ids)), normalize(vectors), categories, prices)
            if kind == "hnsw":
                index._graph = index._new_graph(index._vecs[: index._n])
        index.build_seconds = time.perf_counter() - start
        if kind == "hnsw" and measure:
            index.tune(hnsw.ef_search)
        return index

    def _new_graph(self, vectors: np.ndarray) -> Any:
        import faiss

        graph = faiss.IndexHNSWFlat(self.dim, int(self.hnsw.m), faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = int(self.hnsw.ef_construction)
        graph.hnsw.efSearch = int(self.ef_search)
        if len(vectors):
            graph.add(vectors)
        return graph

    def _append(self, ids: list[str], vecs: np.ndarray, categories: Any, prices: Any) -> np.ndarray:
        """Add rows at the end (growing the buffers by doubling); returns their positions."""
        m = len(ids)
        if vecs.shape != (m, self.dim):
            raise UserInputError(f"vectors: expected shape ({m}, {self.dim}), got {vecs.shape}")
        need = self._n + m
        if need > self._vecs.shape[0]:
            cap = max(need, 2 * self._vecs.shape[0], 1024)
            self._vecs = _grown(self._vecs, cap, 0.0)
            self._alive = _grown(self._alive, cap, False)
            self._cat = _grown(self._cat, cap, _NO_CATEGORY)
            self._price = _grown(self._price, cap, np.nan)
            self._ids = _grown(self._ids, cap, None)
        pos = np.arange(self._n, need)
        self._vecs[pos] = vecs
        self._alive[pos] = True
        self._ids[pos] = ids
        self._set_attributes(pos, categories, prices)
        for i, p in zip(ids, pos.tolist()):
            old = self._pos.get(i)
            if old is not None:  # a duplicate id: the last row wins
                self._kill(old)
            self._pos[i] = p
        self._n = need
        return pos

    def _set_attributes(self, pos: np.ndarray, categories: Any, prices: Any) -> None:
        self._by_cat = self._by_price = None  # filter caches follow the attributes
        if categories is not None:
            local, uniques = pd.factorize(pd.Series(list(categories), dtype=object), use_na_sentinel=True)
            lookup = np.array([self._cat_code.setdefault(str(c), len(self._cat_code)) for c in uniques]
                              + [_NO_CATEGORY], dtype=np.int32)
            self._cat[pos] = lookup[local]  # the sentinel -1 picks the trailing _NO_CATEGORY
        if prices is not None:
            self._price[pos] = np.asarray(prices, dtype=np.float64)

    def _kill(self, pos: int) -> None:
        if self._alive[pos]:
            self._alive[pos] = False
            self._dead += 1
        self._alive_sel = None

    # ---- updates -----------------------------------------------------------------------
    def upsert(
        self,
        ids: Sequence[str],
        vectors: np.ndarray,
        categories: Sequence[str | None] | None = None,
        prices: Sequence[float] | np.ndarray | None = None,
    ) -> dict[str, int]:
        """Insert new items and replace changed ones; searchable as soon as this returns.
        Returns counts of ``inserted``, ``updated`` (vector changed) and ``attributes_only``."""
        ids = [str(i) for i in ids]
        vecs = normalize(np.asarray(vectors).reshape(len(ids), -1)) if len(ids) else np.zeros((0, self.dim), np.float32)
        if vecs.shape[1] != self.dim:
            raise UserInputError(f"vectors: items have {vecs.shape[1]} dimensions; the index has {self.dim}")
        cats = list(categories) if categories is not None else None
        price = np.asarray(prices, dtype=np.float64) if prices is not None else None
        with self._lock:
            old = np.array([self._pos.get(i, -1) for i in ids], dtype=np.int64)
            known = old >= 0
            same = np.zeros(len(ids), bool)
            if known.any():
                same[known] = np.abs(self._vecs[old[known]] - vecs[known]).max(axis=1) <= 1e-6
            if same.any():  # only category / price changed: no graph work
                sel = np.flatnonzero(same)
                self._set_attributes(old[sel], _take(cats, sel), None if price is None else price[sel])
            changed = known & ~same
            if self.kind == "exact" and changed.any():  # no graph: overwrite in place
                sel = np.flatnonzero(changed)
                self._vecs[old[sel]] = vecs[sel]
                self._set_attributes(old[sel], _take(cats, sel), None if price is None else price[sel])
                changed[:] = False
            fresh = np.flatnonzero(~known | changed)
            if len(fresh):
                for p in old[changed]:
                    self._kill(int(p))
                new_pos = self._append([ids[j] for j in fresh], vecs[fresh], _take(cats, fresh),
                                       None if price is None else price[fresh])
                if self._graph is not None:
                    self._graph.add(self._vecs[new_pos])
            if self._graph is not None and self._dead > REBUILD_DEAD_SHARE * self._n:
                self._compact()
        return {"inserted": int((~known).sum()), "updated": int((known & ~same).sum()),
                "attributes_only": int(same.sum())}

    def remove(self, ids: Iterable[str]) -> int:
        """Mark items as gone (searches skip them); returns how many were present."""
        removed = 0
        with self._lock:
            for i in ids:
                p = self._pos.pop(str(i), None)
                if p is not None:
                    self._kill(p)
                    removed += 1
            if self._dead > REBUILD_DEAD_SHARE * max(self._n, 1):
                self._compact()
        return removed

    def _compact(self) -> None:
        """Drop dead rows and rebuild the graph (HNSW cannot delete nodes)."""
        live = np.flatnonzero(self._alive[: self._n])
        log.info("rebuilding the %s index: %d of %d rows are dead", self.kind, self._dead, self._n)
        self._vecs, self._cat, self._price = self._vecs[live].copy(), self._cat[live].copy(), self._price[live].copy()
        self._ids = self._ids[live].copy()
        self._alive = np.ones(len(live), bool)
        self._n, self._dead, self._alive_sel = len(live), 0, None
        self._by_cat = self._by_price = None
        self._pos = {i: p for p, i in enumerate(self._ids.tolist())}
        if self.kind == "hnsw":
            self._graph = self._new_graph(self._vecs)

    # ---- reading -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._pos)

    @property
    def dead(self) -> int:
        return self._dead

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._pos

    def vector_of(self, item_id: str) -> np.ndarray | None:
        """The stored (normalised) vector of an item, or None."""
        with self._lock:
            p = self._pos.get(str(item_id))
            return None if p is None else self._vecs[p].copy()

    def search(
        self,
        vector: np.ndarray,
        k: int,
        exclude: Iterable[str] = frozenset(),
        *,
        category: str | Iterable[str] | None = None,
        price_min: float | None = None,
        price_max: float | None = None,
    ) -> list[tuple[str, float]]:
        """The ``k`` items most similar to ``vector`` as (item_id, cosine), best first, among
        those matching the filters and not in ``exclude``."""
        if k <= 0:
            return []
        q = normalize(np.asarray(vector).reshape(1, -1))
        if q.shape[1] != self.dim:
            raise UserInputError(f"query vector has {q.shape[1]} dimensions; expected {self.dim}")
        check_price_range(price_min, price_max)
        filtered = category is not None or price_min is not None or price_max is not None
        with self._lock:
            excl = [p for p in (self._pos.get(str(e)) for e in exclude) if p is not None]
            if not filtered:
                allowed = len(self._pos) - len(excl)
                if allowed <= 0:
                    return []
                if self.kind == "exact":
                    return self._exact(q[0], k, None, excl)
                hits = self._walk(q, k, None, excl)
                return hits if len(hits) >= min(k, allowed) else self._exact(q[0], k, None, excl)
            rows = self._filter_rows(category, price_min, price_max, excl)
            if not len(rows):
                return []
            if self.kind == "exact" or len(rows) <= EXACT_SUBSET_ROWS:
                return self._exact(q[0], k, rows, [])
            # a filter passing a share s of the nodes needs ~1/s times the candidates for the
            # same recall: widen ef accordingly (capped; a starved walk falls back to exact)
            mask = np.zeros(self._n, bool)
            mask[rows] = True
            ef = min(MAX_FILTERED_EF, int(np.ceil(self.ef_search * self._n / len(rows))))
            hits = self._walk(q, k, mask, [], ef)
            if len(hits) < min(k, len(rows)):  # a selective filter starved the walk
                return self._exact(q[0], k, rows, [])
            return hits

    def _filter_rows(self, category: Any, price_min: float | None, price_max: float | None,
                     excl: list[int]) -> np.ndarray:
        """Positions of the live rows matching the filters, ``excl`` left out. Uses row lists
        per category and a price order (built on first use after a change), so a filtered query
        costs the size of what it matches, not of the catalogue."""
        if category is not None:
            names = [category] if isinstance(category, str) else list(category)
            codes = [self._cat_code[c] for c in map(str, names) if c in self._cat_code]
            by_cat = self._category_rows()
            parts = [by_cat[c] for c in codes if c in by_cat]
            if not parts:  # an unknown category matches nothing
                return np.zeros(0, np.int64)
            rows = parts[0] if len(parts) == 1 else np.concatenate(parts)
            if price_min is not None:
                rows = rows[self._price[rows] >= price_min]  # a missing (NaN) price never matches
            if price_max is not None:
                rows = rows[self._price[rows] <= price_max]
        else:
            order, sorted_prices, priced = self._price_order()
            lo = 0 if price_min is None else int(np.searchsorted(sorted_prices[:priced], price_min, "left"))
            hi = priced if price_max is None else int(np.searchsorted(sorted_prices[:priced], price_max, "right"))
            rows = order[lo:hi]
        if self._dead:
            rows = rows[self._alive[rows]]
        if excl:
            rows = rows[~np.isin(rows, excl)]
        return rows

    def _category_rows(self) -> dict[int, np.ndarray]:
        if self._by_cat is None:
            codes = self._cat[: self._n]
            order = np.argsort(codes, kind="stable")
            uniq, starts = np.unique(codes[order], return_index=True)
            ends = np.append(starts[1:], len(order))
            self._by_cat = {int(c): order[a:b] for c, a, b in zip(uniq, starts, ends) if c != _NO_CATEGORY}
        return self._by_cat

    def _price_order(self) -> tuple[np.ndarray, np.ndarray, int]:
        if self._by_price is None:
            price = self._price[: self._n]
            order = np.argsort(price, kind="stable")  # NaN (no price) sorts last
            self._by_price = (order, price[order], int((~np.isnan(price)).sum()))
        return self._by_price

    def _exact(self, q: np.ndarray, k: int, rows: np.ndarray | None, excl: list[int]) -> list[tuple[str, float]]:
        """Exact top-``k`` over all live rows (``rows=None``) or over the given positions.

        ``faiss.knn`` rather than a numpy product + argpartition: SIMD and a heap, about twice
        as fast for one query, and no BLAS thread pool to wake."""
        import faiss

        if rows is None and self._dead:  # rows removed from an exact index: mask them
            scores = self._vecs[: self._n] @ q
            scores[~self._alive[: self._n]] = -np.inf
            scores[excl] = -np.inf
            return [(self._ids[p], float(scores[p])) for p in _topk(scores, k)]
        base = self._vecs[: self._n] if rows is None else self._vecs[rows]
        want = min(k + len(excl), base.shape[0])
        # One query must run on one thread: with more, faiss splits the scan in an OpenMP
        # region whose wake-up costs a scheduler tick (16 ms measured) on a busy machine. The
        # setting is per thread (an OpenMP ICV), so builds elsewhere keep their threads.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, found = faiss.knn(q[None], base, want, metric=faiss.METRIC_INNER_PRODUCT)
        finally:
            faiss.omp_set_num_threads(threads)
        skip = set(excl)
        out = []
        for p, s in zip(found[0].tolist(), scores[0].tolist()):
            if p < 0:
                continue
            pos = p if rows is None else int(rows[p])
            if pos in skip:
                continue
            out.append((self._ids[pos], float(s)))
            if len(out) == k:
                break
        return out

    def _selector(self, mask: np.ndarray | None) -> tuple[Any, np.ndarray] | None:
        """An IDSelectorBitmap over ``mask`` (or over the live rows when there are dead ones);
        the bit array is returned with it because faiss only keeps a pointer."""
        import faiss

        if mask is None:
            if not self._dead:
                return None
            if self._alive_sel is None:
                self._alive_sel = self._selector(self._alive[: self._n].copy())
            return self._alive_sel
        bits = np.packbits(mask, bitorder="little")
        return faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bits)), bits

    def _walk(self, q: np.ndarray, k: int, mask: np.ndarray | None, excl: list[int],
              ef: int | None = None) -> list[tuple[str, float]]:
        import faiss

        want = min(k + len(excl), self._n)
        sel = self._selector(mask)
        ef = max(ef or self.ef_search, want)
        if sel is None and ef == self._graph.hnsw.efSearch:
            scores, pos = self._graph.search(q, want)
        else:
            params = faiss.SearchParametersHNSW(efSearch=ef)
            if sel is not None:
                params.sel = sel[0]
            scores, pos = self._graph.search(q, want, params=params)
        skip = set(excl)
        out = []
        for p, s in zip(pos[0].tolist(), scores[0].tolist()):
            if p < 0 or p in skip:
                continue
            out.append((self._ids[p], float(s)))
            if len(out) == k:
                break
        return out

    # ---- recall --------------------------------------------------------------------------
    def recall_queries(self, n: int = RECALL_QUERIES, seed: int = 0) -> np.ndarray:
        """Sample queries: half catalogue vectors, half normalised sums of three ("user-like")."""
        rng = np.random.default_rng(seed)
        live = np.flatnonzero(self._alive[: self._n])
        n = min(n, len(live))
        half = n // 2
        items = self._vecs[rng.choice(live, n - half, replace=len(live) < n - half)]
        mixes = normalize(self._vecs[rng.choice(live, (half, 3))].sum(axis=1))
        return np.ascontiguousarray(np.vstack([items, mixes]), dtype=np.float32)

    def exact_topk(self, queries: np.ndarray, k: int, chunk: int = 16384) -> np.ndarray:
        """Exact top-``k`` positions of a batch of normalised queries (live rows only)."""
        nq = queries.shape[0]
        best_s = np.full((nq, 0), -np.inf, np.float32)
        best_i = np.zeros((nq, 0), np.int64)
        for start in range(0, self._n, chunk):
            stop = min(start + chunk, self._n)
            s = queries @ self._vecs[start:stop].T
            if self._dead:
                s[:, ~self._alive[start:stop]] = -np.inf
            prev = best_i.shape[1]
            s = np.hstack([best_s, s])
            kk = min(k, s.shape[1])
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]
            carried = np.take_along_axis(best_i, np.minimum(part, prev - 1), 1) if prev else 0
            best_s = np.take_along_axis(s, part, 1)
            best_i = np.where(part < prev, carried, part - prev + start)
        order = np.argsort(-best_s, axis=1, kind="stable")
        return np.take_along_axis(best_i, order, 1)

    def _recall(self, queries: np.ndarray, truth: np.ndarray, k: int, ef: int) -> float:
        import faiss

        params = faiss.SearchParametersHNSW(efSearch=max(ef, k))
        sel = self._selector(None)
        if sel is not None:
            params.sel = sel[0]
        _, got = self._graph.search(queries, k, params=params)
        hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, truth))
        return hits / float(truth.size)

    def measure_recall(self, n_queries: int = RECALL_QUERIES, k: int = RECALL_K, seed: int = 0) -> float:
        """Recall@k of this index against exact search on ``recall_queries``; 1.0 when exact."""
        with self._lock:
            if self.kind == "exact" or not len(self._pos):
                self.recall = 1.0
                return 1.0
            q = self.recall_queries(n_queries, seed)
            k = min(k, len(self._pos))
            self.recall = self._recall(q, self.exact_topk(q, k), k, self.ef_search)
            self.recall_n = len(q)
            return self.recall

    def tune(self, ef_search: int | None = None, n_queries: int = RECALL_QUERIES, k: int = RECALL_K,
             seed: int = 0) -> float:
        """Measure recall; with ``ef_search=None`` pick the smallest ``EF_LADDER`` value that
        reaches the target (or the largest, if none does). Returns the measured recall."""
        with self._lock:
            if self.kind == "exact" or not len(self._pos):
                self.recall = 1.0
                return 1.0
            q = self.recall_queries(n_queries, seed)
            k = min(k, len(self._pos))
            truth = self.exact_topk(q, k)
            ladder = [ef_search] if ef_search else EF_LADDER
            for ef in ladder:
                recall = self._recall(q, truth, k, ef)
                if recall >= self.hnsw.target_recall:
                    break
            self.ef_search, self.recall, self.recall_n = int(ef), recall, len(q)
            self._graph.hnsw.efSearch = self.ef_search
            log.info("hnsw index of %d rows: recall@%d %.4f at ef_search %d", len(self), k, recall, ef)
            return recall

    # ---- persistence ---------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        """What the registry records about this index."""
        out: dict[str, Any] = {"kind": self.kind, "rows": len(self), "dim": self.dim, "metric": "cosine",
                               "recall_at_10": self.recall, "recall_queries": self.recall_n,
                               "build_seconds": round(self.build_seconds, 3)}
        if self.kind == "hnsw":
            out.update(m=self.hnsw.m, ef_construction=self.hnsw.ef_construction, ef_search=self.ef_search,
                       dead_rows=self._dead)
        return out

    def graph_bytes(self) -> tuple[bytes, list[str | None]]:
        """The serialised faiss graph and the item id of each of its nodes (None: dead)."""
        import faiss

        with self._lock:
            ids = [i if a else None for i, a in zip(self._ids[: self._n].tolist(), self._alive[: self._n].tolist())]
            return faiss.serialize_index(self._graph).tobytes(), ids

    @classmethod
    def from_graph(cls, data: bytes, node_ids: Sequence[str | None], hnsw: HnswParams, ef_search: int,
                   recall: float | None) -> "VectorIndex":
        """Rebuild an hnsw index from ``graph_bytes`` output (vectors are read from the graph)."""
        import faiss

        graph = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if graph.ntotal != len(node_ids):
            raise ValueError(f"graph has {graph.ntotal} nodes but {len(node_ids)} ids were stored")
        index = cls(graph.d, "hnsw", hnsw)
        n = int(graph.ntotal)
        alive = np.array([i is not None for i in node_ids], dtype=bool)
        with index._lock:
            index._vecs = np.ascontiguousarray(graph.reconstruct_n(0, n) if n else np.zeros((0, graph.d)), np.float32)
            index._alive, index._ids = alive, np.array(list(node_ids), dtype=object)
            index._cat = np.full(n, _NO_CATEGORY, np.int32)
            index._price = np.full(n, np.nan, np.float64)
            index._n, index._dead = n, int(n - alive.sum())
            index._pos = {i: p for p, i in enumerate(node_ids) if i is not None}
            index._graph = graph
            index.ef_search, index.recall = int(ef_search), recall
            graph.hnsw.efSearch = index.ef_search
        return index

    def set_attributes(self, ids: Sequence[str], categories: Sequence[str | None] | None,
                       prices: Sequence[float] | np.ndarray | None) -> None:
        """Category and price of known items (unknown ids are ignored)."""
        with self._lock:
            pos = np.array([self._pos.get(str(i), -1) for i in ids], dtype=np.int64)
            keep = np.flatnonzero(pos >= 0)
            self._set_attributes(pos[keep], _take(list(categories) if categories is not None else None, keep),
                                 None if prices is None else np.asarray(prices, np.float64)[keep])

    def live_ids(self) -> list[str]:
        return list(self._pos)


def _grown(arr: np.ndarray, cap: int, fill: Any) -> np.ndarray:
    out = np.full((cap, *arr.shape[1:]), fill, dtype=arr.dtype)
    out[: arr.shape[0]] = arr
    return out


def _take(values: list | None, idx: np.ndarray) -> list | None:
    return None if values is None else [values[j] for j in idx.tolist()]
