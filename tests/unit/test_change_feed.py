"""The online store's change feed (``publish_changes`` / ``read_changes``), on a real SQLite file
and a real redis-server (the ``online_store`` fixture runs every test on both): one semantics,
sequence numbers without holes, pruning, and a reader told to reset when it may have missed
entries."""

import pyarrow as pa
import pytest

from aiplatform.features.online import ChangeBatch, SQLiteOnlineStore, open_online_store


def test_a_reader_starts_at_the_end_and_gets_each_later_id_once(online_store):
    store = online_store
    store.publish_changes("users", ["before"])
    start = store.read_changes("users", None)
    assert start == ChangeBatch([], 1)  # the end: what was published before is not replayed
    assert store.publish_changes("users", ["u1", "u2", "u1"]) == 2
    assert store.publish_changes("items", ["i1"]) == 3  # another service: not this reader's
    assert store.publish_changes("users", ["u2", "u3"]) == 4
    batch = store.read_changes("users", start.cursor)
    assert not batch.reset and batch.cursor == 4
    assert sorted(batch.entity_ids) == ["u1", "u2", "u3"]
    assert store.read_changes("items", start.cursor).entity_ids == ["i1"]
    assert store.read_changes("users", batch.cursor) == ChangeBatch([], 4)  # nothing new


def test_an_empty_feed_reads_as_zero_and_its_first_entry_is_seen(online_store):
    store = online_store
    assert store.read_changes("users", None) == ChangeBatch([], 0)
    store.publish_changes("users", ["u1"])
    assert store.read_changes("users", 0) == ChangeBatch(["u1"], 1)


def test_old_entries_are_pruned_and_a_reader_behind_them_must_reset(online_store):
    store = online_store
    store.change_feed_keep = 3
    for i in range(1, 7):
        store.publish_changes("users", [f"u{i}"])
    # entries 4..6 are kept: a reader at 3 missed nothing, one at 2 missed entry 3
    assert store.read_changes("users", 3) == ChangeBatch(["u4", "u5", "u6"], 6)
    assert store.read_changes("users", 2) == ChangeBatch([], 6, reset=True)
    assert store.read_changes("users", 0) == ChangeBatch([], 6, reset=True)
    store.publish_changes("users", ["u7"])  # after a reset the reader goes on from the end
    assert store.read_changes("users", 6) == ChangeBatch(["u7"], 7)


def test_a_reader_further_behind_than_the_limit_resets(online_store):
    store = online_store
    for i in range(5):
        store.publish_changes("users", [f"u{i}"])
    assert store.read_changes("users", 0, limit=4) == ChangeBatch([], 5, reset=True)
    assert len(store.read_changes("users", 0, limit=5).entity_ids) == 5


def test_a_restarted_feed_resets_a_reader_ahead_of_it(online_store):
    """A cursor past the feed's end: the store was replaced (a new file, a flushed Redis)."""
    store = online_store
    store.publish_changes("users", ["u1"])
    assert store.read_changes("users", 9) == ChangeBatch([], 1, reset=True)


def test_a_feature_write_alone_publishes_nothing(online_store):
    """Only pushes publish (``features.push``): a bulk materialization would flood the feed;
    the replicas' TTLs cover it."""
    from aiplatform.features.definitions import arrow_type
    from apps.shop.features import recommender_user
    from aiplatform.features.partition import TIMESTAMP_COLUMN

    columns = {"user_id": pa.array(["u1"]), TIMESTAMP_COLUMN: pa.array([0], pa.timestamp("us", tz="UTC"))}
    for name, dtype in recommender_user.stored_dtypes.items():
        columns[name] = pa.array([[] if dtype.startswith("list") else 0], arrow_type(dtype))
    assert online_store.write_features(recommender_user, pa.table(columns)) == 1
    assert online_store.read_changes("recommender_user", None) == ChangeBatch([], 0)


def test_two_sqlite_handles_on_one_file_share_the_feed(tmp_path):
    """Two replicas on one machine: two processes' stores on one file."""
    path = str(tmp_path / "online.sqlite")
    a, b = SQLiteOnlineStore(path), open_online_store(f"sqlite:///{path}")
    cursor = b.read_changes("users", None).cursor
    a.publish_changes("users", ["u1"])
    assert b.read_changes("users", cursor) == ChangeBatch(["u1"], cursor + 1)


@pytest.mark.parametrize("keep", [1, 2])
def test_sqlite_keeps_exactly_the_last_entries(tmp_path, keep):
    store = SQLiteOnlineStore(str(tmp_path / "online.sqlite"))
    store.change_feed_keep = keep
    for i in range(5):
        store.publish_changes("users", [f"u{i}"])
    rows = store._conn().execute("SELECT seq FROM changes ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == list(range(6 - keep, 6))
