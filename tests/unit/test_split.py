"""The adaptive evaluation split: time split when it leaves enough users, per-user otherwise."""

import numpy as np
import pandas as pd
import pytest

from apps.shop.generate import ShopSize, generate
from aiplatform.training.split import adaptive_split, per_user_split, time_split

DAY = pd.Timedelta(days=1)


def _long_span_events(n_users: int = 300, seed: int = 0) -> pd.DataFrame:
    """Two years of events; only 5 users are active in the last week (a quiet tail)."""
    rng = np.random.default_rng(seed)
    start = pd.Timestamp("2024-01-01", tz="UTC")
    rows = []
    for u in range(n_users):
        n = int(rng.integers(3, 12))
        days = np.sort(rng.uniform(0, 700, n))  # nobody in the last 30 days ...
        for d in days:
            rows.append((f"u{u}", f"i{int(rng.integers(0, 40))}", str(rng.choice(["view", "click", "purchase"])),
                         start + d * DAY))
    for u in range(5):  # ... except five users in the last week
        rows.append((f"u{u}", "i1", "click", start + 728 * DAY + u * pd.Timedelta(hours=1)))
    return pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp"])


def test_shop_default_stays_on_the_time_split():
    events = generate(ShopSize(users=800, items=100), seed=3)["events"]
    split = adaptive_split(events, holdout_days=7, min_users=500)
    assert split.kind == "time"
    assert split.name == "time: last 7 days"
    assert split.n_users >= 500
    assert split.cutoff == pd.to_datetime(events["timestamp"], utc=True).max() - 7 * DAY
    assert "500" in split.reason
    assert (split.user_cutoffs == split.cutoff).all() and len(split.user_cutoffs) == split.n_users


def test_long_span_with_a_quiet_last_week_switches_to_per_user():
    events = _long_span_events()
    timed = time_split(events, 7)
    assert timed.n_users <= 5
    split = adaptive_split(events, holdout_days=7, min_users=500)  # 300 users < 500: all must validate
    assert split.kind == "per_user"
    assert split.name == "per-user: last 20% of each user's events"
    assert split.n_users > 100  # every user with >= 2 events and a relevant held-out event
    assert str(timed.n_users) in split.reason and "300 users" in split.reason
    assert split.summary()["users"] == split.n_users


def test_per_user_split_never_leaks():
    events = _long_span_events(seed=1)
    split = per_user_split(events, 0.2)
    ts = pd.to_datetime(split.train["timestamp"], utc=True)
    cut = split.user_cutoffs.reindex(split.train["user_id"].astype(str)).to_numpy()
    known = ~pd.isna(cut)
    # every training event of a validation user is at or before that user's cutoff
    assert (ts.to_numpy()[known] <= pd.to_datetime(cut[known], utc=True)).all()
    held = events.loc[~events.index.isin(split.train.index)]
    held_cut = split.user_cutoffs.reindex(held["user_id"].astype(str))
    held_ts = pd.to_datetime(held["timestamp"], utc=True)
    in_truth = held_cut.notna().to_numpy()
    assert (held_ts.to_numpy()[in_truth] > pd.to_datetime(held_cut.to_numpy()[in_truth], utc=True)).all()
    # the truth is exactly the relevant held-out events
    rel = held[held["event_type"].isin(["click", "add_to_cart", "purchase"])]
    expected: dict[str, set[str]] = {}
    for u, i in zip(rel["user_id"], rel["item_id"], strict=True):
        expected.setdefault(u, set()).add(i)
    assert split.truth == expected
    # nothing lost, nothing duplicated
    assert len(split.train) + len(held) == len(events)


def test_per_user_split_holds_out_the_last_fifth_and_never_everything():
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    events = pd.DataFrame({
        "user_id": ["a"] * 10 + ["b"] * 2 + ["c"],
        "item_id": [f"i{k}" for k in range(10)] + ["x", "y"] + ["z"],
        "event_type": ["click"] * 13,
        "timestamp": [t0 + k * DAY for k in range(10)] + [t0, t0 + DAY] + [t0],
    })
    split = per_user_split(events, 0.2)
    assert split.truth == {"a": {"i8", "i9"}, "b": {"y"}}  # ceil(0.2 * 10) = 2; b keeps 1 of 2; c is whole
    assert split.user_cutoffs["a"] == t0 + 7 * DAY
    assert set(split.train["user_id"]) == {"a", "b", "c"} and len(split.train) == 10


def test_ties_at_the_cutoff_stay_in_training():
    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    events = pd.DataFrame({"user_id": ["a"] * 4, "item_id": ["p", "q", "r", "s"], "event_type": ["click"] * 4,
                           "timestamp": [t0, t0 + DAY, t0 + DAY, t0 + DAY]})
    split = per_user_split(events, 0.25)  # the last event ties with the one before: nothing strictly after
    assert split.truth == {}
    assert len(split.train) == 4


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="timestamp"):
        adaptive_split(pd.DataFrame({"user_id": ["a"], "item_id": ["i"], "event_type": ["view"]}))
    events = _long_span_events(20)
    with pytest.raises(ValueError, match="holdout_fraction"):
        per_user_split(events, 1.5)
    with pytest.raises(ValueError, match="min_users"):
        adaptive_split(events, 7, min_users=0)
