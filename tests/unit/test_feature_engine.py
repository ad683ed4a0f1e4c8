"""The vectorised feature engine against a slow, obviously-correct per-row reference.

The reference below is a literal reading of the semantics in ``features.definitions``: for each
(entity, distinct timestamp) it loops over the entity's rows in (key, ts) stable order.
"""

from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from aiplatform.core.errors import ConfigError
from aiplatform.features.definitions import Aggregation, BatchSource, Entity, FeatureView, Field
from aiplatform.features.engine import compute_view_rows, output_schema, tie_columns
from aiplatform.features.partition import entity_bucket

USER = Entity("user", "user_id")
EVENTS = BatchSource("events", "timestamp")
BASE = pd.Timestamp("2026-01-01", tz="UTC")


def _reference(view: FeatureView, frame: pd.DataFrame, emit_after_us=None) -> list[dict]:
    key, tsf = view.entity.join_key, view.source.timestamp_field
    frame = frame.copy()
    frame["_us"] = frame[tsf].map(lambda t: int(pd.Timestamp(t).value // 1000))
    frame["_k"] = frame[key].astype(str)
    cols = tie_columns(view)
    frame["_tie"] = pd.util.hash_pandas_object(frame[cols], index=False).to_numpy() if cols else 0
    frame = frame.sort_values(["_k", "_us", "_tie"], kind="stable")
    records = frame.to_dict("records")
    rows = []
    for k in sorted(set(frame["_k"])):
        mine = [r for r in records if r["_k"] == k]
        for t in sorted({r["_us"] for r in mine}):
            if emit_after_us is not None and t <= emit_after_us:
                continue
            upto = [r for r in mine if r["_us"] <= t]
            row = {key: k, "event_timestamp": t, "_bucket": int(entity_bucket([k])[0])}
            for a in view.aggregations:
                w = int(a.window.total_seconds() * 1_000_000)
                win = [r for r in upto if r["_us"] > t - w
                       and all(r[c] in vals for c, vals in a.where)
                       and (a.column is None or not pd.isna(r[a.column]))]
                vals = [r[a.column] for r in win] if a.column else []
                if a.function == "count":
                    row[a.name] = len(win)
                elif a.function == "sum":
                    row[a.name] = float(sum(vals))
                elif a.function == "mean":
                    row[a.name] = float(np.mean(vals)) if vals else None
                elif a.function == "min":
                    row[a.name] = float(min(vals)) if vals else None
                elif a.function == "max":
                    row[a.name] = float(max(vals)) if vals else None
                elif a.function == "last_n":
                    out: list[str] = []
                    for v in reversed([str(v) for v in vals]):
                        if a.distinct and v in out:
                            continue
                        out.append(v)
                        if len(out) == a.n:
                            break
                    row[a.name] = out
            for f in view.fields:
                row[f.name] = upto[-1][f.column]
            rows.append(row)
    return rows


def _random_events(rng: np.random.Generator, n: int, users: int = 6, items: int = 5,
                   span_h: int = 72) -> pd.DataFrame:
    # coarse timestamps (whole hours) so that many rows tie, and windows end exactly on rows
    hours = rng.integers(0, span_h, n)
    value = rng.normal(10, 5, n).round(2)
    value[rng.random(n) < 0.2] = np.nan
    return pd.DataFrame({
        "user_id": rng.choice([f"u{i}" for i in range(users)], n),
        "item_id": rng.choice([f"i{i}" for i in range(items)], n),
        "event_type": rng.choice(["view", "click", "purchase"], n, p=[0.6, 0.25, 0.15]),
        "timestamp": (BASE + pd.to_timedelta(hours, unit="h")).as_unit("us"),
        "value": value,
    })


def _view(aggs, fields=()) -> FeatureView:
    return FeatureView("v", USER, EVENTS, aggregations=tuple(aggs), fields=tuple(fields))


AGGS = [
    Aggregation("count", timedelta(hours=1)),
    Aggregation("count", timedelta(hours=5), where={"event_type": ["click", "purchase"]}),
    Aggregation("count", timedelta(hours=24), column="value", name="nonnull_value_24h"),
    Aggregation("sum", timedelta(hours=10), column="value"),
    Aggregation("mean", timedelta(hours=7), column="value", where={"event_type": "purchase"}),
    Aggregation("min", timedelta(hours=13), column="value"),
    Aggregation("max", timedelta(hours=40), column="value", where={"event_type": "view"}),
    Aggregation("last_n", timedelta(hours=12), column="item_id", n=3, name="last3"),
    Aggregation("last_n", timedelta(hours=30), column="item_id", n=4, distinct=True, name="last4d"),
    Aggregation("last_n", timedelta(hours=2), column="item_id", n=1, distinct=True, name="last1d"),
    Aggregation("last_n", timedelta(days=30), column="item_id", n=2, distinct=True,
                where={"event_type": "purchase"}, name="bought2"),
    Aggregation("last_n", timedelta(hours=20), column="event_type", n=10, distinct=False, name="types10"),
]


def _assert_matches(view, frame, emit_after_us=None):
    got = compute_view_rows(view, frame, emit_after_us=emit_after_us)
    assert got.schema == output_schema(view)
    expected = _reference(view, frame, emit_after_us)
    assert got.num_rows == len(expected)
    cols = got.to_pydict()
    for i, exp in enumerate(expected):
        for name, value in exp.items():
            actual = cols[name][i]
            if name == "event_timestamp":
                actual = int(pd.Timestamp(actual).value // 1000)
            if isinstance(value, float) and actual is not None:
                assert actual == pytest.approx(value, rel=1e-9, abs=1e-9), (name, i)
            else:
                assert actual == value, (name, i, exp[view.entity.join_key], exp["event_timestamp"])


@pytest.mark.parametrize("seed", range(12))
def test_windowed_aggregations_match_the_reference(seed):
    rng = np.random.default_rng(seed)
    frame = _random_events(rng, int(rng.integers(1, 160)))
    _assert_matches(_view(AGGS, fields=[Field("last_type", "string", column="event_type")]), frame)


@pytest.mark.parametrize("seed", range(6))
def test_emit_after_keeps_windows_but_emits_only_newer_rows(seed):
    rng = np.random.default_rng(100 + seed)
    frame = _random_events(rng, 120)
    cut = int((BASE + pd.Timedelta(hours=int(rng.integers(10, 60)))).value // 1000)
    _assert_matches(_view(AGGS), frame, emit_after_us=cut)


def test_emit_after_equals_the_tail_of_a_full_computation():
    frame = _random_events(np.random.default_rng(7), 300)
    view = _view(AGGS)
    cut = int((BASE + pd.Timedelta(hours=40)).value // 1000)
    full = compute_view_rows(view, frame).to_pandas()
    tail = full[full["event_timestamp"] > pd.Timestamp(cut, unit="us", tz="UTC")].reset_index(drop=True)
    part = compute_view_rows(view, frame, emit_after_us=cut).to_pandas()
    pd.testing.assert_frame_equal(part, tail)


def test_input_order_does_not_change_any_result_even_among_equal_timestamps():
    t = BASE.as_unit("us")
    frame = pd.DataFrame({"user_id": ["u", "u", "u"], "item_id": ["a", "b", "c"],
                          "event_type": ["view"] * 3, "timestamp": [t, t, t], "value": [1.0, 2.0, 3.0]})
    view = _view([Aggregation("count", timedelta(hours=1)),
                  Aggregation("last_n", timedelta(hours=1), column="item_id", n=5, name="last")],
                 fields=[Field("last_value", "float64", column="value")])
    a = compute_view_rows(view, frame).to_pydict()
    b = compute_view_rows(view, frame.iloc[::-1]).to_pydict()
    c = compute_view_rows(view, frame.iloc[[1, 0, 2]]).to_pydict()
    assert a["count_1h"] == [3]  # one row per (entity, timestamp), all ties included
    assert a == b == c  # Ray's shuffle does not keep order: ties are ordered by row content
    assert sorted(a["last"][0]) == ["a", "b", "c"]
    assert a["last_value"][0] == {"a": 1.0, "b": 2.0, "c": 3.0}[a["last"][0][0]]  # same "latest" row


def test_window_boundary_is_open_at_the_start_and_closed_at_the_end():
    ts = [BASE, BASE + pd.Timedelta(hours=1), BASE + pd.Timedelta(hours=2)]
    frame = pd.DataFrame({"user_id": ["u"] * 3, "item_id": ["a", "b", "c"], "event_type": ["view"] * 3,
                          "timestamp": pd.DatetimeIndex(ts).as_unit("us"), "value": [1.0, 2.0, 4.0]})
    out = compute_view_rows(_view([Aggregation("sum", timedelta(hours=1), column="value")]), frame)
    assert out.column("sum_value_1h").to_pylist() == [1.0, 2.0, 4.0]  # the row 1h earlier is out


def test_empty_source_gives_an_empty_table_with_the_schema():
    view = _view(AGGS)
    frame = _random_events(np.random.default_rng(0), 5).iloc[:0]
    out = compute_view_rows(view, frame)
    assert out.num_rows == 0 and out.schema == output_schema(view)


def test_static_view_keeps_the_latest_row_per_entity_at_the_epoch():
    item = Entity("item", "item_id")
    view = FeatureView("attrs", item, BatchSource("items", None),
                       fields=(Field("category", "string"), Field("price", "float64")))
    frame = pd.DataFrame({"item_id": ["b", "a", "b"], "category": ["x", "y", "z"], "price": [1, 2, 3]})
    out = compute_view_rows(view, pa.Table.from_pandas(frame)).to_pydict()
    assert out["item_id"] == ["a", "b"]
    assert out["category"] == ["y", "z"] and out["price"] == [2.0, 3.0]
    assert all(pd.Timestamp(t).value == 0 for t in out["event_timestamp"])
    assert out["_bucket"] == list(entity_bucket(["a", "b"]))


def test_static_view_with_aggregations_is_refused():
    view = FeatureView("bad", USER, BatchSource("users", None),
                       aggregations=(Aggregation("count", timedelta(days=1)),))
    with pytest.raises(ConfigError, match="timestamp"):
        compute_view_rows(view, pd.DataFrame({"user_id": ["u"]}))


def test_a_large_frame_is_computed_vectorised():
    """Not a timing assertion: a frame with long histories must go through without per-row work
    blowing up (the distinct last_n loop runs once per position within an entity)."""
    rng = np.random.default_rng(3)
    n = 200_000
    frame = pd.DataFrame({
        "user_id": rng.choice([f"u{i}" for i in range(2_000)], n),
        "item_id": rng.choice([f"i{i}" for i in range(500)], n),
        "event_type": rng.choice(["view", "purchase"], n),
        "timestamp": (BASE + pd.to_timedelta(rng.integers(0, 90 * 86400, n), unit="s")).as_unit("us"),
        "value": rng.random(n),
    })
    view = _view([Aggregation("count", timedelta(days=7), where={"event_type": "view"}),
                  Aggregation("max", timedelta(days=30), column="value"),
                  Aggregation("last_n", timedelta(days=30), column="item_id", n=20, distinct=True, name="li")])
    out = compute_view_rows(view, frame)
    assert out.num_rows == frame.groupby(["user_id", "timestamp"]).ngroups
    assert max(len(x) for x in out.column("li").to_pylist()) == 20
