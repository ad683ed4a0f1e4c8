"""The batch feature pipeline on Ray Data against plain-pandas references.

Small generated shop -> lake -> ``run_feature_pipeline`` (the served feature service's views and
the ``item_popularity`` view on Ray Data into Lance, the service materialized into SQLite, the
popular-items list from the popularity view). What serving reads through ``get_online_features``
must equal a plain pandas reading of the declared windows ``(t - w, t]`` at each user's last
event, and the popular-items list a pandas reading of each item's latest popularity row: two
independent implementations, one answer. The training frames (``service_frame``) are reads:
they never write to the offline store.
"""

import lance
import numpy as np
import pandas as pd
import pytest

from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, lake
from aiplatform.features import pipeline
from aiplatform.features.online import open_online_store
from aiplatform.features.server import FeatureServer, open_store
from apps.shop.features import item_popularity, recommender_user, user_activity, user_recent_events
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.integration

TYPES = ("view", "click", "add_to_cart", "purchase")


@pytest.fixture(scope="module")
def shop_home(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("feature_pipeline")
    paths = write(generate(ShopSize(users=150, items=80), seed=11), str(root / "data"))
    layout = Layout.at(str(root / "home"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    summary = pipeline.run_feature_pipeline(layout, settings=Settings.load(home=layout.root))
    return layout, summary


@pytest.fixture(scope="module")
def lake_events(shop_home) -> pd.DataFrame:
    layout, _ = shop_home
    return lake.read_events(layout)


def _window(frame: pd.DataFrame, at: pd.Timestamp, days: int) -> pd.DataFrame:
    """Rows of ``frame`` in the declared window ``(at - days, at]``."""
    return frame[(frame["timestamp"] > at - pd.Timedelta(days=days)) & (frame["timestamp"] <= at)]


def _popularity_reference(events: pd.DataFrame, as_of: pd.Timestamp) -> pd.DataFrame:
    """Each item's latest row at ``as_of`` (its last event, within the view's 30-day ttl), scored
    by its weighted 7-day counts, best first, ties by id: in plain pandas."""
    weights = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
    rows = []
    for item, ev in events[events["timestamp"] <= as_of].groupby("item_id"):
        last = ev["timestamp"].max()
        if as_of - last > pd.Timedelta(days=30):
            continue
        recent = _window(ev, last, 7)
        rows.append((item, sum(w * (recent["event_type"] == t).sum() for t, w in weights.items())))
    out = pd.DataFrame(rows, columns=["item_id", "score"])
    return out.sort_values(["score", "item_id"], ascending=[False, True], kind="stable").reset_index(drop=True)


def test_summary_describes_the_run(shop_home, lake_events):
    layout, summary = shop_home
    assert summary.users == lake_events["user_id"].nunique()
    assert summary.online_rows == summary.users
    # Default as_of: just after the last event, so every event is history.
    assert summary.as_of == lake_events["timestamp"].max() + pd.Timedelta(microseconds=1)
    assert summary.items == len(_popularity_reference(lake_events, summary.as_of)) > 0
    assert set(summary.offline_versions) == {user_activity.table_name, user_recent_events.table_name,
                                             item_popularity.table_name}
    for table, version in summary.offline_versions.items():
        assert lance.dataset(layout.feature_table(table)).version == version


def test_served_rows_equal_the_pandas_reference(shop_home, lake_events):
    # The service row of a user is its feature values at the user's last event: every declared
    # window (t - w, t] read in plain pandas.
    layout, _ = shop_home
    settings = Settings.load(home=layout.root)
    server = FeatureServer(open_store(settings, layout), pipeline.served_service(settings))
    last = lake_events.groupby("user_id")["timestamp"].max()
    users = last.index.astype(str).tolist()
    got = server.get(users + ["nobody"])
    assert list(got.status) == ["ok"] * len(users) + ["missing"]
    longest = bought_any = 0
    for i, uid in enumerate(users):
        mine = lake_events[lake_events["user_id"] == uid].sort_values("timestamp", kind="stable")
        recent = _window(mine, last[uid], 30)
        bought = _window(mine[mine["event_type"] == "purchase"], last[uid], 90)
        # most recent first, distinct (the declared last_n aggregations of apps/shop/features.py)
        assert list(got.columns["last_items"][i]) == list(pd.unique(recent["item_id"][::-1]))[:20], uid
        assert list(got.columns["purchased_items"][i]) == list(pd.unique(bought["item_id"][::-1]))[:50], uid
        events60 = _window(mine, last[uid], 60)[::-1][:100]  # the candidate ranker's aligned lists
        if events60["timestamp"].is_unique:  # equal timestamps are ordered by the engine's tie rule
            assert list(got.columns["recent_items"][i]) == events60["item_id"].tolist(), uid
            assert list(got.columns["recent_types"][i]) == events60["event_type"].tolist(), uid
            assert pd.to_datetime(list(got.columns["recent_times"][i]), utc=True).equals(
                pd.DatetimeIndex(pd.to_datetime(events60["timestamp"], utc=True))), uid
        for t in TYPES:
            for w in (1, 7, 30):
                want = int((_window(mine, last[uid], w)["event_type"] == t).sum())
                assert got.columns[f"{t}_{w}d"][i] == want, (uid, t, w)
        week = _window(mine, last[uid], 7)
        share = (week["event_type"] == "purchase").sum() / len(week)
        assert got.columns["purchase_share_7d"][i] == pytest.approx(share)
        longest, bought_any = max(longest, len(recent)), bought_any + len(bought)
    # The data is rich enough for the comparison to mean something.
    assert longest > 5 and bought_any > 0
    assert got.columns["purchase_30d"].sum() > 0 and got.columns["view_1d"].sum() > 0


def test_popular_items_are_the_popularity_views_latest_rows_by_weighted_7_day_counts(shop_home, lake_events):
    layout, summary = shop_home
    store = open_online_store(layout.online_sqlite)
    reference = _popularity_reference(lake_events, summary.as_of)
    stored = store.get_popular_items(pipeline.POPULAR_ITEMS_KEPT)
    assert len(stored) == min(pipeline.POPULAR_ITEMS_KEPT, len(reference))
    assert [i for i, _ in stored] == reference["item_id"].head(len(stored)).tolist()
    assert np.allclose([s for _, s in stored], reference["score"].head(len(stored)))
    scores = [s for _, s in stored]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert store.get_popular_items(3) == stored[:3]
    # an earlier as_of reads each item's latest row at that time, and items whose rows are older
    # than the view's ttl drop out
    early = lake_events["timestamp"].min() + pd.Timedelta(days=20)
    got = pipeline.popular_items(layout, item_popularity, early)
    want = _popularity_reference(lake_events, early)
    assert got["item_id"].tolist() == want["item_id"].tolist() and np.allclose(got["score"], want["score"])


def test_service_frame_equals_the_in_memory_frame_and_the_declared_windows(shop_home, lake_events):
    """Training frames: the point-in-time join over the offline store (Ray Data) and the same
    engine + join in memory give one answer, and every example sees only events before it."""
    layout, _ = shop_home
    end = lake_events["timestamp"].max() - pd.Timedelta(days=15)
    labels = pipeline.training_labels(lake_events, end, ("click", "add_to_cart", "purchase"))
    assert len(labels) > 0 and (labels["timestamp"] < end).all()
    got = pipeline.service_frame(layout, recommender_user, labels).to_pandas()
    ref = pipeline.frame_from_events(recommender_user, lake_events, labels)
    key = ["user_id", "timestamp", "item_id", "event_type"]
    got = got.sort_values(key, kind="stable").reset_index(drop=True)
    ref = ref.sort_values(key, kind="stable").reset_index(drop=True)
    assert len(got) == len(ref) == len(labels)
    assert got[key].astype(str).equals(ref[key].astype(str))
    for col in ("last_items", "purchased_items"):
        assert [list(x) for x in got[col]] == [list(x) for x in ref[col]]
    for col in [c for c, t in recommender_user.stored_dtypes.items() if not t.startswith("list")]:
        assert np.array_equal(got[col].to_numpy(np.float64), ref[col].to_numpy(np.float64)), col
    assert np.allclose(got["purchase_share_7d"], ref["purchase_share_7d"])
    # No context reaches the label itself: the features are those strictly before the event.
    checked = 0
    for row in got.sample(60, random_state=0).itertuples(index=False):
        mine = lake_events[(lake_events["user_id"] == row.user_id) & (lake_events["timestamp"] < row.timestamp)]
        mine = mine.sort_values("timestamp", kind="stable")
        if len(mine) == 0:
            assert list(row.last_items) == [] and row.view_30d == 0
            continue
        last = mine["timestamp"].max()  # the user's latest feature row is at their last event
        assert row.view_30d == int((_window(mine, last, 30)["event_type"] == "view").sum())
        recent = _window(mine, last, 30)
        if recent["timestamp"].is_unique:  # equal timestamps are ordered by the engine's tie rule
            assert list(row.last_items) == list(pd.unique(recent["item_id"][::-1]))[:20]
            checked += 1
    assert checked > 20


def test_training_frames_are_reads_that_never_write(shop_home, lake_events):
    """service_frame reads the offline tables as they are, even with new events waiting: the
    Lance versions do not move; update_offline (the explicit step) is what writes."""
    layout, _ = shop_home
    user = str(lake_events["user_id"].iloc[0])
    at = lake_events["timestamp"].max() + pd.Timedelta(hours=1)
    eventlog.append(layout, eventlog.validate_pushed([{"user_id": user, "item_id": "brand-new", "event_type": "view",
                                                       "timestamp": at.to_pydatetime()}]))
    tables = [layout.feature_table(v.table_name) for v in recommender_user.views]
    before = [lance.dataset(t).version for t in tables]
    labels = pd.DataFrame({"user_id": [user], "event_timestamp": [at + pd.Timedelta(seconds=1)]})
    for _ in range(2):
        frame = pipeline.service_frame(layout, recommender_user, labels).to_pandas()
        assert "brand-new" not in list(frame["last_items"][0])  # the new event is not in the tables yet
    assert [lance.dataset(t).version for t in tables] == before
    runs = pipeline.update_offline(layout, recommender_user)
    assert [r.mode for r in runs] == ["incremental"] * len(recommender_user.views)
    assert all(lance.dataset(t).version > v for t, v in zip(tables, before))  # the write moved them
    frame = pipeline.service_frame(layout, recommender_user, labels).to_pandas()
    assert list(frame["last_items"][0])[0] == "brand-new"


def test_a_second_run_with_nothing_new_writes_no_table_and_moves_the_popularity_date(shop_home, lake_events):
    # Runs last in this module: it moves the shared home's popular items to a later as_of.
    layout, first = shop_home
    pipeline.run_feature_pipeline(layout, settings=Settings.load(home=layout.root))  # takes in the pushed event
    settled = {t: lance.dataset(layout.feature_table(t)).version for t in first.offline_versions}
    later = lake_events["timestamp"].max() + pd.Timedelta(days=2)
    second = pipeline.run_feature_pipeline(layout, as_of=later, settings=Settings.load(home=layout.root))
    assert second.offline_versions == settled  # nothing new happened: no Lance version
    assert second.users == 0  # the service's rows were already current
    assert second.as_of == later
    store = open_online_store(layout.online_sqlite)
    assert pd.Timestamp(store.get_meta("as_of")) == later
    events = eventlog.read_events(layout).to_pandas()  # the lake and the pushed event
    assert len(events) == len(lake_events) + 1
    reference = _popularity_reference(events, later)
    stored = store.get_popular_items(5)
    assert [i for i, _ in stored] == reference["item_id"].head(5).tolist()
