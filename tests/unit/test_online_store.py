"""The SQLite online store: real SQLite, no Ray."""

import numpy as np
import pytest

from aiplatform.features.online import open_online_store


def test_popular_items_replace_the_previous_list(online_store):
    # the same list, in rank order, on SQLite and Redis (serving reads it from the configured store)
    store = online_store
    assert store.get_popular_items(5) == []
    store.write_popular_items([("x", 3.0), ("y", 2.0), ("z", 1.0)])
    store.write_popular_items([("y", 5.0), ("x", 4.0)])
    assert store.get_popular_items(10) == [("y", 5.0), ("x", 4.0)]
    assert store.get_popular_items(1) == [("y", 5.0)]
    store.write_popular_items([("b", 0.1), ("a", 0.1), ("c", 1 / 3)])  # kept in the given order, exact scores
    assert store.get_popular_items(3) == [("b", 0.1), ("a", 0.1), ("c", 1 / 3)]
    store.write_popular_items([])
    assert store.get_popular_items(3) == []


# ---- the service API: the same suite on SQLite and on a real redis-server -------------------
from datetime import timedelta  # noqa: E402

import pyarrow as pa  # noqa: E402

from aiplatform.core.errors import ConfigError, DataValidationError, UserInputError  # noqa: E402
from aiplatform.features.definitions import (  # noqa: E402
    BatchSource,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    arrow_type,
)
from aiplatform.features.online import SQLiteOnlineStore  # noqa: E402

_customer = Entity("customer", "customer_id")
_FIELDS = (Field("n", "int64"), Field("x", "float64"), Field("flag", "bool"), Field("city", "string"),
           Field("tags", "list<string>"), Field("ids", "list<int64>"), Field("scores", "list<float64>"))
_view = FeatureView("profile", _customer, BatchSource("customers", "timestamp"), fields=_FIELDS)
SERVICE = FeatureService("profile_service", (_view,))
US = pa.timestamp("us", tz="UTC")


def _table(ids, ts, n=None, **over):
    k = len(ids)
    n = list(range(k)) if n is None else n
    data = {"customer_id": ids, "event_timestamp": pa.array(ts, pa.int64()).cast(US),
            "n": pa.array(n, pa.int64()), "x": [v * 0.5 for v in n], "flag": [v % 2 == 0 for v in n],
            "city": [f"city-{v}-é" for v in n], "tags": [[f"t{v}", ""] if v % 3 else [] for v in n],
            "ids": [list(range(v % 4)) for v in n], "scores": [[v + 0.25] for v in n]}
    data.update(over)
    schema = pa.schema([pa.field("customer_id", pa.string()), pa.field("event_timestamp", US)]
                       + [pa.field(f.name, arrow_type(f.dtype)) for f in _FIELDS])
    return pa.table(data, schema=schema)


@pytest.fixture()
def store(online_store):
    # SQLite (by sqlite:/// URI) and a real redis-server (tests/redis_server.py)
    assert isinstance(online_store, SQLiteOnlineStore) or online_store.__class__.__name__ == "RedisOnlineStore"
    return online_store


def test_typed_columnar_round_trip(store):
    assert store.write_features(SERVICE, _table(["a", "b", "c"], [10, 10, 10], n=[1, 2, 3])) == 3
    got = store.get_online_features(SERVICE, ["c", "a"])
    assert got.entity_ids == ["c", "a"] and got.status.tolist() == ["ok", "ok"]
    assert got.columns["n"].dtype == np.int64 and got.columns["n"].tolist() == [3, 1]
    assert got.columns["x"].dtype == np.float64 and got.columns["x"].tolist() == [1.5, 0.5]
    assert got.columns["flag"].dtype == np.bool_ and got.columns["flag"].tolist() == [False, False]
    assert got.columns["city"].tolist() == ["city-3-é", "city-1-é"]
    assert got.columns["tags"].tolist() == [[], ["t1", ""]]
    assert [v.tolist() for v in got.columns["ids"]] == [[0, 1, 2], [0]]
    assert [v.tolist() for v in got.columns["scores"]] == [[3.25], [1.25]]
    assert got.event_timestamp.dtype == np.int64 and got.event_timestamp.tolist() == [10, 10]
    assert list(got.columns) == [f.name for f in _FIELDS]
    arrow = got.to_arrow()
    assert arrow.schema.field("n").type == pa.int64() and arrow.schema.field("tags").type == pa.list_(pa.string())
    assert arrow.column("ids").to_pylist() == [[0, 1, 2], [0]]
    assert got.to_dict("a") == {"customer_id": "a", "status": "ok", "event_timestamp": 10, "n": 1, "x": 0.5,
                                "flag": False, "city": "city-1-é", "tags": ["t1", ""], "ids": [0],
                                "scores": [1.25]}


