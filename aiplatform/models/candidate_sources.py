"""The candidate sources and the ranker's features: what one request computes.

Every source is a lookup into arrays fitted offline (``ItemTables``: item neighbour lists for
co-occurrence and EASE, popularity vectors, per-category top items, the small category model),
so the per-request work is a few numpy operations over the user's recent events; the features
(~60 per candidate: each source's score and rank, item popularity and price, the user's
category shares at several half-lives, the user's own events on the item, activity counts) come
from the same two inputs. Nothing here can see the future of either.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from aiplatform.models.category_model import CategoryModel
from aiplatform.models.category_model import lgb_predict as predict
from aiplatform.models.category_model import session_weights as _session_weights
from aiplatform.models.user_history import TYPE_WEIGHTS

if TYPE_CHECKING:
    from aiplatform.models.user_history import History

HALF_LIVES = (1.0, 3.0, 7.0, 21.0, 1e9)  # days; 1e9 = no decay
POP_WINDOWS = (1, 7, 30)  # days
INTERNAL_SOURCES = ("cooc", "ease", "pop", "catpop", "own")


@dataclass
class CandidateConfig:
    """Knobs of the sources, the features and the ranker (saved with the artifact)."""

    per_source: int = 100  # candidates kept per source and user
    neighbours: int = 100  # neighbour-list length per item (co-occurrence, EASE)
    cooc_window: int = 10
    ease_lambda: float = 500.0
    ease_weighting: str = "binary"
    history_len: int = 20  # items the item-item sources read (the feature service's last_items)
    history_events: int = 500  # a user's most recent events the sources and features read ...
    history_days: float | None = None  # ... within this many days (None: any age)
    history_window_days: float = 30.0
    catpop_half_life: float = 7.0  # the category affinity used when there is no category model
    category_model: bool = True  # learn the next-horizon category distribution (category_model.py)
    incat_half_life: float = 60.0  # days
    catpop_categories: int = 5  # a user's top categories the catpop source draws from
    horizon_days: int = 7
    n_windows: int = 2  # training windows (T_w = train_end - w * horizon)
    min_window_users: int = 200  # fewer users in a window's time split: one per-user split instead
    label: str = "binary"  # "binary" | "graded" (click 1, cart 2, purchase 3)
    objective: str = "lambdarank"  # LightGBM objective: "lambdarank" (listwise) or "binary" (pointwise)
    num_leaves: int = 15
    learning_rate: float = 0.02
    n_estimators: int = 600
    min_child_samples: int = 200
    features: tuple[str, ...] | None = None  # None = all; an ablation drops some
    sources: tuple[str, ...] = INTERNAL_SOURCES
    events_features: tuple[str, ...] = ("recent_items", "recent_types", "recent_times")
    """The feature service's three aligned ``last_n`` lists (item ids, event types, times) that
    serving builds a ``History`` from; the training job checks them against the declaration and
    takes ``history_events``/``history_days`` from their ``n`` and window."""


@dataclass
class ItemTables:
    """Everything about items a request needs, fitted at one time from events up to it."""

    item_ids: np.ndarray
    category: np.ndarray  # [n] category code (0.. n_cat - 1; unknown categories share one code)
    n_categories: int
    log_price: np.ndarray  # [n] (nan unknown)
    pop: np.ndarray  # [n, len(POP_WINDOWS)] funnel-weighted event counts in the last 1/7/30 days
    incat: np.ndarray  # [n] share of its category's views (decayed with ``incat_half_life``)
    cat_top: np.ndarray  # [n_cat, m] item codes by in-category popularity (-1 padding)
    cooc_idx: np.ndarray  # [n, N] neighbour codes (-1 padding)
    cooc_val: np.ndarray  # [n, N]
    ease_idx: np.ndarray
    ease_val: np.ndarray
    category_model: CategoryModel | None = None
    _code_of: dict[str, int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def codes(self, item_ids: Sequence[str]) -> np.ndarray:
        """Catalogue codes of ``item_ids`` (-1: not in the catalogue). A dict, built once: a
        request's few thousand ids cost ~0.2 ms, where ``pd.Index.get_indexer`` on pandas'
        string dtype costs ~0.7 ms a call and a new Index each batch more."""
        if self._code_of is None:
            self._code_of = {str(i): c for c, i in enumerate(self.item_ids)}
        return np.fromiter(map(self._code_of.get, item_ids, repeat(-1, len(item_ids))), dtype=np.int64,
                           count=len(item_ids))

    def category_probabilities(self, history: "History", config: "CandidateConfig") -> np.ndarray:
        """[B, n_cat] each user's expected share of next-horizon sessions per category: the
        category model when fitted, else the session affinity with ``catpop_half_life``."""
        if self.category_model is not None:
            return self.category_model.predict(history.row, self.category[history.items], history.ages, len(history))
        return category_affinity(history, self.n_categories, self.category, config.catpop_half_life)


# ---- candidate sources -------------------------------------------------------------------------
Cands = tuple[np.ndarray, np.ndarray, np.ndarray]  # (row, item code, score)


def _top_per_row(row: np.ndarray, item: np.ndarray, score: np.ndarray, m: int) -> Cands:
    order = np.lexsort((item, -score, row))
    row, item, score = row[order], item[order], score[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    keep = rank < m
    return row[keep], item[keep], score[keep]


def _dense(size: int, n: int) -> bool:
    """Whether an array over every (row, item) key (``size`` of them) costs less than sorting the
    ``n`` keys at hand: true for a serving batch (32 users x a catalogue of thousands), false
    for an offline batch of many thousand users."""
    return size <= 8 * n + (1 << 16)


def _dense_sums(key: np.ndarray, weight: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, summed ``weight``) of every key in ``0..size-1``; ``bincount`` adds in input order,
    which is what makes the dense paths bit-identical to the sorted ones."""
    return np.bincount(key, minlength=size), np.bincount(key, weights=weight, minlength=size)


