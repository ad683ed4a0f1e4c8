"""The event log's compaction: merged segments replace small files without a reader ever seeing an
event twice or missing one (before, during and after a compaction, after a crash at any step,
with two compactors at once), on a local root and on a real S3-compatible server (moto); a push
opens only the files that can hold the events it needs; the stores' locks are all-or-none."""

import os
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aiplatform.core import storage
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, eventlog_compact
from aiplatform.data.eventlog_compact import compact
from aiplatform.features.online import open_online_store

T0 = pd.Timestamp("2026-11-20", tz="UTC")


def _event(i: int, user: str | None = None, **over) -> dict:
    event = {"user_id": user or f"u{i % 7}", "item_id": f"i{i % 11}", "event_type": "view",
             "timestamp": (T0 + pd.Timedelta(minutes=i)).to_pydatetime(), "value": float(i), "event_id": f"e{i}"}
    event.update(over)
    return event


def _push_files(layout: Layout, n: int, start: int = 0) -> list[str]:
    return [eventlog.append(layout, eventlog.validate_pushed([_event(i)])) for i in range(start, start + n)]


def _ids(layout: Layout, snap=None) -> list[str]:
    """Every logged event_id, sorted, WITH repeats (a duplicate shows as a repeat)."""
    return sorted(eventlog.read_events(layout, snap=snap).column("event_id").to_pylist())


@pytest.fixture()
def layout(tmp_path) -> Layout:
    out = Layout.at(str(tmp_path / "home"))
    out.ensure()
    return out


def test_compaction_merges_small_files_into_one_sorted_segment_with_the_same_events(layout):
    _push_files(layout, 40)
    want = _ids(layout)
    assert want == sorted(f"e{i}" for i in range(40))

    result = compact(layout, files_limit=32)

    assert result.merged_files == 40 and len(result.segments) == 1 and result.live_files == 1
    assert eventlog.files(layout) == result.segments
    assert _ids(layout) == want
    segment = pq.read_table(result.segments[0])
    keys = list(zip(segment.column("user_id").to_pylist(), segment.column("timestamp").to_pylist()))
    assert keys == sorted(keys)  # sorted by user then time: a user's rows are together
    covers = eventlog.segment_covers(result.segments[0])
    assert len(covers) == 40 and all(n.startswith("events-") for n in covers)


def test_replaced_files_stay_for_the_grace_period_and_go_after_it(layout):
    _push_files(layout, 5)
    compact(layout, files_limit=1, grace=3600)
    assert len(eventlog.snapshot(layout).listed) == 6  # the segment and the 5 files it replaces
    assert compact(layout, files_limit=0, grace=3600).deleted == 0
    later = compact(layout, files_limit=0, grace=0)
    assert later.deleted == 5 and len(eventlog.snapshot(layout).listed) == 1
    assert _ids(layout) == sorted(f"e{i}" for i in range(5))


def test_a_reader_that_listed_before_a_compaction_reads_every_event_once(layout):
    _push_files(layout, 10)
    before = eventlog.snapshot(layout)
    compact(layout, files_limit=1, grace=3600)  # segment written, the old files still there
    assert _ids(layout, before) == _ids(layout) == sorted(f"e{i}" for i in range(10))
    compact(layout, files_limit=0, grace=0)  # now the files the old listing names are gone
    assert _ids(layout, before) == sorted(f"e{i}" for i in range(10))  # it lists again


def test_a_crash_at_any_step_of_a_compaction_loses_and_repeats_nothing(layout):
    _push_files(layout, 12)
    want = sorted(f"e{i}" for i in range(12))
    result = compact(layout, files_limit=1, gc=False)  # "crashed" before deleting anything
    assert _ids(layout) == want
    # Crash during the deletions: some replaced files gone, some not.
    covered = sorted(eventlog.segment_covers(result.segments[0]))
    for name in covered[:5]:
        storage.delete_file(storage.join(layout.eventlog, name))
    assert _ids(layout) == want
    # A crash mid-write leaves at most a temp file, which readers never list.
    with open(f"{layout.eventlog}/.segment-L1-x.parquet.tmp", "wb") as half:
        half.write(b"half")
    assert _ids(layout) == want
    # The next run finishes the job (and removes the temp file once it is an hour old).
    os.utime(half.name, (time.time() - 7200, time.time() - 7200))
    compact(layout, files_limit=0, grace=0)
    assert [f.name for f in eventlog.snapshot(layout).listed] == [result.segments[0].rsplit("/", 1)[1]]
    assert not os.path.exists(half.name)
    assert _ids(layout) == want


