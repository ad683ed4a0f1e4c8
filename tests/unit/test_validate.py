"""Bring-your-own-data import: validation of Parquet/CSV files and the all-or-nothing lake.

No Ray: ``aiplatform.data.validate`` and ``aiplatform.data.lake`` are plain pyarrow/pandas.
Every refusal must name the file, the column, how many rows failed and what was expected
(docs/architecture.md, 'Data contracts').
"""

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aiplatform.core import schemas
from aiplatform.core.errors import DataValidationError, UserInputError
from aiplatform.core.storage import Layout
from aiplatform.data import lake, validate

# ---------------------------------------------------------------------------------------------
# helpers


def _items_frame(n: int = 5) -> pd.DataFrame:
    return pd.DataFrame({
        "item_id": [f"i{i}" for i in range(n)],
        "title": [f"thing {i}" for i in range(n)],
        "category": ["shoes" if i % 2 else "lamps" for i in range(n)],
        "price": [10.0 + i for i in range(n)],
    })


def _events_frame() -> pd.DataFrame:
    return pd.DataFrame({
        "user_id": ["u1", "u1", "u2", "u2", "u3"],
        "item_id": ["i0", "i1", "i2", "i1", "i4"],
        "event_type": ["view", "click", "view", "purchase", "add_to_cart"],
        "timestamp": pd.to_datetime([
            "2026-10-01T10:00:00Z", "2026-10-01T10:01:00Z", "2026-10-02T08:00:00Z",
            "2026-10-02T08:05:00Z", "2026-10-03T12:00:00Z"], utc=True),
        "value": [None, None, None, 11.0, 14.0],
        "event_id": ["e1", "e2", "e3", "e4", "e5"],
    })


def _write_parquet(frame: pd.DataFrame, path: Path) -> str:
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return str(path)


def _write_csv(text: str, path: Path) -> str:
    path.write_text(text)
    return str(path)


def _assert_names(err: DataValidationError, path: str, column: str | None, rows: int | None,
                  expected_word: str | None) -> None:
    """The message (what a user sees) names the file, the column, the failed rows and the
    expected type; the attributes carry the same values."""
    msg = str(err)
    assert path in msg, msg
    assert err.file == path
    if column is not None:
        assert err.column == column
        assert f"'{column}'" in msg, msg
    if rows is not None:
        assert err.failed_rows == rows
        assert f"{rows} row" in msg, msg
    if expected_word is not None:
        assert err.expected and expected_word in err.expected
        assert "expected" in msg and expected_word in msg, msg


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _assert_nothing_left_behind(layout: Layout) -> None:
    """The lake holds its pointer and one generation folder per table: no staged or old data."""
    root = Path(layout.lake)
    assert sorted(p.name for p in root.iterdir()) == ["_current.json", "events", "items", "users"]
    for table in ("events", "items", "users"):
        assert [p.name for p in (root / table).iterdir()] == [lake.table_generation(layout, table)]


@pytest.fixture()
def layout(tmp_path) -> Layout:
    return Layout.at(str(tmp_path / "home"))


@pytest.fixture()
def good_files(tmp_path) -> tuple[str, str]:
    d = tmp_path / "good"
    d.mkdir()
    return _write_parquet(_events_frame(), d / "events.parquet"), _write_parquet(_items_frame(), d / "items.parquet")


# ---------------------------------------------------------------------------------------------
# happy paths


def test_good_parquet_import_has_the_contract_schema_and_is_sorted(layout, good_files):
    events, items = good_files
    summary = lake.import_files(layout, events, items)
    assert (summary.events, summary.items, summary.users) == (5, 5, 3)
    ev = pq.read_table(layout.lake_table("events"))
    assert ev.schema.equals(schemas.EVENTS, check_metadata=False)
    it = pq.read_table(layout.lake_table("items"))
    assert it.schema.equals(schemas.ITEMS, check_metadata=False)
    ts = ev.column("timestamp").to_pylist()
    assert ts == sorted(ts)
    assert summary.start == pd.Timestamp("2026-10-01T10:00:00Z")
    assert summary.end == pd.Timestamp("2026-10-03T12:00:00Z")
    users = pq.read_table(layout.lake_table("users")).column("user_id").to_pylist()
    assert sorted(users) == ["u1", "u2", "u3"]
    assert lake.has_data(layout)


