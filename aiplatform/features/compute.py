"""Point-in-time feature values, vectorised over many users at once.

One function, ``context_at``, serves the three places that need user features: training
examples (features just before each event), evaluation (features at the split time) and the
offline/online stores (features now). Computing them once, in one place, is what keeps
training and serving from drifting apart.

Definitions (at query time t, from the user's events strictly before t):
- ``{type}_{w}d``: number of events of that type in [t - w days, t); unknown types count as views;
- ``last_items``: the distinct items among the user's last ``3 * HISTORY_LEN`` events, most
  recent first, at most ``HISTORY_LEN``;
- ``purchased_items``: the distinct items among the user's last ``PURCHASED_LEN`` purchases.

Everything is numpy over sorted arrays (searchsorted on a user-then-time key), so a block of a
million events takes seconds, not a Python call per user.
"""

import numpy as np
import pandas as pd
import pyarrow as pa

from aiplatform.core.schemas import EVENT_TYPES
from aiplatform.features.definitions import COUNT_COLUMNS, HISTORY_LEN, PURCHASED_LEN, WINDOWS_DAYS

US_PER_DAY = 86_400 * 1_000_000
HISTORY_LOOKBACK = 3 * HISTORY_LEN
_KEY_LIMIT = 1 << 62


def as_micros(ts) -> np.ndarray:
    """int64 microseconds since the epoch (UTC) of a timestamp column or array."""
    arr = pd.to_datetime(pd.Series(ts), utc=True)
    return arr.dt.as_unit("us").astype("int64").to_numpy()


def normalized_types(event_type) -> np.ndarray:
    """Event types with anything unknown mapped to 'view' (docs/architecture.md)."""
    et = np.asarray(event_type, dtype=object)
    return np.where(np.isin(et, EVENT_TYPES), et, "view")


