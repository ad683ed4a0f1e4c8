"""A purchase shows on every serving replica, not only the one that took the event.

Two ``RecommendPipeline`` objects on one storage root and one online store stand for two Serve
replicas (what each replica of the ingress holds). A user's answer is cached in replica B; the
purchase is pushed through replica A; B drops its entries when its change-feed poller reads the
store's feed (``serving.freshness``), and its next answer is recomputed without the bought item.
Run on both online stores: a SQLite file and a real redis-server. No Ray is needed: the
pipeline is plain Python (the Serve path of ``POST /v1/events`` is in test_degraded.py)."""

import itertools
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from aiplatform.core.settings import Settings
from aiplatform.experiments.config import Experiment, Variant
from aiplatform.experiments.store import ExperimentStore
from aiplatform.features.online import open_online_store
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval import build_item_index
from aiplatform.retrieval.index import vector_table_name
from aiplatform.serving.app import build_app, start, stop
from aiplatform.serving.experiments import ExperimentRouter
from aiplatform.serving.pipeline import RecommendPipeline
from aiplatform.serving.resilience import ResilienceConfig
from aiplatform.serving.versions import VersionSwitcher, resolve_version
from tests.integration.small_root import catalog, new_layout, save_random_two_tower, user_rows, write_user_rows_to
from tests.redis_server import free_port, redis_server

pytestmark = pytest.mark.integration

N_ITEMS, N_USERS, K = 60, 20, 10
POPULAR = [(f"item_{i:03d}", float(100 - i)) for i in range(0, 60, 2)]
MANUAL = ResilienceConfig(feed_poll_s=0)
"""Replica B's settings where the test calls its poller itself (no thread: exact counts)."""


@contextmanager
def _root(base: Path, kind: str) -> Iterator[dict]:
    """A served version (random two-tower weights: answers are deterministic, which is all
    these tests need; v2 is the same model), its item index, and in the online store (``kind``)
    ``N_USERS`` users and the popular items."""
    layout = new_layout(base)
    items = catalog(N_ITEMS)
    src = save_random_two_tower(items, base / "artifact")
    registry = ModelRegistry(layout)
    for _ in range(2):  # v2: the version a switch moves to
        mv = registry.register("two_tower", src, {}, {}, "")
        build_item_index(layout.vectors, "two_tower", mv.version, mv.artifact_uri, items)
    registry.set_alias("two_tower", "champion", 1, reason="test")
    frame = user_rows(N_USERS, N_ITEMS, count=1)

    def fill(uri: str) -> dict:
        store = open_online_store(uri)
        assert write_user_rows_to(store, frame) == N_USERS
        store.write_popular_items(POPULAR)
        store.close()
        return {"layout": layout, "store": uri, "kind": kind,
                "artifact": registry.get("two_tower", 1).artifact_uri}

    if kind == "sqlite":
        yield fill(f"sqlite:///{layout.online_sqlite}")
    else:
        (base / "redis").mkdir()
        with redis_server(base / "redis") as url:  # its own server: no other test flushes it
            yield fill(url)


@pytest.fixture(scope="module", params=["sqlite", "redis"])
def root(request, tmp_path_factory):
    with _root(tmp_path_factory.mktemp(f"freshness-{request.param}"), request.param) as made:
        yield made


def _replica(root: dict, config: ResilienceConfig = MANUAL, version: int = 1) -> RecommendPipeline:
    layout = root["layout"]
    return RecommendPipeline(layout.root, root["store"], "apps.shop.features", "recommender_user",
                             root["artifact"], layout.vectors, vector_table_name("two_tower", version),
                             config=config)


def _purchase(user: str, item: str) -> dict:
    # later than the stored rows (2024) and than any earlier test's purchase: newer rows win
    return {"user_id": user, "item_id": item, "event_type": "purchase",
            "timestamp": datetime.now(timezone.utc).replace(microsecond=0)}


def _items(answer: dict) -> list[str]:
    return [item for item, _ in answer["items"]]


def _feed(pipeline: RecommendPipeline) -> dict:
    return pipeline.serving_status()["caches"]["feed"]


