"""The change feed end to end without a model: ``features.push`` publishes the users it rewrote,
and a ``ChangeFeedPoller`` (``serving.freshness``) drops them from a replica's caches; with real
stores (a SQLite file, a real redis-server) and real store failures (a dropped table, a Redis key
of the wrong type), never mocks."""

import gc
import threading
import time
from datetime import datetime, timezone

import pytest

from aiplatform.core.storage import Layout
from aiplatform.features.online import open_online_store
from aiplatform.features.push import push
from aiplatform.serving.freshness import ChangeFeedPoller
from aiplatform.serving.resilience import MISS, CircuitBreaker, CountingTTLCache, ResilienceConfig
from apps.shop.features import recommender_user

SERVICE = recommender_user.name


def _event(user: str, item: str = "item_001", event_id: str | None = None) -> dict:
    e = {"user_id": user, "item_id": item, "event_type": "purchase",
         "timestamp": datetime(2026, 11, 28, 12, tzinfo=timezone.utc)}
    if event_id:
        e["event_id"] = event_id
    return e


def _caches(n: int = 3) -> list[CountingTTLCache]:
    return [CountingTTLCache(100, 3600.0) for _ in range(n)]


def _poller(store, caches, **kw) -> ChangeFeedPoller:
    return ChangeFeedPoller(store, SERVICE, caches, CircuitBreaker("change_feed", 3, 2.0), **kw)