def _aggregate(row: np.ndarray, item: np.ndarray, weight: np.ndarray, n_items: int,
               dense: bool | None = None) -> Cands:
    """The summed ``weight`` per distinct (row, item), ordered by row then item.

    Two ways, the same result to the bit (both sum in input order): counting into a dense
    [rows x items] array when that is not much bigger than the input (a serving batch), else
    sorting the keys (``np.unique``; large offline batches). The sort was the serving path's
    largest single cost (~14 % of a batch's CPU)."""
    key = row.astype(np.int64) * n_items + item
    size = int(key.max()) + 1 if len(key) else 0
    if dense if dense is not None else _dense(size, len(key)):
        counts, sums = _dense_sums(key, weight, size)
        uniq = np.flatnonzero(counts)
        return uniq // n_items, uniq % n_items, sums[uniq]
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq // n_items, uniq % n_items, np.bincount(inv, weights=weight, minlength=len(uniq))


def _top_summed(row: np.ndarray, item: np.ndarray, weight: np.ndarray, n_items: int, n_rows: int, m: int,
                dense: bool | None = None) -> Cands:
    """``_top_per_row(*_aggregate(row, item, weight, n_items), m)``, bit for bit, without sorting
    every sum when the [rows x items] sums fit in a dense array (``_top_dense``). A neighbour
    source sums ~10,000 (user, item) pairs per batch and keeps 100 per user: sorting all of them
    was a tenth of a request's CPU."""
    size = n_rows * n_items
    if len(row) and m < n_items and (dense if dense is not None else _dense(size, len(row))):
        counts, sums = _dense_sums(row.astype(np.int64) * n_items + item, weight, size)
        top = _top_dense((counts > 0).reshape(n_rows, n_items), sums.reshape(n_rows, n_items), m)
        if top is not None:
            return top
    return _top_per_row(*_aggregate(row, item, weight, n_items, dense), m)


