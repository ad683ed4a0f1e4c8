"""The fixed-width read path of the online store (services of only int64 / float64 / bool
features): one buffer per read, missing entities decoded from a placeholder row. Real SQLite and
a real redis-server; every result is checked against the written Arrow table and against the
generic row decoder, so the fast path cannot drift from the format."""

import sqlite3

import numpy as np
import pyarrow as pa
import pytest

from aiplatform.core.errors import DataValidationError
from aiplatform.features.definitions import BatchSource, Entity, FeatureService, FeatureView, Field
from aiplatform.features.online import open_online_store

US = pa.timestamp("us", tz="UTC")
I64 = np.iinfo(np.int64)
# not in storage order (ints, then floats): the result must keep the declared order
_FIELDS = (Field("x", "float64"), Field("n", "int64"), Field("flag", "bool"), Field("m", "int64"),
           Field("y", "float64"))
_view = FeatureView("metrics", Entity("customer", "customer_id"), BatchSource("customers", "timestamp"),
                    fields=_FIELDS)
SERVICE = FeatureService("metrics_service", (_view,))


def _table(ids, ts=None, **over) -> pa.Table:
    k = len(ids)
    v = np.arange(k)
    data = {"customer_id": pa.array(ids, pa.string()),
            "event_timestamp": pa.array(list(range(1, k + 1)) if ts is None else ts, pa.int64()).cast(US),
            "x": pa.array(v * 0.5), "n": pa.array(v, pa.int64()), "flag": pa.array(v % 2 == 0),
            "m": pa.array(-v, pa.int64()), "y": pa.array(v * 1.0e300)}
    data.update(over)
    schema = pa.schema([("customer_id", pa.string()), ("event_timestamp", US), ("x", pa.float64()),
                        ("n", pa.int64()), ("flag", pa.bool_()), ("m", pa.int64()), ("y", pa.float64())])
    return pa.table(data, schema=schema)


@pytest.fixture()
def store(online_store):
    return online_store  # SQLite and a real redis-server (tests/redis_server.py)


def _expected(table: pa.Table, ids: list[str]) -> pa.Table:
    """What a read of ``ids`` must return, computed from the written table with Arrow alone."""
    by_id = {k: i for i, k in enumerate(table.column("customer_id").to_pylist())}
    rows = []
    for k in ids:
        if k in by_id:
            row = {c: table.column(c)[by_id[k]].as_py() for c in table.column_names}
            rows.append({**row, "status": "ok"})
        else:
            rows.append({"customer_id": k, "event_timestamp": None, "status": "missing",
                         **{f.name: None for f in _FIELDS}})
    return pa.Table.from_pylist(rows, schema=pa.schema(
        [("customer_id", pa.string()), ("event_timestamp", US), ("status", pa.string())]
        + [(f.name, table.schema.field(f.name).type) for f in _FIELDS]))


def _assert_same(got: pa.Table, expected: pa.Table) -> None:
    """Equal schemas and values, NaN equal to NaN (Arrow's ``equals`` says NaN != NaN)."""
    assert got.schema == expected.schema

    def plain(t: pa.Table) -> list[dict]:
        return [{k: "NaN" if isinstance(v, float) and v != v else v for k, v in row.items()} for row in t.to_pylist()]

    assert plain(got) == plain(expected)


def test_the_service_takes_the_fixed_width_path(store):
    codec, _ = store._codecs.get(SERVICE)
    assert codec.fixed_width and len(codec.missing_row) == codec.fixed


def test_round_trip_with_missing_entities_nan_nulls_and_int64_extremes(store):
    ids = ["a", "b", "c", "d"]
    table = _table(ids, x=pa.array([np.nan, None, -0.0, np.inf]),
                   n=pa.array([I64.min, I64.max, None, 0], pa.int64()),
                   flag=pa.array([True, None, False, True]),
                   m=pa.array([I64.max, I64.min, -1, None], pa.int64()),
                   y=pa.array([np.finfo(np.float64).max, np.finfo(np.float64).tiny, None, -np.inf]))
    assert store.write_features(SERVICE, table) == 4
    asked = ["zz", "d", "a", "a", "nobody", "b", "c"]
    got = store.get_online_features(SERVICE, asked)
    assert got.entity_ids == asked
    assert got.status.tolist() == ["missing", "ok", "ok", "ok", "missing", "ok", "ok"]
    assert got.event_timestamp.tolist() == [-1, 4, 1, 1, -1, 2, 3]
    assert list(got.columns) == ["x", "n", "flag", "m", "y"]
    assert {c: got.columns[c].dtype.str for c in got.columns} == {
        "x": "<f8", "n": "<i8", "flag": "|b1", "m": "<i8", "y": "<f8"}
    assert got.columns["n"].tolist() == [0, 0, I64.min, I64.min, 0, I64.max, 0]
    assert got.columns["m"].tolist() == [0, 0, I64.max, I64.max, 0, I64.min, -1]
    x = got.columns["x"]
    assert np.isnan(x[[0, 2, 3, 4, 5]]).all() and x[1] == np.inf and x[6] == 0.0 and np.signbit(x[6])
    assert got.valid["x"].tolist() == [False, True, True, True, False, False, True]  # stored NaN is a value
    assert got.valid["n"].tolist() == [False, True, True, True, False, True, False]
    assert got.columns["flag"].tolist() == [False, True, True, True, False, False, False]
    assert got.valid["flag"].tolist() == [False, True, True, True, False, False, True]
    _assert_same(got.to_arrow(), _expected(table, asked))
    assert got.to_dict("b") == {"customer_id": "b", "status": "ok", "event_timestamp": 2, "x": None,
                                "n": I64.max, "flag": None, "m": I64.min, "y": float(np.finfo(np.float64).tiny)}
    for name, col in got.columns.items():  # a model may write into its inputs
        assert col.flags.c_contiguous and col.flags.writeable, name


