"""The offline store on real Ray Data + Lance: a full run equals incremental runs over the same events.

A small generated shop is imported into two homes: one gets every event and a full run; the
other gets the events in three time-ordered chunks (re-importing the growing lake each time)
with an incremental run after each. The tables must be equal row for row, list columns included.
"""

from datetime import timedelta

import lance
import numpy as np
import pandas as pd
import pytest

from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.features import offline
from aiplatform.features.definitions import Aggregation, FeatureView, Field
from aiplatform.features.engine import compute_view_rows
from aiplatform.features.partition import BUCKET_COLUMN, entity_bucket
from apps.shop.features import events, item_attributes, user, user_activity
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.integration

# the shop's user view plus sum/min/max/mean, a non-distinct last_n and a plain field: one
# view, so that the test needs few Ray jobs
user_spend = FeatureView(
    name="user_spend", entity=user, source=events,
    aggregations=(*user_activity.aggregations,
                  Aggregation("sum", timedelta(days=7), column="value", name="spend_7d"),
                  Aggregation("min", timedelta(days=3), column="value", name="min_value_3d"),
                  Aggregation("max", timedelta(days=10), column="value", name="max_value_10d"),
                  Aggregation("mean", timedelta(days=5), column="value", where={"event_type": "purchase"},
                              name="mean_paid_5d"),
                  Aggregation("last_n", timedelta(days=2), column="event_type", n=5, name="last_types")),
    fields=(Field("last_event", "string", column="event_type"),),
    ttl=timedelta(days=90),
)
VIEWS = (user_spend, item_attributes)


