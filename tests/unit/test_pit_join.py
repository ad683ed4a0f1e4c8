"""Property tests of the exact as-of join core against pandas.merge_asof (no Ray).

The reference stable-sorts both sides by time and runs ``merge_asof(by=key, direction="backward",
allow_exact_matches=True, tolerance=ttl)``: among feature rows with equal (key, time) it picks the
last in input order, which is the offline store's "written later wins".
"""

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiplatform.core.errors import UserInputError
from aiplatform.features.pit import asof_join, asof_join_batches

T0 = pd.Timestamp("2025-03-01", tz="UTC")
FEATURE_SCHEMA = pa.schema([("user_id", pa.string()), ("event_timestamp", pa.timestamp("us", tz="UTC")),
                            ("row", pa.int64()), ("items", pa.list_(pa.string()))])
# keys u0..u2 are on both sides, u3 on the labels only, u4/u5 on the features only


def _ts(us: list[int]) -> pd.Series:
    """Microsecond times after T0 (built in numpy: offsets up to 2**61 us stay in range)."""
    values = (np.int64(T0.value // 1000) + np.asarray(us, dtype=np.int64)).astype("datetime64[us]")
    return pd.Series(values).dt.tz_localize("UTC")


@st.composite
def cases(draw):
    wide = draw(st.booleans())  # wide spans force the rank path of the sort key (code * span overflows)
    tmax = 2**61 if wide else 30
    times = st.integers(0, tmax)
    n_f = draw(st.integers(0, 40))
    f_keys = draw(st.lists(st.sampled_from(["u0", "u1", "u2", "u4", "u5"]), min_size=n_f, max_size=n_f))
    f_t = draw(st.lists(times, min_size=n_f, max_size=n_f))
    # duplicates of (key, time): copy some earlier rows' key and time
    for i in range(1, n_f):
        if draw(st.integers(0, 4)) == 0:
            j = draw(st.integers(0, i - 1))
            f_keys[i], f_t[i] = f_keys[j], f_t[j]
    n_l = draw(st.integers(0, 40))
    l_keys = draw(st.lists(st.sampled_from(["u0", "u1", "u2", "u3", None]), min_size=n_l, max_size=n_l))
    l_t = draw(st.lists(times, min_size=n_l, max_size=n_l))
    ttl = draw(st.one_of(st.none(), st.integers(0, 12) if not wide else st.integers(0, 2**60)))
    # labels exactly on the ttl edge (and one past it) of some feature row
    if ttl is not None and n_f:
        for i in range(n_l):
            if draw(st.integers(0, 3)) == 0 and l_keys[i] is not None:
                j = draw(st.integers(0, n_f - 1))
                l_keys[i], l_t[i] = (f_keys[j] if f_keys[j] in ("u0", "u1", "u2") else l_keys[i]), \
                    f_t[j] + ttl + draw(st.integers(0, 1))
    features = pd.DataFrame({"user_id": pd.Series(f_keys, dtype=object), "event_timestamp": _ts(f_t), "row": np.arange(n_f, dtype=np.int64),
                             "items": pd.Series([[f"i{k}"] * (k % 3) for k in range(n_f)], dtype=object)})
    labels = pd.DataFrame({"label_id": np.arange(n_l, dtype=np.int64), "user_id": pd.Series(l_keys, dtype=object),
                           "ts": _ts(l_t)})
    return labels, features, ttl


def reference(labels: pd.DataFrame, features: pd.DataFrame, ttl: int | None) -> pd.DataFrame:
    """merge_asof on stable-sorted inputs; rows with a null key are 'missing' by definition."""
    left = labels[labels["user_id"].notna()].sort_values("ts", kind="stable")
    right = features.sort_values("event_timestamp", kind="stable").rename(columns={"event_timestamp": "ft"})
    right["matched"] = right["ft"]
    common = dict(left_on="ts", right_on="ft", by="user_id", direction="backward", allow_exact_matches=True)
    any_row = pd.merge_asof(left, right[["user_id", "ft", "matched"]], **common)
    tol = None if ttl is None else pd.Timedelta(np.timedelta64(ttl, "us"))
    valid = pd.merge_asof(left, right[["user_id", "ft", "row"]], tolerance=tol, **common)
    out = labels[["label_id"]].merge(any_row[["label_id", "matched"]], on="label_id", how="left")
    out = out.merge(valid[["label_id", "row"]], on="label_id", how="left")
    out["status"] = np.where(out["row"].notna(), "ok", np.where(out["matched"].notna(), "expired", "missing"))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.booleans())
def test_asof_join_matches_merge_asof(case, as_arrow):
    labels, features, ttl = case
    shuffled = features.sample(frac=1.0, random_state=7) if len(features) else features  # unsorted input
    typed = pa.Table.from_pandas(shuffled, preserve_index=False, schema=FEATURE_SCHEMA)
    got = asof_join(pa.Table.from_pandas(labels, preserve_index=False) if as_arrow else labels,
                    typed if as_arrow or not len(shuffled) else shuffled,
                    key="user_id", label_ts="ts", ttl_us=ttl, feature_columns=["row", "items"],
                    prefix_status="view").to_pandas()
    # shuffling changes which duplicate is "later": the reference must see the same order
    ref = reference(labels, shuffled.reset_index(drop=True), ttl)

    assert got["label_id"].tolist() == labels["label_id"].tolist()  # nothing dropped or reordered
    assert [None if pd.isna(k) else k for k in got["user_id"]] == labels["user_id"].tolist()
    assert got["view__status"].tolist() == ref["status"].tolist()
    got_row = got["row"].astype("Int64")
    assert got_row.tolist() == ref["row"].astype("Int64").tolist()
    ref_matched = pd.to_datetime(ref["matched"], utc=True)
    assert got["view__event_timestamp"].isna().tolist() == ref_matched.isna().tolist()
    has = ref_matched.notna().to_numpy()
    assert (got["view__event_timestamp"][has].to_numpy() == ref_matched[has].to_numpy()).all()
    # list column gathered from the same row as the scalar one, nulls where not ok
    by_row = dict(zip(shuffled["row"], shuffled["items"]))
    for r, items in zip(got_row, got["items"]):
        assert (items is None) if pd.isna(r) else list(items) == by_row[int(r)]


def _frames(f_us, l_us, keys=("a",)):
    features = pd.DataFrame({"k": list(keys) * len(f_us), "event_timestamp": _ts(list(f_us)),
                             "v": np.arange(len(f_us), dtype=np.float64)})
    labels = pd.DataFrame({"k": [keys[0]] * len(l_us), "t": _ts(list(l_us))})
    return labels, features


def test_ttl_edge_is_inclusive_and_one_microsecond_later_expires():
    labels, features = _frames([100], [100 + 50, 100 + 51, 99])
    out = asof_join(labels, features, key="k", label_ts="t", ttl_us=50, feature_columns=["v"],
                    prefix_status="f").to_pandas()
    assert out["f__status"].tolist() == ["ok", "expired", "missing"]
    assert out["v"].isna().tolist() == [False, True, True]
    assert out["f__event_timestamp"].notna().tolist() == [True, True, False]


def test_duplicate_key_time_rows_later_row_wins():
    labels, features = _frames([5, 5, 5], [5, 6])
    out = asof_join(labels, features, key="k", label_ts="t", ttl_us=None, feature_columns=["v"], prefix_status="f")
    assert out.column("v").to_pylist() == [2.0, 2.0]


def test_nanosecond_label_times_are_floored_not_rounded_up():
    labels, features = _frames([10], [])
    labels = pd.DataFrame({"k": ["a", "a"], "t": pd.Series([T0 + pd.Timedelta(nanoseconds=9_999),
                                                             T0 + pd.Timedelta(nanoseconds=10_999)])
                           .astype("datetime64[ns, UTC]")})
    out = asof_join(labels, features, key="k", label_ts="t", ttl_us=None, feature_columns=["v"], prefix_status="f")
    assert out.column("f__status").to_pylist() == ["missing", "ok"]


def test_missing_columns_and_clashes_are_named():
    labels, features = _frames([1], [2])
    with pytest.raises(UserInputError, match="'when'"):
        asof_join(labels, features, key="k", label_ts="when", ttl_us=None, feature_columns=["v"], prefix_status="f")
    with pytest.raises(UserInputError, match="'nope'"):
        asof_join(labels, features, key="k", label_ts="t", ttl_us=None, feature_columns=["nope"], prefix_status="f")
    with pytest.raises(UserInputError, match="'v'"):
        asof_join(labels.assign(v=1.0), features, key="k", label_ts="t", ttl_us=None, feature_columns=["v"],
                  prefix_status="f")


def test_empty_sides_keep_types():
    labels, features = _frames([], [3, 4])
    out = asof_join(labels, features, key="k", label_ts="t", ttl_us=10, feature_columns=["v"], prefix_status="f")
    assert out.num_rows == 2 and out.schema.field("v").type == pa.float64()
    assert out.column("f__status").to_pylist() == ["missing", "missing"]
    out = asof_join(labels.iloc[:0], features, key="k", label_ts="t", ttl_us=10, feature_columns=["v"],
                    prefix_status="f")
    assert out.num_rows == 0 and out.column_names == ["k", "t", "v", "f__event_timestamp", "f__status"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cases(), st.data())
def test_batched_join_equals_the_whole_join(case, data):
    """The streaming form the Ray join runs per bucket: rows cut into batches arriving in any
    order, write order given by an order column, must give exactly ``asof_join`` on all rows in
    write order (ties across batches: the later write wins; a superseded row's features are
    dropped even when the new best row is expired)."""
    labels, features, ttl = case
    typed = pa.Table.from_pandas(features, preserve_index=False, schema=FEATURE_SCHEMA)
    lab = pa.Table.from_pandas(labels, preserve_index=False)
    want = asof_join(lab, typed, key="user_id", label_ts="ts", ttl_us=ttl, feature_columns=["row", "items"],
                     prefix_status="view")
    n = typed.num_rows
    written = typed.append_column("_rowaddr", pa.array(np.arange(n, dtype=np.uint64) * 3 + 7))  # gaps allowed
    perm = np.array(data.draw(st.permutations(range(n))), dtype=np.int64)
    shuffled = written.take(pa.array(perm, pa.int64()))
    cuts = [0, *sorted(data.draw(st.lists(st.integers(0, n), max_size=5))), n]
    batches = [shuffled.slice(a, b - a) for a, b in zip(cuts[:-1], cuts[1:])]
    got = asof_join_batches(lab, iter(batches), key="user_id", label_ts="ts", ttl_us=ttl,
                            feature_columns=["row", "items"], fields=[FEATURE_SCHEMA.field("row"),
                                                                      FEATURE_SCHEMA.field("items")],
                            prefix_status="view")
    assert got.schema == want.schema
    assert got.equals(want)


def test_batched_join_with_no_rows_keeps_types():
    labels, _ = _frames([], [3, 4])
    got = asof_join_batches(pa.Table.from_pandas(labels, preserve_index=False), iter([]), key="k", label_ts="t",
                            ttl_us=10, feature_columns=["v"], fields=[pa.field("v", pa.float64())], prefix_status="f")
    assert got.schema.field("v").type == pa.float64() and got.column("v").null_count == 2
    assert got.column("f__status").to_pylist() == ["missing", "missing"]