def test_csv_import_converts_text_to_contract_types(layout, tmp_path):
    events = _write_csv(
        "user_id,item_id,event_type,timestamp,value,event_id\n"
        "u1,i0,view,2026-10-01T10:00:00Z,,e1\n"
        "u1,i1,purchase,2026-10-01T10:05:00Z,19.5,e2\n", tmp_path / "events.csv")
    items = _write_csv("item_id,title,category,price\ni0,a,shoes,10\ni1,b,lamps,19.5\n",
                       tmp_path / "items.csv")
    lake.import_files(layout, events, items)
    ev = lake.read_events(layout)
    assert list(ev["item_id"]) == ["i0", "i1"]
    assert pd.isna(ev["value"].iloc[0]) and ev["value"].iloc[1] == 19.5
    it = lake.read_items(layout)
    assert it["price"].tolist() == [10.0, 19.5]
    assert str(ev["timestamp"].dt.tz) == "UTC"


def test_iso_strings_and_epoch_seconds_are_both_accepted(tmp_path):
    epoch = int(pd.Timestamp("2026-10-01T10:00:00Z").timestamp())
    path = _write_csv(
        "user_id,item_id,event_type,timestamp\n"
        f"u1,i0,view,{epoch}\n"
        "u1,i1,view,2026-10-01T10:00:00Z\n"
        "u1,i2,view,2026-10-01T12:00:00+02:00\n", tmp_path / "events.csv")
    ev = validate.validate_events(validate.read_file(path), path)
    ts = [pd.Timestamp(t) for t in ev.column("timestamp").to_pylist()]
    assert ts == [pd.Timestamp("2026-10-01T10:00:00Z")] * 3
    assert ev.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")


def test_epoch_seconds_in_parquet_ints_and_floats(tmp_path):
    base = pd.Timestamp("2026-10-01T10:00:00Z")
    frame = pd.DataFrame({"user_id": ["u1", "u1"], "item_id": ["i0", "i1"], "event_type": ["view", "view"],
                          "timestamp": [int(base.timestamp()), int(base.timestamp()) + 60]})
    p = _write_parquet(frame, tmp_path / "int.parquet")
    ev = validate.validate_events(validate.read_file(p), p)
    assert [pd.Timestamp(t) for t in ev.column("timestamp").to_pylist()] == [base, base + pd.Timedelta(seconds=60)]

    frame["timestamp"] = [base.timestamp() + 0.5, base.timestamp() + 1.25]
    p = _write_parquet(frame, tmp_path / "float.parquet")
    ev = validate.validate_events(validate.read_file(p), p)
    assert [pd.Timestamp(t) for t in ev.column("timestamp").to_pylist()] == [
        base + pd.Timedelta(milliseconds=500), base + pd.Timedelta(milliseconds=1250)]


def test_naive_timestamps_are_taken_as_utc(tmp_path):
    # A naive ISO string in CSV ...
    path = _write_csv("user_id,item_id,event_type,timestamp\nu1,i0,view,2026-10-01 10:00:00\n",
                      tmp_path / "events.csv")
    ev = validate.validate_events(validate.read_file(path), path)
    assert pd.Timestamp(ev.column("timestamp")[0].as_py()) == pd.Timestamp("2026-10-01T10:00:00Z")
    # ... and a naive Arrow timestamp column in Parquet.
    frame = pd.DataFrame({"user_id": ["u1"], "item_id": ["i0"], "event_type": ["view"],
                          "timestamp": [pd.Timestamp("2026-10-01 10:00:00")]})
    p = _write_parquet(frame, tmp_path / "naive.parquet")
    assert pq.read_schema(p).field("timestamp").type.tz is None
    ev = validate.validate_events(validate.read_file(p), p)
    assert ev.schema.field("timestamp").type == pa.timestamp("us", tz="UTC")
    assert pd.Timestamp(ev.column("timestamp")[0].as_py()) == pd.Timestamp("2026-10-01T10:00:00Z")


