"""Autoscaling, measured: how long does a request wait when no replica is running?

A deployment allowed to scale to zero (``min_replicas: 0``) saves a replica's memory and CPU
while idle, and the next request pays for it: Serve's proxy holds the request, the controller
starts a replica (a Ray worker process that imports the serving code and loads the model version:
user tower, item index, candidate ranker), and only then is it answered. The goal: the first
answer within 5 s.

Contenders, on the same storage root and model version:

- ``serve from zero``: the application ``aiplatform serve`` runs (``serving.app.build_app`` +
  ``start`` on 127.0.0.1, a free port) with ``autoscaling_config`` min 0 / max 1, on a local Ray
  started by this process (``core.runtime.ensure_ray``; Ray and Serve's controller and proxy are
  up, as in production: only the replica is gone). Each round waits until Serve reports 0
  replicas, then times one ``POST /v1/recommendations`` from sent to its 200 answer, on the
  keep-alive connection of the requests before (as a client's connection pool would send it:
  with HAProxy the worst case, since that connection may still be served by the HAProxy process
  that predates the scale-down, whose server list still names the stopped replica). The
  request carries ``x-request-timeout-seconds`` so that a start slower than the proxy's 10 s HTTP
  deadline is measured rather than cut off; such rounds are counted (a client without the
  header would have had a 408). While the request waits, Serve's status is polled to split the
  time into the scaling decision (request sent -> a replica exists) and the replica's start
  (-> RUNNING).
- ``plain process``: benchmarks/serving_plain.py (the same ``RecommendPipeline`` in one uvicorn
  process, no Ray), spawned as benchmarks/serving.py spawns it; timed from the spawn to its
  first 200 answer (requests retried every 50 ms while it starts). Measured first, before Ray
  runs.

Usage: python benchmarks/cold_start.py --home ROOT [--n 5] [--user USER_ID]
ROOT: a storage root with a champion and its index and online store (the reference is
``aiplatform quickstart --no-wait --home ROOT``; the small root of the integration tests works
too). Saves benchmarks/results/cold_start.json.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Self

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from common import free_port, print_table, save

# This process forks only to exec the plain peer, after lance is loaded (the lake read that
# picks the user): lance's and lancedb's fork-safety warnings are about children that go on
# running Python, which these do not.
warnings.filterwarnings("ignore", message="lance is not fork-safe")
warnings.filterwarnings("ignore", message="lancedb fork support")

APP = "cold-start-bench"
DEPLOYMENT = "RecommendationAPI"
GOAL_S = 5.0
PROXY_DEADLINE_S = 10.0  # serving.app.REQUEST_TIMEOUT_S: what a client without the header gets
WAIT_HEADERS = {"x-request-timeout-seconds": "300"}
TO_ZERO = {"min_replicas": 0, "max_replicas": 1, "initial_replicas": 1, "target_ongoing_requests": 2,
           "upscale_delay_s": 0, "downscale_delay_s": 2, "downscale_to_zero_delay_s": 2,
           "metrics_interval_s": 0.5, "look_back_period_s": 2}


def pick_user(home: str) -> str:
    """A user with an online feature row, so that the cold request runs the whole pipeline:
    the first user of the event lake (a quickstart root), else u0 (the test roots)."""
    from aiplatform.core.settings import Settings
    from aiplatform.core.storage import Layout
    from aiplatform.data import lake

    try:
        users = lake.read_events(Layout.open(Settings.load(home=home).home), columns=["user_id"])["user_id"]
        return str(min(set(users.astype(str))))
    except FileNotFoundError:  # no event lake (a test root)
        return "u0"


def recommend(client: httpx.Client, user: str, **kw) -> httpx.Response:
    return client.post("/v1/recommendations", json={"user_id": user, "k": 10}, **kw)


def plain_cold_starts(home: str, user: str, n: int, log_dir: Path) -> list[dict]:
    """Spawn the one-process peer ``n`` times; each time, seconds from spawn to its first 200."""
    rounds = []
    for i in range(n):
        port = free_port()
        env = dict(os.environ, AIPLATFORM_HOME=home, PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "uvicorn", "benchmarks.serving_plain:app", "--host", "127.0.0.1",
               "--port", str(port), "--workers", "1", "--log-level", "warning", "--no-access-log"]
        log_path = log_dir / f"plain_{i}.log"
        with open(log_path, "w") as log:
            started = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
            try:
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
                    while True:
                        if proc.poll() is not None:
                            raise RuntimeError(f"plain process exited with {proc.returncode}: see {log_path}")
                        if time.perf_counter() - started > 300:
                            raise RuntimeError(f"plain process did not answer within 300 s: see {log_path}")
                        try:
                            resp = recommend(client, user)
                            if resp.status_code == 200:
                                break
                        except httpx.TransportError:
                            pass
                        time.sleep(0.05)
                seconds = time.perf_counter() - started
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        rounds.append({"seconds": round(seconds, 3), "fallback": resp.json()["fallback"]})
        print(f"   plain process #{i + 1}: first answer {seconds:.2f} s after spawn", flush=True)
    return rounds


def replica_states() -> dict[str, int]:
    from ray import serve

    deployment = serve.status().applications[APP].deployments[DEPLOYMENT]
    return {str(getattr(s, "value", s)): c for s, c in deployment.replica_states.items() if c}


def wait_for_replicas(count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = replica_states()
        if states.get("RUNNING", 0) == count and sum(states.values()) == count:
            return
        time.sleep(0.2)
    raise RuntimeError(f"not {count} RUNNING replicas within {timeout:.0f} s: {replica_states()}")


class StatePoller:
    """While a cold request waits: when a replica first exists (any state) and is first RUNNING,
    in seconds from ``started``."""

    def __init__(self, started: float) -> None:
        self.started, self.exists_s, self.running_s = started, None, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set() and self.running_s is None:
            states = replica_states()
            now = time.perf_counter() - self.started
            if self.exists_s is None and sum(states.values()):
                self.exists_s = now
            if states.get("RUNNING", 0):
                self.running_s = now
            time.sleep(0.05)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def serve_cold_starts(home: str, user: str, n: int) -> list[dict]:
    """Deploy with min_replicas 0, then ``n`` rounds of: wait for 0 replicas, time one request."""
    from aiplatform.core.runtime import ensure_ray
    from aiplatform.core.settings import Settings
    from aiplatform.core.storage import Layout
    from aiplatform.serving import app as serving

    settings = Settings.load(home=home)
    ensure_ray(settings)
    url = serving.start(serving.build_app(Layout.open(settings.home), settings=settings, follow_alias=False, auth="off",
                                          experiments=False, options={"autoscaling_config": TO_ZERO}),
                        "127.0.0.1", free_port(), name=APP, route_prefix="/cold")
    rounds = []
    try:
        with httpx.Client(base_url=url, timeout=330) as client:
            warm = recommend(client, user)  # the replica started at deploy answers: the app works
            warm.raise_for_status()
            for i in range(n):
                wait_for_replicas(0, TO_ZERO["downscale_to_zero_delay_s"] + 120)
                started = time.perf_counter()
                with StatePoller(started) as poll:
                    resp = recommend(client, user, headers=WAIT_HEADERS)
                    seconds = time.perf_counter() - started
                resp.raise_for_status()
                same = [i["item_id"] for i in resp.json()["items"]] == [i["item_id"] for i in warm.json()["items"]]
                assert same, f"the cold replica answers {user!r} differently from the first one"
                rounds.append({"seconds": round(seconds, 3), "replica_exists_s": poll.exists_s,
                               "replica_running_s": poll.running_s, "fallback": resp.json()["fallback"]})
                print(f"   serve from zero #{i + 1}: answer {seconds:.2f} s after the request "
                      f"(replica scheduled at {_s(poll.exists_s)}, RUNNING at {_s(poll.running_s)})", flush=True)
    finally:
        serving.stop(APP)
        import ray
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    return rounds


def _s(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=os.environ.get("AIPLATFORM_HOME"),
                    help="storage root with a champion, its index and online store")
    ap.add_argument("--n", type=int, default=5, help="cold starts per contender (default 5)")
    ap.add_argument("--user", help="user id to ask for (default: the lake's first user, else u0)")
    args = ap.parse_args()
    if not args.home:
        sys.exit("--home: pass a storage root with a served champion (aiplatform quickstart --no-wait --home ROOT)")
    if args.n < 1:
        sys.exit("--n: must be at least 1")
    user = args.user or pick_user(args.home)
    logs = Path(tempfile.mkdtemp(prefix="cold-start-bench-"))
    print(f"== plain process ({args.n} spawns; logs in {logs}), user {user}", flush=True)
    plain = plain_cold_starts(args.home, user, args.n, logs)
    print(f"== serve from zero ({args.n} rounds)", flush=True)
    served = serve_cold_starts(args.home, user, args.n)

    results = {"serve from zero": served, "plain process": plain}
    rows = []
    for name, rounds in results.items():
        s = np.array([r["seconds"] for r in rounds])
        over = int((s > PROXY_DEADLINE_S).sum()) if name.startswith("serve") else "-"
        rows.append([name, len(s), float(np.median(s)), float(s.max()), over, "yes" if s.max() <= GOAL_S else "no"])
    print_table(f"Seconds to the first answer of POST /v1/recommendations from nothing running (goal <= {GOAL_S:.0f} s)",
                ["contender", "n", "p50 s", "max s", f"> {PROXY_DEADLINE_S:.0f} s deadline", "max <= goal"], rows)
    phases = [[i + 1, *("?" if v is None else f"{v:.2f}" for v in
                        (r["replica_exists_s"], r["replica_running_s"], r["seconds"]))] for i, r in enumerate(served)]
    print_table("serve from zero: where the time goes (seconds after the request was sent)",
                ["round", "replica scheduled", "replica RUNNING", "answer"], phases)
    path = save("cold_start", {
        "home": args.home, "user": user, "goal_s": GOAL_S, "autoscaling_config": TO_ZERO,
        "summary": [{"contender": r[0], "n": r[1], "p50_s": round(r[2], 3), "max_s": round(r[3], 3),
                     "over_proxy_deadline": r[4], "goal_met": r[5] == "yes"} for r in rows],
        "rounds": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