def _top_distinct(row: np.ndarray, item: np.ndarray, score: np.ndarray, n_items: int, n_rows: int, m: int) -> Cands:
    """``_top_per_row(row, item, score, m)`` for candidates given once per (row, item) (the
    catpop source: an item has one category), through ``_top_dense`` when that is cheap; the
    sort when a pair repeats or the array would be large."""
    size = n_rows * n_items
    if len(row) and m < n_items and _dense(size, len(row)):
        key = row.astype(np.int64) * n_items + item
        counts = np.bincount(key, minlength=size)
        if counts.max() == 1:
            values = np.zeros(size)
            values[key] = score
            top = _top_dense((counts > 0).reshape(n_rows, n_items), values.reshape(n_rows, n_items), m)
            if top is not None:
                return top
    return _top_per_row(row, item, score, m)


def _top_dense(present: np.ndarray, values: np.ndarray, m: int) -> Cands | None:
    """Each row's top ``m`` of ``values`` [rows, items] where ``present``, in ``_top_per_row``'s
    order (score descending, then item): one ``np.partition`` finds each row's ``m``-th largest
    value, the items above it are kept, then those equal to it in item order (the tie rule) up
    to ``m``, and only the kept ``rows x m`` are sorted. None when a value is not finite (the
    tie rule needs ordered values): the caller sorts instead."""
    if not np.isfinite(values[present]).all():
        return None
    if present.sum(axis=1).max() <= m:  # every row keeps all it has (a user's own items): no cut
        keep = present
    else:
        masked = np.where(present, values, -np.inf)
        kth = -np.partition(-masked, m - 1, axis=1)[:, m - 1:m]  # [rows, 1]; -inf: fewer than m items
        above = masked > kth
        tied = (masked == kth) & present
        keep = above | (tied & (np.cumsum(tied, axis=1) <= m - above.sum(axis=1, keepdims=True)))
    r, i = np.nonzero(keep)  # by row, then item
    s = values[r, i]
    order = np.lexsort((-s, r))  # stable: equal scores stay in item order
    return r[order].astype(np.int64), i[order].astype(np.int64), s[order]


def _neighbour_source(rows: np.ndarray, hist_items: np.ndarray, idx: np.ndarray, val: np.ndarray,
                      n_items: int, n_rows: int, m: int) -> Cands:
    """Sum of the history items' neighbour weights: co-occurrence and EASE at serving cost."""
    nb_i, nb_v = idx[hist_items], val[hist_items]  # [H, N]
    r = np.repeat(rows, nb_i.shape[1])
    i, v = nb_i.reshape(-1), nb_v.reshape(-1)
    ok = i >= 0
    return _top_summed(r[ok], i[ok], v[ok], n_items, n_rows, m)


def session_weights(history: "History") -> np.ndarray:
    """Per event, 1 / (events in its browsing session): summing them counts sessions, not
    events, so one long session does not outweigh several short ones."""
    return _session_weights(history.row, history.ages)


def _per_row_and_category(row: np.ndarray, cat: np.ndarray, weight: np.ndarray, n_rows: int,
                          n_categories: int) -> np.ndarray:
    """[rows, categories] sums of ``weight``: ``np.add.at`` by a ``bincount`` (both add in input
    order from zero, so the same bits; the bincount is ~7x faster, and a batch makes a dozen)."""
    key = row.astype(np.int64) * n_categories + cat
    return np.bincount(key, weights=weight, minlength=n_rows * n_categories).reshape(n_rows, n_categories)


