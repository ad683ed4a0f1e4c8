"""Multi-source candidates and their ranker at request time: what a served model version runs.

Why: no single retrieval source wins everywhere. Item-to-item co-occurrence follows the current
session, EASE the whole basket of a user, the two-tower model generalises through categories and
titles, "category x in-category popularity" (``catpop``: the user's learned next-week category
distribution, ``models.category_model``, times each item's share of its category's views) knows
which categories a user returns to, and a user's own recent items are often clicked again. A
LightGBM ranker that sees every source's score and rank next to item, user and user-item
features learns when to trust which (``training.candidates`` fits it on the evaluation's target).

Serving is cheap per request: every source is a lookup into arrays fitted offline (item
neighbour lists for co-occurrence and EASE, popularity vectors, per-category top items, the
small category model), a few hundred candidates get ~60 features, and one LightGBM prediction
orders them. ``CandidateRanker.save``/``load`` write and read all of it as one folder of the
model artifact (``candidates/``: ``npz`` arrays, LightGBM model texts, JSON). The two-tower
source is not stored here: it is the model and its vector index; the caller passes its
candidates (``external``), the index's answer for the user vector.

A user is a ``History``: their most recent events (item, type, age in days) before the request
time, built from an event frame (training, evaluation) or from the feature store's lists
(serving: ``History.from_lists`` over the ``recent_*`` features). Both keep the same events: at
most ``CandidateConfig.history_events`` within ``history_days``, so training and serving see a
user alike. Pure numpy/pandas/lightgbm: no Ray, no training code.
"""

import io
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from aiplatform.core import storage
from aiplatform.core.schemas import EVENT_TYPES, EVENT_WEIGHTS
from aiplatform.models.category_model import CategoryModel
from aiplatform.models.category_model import session_weights as _session_weights

TYPE_CODES: tuple[str, ...] = EVENT_TYPES
TYPE_WEIGHTS = np.array([EVENT_WEIGHTS[t] for t in TYPE_CODES])
HALF_LIVES = (1.0, 3.0, 7.0, 21.0, 1e9)  # days; 1e9 = no decay
POP_WINDOWS = (1, 7, 30)  # days
INTERNAL_SOURCES = ("cooc", "ease", "pop", "catpop", "own")
CANDIDATES_DIR = "candidates"
"""The folder of a model artifact that holds the candidate sources and the ranker."""
ARRAYS_FILE = "candidates.npz"
CONFIG_FILE = "candidates.json"
RANKER_FILE = "ranker.txt"
CATEGORY_MODEL_FILE = "category_model.json"