def test_a_purchase_through_one_replica_changes_the_next_answer_of_another(root):
    a, b = _replica(root), _replica(root)
    try:
        first = b.recommend([("u7", K)])[0]
        assert first["fallback"] is None and len(first["items"]) == K
        assert b.recommend([("u7", K)])[0] == first  # cached in B
        hits = b.answer_cache.stats()["hits"]
        assert hits >= 1
        bought = _items(first)[0]
        pushed = a.push([_purchase("u7", bought)])
        assert pushed["accepted"] == 1 and pushed["entities_updated"] == {"recommender_user": 1}
        stale = b.recommend([("u7", K)])[0]  # what B would serve until its TTLs ran out
        assert stale == first and b.answer_cache.stats()["hits"] == hits + 1
        dropped = b.feed.poll_once()
        assert dropped >= 2  # u7's feature row and answer (and its last good answer)
        misses = b.answer_cache.stats()["misses"]
        after = b.recommend([("u7", K)])[0]
        assert b.answer_cache.stats()["misses"] == misses + 1  # recomputed, from the new row
        assert after["fallback"] is None and bought not in _items(after) and after != first
        assert after == a.recommend([("u7", K)])[0]  # both replicas now answer alike
        feed = _feed(b)
        assert feed["remote_invalidations"] == dropped and feed["poll_errors"] == 0 and feed["keys"] == 1
        assert b.recommend([("u8", K)])[0]["fallback"] is None  # others untouched, still served
    finally:
        a.close()
        b.close()


def test_the_pollers_thread_drops_the_entries_without_anyone_calling_it(root):
    a = _replica(root)
    b = _replica(root, ResilienceConfig(feed_poll_s=0.02))
    try:
        assert _feed(b)["running"] is True
        first = b.recommend([("u3", K)])[0]
        bought = _items(first)[0]
        before = _feed(b)["remote_invalidations"]
        assert a.push([_purchase("u3", bought)])["accepted"] == 1
        deadline = time.monotonic() + 60  # a deadline for a hung thread, not a speed assertion
        while _feed(b)["remote_invalidations"] == before:
            assert time.monotonic() < deadline, _feed(b)
            time.sleep(0.01)
        after = b.recommend([("u3", K)])[0]
        assert after["fallback"] is None and bought not in _items(after)
    finally:
        a.close()
        b.close()
    assert b.serving_status()["caches"]["feed"]["running"] in (True, False)  # closing never raises


def test_a_cursor_behind_the_pruned_feed_clears_the_replicas_caches(root):
    a, b = _replica(root), _replica(root)
    try:
        b.recommend([("u1", K), ("u2", K), ("u4", K)])
        assert len(b.answer_cache) == 3 and len(b.feature_cache) == 3
        a.store.change_feed_keep = 1  # the feed keeps one entry: B's next one is pruned
        a.push([_purchase("u5", "item_001")])
        a.push([_purchase("u6", "item_002")])
        b.feed.poll_once()
        assert len(b.answer_cache) == 0 and len(b.feature_cache) == 0  # users it was never told about
        feed = _feed(b)
        assert feed["resets"] == 1 and feed["remote_invalidations"] >= 6
        misses = b.feature_cache.stats()["misses"]
        assert b.recommend([("u1", K)])[0]["fallback"] is None
        assert b.feature_cache.stats()["misses"] == misses + 1  # read from the store again
        a.push([_purchase("u1", "item_003")])  # and B follows the feed again
        assert b.feed.poll_once() >= 1 and _feed(b)["resets"] == 1
    finally:
        a.store.change_feed_keep = 10_000
        a.close()
        b.close()


def _break_feed(root: dict) -> None:
    """A real store error on the feed only (the rows are still readable)."""
    if root["kind"] == "sqlite":
        conn = sqlite3.connect(root["layout"].online_sqlite, isolation_level=None)
        conn.execute("DROP TABLE changes")
        conn.close()
    else:
        import redis

        client = redis.Redis.from_url(root["store"])
        client.delete("aiplatform:changes")
        client.set("aiplatform:changes", b"not a stream")


def _repair_feed(root: dict) -> None:
    if root["kind"] == "sqlite":
        open_online_store(root["layout"].online_sqlite).close()  # the schema again
    else:
        import redis

        redis.Redis.from_url(root["store"]).delete("aiplatform:changes")


