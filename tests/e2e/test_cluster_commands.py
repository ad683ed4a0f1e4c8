"""The README's "Run on a Ray cluster" commands, run exactly as written, on Ray's defaults.

Each ```bash block that follows a ``<!-- cluster-commands: NAME -->`` marker in README.md is
run verbatim by bash, in the repository, as a user would paste it. Nothing is switched off:
token authentication is on (the block exports ``RAY_AUTH_MODE=token`` and generates the
token), the ports are Ray's and Serve's defaults (6379, 8265, 10001, 8000, and the dashboard
agent's 52365: another Ray instance holding it would leave the cluster without a job agent).

Only the environment is the test's own, so that it neither reads nor writes the real user's
files: ``HOME`` is a temporary folder (the token lands in its ``~/.ray``, the demo data in its
``~/aip-demo``) and ``RAY_TMPDIR`` is a short temporary folder (Ray's session files). The
cluster is stopped by killing the processes of this test's session or temp dir: `ray stop`
would kill every Ray process on the machine.
"""

import os
import re
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

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DASHBOARD = "http://127.0.0.1:8265"
SERVE_URL = "http://127.0.0.1:8000"
DEFAULT_PORTS = (6379, 8265, 10001, 8000, 52365)  # GCS, dashboard, client, Serve, dashboard agent


def readme_block(name: str) -> str:
    """The ```bash block right after ``<!-- cluster-commands: name -->`` in README.md."""
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"<!-- cluster-commands: {re.escape(name)} -->\s*```bash\n(.*?)```", text, re.S)
    assert match, f"README.md has no ```bash block after <!-- cluster-commands: {name} -->"
    return match.group(1)


def exported(block: str) -> dict[str, str]:
    """What a block's `export NAME=value` lines leave in the user's shell."""
    return dict(re.findall(r"^export (\w+)=(\S+)", block, re.M))


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _kill_cluster(sid: int, temp_dir: str) -> None:
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
            if os.getsid(pid) == sid or temp_dir in cmdline or f"RAY_TMPDIR={temp_dir}" in environ:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            pass


