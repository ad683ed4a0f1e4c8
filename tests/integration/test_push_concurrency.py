"""Two OS processes pushing events for the same users at once lose none of them in the online
row, on SQLite (one file both processes open) and on a real redis-server.

Each process is a fresh interpreter (multiprocessing's spawn) with its own store connection, as
two Serve replicas have. The final online rows must equal the rows the batch engine computes from
all events (the lake plus everything both pushed).

- the forced interleaving: A appends its event and reads the log, then pauses (a wrapper around
  the log read, in A only); B appends and pushes its own event meanwhile; A then writes. Without
  the entity lock A's row, computed before B's append, replaced B's complete one (the issue's lost
  event), every time;
- the free-for-all: both processes push 20 events each over the same 3 users as fast as they can,
  with times out of order (late events tie the row's timestamp, where the later write used to win).

No Ray: the push path is a library call; the replicas' HTTP layer adds nothing to the race.
"""

import multiprocessing
import os

import numpy as np
import pandas as pd
import pytest

from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, lake
from aiplatform.features.materialize import latest_service_rows
from aiplatform.features.online import open_online_store
from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.integration

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    base = tmp_path_factory.mktemp("push_concurrency")
    frames = generate(ShopSize(users=40, items=30, days=20), seed=9)
    return frames, write(frames, str(base / "in"))


@pytest.fixture(params=["sqlite", "redis"])
def target(request, shop, tmp_path):
    """A fresh storage root with the shop's lake, and the URI of an empty online store."""
    frames, paths = shop
    layout = Layout.at(str(tmp_path / "home"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    if request.param == "sqlite":
        uri = str(tmp_path / "online.sqlite")
    else:
        uri = request.getfixturevalue("redis_url")
        open_online_store(uri).client.flushdb()
    return layout, uri, frames


def _pusher(root: str, store_uri: str, events: list[dict], start, after_read, wait_for, pause_s: float,
            errors) -> None:
    """One replica: push ``events`` one by one. ``after_read``: set once this process has read
    the log for its first push, then pause ``pause_s`` (the forced interleaving); ``wait_for``:
    wait for that before pushing."""
    try:
        from aiplatform.core.storage import Layout
        from aiplatform.data import eventlog as log_module
        from aiplatform.features.online import open_online_store
        from aiplatform.features.push import push
        from apps.shop.features import recommender_user

        if after_read is not None:
            read = log_module.read_events

            def read_then_pause(*args, **kwargs):
                out = read(*args, **kwargs)
                if not after_read.is_set():
                    after_read.set()
                    import time

                    time.sleep(pause_s)
                return out

            log_module.read_events = read_then_pause
        layout, store = Layout.at(root), open_online_store(store_uri)
        start.wait(60)
        if wait_for is not None:
            assert wait_for.wait(60), "the other process never read the log"
        for event in events:
            push(layout, [event], [recommender_user], store, compact=False)
    except BaseException as exc:  # reported to the test: a child's traceback is not
        errors.put(f"{type(exc).__name__}: {exc}")
        raise


def _run(layout: Layout, uri: str, a: list[dict], b: list[dict], *, forced: bool) -> None:
    start, read, errors = SPAWN.Event(), SPAWN.Event(), SPAWN.Queue()
    procs = [SPAWN.Process(target=_pusher, args=(layout.root, uri, a, start, read if forced else None, None,
                                                 2.0, errors)),
             SPAWN.Process(target=_pusher, args=(layout.root, uri, b, start, None, read if forced else None,
                                                 0.0, errors))]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(180)
    problems = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert not problems and all(p.exitcode == 0 for p in procs), (problems, [p.exitcode for p in procs])


def _assert_rows_are_all_events(layout: Layout, uri: str, frames, users: list[str]) -> None:
    logged = eventlog.read_events(layout).to_pandas()  # the lake and everything both pushed
    want = latest_service_rows(recommender_user, logged).to_pandas().set_index("user_id").loc[users]
    got = open_online_store(uri).get_online_features(recommender_user, users).to_arrow().to_pandas()
    got = got.set_index("user_id").loc[users]
    assert (got["status"] == "ok").all()
    for col in recommender_user.stored_dtypes:
        for u in users:
            g, w = got.at[u, col], want.at[u, col]
            if isinstance(w, (list, np.ndarray)):
                assert list(g) == list(w), (u, col, list(g)[:5], list(w)[:5])
            else:
                assert g == w, (u, col, g, w)


def _event(user: str, item: str, kind: str, at: pd.Timestamp, event_id: str) -> dict:
    return {"user_id": user, "item_id": item, "event_type": kind, "timestamp": at.to_pydatetime(),
            "value": 3.0, "event_id": event_id}


def test_a_push_that_read_before_the_others_append_does_not_overwrite_its_event(target):
    layout, uri, frames = target
    user = str(frames["events"]["user_id"].value_counts().index[0])
    items = frames["items"]["item_id"].astype(str).tolist()
    end = pd.Timestamp(frames["events"]["timestamp"].max())
    a = [_event(user, items[1], "click", end + pd.Timedelta(hours=2), "from-a")]
    b = [_event(user, items[2], "purchase", end + pd.Timedelta(hours=1), "from-b")]

    _run(layout, uri, a, b, forced=True)

    assert sorted(eventlog.read_events(layout, key="user_id", keys=[user], since_us=int(end.value // 1000))
                  .column("event_id").to_pylist()) == ["from-a", "from-b"]
    _assert_rows_are_all_events(layout, uri, frames, [user])
    row = open_online_store(uri).get_online_features(recommender_user, [user]).to_dict(0)
    assert row["purchase_1d"] == 1 and items[2] in row["purchased_items"]  # B's event, kept


def test_two_processes_pushing_the_same_users_at_once_lose_nothing(target):
    layout, uri, frames = target
    users = [str(u) for u in frames["events"]["user_id"].value_counts().index[:3]]
    items = frames["items"]["item_id"].astype(str).tolist()
    end = pd.Timestamp(frames["events"]["timestamp"].max())
    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    kinds = ["view", "click", "add_to_cart", "purchase"]

    def batch(tag: str) -> list[dict]:
        # Times out of order, some before the user's latest event: ties at the row's timestamp.
        return [_event(users[i % 3], str(rng.choice(items)), str(rng.choice(kinds)),
                       end + pd.Timedelta(minutes=int(rng.integers(-120, 240))), f"{tag}-{i}") for i in range(20)]

    a, b = batch("a"), batch("b")
    _run(layout, uri, a, b, forced=False)

    logged = set(eventlog.read_events(layout, key="user_id", keys=users).column("event_id").to_pylist())
    assert {e["event_id"] for e in a + b} <= logged
    _assert_rows_are_all_events(layout, uri, frames, users)


def test_the_lock_is_released_after_each_push(target):
    """A later push for the same users never waits on a lock a finished push left behind."""
    layout, uri, frames = target
    user = str(frames["events"]["user_id"].iloc[0])
    end = pd.Timestamp(frames["events"]["timestamp"].max())
    _run(layout, uri, [_event(user, "x1", "view", end, "l1")], [_event(user, "x2", "view", end, "l2")],
         forced=False)
    from aiplatform.features.push import _claim_scope

    store = open_online_store(uri)
    assert store.try_lock([f"{_claim_scope(layout)}push:{recommender_user.name}:{user}"], 5) is not None

