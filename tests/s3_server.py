"""A real S3-compatible server for tests: moto's standalone server (PyPI ``moto[server]``) on a
free port of 127.0.0.1, started by the tests and stopped by its own pid.

``s3_server`` (session) yields its endpoint; ``s3_env`` points the standard AWS variables at it
for one test; ``s3_root`` gives that test a fresh ``s3://bucket/prefix`` storage root.
Instance-metadata lookups are switched off, so no client ever leaves loopback for credentials.
"""

import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import answers_http, free_port, serve_process, use_environment

BUCKET = "aiplatform-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def s3_environment(endpoint: str) -> dict[str, str]:
    """The standard variables a user sets for an S3-compatible store (what Ray nodes get too)."""
    return {**CREDENTIALS, "AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@contextmanager
def moto_server(workdir: Path, timeout_s: float = 30.0) -> Iterator[str]:
    """Run moto's S3 server on 127.0.0.1 and yield its endpoint URL; stop it at exit."""
    binary = Path(sys.executable).parent / "moto_server"
    cmd = [str(binary)] if binary.exists() else [sys.executable, "-m", "moto.server"]
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    with serve_process([*cmd, "-H", "127.0.0.1", "-p", str(port)], workdir, lambda: answers_http(endpoint),
                       "moto_server", timeout_s, log_name="moto.log"):
        yield endpoint


def create_bucket(endpoint: str, bucket: str = BUCKET) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{
        "aws_access_key_id": CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": CREDENTIALS["AWS_SECRET_ACCESS_KEY"]})
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[str]:
    """Endpoint of a moto S3 server for the whole session, with the test bucket created."""
    with moto_server(tmp_path_factory.mktemp("moto")) as endpoint:
        create_bucket(endpoint)
        yield endpoint


@pytest.fixture()
def s3_env(s3_server, monkeypatch) -> dict[str, str]:
    """The AWS variables of the session's server, set for this test (and the processes it starts)."""
    return use_environment(monkeypatch, s3_environment(s3_server))


@pytest.fixture()
def s3_root(s3_env) -> str:
    """A fresh storage root in the bucket: ``s3://aiplatform-test/<unique prefix>``."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"