class Shell:
    """A user's terminal: the same HOME, PATH and exported variables for every block."""

    def __init__(self, home: Path, ray_tmp: str) -> None:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_", "AIPLATFORM_", "AWS_")) and k != "VIRTUAL_ENV"}
        env.update(HOME=str(home), RAY_TMPDIR=ray_tmp, PYTHONUNBUFFERED="1", COLUMNS="200",
                   RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
        self.env = env
        self.sid = None

    def run(self, block: str, timeout: float) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", block], cwd=ROOT, env=self.env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=self.sid is None)
        if self.sid is None:
            self.sid = proc.pid  # the cluster's daemons stay in this session
        out, _ = proc.communicate(timeout=timeout)
        self.env.update(exported(block))
        return subprocess.CompletedProcess(block, proc.returncode, out, "")

    def spawn(self, args: list[str], log: Path, **env: str) -> subprocess.Popen:
        """A long-running command; its output goes to ``log`` (a pipe nobody reads would fill up
        with Ray's streamed logs and block the process)."""
        with open(log, "w") as out:
            # Ctrl-C as at a terminal: a suite started in the background (`cmd &`) would pass an
            # ignored SIGINT on, and `serve run` would never see the interrupt this test sends.
            return subprocess.Popen(args, cwd=ROOT, env=dict(self.env, **env), stdout=out,
                                    stderr=subprocess.STDOUT, text=True,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(url: str, proc: subprocess.Popen | None = None, timeout: float = 240) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode} (its output is in the test's logs)")
        try:
            last = httpx.get(url, timeout=10)
            if last.status_code == 200:
                return last
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(2)
    pytest.fail(f"{url} did not answer 200 within {timeout}s (last: {last})")


_KEY: dict[str, str] = {}  # the README's reader key, once its block ran


def _recommend(prefix: str = "", user: str = "u000001", key: str | None = None) -> httpx.Response:
    return httpx.post(f"{SERVE_URL}{prefix}/v1/recommendations", json={"user_id": user, "k": 5}, timeout=60,
                      headers={"Authorization": f"Bearer {key or _KEY['reader']}"})


def _wait_for_line(log: Path, text: str, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"no {text!r} in the output:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(1)


def _stop(proc: subprocess.Popen, log: Path, sig: int = signal.SIGINT, timeout: float = 240) -> str:
    """Ctrl-C (or ``sig``), then the process's whole output."""
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"did not stop within {timeout}s after signal {sig}:\n{log.read_text(errors='replace')[-3000:]}")
    return log.read_text(errors="replace")


def _wait_for_job_agent(shell: Shell, timeout: float = 180) -> None:
    """What the README tells a user on a busy machine: submit again until the job agent is up
    (a no-op job, so the README's own submissions are never retried)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = subprocess.run(["ray", "job", "submit", "--address", DASHBOARD, "--", "python", "-c", "pass"],
                               cwd=ROOT, env=shell.env, capture_output=True, text=True, timeout=120)
        if probe.returncode == 0:
            return
        if "No available agent" not in probe.stdout + probe.stderr or time.monotonic() > deadline:
            pytest.fail(f"ray job submit does not work on the README's cluster:\n{(probe.stdout + probe.stderr)[-3000:]}")
        time.sleep(3)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The README's jobs block: a token-auth cluster, the shop's data, features/train/index jobs."""
    busy = [p for p in DEFAULT_PORTS if not _port_free(p)]
    if busy:
        pytest.fail(f"ports {busy} are in use: the README's commands use Ray's and Serve's default ports")
    home = tmp_path_factory.mktemp("user-home")
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray puts unix sockets under it
    shell = Shell(home, ray_tmp)
    try:
        started = shell.run(readme_block("start"), timeout=300)
        assert started.returncode == 0, started.stdout[-8000:]
        _wait_for_job_agent(shell)
        result = shell.run(readme_block("jobs"), timeout=1500)
        assert result.returncode == 0, result.stdout[-8000:]
        made = shell.run(readme_block("keys"), timeout=120)
        assert made.returncode == 0, made.stdout
        key_file = home / "aip-demo" / "reader.key"
        assert key_file.stat().st_mode & 0o077 == 0  # readable by its owner only
        _KEY["reader"] = key_file.read_text().strip()
        yield {"shell": shell, "home": home, "log": result.stdout}
    finally:
        if shell.sid is not None:
            _kill_cluster(shell.sid, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.mark.timeout(1800)
def test_readme_jobs_run_with_token_auth(cluster):
    out = cluster["log"]
    assert (cluster["home"] / ".ray" / "auth_token").is_file()  # `ray get-auth-token --generate`
    assert out.count("succeeded") >= 3, out[-4000:]  # the features, train and index jobs
    # the training job's own log, streamed back by `ray job submit`
    assert "recall@10" in out and "promoted to champion" in out, out[-4000:]
    assert "indexed into LanceDB table two_tower_v1" in out, out[-4000:]
    # `aiplatform models list` prints the registered champion
    assert re.search(r"^\W*1\W.*champion", out, re.M), out[-3000:]


def test_a_client_without_the_token_is_refused(cluster):
    env = {k: v for k, v in cluster["shell"].env.items() if k not in ("RAY_AUTH_MODE",)}
    env["HOME"] = str(cluster["home"] / "elsewhere")  # no ~/.ray/auth_token there
    result = subprocess.run(["ray", "job", "list", "--address", DASHBOARD], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "token" in (result.stdout + result.stderr).lower()


@pytest.mark.timeout(900)
def test_serve_run_builds_the_app_from_its_typed_argument(cluster):
    shell = cluster["shell"]
    args = readme_block("serve-run").strip().replace("$HOME", str(cluster["home"])).split()
    log = cluster["home"] / "serve-run.log"
    proc = shell.spawn(args, log)
    try:
        health = _wait_for(f"{SERVE_URL}/healthz", proc).json()
        assert health["model"] == {"name": "two_tower", "version": 1} and health["items"] > 0
        resp = _recommend()
        assert resp.status_code == 200 and len(resp.json()["items"]) == 5, resp.text
        assert httpx.post(f"{SERVE_URL}/v1/recommendations", json={"user_id": "u000001"}, timeout=60).status_code == 401
        _wait_for_line(log, "is ready at", proc)  # `serve run` is past deploying: Ctrl-C now shuts down
    finally:
        _stop(proc, log)
    # `serve run` shuts Serve down on Ctrl-C (Ray's behaviour): the port is free again
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{SERVE_URL}/healthz", timeout=5).raise_for_status()


def _live_apps(cluster) -> list[dict]:
    """The applications' configs as the cluster holds them (`serve config`: one YAML document each)."""
    result = subprocess.run(["serve", "config", "--address", DASHBOARD], env=cluster["shell"].env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.mark.timeout(1200)
def test_serve_deploy_and_change(cluster):
    shell = cluster["shell"]
    deployed = shell.run(readme_block("serve-deploy"), timeout=300)
    assert deployed.returncode == 0, deployed.stdout[-4000:]
    config_path = cluster["home"] / "aip-demo" / "serve.yaml"
    config = yaml.safe_load(config_path.read_text())
    app = config["applications"][0]
    assert app["import_path"] == "aiplatform.serving.app:app" and app["args"]["alias"] == "champion"
    assert {d["name"] for d in app["deployments"]} >= {"RecommendationAPI"}

    _wait_for(f"{SERVE_URL}/healthz")
    call = shell.run(readme_block("call"), timeout=120)
    assert call.returncode == 0 and '"items"' in call.stdout, call.stdout

    # Change the config (resources and the version to serve), deploy again: served in place.
    recommender = next(d for d in app["deployments"] if d["name"] == "RecommendationAPI")
    recommender["autoscaling_config"]["max_replicas"] = 3
    app["args"].update(version=1)
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    redeploy = subprocess.run(["serve", "deploy", str(config_path), "--address", DASHBOARD], env=shell.env,
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert redeploy.returncode == 0, redeploy.stdout + redeploy.stderr
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        resp = _recommend()
        if resp.status_code == 200 and resp.json()["variant"] == "v1":  # the explicit version's variant
            break
        time.sleep(2)
    assert resp.status_code == 200 and resp.json()["variant"] == "v1", resp.text
    live = _live_apps(cluster)[0]
    assert live["args"]["version"] == 1
    assert next(d for d in live["deployments"] if d["name"] == "RecommendationAPI")["autoscaling_config"]["max_replicas"] == 3

    # `aiplatform serve` joins the cluster with a second application; stopping it removes that
    # application only: the deployed one keeps answering.
    log = cluster["home"] / "extra.log"
    extra = shell.spawn(["aiplatform", "serve", "--home", str(cluster["home"] / "aip-demo" / "home"),
                         "--name", "extra", "--route-prefix", "/extra"], log, RAY_ADDRESS="127.0.0.1:6379")
    try:
        _wait_for(f"{SERVE_URL}/extra/healthz", extra)
        assert _recommend("/extra").status_code == 200
        _wait_for_line(log, "Press Ctrl-C to stop", extra)  # serving, not still starting
    finally:
        out = _stop(extra, log)
    assert extra.returncode == 0, out[-3000:]
    assert _recommend().status_code == 200  # the deployed application is untouched
    assert httpx.get(f"{SERVE_URL}/extra/healthz", timeout=10).status_code == 404
    assert [a["name"] for a in _live_apps(cluster)] == ["aiplatform"]


def _signed_in_console(cluster) -> httpx.Client:
    """An HTTP client signed in to the deployed app's console with a new admin key, as a browser
    would: the sign-in form's CSRF token with its session cookie, then the key."""
    from aiplatform.security.keys import KeyStore, Role

    key, _ = KeyStore(str(cluster["home"] / "aip-demo" / "home"), env="").create("console-e2e", Role.admin)
    client = httpx.Client(base_url=SERVE_URL, timeout=60)
    deadline = time.monotonic() + 30  # each replica re-reads the key file every few seconds
    while True:
        page = client.get("/console/signin")
        csrf = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text)
        assert csrf, page.text[:2000]
        done = client.post("/console/signin", data={"key": key, "csrf": csrf.group(1)}, follow_redirects=False)
        if done.status_code == 303 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert done.status_code == 303, done.text[:2000]
    return client


# The two tests below run on the application test_serve_deploy_and_change left deployed (in file
# order, as the module's tests do): no second deployment, no new cluster.
@pytest.mark.timeout(300)
def test_console_jobs_tab_reads_the_token_auth_cluster(cluster):
    """Inside a Serve replica of the README's token-auth cluster, the console's Jobs tab reads
    Ray's Jobs API: the jobs the README submitted are listed, and a job's logs open. The Serving
    tab reads every node's metrics endpoint there too."""
    client = _signed_in_console(cluster)
    try:
        page = client.get("/console/jobs")
        assert page.status_code == 200, page.text[:2000]
        assert 'id="jobs-unavailable"' not in page.text, page.text[:3000]
        rows = re.findall(r"<tr><th scope=\"row\">.*?</tr>", page.text, re.S)
        train = [r for r in rows if "aiplatform.jobs.train" in r]
        assert train and "SUCCEEDED" in train[0] and "training" in train[0], page.text[:4000]
        link = re.search(r'href="(/console/jobs/[^"]+/logs)"', train[0])
        assert link, train[0]
        logs = client.get(link.group(1))
        assert logs.status_code == 200 and "recall@10" in logs.text, logs.text[-3000:]
        assert client.get("/console/jobs/raysubmit_no_such_job/logs").status_code == 404
        # the Serving tab reads every node's metrics endpoint on this cluster too
        serving = client.get("/console/serving")
        assert serving.status_code == 200 and 'data-source="cluster"' in serving.text, serving.text[-4000:]
    finally:
        client.close()


@pytest.mark.timeout(600)
def test_serve_delete_removes_only_its_application(cluster):
    shell = cluster["shell"]
    deleted = subprocess.run(["aiplatform", "serve", "delete", "--name", "aiplatform"], cwd=ROOT,
                             env=dict(shell.env, RAY_ADDRESS="127.0.0.1:6379"), capture_output=True, text=True,
                             timeout=300)
    assert deleted.returncode == 0, deleted.stdout + deleted.stderr
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if _recommend().status_code == 404:
                break
        except httpx.HTTPError:
            break
        time.sleep(2)
    else:
        pytest.fail("the application still answers after `serve delete`")
