"""Storage roots on Google Cloud Storage (``gs://``) and Azure (``abfs://``), each against an
emulator the tests start on 127.0.0.1 (tests/gcs_server.py, tests/azure_server.py), reached
through the same pyarrow filesystems and Lance options as S3, with the endpoint and credentials
from the standard environment (``STORAGE_EMULATOR_HOST``; ``AZURE_STORAGE_USE_EMULATOR`` with
``AZURITE_BLOB_STORAGE_URL``, or ``AZURE_STORAGE_ENDPOINT``). No Ray.

What is proven where:

* both clouds: the storage helpers, ``check_root``'s errors, the lake (import, read);
* Azure (Azurite) also: Lance tables and LanceDB (the model registry) through ``storage_options``;
* GCS: Lance's client is pointed at the emulator (``storage_options``) but cannot work there:
  object_store's GCS client speaks the XML API (``GET /bucket?list-type=2``, XML multipart,
  ``x-goog-if-generation-match``; object_store src/gcp/client.rs), which gcp-storage-emulator
  does not implement (501). ``test_lance_reaches_the_gcs_emulator_which_lacks_the_xml_api``
  pins that down, so it fails, and says so, the day the emulator gains it.
"""

import socket
import uuid
from pathlib import Path

import lance
import pandas as pd
import pyarrow as pa
import pytest

from apps.shop.generate import ShopSize, generate, write
from aiplatform.core import storage
from aiplatform.core.errors import ConfigError
from aiplatform.core.storage import Layout, storage_options
from aiplatform.data import lake
from aiplatform.registry import ModelRegistry
from tests.azure_server import ACCOUNT, CONTAINER


@pytest.fixture(params=["gcs", "azure"])
def cloud_root(request) -> str:
    """A fresh storage root on the GCS emulator or on Azurite."""
    return request.getfixturevalue(f"{request.param}_root")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the storage helpers -------------------------------------------------------------------
def test_files_json_and_listing(cloud_root):
    path = storage.join(cloud_root, "features", "_state", "view.json")
    assert storage.read_json(path) is None and not storage.exists(path) and storage.mtime(path) is None
    storage.write_json(path, {"watermark_us": 5, "nested": {"a": [1, 2]}})
    assert storage.read_json(path) == {"watermark_us": 5, "nested": {"a": [1, 2]}}
    assert storage.exists(path) and not storage.is_dir(path) and storage.mtime(path) > 0
    assert storage.is_dir(storage.join(cloud_root, "features", "_state"))  # a folder no one created
    storage.write_json(path, {"watermark_us": 6})
    assert storage.read_json(path) == {"watermark_us": 6}

    folder = storage.join(cloud_root, "eventlog")
    assert storage.list_files(folder) == [] and storage.list_dirs(folder) == []
    for name in ("events-2.parquet", "events-1.parquet", "other.parquet"):
        storage.write_bytes(storage.join(folder, name), b"x")
    storage.write_bytes(storage.join(folder, "g1", "part-0.parquet"), b"a")
    storage.write_bytes(storage.join(folder, "g2", "deep", "part-0.parquet"), b"b")
    got = storage.list_files(folder, suffix=".parquet", prefix="events-")
    assert got == [f"{folder}/events-1.parquet", f"{folder}/events-2.parquet"]
    assert storage.list_dirs(folder) == ["g1", "g2"]  # folders that exist only as key prefixes

    storage.delete_dir(storage.join(folder, "g2"))
    assert storage.list_dirs(folder) == ["g1"] and not storage.exists(storage.join(folder, "g2", "deep"))
    storage.delete_dir(storage.join(folder, "nothing-here"))  # missing is fine
    storage.delete_file(got[0])
    storage.delete_file(got[0])
    assert storage.list_files(folder, suffix=".parquet") == [f"{folder}/events-2.parquet", f"{folder}/other.parquet"]
    assert storage.read_bytes(storage.join(folder, "g1", "part-0.parquet")) == b"a"


