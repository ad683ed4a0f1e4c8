"""A real two-node Ray cluster, the storage root in an S3 bucket, the online store in Redis.

Two `ray start` nodes on this machine, each with its own temp dir, resources and environment,
joined over 127.0.0.1 with token authentication on (``RAY_AUTH_TOKEN`` on every process, as
KubeRay injects it). The second node's own ``AIPLATFORM_HOME`` names a local folder that does
not exist, and its node-local cache is its own: whatever it reads comes from the bucket.

Then, as on a KubeRay cluster: the feature job, the training job with one Ray Train worker on
each node, the index job (all by ``ray job submit``), a Serve config whose replicas are pinned to
the second node by its custom resource, and ``aiplatform quickstart --no-wait`` run from outside
the cluster against the same bucket: it removes only its own application when it stops.

Nodes are stopped by killing the processes of their session or temp dirs (never `ray stop`).
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.s3_server import BUCKET, s3_environment
from tests.servers import kill_ray_node

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXCLUDES = json.dumps({"excludes": [".venv", ".git", ".aiplatform", "benchmarks/results"]})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _base_env(s3_endpoint: str, redis_url: str, token: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIPLATFORM_", "AWS_"))}
    env.update(s3_environment(s3_endpoint))
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, AIPLATFORM_ONLINE_STORE=redis_url,
               RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", COLUMNS="200",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    return env


def _start_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([str(BIN / "ray"), "start", "--block", *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT, cwd=log.parent, start_new_session=True)


def _run(args: list[str], env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def _ray_json(args: list[str], env: dict[str, str]) -> list[dict]:
    result = _run([str(BIN / "ray"), *args, "--format", "json"], env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    if result.stdout.strip() == "No resource in the cluster":  # what `ray list` prints, not JSON, while nothing is listed
        return []
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def two_nodes(s3_server, redis_url, tmp_path_factory):
    work = tmp_path_factory.mktemp("two-nodes")
    token = secrets.token_hex(32)
    env = _base_env(s3_server, redis_url, token)
    root = f"s3://{BUCKET}/two-nodes-{secrets.token_hex(4)}"
    gcs, dashboard = _free_port(), _free_port()
    head_tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray puts unix sockets under them
    node_tmp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
    head_env = dict(env, AIPLATFORM_HOME=root)
    node_env = dict(env, AIPLATFORM_HOME=str(work / "no-such-root"), AIPLATFORM_CACHE_DIR=f"{node_tmp}/cache",
                    TMPDIR=node_tmp)
    procs = []
    try:
        procs.append((_start_node(
            ["--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
             "--dashboard-port", str(dashboard), "--ray-client-server-port", str(_free_port()),
             "--dashboard-agent-listen-port", str(_free_port()), "--num-cpus", "2",
             "--resources", '{"head": 1}', "--object-store-memory", "300000000", "--temp-dir", head_tmp],
            head_env, work / "head.log"), head_tmp))
        address = f"http://127.0.0.1:{dashboard}"
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"},
                             timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if procs[0][0].poll() is not None or time.monotonic() > deadline:
                pytest.fail("the head did not start:\n" + (work / "head.log").read_text(errors="replace")[-4000:])
            time.sleep(2)
        procs.append((_start_node(
            ["--address", f"127.0.0.1:{gcs}", "--num-cpus", "2", "--resources", '{"node2": 1}',
             "--dashboard-agent-listen-port", str(_free_port()), "--object-store-memory", "300000000",
             "--temp-dir", node_tmp], node_env, work / "node2.log"), node_tmp))
        client_env = dict(env, RAY_ADDRESS=f"127.0.0.1:{gcs}")
        deadline = time.monotonic() + 300
        while True:
            nodes = [n for n in _ray_json(["list", "nodes", "--address", f"127.0.0.1:{gcs}"], client_env)
                     if n["state"] == "ALIVE"]
            if len(nodes) == 2:
                break
            if procs[1][0].poll() is not None or time.monotonic() > deadline:
                pytest.fail("the second node did not join:\n" + (work / "node2.log").read_text(errors="replace")[-4000:])
            time.sleep(2)
        node2 = next(n["node_id"] for n in nodes if "node2" in (n.get("resources_total") or {}))
        yield {"env": env, "client_env": client_env, "root": root, "dashboard": address, "gcs": f"127.0.0.1:{gcs}",
               "node2": node2, "work": work, "redis_url": redis_url}
    finally:
        for proc, temp_dir in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:  # not a test of a graceful stop: what is left is killed below (this wait took 30 s)
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            kill_ray_node(proc.pid, temp_dir)
        for temp_dir in (head_tmp, node_tmp):
            shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(cluster: dict, *entrypoint: str) -> str:
    result = _run([str(BIN / "ray"), "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(ROOT),
                   "--runtime-env-json", EXCLUDES, "--", "python", "-m", *entrypoint], cluster["env"], timeout=1200)
    out = result.stdout + result.stderr
    assert result.returncode == 0 and "succeeded" in out, out[-6000:]
    return out


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> dict:
    from apps.shop.generate import ShopSize, generate, write

    return write(generate(ShopSize(users=150, items=80), seed=5), str(tmp_path_factory.mktemp("shop")))


@pytest.mark.timeout(2400)
def test_jobs_and_serving_across_two_nodes_from_a_bucket(two_nodes, shop, monkeypatch):
    cluster = two_nodes
    root = cluster["root"]
    imported = _run([str(BIN / "aiplatform"), "data", "import", "--home", root, "--events", shop["events"],
                     "--items", shop["items"], "--users", shop["users"]], cluster["env"], timeout=300)
    assert imported.returncode == 0, imported.stdout + imported.stderr

    _submit(cluster, "aiplatform.jobs.features", "--home", root)
    train_log = _submit(cluster, "aiplatform.jobs.train", "--home", root, "--epochs", "1", "--num-workers", "2",
                        "--placement-strategy", "STRICT_SPREAD", "--always-promote")
    assert "promoted to champion" in train_log, train_log[-4000:]
    workers = [a for a in _ray_json(["list", "actors", "--address", cluster["gcs"], "--detail",
                                     "--filter", "class_name=RayTrainWorker", "--limit", "1000"], cluster["client_env"])]
    assert len({a["node_id"] for a in workers}) == 2, workers  # one training worker on each node
    _submit(cluster, "aiplatform.jobs.index", "--home", root)

    # The registry, the artifact, the checkpoints and the vectors are all in the bucket.
    from aiplatform.core import storage

    for key, value in s3_environment_of(cluster).items():
        monkeypatch.setenv(key, value)
    assert storage.is_dir(f"{root}/models/two_tower/1") and storage.is_dir(f"{root}/vectors")
    assert storage.list_dirs(f"{root}/runs")

    # Serving: the Serve config, with every replica pinned to the second node.
    port = _free_port()
    config_path = cluster["work"] / "serve.yaml"
    built = _run([str(BIN / "aiplatform"), "serve", "build", "--home", root, "--online-store", cluster["redis_url"],
                  "--name", "pinned", "--host", "127.0.0.1", "--port", str(port), "--out", str(config_path)],
                 cluster["env"], timeout=300)
    assert built.returncode == 0, built.stdout + built.stderr
    config = yaml.safe_load(config_path.read_text())
    config["proxy_location"] = "HeadOnly"  # one proxy: both nodes share this machine's ports
    app = config["applications"][0]
    app["route_prefix"] = "/pinned"
    for deployment in app["deployments"]:
        deployment.setdefault("ray_actor_options", {})["resources"] = {"node2": 0.01}
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    made = _run([str(BIN / "aiplatform"), "keys", "create", "multinode", "--role", "reader", "--quiet",
                 "--home", root], cluster["client_env"], timeout=120)  # in the bucket, where replicas read it
    assert made.returncode == 0, made.stdout + made.stderr
    reader = {"Authorization": f"Bearer {made.stdout.strip()}"}
    deployed = _run([str(BIN / "serve"), "deploy", str(config_path), "--address", cluster["dashboard"]],
                    cluster["env"], timeout=300)
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    base = f"http://127.0.0.1:{port}/pinned"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/healthz", timeout=10).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(2)
    resp = httpx.post(f"{base}/v1/recommendations", json={"user_id": _a_user(shop), "k": 5}, timeout=60,
                      headers=reader)
    assert resp.status_code == 200 and len(resp.json()["items"]) == 5 and resp.json()["fallback"] is None, resp.text
    replicas = [a for a in _ray_json(["list", "actors", "--address", cluster["gcs"], "--detail", "--filter",
                                      "state=ALIVE", "--limit", "1000"], cluster["client_env"])
                if a["class_name"].startswith("ServeReplica:pinned:")]
    # every deployment that keeps a replica has one, on the second node (the experiment shadow's
    # deployment holds none until a mirror arrives)
    running = [d for d in app["deployments"] if (d.get("autoscaling_config") or {}).get("min_replicas", 1) > 0]
    assert len(replicas) >= len(running) and {a["node_id"] for a in replicas} == {cluster["node2"]}, replicas

    # `aiplatform quickstart --no-wait` from outside the cluster, on the same bucket, where v1 is
    # already champion: every stage, a demo request, exit 0; v2 is registered and takes over
    # only if it passes the quality gates; then it removes its own application, and only that.
    qs = _run([str(BIN / "aiplatform"), "quickstart", "--home", root, "--events", shop["events"], "--items",
               shop["items"], "--users", shop["users"], "--epochs", "1", "--no-wait"],
              cluster["client_env"], timeout=1500)
    out = re.sub(r"\s+", " ", qs.stdout)
    assert qs.returncode == 0, qs.stdout[-6000:] + qs.stderr[-4000:]
    assert f"storage root {root}" in out and "joining 127.0.0.1" in out, out[-3000:]
    assert "quickstart stage timings" in out and "Press Ctrl-C" not in out
    assert f"curl -s -X POST http://127.0.0.1:{port}/v1/recommendations" in out, out[-3000:]
    assert storage.read_json(f"{root}/quickstart_timings.json")["total"] > 0
    from aiplatform.core.storage import Layout
    from aiplatform.registry import ModelRegistry

    registry = ModelRegistry(Layout.at(root))
    assert [v.version for v in registry.list_versions("two_tower")] == [1, 2]
    aliases = registry.aliases("two_tower")
    beats = "beats popularity:" in out
    assert ("does NOT beat popularity:" in out) != beats
    took_over = "registered, champion unchanged" not in out
    assert aliases["champion"] == (2 if took_over else 1)
    assert beats or not took_over  # a model that loses to popularity never takes over
    assert (aliases.get("challenger") == 2) == took_over  # passing the gates makes v2 challenger (and champion)
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200  # the pinned app still serves
    live = _run([str(BIN / "serve"), "config", "--address", cluster["dashboard"]], cluster["env"], timeout=120)
    assert [a["name"] for a in yaml.safe_load_all(live.stdout) if a] == ["pinned"]


def s3_environment_of(cluster: dict) -> dict[str, str]:
    return {k: v for k, v in cluster["env"].items() if k.startswith("AWS_")}


def _a_user(shop: dict) -> str:
    import pandas as pd

    events = pd.read_parquet(shop["events"])
    return str(events["user_id"].value_counts().idxmax())
