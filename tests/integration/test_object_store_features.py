"""The data and feature-store layers with the storage root in an object store (S3, served by
moto's real S3 server on loopback; Ray workers get its endpoint from the environment).

One small shop is run twice: on ``s3://…`` (lake imported in two steps, offline runs full then
incremental) and on a local folder (everything at once, full). The S3 results must equal the
local ones: offline tables, online rows (node-local SQLite and Redis), rows after a push.
"""

import uuid

import lance
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError, DataValidationError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout, storage_options
from aiplatform.data import eventlog, lake
from aiplatform.features import offline, pipeline
from aiplatform.features.definitions import FeatureService
from aiplatform.features.materialize import materialize
from aiplatform.features.online import open_online_store
from aiplatform.features.partition import TIMESTAMP_COLUMN
from aiplatform.features.pit import asof_join, get_training_frame
from aiplatform.features.push import push
from aiplatform.features.server import open_store
from apps.shop.features import item_attributes, item_popularity, recommender_user, user_activity, user_recent_events
from apps.shop.generate import ShopSize, generate, write
from tests.s3_server import BUCKET

pytestmark = pytest.mark.integration


def _sorted(table: pa.Table, view) -> pd.DataFrame:
    frame = table.to_pandas()
    for name, dtype in view.dtypes.items():
        if dtype.startswith("list<"):
            frame[name] = frame[name].map(lambda v: list(v) if v is not None else None)
    return frame.sort_values([view.entity.join_key, TIMESTAMP_COLUMN], kind="stable").reset_index(drop=True)


def _lance(path: str) -> "lance.LanceDataset":
    return lance.dataset(path, storage_options=storage_options(path))