def test_timestamps_in_another_zone_are_converted_to_utc(tmp_path):
    frame = pd.DataFrame({"user_id": ["u1"], "item_id": ["i0"], "event_type": ["view"],
                          "timestamp": [pd.Timestamp("2026-10-01 12:00:00", tz="Europe/Berlin")]})
    p = _write_parquet(frame, tmp_path / "berlin.parquet")
    ev = validate.validate_events(validate.read_file(p), p)
    assert pd.Timestamp(ev.column("timestamp")[0].as_py()) == pd.Timestamp("2026-10-01T10:00:00Z")


def test_duplicate_event_ids_are_dropped_keeping_the_first(tmp_path):
    frame = pd.DataFrame({
        "user_id": ["u1", "u1", "u2", "u1"],
        "item_id": ["i0", "i1", "i2", "i3"],
        "event_type": ["view", "click", "view", "purchase"],
        "timestamp": pd.to_datetime(["2026-10-01T10:00:00Z", "2026-10-01T10:01:00Z",
                                     "2026-10-01T10:02:00Z", "2026-10-01T09:00:00Z"], utc=True),
        "event_id": ["a", "b", "a", "b"],
    })
    p = _write_parquet(frame, tmp_path / "events.parquet")
    ev = validate.validate_events(validate.read_file(p), p).to_pandas()
    assert ev["event_id"].tolist() == ["a", "b"]
    # The first occurrence (file order), not the earliest timestamp, is kept.
    assert ev["item_id"].tolist() == ["i0", "i1"]


def test_rows_without_event_id_are_never_deduplicated(tmp_path):
    path = _write_csv(
        "user_id,item_id,event_type,timestamp,event_id\n"
        "u1,i0,view,2026-10-01T10:00:00Z,\n"
        "u1,i0,view,2026-10-01T10:00:00Z,\n"
        "u1,i0,view,2026-10-01T10:00:00Z,x\n", tmp_path / "events.csv")
    ev = validate.validate_events(validate.read_file(path), path)
    assert ev.num_rows == 3


def test_unknown_event_types_are_kept(layout, tmp_path):
    frame = _events_frame()
    frame.loc[0, "event_type"] = "wishlist"
    frame.loc[2, "event_type"] = "share"
    events = _write_parquet(frame, tmp_path / "events.parquet")
    items = _write_parquet(_items_frame(), tmp_path / "items.parquet")
    lake.import_files(layout, events, items)
    kept = lake.read_events(layout)
    assert len(kept) == 5
    assert {"wishlist", "share"} <= set(kept["event_type"])


def test_integer_ids_are_accepted_as_strings(tmp_path):
    frame = pd.DataFrame({"item_id": [1, 2, 3], "price": [1, 2, 3]})
    p = _write_parquet(frame, tmp_path / "items.parquet")
    it = validate.validate_items(validate.read_file(p), p)
    assert it.column("item_id").to_pylist() == ["1", "2", "3"]
    assert it.column("price").type == pa.float64()


# ---------------------------------------------------------------------------------------------
# refusals: each names file, column, failed rows, expected type


def test_missing_column_is_refused_naming_file_column_and_expectation(tmp_path):
    frame = _events_frame().drop(columns=["timestamp"])
    p = _write_parquet(frame, tmp_path / "events.parquet")
    with pytest.raises(DataValidationError) as info:
        validate.validate_events(validate.read_file(p), p)
    _assert_names(info.value, p, "timestamp", None, "timestamp")
    # The message also lists what was found, so the user can spot a renamed column.
    assert "user_id" in str(info.value)


def test_missing_item_id_column_in_csv(tmp_path):
    p = _write_csv("id,price\na,1\nb,2\n", tmp_path / "items.csv")
    with pytest.raises(DataValidationError) as info:
        validate.validate_items(validate.read_file(p), p)
    _assert_names(info.value, p, "item_id", None, "item_id")