def test_two_segments_over_one_file_a_race_count_it_once_and_lose_nothing(layout, monkeypatch):
    paths = _push_files(layout, 3)
    a, b, c = (eventlog.parse_name(p) for p in paths)
    older = eventlog_compact.CompactionResult()
    eventlog_compact._merge(layout, [a, b], 1, older, check=False, now=time.time())
    # A second compactor that listed before the first wrote: it merges b and c.
    with monkeypatch.context() as m:
        m.setattr(eventlog, "snapshot", lambda lay: eventlog._resolve([a, b, c], {}))  # its stale view
        younger = eventlog_compact.CompactionResult()
        eventlog_compact._merge(layout, [b, c], 1, younger, check=False, now=time.time())
    snap = eventlog.snapshot(layout)
    assert [f.path for f in snap.ignored] == younger.segments  # the younger loses: b is the older's
    assert sorted(f.path for f in snap.live) == sorted(older.segments + [c.path])
    assert _ids(layout) == ["e0", "e1", "e2"]
    # Garbage collection removes the loser before anything else, then the rest as usual.
    assert compact(layout, files_limit=0, grace=0).deleted == 1
    assert _ids(layout) == ["e0", "e1", "e2"]
    compact(layout, files_limit=0, grace=0)
    assert _ids(layout) == ["e0", "e1", "e2"]


def test_two_compactors_at_once_one_runs_and_nothing_is_lost(layout, tmp_path):
    store = open_online_store(str(tmp_path / "online.sqlite"))
    _push_files(layout, 60)
    results = []
    barrier = threading.Barrier(2)

    def run():
        barrier.wait()
        results.append(compact(layout, lease=store, files_limit=8, grace=0))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert _ids(layout) == sorted(f"e{i}" for i in range(60))
    skipped = [r for r in results if r.skipped]
    assert len(skipped) <= 1
    assert store.try_lock([eventlog_compact.lock_name(layout, "eventlog-compact")], 1) is not None  # released


def test_segments_merge_by_tiers_so_the_live_files_stay_few(layout):
    for k in range(2 * eventlog_compact.FAN_IN):
        _push_files(layout, 4, start=4 * k)
        compact(layout, files_limit=4, grace=0)
    snap = eventlog.snapshot(layout)
    assert _ids(layout) == sorted(f"e{i}" for i in range(8 * eventlog_compact.FAN_IN))
    levels = sorted(f.level for f in snap.live)
    assert levels == [2, 2]  # 16 level-1 segments became two of level 2
    compact(layout, files_limit=4, grace=0)  # deletes what the last merge replaced
    assert [f.level for f in eventlog.snapshot(layout).listed] == [2, 2]


