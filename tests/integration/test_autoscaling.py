"""Autoscaling, exercised: the HTTP API's deployment adds a replica under load and drops it when
the load stops, and a deployment allowed to scale to zero does so when idle and answers the
next request by starting a replica (a cold start). Replica counts are read from Serve's own
status; the seconds each step took are printed, never asserted beyond generous bounds derived
from the configured delays (a loaded 2-core CI machine must not fail them)."""

import time

import httpx
import pytest
from ray import serve

from aiplatform.serving.app import build_app, start, stop
from tests.integration.test_rollout import _free_port, make_root
from tests.load import ClosedLoop

pytestmark = pytest.mark.integration

DEPLOYMENT = "RecommendationAPI"
# Serve's per-request override of the proxy's 10 s HTTP deadline: a cold start on a loaded CI
# machine may take longer, and what is tested is that the request is served, not how fast.
COLD_START_HEADERS = {"x-request-timeout-seconds": "120"}

LOAD_STEP = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2, "upscale_delay_s": 1,
             "downscale_delay_s": 5, "metrics_interval_s": 0.5, "look_back_period_s": 2}
TO_ZERO = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 1, "target_ongoing_requests": 2,
           "upscale_delay_s": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
           "metrics_interval_s": 0.5, "look_back_period_s": 2}


@pytest.fixture(scope="module")
def home(ray_session, tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("autoscaling"))


def replica_states(app: str) -> dict[str, int]:
    """Replicas of the app's ingress deployment by state (RUNNING, STARTING, STOPPING, …),
    states with none left out."""
    deployment = serve.status().applications[app].deployments[DEPLOYMENT]
    return {str(getattr(s, "value", s)): n for s, n in deployment.replica_states.items() if n}


def wait_for_replicas(app: str, n: int, timeout: float) -> float:
    """Until the deployment has exactly ``n`` replicas, all RUNNING (none starting or stopping);
    returns the seconds it took."""
    started = time.monotonic()
    states: dict[str, int] = {}
    while time.monotonic() - started < timeout:
        states = replica_states(app)
        if states.get("RUNNING", 0) == n and sum(states.values()) == n:
            return time.monotonic() - started
        time.sleep(0.2)
    raise AssertionError(f"{app}: not {n} RUNNING replicas within {timeout:.0f} s; replicas now {states}")


def test_a_load_step_adds_a_replica_and_its_end_removes_it(home):
    """c=8 closed loop against target_ongoing_requests=2: Serve goes to max_replicas=2 with
    every request answered; once the load stops it goes back to min_replicas=1."""
    app = "aiplatform-autoscale"
    url = start(build_app(home.root, follow_alias=False, experiments=False,
                          options={"autoscaling_config": LOAD_STEP, "max_ongoing_requests": 8}, auth="off"),
                host="127.0.0.1", port=_free_port(), name=app, route_prefix="/autoscale")
    try:
        wait_for_replicas(app, 1, 60)  # min_replicas before any load
        with ClosedLoop(url, concurrency=8) as load:
            load.wait_until("first answers", lambda tail: True, timeout=60, window=1)
            up_s = wait_for_replicas(app, 2, LOAD_STEP["upscale_delay_s"] + 60)
            answered = len(load.results)
            load.wait_until("answers with 2 replicas", lambda tail: len(load.results) >= answered + 40, window=1)
        statuses = load.statuses()
        assert statuses.count(200) == len(statuses), {s: statuses.count(s) for s in set(statuses)}
        assert {a.version for a in load.results} == {1} and all(a.items for a in load.results)
        down_s = wait_for_replicas(app, 1, LOAD_STEP["downscale_delay_s"] + 90)
        with httpx.Client(base_url=url, timeout=30) as client:
            assert client.post("/v1/recommendations", json={"user_id": "u3", "k": 3}).status_code == 200
        print(f"\nautoscaling: 1 -> 2 replicas {up_s:.1f} s after a c=8 load started "
              f"(upscale_delay_s={LOAD_STEP['upscale_delay_s']}), 2 -> 1 {down_s:.1f} s after it stopped "
              f"(downscale_delay_s={LOAD_STEP['downscale_delay_s']}); {len(statuses)} requests, all 200")
    finally:
        stop(app)


def test_an_idle_deployment_scales_to_zero_and_a_request_brings_a_replica_back(home):
    """min_replicas=0: one replica at deploy, none once idle past downscale_to_zero_delay_s; the
    next request waits in the proxy while Serve starts a replica, then gets its answer."""
    app = "aiplatform-autoscale-zero"
    url = start(build_app(home.root, follow_alias=False, experiments=False,
                          options={"autoscaling_config": TO_ZERO}, auth="off"),
                host="127.0.0.1", port=_free_port(), name=app, route_prefix="/autoscale-zero")
    try:
        idle_s = wait_for_replicas(app, 0, TO_ZERO["downscale_to_zero_delay_s"] + 90)
        with httpx.Client(base_url=url, timeout=150) as client:
            sent = time.monotonic()
            resp = client.post("/v1/recommendations", json={"user_id": "u5", "k": 4}, headers=COLD_START_HEADERS)
            cold_s = time.monotonic() - sent
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["model"]["version"] == 1 and len(body["items"]) == 4 and body["fallback"] is None
        wait_for_replicas(app, 1, 30)
        print(f"\nscale to zero: 1 -> 0 replicas {idle_s:.1f} s after deploy "
              f"(downscale_to_zero_delay_s={TO_ZERO['downscale_to_zero_delay_s']}); "
              f"cold start {cold_s:.2f} s from request sent to answer")
    finally:
        stop(app)