def category_affinity(history: "History", n_categories: int, category: np.ndarray, half_life: float,
                      by_session: bool = True) -> np.ndarray:
    """[B, n_cat] share of the user's sessions (or events) per category, each weighted
    ``0.5 ** (age / half-life)``: an estimate of where the user's next sessions go."""
    w = 0.5 ** (history.ages / half_life)
    if by_session:
        w = w * session_weights(history)
    out = _per_row_and_category(history.row, category[history.items], w, len(history), n_categories)
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def source_candidates(tables: ItemTables, history: "History", config: CandidateConfig,
                      category_probabilities: np.ndarray | None = None) -> dict[str, Cands]:
    """Each internal source's top ``per_source`` candidates per user (before exclusions).
    ``category_probabilities``: ``tables.category_probabilities(history, config)`` when the
    caller has it already (the features need it too; it runs a LightGBM model)."""
    m, n, b = config.per_source, tables.n_items, len(history)
    out: dict[str, Cands] = {}
    rows, hist = history.recent_distinct(config.history_len, config.history_window_days)
    if "cooc" in config.sources:
        out["cooc"] = _neighbour_source(rows, hist, tables.cooc_idx, tables.cooc_val, n, b, m)
    if "ease" in config.sources and (tables.ease_idx >= 0).any():
        out["ease"] = _neighbour_source(rows, hist, tables.ease_idx, tables.ease_val, n, b, m)
    if "pop" in config.sources:
        top = np.argsort(-tables.pop[:, 1], kind="stable")[:m]
        out["pop"] = (np.repeat(np.arange(b), len(top)), np.tile(top, b), np.tile(tables.pop[top, 1], b))
    if "catpop" in config.sources:
        aff = tables.category_probabilities(history, config) if category_probabilities is None \
            else category_probabilities
        k = min(config.catpop_categories, tables.n_categories)
        top_c = np.argsort(-aff, axis=1, kind="stable")[:, :k]  # [B, k]
        r = np.repeat(np.arange(len(history)), k)
        c = top_c.reshape(-1)
        keep = aff[r, c] > 0
        r, c = r[keep], c[keep]
        items = tables.cat_top[c]  # [R, m]
        rr = np.repeat(r, items.shape[1])
        ii = items.reshape(-1)
        ok = ii >= 0
        rr, ii = rr[ok], ii[ok]
        out["catpop"] = _top_distinct(rr, ii, aff[rr, tables.category[ii]] * tables.incat[ii], n, b, m)
    if "own" in config.sources:
        w = TYPE_WEIGHTS[history.types] * 0.5 ** (history.ages / 7.0)
        out["own"] = _top_summed(history.row, history.items, w, n, b, m)
    return out


def dense_source(user_vectors: np.ndarray, item_vectors: np.ndarray, m: int) -> Cands:
    """Top ``m`` items per user by dot product (an embedding model's candidates, exhaustively).

    ``item_vectors`` [n_items, dim] must be in the tables' catalogue order; serving passes the
    vector index's answer instead (same ``Cands`` triple)."""
    scores = np.asarray(user_vectors, dtype="float64") @ np.asarray(item_vectors, dtype="float64").T
    m = min(m, scores.shape[1])
    top = np.argpartition(-scores, m - 1, axis=1)[:, :m]
    rows = np.repeat(np.arange(len(scores)), m)
    return _top_per_row(rows, top.reshape(-1), np.take_along_axis(scores, top, axis=1).reshape(-1), m)



# ---- merge and features ----------------------------------------------------------------------------
def _lookup(keys: np.ndarray, table_keys: np.ndarray, values: np.ndarray, missing: float = np.nan) -> np.ndarray:
    """values[table_keys == keys] for each key (``table_keys`` sorted), ``missing`` where absent."""
    out = np.full(len(keys), missing, dtype="float64")
    if len(table_keys) == 0:
        return out
    pos = np.clip(np.searchsorted(table_keys, keys), 0, len(table_keys) - 1)
    hit = table_keys[pos] == keys
    out[hit] = values[pos[hit]]
    return out


def _gather(keys: np.ndarray, k: np.ndarray, columns: list[np.ndarray], missing: float, size: int) -> list[np.ndarray]:
    """Each column's value at the first occurrence of every key of ``keys`` in ``k`` (``missing``
    where absent): ``_lookup`` over ``k`` stably sorted, or, when an array over all ``size``
    keys is cheap (``_dense``), the first index of each key by ``np.minimum.at`` with no sort."""
    if not _dense(size, len(k)):
        order = np.argsort(k, kind="stable")
        return [_lookup(keys, k[order], c[order], missing) for c in columns]
    first = np.full(size, len(k), dtype=np.int64)
    np.minimum.at(first, k, np.arange(len(k)))
    at = first[keys]
    hit = at < len(k)
    out = []
    for c in columns:
        col = np.full(len(keys), missing, dtype="float64")
        col[hit] = c[at[hit]]
        out.append(col)
    return out


