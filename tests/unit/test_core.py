"""Settings precedence and the storage layout."""

import json

import pytest

from aiplatform.core.errors import ConfigError, DataValidationError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout, atomic_write_json, is_uri


def test_defaults_are_local(monkeypatch):
    for var in ("AIPLATFORM_HOME", "RAY_ADDRESS", "AIPLATFORM_CONFIG", "AIPLATFORM_HTTP_PORT"):
        monkeypatch.delenv(var, raising=False)
    s = Settings.load()
    assert s.home == ".aiplatform" and s.ray_address is None and s.http_port == 8000


def test_precedence_yaml_env_override(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("home: /from/yaml\nhttp_port: 9001\nnum_cpus: 3\n")
    monkeypatch.setenv("AIPLATFORM_CONFIG", str(cfg))
    monkeypatch.setenv("AIPLATFORM_HTTP_PORT", "9002")
    s = Settings.load(home="/from/override")
    assert s.home == "/from/override"  # explicit beats env and YAML
    assert s.http_port == 9002  # env beats YAML
    assert s.num_cpus == 3  # YAML beats default


def test_bad_setting_names_the_field(monkeypatch):
    monkeypatch.setenv("AIPLATFORM_HTTP_PORT", "not-a-port")
    with pytest.raises(ConfigError, match="http_port"):
        Settings.load()


def test_layout_paths_are_absolute_and_complete(tmp_path):
    layout = Layout.at(str(tmp_path / "h"))
    layout.ensure()
    assert layout.feature_table("user_activity").endswith("features/user_activity.lance")
    assert layout.model_dir("two_tower", 3).endswith("models/two_tower/3")
    for sub in ("lake", "features", "registry", "models", "runs", "vectors", "eventlog"):
        assert (tmp_path / "h" / sub).is_dir()
    assert Layout.at("relative/dir").root.startswith("/")


def test_uri_roots_are_kept_as_uris():
    layout = Layout.at("s3://bucket/root")
    assert is_uri(layout.root) and layout.lake == "s3://bucket/root/lake"


def test_atomic_write_replaces_whole_file(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(str(path), {"a": 1})
    atomic_write_json(str(path), {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp files left behind


def test_validation_error_names_file_column_rows_and_expectation():
    err = DataValidationError("events.csv", "has bad values", column="price", failed_rows=3, expected="float")
    assert str(err) == "events.csv: column 'price': has bad values (3 rows failed); expected float"
