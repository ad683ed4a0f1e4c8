import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.redis_server import online_store, redis_url  # noqa: E402,F401  (fixtures: a real redis-server)
from tests.s3_server import s3_env, s3_root, s3_server  # noqa: E402,F401  (fixtures: a real S3-compatible server)
from tests.gcs_server import gcs_env, gcs_root, gcs_server  # noqa: E402,F401  (fixtures: a GCS emulator)
from tests.azure_server import azure_env, azure_root, azure_server  # noqa: E402,F401  (fixtures: Azurite)


@pytest.fixture()
def home(tmp_path, monkeypatch):
    """A fresh storage root for one test."""
    h = tmp_path / "home"
    monkeypatch.setenv("AIPLATFORM_HOME", str(h))
    return h