def test_a_failing_feed_is_counted_and_the_replica_still_answers(root):
    b = _replica(root)
    try:
        _break_feed(root)
        assert b.feed.poll_once() == 0 and b.feed.poll_once() == 0
        feed = _feed(b)
        assert feed["poll_errors"] == 2 and feed["last_error"]
        answer = b.recommend([("u9", K)])[0]
        assert answer["fallback"] is None and len(answer["items"]) == K
        status = b.serving_status()
        assert status["healthy"] is True and status["breakers"]["online_store"]["failures"] == 0
        pushed = b.push([_purchase("u9", _items(answer)[0])])  # a push whose publish fails still lands
        assert pushed["accepted"] == 1 and pushed["entities_updated"] == {"recommender_user": 1}
        assert _items(answer)[0] not in _items(b.recommend([("u9", K)])[0])
    finally:
        _repair_feed(root)
        b.close()
    later = _replica(root)  # the feed works again for new readers
    try:
        assert later.feed.cursor is not None and _feed(later)["poll_errors"] == 0
    finally:
        later.close()


def test_a_version_switch_stops_the_replaced_pipelines_poller(root):
    layout = root["layout"]
    registry = ModelRegistry(layout)
    first = resolve_version(registry, layout, "apps.shop.features", "recommender_user", "two_tower", version=1)
    switcher = VersionSwitcher(layout.root, root["store"], "apps.shop.features", "recommender_user", "two_tower",
                               first, "champion", resilience=ResilienceConfig(feed_poll_s=0.02))
    old = switcher.current.pipeline
    assert old.feed.running
    assert switcher.switch(version=2) is True
    new = switcher.current.pipeline
    deadline = time.monotonic() + 60
    while old.feed.running:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert new.feed.running
    assert old.recommend([("u2", K)])[0]["fallback"] is None  # a request holding it still finishes
    new.close()


def test_user_config_pins_a_version_follows_an_alias_again_and_refuses_an_unknown_key(root):
    """What Serve's ``reconfigure`` hands the switcher: ``version`` pins it (and stops following
    the alias), ``alias`` switches back and follows again, an unknown key changes nothing."""
    layout = root["layout"]
    registry = ModelRegistry(layout)
    first = resolve_version(registry, layout, "apps.shop.features", "recommender_user", "two_tower", version=1)
    switcher = VersionSwitcher(layout.root, root["store"], "apps.shop.features", "recommender_user", "two_tower",
                               first, "champion", resilience=MANUAL)
    try:
        switcher.follow("champion", 3600)
        switcher.apply_user_config({"version": 2})
        assert (switcher.current.version.version, switcher.current.variant, switcher.following) == (2, "v2", None)
        with pytest.raises(ValueError, match="unknown keys \\['versoin'\\]; use version, alias"):
            switcher.apply_user_config({"versoin": 1})
        assert switcher.current.version.version == 2
        switcher.apply_user_config({"alias": "champion", "alias_poll_s": 3600})
        assert (switcher.current.version.version, switcher.current.variant, switcher.following) == \
            (1, "champion", "champion")
    finally:
        switcher.unfollow()
        switcher.current.pipeline.close()


def test_an_experiment_variant_on_the_served_version_keeps_its_feed_after_the_switcher_moves_on(root):
    """An experiment's variant pinned to the version the replica serves shares the switcher's
    pipeline; when the switcher moves to another version, that variant still answers from
    the shared pipeline, so its change feed must keep running until the router lets go too."""
    layout = root["layout"]
    registry = ModelRegistry(layout)
    first = resolve_version(registry, layout, "apps.shop.features", "recommender_user", "two_tower", version=1)
    switcher = VersionSwitcher(layout.root, root["store"], "apps.shop.features", "recommender_user", "two_tower",
                               first, "champion", resilience=ResilienceConfig(feed_poll_s=0.02))
    shared = switcher.current.pipeline
    store = ExperimentStore(layout)
    store.put(Experiment(name="pinned", variants=[Variant(name="a", version=1, weight=1),
                                                  Variant(name="b", version=2, weight=1)]))
    router = ExperimentRouter(switcher, poll_s=3600)  # refreshed by hand below
    try:
        router.refresh()
        assert router.current is not None and router.current.variants["a"].pipeline is shared
        assert switcher.switch(version=2) is True
        router.refresh()  # nothing moved for the experiment: variant a keeps the shared pipeline
        assert router.current.variants["a"].pipeline is shared
        time.sleep(0.2)  # ten polls: a stopped feed would have stopped by now
        assert shared.feed.running  # before the fix the switcher's close stopped it
        store.stop("pinned")
        router.refresh()  # the experiment ended: the router lets go, the last holder
        deadline = time.monotonic() + 60
        while shared.feed.running:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert switcher.current.pipeline.feed.running  # the switcher's own v2 pipeline is untouched
    finally:
        router.close()
        switcher.current.pipeline.close()


