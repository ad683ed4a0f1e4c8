"""push(events): online rows after a push equal what the batch engine computes from the same events.

Both stores are real (a SQLite file and a redis-server on loopback); no Ray is needed because
the batch side here is the same engine the Ray pipeline runs per bucket.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate, write
from aiplatform.core.errors import DataValidationError
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, lake
from aiplatform.features.materialize import latest_service_rows
from aiplatform.features.online import open_online_store
from aiplatform.features.push import push


@pytest.fixture()
def shop(tmp_path):
    frames = generate(ShopSize(users=60, items=40, days=20), seed=3)
    paths = write(frames, str(tmp_path / "in"))
    layout = Layout.at(str(tmp_path / "home"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    return layout, frames


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return open_online_store(str(tmp_path / "online.sqlite"))
    return open_online_store(request.getfixturevalue("redis_url"))


def _batch_rows(events: pd.DataFrame) -> pa.Table:
    return latest_service_rows(recommender_user, events)


def _load_batch(store, events: pd.DataFrame) -> None:
    store.delete_service(recommender_user)
    store.write_features(recommender_user, _batch_rows(events))


def _new_events(frames, users: list[str], start: pd.Timestamp) -> pd.DataFrame:
    items = frames["items"]["item_id"].tolist()
    rows = []
    for i, user in enumerate(users):
        for j, kind in enumerate(("view", "click", "purchase", "view")):
            rows.append({"user_id": user, "item_id": items[(i * 7 + j) % len(items)], "event_type": kind,
                         "timestamp": start + pd.Timedelta(minutes=10 * i + j), "value": 9.5,
                         "event_id": f"pushed-{i}-{j}"})
    return pd.DataFrame(rows)


def _assert_rows_equal(got: pa.Table, want: pa.Table, users: list[str]) -> None:
    got_df = got.to_pandas().set_index("user_id").loc[users]
    want_df = want.to_pandas().set_index("user_id").loc[users]
    for col in recommender_user.stored_dtypes:  # every view's features, the recent-events lists too
        for u in users:
            g, w = got_df.at[u, col], want_df.at[u, col]
            if isinstance(w, (list, np.ndarray)):
                assert list(g) == list(w), (u, col)
            else:
                assert g == w, (u, col, g, w)
    assert (got_df["event_timestamp"] == want_df["event_timestamp"]).all()


def test_push_matches_batch_over_the_same_events(shop, store):
    layout, frames = shop
    events = frames["events"]
    _load_batch(store, events)
    end = pd.Timestamp(events["timestamp"].max())
    users = sorted(events["user_id"].unique())[:5] + ["brand-new-user"]
    new = _new_events(frames, users, end + pd.Timedelta(hours=1))

    result = push(layout, new, [recommender_user], store)

    assert result.events == len(new) and result.entities_updated["recommender_user"] == len(users)
    all_events = pd.concat([events, new], ignore_index=True)
    want = _batch_rows(all_events)
    got = store.get_online_features(recommender_user, users).to_arrow()
    assert set(got.column("status").to_pylist()) == {"ok"}
    _assert_rows_equal(got, want, users)
    assert got.to_pandas().set_index("user_id").at["brand-new-user", "purchase_1d"] == 1
    # An untouched user keeps the batch row.
    other = sorted(events["user_id"].unique())[10]
    before = _batch_rows(events).to_pandas().set_index("user_id").at[other, "view_30d"]
    assert store.get_online_features(recommender_user, [other]).to_dict(0)["view_30d"] == before


def test_late_event_inside_the_window_is_counted(shop, store):
    """An event older than the user's latest one still changes the latest row's windows."""
    layout, frames = shop
    events = frames["events"]
    _load_batch(store, events)
    user = events["user_id"].value_counts().index[0]
    latest = pd.Timestamp(events.loc[events["user_id"] == user, "timestamp"].max())
    late = _new_events(frames, [user], latest - pd.Timedelta(hours=2)).iloc[[2]]  # one purchase
    push(layout, late, [recommender_user], store)
    want = _batch_rows(pd.concat([events, late], ignore_index=True))
    got = store.get_online_features(recommender_user, [user]).to_arrow()
    _assert_rows_equal(got, want, [user])


def test_pushed_events_are_in_the_event_log_for_the_batch_pipeline(shop, store):
    layout, frames = shop
    events = frames["events"]
    new = _new_events(frames, ["u-log"], pd.Timestamp(events["timestamp"].max()) + pd.Timedelta(days=1))
    push(layout, new, [recommender_user], store)
    logged = eventlog.read_events(layout, key="user_id", keys=["u-log"])
    assert logged.num_rows == len(new)
    assert eventlog.read_events(layout).num_rows == len(events) + len(new)


def test_bad_event_is_refused_and_nothing_is_written(shop, store):
    layout, frames = shop
    _load_batch(store, frames["events"])
    before = store.get_online_features(recommender_user, [frames["events"]["user_id"].iloc[0]]).to_dict(0)
    with pytest.raises(DataValidationError, match="timestamp"):
        push(layout, [{"user_id": frames["events"]["user_id"].iloc[0], "item_id": "x", "event_type": "view"}],
             [recommender_user], store)
    assert eventlog.files(layout) == []
    after = store.get_online_features(recommender_user, [frames["events"]["user_id"].iloc[0]]).to_dict(0)
    assert after == before


def test_reimport_clears_the_event_log(shop, tmp_path, store):
    layout, frames = shop
    push(layout, _new_events(frames, ["u1x"], pd.Timestamp("2026-11-15", tz="UTC")), [recommender_user], store)
    assert eventlog.files(layout)
    paths = {p.stem: str(p) for p in Path(tmp_path / "in").glob("*.parquet")}
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    assert eventlog.files(layout) == []


def test_a_push_waits_for_the_lock_of_a_user_another_push_is_recomputing(shop, store):
    import threading

    from aiplatform.features.push import _claim_scope

    layout, frames = shop
    user = frames["events"]["user_id"].iloc[0]
    name = f"{_claim_scope(layout)}push:{recommender_user.name}:{user}"
    token = store.try_lock([name], 30)  # as another replica's push would hold it
    assert token is not None
    new = _new_events(frames, [user], pd.Timestamp(frames["events"]["timestamp"].max()) + pd.Timedelta(hours=1))
    done = threading.Event()
    thread = threading.Thread(target=lambda: (push(layout, new, [recommender_user], store), done.set()))
    thread.start()
    assert not done.wait(0.5)  # appended, but not recomputed while the other holds the user
    assert eventlog.read_events(layout, key="user_id", keys=[user]).num_rows > 0
    store.unlock([name], token)
    thread.join(30)
    assert done.is_set()
    want = _batch_rows(pd.concat([frames["events"], new], ignore_index=True))
    _assert_rows_equal(store.get_online_features(recommender_user, [user]).to_arrow(), want, [user])
    assert store.try_lock([name], 1) is not None  # and released it


def test_pushes_compact_the_log_in_the_background_and_the_rows_stay_exact(shop, store, monkeypatch):
    from aiplatform.data import eventlog_compact

    monkeypatch.setenv(eventlog_compact.COMPACT_FILES_ENV, "4")
    layout, frames = shop
    events = frames["events"]
    _load_batch(store, events)
    users = sorted(events["user_id"].unique())[:3]
    new = _new_events(frames, users, pd.Timestamp(events["timestamp"].max()) + pd.Timedelta(hours=1))
    for i in range(len(new)):
        push(layout, new.iloc[[i]], [recommender_user], store)
        eventlog_compact.wait_for_background()
    snap = eventlog.snapshot(layout)
    assert any(f.is_segment for f in snap.live) and len(snap.leaves) < 4
    assert len(snap.live) < len(new)
    logged = eventlog.read_events(layout, key="user_id", keys=users).column("event_id").drop_null().to_pylist()
    assert sorted(i for i in logged if i.startswith("pushed-")) == sorted(new["event_id"])  # each once
    want = _batch_rows(pd.concat([events, new], ignore_index=True))
    _assert_rows_equal(store.get_online_features(recommender_user, users).to_arrow(), want, users)