def _wait_for(what: str, check, timeout_s: float = 30.0) -> None:
    """Until ``check()`` holds (a deadline for a hung test only, not a speed assertion)."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)


@pytest.fixture()
def layout(tmp_path) -> Layout:
    layout = Layout.at(str(tmp_path / "home"))
    layout.ensure()
    return layout


def test_a_push_publishes_the_users_it_rewrote_and_a_repeat_publishes_nothing(layout, online_store):
    start = online_store.read_changes(SERVICE, None).cursor
    result = push(layout, [_event("u1", event_id="e1"), _event("u2", event_id="e2")], [recommender_user],
                  online_store)
    assert result.entities_updated == {SERVICE: 2}
    batch = online_store.read_changes(SERVICE, start)
    assert sorted(batch.entity_ids) == ["u1", "u2"] and batch.cursor == start + 1
    again = push(layout, [_event("u1", event_id="e1")], [recommender_user], online_store)
    assert again.duplicates == 1
    assert online_store.read_changes(SERVICE, batch.cursor).cursor == batch.cursor  # no entry


def test_a_push_whose_publish_fails_still_writes_the_rows(layout, tmp_path):
    """The feed is best effort: the rows are what matters (replicas' TTLs cover a lost notice)."""
    store = open_online_store(str(tmp_path / "online.sqlite"))
    store._conn().execute("DROP TABLE changes")
    result = push(layout, [_event("u1")], [recommender_user], store)
    assert result.events == 1 and result.entities_updated == {SERVICE: 1}
    assert store.get_online_features(recommender_user, ["u1"]).status == ["ok"]


def test_the_poller_drops_the_pushed_users_entries_and_nobody_elses(layout, online_store):
    features, answers, last_good = caches = _caches()
    for cache in caches:
        cache.put("u1", "old")
        cache.put("u2", "old")
    poller = _poller(online_store, caches)  # starts at the end: earlier pushes are not replayed
    assert poller.poll_once() == 0
    push(layout, [_event("u1")], [recommender_user], online_store)  # "another replica"
    assert poller.poll_once() == 3
    assert all(c.peek("u1") is MISS and c.peek("u2") == "old" for c in caches)
    stats = poller.stats()
    assert stats["remote_invalidations"] == 3 and stats["keys"] == 1 and stats["poll_errors"] == 0
    assert stats["resets"] == 0 and stats["polls"] == 2
    assert poller.poll_once() == 0  # read once only


def test_a_pruned_cursor_clears_the_whole_feature_and_answer_caches(online_store):
    features, answers, last_good = caches = _caches()
    for cache in caches:
        for user in ("a", "b", "c"):
            cache.put(user, "old")
    online_store.change_feed_keep = 2
    poller = _poller(online_store, caches, clear_on_reset=(features, answers))
    for i in range(4):  # the poller's next entry (1) is pruned: it cannot know whom it missed
        online_store.publish_changes(SERVICE, [f"x{i}"])
    assert poller.poll_once() == 6
    assert len(features) == len(answers) == 0
    assert len(last_good) == 3  # kept: a stand-in for failed answers, bounded by its own TTL
    assert poller.stats()["resets"] == 1 and poller.cursor == 4
    online_store.publish_changes(SERVICE, ["a"])  # and it follows the feed again from there
    assert poller.poll_once() == 1 and last_good.peek("a") is MISS


def test_a_failing_read_is_counted_and_the_poller_recovers(tmp_path):
    """A real store error (the feed's table dropped under it), then the table back: the feed
    restarted, so the poller resets instead of trusting its old cursor."""
    store = open_online_store(str(tmp_path / "online.sqlite"))
    store.publish_changes(SERVICE, ["u0"])
    caches = _caches(2)
    poller = _poller(store, caches)
    assert poller.cursor == 1
    store._conn().execute("DROP TABLE changes")
    caches[0].put("u1", "old")
    assert poller.poll_once() == 0
    assert poller.poll_once() == 0
    stats = poller.stats()
    assert stats["poll_errors"] == 2 and "no such table" in stats["last_error"]
    assert caches[0].peek("u1") == "old"
    store._conn().execute("CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, "
                          "ids TEXT NOT NULL)")
    assert poller.poll_once() == 1 and poller.stats()["resets"] == 1  # cursor 1 > the new end 0
    store.publish_changes(SERVICE, ["u2"])
    caches[1].put("u2", "old")
    assert poller.poll_once() == 1


def test_a_redis_error_opens_the_pollers_breaker_and_it_reads_again_after(redis_url):
    import redis

    store = open_online_store(redis_url)
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    clock = [0.0]
    breaker = CircuitBreaker("change_feed", 2, 5.0, timer=lambda: clock[0])
    poller = ChangeFeedPoller(store, SERVICE, _caches(1), breaker)
    client.set("aiplatform:changes", b"not a stream")  # every XRANGE now fails: WRONGTYPE
    for _ in range(4):
        poller.poll_once()
    stats = poller.stats()
    assert stats["poll_errors"] == 4 and "WRONGTYPE" in stats["last_error"] + str(breaker.stats())
    assert stats["breaker"] == "open" and breaker.stats()["failures"] == 2  # two reads, then rejected
    client.delete("aiplatform:changes")
    clock[0] += 5
    poller.poll_once()
    assert poller.stats()["breaker"] == "closed"


def test_a_store_down_at_start_begins_at_the_first_good_read_and_clears_what_was_cached(tmp_path):
    store = open_online_store(str(tmp_path / "online.sqlite"))
    store._conn().execute("DROP TABLE changes")
    caches = _caches(1)
    poller = _poller(store, caches)
    assert poller.cursor is None and poller.stats()["poll_errors"] == 1
    caches[0].put("u1", "cached while pushes were not followed")
    store._conn().execute("CREATE TABLE changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, "
                          "ids TEXT NOT NULL)")
    assert poller.poll_once() == 1 and poller.cursor == 0 and len(caches[0]) == 0


def test_the_thread_polls_on_its_own_and_stops_on_close(online_store):
    caches = _caches(1)
    poller = _poller(online_store, caches)
    poller.start(0.01)
    assert poller.running
    caches[0].put("u1", "old")
    online_store.publish_changes(SERVICE, ["u1"])
    _wait_for("the thread's invalidation", lambda: caches[0].peek("u1") is MISS)
    assert poller.stats()["remote_invalidations"] == 1
    poller.close()
    _wait_for("the thread to end", lambda: not poller.running)


def test_a_dropped_poller_ends_its_thread(online_store):
    """A pipeline dropped without close (an experiment's variant): the thread does not keep it."""
    poller = _poller(online_store, _caches(1))
    poller.start(0.01)
    thread = poller._thread
    del poller
    gc.collect()
    _wait_for("the orphaned thread to end", lambda: not thread.is_alive())
    assert thread not in threading.enumerate()


def test_the_poll_interval_comes_from_the_environment():
    assert ResilienceConfig().feed_poll_s == 0.25
    assert ResilienceConfig.from_env({"AIPLATFORM_SERVING_FEED_POLL_S": "0.1"}).feed_poll_s == 0.1
    with pytest.raises(Exception, match="AIPLATFORM_SERVING_FEED_POLL_S"):
        ResilienceConfig.from_env({"AIPLATFORM_SERVING_FEED_POLL_S": "often"})