# ---- through Serve: two replicas of the application ------------------------------------------
APP = "aiplatform-freshness"
LONG_TTL = {"AIPLATFORM_SERVING_FEATURE_TTL_S": "600", "AIPLATFORM_SERVING_ANSWER_TTL_S": "600"}
"""Caches that would hold a stale answer for ten minutes: only the change feed can drop it."""


@pytest.fixture(scope="module")
def two_replicas(ray_session, tmp_path_factory):
    """The application with two replicas on a Redis online store, its caches' TTLs at 600 s
    (read where the application is built, like every ``AIPLATFORM_SERVING_*`` setting)."""
    with _root(tmp_path_factory.mktemp("freshness-serve"), "redis") as made:
        layout = made["layout"]
        saved = {k: os.environ.get(k) for k in LONG_TTL}
        os.environ.update(LONG_TTL)
        try:
            settings = Settings.load(home=layout.root, online_store=made["store"])
            options = {"autoscaling_config": {"min_replicas": 2, "max_replicas": 2, "target_ongoing_requests": 32}}
            app = build_app(layout.root, settings=settings, follow_alias=False, experiments=False,
                            options=options, auth="off")
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        url = start(app, host="127.0.0.1", port=free_port(), name=APP, route_prefix="/freshness")
        yield url
        stop(APP)


def test_through_serve_every_replica_stops_recommending_what_was_just_bought(two_replicas):
    """Both replicas cache u11's answer (asked until ``/healthz?detail=true``, which names the
    replica that answered, has shown a cached answer in two replicas: the ingress may take a
    moment to route to the second), one of them takes the purchase, and from then on every
    answer, whichever replica gives it, leaves the item out: without the feed the other replica
    would serve its cached answer for 600 s and the loop below would run into its deadline."""
    with httpx.Client(base_url=two_replicas, timeout=60) as client:
        def recommend() -> list[str]:
            resp = client.post("/v1/recommendations", json={"user_id": "u11", "k": K})
            assert resp.status_code == 200, resp.text
            assert resp.json()["fallback"] is None
            return [i["item_id"] for i in resp.json()["items"]]

        def replica() -> dict:
            resp = client.get("/healthz", params={"detail": "true"})
            assert resp.status_code == 200, resp.text
            serving = resp.json()["serving"]
            assert serving["replica"], "/healthz?detail=true names no replica"
            return serving

        first = recommend()
        cached: set[str] = set()
        deadline = time.monotonic() + 120  # for a second replica never routed to, not a speed assertion
        for ask in itertools.cycle([1, 2]):  # HAProxy balances round robin: vary which one /healthz meets
            assert time.monotonic() < deadline, f"u11's answer is cached in {sorted(cached)} only"
            if len(cached) == 2:
                break
            assert all(recommend() == first for _ in range(ask))
            serving = replica()
            if serving["caches"]["answers"]["size"] > 0:
                cached.add(serving["replica"])
        bought = first[0]
        resp = client.post("/v1/events", json={"events": [{
            "user_id": "u11", "item_id": bought, "event_type": "purchase",
            "timestamp": datetime.now(timezone.utc).replace(microsecond=0).isoformat()}]})
        assert resp.status_code == 202, resp.text
        fresh = 0
        deadline = time.monotonic() + 60  # a deadline for a broken feed, not a speed assertion
        while fresh < 30:
            assert time.monotonic() < deadline, "a replica kept answering with the bought item"
            fresh = fresh + 1 if bought not in recommend() else 0
        feeds: dict[str, dict] = {}
        deadline = time.monotonic() + 60
        for ask in itertools.cycle([0, 1]):
            assert time.monotonic() < deadline, f"/healthz answered from {sorted(feeds)} only"
            if len(feeds) == 2:
                break
            assert all(bought not in recommend() for _ in range(ask))
            serving = replica()
            feeds[serving["replica"]] = serving["caches"]["feed"]
        assert set(feeds) == cached
        assert all(f["poll_errors"] == 0 and f["running"] for f in feeds.values())
        # the replica that did not take the purchase dropped u11's row and answer when it read the feed
        assert max(f["remote_invalidations"] for f in feeds.values()) >= 2
