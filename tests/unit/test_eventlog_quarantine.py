"""Events already in the log that the batch pipeline cannot encode (written before today's checks,
or by hand) are quarantined by the compaction the batch run starts with: moved to
``<root>/eventlog/quarantine`` with their reason, counted, and the good events of the same file
kept; a push for a user with such an event in the log is not refused (the issue's poisoned user)."""

from datetime import datetime, timedelta, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aiplatform.core import storage
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, lake
from aiplatform.data.eventlog_compact import bad_rows, compact
from aiplatform.features.materialize import latest_service_rows
from aiplatform.features.online import open_online_store
from aiplatform.features.push import push
from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate, write

NOW = datetime.now(timezone.utc)


def _row(i: int, **over) -> dict:
    row = {"user_id": "u-good", "item_id": f"item-{i}", "event_type": "view",
           "timestamp": NOW - timedelta(hours=10 - i), "value": None, "event_id": f"e{i}"}
    row.update(over)
    return row


def _raw_leaf(layout: Layout, rows: list[dict], name: str = "events-00000000000000000001-0000abcd.parquet") -> str:
    """A log file written as the old code (or a hand) would: no checks, no names' time range."""
    table = pa.Table.from_pylist(rows).cast(pa.schema([f.with_nullable(True) for f in
                                                       eventlog.schemas.EVENTS]))
    path = storage.join(layout.eventlog, name)
    pq.write_table(table, path)
    return path


@pytest.fixture()
def layout(tmp_path) -> Layout:
    out = Layout.at(str(tmp_path / "home"))
    out.ensure()
    return out


BAD = {
    "item_id: control character": {"item_id": "item\x1e9"},
    "user_id: longer than 256 characters": {"user_id": "u" * 300},
    "timestamp: later than now + 300s": {"timestamp": NOW + timedelta(days=365)},
    "event_type: empty": {"event_type": " "},
}


def test_rows_that_cannot_be_encoded_are_named_with_their_reason():
    rows = [_row(0)] + [_row(i + 1, **over) for i, over in enumerate(BAD.values())]
    table = pa.Table.from_pylist(rows)
    mask, reasons = bad_rows(table)
    assert mask.tolist() == [False, True, True, True, True]
    assert reasons[0] is None
    assert reasons[1] == "item_id: control character U+001E at position 4"
    assert [r.split(" U+")[0] for r in reasons[1:]] == list(BAD)


def test_the_batch_compaction_quarantines_bad_rows_and_keeps_the_good_ones_of_the_same_file(layout):
    rows = [_row(0), _row(1)] + [_row(i + 2, **over) for i, over in enumerate(BAD.values())]
    source = _raw_leaf(layout, rows)
    eventlog.append(layout, eventlog.validate_pushed([_row(8, user_id="u-other")]))

    result = compact(layout, all_leaves=True, check_all=True, grace=0)

    assert result.quarantined == 4 and result.reasons == {reason: 1 for reason in BAD}
    kept = eventlog.read_events(layout).to_pandas()
    assert sorted(kept["event_id"]) == ["e0", "e1", "e8"]
    moved = pq.read_table(storage.join(eventlog.quarantine_dir(layout), source.rsplit("/", 1)[1])).to_pandas()
    assert sorted(moved["event_id"]) == ["e2", "e3", "e4", "e5"]
    assert set(moved["source_file"]) == {source.rsplit("/", 1)[1]}
    assert moved.set_index("event_id").at["e2", "reason"] == "item_id: control character U+001E at position 4"
    # Done once: the next batch run finds nothing more to move.
    again = compact(layout, all_leaves=True, check_all=True, grace=0)
    assert again.quarantined == 0 and sorted(eventlog.read_events(layout).column("event_id").to_pylist()) == [
        "e0", "e1", "e8"]


def test_an_unreadable_file_is_quarantined_as_it_was_and_the_log_reads_again(layout):
    eventlog.append(layout, eventlog.validate_pushed([_row(0)]))
    broken = storage.join(layout.eventlog, "events-00000000000000000002-0000beef.parquet")
    storage.write_bytes(broken, b"PAR1 this is not parquet")
    with pytest.raises(Exception):
        eventlog.read_events(layout)  # what the batch run would have met

    result = compact(layout, all_leaves=True, check_all=True, grace=0)

    assert result.reasons == {"unreadable file": 1}
    assert eventlog.read_events(layout).column("event_id").to_pylist() == ["e0"]
    kept = storage.join(eventlog.quarantine_dir(layout), "events-00000000000000000002-0000beef.parquet")
    assert storage.read_bytes(kept) == b"PAR1 this is not parquet"
    assert "unreadable" in storage.read_json(kept + ".reason.json")["reason"]


def test_a_segment_written_under_older_rules_is_checked_again(layout):
    table = pa.Table.from_pylist([_row(0), _row(1, item_id="bad\x00id")])
    old = eventlog.segment_name(1, eventlog.validate_pushed(table))
    storage.write_bytes(storage.join(layout.eventlog, old),
                        eventlog.parquet_bytes(eventlog.validate_pushed(table), {eventlog.COVERS_KEY: b"[]"}))
    assert compact(layout, files_limit=0, gc=False).quarantined == 0  # a push's compaction trusts it
    result = compact(layout, all_leaves=True, check_all=True, grace=0)
    assert result.quarantined == 1 and eventlog.read_events(layout).column("event_id").to_pylist() == ["e0"]
    assert compact(layout, all_leaves=True, check_all=True, grace=0).segments == []  # now marked checked


def test_a_bad_event_in_the_log_does_not_poison_the_users_later_pushes(tmp_path):
    frames = generate(ShopSize(users=30, items=30, days=10), seed=5)
    paths = write(frames, str(tmp_path / "in"))
    layout = Layout.at(str(tmp_path / "home"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    store = open_online_store(str(tmp_path / "online.sqlite"))
    user = str(frames["events"]["user_id"].iloc[0])
    end = pd.Timestamp(frames["events"]["timestamp"].max())
    poison = {"user_id": user, "item_id": "item\x1e003", "event_type": "view",
              "timestamp": (end + pd.Timedelta(hours=1)).to_pydatetime(), "value": None, "event_id": "poison"}
    _raw_leaf(layout, [poison])
    good = {"user_id": user, "item_id": str(frames["items"]["item_id"].iloc[0]), "event_type": "purchase",
            "timestamp": (end + pd.Timedelta(hours=2)).to_pydatetime(), "value": 5.0, "event_id": "good"}

    result = push(layout, [good], [recommender_user], store, compact=False)

    assert result.events == 1 and result.entities_updated["recommender_user"] == 1
    want = latest_service_rows(recommender_user, pd.concat([frames["events"], pd.DataFrame([good])]))
    want = want.to_pandas().set_index("user_id").loc[user]
    got = store.get_online_features(recommender_user, [user]).to_dict(0)
    assert got["last_items"] == list(want["last_items"]) and "item\x1e003" not in got["last_items"]
    assert got["purchase_1d"] == want["purchase_1d"] == 1
