"""A real Azure Blob Storage emulator for tests: Azurite (npm ``azurite``, Microsoft's emulator)
on a free port of 127.0.0.1, started by the tests and stopped by its own pid.

``make setup`` installs it into ``.cache/azurite``; when it is missing the session fixture
installs it there itself (npm), and skips, saying why, only when npm cannot install it.
``azure_server`` (session) yields the blob endpoint, with the test container created;
``azure_env`` sets the standard variables (``AZURE_STORAGE_USE_EMULATOR``,
``AZURITE_BLOB_STORAGE_URL``, account name and key) for one test; ``azure_root`` gives that test
a fresh ``abfs://container@account.dfs.core.windows.net/prefix`` storage root.
"""

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import answers_http, free_port, serve_process, use_environment

REPO = Path(__file__).resolve().parents[1]
INSTALL_DIR = REPO / ".cache" / "azurite"
AZURITE_VERSION = "3"
CONTAINER = "aiplatform-test"
ACCOUNT = "devstoreaccount1"
# Azurite's well-known key: public, the same on every install of the emulator.
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURE_VARIABLES = ("AZURE_STORAGE_USE_EMULATOR", "AZURITE_BLOB_STORAGE_URL", "AZURE_STORAGE_ENDPOINT",
                   "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY", "AZURE_STORAGE_SAS_TOKEN",
                   "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET", "AZURE_TENANT_ID")


def find_azurite() -> str | None:
    """AZURITE_BLOB, else the repo-local install (``make setup``), else azurite-blob on PATH."""
    for candidate in (os.environ.get("AZURITE_BLOB"), str(INSTALL_DIR / "node_modules" / ".bin" / "azurite-blob"),
                      shutil.which("azurite-blob")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def install_azurite() -> str:
    """Install Azurite into ``.cache/azurite`` with npm (what ``make setup`` does); skip the
    tests that need it, with the reason, when npm is missing or the install fails."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("Azure tests need Azurite, and npm (Node.js) is not installed to install it: "
                    "install Node.js 18+ and run `make setup`")
    try:
        result = subprocess.run([npm, "install", "--no-save", "--no-audit", "--no-fund", "--prefix", str(INSTALL_DIR),
                                 f"azurite@{AZURITE_VERSION}"], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.skip(f"Azure tests need Azurite and `npm install azurite@{AZURITE_VERSION}` did not finish in "
                    "300 s (no npm registry?): run `make setup` where it is reachable")
    binary = find_azurite()
    if result.returncode != 0 or binary is None:
        pytest.skip(f"Azure tests need Azurite and `npm install azurite@{AZURITE_VERSION}` failed "
                    f"(exit {result.returncode}): {result.stderr.strip()[-500:]}")
    return binary


@contextmanager
def azurite(workdir: Path, binary: str, timeout_s: float = 30.0) -> Iterator[str]:
    """Run Azurite's blob service on 127.0.0.1 and yield its URL (without the account)."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [binary, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--location", str(workdir / "data"),
           "--skipApiVersionCheck", "--loose", "--disableTelemetry"]
    # any HTTP answer (400 for this bare URL) means it listens
    with serve_process(cmd, workdir, lambda: answers_http(url), "azurite-blob", timeout_s, log_name="azurite.log"):
        yield url


def azure_environment(url: str) -> dict[str, str]:
    """The standard variables a user sets for Azurite (what Ray nodes get too)."""
    return {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": url,
            "AZURE_STORAGE_ACCOUNT_NAME": ACCOUNT, "AZURE_STORAGE_ACCOUNT_KEY": KEY}


def create_container(url: str, container: str = CONTAINER) -> None:
    import pyarrow.fs as pafs

    authority = url.split("://", 1)[1]
    fs = pafs.AzureFileSystem(account_name=ACCOUNT, account_key=KEY, blob_storage_authority=authority,
                              dfs_storage_authority=authority, blob_storage_scheme="http", dfs_storage_scheme="http")
    if fs.get_file_info(container).type == pafs.FileType.NotFound:
        fs.create_dir(container)


@pytest.fixture(scope="session")
def azure_server(tmp_path_factory) -> Iterator[str]:
    """URL of an Azurite blob service for the whole session, with the test container created."""
    binary = find_azurite() or install_azurite()
    with azurite(tmp_path_factory.mktemp("azurite"), binary) as url:
        create_container(url)
        yield url


@pytest.fixture()
def azure_env(azure_server, monkeypatch) -> dict[str, str]:
    """The Azure variables of the session's Azurite, set for this test (and what it starts);
    other Azure variables are removed so nothing reaches for a real account."""
    return use_environment(monkeypatch, azure_environment(azure_server), clear=AZURE_VARIABLES)


@pytest.fixture()
def azure_root(azure_env) -> str:
    """A fresh storage root in the container: ``abfs://aiplatform-test@devstoreaccount1.dfs.core.windows.net/<prefix>``."""
    return f"abfs://{CONTAINER}@{ACCOUNT}.dfs.core.windows.net/{uuid.uuid4().hex[:12]}"
