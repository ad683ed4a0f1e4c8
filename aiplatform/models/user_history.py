"""A user as the candidate ranker sees them: their recent events, from events or the feature store.

``History`` is a batch of users' most recent events (item, type, age in days) before the request
time, as CSR arrays over catalogue codes. Training and evaluation build it from an event frame
(``History.from_events``); serving from the feature service's three aligned ``recent_*`` lists
(``history_from_rows``). Both keep the same events: at most ``CandidateConfig.history_events``
within ``history_days``, so training and serving see a user alike.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from aiplatform.core.schemas import EVENT_TYPES, EVENT_WEIGHTS

if TYPE_CHECKING:
    from aiplatform.models.candidate_sources import CandidateConfig

TYPE_CODES: tuple[str, ...] = EVENT_TYPES
TYPE_WEIGHTS = np.array([EVENT_WEIGHTS[t] for t in TYPE_CODES])
_TYPE_CODE_OF = {t: c for c, t in enumerate(TYPE_CODES)}


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


def history_from_rows(users: Sequence[str], rows: Sequence[Mapping | None], config: "CandidateConfig",
                      catalogue: "pd.Index | Callable[[list[str]], np.ndarray]", as_of: pd.Timestamp | None) -> History:
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
    t = _event_times_us(tms, times_f)
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
    code = _codes(catalogue, [str(x) for x in its])
    ok &= code >= 0
    row, t, code = row[ok], t[ok], code[ok]
    etype = np.fromiter(map(_TYPE_CODE_OF.get, map(str, tys), repeat(0, len(tys))), dtype=np.int64,
                        count=len(tys))[ok]  # an unknown type counts as a view (code 0)
    order = np.lexsort((-t, row))  # by user, most recent first (ties keep the store's order)
    row, t, code, etype = row[order], t[order], code[order], etype[order]
    rank = np.arange(len(row)) - np.searchsorted(row, row, side="left")
    keep = rank < config.history_events
    row, t, code, etype = row[keep], t[keep], code[keep], etype[keep]
    indptr = np.searchsorted(row, np.arange(len(users) + 1), side="left").astype(np.int64)
    ages = (at_row[row] - t) / 86_400e6
    return History(users, indptr, code.astype(np.int64), etype.astype(np.int8), ages.astype("float64"))


def _codes(catalogue: "pd.Index | Callable[[list[str]], np.ndarray]", item_ids: list[str]) -> np.ndarray:
    """Catalogue codes of ``item_ids`` from an Index or a code function (``ItemTables.codes``)."""
    if not item_ids:
        return np.zeros(0, np.int64)
    return catalogue.get_indexer(item_ids) if isinstance(catalogue, pd.Index) else catalogue(item_ids)


_UTC_SUFFIX = "+00:00"


def _event_times_us(values: list, feature: str) -> np.ndarray:
    """Event times as int64 microseconds since the epoch (UTC).

    The online store writes them as ``'2026-09-05 15:59:12+00:00'``: numpy parses those, less the
    offset, ~3x faster than ``pd.to_datetime`` (a batch reads a few thousand per request batch);
    anything else (other offsets, 'Z', timestamps) goes through pandas, which also names a bad
    value."""
    if not values:
        return np.zeros(0, np.int64)
    if all(isinstance(v, str) and v.endswith(_UTC_SUFFIX) for v in values):
        try:
            return np.array([v[:-len(_UTC_SUFFIX)] for v in values], dtype="datetime64[us]").astype(np.int64)
        except ValueError:
            pass  # pandas below parses it or names the bad value
    try:
        return pd.to_datetime(pd.Series(values, dtype=object), utc=True, format="ISO8601").dt.as_unit("us") \
            .astype("int64").to_numpy()
    except (ValueError, TypeError) as exc:
        raise ValueError(f"feature {feature!r}: values must be event times (ISO 8601 strings such as "
                         f"'2026-09-05 15:59:12+00:00'): {exc}") from None


def _values(value: object) -> list:
    """A list feature's value as a list: None / NaN (no valid row) is the empty list."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return list(value)


__all__ = ["TYPE_CODES", "TYPE_WEIGHTS", "History", "history_from_rows"]