def candidate_features(tables: ItemTables, history: "History", cands: Mapping[str, Cands], config: CandidateConfig,
                       exclude: tuple[np.ndarray, np.ndarray] | None = None,
                       category_probabilities: np.ndarray | None = None) -> pd.DataFrame:
    """One row per (user row, candidate item): the union of every source's candidates, minus
    ``exclude`` (rows, items; default: the user's purchases), with the ranker's features.

    Rows are sorted by user row, so each user's candidates are one contiguous query group.
    Everything comes from ``history`` (events up to the request time) and ``tables`` (fitted
    up to the same time): nothing here can see the future of either.
    """
    return pd.DataFrame(candidate_feature_arrays(tables, history, cands, config, exclude, category_probabilities))


def candidate_feature_arrays(tables: ItemTables, history: "History", cands: Mapping[str, Cands],
                             config: CandidateConfig, exclude: tuple[np.ndarray, np.ndarray] | None = None,
                             category_probabilities: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """``candidate_features``' columns as plain arrays: serving scores them without building a
    DataFrame (~60 columns: a tenth of a batch's CPU went to pandas' block construction)."""
    n, b = tables.n_items, len(history)
    size = b * n
    all_keys = [r.astype(np.int64) * n + i for r, i, _ in cands.values()]
    keys = np.unique(np.concatenate(all_keys)) if all_keys else np.zeros(0, np.int64)
    ex_rows, ex_items = history.purchased() if exclude is None else exclude
    if len(ex_rows):
        keys = keys[~np.isin(keys, ex_rows.astype(np.int64) * n + ex_items)]
    row, item = keys // n, keys % n
    f: dict[str, np.ndarray] = {"row": row, "item": item}
    n_src = np.zeros(len(keys))
    for (name, (r, _, s)), k in zip(cands.items(), all_keys, strict=True):
        rank = (np.arange(len(r)) - np.searchsorted(r, r, side="left") + 1).astype("float64")
        f[f"{name}_score"], f[f"{name}_rank"] = _gather(keys, k, [s, rank], np.nan, size)
        n_src += np.isfinite(f[f"{name}_score"])
    f["n_sources"] = n_src
    # item
    cat = tables.category[item]
    for j, days in enumerate(POP_WINDOWS):
        f[f"pop_{days}d"] = np.log1p(tables.pop[item, j])
    f["pop_trend"] = np.log1p(tables.pop[item, 1] / 7.0) - np.log1p(tables.pop[item, 2] / 30.0)
    f["incat"] = tables.incat[item]
    cat_pop30 = np.bincount(tables.category, weights=tables.pop[:, 2], minlength=tables.n_categories)[cat]
    f["incat_30d"] = np.divide(tables.pop[item, 2], cat_pop30, out=np.zeros(len(item)), where=cat_pop30 > 0)
    f["log_price"] = tables.log_price[item]
    # user x item category
    affinities: dict[tuple[float, bool], np.ndarray] = {}

    def affinity(half_life: float, by_session: bool = True) -> np.ndarray:
        if (half_life, by_session) not in affinities:
            affinities[half_life, by_session] = category_affinity(history, tables.n_categories, tables.category,
                                                                  half_life, by_session)
        return affinities[half_life, by_session]

    log_incat = np.log(tables.incat[item] + 1e-6)
    for h in HALF_LIVES:
        name = f"{h:g}d" if h < 1e8 else "all"
        aff = affinity(h)
        f[f"aff_{name}"] = aff[row, cat]
        f[f"log_catpop_{name}"] = np.log(aff[row, cat] + 1e-3) + log_incat  # log of the catpop score
        f[f"aff_events_{name}"] = affinity(h, by_session=False)[row, cat]
        if h == config.catpop_half_life:
            cat_rank = np.argsort(np.argsort(-aff, axis=1, kind="stable"), axis=1)
            f["cat_rank"] = cat_rank[row, cat].astype("float64")
    pcat = tables.category_probabilities(history, config) if category_probabilities is None \
        else category_probabilities
    f["p_category"] = pcat[row, cat]
    f["log_catpop"] = np.log(pcat[row, cat] + 1e-6) + log_incat
    hr = history.row
    first = history.indptr[:-1]
    has = np.diff(history.indptr) > 0
    last_cat = np.where(has, tables.category[history.items[np.minimum(first, max(len(history.items) - 1, 0))]]
                        if len(history.items) else -1, -1)
    f["same_cat_as_last"] = (last_cat[row] == cat).astype("float64")
    # user x item: the user's own events on the candidate
    f.update(_own_features(keys, hr.astype(np.int64) * n + history.items, history, size))
    # user
    u_last = np.full(b, np.nan)
    u_last[has] = history.ages[first[has]]
    f["u_last_age"] = u_last[row]
    for days in (1, 7, 30):
        f[f"u_n_{days}d"] = np.bincount(hr[history.ages <= days], minlength=b)[row].astype("float64")
    f["u_n_all"] = np.diff(history.indptr)[row].astype("float64")
    f["u_relevant_30d"] = np.bincount(hr[(history.ages <= 30) & (history.types > 0)], minlength=b)[row].astype(
        "float64")
    aff7 = affinity(7.0)
    f["u_n_cats"] = (aff7 > 0.05).sum(axis=1)[row].astype("float64")
    # context across categories: how many sessions the shares rest on, and how concentrated
    # the user is (a share of 0.1 is a weak preference for a user with three clear ones and
    # a strong one for a user who browses everything)
    sw = session_weights(history)
    sessions = _per_row_and_category(hr, tables.category[history.items], sw, b, tables.n_categories)
    f["cat_sessions"] = sessions[row, cat]
    f["u_sessions"] = sessions.sum(axis=1)[row]
    aff_all = affinity(1e9)
    ranked_shares = -np.sort(-aff_all, axis=1)
    for j in range(min(4, tables.n_categories)):
        f[f"u_share_top{j + 1}"] = ranked_shares[row, j]
    return f


def _own_features(keys: np.ndarray, hk: np.ndarray, history: "History", size: int) -> dict[str, np.ndarray]:
    """The user's own events on each candidate (``keys``; ``hk`` the events' keys): decayed
    weight, count, relevant count and the newest one's age. Summed per distinct key in event
    order either way, so the dense and the sorted paths agree to the bit."""
    w = TYPE_WEIGHTS[history.types]
    columns = {"own_w7": w * 0.5 ** (history.ages / 7.0), "own_relevant": (history.types > 0).astype("float64")}
    if _dense(size, len(hk)):
        counts = np.bincount(hk, minlength=size)
        min_age = np.full(size, np.inf)
        np.minimum.at(min_age, hk, history.ages)
        age = min_age[keys]
        return {"own_w7": np.bincount(hk, weights=columns["own_w7"], minlength=size)[keys],
                "own_n": counts[keys].astype("float64"),
                "own_relevant": np.bincount(hk, weights=columns["own_relevant"], minlength=size)[keys],
                "own_age": np.where(counts[keys] > 0, age, np.nan)}
    uk, inv = np.unique(hk, return_inverse=True)
    min_age = np.full(len(uk), np.inf)
    np.minimum.at(min_age, inv, history.ages)
    return {"own_w7": _lookup(keys, uk, np.bincount(inv, weights=columns["own_w7"]), 0.0),
            "own_n": _lookup(keys, uk, np.bincount(inv), 0.0),
            "own_relevant": _lookup(keys, uk, np.bincount(inv, weights=columns["own_relevant"]), 0.0),
            "own_age": _lookup(keys, uk, min_age)}


def feature_columns(frame: pd.DataFrame, config: CandidateConfig) -> list[str]:
    cols = [c for c in frame.columns if c not in ("row", "item")]
    return [c for c in cols if c in config.features] if config.features is not None else cols



__all__ = ["HALF_LIVES", "INTERNAL_SOURCES", "POP_WINDOWS", "CandidateConfig", "Cands", "ItemTables",
           "candidate_feature_arrays", "candidate_features", "category_affinity", "dense_source", "feature_columns", "predict", "session_weights",
           "source_candidates"]
