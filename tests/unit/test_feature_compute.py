"""Point-in-time feature values (aiplatform/features/compute.py), in pandas alone.

The same functions give training examples, evaluation context and the online features, so
the properties here (nothing at or after the query time counts, window edges, history order,
no leakage of a target into its own context) hold for all three.
"""

import numpy as np
import pandas as pd
import pytest

from aiplatform.features import compute
from aiplatform.features.definitions import COUNT_COLUMNS, HISTORY_LEN, PURCHASED_LEN

T0 = pd.Timestamp("2026-10-10T12:00:00Z")


def _us(ts: pd.Timestamp) -> int:
    return int(pd.Timestamp(ts).value // 1000)


def _events(rows: list[tuple], user: str = "u1") -> pd.DataFrame:
    """rows: (item_id, event_type, timestamp)"""
    return pd.DataFrame({
        "user_id": [user] * len(rows),
        "item_id": [r[0] for r in rows],
        "event_type": [r[1] for r in rows],
        "timestamp": pd.to_datetime([r[2] for r in rows], utc=True),
    })


def _ctx(events: pd.DataFrame, at: pd.Timestamp, user: str = "u1") -> pd.Series:
    return compute.context_at(events, [user], np.array([_us(at)], dtype=np.int64)).iloc[0]


def _examples(events: pd.DataFrame, start: pd.Timestamp, end: pd.Timestamp, types) -> pd.DataFrame:
    return compute.training_examples(events, _us(start), _us(end), tuple(types))


# ---------------------------------------------------------------------------------------------
# context_at / user_features_at


def test_columns_and_types():
    ctx = compute.context_at(_events([("a", "view", T0)]), ["u1"], np.array([_us(T0) + 1], dtype=np.int64))
    assert list(ctx.columns) == ["last_items", "purchased_items", *COUNT_COLUMNS]
    assert all(ctx[c].dtype == np.float32 for c in COUNT_COLUMNS)


def test_events_at_or_after_the_query_time_never_count():
    ev = _events([
        ("a", "view", T0 - pd.Timedelta(hours=1)),
        ("b", "purchase", T0),                          # exactly at the query time
        ("c", "click", T0 + pd.Timedelta(microseconds=1)),
        ("d", "view", T0 + pd.Timedelta(days=2)),
    ])
    row = _ctx(ev, T0)
    assert row["last_items"] == ["a"]
    assert row["purchased_items"] == []
    assert row["view_1d"] == 1 and row["view_30d"] == 1
    assert row["purchase_1d"] == 0 and row["purchase_30d"] == 0
    assert row["click_30d"] == 0
    # One microsecond later, the purchase at T0 is history.
    later = _ctx(ev, T0 + pd.Timedelta(microseconds=1))
    assert later["last_items"] == ["b", "a"]
    assert later["purchased_items"] == ["b"]
    assert later["purchase_1d"] == 1
    assert later["click_1d"] == 0


def test_window_edges_are_inclusive_at_exactly_w_days_back():
    q = T0
    ev = _events([
        ("edge30", "click", q - pd.Timedelta(days=30)),                           # in 30d
        ("out30", "click", q - pd.Timedelta(days=30) - pd.Timedelta(microseconds=1)),  # out
        ("edge7", "click", q - pd.Timedelta(days=7)),                             # in 7d
        ("out7", "click", q - pd.Timedelta(days=7, microseconds=1)),              # out of 7d
        ("edge1", "click", q - pd.Timedelta(days=1)),                             # in 1d
        ("out1", "click", q - pd.Timedelta(days=1, microseconds=1)),              # out of 1d
    ])
    row = _ctx(ev, q)
    assert row["click_1d"] == 1
    assert row["click_7d"] == 3
    assert row["click_30d"] == 5
    # History is not windowed: all six are there, most recent first.
    assert row["last_items"] == ["edge1", "out1", "edge7", "out7", "edge30", "out30"]


def test_counts_per_type_and_window():
    ev = _events([
        ("a", "view", T0 - pd.Timedelta(days=20)),
        ("a", "view", T0 - pd.Timedelta(days=3)),
        ("a", "click", T0 - pd.Timedelta(days=3)),
        ("b", "add_to_cart", T0 - pd.Timedelta(hours=5)),
        ("b", "purchase", T0 - pd.Timedelta(hours=4)),
        ("c", "view", T0 - pd.Timedelta(days=45)),
    ])
    row = _ctx(ev, T0)
    expected = {"view": (0, 1, 2), "click": (0, 1, 1), "add_to_cart": (1, 1, 1), "purchase": (1, 1, 1)}
    for et, (d1, d7, d30) in expected.items():
        assert (row[f"{et}_1d"], row[f"{et}_7d"], row[f"{et}_30d"]) == (d1, d7, d30), et


def test_unknown_event_types_count_as_views():
    ev = _events([
        ("a", "wishlist", T0 - pd.Timedelta(hours=2)),
        ("b", "share", T0 - pd.Timedelta(days=3)),
        ("c", "view", T0 - pd.Timedelta(hours=1)),
        ("d", "click", T0 - pd.Timedelta(hours=1)),
    ])
    row = _ctx(ev, T0)
    assert row["view_1d"] == 2 and row["view_7d"] == 3
    assert row["click_7d"] == 1
    assert row["last_items"][:3] == ["c", "d", "a"] or row["last_items"][:3] == ["d", "c", "a"]
    assert set(row["last_items"]) == {"a", "b", "c", "d"}


def test_last_items_are_distinct_most_recent_first_and_capped():
    n = HISTORY_LEN + 15
    rows = [(f"i{k:03d}", "view", T0 - pd.Timedelta(minutes=10 * (n - k))) for k in range(n)]
    # Revisit an old item most recently: it moves to the front and appears once.
    rows.append(("i000", "click", T0 - pd.Timedelta(seconds=30)))
    row = _ctx(_events(rows), T0)
    last = row["last_items"]
    assert len(last) == HISTORY_LEN
    assert len(set(last)) == HISTORY_LEN
    assert last[0] == "i000"
    assert last[1:] == [f"i{k:03d}" for k in range(n - 1, n - HISTORY_LEN, -1)]


def test_purchased_items_are_distinct_purchases_most_recent_first():
    ev = _events([
        ("a", "purchase", T0 - pd.Timedelta(days=40)),   # older than any window: still kept
        ("b", "add_to_cart", T0 - pd.Timedelta(days=2)),
        ("b", "purchase", T0 - pd.Timedelta(days=2) + pd.Timedelta(seconds=20)),
        ("c", "view", T0 - pd.Timedelta(days=1)),
        ("a", "purchase", T0 - pd.Timedelta(hours=1)),
    ])
    row = _ctx(ev, T0)
    assert row["purchased_items"] == ["a", "b"]
    assert row["purchase_30d"] == 2


def test_purchased_items_are_capped():
    rows = [(f"p{k:03d}", "purchase", T0 - pd.Timedelta(minutes=k + 1)) for k in range(PURCHASED_LEN + 10)]
    row = _ctx(_events(rows), T0)
    assert len(row["purchased_items"]) == PURCHASED_LEN
    assert row["purchased_items"][0] == "p000"


def test_several_query_times_at_once_match_one_at_a_time():
    rng = np.random.default_rng(0)
    times = T0 - pd.to_timedelta(rng.integers(0, 40 * 86400, 200), unit="s")
    ev = _events([(f"i{rng.integers(30)}", rng.choice(["view", "click", "add_to_cart", "purchase", "x"]), t)
                  for t in times])
    qs = [T0 - pd.Timedelta(days=d) for d in (0, 3, 10, 35, 50)]
    together = compute.context_at(ev, ["u1"] * len(qs), np.array([_us(q) for q in qs], dtype=np.int64))
    for i, q in enumerate(qs):
        one = _ctx(ev, q)
        assert together.iloc[i]["last_items"] == one["last_items"]
        assert together.iloc[i]["purchased_items"] == one["purchased_items"]
        assert np.array_equal(together.iloc[i][COUNT_COLUMNS].to_numpy(float), one[COUNT_COLUMNS].to_numpy(float))
    # Before all events: empty context.
    assert together.iloc[-1]["last_items"] == [] and together.iloc[-1][COUNT_COLUMNS].sum() == 0


def test_input_order_does_not_matter():
    rows = [(f"i{k}", "view", T0 - pd.Timedelta(minutes=k + 1)) for k in range(10)]
    a = _ctx(_events(rows), T0)
    b = _ctx(_events(rows[::-1]), T0)
    assert a["last_items"] == b["last_items"] == [f"i{k}" for k in range(10)]


def test_context_at_keeps_users_apart_and_answers_in_query_order():
    ev = pd.concat([
        _events([("a", "view", T0 - pd.Timedelta(hours=3)), ("b", "purchase", T0 - pd.Timedelta(hours=1))], "u1"),
        _events([("c", "click", T0 - pd.Timedelta(hours=2)), ("d", "view", T0 + pd.Timedelta(hours=1))], "u2"),
        _events([("a", "add_to_cart", T0 - pd.Timedelta(days=40))], "u3"),
    ], ignore_index=True).sample(frac=1, random_state=0)  # any row order
    users = ["u2", "u1", "u2", "ghost", "u3"]
    times = [T0, T0, T0 + pd.Timedelta(hours=2), T0, T0]
    out = compute.context_at(ev, users, np.array([_us(t) for t in times], dtype=np.int64))
    assert len(out) == len(users)
    assert out["last_items"].tolist() == [["c"], ["b", "a"], ["d", "c"], [], ["a"]]
    assert out["purchased_items"].tolist() == [[], ["b"], [], [], []]
    for i, (u, t) in enumerate(zip(users, times)):
        one = _ctx(ev[ev["user_id"] == u], t, u)
        assert np.array_equal(out.iloc[i][COUNT_COLUMNS].to_numpy(float), one[COUNT_COLUMNS].to_numpy(float))
    assert out.iloc[3][COUNT_COLUMNS].sum() == 0          # an unknown user has an empty context
    assert out.iloc[4]["add_to_cart_30d"] == 0            # 40 days back: outside every window


def test_last_items_look_back_a_bounded_number_of_events():
    # Documented: distinct items among the last 3 * HISTORY_LEN events.
    lookback = compute.HISTORY_LOOKBACK
    rows = [(f"old{k}", "view", T0 - pd.Timedelta(hours=10, minutes=k)) for k in range(5)]
    rows += [("same", "view", T0 - pd.Timedelta(seconds=lookback - k)) for k in range(lookback)]
    assert _ctx(_events(rows), T0)["last_items"] == ["same"]
    rows.pop()  # one event fewer on "same": the most recent old item comes back into view
    assert _ctx(_events(rows), T0)["last_items"] == ["same", "old0"]


def test_user_features_at_gives_one_row_per_user_with_as_of():
    ev = pd.concat([
        _events([("a", "view", T0 - pd.Timedelta(hours=1)), ("b", "purchase", T0 - pd.Timedelta(hours=2))], "u2"),
        _events([("c", "click", T0 - pd.Timedelta(days=3)), ("d", "view", T0 + pd.Timedelta(hours=1))], "u1"),
    ], ignore_index=True)
    out = compute.user_features_at(ev, T0)
    assert out["user_id"].tolist() == ["u1", "u2"]
    assert out.loc[0, "last_items"] == ["c"]
    assert out.loc[1, "last_items"] == ["a", "b"]
    assert out.loc[1, "purchased_items"] == ["b"]
    assert (out["as_of"] == T0).all()
    # A naive as_of is UTC.
    naive = compute.user_features_at(ev, pd.Timestamp("2026-10-10 12:00:00"))
    assert (naive["as_of"] == T0).all()
    assert naive.loc[0, "last_items"] == ["c"]


def test_user_features_at_with_no_events():
    out = compute.user_features_at(_events([]), T0)
    assert len(out) == 0
    assert {"user_id", "last_items", "purchased_items", *COUNT_COLUMNS} <= set(out.columns)


# ---------------------------------------------------------------------------------------------
# training_examples


ALL_TYPES = ("view", "click", "add_to_cart", "purchase")


def test_training_examples_skip_a_repeat_of_the_previous_item():
    ev = _events([
        ("a", "view", T0),
        ("a", "click", T0 + pd.Timedelta(seconds=5)),       # same item as previous: skipped
        ("b", "view", T0 + pd.Timedelta(seconds=60)),
        ("a", "view", T0 + pd.Timedelta(seconds=120)),      # back to a: a new example
        ("a", "add_to_cart", T0 + pd.Timedelta(seconds=140)),  # skipped
    ])
    ex = _examples(ev, T0 - pd.Timedelta(days=1), T0 + pd.Timedelta(days=1), ALL_TYPES)
    assert ex["item_id"].tolist() == ["a", "b", "a"]
    assert ex["event_type"].tolist() == ["view", "view", "view"]
    assert ex["user_id"].tolist() == ["u1"] * 3
    assert ex["last_items"].tolist() == [[], ["a"], ["b", "a"]]


def test_training_examples_respect_start_end_and_target_types():
    ev = _events([
        ("a", "view", T0 - pd.Timedelta(days=2)),          # before start: history only
        ("b", "click", T0),                                 # at start: a target
        ("c", "view", T0 + pd.Timedelta(hours=1)),          # not a target type
        ("d", "purchase", T0 + pd.Timedelta(hours=2)),
        ("e", "click", T0 + pd.Timedelta(days=1)),          # at end: excluded
    ])
    ex = _examples(ev, T0, T0 + pd.Timedelta(days=1), ("click", "purchase"))
    assert ex["item_id"].tolist() == ["b", "d"]
    assert ex.iloc[0]["last_items"] == ["a"]
    assert ex.iloc[1]["last_items"] == ["c", "b", "a"]
    assert ex.iloc[1]["click_1d"] == 1 and ex.iloc[1]["view_30d"] == 2
    none = _examples(ev, T0 + pd.Timedelta(days=3), T0 + pd.Timedelta(days=4), ALL_TYPES)
    assert len(none) == 0


def test_a_target_never_leaks_into_its_own_context():
    rng = np.random.default_rng(1)
    n = 300
    secs = np.sort(rng.choice(30 * 86400, n, replace=False))
    ev = _events([(f"i{rng.integers(25)}", rng.choice(list(ALL_TYPES) + ["wishlist"]),
                   T0 + pd.Timedelta(seconds=int(s))) for s in secs])
    ex = _examples(ev, T0, T0 + pd.Timedelta(days=31), ALL_TYPES)
    assert len(ex) > 50
    for _, row in ex.iterrows():
        before = ev[ev["timestamp"] < row["timestamp"]]
        # The context is exactly the events strictly before the target ...
        assert sum(row[c] for c in COUNT_COLUMNS if c.endswith("_30d")) == len(before)
        # ... so the most recent history item is the previous event's, never the target's.
        if len(before):
            assert row["last_items"][0] == before.iloc[-1]["item_id"] != row["item_id"]
        else:
            assert row["last_items"] == []


def test_training_examples_over_several_users_never_mix_histories():
    ev = pd.concat([
        _events([("a", "view", T0), ("b", "view", T0 + pd.Timedelta(minutes=2))], "u1"),
        # u2 touches the item u1 touched just before: not a repeat of u2's own previous item.
        _events([("x", "view", T0 - pd.Timedelta(hours=1)), ("a", "click", T0 + pd.Timedelta(minutes=1)),
                 ("a", "purchase", T0 + pd.Timedelta(minutes=3))], "u2"),
    ], ignore_index=True)
    ex = _examples(ev, T0, T0 + pd.Timedelta(days=1), ALL_TYPES)
    got = sorted(zip(ex["user_id"], ex["item_id"], ex["event_type"], map(tuple, ex["last_items"])))
    assert got == [("u1", "a", "view", ()), ("u1", "b", "view", ("a",)), ("u2", "a", "click", ("x",))]


def test_training_examples_with_nothing_in_range_have_the_usual_columns():
    ev = _events([("a", "view", T0)])
    ex = _examples(ev, T0 + pd.Timedelta(days=1), T0 + pd.Timedelta(days=2), ALL_TYPES)
    assert len(ex) == 0
    assert {"user_id", "item_id", "event_type", "timestamp", "last_items", "purchased_items",
            *COUNT_COLUMNS} <= set(ex.columns)


def test_events_at_the_same_instant_do_not_see_each_other():
    ev = _events([
        ("a", "view", T0 - pd.Timedelta(minutes=1)),
        ("b", "view", T0),
        ("c", "view", T0),
    ])
    ex = _examples(ev, T0, T0 + pd.Timedelta(days=1), ALL_TYPES)
    assert ex["item_id"].tolist() == ["b", "c"]
    assert ex["last_items"].tolist() == [["a"], ["a"]]


# ---------------------------------------------------------------------------------------------
# item counts and popularity


def test_item_counts_at_is_point_in_time_and_windowed():
    ev = pd.concat([
        _events([("a", "view", T0 - pd.Timedelta(hours=1)), ("a", "purchase", T0 - pd.Timedelta(days=3)),
                 ("b", "view", T0 - pd.Timedelta(days=10)), ("c", "view", T0 + pd.Timedelta(hours=1)),
                 ("b", "wishlist", T0 - pd.Timedelta(hours=3))], "u1"),
        _events([("a", "view", T0 - pd.Timedelta(hours=2)), ("a", "click", T0)], "u2"),
    ], ignore_index=True)
    out = compute.item_counts_at(ev, T0).set_index("item_id")
    assert set(out.index) == {"a", "b", "c"}
    assert set(COUNT_COLUMNS) <= set(out.columns)
    assert (out.loc["a", "view_1d"], out.loc["a", "purchase_1d"], out.loc["a", "purchase_7d"]) == (2, 0, 1)
    assert out.loc["a", "click_30d"] == 0  # the click at T0 is not before T0
    assert (out.loc["b", "view_1d"], out.loc["b", "view_7d"], out.loc["b", "view_30d"]) == (1, 1, 2)
    assert out.loc["c", COUNT_COLUMNS].sum() == 0  # only seen after T0: present with zeros


def test_popularity_scores_weight_deeper_events_and_break_ties_by_id():
    counts = pd.DataFrame({"item_id": ["v3", "p1", "c2", "t1", "t0", "cart1"]})
    for c in COUNT_COLUMNS:
        counts[c] = 0.0
    counts.loc[0, "view_7d"] = 3          # 3
    counts.loc[1, "purchase_7d"] = 1      # 8
    counts.loc[2, "click_7d"] = 2         # 4
    counts.loc[3, "click_7d"] = 1         # 2 (tie with t0)
    counts.loc[4, "view_7d"] = 2          # 2
    counts.loc[5, "add_to_cart_7d"] = 1   # 4 (tie with c2)
    counts.loc[0, "purchase_30d"] = 100   # outside the 7-day window: ignored
    scores = compute.popularity_scores(counts)
    assert scores["item_id"].tolist() == ["p1", "c2", "cart1", "v3", "t0", "t1"]
    assert scores["score"].tolist() == [8.0, 4.0, 4.0, 3.0, 2.0, 2.0]
    by30 = compute.popularity_scores(counts, window_days=30)
    assert by30["item_id"].iloc[0] == "v3"


def test_popularity_from_item_counts_end_to_end():
    ev = _events([("x", "view", T0 - pd.Timedelta(hours=k)) for k in range(1, 6)]
                 + [("y", "purchase", T0 - pd.Timedelta(hours=1))]
                 + [("z", "purchase", T0 + pd.Timedelta(hours=1))])  # the future: no score
    scores = compute.popularity_scores(compute.item_counts_at(ev, T0))
    assert scores["item_id"].tolist() == ["y", "x", "z"]
    assert scores["score"].tolist() == [8.0, 5.0, 0.0]


@pytest.mark.parametrize("as_of", [T0, pd.Timestamp("2026-10-10 12:00:00")])
def test_item_counts_accept_naive_and_aware_as_of(as_of):
    ev = _events([("a", "view", T0 - pd.Timedelta(seconds=1)), ("a", "view", T0)])
    out = compute.item_counts_at(ev, as_of)
    assert out.loc[out["item_id"] == "a", "view_1d"].item() == 1
