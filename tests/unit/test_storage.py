"""The storage helpers (``aiplatform.core.storage``) on a local folder and on a real S3-compatible
server (moto's standalone server; no Ray): the same calls must behave the same on both."""

import json
import socket
import uuid
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError
from aiplatform.core.storage import Layout, filesystem_for, storage_options
from tests.s3_server import BUCKET


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    """A fresh storage root: a local folder, or a prefix of the moto server's bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_root")


def test_json_and_bytes_round_trip(root):
    path = storage.join(root, "features", "_state", "view.json")
    assert storage.read_json(path) is None and storage.read_json(path, default={}) == {}
    assert not storage.exists(path) and storage.mtime(path) is None and storage.read_bytes(path) is None
    storage.write_json(path, {"watermark_us": 5, "nested": {"a": [1, 2]}})
    assert storage.read_json(path) == {"watermark_us": 5, "nested": {"a": [1, 2]}}
    assert storage.exists(path) and not storage.is_dir(path) and storage.mtime(path) > 0
    assert storage.is_dir(storage.join(root, "features", "_state"))
    storage.write_json(path, {"watermark_us": 6})  # replaced whole, never merged
    assert storage.read_json(path) == {"watermark_us": 6}
    storage.write_bytes(storage.join(root, "blob.bin"), b"\x00\x01")
    assert storage.read_bytes(storage.join(root, "blob.bin")) == b"\x00\x01"


def test_list_files_and_dirs(root):
    folder = storage.join(root, "eventlog")
    assert storage.list_files(folder) == [] and storage.list_dirs(folder) == []
    for name in ("events-2.parquet", "events-1.parquet", "other.parquet", "events-3.tmp"):
        storage.write_bytes(storage.join(folder, name), b"x")
    storage.write_bytes(storage.join(folder, "sub", "events-0.parquet"), b"x")  # not listed: not direct
    got = storage.list_files(folder, suffix=".parquet", prefix="events-")
    assert got == [storage.join(folder, "events-1.parquet"), storage.join(folder, "events-2.parquet")]
    if root.startswith("s3://"):  # paths come back in the folder's own form
        assert all(p.startswith(root + "/") for p in got)
    assert [Path(p).name for p in storage.list_files(folder)] == [
        "events-1.parquet", "events-2.parquet", "events-3.tmp", "other.parquet"]
    assert storage.list_dirs(folder) == ["sub"]
    storage.delete_file(got[0])
    storage.delete_file(got[0])  # missing is fine
    assert storage.list_files(folder, suffix=".parquet", prefix="events-") == got[1:]


def test_delete_dir_removes_everything_under_it(root):
    storage.write_bytes(storage.join(root, "lake", "events", "g1", "part-0.parquet"), b"a")
    storage.write_bytes(storage.join(root, "lake", "events", "g2", "part-0.parquet"), b"b")
    storage.delete_dir(storage.join(root, "lake", "events", "g1"))
    assert storage.list_dirs(storage.join(root, "lake", "events")) == ["g2"]
    assert not storage.exists(storage.join(root, "lake", "events", "g1", "part-0.parquet"))
    storage.delete_dir(storage.join(root, "lake", "nothing-here"))  # missing is fine
    assert storage.read_bytes(storage.join(root, "lake", "events", "g2", "part-0.parquet")) == b"b"


def test_upload_dir_and_local_copy(root, tmp_path, monkeypatch):
    monkeypatch.setenv("AIPLATFORM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "artifact"
    (src / "inner").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"weights")
    (src / "inner" / "config.json").write_text('{"dim": 8}')
    dest = storage.join(root, "models", "two_tower", "1")
    storage.upload_dir(str(src), dest)
    assert storage.read_bytes(storage.join(dest, "model.pt")) == b"weights"
    local = storage.local_copy(dest)
    assert Path(local, "model.pt").read_bytes() == b"weights"
    assert Path(local, "inner", "config.json").read_text() == '{"dim": 8}'
    if root.startswith("s3://"):
        assert local.startswith(str(tmp_path / "cache"))
        assert storage.local_copy(dest) == local  # cached: downloaded once per node
        with pytest.raises(FileNotFoundError):
            storage.local_copy(storage.join(root, "models", "missing", "1"))
    else:
        assert local == str(Path(dest).resolve())


def test_layout_open_checks_a_good_root(root):
    layout = Layout.open(root)
    assert layout.is_remote == root.startswith("s3://")
    if not layout.is_remote:
        assert Path(layout.lake).is_dir()
    assert storage.list_files(layout.root, prefix=".aiplatform-probe") == []  # the probe is deleted


# ---- check_root: each failure is a ConfigError naming the root and what is missing -------------
def test_missing_bucket_is_named(s3_env):
    root = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/home"
    with pytest.raises(ConfigError) as info:
        storage.check_root(root)
    message = str(info.value)
    assert root in message and "does not exist" in message and "no-such-bucket" in message


def test_unreachable_endpoint_is_named(s3_env, monkeypatch):
    root = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    storage.check_root(root)  # fine on the running server...
    with socket.socket() as s:  # ...then the endpoint moves to a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError) as info:  # checked again: a success is not cached across endpoints
        storage.check_root(root)
    message = str(info.value)
    assert root in message and "cannot reach" in message and f"127.0.0.1:{port}" in message
    assert "AWS_ENDPOINT_URL" in message


def test_missing_credentials_are_named(s3_env, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN",
                 "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                 "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    root = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
    with pytest.raises(ConfigError) as info:
        storage.check_root(root)
    message = str(info.value)
    assert root in message and "no credentials" in message and "AWS_ACCESS_KEY_ID" in message


# ---- what Lance and pyarrow are handed (no network) ------------------------------------------
def test_storage_options_for_an_http_endpoint(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    assert storage_options("s3://bucket/home/features/v.lance") == {
        "aws_endpoint": "http://127.0.0.1:9000", "allow_http": "true", "aws_region": "eu-west-1"}
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example.com")
    assert "allow_http" not in storage_options("s3://bucket/home")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    assert storage_options("s3://bucket/home") == {"aws_region": "eu-west-1"}
    assert storage_options("/a/local/folder") == {}


def test_filesystem_for_gcs_and_azure_uris():
    fs, inside = filesystem_for("gs://my-bucket/home/lake/events")
    assert isinstance(fs, pafs.GcsFileSystem) and inside == "my-bucket/home/lake/events"
    fs, inside = filesystem_for("abfs://container@acct.dfs.core.windows.net/p/features")
    assert isinstance(fs, pafs.AzureFileSystem) and inside == "container/p/features"
    fs, inside = filesystem_for("s3://bucket/home/")
    assert isinstance(fs, pafs.S3FileSystem) and inside == "bucket/home"
    fs, inside = filesystem_for("relative/folder")
    assert isinstance(fs, pafs.LocalFileSystem) and inside == str(Path("relative/folder").resolve())


# ---- gs:// and abfs:// from the standard environment (no network; the emulators are in -----
# ---- tests/unit/test_storage_clouds.py) ------------------------------------------------------
def _options(fs: pafs.FileSystem) -> dict:
    """The options a pyarrow filesystem was made with (what a Ray worker unpickles too)."""
    return fs.__reduce__()[1][0]


@pytest.fixture()
def no_cloud_env(monkeypatch):
    for name in ("STORAGE_EMULATOR_HOST", "AZURE_STORAGE_USE_EMULATOR", "AZURITE_BLOB_STORAGE_URL",
                 "AZURE_STORAGE_ENDPOINT", "AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_ACCOUNT_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_gcs_emulator_from_storage_emulator_host(no_cloud_env, monkeypatch):
    assert storage_options("gs://bucket/home") == {}
    assert not _options(filesystem_for("gs://bucket/home")[0])["anonymous"]  # the default credentials
    for value in ("http://127.0.0.1:9023", "127.0.0.1:9023"):  # with or without a scheme
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", value)
        fs, inside = filesystem_for("gs://bucket/home/lake")
        got = _options(fs)
        assert inside == "bucket/home/lake"
        assert (got["endpoint_override"], got["scheme"], got["anonymous"]) == ("127.0.0.1:9023", "http", True)
        options = storage_options("gs://bucket/home/features/v.lance")
        assert options["allow_http"] == "true"
        key = json.loads(options["google_service_account_key"])
        assert key["gcs_base_url"] == "http://127.0.0.1:9023" and key["disable_oauth"] is True


def test_azure_emulator_endpoint_and_account_from_the_environment(no_cloud_env, monkeypatch):
    uri = "abfss://box@acct.dfs.core.windows.net/home"
    assert storage_options(uri) == {"azure_storage_account_name": "acct", "azure_storage_use_emulator": "false"}
    got = _options(filesystem_for(uri)[0])
    assert got["account_name"] == "acct" and got["blob_storage_authority"] in ("", ".blob.core.windows.net")

    monkeypatch.setenv("AZURE_STORAGE_USE_EMULATOR", "true")  # Azurite: its account and published key
    monkeypatch.setenv("AZURITE_BLOB_STORAGE_URL", "http://127.0.0.1:10050")
    fs, inside = filesystem_for("abfs://box/home")
    got = _options(fs)
    assert inside == "box/home" and got["account_name"] == "devstoreaccount1" and got["account_key"]
    assert (got["blob_storage_authority"], got["blob_storage_scheme"]) == ("127.0.0.1:10050", "http")
    assert storage_options("abfs://box/home") == {"azure_storage_account_name": "devstoreaccount1",
                                                  "azure_storage_use_emulator": "true"}

    monkeypatch.delenv("AZURE_STORAGE_USE_EMULATOR")  # any other blob endpoint, host-style
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", "https://acct.blob.core.chinacloudapi.cn")
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_KEY", "a2V5")
    got = _options(filesystem_for(uri)[0])
    assert (got["blob_storage_authority"], got["dfs_storage_authority"], got["blob_storage_scheme"]) == (
        ".blob.core.chinacloudapi.cn", ".dfs.core.chinacloudapi.cn", "https")
    assert got["account_key"] == "a2V5"
    assert storage_options(uri) == {"azure_storage_account_name": "acct", "azure_storage_use_emulator": "false",
                                    "azure_storage_endpoint": "https://acct.blob.core.chinacloudapi.cn"}
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", "https://other.blob.core.windows.net")
    with pytest.raises(ConfigError, match="AZURE_STORAGE_ENDPOINT"):
        filesystem_for("abfss://box@acct2.dfs.core.windows.net/home")


def test_azure_root_needs_an_account(no_cloud_env):
    with pytest.raises(ConfigError, match="AZURE_STORAGE_ACCOUNT_NAME"):
        filesystem_for("abfs://box-without-account/home")


def test_an_abfs_root_is_kept_as_abfss():
    """Lance opens az:// and abfss:// only; pyarrow takes either."""
    assert Layout.at("abfs://box@acct.dfs.core.windows.net/home/").root == "abfss://box@acct.dfs.core.windows.net/home"
    assert Layout.at("abfss://box@acct.dfs.core.windows.net/home").root == "abfss://box@acct.dfs.core.windows.net/home"
    assert Layout.at("az://box/home").root == "az://box/home"
    assert Layout.at("gs://bucket/home").feature_table("v") == "gs://bucket/home/features/v.lance"