def test_fast_path_equals_the_generic_decoder(store):
    ids = [f"u{i}" for i in range(300)]
    store.write_features(SERVICE, _table(ids))
    asked = ids[::-7] + ids[:3]
    got = store.get_online_features(SERVICE, asked)
    codec, _ = store._codecs.get(SERVICE)
    rows = dict(store.raw_rows(SERVICE, asked)) if hasattr(store, "_conn") else dict(
        zip(asked, store.raw_rows(SERVICE, asked)))
    ts, columns, valid = codec.decode([rows[k] for k in asked])  # the generic decoder
    assert (got.event_timestamp == ts).all() and (got.valid_matrix == valid).all()
    assert list(got.columns) == list(columns)
    for name in columns:
        np.testing.assert_array_equal(got.columns[name], columns[name])
        assert got.columns[name].dtype == columns[name].dtype


@pytest.mark.parametrize("count", [1, 2, 10_000])
def test_one_to_ten_thousand_entities(store, count):
    ids = [f"u{i}" for i in range(count)]
    table = _table(ids)
    assert store.write_features(SERVICE, table) == count
    asked = ids[::-1]
    got = store.get_online_features(SERVICE, asked)
    assert (got.columns["n"] == np.arange(count)[::-1]).all() and (got.status == "ok").all()
    _assert_same(got.to_arrow(), _expected(table, asked))
    one = store.get_online_features(SERVICE, [ids[-1]])
    assert one.columns["n"].tolist() == [count - 1] and one.columns["n"].shape == (1,)
    none = store.get_online_features(SERVICE, ["nobody"])
    assert none.status.tolist() == ["missing"] and none.event_timestamp.tolist() == [-1]
    assert np.isnan(none.columns["x"]).all() and not none.valid_matrix.any()


def test_no_rows_yet_and_empty_requests(store):
    got = store.get_online_features(SERVICE, ["a", "b"])
    assert got.status.tolist() == ["missing", "missing"] and got.columns["n"].tolist() == [0, 0]
    empty = store.get_online_features(SERVICE, [])
    assert len(empty) == 0 and empty.columns["x"].shape == (0,) and empty.columns["x"].dtype == np.float64


def test_more_ids_than_one_statement_takes_keep_their_order(tmp_path):
    store = open_online_store(str(tmp_path / "online.sqlite"))
    present = [f"p{i}" for i in range(10)]
    store.write_features(SERVICE, _table(present))
    asked = [f"q{i}" for i in range(30_005)]
    positions = [0, 29_999, 30_000, 30_004]  # both sides of the 30,000-id chunk boundary
    for pos, k in zip(positions, present):
        asked[pos] = k
    got = store.get_online_features(SERVICE, asked)
    found = np.flatnonzero(got.status == "ok").tolist()
    assert found == positions and got.columns["n"][positions].tolist() == [0, 1, 2, 3]
    assert got.event_timestamp[positions].tolist() == [1, 2, 3, 4]


def test_rows_of_another_format_are_refused_with_the_fix(tmp_path):
    path = tmp_path / "online.sqlite"
    store = open_online_store(str(path))
    store.write_features(SERVICE, _table(["a", "b"]))
    _, ns = store._codecs.get(SERVICE)
    conn = sqlite3.connect(path)
    row = conn.execute(f'SELECT v FROM "fs_{ns}" WHERE k = ?', ("b",)).fetchone()[0]
    with conn:
        conn.execute(f'UPDATE "fs_{ns}" SET v = ? WHERE k = ?', (row[:8] + b"\x07" + row[9:], "b"))
        conn.execute(f'UPDATE "fs_{ns}" SET v = ? WHERE k = ?', (row + b"\x00" * 8, "a"))
    with pytest.raises(DataValidationError, match="row format 7 is not 1.*re-materialize"):
        store.get_online_features(SERVICE, ["b"])
    with pytest.raises(DataValidationError, match="row format 7"):
        store.get_online_features(SERVICE, ["nobody", "b"])
    with pytest.raises(DataValidationError, match="re-materialize"):
        store.get_online_features(SERVICE, ["a"])