def _recent_distinct(codes: np.ndarray, pos: np.ndarray, start: np.ndarray,
                     lookback: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """For each query, the distinct codes of codes[start:pos] read backwards from pos-1,
    looking back at most ``lookback`` rows and keeping at most ``limit``.
    Returns (flat values, per-query lengths) in most-recent-first order."""
    n = len(pos)
    if n == 0 or lookback == 0:
        return np.zeros(0, np.int64), np.zeros(n, np.int64)
    idx = pos[:, None] - np.arange(1, lookback + 1)[None, :]
    valid = idx >= start[:, None]
    m = np.where(valid, codes[np.clip(idx, 0, max(len(codes) - 1, 0))] if len(codes) else -1, -1)
    order = np.argsort(m, axis=1, kind="stable")
    s = np.take_along_axis(m, order, axis=1)
    dup_sorted = np.zeros_like(valid)
    dup_sorted[:, 1:] = s[:, 1:] == s[:, :-1]
    dup = np.zeros_like(valid)
    np.put_along_axis(dup, order, dup_sorted, axis=1)
    keep = (m >= 0) & ~dup
    keep &= np.cumsum(keep, axis=1) <= limit
    return m[keep], keep.sum(axis=1)


def _list_column(values: np.ndarray, lengths: np.ndarray, vocab: np.ndarray) -> pd.Series:
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    flat = pa.array(vocab[values] if len(values) else np.array([], dtype=object), pa.string())
    return pd.Series(pa.ListArray.from_arrays(pa.array(offsets), flat).to_pylist(), dtype=object)


def context_at(events: pd.DataFrame, query_users, query_times_us) -> pd.DataFrame:
    """Features of ``query_users[i]`` at ``query_times_us[i]`` from ``events`` strictly before.

    ``events`` holds user_id, item_id, event_type, timestamp for (at least) all query users.
    Returns one row per query, in query order: last_items, purchased_items, counts.
    """
    q_users = np.asarray(query_users, dtype=object)
    q_t = np.asarray(query_times_us, dtype=np.int64)
    users = pd.Index(pd.unique(np.concatenate([events["user_id"].to_numpy(dtype=object), q_users])))
    if len(users) > 1 and len(q_users):
        t_all = as_micros(events["timestamp"]) if len(events) else np.zeros(0, np.int64)
        span = int(max(t_all.max(initial=q_t.max()), q_t.max()) - min(t_all.min(initial=q_t.min()), q_t.min())) \
            + max(WINDOWS_DAYS) * US_PER_DAY + 2
        if len(users) * span >= _KEY_LIMIT:  # too many users for one int64 key: split them
            half = set(users[: len(users) // 2])
            left_q = np.fromiter((u in half for u in q_users), bool, len(q_users))
            left_e = events["user_id"].isin(half).to_numpy()
            parts = [context_at(events[left_e], q_users[left_q], q_t[left_q]),
                     context_at(events[~left_e], q_users[~left_q], q_t[~left_q])]
            out = pd.concat(parts, ignore_index=True)
            order = np.concatenate([np.flatnonzero(left_q), np.flatnonzero(~left_q)])
            return out.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)

    t = as_micros(events["timestamp"]) if len(events) else np.zeros(0, np.int64)
    base = min(t.min(initial=q_t.min(initial=0)), q_t.min(initial=0)) - max(WINDOWS_DAYS) * US_PER_DAY - 1
    span = int(max(t.max(initial=0), q_t.max(initial=0)) - base) + 1
    ucode = users.get_indexer(events["user_id"].to_numpy(dtype=object)).astype(np.int64)
    key = ucode * span + (t - base)
    order = np.argsort(key, kind="stable")
    key = key[order]
    etype = normalized_types(events["event_type"].to_numpy(dtype=object))[order]
    item_codes, item_vocab = pd.factorize(events["item_id"].to_numpy(dtype=object)[order])
    item_vocab = np.asarray(item_vocab, dtype=object)

    qcode = users.get_indexer(q_users).astype(np.int64)
    qkey = qcode * span + (q_t - base)
    user_start_key = qcode * span
    pos = np.searchsorted(key, qkey, side="left")
    start = np.searchsorted(key, user_start_key, side="left")

    data: dict[str, object] = {}
    for et in EVENT_TYPES:
        key_e = key[etype == et]
        end_e = np.searchsorted(key_e, qkey, side="left")
        for w in WINDOWS_DAYS:
            lo = np.maximum(qkey - w * US_PER_DAY, user_start_key)
            data[f"{et}_{w}d"] = (end_e - np.searchsorted(key_e, lo, side="left")).astype(np.float32)
    vals, lens = _recent_distinct(item_codes, pos, start, HISTORY_LOOKBACK, HISTORY_LEN)
    data["last_items"] = _list_column(vals, lens, item_vocab)
    bought = etype == "purchase"
    key_p, codes_p = key[bought], item_codes[bought]
    pos_p = np.searchsorted(key_p, qkey, side="left")
    start_p = np.searchsorted(key_p, user_start_key, side="left")
    vals, lens = _recent_distinct(codes_p, pos_p, start_p, PURCHASED_LEN, PURCHASED_LEN)
    data["purchased_items"] = _list_column(vals, lens, item_vocab)
    frame = pd.DataFrame(data)
    return frame[["last_items", "purchased_items", *COUNT_COLUMNS]]


def user_features_at(events: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """One row per user present in ``events`` (sorted by user_id): features at ``as_of``."""
    users = np.sort(pd.unique(events["user_id"].to_numpy(dtype=object))).astype(object)
    as_of = pd.Timestamp(as_of)
    as_of = as_of.tz_localize("UTC") if as_of.tzinfo is None else as_of.tz_convert("UTC")
    q = np.full(len(users), int(as_of.value) // 1000, dtype=np.int64)
    out = context_at(events, users, q) if len(users) else pd.DataFrame(
        columns=["last_items", "purchased_items", *COUNT_COLUMNS])
    out.insert(0, "user_id", users)
    out["as_of"] = as_of
    return out


def training_examples(events: pd.DataFrame, start_us: int, end_us: int,
                      target_types: tuple[str, ...]) -> pd.DataFrame:
    """Examples (features just before the event -> the event's item) for every event in
    [start, end) whose type is a target, over many users at once.

    An event on the item the same user touched just before is skipped: the model should learn
    what comes next, not to repeat the item on screen.
    """
    ev = events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    t = as_micros(ev["timestamp"]) if len(ev) else np.zeros(0, np.int64)
    users = ev["user_id"].to_numpy(dtype=object)
    items = ev["item_id"].to_numpy(dtype=object)
    same_prev = np.zeros(len(ev), bool)
    same_prev[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1])
    sel = (t >= start_us) & (t < end_us) & ev["event_type"].isin(target_types).to_numpy() & ~same_prev
    cols = ["user_id", "item_id", "event_type", "timestamp", "last_items", "purchased_items", *COUNT_COLUMNS]
    if not sel.any():
        return pd.DataFrame({c: pd.Series(dtype=object) for c in cols})
    ctx = context_at(ev, users[sel], t[sel])
    ctx.insert(0, "timestamp", ev["timestamp"].to_numpy()[sel])
    ctx.insert(0, "event_type", ev["event_type"].to_numpy()[sel])
    ctx.insert(0, "item_id", items[sel])
    ctx.insert(0, "user_id", users[sel])
    return ctx[cols]


def item_counts_at(events: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """Windowed event counts per item at ``as_of`` (the item_popularity view)."""
    t = as_micros(events["timestamp"])
    q = int(as_micros(pd.Series([as_of]))[0])
    frame = pd.DataFrame({"item_id": events["item_id"].to_numpy(),
                          "event_type": normalized_types(events["event_type"].to_numpy(dtype=object)),
                          "t": t})
    frame = frame[frame["t"] < q]
    out = pd.DataFrame(index=pd.Index(np.sort(pd.unique(events["item_id"])), name="item_id"))
    for et in EVENT_TYPES:
        for w in WINDOWS_DAYS:
            sub = frame[(frame["event_type"] == et) & (frame["t"] >= q - w * US_PER_DAY)]
            out[f"{et}_{w}d"] = sub.groupby("item_id").size().reindex(out.index).fillna(0).astype(np.float32)
    return out.reset_index()


EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}


def popularity_scores(item_counts: pd.DataFrame, window_days: int = 7) -> pd.DataFrame:
    """Weighted recent popularity (purchase > add_to_cart > click > view), best first."""
    score = sum(item_counts[f"{et}_{window_days}d"] * w for et, w in EVENT_WEIGHTS.items())
    out = pd.DataFrame({"item_id": item_counts["item_id"], "score": score.astype(float)})
    return out.sort_values(["score", "item_id"], ascending=[False, True]).reset_index(drop=True)