def _objects(root: str) -> dict[str, bytes]:
    """Every object under ``root`` and its content."""
    fs, inside = storage.filesystem_for(root)
    infos = fs.get_file_info(pafs.FileSelector(inside, recursive=True, allow_not_found=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path[len(inside):]] = f.read()
    return out


@pytest.fixture(scope="module")
def shops(tmp_path_factory, ray_session):
    """The same shop on S3 (imported in two steps: full run, then incremental) and locally (one
    import, full runs)."""
    base = tmp_path_factory.mktemp("object_store")
    frames = generate(ShopSize(users=120, items=60), seed=7)
    paths = write(frames, str(base / "data"))
    ev = frames["events"]
    early = write({"events": ev[ev["timestamp"] <= ev["timestamp"].quantile(2 / 3)]}, str(base / "early"))["events"]

    remote = Layout.open(f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}")  # the env comes from ray_session
    lake.import_files(remote, early, paths["items"], paths["users"])
    runs = {"first": offline.run_view(remote, user_activity)}
    replaced = {"after_run": pipeline._lake_replaced_since(remote, user_activity,
                                                           offline.read_state(remote, user_activity))}
    lake.import_files(remote, paths["events"], paths["items"], paths["users"])
    replaced["after_import"] = pipeline._lake_replaced_since(remote, user_activity,
                                                             offline.read_state(remote, user_activity))
    runs["second"] = offline.run_view(remote, user_activity)
    runs["again"] = offline.run_view(remote, user_activity)
    runs["items"] = offline.run_view(remote, item_attributes)
    runs["items_again"] = offline.run_view(remote, item_attributes)
    offline.run_view(remote, user_recent_events)  # the service's other view (what materialize reads)

    local = Layout.open(str(base / "local"))
    lake.import_files(local, paths["events"], paths["items"], paths["users"])
    for view in (user_activity, user_recent_events, item_attributes):
        offline.run_view(local, view)
    return {"remote": remote, "local": local, "frames": frames, "runs": runs, "replaced": replaced}


def test_lake_import_into_s3_is_all_or_nothing(s3_root, tmp_path):
    frames = generate(ShopSize(users=20, items=30, days=5), seed=1)
    good = write(frames, str(tmp_path / "good"))
    layout = Layout.open(s3_root)
    assert not lake.has_data(layout)
    lake.import_files(layout, good["events"], good["items"], good["users"])
    assert lake.has_data(layout)
    assert all(f.startswith(f"{s3_root}/lake/events/") for f in lake.table_files(layout, "events"))
    before, before_events = _objects(layout.lake), lake.read_events(layout)
    assert len(before_events) == len(frames["events"])

    bad_events = frames["events"].copy()
    bad_events["user_id"] = bad_events["user_id"] + "x"  # other, valid data: a partial swap would show
    bad_events.loc[3, "item_id"] = "not-in-the-catalogue"
    bad = write({"events": bad_events, "items": frames["items"]}, str(tmp_path / "bad"))
    with pytest.raises(DataValidationError, match="not-in-the-catalogue"):
        lake.import_files(layout, bad["events"], bad["items"])
    assert _objects(layout.lake) == before
    pd.testing.assert_frame_equal(lake.read_events(layout), before_events)

    generation = lake.table_generation(layout, "events")
    fewer = write({"events": frames["events"].iloc[:40]}, str(tmp_path / "fewer"))
    lake.import_files(layout, fewer["events"], good["items"], good["users"])
    assert len(lake.read_events(layout)) == 40 and lake.table_generation(layout, "events") != generation
    for table in ("events", "items", "users"):  # the old generation is gone, the new one alone is left
        assert storage.list_dirs(layout.lake_table(table)) == [lake.table_generation(layout, table)]


def test_offline_runs_on_s3_equal_a_local_full_run(shops):
    remote, local, runs = shops["remote"], shops["local"], shops["runs"]
    assert [runs[k].mode for k in ("first", "second", "again", "items", "items_again")] == [
        "full", "incremental", "noop", "full", "noop"]
    assert runs["second"].rows_written > 0 and runs["second"].lance_version > runs["first"].lance_version
    # the re-import is seen through the lake's pointer (no directory times on an object store)
    assert shops["replaced"] == {"after_run": False, "after_import": True}
    state = storage.read_json(offline.state_path(remote, user_activity))
    assert state["lance_version"] == _lance(offline.offline_table_path(remote, user_activity)).version
    assert state["lake_generation"] == lake.table_generation(remote, "events")
    assert offline.offline_table_path(remote, user_activity).startswith("s3://")
    table = _lance(offline.offline_table_path(remote, user_activity))
    assert ["_bucket"] in [i["fields"] for i in table.list_indices()]  # the BITMAP index is built on S3 too
    for view in (user_activity, item_attributes):
        on_s3 = _sorted(offline.read_view(remote, view).to_table(), view)
        here = _sorted(offline.read_view(local, view).to_table(), view)
        assert len(on_s3) > 0
        pd.testing.assert_frame_equal(on_s3, here)
    # a commit whose state was never written (a run that died in between) is rolled back on S3 too
    path = offline.offline_table_path(remote, user_activity)
    rows = table.count_rows()
    lance.write_dataset(table.to_table().slice(0, 5), path, mode="append", storage_options=storage_options(path))
    assert _lance(path).count_rows() == rows + 5
    assert offline.run_view(remote, user_activity).mode == "noop"
    assert _lance(path).count_rows() == rows


def test_materialize_from_s3_into_node_local_sqlite_and_redis(shops, tmp_path, redis_url):
    remote, local = shops["remote"], shops["local"]
    users = sorted(shops["frames"]["events"]["user_id"].unique()) + ["nobody"]
    node_local = Settings(home=remote.root, online_store=f"sqlite:///{tmp_path / 'node' / 'online.sqlite'}")
    sqlite_store = open_store(node_local, remote)
    redis_db = redis_url.rsplit("/", 1)[0] + "/6"
    import redis

    redis.Redis.from_url(redis_db).flushdb()
    redis_store = open_online_store(redis_db)
    local_store = open_online_store(local.online_sqlite)
    for store, layout in ((sqlite_store, remote), (redis_store, remote), (local_store, local)):
        assert materialize(layout, recommender_user, store, full=True).entities_written == len(users) - 1
    want = local_store.get_online_features(recommender_user, users).to_arrow()
    assert want.column("last_items").null_count == 1  # "nobody"
    for store in (sqlite_store, redis_store):
        assert store.get_online_features(recommender_user, users).to_arrow().equals(want)
    assert not storage.exists(remote.online_sqlite)  # nothing SQLite under the object-store root


def test_training_frame_reads_offline_tables_on_s3(shops, ray_session):
    remote = shops["remote"]
    events = shops["frames"]["events"]
    sample = events.sample(400, random_state=3)
    labels = pd.DataFrame({"label_id": np.arange(len(sample) + 1),
                           "user_id": [*sample["user_id"].astype(str), "stranger"],
                           TIMESTAMP_COLUMN: [*pd.to_datetime(sample["timestamp"], utc=True),
                                              pd.Timestamp("2030-01-01", tz="UTC")]})
    service = FeatureService("s3_frame", (user_activity,))
    got = get_training_frame(labels, service, remote).to_pandas().sort_values("label_id").reset_index(drop=True)
    table = _lance(offline.offline_table_path(remote, user_activity)).to_table()  # in write order
    ttl_us = int(user_activity.ttl.total_seconds() * 1e6)
    want = asof_join(labels, table, key="user_id", label_ts=TIMESTAMP_COLUMN, ttl_us=ttl_us,
                     feature_columns=list(user_activity.features), prefix_status="user_activity").to_pandas()
    assert len(got) == len(labels)
    lists = [n for n, t in user_activity.dtypes.items() if t.startswith("list<")]
    pd.testing.assert_frame_equal(got.drop(columns=lists), want.drop(columns=lists), check_dtype=False)
    as_lists = lambda column: [None if v is None or v is pd.NA else list(v) for v in column]  # noqa: E731
    for name in lists:
        assert as_lists(got[name]) == as_lists(want[name])
    assert (got["user_activity__status"] == "ok").sum() > 300
    assert got["user_activity__status"].iloc[-1] == "missing"


def test_feature_pipeline_on_s3_keeps_popular_items_in_redis(shops, redis_url):
    remote = shops["remote"]
    with pytest.raises(ConfigError, match="AIPLATFORM_ONLINE_STORE=redis://"):
        pipeline.run_feature_pipeline(remote, settings=Settings(home=remote.root))  # 'sqlite': refused first
    url = redis_url.rsplit("/", 1)[0] + "/7"
    import redis

    redis.Redis.from_url(url).flushdb()
    summary = pipeline.run_feature_pipeline(remote, settings=Settings(home=remote.root, online_store=url))
    assert storage.is_dir(remote.feature_table(item_popularity.table_name))  # the popularity view, on S3
    store = open_online_store(url)
    events = lake.read_events(remote)
    # the same list as the popularity view computed on the local root
    local = shops["local"]
    offline.run_view(local, item_popularity)
    reference = pipeline.popular_items(local, item_popularity, summary.as_of)
    assert summary.items == len(reference)
    stored = store.get_popular_items(pipeline.POPULAR_ITEMS_KEPT)
    assert [i for i, _ in stored] == reference["item_id"].head(len(stored)).tolist() and len(stored) > 0
    assert np.allclose([s for _, s in stored], reference["score"].head(len(stored)))
    assert pd.Timestamp(store.get_meta("as_of")) == summary.as_of
    assert summary.users == events["user_id"].nunique()  # an empty Redis: every user materialized


def test_push_appends_to_the_s3_event_log_and_updates_the_online_row(shops, tmp_path):
    # last in the module: it adds events to the S3 root's log
    remote, local, frames = shops["remote"], shops["local"], shops["frames"]
    stores = {}
    for name, layout in (("remote", remote), ("local", local)):
        stores[name] = open_online_store(str(tmp_path / f"{name}.sqlite"))
        materialize(layout, recommender_user, stores[name], full=True)
    user = str(frames["events"]["user_id"].iloc[0])
    item = str(frames["items"]["item_id"].iloc[5])
    start = pd.Timestamp(frames["events"]["timestamp"].max()) + pd.Timedelta(hours=1)
    new = [{"user_id": user, "item_id": item, "event_type": "purchase", "timestamp": start, "value": 5.0},
           {"user_id": "u-brand-new", "item_id": item, "event_type": "view",
            "timestamp": start + pd.Timedelta(minutes=1)}]
    results = {name: push(layout, new, [recommender_user], stores[name])
               for name, layout in (("remote", remote), ("local", local))}
    logged = results["remote"].eventlog_file
    assert logged.startswith(f"{remote.root}/eventlog/events-") and eventlog.files(remote) == [logged]
    assert results["remote"].entities_updated == {recommender_user.name: 2}
    mine = eventlog.read_events(remote, key="user_id", keys=["u-brand-new"])
    assert mine.num_rows == 1 and mine.column("item_id").to_pylist() == [item]
    got = stores["remote"].get_online_features(recommender_user, [user, "u-brand-new"])
    assert list(got.columns["last_items"][0])[0] == item and list(got.columns["purchased_items"][0])[0] == item
    assert got.status.tolist() == ["ok", "ok"]
    everyone = sorted(frames["events"]["user_id"].unique()) + ["u-brand-new"]
    assert stores["remote"].get_online_features(recommender_user, everyone).to_arrow().equals(
        stores["local"].get_online_features(recommender_user, everyone).to_arrow())
