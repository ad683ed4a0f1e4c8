"""A real GCS emulator for tests: PyPI ``gcp-storage-emulator`` (the JSON API that pyarrow's
GcsFileSystem speaks) on a free port of 127.0.0.1, started by the tests and stopped by its pid.

``gcs_server`` (session) yields its URL, with the test bucket created; ``gcs_env`` points
``STORAGE_EMULATOR_HOST`` (the google-cloud clients' emulator variable) at it for one test;
``gcs_root`` gives that test a fresh ``gs://bucket/prefix`` storage root.

Not covered by this emulator: the XML API that Lance's object_store client uses (see
tests/unit/test_storage_clouds.py), so Lance tables are proven on S3 and Azure, not on GCS.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

BUCKET = "aiplatform-test"
GCS_VARIABLES = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT",
                 "GOOGLE_SERVICE_ACCOUNT_KEY", "GOOGLE_SERVICE_ACCOUNT_PATH")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def gcs_emulator(workdir: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """Run gcp-storage-emulator (in memory) on 127.0.0.1 with ``BUCKET`` created; yield its URL."""
    port = _free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = open(workdir / "gcs-emulator.log", "wb")
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
           "--in-memory", "--default-bucket", BUCKET]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gcp-storage-emulator exited with {proc.returncode}; "
                                   f"see {workdir / 'gcs-emulator.log'} (pip install gcp-storage-emulator)")
            try:
                if httpx.get(f"{url}/storage/v1/b/{BUCKET}", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gcp-storage-emulator did not answer within {timeout_s}s")
            time.sleep(0.1)
        yield url
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


def gcs_environment(url: str) -> dict[str, str]:
    """The standard variable a user sets for a GCS emulator (what Ray nodes get too)."""
    return {"STORAGE_EMULATOR_HOST": url}


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory) -> Iterator[str]:
    """URL of a GCS emulator for the whole session, with the test bucket created."""
    with gcs_emulator(tmp_path_factory.mktemp("gcs")) as url:
        yield url


@pytest.fixture()
def gcs_env(gcs_server, monkeypatch) -> dict[str, str]:
    """``STORAGE_EMULATOR_HOST`` of the session's emulator, set for this test; other Google
    credential variables are removed so nothing reaches for a real account."""
    for name in GCS_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    env = gcs_environment(gcs_server)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env


@pytest.fixture()
def gcs_root(gcs_env) -> str:
    """A fresh storage root in the bucket: ``gs://aiplatform-test/<unique prefix>``."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
