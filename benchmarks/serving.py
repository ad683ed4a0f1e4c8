"""Issue 11, point 1: is the Serve app faster than the same path in one plain process?

Contenders, on the same storage root and model version, each started alone (nothing else
competes for the cores while it is measured):

- ``serve``: the application ``aiplatform serve`` runs (``serving.app.build_app`` + ``start`` on
  127.0.0.1, a free port), on a fresh local Ray in its own process, with its default ingress:
  Serve's HAProxy ingress and ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (``AIPLATFORM_SERVE_INGRESS``);
- ``serve/proxy``: the same behind Serve's Python HTTP proxy (Ray's default), and
  ``serve/proxy+tput`` with ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` (read when Serve starts,
  hence a process and a Ray of its own);
- ``serve+direct``: the same with Serve's direct ingress (``RAY_SERVE_ENABLE_DIRECT_INGRESS=1``):
  the ingress replica runs its own HTTP server and no proxy is started, so the load goes to the
  replica's port (a range set per run);
- ``plain``: benchmarks/serving_plain.py, the same pipeline object (``serving.pipeline.
  RecommendPipeline``: online features, user tower, item index, candidate ranker) called
  in-process by one uvicorn worker; ``plain x2``: uvicorn with 2 workers;
- with ``--baseline-src DIR``, ``serve@DIR``: the Serve app of another source tree (e.g.
  ``git archive HEAD | tar -x -C DIR``), to measure a change against what it replaces.

Before any timing each contender must give the same answer as the first one for the same
users (item ids in order, scores to 1e-5, ``ranked``/``fallback``, model version): a faster
server that answers differently is not a result.

Load: ``wrk`` (closed loop: each connection sends its next request when the last is answered)
on ``POST /v1/recommendations`` with user ids cycling through known users (a Lua script), at
1, 8 and 32 connections: a warm-up, then the measured run (5 s + 15 s; ``--quick``: 2 s + 5 s).
Reported per level: p50, p99 (wrk's latency histogram), requests/s, errors (connect, read,
write, timeout and non-2xx answers). Loopback only.

The serving caches (2 s of feature rows and answers per process) are off unless ``--with-caches``:
at hundreds of requests per second over 1,000 users a user comes back within 2 s, so a faster
server would also be served from its cache more often.

Usage: python benchmarks/serving.py --home ROOT [--quick] [--only serve,plain] [--baseline-src DIR] [--with-caches]
ROOT: a storage root with a champion and its index and online store (``aiplatform quickstart
--no-wait --home ROOT``). Saves benchmarks/results/serving.json (serving_quick.json with --quick).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from common import free_port, print_table, save

from aiplatform.security.keys import KEYS_ENV, hash_key, new_key

LEVELS = (1, 8, 32)
API_KEY = new_key()
"""A reader key the Serve contenders accept (through AIPLATFORM_API_KEYS): measured as served, auth on."""
APP = "serving-bench"
CHECK_USERS = 40

# The Serve contender's process: `aiplatform serve`'s start-up (ensure_ray, build_app, start),
# serving until its stdin closes, then removing the app and stopping its Ray.
SERVE_CHILD = """
import sys
from aiplatform.core.runtime import ensure_ray
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.serving import app as serving
settings = Settings.load(home=sys.argv[1])
ensure_ray(settings)
url = serving.start(serving.build_app(Layout.open(settings.home), settings=settings), "127.0.0.1",
                    int(sys.argv[2]), name=sys.argv[3])
from ray import serve
print("DEPLOYMENTS", sorted(serve.status().applications[sys.argv[3]].deployments), flush=True)
sys.stdin.read()
serving.stop(sys.argv[3])
import ray
serve.shutdown()
ray.shutdown()
"""

WRK_SCRIPT = """
local users = {%(users)s}
local counter = 0
local threads = 0
function setup(thread)
  thread:set("offset", threads * 7919)
  threads = threads + 1
end
function init(args)
  counter = tonumber(offset) or 0
end
function request()
  counter = counter + 1
  local u = users[(counter %% #users) + 1]
  return wrk.format("POST", "/v1/recommendations", {["Content-Type"] = "application/json",
                    ["Authorization"] = "Bearer %(key)s"},
                    '{"user_id":"' .. u .. '","k":10}')
end
function done(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%d,"p99_us":%%d}\\n', summary.requests, summary.duration,
    summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status,
    summary.errors.timeout, latency:percentile(50), latency:percentile(99)))
