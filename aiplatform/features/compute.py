"""Point-in-time feature values of a user, computed from that user's events alone.

One function serves the three places that need user features: training examples (features
just before each event), evaluation (features at the split time) and the offline/online
stores (features now). Computing them once, in one place, is what keeps training and
serving from drifting apart.
"""

import numpy as np
import pandas as pd

from aiplatform.core.schemas import EVENT_TYPES
from aiplatform.features.definitions import COUNT_COLUMNS, HISTORY_LEN, PURCHASED_LEN, WINDOWS_DAYS

_US_PER_DAY = 86_400 * 1_000_000


def _as_micros(ts: pd.Series | np.ndarray) -> np.ndarray:
    arr = pd.to_datetime(pd.Series(ts), utc=True)
    return arr.dt.as_unit("us").astype("int64").to_numpy()


def _recent_distinct(items: np.ndarray, end: int, limit: int) -> list[str]:
    """Up to ``limit`` distinct items of items[:end], most recent first."""
    out: list[str] = []
    seen: set[str] = set()
    i = end - 1
    while i >= 0 and len(out) < limit:
        it = items[i]
        if it not in seen:
            seen.add(it)
            out.append(it)
        i -= 1
    return out


def user_context(events: pd.DataFrame, query_times: np.ndarray) -> pd.DataFrame:
    """Features of one user at each query time, from events strictly before it.

    ``events``: one user's rows (any order) with item_id, event_type, timestamp.
    ``query_times``: int64 microseconds since the epoch (UTC).
    Returns one row per query time: last_items, purchased_items and the windowed counts.
    """
    ev = events.sort_values("timestamp", kind="stable")
    t = _as_micros(ev["timestamp"])
    items = ev["item_id"].to_numpy(dtype=object)
    etype = ev["event_type"].to_numpy(dtype=object)
    q = np.asarray(query_times, dtype=np.int64)
    data: dict[str, object] = {}
    for et in EVENT_TYPES:
        # Unknown event types are weighted as views (DESIGN.md).
        mask = (etype == et) if et != "view" else ~np.isin(etype, EVENT_TYPES[1:])
        te = t[mask]
        end = np.searchsorted(te, q, side="left")
        for w in WINDOWS_DAYS:
            start = np.searchsorted(te, q - w * _US_PER_DAY, side="left")
            data[f"{et}_{w}d"] = (end - start).astype(np.float32)
    pos = np.searchsorted(t, q, side="left")
    bought_mask = etype == "purchase"
    bought_items, bought_t = items[bought_mask], t[bought_mask]
    bought_pos = np.searchsorted(bought_t, q, side="left")
    data["last_items"] = [_recent_distinct(items, int(p), HISTORY_LEN) for p in pos]
    data["purchased_items"] = [_recent_distinct(bought_items, int(p), PURCHASED_LEN) for p in bought_pos]
    frame = pd.DataFrame(data)
    return frame[["last_items", "purchased_items", *COUNT_COLUMNS]]


def user_features_at(events: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """One row per user present in ``events``: their features at ``as_of``."""
    q = np.array([_as_micros(pd.Series([as_of]))[0]], dtype=np.int64)
    rows = []
    for uid, group in events.groupby("user_id", sort=True):
        row = user_context(group, q)
        row.insert(0, "user_id", uid)
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=["user_id", "last_items", "purchased_items", *COUNT_COLUMNS])
    out = pd.concat(rows, ignore_index=True)
    out["as_of"] = pd.Timestamp(as_of).tz_convert("UTC") if pd.Timestamp(as_of).tzinfo else pd.Timestamp(as_of, tz="UTC")
    return out


def training_examples_for_user(events: pd.DataFrame, start_us: int, end_us: int,
                               target_types: tuple[str, ...]) -> pd.DataFrame:
    """Examples (context before the event -> the event's item) for one user's events in
    [start, end). An event on the item the user touched just before is skipped: the model
    should learn what comes next, not to repeat the item on screen."""
    ev = events.sort_values("timestamp", kind="stable").reset_index(drop=True)
    t = _as_micros(ev["timestamp"])
    items = ev["item_id"].to_numpy(dtype=object)
    prev = np.concatenate([[None], items[:-1]])
    sel = (t >= start_us) & (t < end_us) & ev["event_type"].isin(target_types).to_numpy() & (items != prev)
    if not sel.any():
        return pd.DataFrame()
    ctx = user_context(ev, t[sel])
    ctx.insert(0, "timestamp", ev["timestamp"].to_numpy()[sel])
    ctx.insert(0, "event_type", ev["event_type"].to_numpy()[sel])
    ctx.insert(0, "item_id", items[sel])
    ctx.insert(0, "user_id", ev["user_id"].iloc[0])
    return ctx


def item_counts_at(events: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """Windowed event counts per item at ``as_of`` (the item_popularity view)."""
    t = _as_micros(events["timestamp"])
    q = _as_micros(pd.Series([as_of]))[0]
    etype = events["event_type"].to_numpy(dtype=object)
    etype = np.where(np.isin(etype, EVENT_TYPES), etype, "view")
    frame = pd.DataFrame({"item_id": events["item_id"].to_numpy(), "event_type": etype, "t": t})
    frame = frame[frame["t"] < q]
    out = pd.DataFrame({"item_id": pd.unique(events["item_id"])}).set_index("item_id")
    for et in EVENT_TYPES:
        for w in WINDOWS_DAYS:
            sub = frame[(frame["event_type"] == et) & (frame["t"] >= q - w * _US_PER_DAY)]
            out[f"{et}_{w}d"] = sub.groupby("item_id").size().reindex(out.index).fillna(0).astype(np.float32)
    return out.reset_index()


EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}


def popularity_scores(item_counts: pd.DataFrame, window_days: int = 7) -> pd.DataFrame:
    """Weighted recent popularity (purchase > add_to_cart > click > view), best first."""
    score = sum(item_counts[f"{et}_{window_days}d"] * w for et, w in EVENT_WEIGHTS.items())
    out = pd.DataFrame({"item_id": item_counts["item_id"], "score": score.astype(float)})
    return out.sort_values(["score", "item_id"], ascending=[False, True]).reset_index(drop=True)
