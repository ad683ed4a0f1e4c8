"""`python -m aiplatform.jobs.train` under `ray job submit` against a real, separately started
Ray cluster (DESIGN.md: 'python -m aiplatform.jobs.train … runs under ray job submit -- … against
any cluster').

The cluster is this test's own: `ray start --head --block` in a new session, with its own
``--temp-dir`` and free ports (GCS, dashboard, client server, dashboard agent), so that it never
collides with other Ray instances on the machine. `ray stop` is never used: it would kill every
Ray process on the machine, other tests' included. Teardown signals the `ray start --block`
process (which stops the processes it started), then SIGKILLs whatever is left in that
session or names this cluster's temp dir on its command line.

Authentication: Ray 2.60 turns token authentication on by default for new clusters (see
``ray/_private/authentication/authentication_token_setup.py``: with ``RAY_AUTH_MODE`` unset a
token is generated under ~/.ray). We opt out the documented way, ``RAY_AUTH_MODE=disabled`` in
the environment of both `ray start` and `ray job submit` (a throwaway cluster bound to
127.0.0.1 for the length of one test), so the test does not depend on, or write, a token file
in the user's home.
"""

import os
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

from aiplatform.core.storage import Layout
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
EXCLUDES = '{"excludes": [".venv", ".git", ".aiplatform", "benchmarks/results"]}'


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "AIPLATFORM_HOME", "AIPLATFORM_CONFIG"):
        env.pop(var, None)
    env["RAY_AUTH_MODE"] = "disabled"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["PYTHONUNBUFFERED"] = "1"
    env["COLUMNS"] = "1000"
    return env


def _tool(name: str) -> str:
    path = BIN / name
    return str(path) if path.exists() else name


def _kill_cluster(sid: int, temp_dir: str) -> None:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(pid) == sid or temp_dir in cmdline:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            pass


@pytest.fixture()
def ray_cluster(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: Ray puts sockets under it
    gcs, dashboard = _free_port(), _free_port()
    log = tmp_path / "ray_start.log"
    cmd = [_tool("ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
           "--ray-client-server-port", str(_free_port()),
           "--dashboard-agent-listen-port", str(_free_port()),
           "--num-cpus", "4", "--object-store-memory", "500000000",
           "--temp-dir", temp_dir, "--disable-usage-stats"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
                                start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.get(f"{address}/api/version", timeout=5).status_code == 200 and \
                        httpx.get(f"{address}/api/jobs/", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the Ray dashboard did not come up:\n{log.read_text(errors='replace')[-4000:]}")
            time.sleep(2)
        yield {"address": address, "temp_dir": temp_dir, "log": log}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        _kill_cluster(proc.pid, temp_dir)
        if proc.poll() is None:
            proc.wait(timeout=30)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.timeout(1200)
def test_train_job_runs_under_ray_job_submit(ray_cluster, tmp_path):
    from aiplatform.registry import ModelRegistry

    data = write(generate(ShopSize(users=120, items=60), seed=3), str(tmp_path / "data"))
    home = tmp_path / "home"
    env = _env()
    imported = subprocess.run(
        [_tool("aiplatform"), "data", "import", "--events", data["events"], "--items", data["items"],
         "--users", data["users"], "--home", str(home)],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert imported.returncode == 0, imported.stdout + imported.stderr

    submit = subprocess.run(
        [_tool("ray"), "job", "submit", "--address", ray_cluster["address"], "--working-dir", str(ROOT),
         "--runtime-env-json", EXCLUDES, "--",
         "python", "-m", "aiplatform.jobs.train", "--home", str(home), "--epochs", "1", "--always-promote"],
        env=env, capture_output=True, text=True, timeout=1000, cwd=tmp_path)
    out = submit.stdout + submit.stderr
    assert submit.returncode == 0, out[-6000:]
    assert "succeeded" in out.lower(), out[-3000:]
    # The job's own log (streamed by `ray job submit`) shows the metrics table and the verdict.
    assert "recall@10" in out and "ndcg@10" in out, out[-3000:]
    lines = out.splitlines()
    # rows: model, popularity, cooccurrence; columns: recall@10, recall@50, ndcg@10, coverage@10
    for ranker in ("model", "popularity", "cooccurrence"):
        assert any(line.split()[:1] == [ranker] and len(line.split()) == 5 for line in lines), out[-3000:]
    assert "model two_tower v1" in out and "promoted to champion" in out, out[-3000:]

    registry = ModelRegistry(Layout.at(str(home)))
    versions = registry.list_versions("two_tower")
    assert [v.version for v in versions] == [1]
    # challenger too when the one-epoch model passes the quality gates; champion is forced
    assert registry.aliases("two_tower")["champion"] == 1
    mv = registry.get_by_alias("two_tower", "champion")
    assert Path(mv.artifact_uri).exists() and any(Path(mv.artifact_uri).iterdir())
    assert {"model", "popularity"} <= set(mv.metrics)
    assert mv.lineage["events"] > 0
    # the registered model is the run's best checkpoint, and it loads as a working model
    from aiplatform.models.two_tower import load_artifact

    assert mv.params["best_epoch"] == 1 and mv.params["epochs"] == 1
    assert Path(mv.checkpoint_uri).name == "epoch_0001"
    model, vocab = load_artifact(mv.artifact_uri)
    assert vocab.n_items == 60 and model.all_item_embeddings().shape[0] == 61
