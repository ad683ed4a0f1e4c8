"""A real GCS emulator for tests: PyPI ``gcp-storage-emulator`` (the JSON API that pyarrow's
GcsFileSystem speaks) on a free port of 127.0.0.1, started by the tests and stopped by its pid.

``gcs_server`` (session) yields its URL, with the test bucket created; ``gcs_env`` points
``STORAGE_EMULATOR_HOST`` (the google-cloud clients' emulator variable) at it for one test;
``gcs_root`` gives that test a fresh ``gs://bucket/prefix`` storage root.

Not covered by this emulator: the XML API that Lance's object_store client uses (see
tests/unit/test_storage_clouds.py), so Lance tables are proven on S3 and Azure, not on GCS.
"""

import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import answers_http, free_port, serve_process, use_environment

BUCKET = "aiplatform-test"
GCS_VARIABLES = ("STORAGE_EMULATOR_HOST", "GOOGLE_APPLICATION_CREDENTIALS", "GOOGLE_SERVICE_ACCOUNT",
                 "GOOGLE_SERVICE_ACCOUNT_KEY", "GOOGLE_SERVICE_ACCOUNT_PATH")


@contextmanager
def gcs_emulator(workdir: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """Run gcp-storage-emulator (in memory) on 127.0.0.1 with ``BUCKET`` created; yield its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "gcp_storage_emulator", "start", "--host", "127.0.0.1", "--port", str(port),
           "--in-memory", "--default-bucket", BUCKET]
    with serve_process(cmd, workdir, lambda: answers_http(f"{url}/storage/v1/b/{BUCKET}", status=200),
                       "gcp-storage-emulator", timeout_s, log_name="gcs-emulator.log",
                       hint="pip install gcp-storage-emulator"):
        yield url


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
    return use_environment(monkeypatch, gcs_environment(gcs_server), clear=GCS_VARIABLES)


@pytest.fixture()
def gcs_root(gcs_env) -> str:
    """A fresh storage root in the bucket: ``gs://aiplatform-test/<unique prefix>``."""
    return f"gs://{BUCKET}/{uuid.uuid4().hex[:12]}"
