"""Serving through a Redis outage: a stopped (or hung) online store degrades answers, never into
5xx, and a restarted one is used again within seconds, without restarting anything.

A real redis-server is stopped and started again on the same port (a snapshot taken before it
stops is loaded when it starts, as a Redis with persistence would), or frozen with SIGSTOP (a
hung server: reads time out instead of failing at once). The application serves a storage root
whose online store is that Redis, under a closed loop of requests."""

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from aiplatform.core.settings import Settings
from aiplatform.features.online import open_online_store
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval import build_item_index
from aiplatform.retrieval.index import vector_table_name
from aiplatform.serving.app import RecommendationAPI, build_app, start, stop
from aiplatform.serving.pipeline import RecommendPipeline
from aiplatform.serving.resilience import ResilienceConfig
from aiplatform.serving.versions import VersionSwitcher, resolve_version
from tests.integration.small_root import catalog, new_layout, save_random_two_tower, user_rows, write_user_rows_to
from tests.redis_server import INSTALL_HINT, find_redis_server

from tests.load import ClosedLoop

pytestmark = pytest.mark.integration

APP = "aiplatform-degraded"
N_ITEMS, N_USERS, K = 60, 40, 5
POPULAR = [(f"item_{i:03d}", float(100 - i)) for i in range(0, 60, 2)]
ERROR_BUDGET = 0.01
"""Share of answers that may be other than 200 across an outage (measured: none)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RestartableRedis:
    """redis-server on one port that can be stopped and started again on that same port, or
    frozen (SIGSTOP) and thawed. ``stop`` snapshots the data first (SAVE), so the next start
    loads it: the rows are back, as with a Redis that persists."""

    def __init__(self, workdir: Path) -> None:
        self.binary = find_redis_server()
        if self.binary is None:
            pytest.fail(INSTALL_HINT, pytrace=False)
        self.workdir, self.port = workdir, _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None
        self.frozen = False

    def start(self) -> None:
        import redis

        log = open(self.workdir / "redis.log", "ab")
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--dbfilename", "dump.rdb"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir)
        log.close()
        deadline = time.monotonic() + 15
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}; see {self.workdir}/redis.log")
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except redis.ConnectionError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not answer PING within 15s")
            time.sleep(0.05)

    def stop(self) -> None:
        import redis

        if self.proc is None or self.proc.poll() is not None:
            return
        self.thaw()
        redis.Redis.from_url(self.url, socket_timeout=5).save()
        os.kill(self.proc.pid, signal.SIGKILL)  # a crash, after the snapshot
        self.proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None and self.proc.poll() is None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.frozen = False

    def ensure_running(self) -> None:
        self.thaw()
        if self.proc is None or self.proc.poll() is not None:
            self.start()


@pytest.fixture(scope="module")
def redis_proc(tmp_path_factory):
    server = RestartableRedis(tmp_path_factory.mktemp("redis-degraded"))
    server.start()
    yield server
    server.thaw()
    if server.proc is not None and server.proc.poll() is None:
        server.proc.terminate()
        server.proc.wait(10)


@pytest.fixture(autouse=True)
def _redis_running_again(redis_proc):
    """Whatever a test did to Redis, the next one finds it running."""
    yield
    redis_proc.ensure_running()


@pytest.fixture(scope="module")
def home(tmp_path_factory, redis_proc):
    """Model v1 (champion, retrieval order), its index, and in Redis: online features for
    ``N_USERS`` users and the popular items."""
    root = tmp_path_factory.mktemp("degraded")
    layout = new_layout(root)
    items = catalog(N_ITEMS)
    src = save_random_two_tower(items, root / "artifact")
    registry = ModelRegistry(layout)
    mv = registry.register("two_tower", src, {}, {}, "")
    registry.set_alias("two_tower", "champion", mv.version, reason="test")
    build_item_index(layout.vectors, "two_tower", mv.version, mv.artifact_uri, items)
    store = open_online_store(redis_proc.url)
    assert write_user_rows_to(store, user_rows(N_USERS, N_ITEMS)) == N_USERS
    store.write_popular_items(POPULAR)
    store.close()
    return {"layout": layout, "artifact": mv.artifact_uri, "version": mv.version}


@pytest.fixture(scope="module")
def base_url(ray_session, home, redis_proc):
    layout = home["layout"]
    settings = Settings.load(home=layout.root, online_store=redis_proc.url)
    url = start(build_app(layout.root, settings=settings, auth="off"), host="127.0.0.1", port=_free_port(), name=APP)
    yield url
    stop(APP)


def _health(url: str) -> dict:
    with httpx.Client(base_url=url, timeout=60) as client:
        resp = client.get("/healthz", params={"detail": "true"})
        assert resp.status_code == 200, resp.text
        return resp.json()


def _ride_out(base_url: str, begin: Callable[[], None], end: Callable[[], None]) -> dict:
    """A c=8 closed loop: normal answers, then ``begin`` (the outage) until answers are degraded
    and a while longer, then ``end`` until they are normal again. Returns what was seen."""
    with ClosedLoop(base_url, concurrency=8, n_users=N_USERS, k=K) as load:
        load.wait_until("answers for every user", lambda tail: len(load.results) >= 3 * N_USERS)
        normal = {a.user: a.items for a in load.results if a.status == 200 and a.fallback is None}
        before = len(load.results)
        begin()
        to_degraded = load.wait_until("degraded answers", lambda tail: all(a.fallback == "degraded" for a in tail))
        time.sleep(3)
        during = _health(base_url)
        with httpx.Client(base_url=base_url, timeout=60) as client:
            stranger = client.post("/v1/recommendations", json={"user_id": "never_seen", "k": K})
            event = client.post("/v1/events", json={"events": [{"user_id": "u1", "item_id": "item_001",
                                                                "event_type": "view",
                                                                "timestamp": "2026-11-28T12:00:00Z"}]})
        end()
        to_normal = load.wait_until("normal answers", lambda tail: all(a.fallback is None for a in tail))
        time.sleep(1)
    return {"results": load.results, "normal": normal, "before": before, "during": during, "stranger": stranger,
            "event": event, "to_degraded_s": to_degraded, "to_normal_s": to_normal, "after": _health(base_url)}


def _check_ride(seen: dict) -> None:
    results = seen["results"]
    statuses = [a.status for a in results]
    bad = len(statuses) - statuses.count(200)
    assert bad <= ERROR_BUDGET * len(statuses), {s: statuses.count(s) for s in set(statuses)}
    outage = results[seen["before"]:]
    degraded = [(a.user, a.items) for a in outage if a.fallback == "degraded"]
    assert len(degraded) > 50
    # a user answered before the outage gets that last good answer again, not an error
    assert all(items == seen["normal"][u] for u, items in degraded if u in seen["normal"])
    assert any(u in seen["normal"] for u, _ in degraded)
    during = seen["during"]
    assert during["status"] == "degraded"
    serving = during["serving"]
    assert serving["degraded"]["online_store"] > 0 and serving["degraded_from"]["last_good"] > 0
    assert serving["degraded"]["tower"] == serving["degraded"]["ranker"] == 0
    assert serving["breakers"]["online_store"]["state"] in ("open", "half_open")
    assert serving["breakers"]["online_store"]["rejections"] > 0  # answered from memory, not by waiting
    # a user this replica never answered: the popular items of its snapshot
    assert seen["stranger"].status_code == 200
    body = seen["stranger"].json()
    assert body["fallback"] == "degraded" and [(i["item_id"], i["score"]) for i in body["items"]] == POPULAR[:K]
    # events cannot update the online store: a 503 that says whether they were recorded
    assert seen["event"].status_code == 503, seen["event"].text
    assert "online store" in seen["event"].json()["message"] and "recorded" in seen["event"].json()
    assert int(seen["event"].headers["retry-after"]) >= 1
    after = seen["after"]
    assert after["status"] == "ok" and after["serving"]["breakers"]["online_store"]["state"] == "closed"
    print(f"answers: {len(results)}, non-200: {bad}, degraded: {len(degraded)}, "
          f"degraded after {seen['to_degraded_s']:.1f}s, normal again {seen['to_normal_s']:.1f}s after the end")


def test_a_stopped_redis_degrades_answers_and_a_restarted_one_is_used_again(base_url, redis_proc):
    seen = _ride_out(base_url, redis_proc.stop, redis_proc.start)
    _check_ride(seen)


def test_a_hung_redis_times_out_into_degraded_answers(base_url, redis_proc):
    """SIGSTOP: connections stay open and reads get no reply. The client's socket timeout turns
    them into failures (redis-py's defaults would hold each batch for about a minute)."""
    seen = _ride_out(base_url, redis_proc.freeze, redis_proc.thaw)
    _check_ride(seen)
    assert seen["during"]["serving"]["breakers"]["online_store"]["timeouts"] > 0


def test_posted_events_invalidate_the_users_cached_answer(base_url):
    """Within the cache's TTL a repeated request is a cache hit; a POST /v1/events for the user
    drops their entries in this replica, so the next answer leaves out what they just bought."""
    with httpx.Client(base_url=base_url, timeout=60) as client:
        def recommend() -> dict:
            resp = client.post("/v1/recommendations", json={"user_id": "u7", "k": 10})
            assert resp.status_code == 200, resp.text
            return resp.json()

        first = recommend()
        assert first["fallback"] is None
        hits = _health(base_url)["serving"]["caches"]["answers"]["hits"]
        assert recommend()["items"] == first["items"]
        answers = _health(base_url)["serving"]["caches"]["answers"]
        assert answers["hits"] > hits and answers["hit_rate"] is not None
        bought = first["items"][0]["item_id"]
        resp = client.post("/v1/events", json={"events": [{"user_id": "u7", "item_id": bought,
                                                           "event_type": "purchase",
                                                           "timestamp": "2026-11-28T12:00:00Z"}]})
        assert resp.status_code == 202, resp.text
        after = recommend()
        assert after["fallback"] is None and bought not in {i["item_id"] for i in after["items"]}
        assert _health(base_url)["serving"]["caches"]["answers"]["invalidations"] >= 1


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_pipeline_degrades_per_request_and_recovers_after_the_reset_time(home, redis_proc):
    """The pipeline itself, on a clock the test moves: last good answer or the popular snapshot
    while the store is down, the breaker open after two failures, one trial after the reset
    time, normal answers once the store is back."""
    layout = home["layout"]
    clock = Clock()
    pipeline = RecommendPipeline(layout.root, redis_proc.url, "apps.shop.features", "recommender_user",
                                 home["artifact"], layout.vectors, vector_table_name("two_tower", home["version"]),
                                 config=ResilienceConfig(failure_threshold=2, reset_after_s=5.0), timer=clock)
    good = pipeline.recommend([("u1", K), ("u2", K)])
    assert [a["fallback"] for a in good] == [None, None]
    clock.now += 10  # the feature rows and answers expire; the last good answers stay
    redis_proc.stop()
    first = pipeline.recommend([("u1", 3), ("nobody", K)])
    assert first[0] == {"items": good[0]["items"][:3], "fallback": "degraded", "ranked": False}
    assert first[1] == {"items": POPULAR[:K], "fallback": "degraded", "ranked": False}
    pipeline.recommend([("u2", K)])
    status = pipeline.serving_status()
    assert status["breakers"]["online_store"]["state"] == "open" and status["breakers"]["online_store"]["failures"] == 2
    assert pipeline.recommend([("u2", K)])[0]["items"] == good[1]["items"]  # rejected: from memory
    status = pipeline.serving_status()
    assert status["breakers"]["online_store"]["rejections"] >= 1
    assert status["degraded"] == {"online_store": 4, "tower": 0, "retriever": 0, "ranker": 0, "pipeline": 0}
    assert status["degraded_from"] == {"last_good": 3, "popular": 1} and status["healthy"] is False
    refused = pipeline.push([{"user_id": "u1", "item_id": "item_001", "event_type": "view",
                              "timestamp": datetime(2026, 11, 28, tzinfo=timezone.utc)}])
    assert refused["recorded"] is False and "online store is unavailable" in refused["unavailable"]
    redis_proc.start()
    assert pipeline.recommend([("u1", K)])[0]["fallback"] == "degraded"  # still open: no call yet
    clock.now += 5
    back = pipeline.recommend([("u1", K), ("u2", K), ("nobody", K)])
    assert [a["fallback"] for a in back] == [None, None, "popular"]
    assert back[0]["items"] == good[0]["items"] and back[1]["items"] == good[1]["items"]
    assert pipeline.serving_status()["healthy"] is True


def test_a_replica_started_while_redis_is_down_serves_degraded_and_passes_its_health_check(home, redis_proc):
    """A replica loads its version with Redis stopped: it starts, answers degraded (nothing to
    fall back on yet: no items), and Serve's health check passes (a restart would not bring
    Redis back); once Redis is back it answers normally. Only a replica without a loaded
    version fails the check."""
    layout = home["layout"]
    check_health = RecommendationAPI.func_or_class.check_health
    first = resolve_version(ModelRegistry(layout), layout, "apps.shop.features", "recommender_user", "two_tower")
    redis_proc.stop()
    switcher = VersionSwitcher(layout.root, redis_proc.url, "apps.shop.features", "recommender_user", "two_tower",
                               first, "champion")
    check_health(SimpleNamespace(versions=switcher))
    pipeline = switcher.current.pipeline
    assert pipeline.recommend([("u1", K)]) == [{"items": [], "fallback": "degraded", "ranked": False}]
    assert pipeline.serving_status()["popular_snapshot"] == 0
    redis_proc.start()
    answers = pipeline.recommend([("u1", K), ("nobody", K)])
    assert [a["fallback"] for a in answers] == [None, "popular"] and len(answers[0]["items"]) == K
    assert pipeline.serving_status()["popular_snapshot"] == len(POPULAR)
    with pytest.raises(RuntimeError, match="no model version is loaded"):
        check_health(SimpleNamespace(versions=SimpleNamespace(current=None)))