def _sorted(table, view) -> pd.DataFrame:
    frame = table.to_pandas()
    for name, dtype in view.dtypes.items():
        if dtype.startswith("list<"):
            frame[name] = frame[name].map(lambda v: list(v) if v is not None else None)
    return frame.sort_values([view.entity.join_key, "event_timestamp"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def shop(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("offline_store")
    frames = generate(ShopSize(users=60, items=40, days=30), seed=5)
    paths = write(frames, str(root / "data"))
    ev = frames["events"]
    cuts = ev["timestamp"].quantile([1 / 3, 2 / 3]).tolist()
    chunks = []
    for i, cut in enumerate([*cuts, ev["timestamp"].max()]):
        part = ev[ev["timestamp"] <= cut]
        chunk_paths = write({"events": part}, str(root / f"chunk{i}"))
        chunks.append(chunk_paths["events"])
    full = Layout.at(str(root / "full"))
    lake.import_files(full, paths["events"], paths["items"], paths["users"])
    full_runs = {v.name: offline.run_view(full, v) for v in VIEWS}

    inc = Layout.at(str(root / "incremental"))
    inc_runs: dict[str, list] = {v.name: [] for v in VIEWS}
    for chunk in chunks:
        lake.import_files(inc, chunk, paths["items"], paths["users"])
        for v in VIEWS:
            inc_runs[v.name].append(offline.run_view(inc, v))
    return {"frames": frames, "full": full, "inc": inc, "full_runs": full_runs, "inc_runs": inc_runs,
            "paths": paths, "chunks": chunks}


@pytest.mark.parametrize("view", VIEWS, ids=lambda v: v.name)
def test_full_run_equals_three_incremental_runs(shop, view):
    full = lance.dataset(offline.offline_table_path(shop["full"], view)).to_table()
    inc = lance.dataset(offline.offline_table_path(shop["inc"], view)).to_table()
    assert full.schema == inc.schema
    a, b = _sorted(full, view), _sorted(inc, view)
    assert len(a) > 0
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.parametrize("view", [user_spend], ids=lambda v: v.name)
def test_offline_rows_equal_the_engine_on_all_events(shop, view):
    expected = compute_view_rows(view, shop["frames"]["events"])
    got = lance.dataset(offline.offline_table_path(shop["full"], view)).to_table()
    pd.testing.assert_frame_equal(_sorted(got, view), _sorted(expected, view))


def test_run_modes_watermarks_and_versions(shop):
    runs = shop["inc_runs"][user_spend.name]
    assert [r.mode for r in runs] == ["full", "incremental", "incremental"]
    assert runs[0].watermark_before is None
    assert [r.watermark_before for r in runs[1:]] == [r.watermark_after for r in runs[:-1]]
    assert runs[1].watermark_after > runs[0].watermark_after
    ev = shop["frames"]["events"]
    assert runs[-1].watermark_after == int(ev["timestamp"].max().value // 1000)
    assert offline.watermark(shop["inc"], user_spend) == runs[-1].watermark_after
    # each incremental run wrote exactly the rows after the previous watermark
    table = _sorted(lance.dataset(offline.offline_table_path(shop["inc"], user_spend)).to_table(), user_spend)
    ts_us = table["event_timestamp"].map(lambda t: int(t.value // 1000))
    assert runs[1].rows_written == int(((ts_us > runs[0].watermark_after) & (ts_us <= runs[1].watermark_after)).sum())
    assert sum(r.rows_written for r in runs) == len(table)
    # the static view is recomputed only when its source files change
    static = shop["inc_runs"][item_attributes.name]
    assert static[0].mode == "full" and static[0].watermark_after is None
    assert all(r.mode == "full" for r in static[1:])  # items re-imported with every chunk


def test_no_new_events_is_a_noop_without_a_new_lance_version(shop):
    layout = shop["inc"]
    path = offline.offline_table_path(layout, user_spend)
    before = lance.dataset(path).latest_version
    again = offline.run_view(layout, user_spend)
    assert again.mode == "noop" and again.rows_written == 0
    assert lance.dataset(path).latest_version == before
    static = offline.run_view(layout, item_attributes)
    assert static.mode == "noop"


def test_a_commit_without_its_state_is_rolled_back_before_the_next_append(shop, tmp_path):
    layout = shop["full"]
    path = offline.offline_table_path(layout, user_spend)
    state_version = offline.read_state(layout, user_spend)["lance_version"]
    good = _sorted(lance.dataset(path).to_table(), user_spend)
    stray = lance.dataset(path).to_table().slice(0, 5)
    lance.write_dataset(stray, path, mode="append")  # a run that died before writing its state
    assert lance.dataset(path).count_rows() == len(good) + 5
    run = offline.run_view(layout, user_spend)
    assert run.mode == "noop"
    restored = lance.dataset(path)
    assert restored.latest_version > state_version
    pd.testing.assert_frame_equal(_sorted(restored.to_table(), user_spend), good)


def test_full_flag_rewrites_and_bucket_reads_use_the_index(shop):
    layout = shop["full"]
    path = offline.offline_table_path(layout, user_spend)
    rows_before = lance.dataset(path).count_rows()
    run = offline.run_view(layout, user_spend, full=True)
    assert run.mode == "full" and run.rows_written == rows_before
    dataset = lance.dataset(path)
    assert dataset.count_rows() == rows_before
    assert any(BUCKET_COLUMN in idx["fields"] for idx in dataset.list_indices())
    bucket = int(entity_bucket(["u000001"])[0])
    part = dataset.to_table(filter=f"{BUCKET_COLUMN} = {bucket}").to_pandas()
    assert len(part) > 0 and set(part[BUCKET_COLUMN]) == {bucket}
    assert np.all(entity_bucket(part["user_id"].to_numpy()) == bucket)


def test_a_changed_definition_gets_its_own_table(shop):
    changed = FeatureView(user_spend.name, user, events, aggregations=user_spend.aggregations[:1],
                          ttl=user_spend.ttl)
    assert changed.table_name != user_spend.table_name
    assert offline.offline_table_path(shop["full"], changed) != offline.offline_table_path(shop["full"], user_spend)
    assert offline.watermark(shop["full"], changed) is None
