"""Ray's gRPC TLS with the certificates the KubeRay manifests issue (aiplatform.security.node_cert):
a real `ray start --head` on a loopback address with RAY_USE_TLS=1 runs a driver's task, and its GCS port
answers only TLS. This is what every pod of the manifests runs, minus Kubernetes."""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trustme

from aiplatform.core.tls import speaks_tls
from tests.servers import free_port, kill_ray_node

BIN = Path(sys.executable).parent
# A loopback address Ray does not rewrite: it replaces 127.0.0.1 in an address with the
# machine's outward IP, which the test must neither dial nor put in the certificate.
NODE_IP = "127.0.0.2"
DRIVER = """
import ray
ray.init(address="{address}", log_to_driver=False)
@ray.remote
def double(x):
    return 2 * x
print("answer", ray.get(double.remote(21)))
"""


@pytest.mark.timeout(600)
def test_a_ray_node_with_issued_certificates_runs_tasks_over_tls(tmp_path):
    ca = trustme.CA()
    ca_dir = tmp_path / "ca"
    ca_dir.mkdir()
    ca.cert_pem.write_to_path(str(ca_dir / "ca.crt"))
    ca.private_key_pem.write_to_path(str(ca_dir / "ca.key"))
    issued = subprocess.run([sys.executable, "-m", "aiplatform.security.node_cert", "--ca-dir", str(ca_dir),
                             "--out", str(tmp_path / "tls"), "--ip", NODE_IP, "--dns", "localhost"],
                            capture_output=True, text=True, timeout=60)
    assert issued.returncode == 0, issued.stderr

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AIPLATFORM_"))}
    env.update(RAY_USE_TLS="1", RAY_TLS_SERVER_CERT=str(tmp_path / "tls" / "tls.crt"),
               RAY_TLS_SERVER_KEY=str(tmp_path / "tls" / "tls.key"), RAY_TLS_CA_CERT=str(tmp_path / "tls" / "ca.crt"),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0")
    gcs = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray puts unix sockets under it
    log = tmp_path / "head.log"
    with open(log, "wb") as out:
        head = subprocess.Popen(
            [str(BIN / "ray"), "start", "--block", "--head", "--node-ip-address", NODE_IP, "--port", str(gcs),
             "--include-dashboard", "false", "--num-cpus", "1", "--object-store-memory", "100000000",
             "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
             "--temp-dir", temp_dir], env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path,
            start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        driver = None
        while time.monotonic() < deadline and head.poll() is None:
            if speaks_tls(NODE_IP, gcs, timeout_s=2):
                driver = subprocess.run([sys.executable, "-c", DRIVER.format(address=f"{NODE_IP}:{gcs}")],
                                        env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)
                break
            time.sleep(2)
        assert driver is not None, "the head's GCS never answered TLS:\n" + log.read_text(errors="replace")[-4000:]
        assert "answer 42" in driver.stdout, driver.stdout + driver.stderr[-4000:]
    finally:
        if head.poll() is None:
            head.send_signal(signal.SIGTERM)
            try:
                head.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        kill_ray_node(head.pid, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