def test_non_numeric_price_in_csv_is_refused_with_the_failed_row_count(tmp_path):
    p = _write_csv("item_id,price\ni0,10\ni1,cheap\ni2,\ni3,ten\ni4,3.5\n", tmp_path / "items.csv")
    with pytest.raises(DataValidationError) as info:
        validate.validate_items(validate.read_file(p), p)
    _assert_names(info.value, p, "price", 2, "float")


def test_non_numeric_price_in_parquet_is_refused(tmp_path):
    frame = _items_frame()
    frame["price"] = ["1.5", "free", "2", "3", "x"]
    p = _write_parquet(frame, tmp_path / "items.parquet")
    with pytest.raises(DataValidationError) as info:
        validate.validate_items(validate.read_file(p), p)
    _assert_names(info.value, p, "price", 2, "float")


def test_price_of_a_non_numeric_arrow_type_is_refused(tmp_path):
    frame = _items_frame()
    frame["price"] = [[1.0]] * len(frame)  # a list column
    p = _write_parquet(frame, tmp_path / "items.parquet")
    with pytest.raises(DataValidationError) as info:
        validate.validate_items(validate.read_file(p), p)
    _assert_names(info.value, p, "price", len(frame), "float")


def test_unparseable_timestamps_are_refused_with_the_failed_row_count(tmp_path):
    p = _write_csv(
        "user_id,item_id,event_type,timestamp\n"
        "u1,i0,view,2026-10-01T10:00:00Z\n"
        "u1,i1,view,yesterday\n"
        "u1,i2,view,2026-13-45\n"
        "u1,i3,view,1727776800\n", tmp_path / "events.csv")
    with pytest.raises(DataValidationError) as info:
        validate.validate_events(validate.read_file(p), p)
    _assert_names(info.value, p, "timestamp", 2, "ISO-8601")
    assert "epoch seconds" in str(info.value)


def test_missing_timestamps_are_refused(tmp_path):
    p = _write_csv("user_id,item_id,event_type,timestamp\nu1,i0,view,\nu1,i1,view,2026-10-01\n",
                   tmp_path / "events.csv")
    with pytest.raises(DataValidationError) as info:
        validate.validate_events(validate.read_file(p), p)
    _assert_names(info.value, p, "timestamp", 1, "timestamp")


def test_blank_user_ids_are_refused(tmp_path):
    p = _write_csv("user_id,item_id,event_type,timestamp\n  ,i0,view,2026-10-01\n\t,i1,view,2026-10-01\n"
                   "u1,i1,view,2026-10-01\n", tmp_path / "events.csv")
    with pytest.raises(DataValidationError) as info:
        validate.validate_events(validate.read_file(p), p)
    _assert_names(info.value, p, "user_id", 2, "string")


def test_empty_and_blank_user_ids_are_all_counted(tmp_path):
    # An empty CSV field is read as null, a blank one as "  ": both are missing ids.
    p = _write_csv("user_id,item_id,event_type,timestamp\n,i0,view,2026-10-01\n  ,i1,view,2026-10-01\n"
                   "u1,i1,view,2026-10-01\n", tmp_path / "events.csv")
    with pytest.raises(DataValidationError) as info:
        validate.validate_events(validate.read_file(p), p)
    _assert_names(info.value, p, "user_id", 2, "string")


def test_null_user_id_import_is_refused_and_leaves_the_lake_clean(layout, good_files, tmp_path):
    events, items = good_files
    lake.import_files(layout, events, items)
    before = _snapshot(Path(layout.lake))
    bad = _write_csv("user_id,item_id,event_type,timestamp\n,i0,view,2026-10-01\nu1,i1,view,2026-10-01\n",
                     tmp_path / "events.csv")
    with pytest.raises(DataValidationError) as info:
        lake.import_files(layout, bad, items)
    _assert_names(info.value, bad, "user_id", 1, "string")
    assert _snapshot(Path(layout.lake)) == before
    _assert_nothing_left_behind(layout)