def test_a_push_does_not_open_files_that_end_before_the_time_it_needs(layout):
    old = eventlog.append(layout, eventlog.validate_pushed([_event(0, "u-a")]))
    new = eventlog.append(layout, eventlog.validate_pushed([_event(600, "u-a")]))
    since = int((T0 + pd.Timedelta(minutes=300)).value // 1000)
    # Make the old file unreadable: a read that opened it would fail.
    with open(old, "wb") as f:
        f.write(b"not parquet")
    got = eventlog.read_events(layout, key="user_id", keys=["u-a"], since_us=since)
    assert got.column("event_id").to_pylist() == ["e600"]
    assert eventlog.parse_name(new).min_us == eventlog.parse_name(new).max_us == since + 300 * 60_000_000


def test_files_written_before_names_carried_times_are_still_read(layout):
    name = storage.join(layout.eventlog, "events-00000000000000000001-abcdef01.parquet")
    storage.write_bytes(name, eventlog.parquet_bytes(eventlog.validate_pushed([_event(1)])))
    _push_files(layout, 2, start=5)
    assert _ids(layout, None) == ["e1", "e5", "e6"]
    assert _ids(layout) == ["e1", "e5", "e6"]
    compact(layout, files_limit=1, grace=0)
    compact(layout, files_limit=0, grace=0)
    assert _ids(layout) == ["e1", "e5", "e6"] and len(eventlog.files(layout)) == 1


def test_compaction_on_an_object_store(s3_root):
    layout = Layout.at(s3_root)
    _push_files(layout, 9)
    before = eventlog.snapshot(layout)
    result = compact(layout, files_limit=4, grace=3600)
    assert len(result.segments) == 1 and result.segments[0].startswith(f"{s3_root}/eventlog/segment-L1-")
    assert _ids(layout) == _ids(layout, before) == sorted(f"e{i}" for i in range(9))
    assert compact(layout, files_limit=0, grace=0).deleted == 9
    assert _ids(layout, before) == sorted(f"e{i}" for i in range(9))  # listed again after the deletion
    assert eventlog.files(layout) == result.segments


# ---- the online stores' locks ------------------------------------------------------------------
def test_locks_are_all_or_none_expire_and_are_released_by_their_owner(online_store):
    store = online_store
    token = store.try_lock(["a", "b"], 30)
    assert token is not None
    assert store.try_lock(["b", "c"], 30) is None  # b is held: c is not taken either
    other = store.try_lock(["c"], 30)
    assert other is not None
    store.unlock(["a", "b"], "not-the-owner")
    assert store.try_lock(["a"], 30) is None
    store.unlock(["a", "b"], token)
    assert store.try_lock(["a", "b"], 30) is not None
    short = store.try_lock(["x"], 0.05)
    assert short is not None and store.try_lock(["x"], 30) is None
    time.sleep(0.15)
    taken_over = store.try_lock(["x"], 30)
    assert taken_over is not None
    store.unlock(["x"], short)  # the expired owner cannot release the new one's lock
    assert store.try_lock(["x"], 30) is None


def test_a_tabled_lock_survives_reopening_the_sqlite_store(tmp_path):
    path = str(tmp_path / "online.sqlite")
    first = open_online_store(path)
    assert first.try_lock(["k"], 30) is not None
    assert open_online_store(path).try_lock(["k"], 30) is None  # another process's view of the file


def test_segments_name_their_time_range_and_empty_ones_say_so(layout):
    table = eventlog.validate_pushed([_event(3), _event(9)])
    name = eventlog.segment_name(2, table)
    parsed = eventlog.parse_name(name)
    assert parsed.level == 2 and parsed.min_us < parsed.max_us and not parsed.empty
    empty = eventlog.parse_name(eventlog.segment_name(1, table.slice(0, 0)))
    assert empty.empty and empty.min_us is None
    assert eventlog.parse_name("events-1.parquet") is None and eventlog.parse_name(".events-x.parquet") is None
    assert pa.types.is_timestamp(table.schema.field("timestamp").type)


def test_the_cli_compacts_by_hand_and_reports_quarantined_events(layout, monkeypatch):
    from typer.testing import CliRunner

    from aiplatform.cli import app

    _push_files(layout, 3)
    bad = eventlog.validate_pushed([_event(9, item_id="x\x1fy")])
    storage.write_bytes(storage.join(layout.eventlog, "events-00000000000000000001-00000bad.parquet"),
                        eventlog.parquet_bytes(bad))  # unchecked, as written before the push checks
    monkeypatch.setenv("AIPLATFORM_HOME", layout.root)
    result = CliRunner().invoke(app, ["events", "compact"])
    assert result.exit_code == 0, result.output
    assert "merged 4 files into 1 segment(s)" in result.output
    assert "quarantined 1 event(s) (1 item_id: control character)" in result.output
    assert _ids(layout) == ["e0", "e1", "e2"]
