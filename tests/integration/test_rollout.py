"""Zero-downtime rollouts: a running application moves to another model version in place, under
load, when its alias moves (`aiplatform models promote` / `rollback`) or when Serve's
``user_config`` pins a version; a version that cannot be served is refused and the old one stays."""

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from ray import serve

from aiplatform.core.storage import Layout
from aiplatform.features.online import SQLiteOnlineStore
from aiplatform.models.inputs import UserInputSpec
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval import build_item_index
from aiplatform.serving.app import build_app, start, stop
from apps.shop.features import recommender_user
from tests.integration.small_root import catalog, new_layout, save_random_two_tower, user_rows
from tests.feature_rows import write_user_rows
from tests.load import Answer, ClosedLoop

pytestmark = pytest.mark.integration

APP = "aiplatform-rollout"
N_ITEMS, N_USERS = 80, 40
INPUTS = UserInputSpec.from_service(recommender_user)
CLI = [sys.executable, "-m", "aiplatform.cli"]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("rollout"))


def make_root(root: Path) -> Layout:
    """Versions 1 and 2 (different weights, both indexed) with champion -> v1, version 3 without
    an index, and online features for ``N_USERS`` users."""
    layout = new_layout(root)
    items = catalog(N_ITEMS)
    registry = ModelRegistry(layout)
    for seed in (1, 2, 3):
        src = save_random_two_tower(items, root / f"artifact{seed}", seed=seed)
        mv = registry.register("two_tower", src, {}, {"seed": seed}, "")
        if seed < 3:
            build_item_index(layout.vectors, "two_tower", mv.version, mv.artifact_uri, items)
    registry.set_alias("two_tower", "champion", 1, reason="first")
    write_user_rows(layout, user_rows(N_USERS, N_ITEMS))
    SQLiteOnlineStore(layout.online_sqlite).write_popular_items([(f"item_{i:03d}", 1.0) for i in range(20)])
    return layout


@pytest.fixture(scope="module")
def base_url(ray_session, home):
    url = start(build_app(home.root, alias_poll_s=0.5, auth="off"), host="127.0.0.1", port=_free_port(), name=APP)
    yield url
    stop(APP)


def _cli(home: Layout, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIPLATFORM_")}
    result = subprocess.run([*CLI, *args, "--home", home.root], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def _versions_in_order(results: list[Answer]) -> list[int]:
    """The served versions with repeats collapsed: [1, 2, 1] for a promote then a rollback."""
    out: list[int] = []
    for version in (a.version for a in results):
        if version is not None and (not out or out[-1] != version):
            out.append(version)
    return out


def test_promote_and_rollback_under_load_lose_no_request(base_url, home):
    """c=8 closed loop for at least 30 s: promote v2, then roll back to v1. Every request gets
    a 200, the answers switch to v2 and back, and never flap between them."""
    started = time.monotonic()
    with ClosedLoop(base_url, concurrency=8) as load:
        time.sleep(5)
        promoted = _cli(home, "models", "promote", "two_tower", "2", "--reason", "rollout test")
        load.wait_until("answers from v2", lambda tail: all(a.version == 2 for a in tail))
        time.sleep(5)
        _cli(home, "models", "rollback", "two_tower", "--reason", "rollout test: back")
        load.wait_until("answers from v1", lambda tail: all(a.version == 1 for a in tail))
        time.sleep(max(0.0, 32 - (time.monotonic() - started)))
    statuses = load.statuses()
    assert len(statuses) > 100
    assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
    assert _versions_in_order(load.results) == [1, 2, 1]
    assert {a.variant for a in load.results} == {"champion"}
    assert "v2" in promoted.stdout
    history = ModelRegistry(home).alias_history("two_tower", "champion")
    assert [h["version"] for h in history] == [1, 2, 1]
    assert history[-1]["reason"] == "rollout test: back" and history[-1]["actor"]


def test_a_version_that_cannot_be_served_is_refused_and_the_old_one_stays(base_url, home):
    """The alias moved to a version without an index (bypassing promote, which builds it):
    replicas keep answering with v1 and /healthz says why; moving the alias back clears it."""
    registry = ModelRegistry(home)
    registry.set_alias("two_tower", "champion", 3, reason="no index")
    with httpx.Client(base_url=base_url, timeout=30) as client:
        deadline = time.monotonic() + 60
        while (health := client.get("/healthz").json())["switch_error"] is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "two_tower_v3" in health["switch_error"] and health["model"]["version"] == 1
        resp = client.post("/v1/recommendations", json={"user_id": "u1", "k": 3})
        assert resp.status_code == 200 and resp.json()["model"]["version"] == 1
        registry.set_alias("two_tower", "champion", 1, reason="back")
        deadline = time.monotonic() + 60
        while (health := client.get("/healthz").json())["switch_error"] is not None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health["switch_error"] is None and health["following"] == "champion"


def test_user_config_pins_a_version_in_place(base_url, home):
    """Serve's lightweight update: the same application with ``user_config: {version: 2}`` is
    reconfigured in place and answers with v2, variant "v2", no longer following the alias."""
    serve.run(build_app(home.root, alias_poll_s=0.5, options={"user_config": {"version": 2}}, auth="off"), name=APP, route_prefix="/")
    with httpx.Client(base_url=base_url, timeout=30) as client:
        body = client.post("/v1/recommendations", json={"user_id": "u2", "k": 3}).json()
        assert body["model"]["version"] == 2 and body["variant"] == "v2"
        health = client.get("/healthz").json()
        assert health["following"] is None and health["variant"] == "v2"


def test_overload_is_refused_at_once_with_retry_after(ray_session, home):
    """A bounded queue: beyond ``max_ongoing_requests`` + ``max_queued_requests`` a request gets
    503 with ``Retry-After`` at once (never a 500, never an unbounded wait); the rest succeed."""
    name = "aiplatform-overload"
    url = start(build_app(home.root, follow_alias=False,
                          options={"max_ongoing_requests": 1, "max_queued_requests": 1,
                                   "autoscaling_config": {"min_replicas": 1, "max_replicas": 1}}, auth="off"),
                host="127.0.0.1", port=_free_port(), name=name, route_prefix="/overload")

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            return await asyncio.gather(*(client.post("/v1/recommendations", json={"user_id": f"u{i}", "k": 5})
                                          for i in range(40)))
    try:
        responses = asyncio.run(burst())
    finally:
        stop(name)
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) > 0 and codes.count(200) > 0, codes
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 503)