def test_missing_entities_and_null_features(store):
    table = _table(["a", "b"], [5, 5], x=pa.array([None, 2.0]), n=[4, 5])
    tags = pa.array([None, ["z"]], pa.list_(pa.string()))
    table = table.set_column(table.schema.get_field_index("tags"), "tags", tags)
    store.write_features(SERVICE, table)
    got = store.get_online_features(SERVICE, ["nobody", "a", "b", "a"])
    assert got.status.tolist() == ["missing", "ok", "ok", "ok"]
    assert got.event_timestamp.tolist() == [-1, 5, 5, 5]
    assert got.columns["n"].tolist() == [0, 4, 5, 4] and got.valid["n"].tolist() == [False, True, True, True]
    assert np.isnan(got.columns["x"][[0, 1]]).all() and got.valid["x"].tolist() == [False, False, True, False]
    assert got.valid["tags"].tolist() == [False, False, True, False]
    assert got.to_dict(0)["city"] is None and got.to_dict(1)["x"] is None and got.to_dict(1)["tags"] is None
    assert got.to_arrow().column("x").null_count == 3
    nobody = store.get_online_features(SERVICE, ["x", "y"])
    assert nobody.status.tolist() == ["missing", "missing"] and nobody.columns["n"].dtype == np.int64
    empty = store.get_online_features(SERVICE, [])
    assert len(empty) == 0 and empty.columns["n"].shape == (0,)


def test_newer_event_timestamp_wins_and_writes_are_idempotent(store):
    assert store.write_features(SERVICE, _table(["a", "b"], [100, 100], n=[1, 1])) == 2
    assert store.write_features(SERVICE, _table(["a", "b"], [50, 200], n=[2, 2])) == 1  # a's row is older
    got = store.get_online_features(SERVICE, ["a", "b"])
    assert got.columns["n"].tolist() == [1, 2] and got.event_timestamp.tolist() == [100, 200]
    before = got.to_arrow()
    store.write_features(SERVICE, _table(["a", "b"], [50, 200], n=[2, 2]))  # the same rows again
    assert store.get_online_features(SERVICE, ["a", "b"]).to_arrow().equals(before)
    # within one call: the newest row wins, ties go to the later row
    store.write_features(SERVICE, _table(["c", "c", "c"], [7, 9, 9], n=[1, 2, 3]))
    store.write_features(SERVICE, _table(["c"], [8], n=[9]))
    assert store.get_online_features(SERVICE, ["c"]).columns["n"].tolist() == [3]
    assert store.write_features(SERVICE, _table([], [])) == 0


def test_concurrent_readers_get_their_own_rows(store):
    from concurrent.futures import ThreadPoolExecutor

    ids = [f"u{i}" for i in range(500)]
    store.write_features(SERVICE, _table(ids, [1] * 500))

    def read(start):
        picked = ids[start::7]
        got = store.get_online_features(SERVICE, picked)
        return got.columns["n"].tolist() == list(range(500))[start::7] and (got.status == "ok").all()

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(read, [i % 7 for i in range(40)]))


def test_a_changed_definition_never_reads_old_rows(store):
    store.write_features(SERVICE, _table(["a"], [1]))
    changed_view = FeatureView("profile", _customer, BatchSource("customers", "timestamp"), fields=_FIELDS,
                               ttl=timedelta(days=7))
    changed = FeatureService("profile_service", (changed_view,))
    renamed = FeatureService("other_service", (_view,))
    assert changed.version != SERVICE.version
    assert store.get_online_features(changed, ["a"]).status.tolist() == ["missing"]
    assert store.get_online_features(renamed, ["a"]).status.tolist() == ["missing"]
    store.write_features(changed, _table(["a"], [1], n=[42]))
    assert store.get_online_features(SERVICE, ["a"]).columns["n"].tolist() == [0]
    assert store.get_online_features(changed, ["a"]).columns["n"].tolist() == [42]


def test_lists_round_trip_including_empty_and_unicode(store):
    tags = [[], [""], ["a"], ["ü€", "x y", ""], [str(i) for i in range(50)]]
    ids = [f"e{i}" for i in range(len(tags))]
    store.write_features(SERVICE, _table(ids, [1] * len(ids), tags=pa.array(tags, pa.list_(pa.string()))))
    got = store.get_online_features(SERVICE, ids)
    assert got.columns["tags"].tolist() == tags
    assert [store.get_online_features(SERVICE, [i]).columns["tags"][0] for i in ids] == tags