end
"""


class Contender:
    """One server to measure: how to start it, and where it answers once started."""

    def __init__(self, name: str, kind: str, *, env: dict[str, str | None] | None = None, workers: int = 1,
                 src: Path = REPO, direct: bool = False) -> None:
        self.name, self.kind, self.env, self.workers, self.src = name, kind, env or {}, workers, src
        self.direct = direct  # Serve's direct ingress: the replica itself listens, no proxy
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.deployments = ""

    def start(self, home: str, log: Path, timeout: float = 300) -> str:
        port = free_port()
        env = dict(os.environ, AIPLATFORM_HOME=home, PYTHONPATH=str(self.src))
        url_port = port
        if self.direct:  # the replica takes the first free port of this range
            url_port = free_port()
            env.update(RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=str(url_port),
                       RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=str(url_port + 1))
        for k, v in self.env.items():
            if v is None:
                env.pop(k, None)
            else:
                env[k] = v
        if self.kind == "serve":
            cmd = [sys.executable, "-c", SERVE_CHILD, home, str(port), APP]
        else:
            cmd = [sys.executable, "-m", "uvicorn", "benchmarks.serving_plain:app", "--host", "127.0.0.1",
                   "--port", str(port), "--workers", str(self.workers), "--log-level", "warning", "--no-access-log"]
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=self.src, env=env, stdin=subprocess.PIPE, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{url_port}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: see {log}")
            self.deployments = next((ln.split(" ", 1)[1].strip() for ln in log.read_text().splitlines()
                                     if ln.startswith("DEPLOYMENTS ")), "")
            try:  # a Serve child prints its deployments once serve.run has returned
                if (self.kind != "serve" or self.deployments) and \
                        httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    return self.url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise RuntimeError(f"{self.name} did not answer /healthz within {timeout:.0f} s: see {log}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            if self.kind == "serve":
                self.proc.stdin.close()  # the child removes the app and stops its Ray
            else:
                self.proc.terminate()
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        finally:
            self.log.close()
            self.proc = None


def answers(url: str, users: list[str]) -> list[tuple]:
    """What a server answers for each user: (item ids, scores, ranked, fallback, version)."""
    out = []
    with httpx.Client(base_url=url, timeout=60, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        for u in users:
            r = client.post("/v1/recommendations", json={"user_id": u, "k": 10})
            r.raise_for_status()
            b = r.json()
            out.append((tuple(i["item_id"] for i in b["items"]), np.array([i["score"] for i in b["items"]]),
                        b["ranked"], b["fallback"], b["model"]["version"]))
    return out


def same_answers(reference: list[tuple], got: list[tuple], users: list[str], name: str) -> None:
    """Raise AssertionError naming the first user whose answer differs."""
    for u, a, b in zip(users, reference, got, strict=True):
        ok = a[0] == b[0] and a[2:] == b[2:] and np.allclose(a[1], b[1], rtol=1e-5, atol=1e-6)
        assert ok, f"{name} answers user {u!r} differently: {b[0]} {b[2:]} vs {a[0]} {a[2:]}"


def run_wrk(url: str, script: Path, connections: int, seconds: int) -> dict:
    threads = min(connections, 2)
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s", "--timeout", "10s",
           "-s", str(script), url]
    out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=seconds + 60)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk gave no summary (exit {out.returncode}): {out.stdout}{out.stderr}")
    raw = json.loads(line[len("WRKJSON "):])
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    duration = raw["duration_us"] / 1e6
    return {"requests": raw["requests"], "seconds": round(duration, 2),
            "req_s": round(raw["requests"] / duration, 1), "p50_ms": raw["p50_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000, "errors": errors,
            "error_kinds": {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}}


def known_users(home: str) -> list[str]:
    """Users with an online feature row (the path under test), shuffled with a fixed seed."""
    from aiplatform.core.settings import Settings
    from aiplatform.core.storage import Layout
    from aiplatform.data import lake

    layout = Layout.open(Settings.load(home=home).home)
    users = sorted(set(lake.read_events(layout, columns=["user_id"])["user_id"].astype(str)))
    return [str(u) for u in np.random.default_rng(0).permutation(users)]


def targets(results: dict, serve: str, plain: str) -> list[list]:
    """Issue 11's targets for one Serve contender against the one-process peer."""
    s, p = results[serve], results[plain]
    return [
        [serve, "req/s at c=32 >= 1.0x plain", f"{s['32']['req_s'] / p['32']['req_s']:.2f}x",
         s["32"]["req_s"] >= p["32"]["req_s"]],
        [serve, "req/s at c=8 >= 0.8x plain", f"{s['8']['req_s'] / p['8']['req_s']:.2f}x",
         s["8"]["req_s"] >= 0.8 * p["8"]["req_s"]],
        [serve, "p50 at c=1 <= 2x plain", f"{s['1']['p50_ms'] / p['1']['p50_ms']:.2f}x",
         s["1"]["p50_ms"] <= 2 * p["1"]["p50_ms"]],
        [serve, "p99 at c=32 <= 100 ms, no errors", f"{s['32']['p99_ms']:.1f} ms, {s['32']['errors']} errors",
         s["32"]["p99_ms"] <= 100 and s["32"]["errors"] == 0],
        [serve, "req/s at c=32 >= c=8", f"{s['32']['req_s']:.0f} vs {s['8']['req_s']:.0f}",
         s["32"]["req_s"] >= s["8"]["req_s"]],
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--home", default=os.environ.get("AIPLATFORM_HOME"),
                    help="storage root with a champion, its index and online store")
    ap.add_argument("--quick", action="store_true", help="2 s warm-up + 5 s per level")
    ap.add_argument("--only", help="comma-separated contender names (default: all)")
    ap.add_argument("--baseline-src", type=Path, help="also serve the Serve app of this source tree")
    ap.add_argument("--with-caches", action="store_true",
                    help="keep the serving caches of feature rows and answers (default: off, so that a faster "
                         "server does not win by repeating users within the caches' 2 s)")
    args = ap.parse_args()
    if not args.home:
        sys.exit("--home: pass a storage root with a served champion (aiplatform quickstart --no-wait --home ROOT)")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed: apt-get install wrk")
    warm, measure = (2, 5) if args.quick else (5, 15)
    if not args.with_caches:  # every contender computes every answer (read by build_app and serving_plain)
        os.environ.update(AIPLATFORM_SERVING_ANSWER_TTL_S="0", AIPLATFORM_SERVING_FEATURE_TTL_S="0")

    proxy = {"AIPLATFORM_SERVE_INGRESS": "proxy", "RAY_SERVE_ENABLE_HA_PROXY": None}
    contenders = [Contender("serve", "serve", env={"AIPLATFORM_SERVE_INGRESS": "haproxy"}),
                  Contender("serve/proxy", "serve", env={**proxy, "RAY_SERVE_THROUGHPUT_OPTIMIZED": None}),
                  Contender("serve/proxy+tput", "serve", env={**proxy, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}),
                  Contender("serve+direct", "serve", direct=True,
                            env={**proxy, "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1"}),
                  Contender("plain", "plain", workers=1),
                  Contender("plain x2", "plain", workers=2)]
    if args.baseline_src:
        contenders.insert(0, Contender(f"serve@{args.baseline_src.name}", "serve",
                                       env={"AIPLATFORM_SERVE_INGRESS": "haproxy"}, src=args.baseline_src.resolve()))
    if args.only:
        wanted = set(args.only.split(","))
        contenders = [c for c in contenders if c.name in wanted]
    users = known_users(args.home)
    check = users[:CHECK_USERS] + ["nobody-knows-this-user"]
    tmp = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    script = tmp / "load.lua"
    script.write_text(WRK_SCRIPT % {"users": ", ".join(json.dumps(u) for u in users[:1000]), "key": API_KEY})
    os.environ[KEYS_ENV] = f"bench:reader:{hash_key(API_KEY)}"  # inherited by the contenders' processes

    reference: list[tuple] | None = None
    results: dict[str, dict[str, dict]] = {}
    started: dict[str, float] = {}
    deployments: dict[str, str] = {}
    for c in contenders:
        t = time.perf_counter()
        print(f"== {c.name}: starting (log {tmp / (c.name + '.log')})", flush=True)
        try:
            url = c.start(args.home, tmp / f"{c.name.replace(' ', '_').replace('/', '_')}.log")
            started[c.name] = round(time.perf_counter() - t, 1)
            deployments[c.name] = c.deployments
            if c.deployments:
                print(f"   deployments: {c.deployments}", flush=True)
            got = answers(url, check)
            if reference is None:
                reference, ref_name = got, c.name
                assert any(g[2] for g in got), "the served version has no ranker: answers are not ranked"
            else:
                same_answers(reference, got, check, c.name)
            print(f"   same answers as {ref_name} for {len(check)} users; measuring", flush=True)
            results[c.name] = {}
            for conns in LEVELS:
                run_wrk(url, script, conns, warm)
                results[c.name][str(conns)] = r = run_wrk(url, script, conns, measure)
                print(f"   c={conns}: {r['req_s']} req/s, p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, "
                      f"{r['errors']} errors", flush=True)
        finally:
            c.stop()

    rows = [[name, conns, r["p50_ms"], r["p99_ms"], r["req_s"], r["errors"]]
            for name, levels in results.items() for conns, r in levels.items()]
    print_table(f"POST /v1/recommendations, closed loop (wrk), {measure} s per level after {warm} s warm-up",
                ["server", "in flight", "p50 ms", "p99 ms", "req/s", "errors"], rows)
    summary = [[name, lv["1"]["p50_ms"], lv["1"]["req_s"], lv["8"]["req_s"], lv["32"]["req_s"], lv["32"]["p99_ms"],
                started[name]] for name, lv in results.items()]
    print_table("Summary (the issue's table)", ["server", "c=1 p50 ms", "c=1 req/s", "c=8 req/s", "c=32 req/s",
                                                "c=32 p99 ms", "start s"], summary)
    checks = []
    if "plain" in results:
        for name in results:
            if name.startswith("serve"):
                checks += targets(results, name, "plain")
        if checks:
            print_table("Targets (issue 11, point 1)", ["server", "target", "measured", "met"], checks)
    path = save("serving_quick" if args.quick else "serving", {
        "home": args.home, "warm_s": warm, "measure_s": measure, "levels": list(LEVELS), "caches": args.with_caches,
        "identical_answers_users": len(check), "start_seconds": started, "deployments": deployments, "results": results,
        "targets": [{"server": s, "target": t, "measured": m, "met": bool(ok)} for s, t, m, ok in checks]})
    print(f"saved {path}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
