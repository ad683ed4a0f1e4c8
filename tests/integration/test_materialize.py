"""Materialization from real Lance offline tables into real SQLite and Redis stores."""

from datetime import timedelta
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from aiplatform.core.errors import NotFoundError
from aiplatform.core.storage import Layout
from aiplatform.features.definitions import Aggregation, BatchSource, Entity, FeatureService, FeatureView, Field
from aiplatform.features.materialize import materialize, watermark_key
from aiplatform.features.online import open_online_store
from aiplatform.features.partition import entity_bucket

US = pa.timestamp("us", tz="UTC")
shopper = Entity("shopper", "shopper_id")
activity = FeatureView("activity", shopper, BatchSource("events"), aggregations=(
    Aggregation("count", timedelta(days=7), where={"event_type": "view"}, name="views_7d"),
    Aggregation("last_n", timedelta(days=30), column="item_id", n=5, name="recent")))
profile = FeatureView("profile", shopper, BatchSource("shoppers"), fields=(Field("score", "float64"),))
SERVICE = FeatureService("shopper_service", (activity, profile[["score"]]))
ONE_VIEW = FeatureService("shopper_activity", (activity,))


def _append(layout: Layout, view: FeatureView, ids, ts, **features) -> None:
    ids = list(ids)
    data = {view.entity.join_key: pa.array(ids, pa.string()),
            "event_timestamp": pa.array(np.asarray(ts, np.int64)).cast(US),
            "_bucket": pa.array(entity_bucket(ids), pa.int32())}
    data.update(features)
    path = layout.feature_table(view.table_name)
    lance.write_dataset(pa.table(data), path, mode="append" if Path(path).exists() else "create")


def _activity(layout, ids, ts, views):
    _append(layout, activity, ids, ts, views_7d=pa.array(views, pa.int64()),
            recent=pa.array([[f"i{v}", f"j{v}"] for v in views], pa.list_(pa.string())))


def _profile(layout, ids, ts, scores):
    _append(layout, profile, ids, ts, score=pa.array(scores, pa.float64()))


def _first_batch(layout, n=300):
    ids = [f"s{i}" for i in range(n)]
    _activity(layout, ids, np.full(n, 100), np.arange(n))
    _activity(layout, ids[: n // 2], np.full(n // 2, 200), np.arange(n // 2) + 1000)  # newer rows
    _activity(layout, ids[:10], np.full(10, 200), np.full(10, 7))  # same (key, ts): the later row wins
    _activity(layout, ids[:10], np.full(10, 50), np.full(10, 99))  # older rows: ignored
    _profile(layout, ids[::2], np.full(n // 2, 150), np.arange(n // 2) * 0.5)  # odd shoppers have no profile


def _second_batch(layout):
    _activity(layout, ["s1", "s2", "new"], [300, 300, 300], [5, 6, 7])
    _profile(layout, ["s3", "s4"], [400, 400], [9.0, 10.0])  # s3 touched in profile only


def _snapshot(store, service, ids):
    return store.get_online_features(service, ids).to_arrow()


class CountingStore:
    """The real store, recording the rows of every write_features call."""

    def __init__(self, store):
        self.store, self.calls = store, []

    def write_features(self, service, table):
        self.calls.append(table.num_rows)
        return self.store.write_features(service, table)

    def __getattr__(self, name):
        return getattr(self.store, name)


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request, tmp_path):
    made = []

    def make(name):
        if request.param == "sqlite":
            s = open_online_store(str(tmp_path / f"{name}.sqlite"))
        else:
            import redis

            url = request.getfixturevalue("redis_url").rsplit("/", 1)[0] + f"/{len(made) + 1}"
            redis.Redis.from_url(url).flushdb()
            s = open_online_store(url)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_full_materialization_takes_the_latest_row_per_entity(tmp_path, make_store):
    layout = Layout.at(str(tmp_path / "home"))
    _first_batch(layout)
    store = CountingStore(make_store("full"))
    summary = materialize(layout, SERVICE, store, full=True)
    assert summary.rows_read == 300 + 150 + 10 + 10 + 150 and summary.entities_written == 300
    assert summary.watermark == 200 and store.get_meta(watermark_key(SERVICE)) == "200"
    got = store.get_online_features(SERVICE, ["s0", "s1", "s150", "s151", "nobody"])
    assert got.status.tolist() == ["ok", "ok", "ok", "ok", "missing"]
    assert got.columns["views_7d"].tolist() == [7, 7, 150, 151, 0]
    assert got.columns["recent"][2] == ["i150", "j150"]
    assert got.valid["score"].tolist() == [True, False, True, False, False]
    assert got.columns["score"][[0, 2]].tolist() == [0.0, 37.5]
    assert got.event_timestamp.tolist() == [200, 200, 150, 100, -1]  # newest of the two views
    # bounded: one write per bucket, never more rows than that bucket's entities
    buckets = np.bincount(entity_bucket([f"s{i}" for i in range(300)]))
    assert len(store.calls) == np.count_nonzero(buckets) and max(store.calls) <= buckets.max()
    assert sum(store.calls) == 300
    # reads of at most 40 offline rows (one bucket per read here) give the same rows
    small = CountingStore(make_store("small_reads"))
    materialize(layout, SERVICE, small, full=True, max_rows_per_read=40)
    ids = [f"s{i}" for i in range(300)]
    assert small.calls == store.calls
    assert _snapshot(small, SERVICE, ids).equals(_snapshot(store, SERVICE, ids))


def test_incremental_equals_full_and_is_idempotent(tmp_path, make_store):
    layout = Layout.at(str(tmp_path / "home"))
    ids = [f"s{i}" for i in range(300)] + ["new", "nobody"]
    _first_batch(layout)
    inc = make_store("inc")
    for service in (SERVICE, ONE_VIEW):
        assert materialize(layout, service, inc).watermark == 200  # no watermark yet: a full run
    _second_batch(layout)
    counted = CountingStore(inc)
    summary = materialize(layout, SERVICE, counted)
    assert summary.watermark == 400 and summary.entities_written == 5  # s1 s2 new s3 s4
    assert sum(counted.calls) == 5
    one = materialize(layout, ONE_VIEW, inc)
    assert one.rows_read == 3 and one.entities_written == 3
    full = make_store("full")
    for service in (SERVICE, ONE_VIEW):
        materialize(layout, service, full, full=True)
        assert _snapshot(inc, service, ids).equals(_snapshot(full, service, ids))
    got = inc.get_online_features(SERVICE, ["s3", "s1"])
    assert got.columns["views_7d"].tolist() == [7, 5] and got.columns["score"][0] == 9.0  # s3 kept its activity
    assert got.valid["score"].tolist() == [True, False]
    before = _snapshot(inc, SERVICE, ids)
    again = materialize(layout, SERVICE, inc)
    assert again.rows_read == 0 and again.entities_written == 0 and again.watermark == 400
    materialize(layout, SERVICE, inc, full=True)
    assert _snapshot(inc, SERVICE, ids).equals(before)


def test_missing_offline_table_is_a_clear_error(tmp_path):
    store = open_online_store(str(tmp_path / "o.sqlite"))
    with pytest.raises(NotFoundError, match="activity"):
        materialize(Layout.at(str(tmp_path / "home")), SERVICE, store)
