"""The batch feature pipeline on Ray Data against the pure-pandas reference.

Small generated shop -> lake -> ``run_feature_pipeline`` (the served feature service's views on
Ray Data into Lance, materialized into SQLite; the popular-items list). What serving reads
through ``get_online_features`` must equal what ``features.compute`` gives for the same events
in plain pandas at each user's last event: two independent implementations, one answer.
"""

import lance
import numpy as np
import pandas as pd
import pytest

from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.features import compute
from aiplatform.features import pipeline
from aiplatform.features.definitions import COUNT_COLUMNS
from aiplatform.core.settings import Settings
from aiplatform.features.pipeline import ITEM_VIEW
from aiplatform.features.online import open_online_store
from aiplatform.features.server import FeatureServer, open_store
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.integration


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


def test_summary_describes_the_run(shop_home, lake_events):
    layout, summary = shop_home
    assert summary.users == lake_events["user_id"].nunique()
    assert summary.items == lake_events["item_id"].nunique()
    assert summary.online_rows == summary.users
    # Default as_of: just after the last event, so every event is history.
    assert summary.as_of == lake_events["timestamp"].max() + pd.Timedelta(microseconds=1)
    assert set(summary.offline_versions) == {ITEM_VIEW}


def test_served_rows_equal_the_pandas_reference(shop_home, lake_events):
    # The service row of a user is its feature values at the user's last event: the counts
    # equal the legacy pandas function's one microsecond later, the item lists a plain pandas
    # reading of the declared windows.
    layout, _ = shop_home
    settings = Settings.load(home=layout.root)
    server = FeatureServer(open_store(settings, layout), pipeline.served_service(settings))
    last = lake_events.groupby("user_id")["timestamp"].max()
    users = last.index.astype(str).tolist()
    at_us = compute.as_micros(last) + 1
    expected = compute.context_at(lake_events, users, at_us)
    got = server.get(users + ["nobody"])
    assert list(got.status) == ["ok"] * len(users) + ["missing"]
    for i, uid in enumerate(users):
        mine = lake_events[lake_events["user_id"] == uid].sort_values("timestamp", kind="stable")
        recent = mine[mine["timestamp"] > last[uid] - pd.Timedelta(days=30)]
        bought = mine[(mine["event_type"] == "purchase") & (mine["timestamp"] > last[uid] - pd.Timedelta(days=90))]
        # most recent first, distinct (the declared last_n aggregations of apps/shop/features.py)
        assert list(got.columns["last_items"][i]) == list(pd.unique(recent["item_id"][::-1]))[:20], uid
        assert list(got.columns["purchased_items"][i]) == list(pd.unique(bought["item_id"][::-1]))[:50], uid
    counts = np.stack([np.asarray(got.columns[c][: len(users)], dtype=np.float32) for c in COUNT_COLUMNS], 1)
    assert np.array_equal(counts, expected[COUNT_COLUMNS].to_numpy(np.float32))
    # The data is rich enough for the comparison to mean something.
    assert expected["last_items"].map(len).max() > 5
    assert expected["purchased_items"].map(len).max() > 0
    assert expected["purchase_30d"].sum() > 0 and expected["view_1d"].sum() > 0


def test_popular_items_are_stored_in_popularity_order(shop_home, lake_events):
    layout, summary = shop_home
    store = open_online_store(layout.online_sqlite)
    reference = compute.popularity_scores(compute.item_counts_at(lake_events, summary.as_of))
    stored = store.get_popular_items(pipeline.POPULAR_ITEMS_KEPT)
    assert len(stored) == min(pipeline.POPULAR_ITEMS_KEPT, len(reference))
    assert [i for i, _ in stored] == reference["item_id"].head(len(stored)).tolist()
    assert np.allclose([s for _, s in stored], reference["score"].head(len(stored)))
    scores = [s for _, s in stored]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0
    assert store.get_popular_items(3) == stored[:3]


def test_training_examples_only_have_targets_in_range(shop_home, lake_events):
    layout, _ = shop_home
    ts = lake_events["timestamp"]
    start = ts.min() + pd.Timedelta(days=10)
    end = ts.max() - pd.Timedelta(days=15)
    types = ("click", "add_to_cart", "purchase")
    ds = pipeline.build_training_examples(pipeline.read_events(layout), start, end, types)
    got = ds.to_pandas()
    assert len(got) > 0
    got_ts = pd.to_datetime(got["timestamp"], utc=True)
    assert (got_ts < end).all() and (got_ts >= start).all()
    assert set(got["event_type"]) <= set(types)
    # Same examples as the pandas reference, user by user.
    ref = compute.training_examples(lake_events, pipeline._to_us(start), pipeline._to_us(end), types)
    assert len(got) == len(ref)
    key = ["user_id", "timestamp", "item_id", "event_type"]
    got = got.assign(timestamp=got_ts).sort_values(key).reset_index(drop=True)
    ref = ref.assign(timestamp=pd.to_datetime(ref["timestamp"], utc=True)).sort_values(key).reset_index(drop=True)
    as_rows = lambda f: [(str(u), pd.Timestamp(t), str(i), str(e)) for u, t, i, e in f[key].itertuples(index=False)]  # noqa: E731
    assert as_rows(got) == as_rows(ref)
    assert [list(x) for x in got["last_items"]] == [list(x) for x in ref["last_items"]]
    assert [list(x) for x in got["purchased_items"]] == [list(x) for x in ref["purchased_items"]]
    # No context reaches the end: every history count stops before its own target.
    assert np.array_equal(got[COUNT_COLUMNS].to_numpy(np.float32), ref[COUNT_COLUMNS].to_numpy(np.float32))


def test_offline_version_increments_on_a_second_run(shop_home, lake_events):
    # Runs last in this module: it moves the shared home's popularity to a later as_of.
    layout, first = shop_home
    path = layout.feature_table(ITEM_VIEW)
    before = lance.dataset(path).version
    assert before == first.offline_versions[ITEM_VIEW]
    later = lake_events["timestamp"].max() + pd.Timedelta(days=2)
    second = pipeline.run_feature_pipeline(layout, as_of=later, settings=Settings.load(home=layout.root))
    assert second.offline_versions[ITEM_VIEW] > first.offline_versions[ITEM_VIEW]
    assert second.users == 0  # nothing new happened: the service's rows were already current
    ds = lance.dataset(path)
    assert ds.version == second.offline_versions[ITEM_VIEW]
    # Overwritten, not appended: one row per item; the old version stays readable.
    assert ds.count_rows() == first.items
    old = lance.dataset(path, version=before).to_table().to_pandas()
    assert len(old) == first.items
    assert (pd.to_datetime(old["as_of"], utc=True) == first.as_of).all()
    new = ds.to_table().to_pandas()
    assert (pd.to_datetime(new["as_of"], utc=True) == later).all()
    assert pd.Timestamp(open_online_store(layout.online_sqlite).get_meta("as_of")) == later