def test_nanosecond_parquet_timestamps_are_truncated_to_microseconds(tmp_path):
    frame = pd.DataFrame({"user_id": ["u1"], "item_id": ["i0"], "event_type": ["view"],
                          "timestamp": [pd.Timestamp("2026-10-01 10:00:00.123456789", tz="UTC")]})
    p = _write_parquet(frame, tmp_path / "events.parquet")
    assert pq.read_schema(p).field("timestamp").type.unit == "ns"
    ev = validate.validate_events(validate.read_file(p), p)
    # Truncated to the lake's microseconds, not refused.
    assert pd.Timestamp(ev.column("timestamp")[0].as_py()) == pd.Timestamp("2026-10-01T10:00:00.123456Z")


def test_users_file_with_empty_user_ids_is_refused(layout, good_files, tmp_path):
    events, items = good_files
    users = _write_csv("user_id,country\nu1,DE\n,FR\nu2,PL\nu3,US\n", tmp_path / "users.csv")
    with pytest.raises(DataValidationError) as info:
        lake.import_files(layout, events, items, users)
    _assert_names(info.value, users, "user_id", 1, "string")
    assert not lake.has_data(layout)


def test_empty_file_is_refused(tmp_path):
    for name in ("events.csv", "events.parquet"):
        p = tmp_path / name
        p.write_bytes(b"")
        with pytest.raises(DataValidationError) as info:
            validate.read_file(str(p))
        assert str(p) in str(info.value)
        assert "empty" in str(info.value)
        assert info.value.expected and "header" in info.value.expected


def test_header_without_rows_is_refused(tmp_path):
    p = _write_csv("user_id,item_id,event_type,timestamp\n", tmp_path / "events.csv")
    with pytest.raises(DataValidationError) as info:
        validate.read_file(p)
    assert p in str(info.value) and "no rows" in str(info.value)
    assert "at least one data row" in str(info.value)

    empty = _events_frame().iloc[:0]
    pp = _write_parquet(empty, tmp_path / "events.parquet")
    with pytest.raises(DataValidationError) as info:
        validate.read_file(pp)
    assert pp in str(info.value) and "no rows" in str(info.value)


def test_missing_file_and_unsupported_extension(tmp_path):
    with pytest.raises(DataValidationError) as info:
        validate.read_file(str(tmp_path / "nope.parquet"))
    assert "not found" in str(info.value)
    p = tmp_path / "events.json"
    p.write_text("{}")
    with pytest.raises(DataValidationError) as info:
        validate.read_file(str(p))
    assert str(p) in str(info.value) and ".json" in str(info.value)


def test_corrupt_parquet_is_a_validation_error(tmp_path):
    p = tmp_path / "events.parquet"
    p.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataValidationError) as info:
        validate.read_file(str(p))
    assert str(p) in str(info.value)


def test_events_naming_items_not_in_the_catalogue_are_refused(layout, tmp_path):
    frame = _events_frame()
    frame.loc[1, "item_id"] = "ghost-1"
    frame.loc[3, "item_id"] = "ghost-2"
    events = _write_parquet(frame, tmp_path / "events.parquet")
    items = _write_parquet(_items_frame(), tmp_path / "items.parquet")
    with pytest.raises(DataValidationError) as info:
        lake.import_files(layout, events, items)
    _assert_names(info.value, events, "item_id", 2, "items file")
    assert "ghost-" in str(info.value)
    assert not lake.has_data(layout)


def test_duplicate_item_ids_are_refused(tmp_path):
    frame = _items_frame(6)
    frame.loc[3, "item_id"] = "i0"
    frame.loc[4, "item_id"] = "i0"
    frame.loc[5, "item_id"] = "i1"
    p = _write_parquet(frame, tmp_path / "items.parquet")
    with pytest.raises(DataValidationError) as info:
        validate.validate_items(validate.read_file(p), p)
    _assert_names(info.value, p, "item_id", 3, "item_id exactly once")


def test_events_of_users_missing_from_the_users_file_are_refused(layout, good_files, tmp_path):
    events, items = good_files
    users = _write_parquet(pd.DataFrame({"user_id": ["u1", "u2"]}), tmp_path / "users.parquet")
    with pytest.raises(DataValidationError) as info:
        lake.import_files(layout, events, items, users)
    _assert_names(info.value, events, "user_id", 1, "users file")
    assert "u3" in str(info.value)