def test_one_and_ten_thousand_entities(store):
    ids = [f"u{i}" for i in range(10_000)]
    assert store.write_features(SERVICE, _table(ids, list(range(10_000)))) == 10_000
    got = store.get_online_features(SERVICE, ids[::-1])
    assert (got.columns["n"] == np.arange(10_000)[::-1]).all()
    assert (got.event_timestamp == np.arange(10_000)[::-1]).all() and (got.status == "ok").all()
    assert got.columns["tags"][0] == [] and got.columns["tags"][1] == ["t9998", ""]
    one = store.get_online_features(SERVICE, ["u1234"])
    assert one.columns["n"].tolist() == [1234] and one.to_dict(0)["ids"] == [0, 1]


def test_bad_batches_write_nothing(store):
    store.write_features(SERVICE, _table(["a"], [1], n=[1]))
    with pytest.raises(UserInputError, match="'city'"):
        store.write_features(SERVICE, _table(["a", "b"], [2, 2]).drop_columns(["city"]))
    with pytest.raises(DataValidationError, match="tags"):
        store.write_features(SERVICE, _table(["a", "b"], [2, 2], tags=pa.array([["ok"], ["bad\x1f"]])))
    with pytest.raises(DataValidationError, match="customer_id"):
        store.write_features(SERVICE, _table(["a", None], [2, 2]))
    got = store.get_online_features(SERVICE, ["a", "b"])
    assert got.columns["n"].tolist() == [1, 0] and got.status.tolist() == ["ok", "missing"]
    with pytest.raises(UserInputError, match="list of ids"):
        store.get_online_features(SERVICE, "a")


def test_delete_service_and_meta(store):
    other = FeatureService("other_service", (_view,))
    store.write_features(SERVICE, _table(["a"], [1]))
    store.write_features(other, _table(["a"], [1]))
    store.set_meta(f"{SERVICE.name}:{SERVICE.version}:watermark", "1")
    store.set_meta("unrelated", "x")
    assert store.get_meta("unrelated") == "x" and store.get_meta("nothing") is None
    store.delete_service(SERVICE)
    assert store.get_online_features(SERVICE, ["a"]).status.tolist() == ["missing"]
    assert store.get_online_features(other, ["a"]).status.tolist() == ["ok"]
    assert store.get_meta(f"{SERVICE.name}:{SERVICE.version}:watermark") is None
    assert store.get_meta("unrelated") == "x"


def test_open_online_store_dispatch(tmp_path):
    assert isinstance(open_online_store(str(tmp_path / "a.sqlite")), SQLiteOnlineStore)
    with pytest.raises(ConfigError, match="redis://"):
        open_online_store("postgres://nowhere/db")


def test_a_missing_redis_server_says_how_to_install_it(monkeypatch, tmp_path):
    import tests.redis_server as helper

    monkeypatch.setenv("REDIS_SERVER", str(tmp_path / "no-such-redis-server"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("os.access", lambda path, mode: False)
    assert helper.find_redis_server() is None
    with pytest.raises(RuntimeError, match="apt-get install -y redis-server"):
        with helper.redis_server(tmp_path):
            pass


def test_sqlite_reads_keep_request_order_across_statement_chunks(tmp_path):
    """More ids than one SQL statement binds: rows still line up with the request (generic rows,
    missing ones in between and at both sides of the 30,000-id chunk boundary)."""
    store = open_online_store(str(tmp_path / "online.sqlite"))
    present = ["a", "b", "c", "d"]
    store.write_features(SERVICE, _table(present, [1, 2, 3, 4], n=[10, 11, 12, 13]))
    asked = [f"q{i}" for i in range(30_005)]
    positions = [3, 29_999, 30_000, 30_004]
    for pos, k in zip(positions, present):
        asked[pos] = k
    got = store.get_online_features(SERVICE, asked)
    assert np.flatnonzero(got.status == "ok").tolist() == positions
    assert got.columns["n"][positions].tolist() == [10, 11, 12, 13]
    assert got.columns["city"][positions].tolist() == [f"city-{v}-é" for v in (10, 11, 12, 13)]
    assert got.columns["tags"][30_004] == ["t13", ""] and got.columns["tags"][30_000] == []
    assert got.columns["city"][0] is None and not got.valid["city"][0]