# ---- users ---------------------------------------------------------------------------------------
@dataclass
class History:
    """A batch of users' recent events, most recent first, as CSR arrays over catalogue codes.

    ``items[indptr[r]:indptr[r + 1]]`` are user ``r``'s item codes (unknown items dropped),
    ``types`` their event-type codes (``TYPE_CODES``; unknown types are views) and ``ages`` how
    many days before the request time each happened (>= 0).
    """

    users: np.ndarray
    indptr: np.ndarray
    items: np.ndarray
    types: np.ndarray
    ages: np.ndarray

    def __len__(self) -> int:
        return len(self.users)

    @property
    def row(self) -> np.ndarray:
        """User row of every event."""
        return np.repeat(np.arange(len(self.users)), np.diff(self.indptr))

    @classmethod
    def from_events(cls, events: pd.DataFrame, catalogue: pd.Index, at: "pd.Timestamp | pd.Series",
                    users: Sequence[str] | None = None, max_events: int = 500,
                    window_days: float | None = None) -> "History":
        """Histories at ``at`` (one time, or a Series user_id -> time) from ``events``.

        Only events at or before the user's time count (the splits' convention: the cutoff
        belongs to training), at most the ``max_events`` most recent ones, and with
        ``window_days`` only those less than that old (a feature window's ``(t - w, t]``): the
        rule of the ``recent_*`` features serving reads, so both see a user alike.
        """
        ev = events
        if users is None:
            users = sorted(set(ev["user_id"].astype(str)))
        users = np.asarray([str(u) for u in users], dtype=object)
        uid = ev["user_id"].astype(str).to_numpy(dtype=object)
        row = pd.Index(users).get_indexer(uid)
        t = pd.to_datetime(ev["timestamp"], utc=True).dt.as_unit("us").astype("int64").to_numpy()
        if isinstance(at, pd.Series):
            at_us = pd.to_datetime(at, utc=True).dt.as_unit("us").astype("int64")
            at_row = at_us.reindex(pd.Index(users)).to_numpy()
            if np.isnan(at_row.astype("float64")).any():
                raise ValueError("History.from_events: `at` has no time for some users; give one per user")
            at_row = at_row.astype("int64")
        else:
            stamp = pd.Timestamp(at)
            stamp = stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")
            at_row = np.full(len(users), stamp.value // 1000, dtype=np.int64)  # .value is in ns
        ok = row >= 0
        ok[ok] = t[ok] <= at_row[row[ok]]
        if window_days is not None:
            ok[ok] = t[ok] > at_row[row[ok]] - int(window_days * 86_400e6)
        code = catalogue.get_indexer(ev["item_id"].astype(str).to_numpy(dtype=object))
        ok &= code >= 0
        row, t, code = row[ok], t[ok], code[ok]
        etype = pd.Index(TYPE_CODES).get_indexer(ev["event_type"].to_numpy(dtype=object)[ok])
        etype = np.where(etype < 0, 0, etype)
        order = np.lexsort((-t, row))  # by user, most recent first
        row, t, code, etype = row[order], t[order], code[order], etype[order]
        rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
        keep = rank < max_events
        row, t, code, etype = row[keep], t[keep], code[keep], etype[keep]
        indptr = np.searchsorted(row, np.arange(len(users) + 1), side="left").astype(np.int64)
        ages = (at_row[row] - t) / 86_400e6
        return cls(users, indptr, code.astype(np.int64), etype.astype(np.int8), ages.astype("float64"))

    @classmethod
    def from_lists(cls, users: Sequence[str], items: Sequence[Sequence[str]], catalogue: pd.Index,
                   types: Sequence[Sequence[str]] | None = None,
                   ages_days: Sequence[Sequence[float]] | None = None) -> "History":
        """Histories from per-user lists, most recent first (a feature store's ``last_n`` lists).

        Without ``types`` every event is a view; without ``ages_days`` the i-th item is taken to
        be ``i`` hours old (order is all that is known).
        """
        lengths = np.array([len(x) for x in items], dtype=np.int64)
        flat = [str(x) for h in items for x in h]
        code = catalogue.get_indexer(flat) if flat else np.zeros(0, np.int64)
        ty = pd.Index(TYPE_CODES).get_indexer([str(x) for h in types for x in h]) if types is not None and flat \
            else np.zeros(len(flat), np.int64)
        if ages_days is not None and flat:
            ag = np.array([float(x) for h in ages_days for x in h])
        else:
            ag = np.concatenate([np.arange(n) / 24.0 for n in lengths]) if flat else np.zeros(0)
        if len(ty) != len(flat) or len(ag) != len(flat):
            raise ValueError("History.from_lists: items, types and ages_days must have equal lengths per user")
        row = np.repeat(np.arange(len(items)), lengths)
        ok = code >= 0
        row, code, ty, ag = row[ok], code[ok], np.where(ty[ok] < 0, 0, ty[ok]), ag[ok]
        indptr = np.searchsorted(row, np.arange(len(items) + 1), side="left").astype(np.int64)
        return cls(np.asarray([str(u) for u in users], dtype=object), indptr, code.astype(np.int64),
                   ty.astype(np.int8), np.maximum(ag, 0.0))

    def recent_distinct(self, n: int = 20, window_days: float = 30.0) -> tuple[np.ndarray, np.ndarray]:
        """(rows, items) of each user's ``n`` most recent distinct items within ``window_days``
        (the feature service's ``last_items``), most recent first."""
        ok = self.ages <= window_days
        return _first_per_row(self.row[ok], self.items[ok], n)

    def item_lists(self, item_ids: np.ndarray, n: int = 20, window_days: float = 30.0) -> list[list[str]]:
        rows, items = self.recent_distinct(n, window_days)
        out: list[list[str]] = [[] for _ in range(len(self))]
        for r, i in zip(rows, items, strict=True):
            out[r].append(item_ids[i])
        return out

    def counts(self, windows: Sequence[int] = (1, 7, 30)) -> np.ndarray:
        """[B, 4 * len(windows)] event counts by type (type-major: view_1d, view_7d, ...)."""
        row = self.row
        out = np.zeros((len(self), len(TYPE_CODES) * len(windows)))
        for ti in range(len(TYPE_CODES)):
            for wi, w in enumerate(windows):
                sel = (self.types == ti) & (self.ages <= w)
                out[:, ti * len(windows) + wi] = np.bincount(row[sel], minlength=len(self))
        return out

    def purchased(self, n: int = 50, window_days: float = 90.0) -> tuple[np.ndarray, np.ndarray]:
        """(rows, items) of each user's distinct purchases (the evaluation excludes them)."""
        ok = (self.types == 3) & (self.ages <= window_days)
        return _first_per_row(self.row[ok], self.items[ok], n)


def _first_per_row(row: np.ndarray, item: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's first ``n`` distinct items, in order (``row`` ascending): numpy, no pandas,
    because serving runs it per request."""
    if not len(row):
        return row.astype(np.int64), item.astype(np.int64)
    key = row.astype(np.int64) * (int(item.max()) + 1) + item
    first = np.sort(np.unique(key, return_index=True)[1])
    row, item = row[first], item[first]
    keep = np.arange(len(row)) - np.searchsorted(row, row, side="left") < n
    return row[keep], item[keep]


def predict(booster, x: np.ndarray) -> np.ndarray:
    """LightGBM's prediction, on one thread for the small matrices of a request (its thread pool
    costs more than it saves there), on all for the large ones of an evaluation."""
    return booster.predict(x, num_threads=1) if len(x) < 20_000 else booster.predict(x)


# ---- fitted sources --------------------------------------------------------------------------------
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

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def category_probabilities(self, history: History, config: "CandidateConfig") -> np.ndarray:
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


def _aggregate(row: np.ndarray, item: np.ndarray, weight: np.ndarray, n_items: int) -> Cands:
    key = row.astype(np.int64) * n_items + item
    uniq, inv = np.unique(key, return_inverse=True)
    return uniq // n_items, uniq % n_items, np.bincount(inv, weights=weight, minlength=len(uniq))


def _neighbour_source(rows: np.ndarray, hist_items: np.ndarray, idx: np.ndarray, val: np.ndarray,
                      n_items: int, m: int) -> Cands:
    """Sum of the history items' neighbour weights: co-occurrence and EASE at serving cost."""
    nb_i, nb_v = idx[hist_items], val[hist_items]  # [H, N]
    r = np.repeat(rows, nb_i.shape[1])
    i, v = nb_i.reshape(-1), nb_v.reshape(-1)
    ok = i >= 0
    return _top_per_row(*_aggregate(r[ok], i[ok], v[ok], n_items), m)


def session_weights(history: History) -> np.ndarray:
    """Per event, 1 / (events in its browsing session): summing them counts sessions, not
    events, so one long session does not outweigh several short ones."""
    return _session_weights(history.row, history.ages)


def category_affinity(history: History, n_categories: int, category: np.ndarray, half_life: float,
                      by_session: bool = True) -> np.ndarray:
    """[B, n_cat] share of the user's sessions (or events) per category, each weighted
    ``0.5 ** (age / half-life)``: an estimate of where the user's next sessions go."""
    w = 0.5 ** (history.ages / half_life)
    if by_session:
        w = w * session_weights(history)
    out = np.zeros((len(history), n_categories))
    np.add.at(out, (history.row, category[history.items]), w)
    total = out.sum(axis=1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


def source_candidates(tables: ItemTables, history: History, config: CandidateConfig) -> dict[str, Cands]:
    """Each internal source's top ``per_source`` candidates per user (before exclusions)."""
    m, n = config.per_source, tables.n_items
    out: dict[str, Cands] = {}
    rows, hist = history.recent_distinct(config.history_len, config.history_window_days)
    if "cooc" in config.sources:
        out["cooc"] = _neighbour_source(rows, hist, tables.cooc_idx, tables.cooc_val, n, m)
    if "ease" in config.sources and (tables.ease_idx >= 0).any():
        out["ease"] = _neighbour_source(rows, hist, tables.ease_idx, tables.ease_val, n, m)
    if "pop" in config.sources:
        top = np.argsort(-tables.pop[:, 1], kind="stable")[:m]
        b = len(history)
        out["pop"] = (np.repeat(np.arange(b), len(top)), np.tile(top, b), np.tile(tables.pop[top, 1], b))
    if "catpop" in config.sources:
        aff = tables.category_probabilities(history, config)
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
        out["catpop"] = _top_per_row(rr, ii, aff[rr, tables.category[ii]] * tables.incat[ii], m)
    if "own" in config.sources:
        w = TYPE_WEIGHTS[history.types] * 0.5 ** (history.ages / 7.0)
        out["own"] = _top_per_row(*_aggregate(history.row, history.items, w, n), m)
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


def candidate_features(tables: ItemTables, history: History, cands: Mapping[str, Cands], config: CandidateConfig,
                       exclude: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    """One row per (user row, candidate item): the union of every source's candidates, minus
    ``exclude`` (rows, items; default: the user's purchases), with the ranker's features.

    Rows are sorted by user row, so each user's candidates are one contiguous query group.
    Everything comes from ``history`` (events up to the request time) and ``tables`` (fitted
    up to the same time): nothing here can see the future of either.
    """
    n, b = tables.n_items, len(history)
    all_keys = [r.astype(np.int64) * n + i for r, i, _ in cands.values()]
    keys = np.unique(np.concatenate(all_keys)) if all_keys else np.zeros(0, np.int64)
    ex_rows, ex_items = history.purchased() if exclude is None else exclude
    if len(ex_rows):
        keys = keys[~np.isin(keys, ex_rows.astype(np.int64) * n + ex_items)]
    row, item = keys // n, keys % n
    f: dict[str, np.ndarray] = {"row": row, "item": item}
    n_src = np.zeros(len(keys))
    for name, (r, i, s) in cands.items():
        k = r.astype(np.int64) * n + i
        order = np.argsort(k, kind="stable")
        rank = (np.arange(len(r)) - np.searchsorted(r, r, side="left") + 1).astype("float64")
        f[f"{name}_score"] = _lookup(keys, k[order], s[order])
        f[f"{name}_rank"] = _lookup(keys, k[order], rank[order])
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
    log_incat = np.log(tables.incat[item] + 1e-6)
    for h in HALF_LIVES:
        name = f"{h:g}d" if h < 1e8 else "all"
        aff = category_affinity(history, tables.n_categories, tables.category, h)
        f[f"aff_{name}"] = aff[row, cat]
        f[f"log_catpop_{name}"] = np.log(aff[row, cat] + 1e-3) + log_incat  # log of the catpop score
        f[f"aff_events_{name}"] = category_affinity(history, tables.n_categories, tables.category, h,
                                                    by_session=False)[row, cat]
        if h == config.catpop_half_life:
            cat_rank = np.argsort(np.argsort(-aff, axis=1, kind="stable"), axis=1)
            f["cat_rank"] = cat_rank[row, cat].astype("float64")
    pcat = tables.category_probabilities(history, config)
    f["p_category"] = pcat[row, cat]
    f["log_catpop"] = np.log(pcat[row, cat] + 1e-6) + log_incat
    hr = history.row
    first = history.indptr[:-1]
    has = np.diff(history.indptr) > 0
    last_cat = np.where(has, tables.category[history.items[np.minimum(first, max(len(history.items) - 1, 0))]]
                        if len(history.items) else -1, -1)
    f["same_cat_as_last"] = (last_cat[row] == cat).astype("float64")
    # user x item: the user's own events on the candidate
    hk = hr.astype(np.int64) * n + history.items
    uk, inv = np.unique(hk, return_inverse=True)
    w = TYPE_WEIGHTS[history.types]
    f["own_w7"] = _lookup(keys, uk, np.bincount(inv, weights=w * 0.5 ** (history.ages / 7.0)), 0.0)
    f["own_n"] = _lookup(keys, uk, np.bincount(inv), 0.0)
    f["own_relevant"] = _lookup(keys, uk, np.bincount(inv, weights=(history.types > 0).astype("float64")), 0.0)
    min_age = np.full(len(uk), np.inf)
    np.minimum.at(min_age, inv, history.ages)
    f["own_age"] = _lookup(keys, uk, min_age)
    # user
    u_last = np.full(b, np.nan)
    u_last[has] = history.ages[first[has]]
    f["u_last_age"] = u_last[row]
    for days in (1, 7, 30):
        f[f"u_n_{days}d"] = np.bincount(hr[history.ages <= days], minlength=b)[row].astype("float64")
    f["u_n_all"] = np.diff(history.indptr)[row].astype("float64")
    f["u_relevant_30d"] = np.bincount(hr[(history.ages <= 30) & (history.types > 0)], minlength=b)[row].astype(
        "float64")
    aff7 = category_affinity(history, tables.n_categories, tables.category, 7.0)
    f["u_n_cats"] = (aff7 > 0.05).sum(axis=1)[row].astype("float64")
    # context across categories: how many sessions the shares rest on, and how concentrated
    # the user is (a share of 0.1 is a weak preference for a user with three clear ones and
    # a strong one for a user who browses everything)
    sw = session_weights(history)
    sessions = np.zeros((b, tables.n_categories))
    np.add.at(sessions, (hr, tables.category[history.items]), sw)
    f["cat_sessions"] = sessions[row, cat]
    f["u_sessions"] = sessions.sum(axis=1)[row]
    aff_all = category_affinity(history, tables.n_categories, tables.category, 1e9)
    ranked_shares = -np.sort(-aff_all, axis=1)
    for j in range(min(4, tables.n_categories)):
        f[f"u_share_top{j + 1}"] = ranked_shares[row, j]
    return pd.DataFrame(f)


def feature_columns(frame: pd.DataFrame, config: CandidateConfig) -> list[str]:
    cols = [c for c in frame.columns if c not in ("row", "item")]
    return [c for c in cols if c in config.features] if config.features is not None else cols


# ---- the ranker and the pipeline -------------------------------------------------------------------
@dataclass
class CandidateRanker:
    """Fitted sources (``tables``) and the LightGBM ranker over their merged candidates."""

    config: CandidateConfig
    tables: ItemTables
    booster: object | None = None  # lightgbm.Booster
    feature_names: list[str] = field(default_factory=list)
    external_sources: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)

    def external_candidates(self, item_ids: Sequence[Sequence[str]], scores: Sequence[Sequence[float]]) -> Cands:
        """``Cands`` from per-user lists of item ids and scores (a vector index's answers, one
        list per history row); ids outside the catalogue are dropped."""
        lengths = [len(x) for x in item_ids]
        if lengths != [len(x) for x in scores]:
            raise ValueError("external_candidates: item_ids and scores must have equal lengths per user")
        codes = pd.Index(self.tables.item_ids).get_indexer([str(i) for x in item_ids for i in x]) \
            if sum(lengths) else np.zeros(0, np.int64)
        rows = np.repeat(np.arange(len(item_ids)), lengths)
        flat = np.array([float(v) for x in scores for v in x]) if sum(lengths) else np.zeros(0)
        ok = codes >= 0
        return _top_per_row(rows[ok], codes[ok].astype(np.int64), flat[ok], max(max(lengths, default=0), 1))

    @property
    def as_of(self) -> pd.Timestamp | None:
        """When the sources were last fitted (the newest event they saw)."""
        stamp = self.report.get("sources_as_of") or self.report.get("train_end")
        return pd.Timestamp(stamp) if stamp else None

    # ---- serving ---------------------------------------------------------------------------------
    def candidates(self, history: History, external: Mapping[str, Cands] | None = None,
                   exclude: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
        """Candidates with features and the ranker's ``score`` (higher first within a row)."""
        missing = set(self.external_sources) - set(external or {})
        if missing:
            raise ValueError(f"the ranker was trained with external source(s) {', '.join(sorted(missing))}: "
                             "pass their candidates in `external`")
        cands = source_candidates(self.tables, history, self.config)
        cands.update(external or {})
        frame = candidate_features(self.tables, history, cands, self.config, exclude)
        for name in self.feature_names:  # a source without candidates for this batch
            if name not in frame.columns:
                frame[name] = np.nan
        frame["score"] = predict(self.booster, frame[self.feature_names].to_numpy(dtype="float32")) \
            if len(frame) else np.zeros(0)
        return frame

    def recommend(self, history: History, k: int, external: Mapping[str, Cands] | None = None,
                  exclude: tuple[np.ndarray, np.ndarray] | None = None) -> list[list[str]]:
        """Top-``k`` item ids per user of ``history`` (purchases excluded unless ``exclude`` is given)."""
        frame = self.candidates(history, external, exclude)
        frame = frame.sort_values(["row", "score", "item"], ascending=[True, False, True], kind="stable")
        frame = frame[frame.groupby("row").cumcount() < k]
        out: list[list[str]] = [[] for _ in range(len(history))]
        for r, i in zip(frame["row"].to_numpy(), frame["item"].to_numpy(), strict=True):
            out[r].append(self.tables.item_ids[i])
        return out

    def source_ranking(self, history: History, source: str, k: int, external: Mapping[str, Cands] | None = None,
                       exclude: tuple[np.ndarray, np.ndarray] | None = None) -> list[list[str]]:
        """Top-``k`` of one source alone (for the study's per-source rows), same exclusions."""
        cands = source_candidates(self.tables, history, self.config)
        cands.update(external or {})
        frame = candidate_features(self.tables, history, {source: cands[source]}, self.config, exclude)
        frame = frame.sort_values(["row", f"{source}_rank"], kind="stable")
        frame = frame[frame.groupby("row").cumcount() < k]
        out: list[list[str]] = [[] for _ in range(len(history))]
        for r, i in zip(frame["row"].to_numpy(), frame["item"].to_numpy(), strict=True):
            out[r].append(self.tables.item_ids[i])
        return out

    # ---- artifact --------------------------------------------------------------------------------
    def save(self, directory: str) -> None:
        """Write the artifact folder (local or object store): arrays, config and ranker model."""
        directory = str(directory)
        storage.make_dirs(directory)
        arrays = {k: getattr(self.tables, k) for k in _TABLE_ARRAYS}
        arrays["item_ids"] = np.asarray(self.tables.item_ids, dtype=str)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)
        storage.write_bytes(storage.join(directory, ARRAYS_FILE), buf.getvalue())
        storage.write_bytes(storage.join(directory, RANKER_FILE), self.booster.model_to_string().encode())
        if self.tables.category_model is not None:
            storage.write_json(storage.join(directory, CATEGORY_MODEL_FILE), self.tables.category_model.to_dict())
        cfg = asdict(self.config)
        storage.write_json(storage.join(directory, CONFIG_FILE),
                           {"format": 1, "config": cfg, "n_categories": self.tables.n_categories,
                            "feature_names": self.feature_names, "external_sources": self.external_sources,
                            "report": self.report})

    @classmethod
    def load(cls, directory: str) -> "CandidateRanker":
        """Inverse of ``save``."""
        import lightgbm as lgb

        directory = str(directory)
        meta = storage.read_json(storage.join(directory, CONFIG_FILE))
        raw = storage.read_bytes(storage.join(directory, ARRAYS_FILE))
        model = storage.read_bytes(storage.join(directory, RANKER_FILE))
        if meta is None or raw is None or model is None:
            raise FileNotFoundError(f"{directory}: not a candidate-ranker artifact ({CONFIG_FILE}, {ARRAYS_FILE} "
                                    f"and {RANKER_FILE} are needed)")
        cfg = dict(meta["config"])
        for key in ("features", "sources"):
            if cfg.get(key) is not None:
                cfg[key] = tuple(cfg[key])
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["item_ids"] = arrays["item_ids"].astype(object)
        cat_model = storage.read_json(storage.join(directory, CATEGORY_MODEL_FILE))
        tables = ItemTables(n_categories=int(meta["n_categories"]), **arrays,
                            category_model=CategoryModel.from_dict(cat_model) if cat_model else None)
        return cls(CandidateConfig(**cfg), tables, lgb.Booster(model_str=model.decode()),
                   list(meta["feature_names"]), list(meta["external_sources"]), meta.get("report", {}))


_TABLE_ARRAYS = ("item_ids", "category", "log_price", "pop", "incat", "cat_top", "cooc_idx", "cooc_val", "ease_idx",
                 "ease_val")


def candidates_dir_of(artifact_dir: str) -> str | None:
    """``<artifact>/candidates`` when the version carries a candidate ranker, else None."""
    path = storage.join(str(artifact_dir), CANDIDATES_DIR)
    return path if storage.exists(storage.join(path, CONFIG_FILE)) else None


__all__ = ["CANDIDATES_DIR", "CandidateConfig", "CandidateRanker", "Cands", "History", "ItemTables",
           "candidate_features", "candidates_dir_of", "category_affinity", "dense_source", "feature_columns",
           "source_candidates"]


# ---- serving: a History from the feature store's rows ----------------------------------------------
def history_from_rows(users: Sequence[str], rows: Sequence[Mapping | None], config: CandidateConfig,
                      catalogue: pd.Index, as_of: pd.Timestamp | None) -> History:
    """``History`` of ``users`` from their feature-store rows (``config.events_features``: the
    aligned item, event-type and time lists, most recent first; a missing row or list is no events).

    Ages are counted from each user's request time ``max(as_of, the user's newest event)``: the
    ranker was trained with ages measured at its fitting time (``as_of``, the sources' time), and a
    user active after it (replayed data, a model trained days ago) must not look weeks inactive.
    Then the ``History.from_events(..., max_events=config.history_events,
    window_days=config.history_days)`` rule: events less than ``history_days`` old, unknown items
    dropped, at most ``history_events`` (the store's lists were already capped at its ``n``).
    """
    items_f, types_f, times_f = config.events_features
    users = np.asarray([str(u) for u in users], dtype=object)
    if len(rows) != len(users):
        raise ValueError(f"history_from_rows: {len(users)} users but {len(rows)} rows")
    its, tys, tms, lengths = [], [], [], np.zeros(len(users), np.int64)
    for r, row in enumerate(rows):
        row = row or {}
        li, lt, lm = (_values(row.get(f)) for f in (items_f, types_f, times_f))
        if not len(li) == len(lt) == len(lm):
            raise ValueError(f"user {users[r]!r}: features {items_f!r}, {types_f!r} and {times_f!r} have "
                             f"{len(li)}, {len(lt)} and {len(lm)} values; they must be aligned lists of one "
                             "last_n aggregation each over the same events (see apps/shop/features.py)")
        its += li
        tys += lt
        tms += lm
        lengths[r] = len(li)
    row = np.repeat(np.arange(len(users)), lengths)
    try:
        t = pd.to_datetime(pd.Series(tms, dtype=object), utc=True, format="ISO8601").dt.as_unit("us") \
            .astype("int64").to_numpy() if tms else np.zeros(0, np.int64)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"feature {times_f!r}: values must be event times (ISO 8601 strings such as "
                         f"'2026-09-05 15:59:12+00:00'): {exc}") from None
    newest = np.full(len(users), np.iinfo(np.int64).min, np.int64)
    np.maximum.at(newest, row, t)
    stamp = None
    if as_of is not None:
        stamp = pd.Timestamp(as_of)
        stamp = stamp.tz_convert("UTC") if stamp.tzinfo else stamp.tz_localize("UTC")
    at_row = np.maximum(newest, stamp.value // 1000 if stamp is not None else np.iinfo(np.int64).min)
    ok = np.ones(len(row), bool)
    if config.history_days is not None:
        ok &= t > at_row[row] - int(config.history_days * 86_400e6)
    code = catalogue.get_indexer([str(x) for x in its]) if its else np.zeros(0, np.int64)
    ok &= code >= 0
    row, t, code = row[ok], t[ok], code[ok]
    etype = pd.Index(TYPE_CODES).get_indexer(np.asarray([str(x) for x in tys], dtype=object)[ok]) \
        if len(row) else np.zeros(0, np.int64)
    etype = np.where(etype < 0, 0, etype)
    order = np.lexsort((-t, row))  # by user, most recent first (ties keep the store's order)
    row, t, code, etype = row[order], t[order], code[order], etype[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    keep = rank < config.history_events
    row, t, code, etype = row[keep], t[keep], code[keep], etype[keep]
    indptr = np.searchsorted(row, np.arange(len(users) + 1), side="left").astype(np.int64)
    ages = (at_row[row] - t) / 86_400e6
    return History(users, indptr, code.astype(np.int64), etype.astype(np.int8), ages.astype("float64"))


def _values(value: object) -> list:
    """A list feature's value as a list: None / NaN (no valid row) is the empty list."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return list(value)


def load_candidate_config(directory: str) -> CandidateConfig:
    """The ``CandidateConfig`` of a saved ranker (its JSON only: no arrays, no LightGBM), for
    callers that only need to know what it reads (serving's application builder)."""
    meta = storage.read_json(storage.join(str(directory), CONFIG_FILE))
    if meta is None:
        raise FileNotFoundError(f"{directory}: not a candidate-ranker artifact ({CONFIG_FILE} is missing)")
    cfg = dict(meta["config"])
    for key in ("features", "sources", "events_features"):
        if cfg.get(key) is not None:
            cfg[key] = tuple(cfg[key])
    return CandidateConfig(**cfg)


__all__ += ["history_from_rows", "load_candidate_config"]