def test_upload_dir_and_local_copy(cloud_root, tmp_path, monkeypatch):
    monkeypatch.setenv("AIPLATFORM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "artifact"
    (src / "inner").mkdir(parents=True)
    (src / "model.pt").write_bytes(b"weights")
    (src / "inner" / "config.json").write_text('{"dim": 8}')
    dest = storage.join(cloud_root, "models", "two_tower", "1")
    storage.upload_dir(str(src), dest)
    assert storage.read_bytes(storage.join(dest, "model.pt")) == b"weights"
    assert storage.list_dirs(storage.join(cloud_root, "models", "two_tower")) == ["1"]
    local = storage.local_copy(dest)
    assert local.startswith(str(tmp_path / "cache"))
    assert Path(local, "model.pt").read_bytes() == b"weights"
    assert Path(local, "inner", "config.json").read_text() == '{"dim": 8}'
    with pytest.raises(FileNotFoundError):
        storage.local_copy(storage.join(cloud_root, "models", "missing", "1"))
    storage.delete_dir(dest)  # a folder with marker objects (upload_dir made them) goes too
    assert not storage.exists(dest) and storage.list_dirs(storage.join(cloud_root, "models", "two_tower")) == []


# ---- check_root ----------------------------------------------------------------------------
def test_layout_open_checks_a_good_root(cloud_root):
    layout = Layout.open(cloud_root)
    assert layout.is_remote
    assert storage.list_files(layout.root, prefix=".aiplatform-probe") == []  # the probe is deleted


@pytest.mark.parametrize("cloud", ["gcs", "azure"])
def test_missing_bucket_or_container_is_named(cloud, request):
    request.getfixturevalue(f"{cloud}_env")
    name = f"no-such-{uuid.uuid4().hex[:8]}"
    root = f"gs://{name}/home" if cloud == "gcs" else f"abfs://{name}@{ACCOUNT}.dfs.core.windows.net/home"
    noun = "bucket" if cloud == "gcs" else "container"
    with pytest.raises(ConfigError) as info:
        storage.check_root(root)
    message = str(info.value)
    assert root in message and f"{noun} '{name}' does not exist" in message and "127.0.0.1" in message


@pytest.mark.parametrize("cloud", ["gcs", "azure"])
def test_unreachable_endpoint_is_named(cloud, request, monkeypatch):
    root = request.getfixturevalue(f"{cloud}_root")
    storage.check_root(root)  # fine on the running emulator...
    port = _closed_port()  # ...then the endpoint moves to a port nobody listens on
    setting = "STORAGE_EMULATOR_HOST" if cloud == "gcs" else "AZURITE_BLOB_STORAGE_URL"
    monkeypatch.setenv(setting, f"http://127.0.0.1:{port}")
    with pytest.raises(ConfigError) as info:  # checked again: a success is not cached across endpoints
        storage.check_root(root)
    message = str(info.value)
    assert root in message and "cannot reach" in message and f"127.0.0.1:{port}" in message and setting in message


# ---- the data layer ------------------------------------------------------------------------
def test_lake_import_and_read(cloud_root, tmp_path):
    frames = generate(ShopSize(users=60, items=30), seed=3)
    files = write(frames, str(tmp_path / "in"))
    layout = Layout.open(cloud_root)
    summary = lake.import_files(layout, files["events"], files["items"], files["users"])
    assert (summary.events, summary.items, summary.users) == (len(frames["events"]), 30, 60)

    paths = lake.table_files(layout, "events")
    generation = lake.table_generation(layout, "events")
    assert paths and all(p.startswith(f"{layout.root}/lake/events/{generation}/") for p in paths)
    events = lake.read_events(layout).sort_values(["timestamp", "user_id", "item_id"]).reset_index(drop=True)
    expected = frames["events"].sort_values(["timestamp", "user_id", "item_id"]).reset_index(drop=True)
    assert len(events) == len(expected)
    assert events["user_id"].tolist() == expected["user_id"].tolist()
    assert events["item_id"].tolist() == expected["item_id"].tolist()
    assert (pd.to_datetime(events["timestamp"], utc=True) == pd.to_datetime(expected["timestamp"], utc=True)).all()
    assert sorted(lake.read_items(layout)["item_id"]) == sorted(frames["items"]["item_id"])

    # a second import switches every table at once and drops the generation it replaced
    lake.import_files(layout, files["events"], files["items"], files["users"])
    second = lake.table_generation(layout, "events")
    assert second != generation
    assert storage.list_dirs(layout.lake_table("events")) == [second]
    assert len(lake.read_events(layout, columns=["user_id"])) == len(expected)


# ---- Lance (object_store's own client) -----------------------------------------------------
def test_abfs_root_is_kept_as_abfss_for_lance(azure_root):
    assert azure_root.startswith("abfs://")
    layout = Layout.at(azure_root)
    assert layout.root == "abfss://" + azure_root[len("abfs://"):]
    storage.write_json(storage.join(layout.root, "x.json"), {"a": 1})  # the same objects either way
    assert storage.read_json(storage.join(azure_root, "x.json")) == {"a": 1}


def _lance_round_trip(uri: str) -> None:
    options = storage_options(uri)
    first = pa.table({"id": [1, 2, 3], "v": [0.5, 1.5, 2.5]})
    lance.write_dataset(first, uri, storage_options=options)
    lance.write_dataset(pa.table({"id": [4], "v": [3.5]}), uri, mode="append", storage_options=options)
    ds = lance.dataset(uri, storage_options=options)
    assert ds.version == 2 and ds.to_table().column("id").to_pylist() == [1, 2, 3, 4]
    assert lance.dataset(uri, version=1, storage_options=options).count_rows() == 3
    assert storage.is_dir(uri) and "_versions" in storage.list_dirs(uri)  # where pyarrow sees it too


def test_lance_table_round_trip_on_azure(azure_root):
    layout = Layout.open(azure_root)
    uri = layout.feature_table("user_stats")
    assert storage_options(uri)["azure_storage_use_emulator"] == "true"
    _lance_round_trip(uri)


def test_model_registry_on_azure(azure_root, tmp_path):
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.pt").write_bytes(b"weights-1")
    (artifact / "vocab.json").write_text('{"items": 30}')
    layout = Layout.open(azure_root)
    reg = ModelRegistry(layout)
    v1 = reg.register("two_tower", str(artifact), {"recall": 0.1}, {"dim": 8}, "runs/1")
    (artifact / "model.pt").write_bytes(b"weights-2")
    v2 = reg.register("two_tower", str(artifact), {"recall": 0.2}, {"dim": 8}, "runs/2")
    assert (v1.version, v2.version) == (1, 2)
    assert v2.artifact_uri == layout.model_dir("two_tower", 2) and v2.artifact_uri.startswith("abfss://")
    assert storage.read_bytes(f"{v1.artifact_uri}/model.pt") == b"weights-1"
    assert storage.list_files(v2.artifact_uri) == [f"{v2.artifact_uri}/model.pt", f"{v2.artifact_uri}/vocab.json"]

    reg.set_alias("two_tower", "production", 1, reason="first")
    fresh = ModelRegistry(Layout.at(azure_root))  # another process's view of the same root
    assert [v.version for v in fresh.list_versions("two_tower")] == [1, 2]
    assert fresh.get("two_tower", 2).metrics == {"recall": 0.2}
    assert fresh.aliases("two_tower") == {"production": 1}
    assert fresh.get_by_alias("two_tower", "production").artifact_uri == v1.artifact_uri
    fresh.set_alias("two_tower", "production", 2, reason="better")
    assert reg.get_by_alias("two_tower", "production").version == 2


def test_azure_through_an_endpoint_variable(azure_env, azure_server, monkeypatch):
    """``AZURE_STORAGE_ENDPOINT`` (any blob endpoint, here Azurite's path-style one) instead of
    the emulator switch: pyarrow and Lance both follow it."""
    monkeypatch.delenv("AZURE_STORAGE_USE_EMULATOR")
    monkeypatch.delenv("AZURITE_BLOB_STORAGE_URL")
    monkeypatch.setenv("AZURE_STORAGE_ENDPOINT", f"{azure_server}/{ACCOUNT}")
    root = Layout.open(f"abfss://{CONTAINER}@{ACCOUNT}.dfs.core.windows.net/{uuid.uuid4().hex[:12]}").root
    storage.write_json(storage.join(root, "a", "b.json"), {"ok": True})
    assert storage.read_json(storage.join(root, "a", "b.json")) == {"ok": True}
    assert storage_options(root) == {"azure_storage_account_name": ACCOUNT, "azure_storage_use_emulator": "false",
                                     "azure_storage_endpoint": f"{azure_server}/{ACCOUNT}", "allow_http": "true"}
    _lance_round_trip(storage.join(root, "t.lance"))


def test_lance_reaches_the_gcs_emulator_which_lacks_the_xml_api(gcs_root, gcs_server):
    """Lance is handed the emulator (not storage.googleapis.com), and fails there only because
    gcp-storage-emulator has no XML API listing (501), which object_store's GCS client uses.
    If this starts to fail because the write succeeds, prove Lance and the registry on GCS too."""
    uri = storage.join(Layout.open(gcs_root).root, "features", "user_stats.lance")
    options = storage_options(uri)
    assert options["allow_http"] == "true" and gcs_server in options["google_service_account_key"]
    with pytest.raises(OSError) as info:  # (no retries: a 501 stays a 501)
        lance.write_dataset(pa.table({"id": [1]}), uri, storage_options={**options, "client_max_retries": "0"})
    message = str(info.value)
    # object_store percent-encodes the bucket in the URL path (aiplatform%2Dtest)
    assert f"GET {gcs_server}/" in message and "?list-type=2" in message and "501 Not Implemented" in message
