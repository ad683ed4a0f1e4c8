"""The `aiplatform quickstart` command as a user runs it: a real subprocess, a real Ray
instance of its own, real HTTP.

Each test has its own storage root (``--home`` under tmp_path) and a free port, and runs with
``RAY_ADDRESS`` removed from the environment so it never joins another test's cluster.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aiplatform.core.storage import Layout
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
MODEL = "two_tower"
STARTUP_TIMEOUT_S = 900
STOP_TIMEOUT_S = 60


def _cli() -> list[str]:
    script = Path(sys.executable).parent / "aiplatform"
    return [str(script)] if script.exists() else [sys.executable, "-m", "aiplatform.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in ("RAY_ADDRESS", "AIPLATFORM_HOME", "AIPLATFORM_CONFIG", "AIPLATFORM_HTTP_PORT",
                "AIPLATFORM_HTTP_HOST", "AIPLATFORM_ONLINE_STORE"):
        env.pop(var, None)
    # Wide, plain output: rich must not wrap the messages and the curl line we look for.
    env.update({"COLUMNS": "1000", "PYTHONUNBUFFERED": "1", "TERM": "dumb", "NO_COLOR": "1"})
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _flat(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _snapshot(*dirs: Path) -> dict[str, bytes]:
    out = {}
    for d in dirs:
        if d.exists():
            for p in sorted(d.rglob("*")):
                if p.is_file():
                    out[str(p)] = p.read_bytes()
    return out


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_cli() + args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _registered_versions(home: Path) -> tuple[list[int], dict[str, int]]:
    from aiplatform.registry import ModelRegistry

    reg = ModelRegistry(Layout.at(str(home)))
    return [v.version for v in reg.list_versions(MODEL)], reg.aliases(MODEL)


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> dict:
    """Tiny generated shop, plus broken variants of it."""
    root = tmp_path_factory.mktemp("shop")
    frames = generate(ShopSize(users=120, items=60), seed=42)
    paths = write(frames, str(root / "good"))
    bad = root / "bad"
    bad.mkdir()
    no_ts = frames["events"].drop(columns=["timestamp"])
    pq.write_table(pa.Table.from_pandas(no_ts, preserve_index=False), bad / "events_no_timestamp.parquet")
    ghost = frames["events"].copy()
    ghost.loc[ghost.index[:7], "item_id"] = "ghost-item"
    pq.write_table(pa.Table.from_pandas(ghost, preserve_index=False), bad / "events_unknown_items.parquet")
    items = frames["items"].copy()
    items["price"] = items["price"].astype(str)
    items.loc[items.index[:3], "price"] = "call us"
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), bad / "items_bad_price.parquet")
    return {"frames": frames, **paths, "bad": bad}


# ---------------------------------------------------------------------------------------------
# (a) bring-your-own-data failures: exit 2, a message naming file/column/rows, no model


BAD_CASES = {
    "missing_column": ("events_no_timestamp.parquet", None, ["column 'timestamp'", "missing required column"]),
    "unknown_items": ("events_unknown_items.parquet", None, ["column 'item_id'", "7 rows failed", "ghost-item"]),
    "bad_price": (None, "items_bad_price.parquet", ["column 'price'", "3 rows failed", "float"]),
}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_exits_2_naming_file_column_and_rows(shop, tmp_path, case):
    events_name, items_name, phrases = BAD_CASES[case]
    events = str(shop["bad"] / events_name) if events_name else shop["events"]
    items = str(shop["bad"] / items_name) if items_name else shop["items"]
    home = tmp_path / "home"
    proc = _run(["quickstart", "--events", events, "--items", items, "--users", shop["users"],
                 "--epochs", "1", "--no-wait", "--port", str(_free_port()), "--home", str(home)], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    msg = _flat(proc.stderr)
    bad_file = events if events_name else items
    assert bad_file in msg, msg
    for phrase in phrases:
        assert phrase in msg, msg
    assert "Traceback" not in proc.stderr + proc.stdout
    # Nothing was trained or registered, and no lake was written.
    assert not [p for p in (home / "models").rglob("*") if p.is_file()]
    assert not (home / "lake" / "events").exists()
    if (home / "registry").exists():
        assert _registered_versions(home)[0] == []


@pytest.mark.timeout(300)
def test_events_without_items_exits_2(shop, tmp_path):
    home = tmp_path / "home"
    proc = _run(["quickstart", "--events", shop["events"], "--no-wait", "--port", str(_free_port()),
                 "--home", str(home)], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    msg = _flat(proc.stderr)
    assert "--events" in msg and "--items" in msg, msg
    assert "Traceback" not in proc.stderr
    assert not (home / "lake" / "events").exists()
    assert not (home / "models").exists() or not any((home / "models").rglob("*.pt"))


@pytest.mark.timeout(300)
def test_data_import_refuses_bad_files_with_exit_2(shop, tmp_path):
    home = tmp_path / "home"
    bad = str(shop["bad"] / "events_unknown_items.parquet")
    proc = _run(["data", "import", "--events", bad, "--items", shop["items"], "--home", str(home)], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    msg = _flat(proc.stderr)
    assert bad in msg and "column 'item_id'" in msg and "7 rows failed" in msg, msg
    ok = _run(["data", "import", "--events", shop["events"], "--items", shop["items"], "--home", str(home)], tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    n_events = len(shop["frames"]["events"])
    assert f"imported {n_events:,} events, 60 items" in _flat(ok.stdout), ok.stdout


# ---------------------------------------------------------------------------------------------
# (b) the whole quickstart, then the API as a client calls it, then Ctrl-C


def _wait_until_serving(proc: subprocess.Popen, log: Path, port: int) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        if proc.poll() is not None:
            pytest.fail(f"quickstart exited with {proc.returncode} before serving:\n{text[-6000:]}")
        if "Press Ctrl-C to stop" in text:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200:
                    return text
            except httpx.HTTPError:
                pass
        time.sleep(2)
    pytest.fail(f"quickstart did not start serving within {STARTUP_TIMEOUT_S}s:\n"
                f"{log.read_text(errors='replace')[-6000:]}")


def _kill_session(sid: int) -> None:
    """SIGKILL every process left in the session the quickstart started (its Ray processes
    included: they change process group but not session), and nothing else."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.getsid(int(entry)) == sid:
                os.kill(int(entry), signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _stop(proc: subprocess.Popen, sig: int) -> int | None:
    """Send ``sig`` to the quickstart's process group (what Ctrl-C in a terminal does);
    returns the exit code, or None if it did not exit in time."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return None


@pytest.fixture(scope="module")
def served(shop, tmp_path_factory):
    """`aiplatform quickstart` (no --no-wait) running in its own session until a test stops it."""
    tmp = tmp_path_factory.mktemp("quickstart")
    home, port, log = tmp / "home", _free_port(), tmp / "quickstart.log"
    cmd = _cli() + ["quickstart", "--events", shop["events"], "--items", shop["items"],
                    "--users", shop["users"], "--epochs", "1", "--port", str(port), "--home", str(home)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        text = _wait_until_serving(proc, log, port)
        yield {"proc": proc, "port": port, "home": home, "log": log, "text": text, "tmp": tmp,
               "base": f"http://127.0.0.1:{port}"}
    finally:
        if proc.poll() is None:
            _stop(proc, signal.SIGTERM)
        _kill_session(proc.pid)
        if proc.poll() is None:
            proc.wait(timeout=30)


@pytest.mark.timeout(1200)
def test_quickstart_prints_stages_timings_and_a_curl_line(served, shop):
    flat = _flat(served["text"])
    base = served["base"]
    for stage in ("data", "ray", "features", "train", "index", "serve", "demo"):
        assert re.search(rf"✓ {stage}\b", flat), stage
    assert "quickstart stage timings" in flat
    for stage in ("data", "ray", "features", "train", "index", "serve", "demo", "total"):
        assert re.search(rf"\b{stage}\s*[│|]?\s*\d+\.\d\b", flat), stage
    assert f"curl -s -X POST {base}/v1/recommendations" in flat
    assert f"{base}/docs" in flat
    assert "API open (no API keys) because it listens on 127.0.0.1 only" in flat  # and says how to add keys
    assert "aiplatform keys create" in flat
    assert f"{len(shop['frames']['events']):,} events, 60 items, 120 users" in flat
    assert "recall@10" in flat and "popularity" in flat
    timings = json.loads((served["home"] / "quickstart_timings.json").read_text())
    assert {"data", "ray", "features", "train", "index", "serve", "demo", "total"} <= set(timings)
    assert all(v >= 0 for v in timings.values())


@pytest.mark.timeout(1200)
def test_quickstart_serves_the_http_api(served, shop):
    frames = shop["frames"]
    catalogue = set(frames["items"]["item_id"])
    events = frames["events"]
    with httpx.Client(base_url=served["base"], timeout=60) as client:
        health = client.get("/healthz")
        assert health.status_code == 200, health.text
        assert health.json()["items"] == len(catalogue)
        assert health.json()["model"] == {"name": MODEL, "version": 1}

        # A known user: k items from the catalogue, from model v1, nothing they bought.
        buyers = events[events["event_type"] == "purchase"]["user_id"].value_counts()
        user = buyers.index[0]
        r = client.post("/v1/recommendations", json={"user_id": user, "k": 5})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["user_id"] == user
        assert len(body["items"]) == 5
        ids = [i["item_id"] for i in body["items"]]
        assert len(set(ids)) == 5 and set(ids) <= catalogue
        assert body["model"] == {"name": MODEL, "version": 1}
        assert body["variant"] == "champion"
        assert body["request_id"]
        assert body.get("fallback") is None
        bought = set(events[(events["user_id"] == user) & (events["event_type"] == "purchase")]["item_id"])
        assert bought and not (bought & set(ids))
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)

        # An unknown user gets the popular items, marked as such.
        r = client.post("/v1/recommendations", json={"user_id": "never-seen-user", "k": 4})
        assert r.status_code == 200, r.text
        assert r.json()["fallback"] == "popular"
        assert len(r.json()["items"]) == 4
        assert {i["item_id"] for i in r.json()["items"]} <= catalogue

        # An absurd k is a 422 that names k.
        r = client.post("/v1/recommendations", json={"user_id": user, "k": 10**9})
        assert r.status_code == 422, r.text
        assert "k" in r.json()["message"] and "1..100" in r.json()["message"]

        item = ids[0]
        r = client.get(f"/v1/items/{item}/similar", params={"k": 5})
        assert r.status_code == 200, r.text
        similar = [i["item_id"] for i in r.json()["items"]]
        assert len(similar) == 5 and item not in similar and set(similar) <= catalogue

        r = client.get("/v1/items/no-such-item/similar")
        assert r.status_code == 404, r.text
        assert "no-such-item" in r.json()["detail"]

        assert client.get("/docs").status_code == 200
        assert "/v1/recommendations" in client.get("/openapi.json").json()["paths"]


@pytest.mark.timeout(1200)
def test_ctrl_c_stops_the_quickstart(served):
    # Regression: Ray Train V2's fit() installs its own SIGINT handler in the driver; unless
    # the quickstart takes SIGINT back before serving, Ctrl-C is swallowed and serving goes on.
    proc = served["proc"]
    assert proc.poll() is None, "the quickstart stopped before Ctrl-C"
    # Ctrl-C in a terminal signals the whole foreground process group.
    code = _stop(proc, signal.SIGINT)
    assert code == 0, f"exit code {code} after SIGINT:\n{served['log'].read_text(errors='replace')[-3000:]}"


@pytest.mark.timeout(1200)
def test_quickstart_stops_cleanly_and_a_bad_rerun_changes_nothing(served, shop):
    proc, port, home = served["proc"], served["port"], served["home"]
    if proc.poll() is None:  # not stopped by the Ctrl-C test: stop it as `kill` would
        code = _stop(proc, signal.SIGTERM)
    else:
        code = proc.returncode
    assert code == 0, f"exit code {code}:\n{served['log'].read_text(errors='replace')[-3000:]}"
    assert "stopping" in served["log"].read_text(errors="replace")
    deadline = time.monotonic() + 30
    while _port_open(port) and time.monotonic() < deadline:
        time.sleep(1)
    assert not _port_open(port), f"port {port} still open after the quickstart exited"

    # A later run with bad data in the same home changes nothing that is already there.
    versions_before = _registered_versions(home)
    assert versions_before == ([1], {"champion": 1})
    lake_dir, registry_dir, models_dir = home / "lake", home / "registry", home / "models"
    before = _snapshot(lake_dir, registry_dir, models_dir)
    assert any("/lake/events/" in k for k in before) and any("/models/" in k for k in before)
    lake_events = pd.read_parquet(lake_dir / "events")
    for bad_args in (
        ["--events", str(shop["bad"] / "events_unknown_items.parquet"), "--items", shop["items"]],
        ["--events", shop["events"], "--items", str(shop["bad"] / "items_bad_price.parquet")],
    ):
        rerun = _run(["quickstart", *bad_args, "--epochs", "1", "--no-wait", "--port", str(_free_port()),
                      "--home", str(home)], served["tmp"])
        assert rerun.returncode == 2, rerun.stdout + rerun.stderr
        assert "rows failed" in _flat(rerun.stderr), rerun.stderr
        assert _snapshot(lake_dir, registry_dir, models_dir) == before
        assert _registered_versions(home) == versions_before
    pd.testing.assert_frame_equal(pd.read_parquet(lake_dir / "events"), lake_events)


@pytest.mark.timeout(1200)
def test_serve_answers_https_with_the_configured_certificate(served, shop, tmp_path):
    """`aiplatform serve --tls-cert --tls-key` on the quickstart's root, API keys on: HTTPS that
    verifies against the test CA, refused by a client that does not trust it, no plain HTTP."""
    import trustme

    home = served["home"]
    if served["proc"].poll() is None:
        _stop(served["proc"], signal.SIGTERM)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))

    half = _run(["serve", "--home", str(home), "--tls-cert", str(tmp_path / "cert.pem")], tmp_path, timeout=120)
    assert half.returncode == 2 and "--tls-key" in _flat(half.stderr), half.stdout + half.stderr

    created = _run(["keys", "create", "tls-reader", "--role", "reader", "--quiet", "--home", str(home)], tmp_path)
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    port, log = _free_port(), tmp_path / "serve.log"
    cmd = _cli() + ["serve", "--home", str(home), "--port", str(port),
                    "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while f"serving application 'aiplatform' at {base}" not in _flat(log.read_text(errors="replace")):
            assert proc.poll() is None, f"serve exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(2)
        user = str(shop["frames"]["events"]["user_id"].iloc[0])
        with httpx.Client(base_url=base, verify=str(tmp_path / "ca.pem"), timeout=30,
                          headers={"Authorization": f"Bearer {key}"}) as client:
            assert client.get("/healthz").status_code == 200
            r = client.post("/v1/recommendations", json={"user_id": user, "k": 5})
            assert r.status_code == 200, r.text
            assert len(r.json()["items"]) == 5
            assert client.post("/v1/recommendations", json={"user_id": user, "k": 5},
                               headers={"Authorization": "Bearer wrong"}).status_code == 401
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{base}/healthz", timeout=30)  # the system's CAs do not know the test CA
        with pytest.raises(httpx.HTTPError):
            r = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
            r.raise_for_status()  # cleartext gets no answer (a reset, or an error status at best)
    finally:
        code = _stop(proc, signal.SIGINT)
        _kill_session(proc.pid)
    assert code == 0, f"exit code {code} after Ctrl-C:\n{log.read_text(errors='replace')[-3000:]}"


# ---------------------------------------------------------------------------------------------
# (c) a storage root in an object store that cannot be used: exit 2 before any work starts


def _s3_env(endpoint: str, **changes: str | None) -> dict[str, str]:
    from tests.s3_server import s3_environment

    env = {**_env(), **s3_environment(endpoint)}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["missing bucket", "unreachable endpoint", "no credentials", "sqlite online store"])
def test_an_unusable_object_store_root_exits_2_naming_it(s3_server, shop, tmp_path, case):
    closed_port = _free_port()  # nothing listens there
    root, changes, phrases = {
        "missing bucket": ("s3://no-such-bucket/shop", {}, ["no-such-bucket", "does not exist"]),
        "unreachable endpoint": ("s3://aiplatform-test/shop", {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}"},
                                 ["cannot reach the object store", f"127.0.0.1:{closed_port}"]),
        "no credentials": ("s3://aiplatform-test/shop", {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
                           ["no credentials", "AWS_ACCESS_KEY_ID"]),
        "sqlite online store": ("s3://aiplatform-test/shop", {"AIPLATFORM_ONLINE_STORE": "sqlite"},
                                ["AIPLATFORM_ONLINE_STORE=redis://"]),
    }[case]
    env = _s3_env(s3_server, HOME=str(tmp_path), **changes)
    for args in (["quickstart", "--events", shop["events"], "--items", shop["items"], "--no-wait", "--home", root],
                 ["data", "import", "--events", shop["events"], "--items", shop["items"], "--home", root]):
        if case == "sqlite online store" and args[0] == "data":
            continue  # the online store is not used by an import
        proc = subprocess.run(_cli() + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        msg = _flat(proc.stderr)
        assert root in msg and all(p in msg for p in phrases), msg
        assert "Traceback" not in proc.stderr and "✓ ray" not in proc.stdout  # stopped before Ray started
    if case != "sqlite online store":  # the `ray job submit` entrypoint refuses the root the same way
        job = subprocess.run([sys.executable, "-m", "aiplatform.jobs.train", "--home", root], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=240)
        assert job.returncode == 2 and root in job.stderr, job.stdout + job.stderr