def test_validation_errors_are_user_input_errors():
    # The CLI maps UserInputError to exit code 2.
    assert issubclass(DataValidationError, UserInputError)


# ---------------------------------------------------------------------------------------------
# a refused import leaves the previous good lake untouched


@pytest.mark.parametrize("breakage", ["unknown_item", "bad_timestamp", "bad_price", "missing_users",
                                      "empty_items"])
def test_refused_import_leaves_the_previous_lake_byte_for_byte(layout, good_files, tmp_path, breakage):
    events, items = good_files
    lake.import_files(layout, events, items)
    lake_root = Path(layout.lake)
    before = _snapshot(lake_root)
    assert any(k.startswith("events/") for k in before) and any(k.startswith("items/") for k in before)
    before_events = lake.read_events(layout)

    bad = tmp_path / "bad"
    bad.mkdir()
    ev_frame, it_frame = _events_frame(), _items_frame()
    # Different, otherwise valid data, so that a partial swap would be visible.
    ev_frame["user_id"] = ev_frame["user_id"] + "x"
    users = None
    if breakage == "unknown_item":
        ev_frame.loc[4, "item_id"] = "nope"
    elif breakage == "bad_timestamp":
        ev_frame["timestamp"] = ["2026-10-01", "soon", "2026-10-02", "2026-10-03", "2026-10-04"]
    elif breakage == "bad_price":
        it_frame["price"] = ["1", "2", "three", "4", "5"]
    elif breakage == "missing_users":
        users = _write_parquet(pd.DataFrame({"user_id": ["u1x"]}), bad / "users.parquet")
    bad_events = _write_parquet(ev_frame, bad / "events.parquet")
    if breakage == "empty_items":
        bad_items = str(bad / "items.csv")
        Path(bad_items).write_text("item_id,price\n")
    else:
        bad_items = _write_parquet(it_frame, bad / "items.parquet")

    with pytest.raises(DataValidationError):
        lake.import_files(layout, bad_events, bad_items, users)

    assert _snapshot(lake_root) == before
    pd.testing.assert_frame_equal(lake.read_events(layout), before_events)
    # No staging directories are left behind either.
    _assert_nothing_left_behind(layout)


def test_a_second_good_import_replaces_the_lake(layout, good_files, tmp_path):
    events, items = good_files
    lake.import_files(layout, events, items)
    frame = _events_frame().iloc[:2]
    p = _write_parquet(frame, tmp_path / "fewer.parquet")
    summary = lake.import_files(layout, p, items)
    assert summary.events == 2
    assert len(lake.read_events(layout)) == 2
    _assert_nothing_left_behind(layout)


def test_files_can_be_imported_from_an_object_store(s3_root, tmp_path):
    # the user's files may already live in the bucket: read with the same checks, the same errors
    from aiplatform.core import storage

    events = _write_parquet(_events_frame(), tmp_path / "events.parquet")
    storage.write_bytes(f"{s3_root}/in/events.parquet", Path(events).read_bytes())
    storage.write_bytes(f"{s3_root}/in/items.csv", b"item_id,title,category,price\n"
                        + b"".join(f"i{i},t,shoes,{i}.5\n".encode() for i in range(5)))
    storage.write_bytes(f"{s3_root}/in/empty.csv", b"")
    layout = Layout.at(str(tmp_path / "home"))
    summary = lake.import_files(layout, f"{s3_root}/in/events.parquet", f"{s3_root}/in/items.csv")
    assert (summary.events, summary.items) == (5, 5)
    assert lake.read_items(layout)["price"].tolist() == [0.5, 1.5, 2.5, 3.5, 4.5]
    for name, why in (("missing.parquet", "not found"), ("empty.csv", "empty")):
        with pytest.raises(DataValidationError) as info:
            validate.read_file(f"{s3_root}/in/{name}")
        assert f"{s3_root}/in/{name}" in str(info.value) and why in str(info.value)
