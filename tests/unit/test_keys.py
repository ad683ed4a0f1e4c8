"""API keys: stored as hashes, roles ordered, env entries validated, the guard's 401/403."""

import json

import pytest

from aiplatform.core.errors import ConfigError, NotFoundError, UserInputError
from aiplatform.security.guard import Denied, KeyGuard, bearer_token
from aiplatform.security.keys import KeyStore, Role, hash_key, keys_path, parse_env_keys


def test_a_created_key_is_stored_as_its_hash_only(tmp_path):
    store = KeyStore(str(tmp_path), env="")
    key, stored = store.create("shop", Role.writer, created_by="ci")
    assert key.startswith("aip_") and len(key) > 40
    text = open(keys_path(str(tmp_path))).read()
    assert key not in text and hash_key(key) in text
    assert json.loads(text)["keys"][0] | {"created_at": ""} == {
        "name": "shop", "role": "writer", "sha256": hash_key(key), "created_at": "", "created_by": "ci"}
    assert [k.name for k in KeyStore(str(tmp_path), env="").all()] == ["shop"]


def test_names_are_unique_and_checked_and_revoke_names_what_is_missing(tmp_path):
    store = KeyStore(str(tmp_path), env=f"ops:admin:{'a' * 64}")
    store.create("shop", Role.reader)
    with pytest.raises(UserInputError, match="exists"):
        store.create("shop", Role.admin)
    with pytest.raises(UserInputError, match="exists"):
        store.create("ops", Role.admin)  # taken by an environment key
    with pytest.raises(UserInputError, match="key name"):
        store.create("bad name!", Role.reader)
    with pytest.raises(NotFoundError, match="AIPLATFORM_API_KEYS"):
        store.revoke("ops")
    with pytest.raises(NotFoundError, match="keys list"):
        store.revoke("nobody")
    assert store.revoke("shop").name == "shop" and store.file_keys() == []


def test_roles_are_ordered_and_parsed_with_a_clear_error():
    assert Role.reader < Role.writer < Role.admin
    assert Role.parse(" Admin ") is Role.admin
    with pytest.raises(UserInputError, match="reader, writer, admin"):
        Role.parse("root")


def test_environment_entries_are_validated_by_position():
    digest = "ab" * 32
    keys = parse_env_keys(f" ci:reader:{digest} , ops:ADMIN:{digest.upper()},")
    assert [(k.name, k.role, k.sha256, k.source) for k in keys] == [
        ("ci", Role.reader, digest, "env"), ("ops", Role.admin, digest, "env")]
    for raw, match in ((f"ci:reader:{digest},x:y", "entry 2"), ("ci:reader:1234", "64 hex"),
                       (f"ci:boss:{digest}", "entry 1.*role"), (f"a b:reader:{digest}", "key name")):
        with pytest.raises(ConfigError, match=match):
            parse_env_keys(raw)
    assert parse_env_keys("") == []


def test_a_damaged_key_file_is_a_config_error_naming_it(tmp_path):
    path = keys_path(str(tmp_path))
    (tmp_path / "security").mkdir()
    open(path, "w").write(json.dumps({"keys": [{"name": "x"}]}))
    with pytest.raises(ConfigError, match="api_keys.json"):
        KeyStore(str(tmp_path), env="").file_keys()


@pytest.mark.parametrize("header, token", [
    ("Bearer abc", "abc"), ("bearer   abc ", "abc"), ("Basic abc", None), ("Bearer", None), ("", None), (None, None)])
def test_bearer_token(header, token):
    assert bearer_token(header) == token


def test_the_guard_gives_401_for_no_or_unknown_keys_and_403_for_a_low_role(tmp_path):
    store = KeyStore(str(tmp_path), env="")
    reader, _ = store.create("r", Role.reader)
    writer, _ = store.create("w", Role.writer)
    guard = KeyGuard(str(tmp_path), "keys", refresh_s=3600)
    try:
        assert guard.check(f"Bearer {reader}", Role.reader).name == "r"
        assert guard.check(f"Bearer {writer}", Role.reader).name == "w"
        for header in (None, "Bearer nope", f"Basic {reader}"):
            with pytest.raises(Denied) as denied:
                guard.check(header, Role.reader)
            assert denied.value.status == 401
        with pytest.raises(Denied) as denied:
            guard.check(f"Bearer {reader}", Role.writer)
        assert denied.value.status == 403 and "'r' has role reader" in denied.value.message
        store.revoke("r")
        guard.refresh()
        with pytest.raises(Denied):
            guard.check(f"Bearer {reader}", Role.reader)
    finally:
        guard.close()
    assert KeyGuard(str(tmp_path), "off").check(None, Role.admin).role is Role.admin


def test_a_failed_refresh_keeps_the_keys_it_had(tmp_path):
    reader, _ = KeyStore(str(tmp_path), env="").create("r", Role.reader)
    guard = KeyGuard(str(tmp_path), "keys", refresh_s=3600)
    open(keys_path(str(tmp_path)), "w").write("{not json")
    guard.refresh()
    assert guard.check(f"Bearer {reader}", Role.reader).name == "r"
    guard.close()


def test_the_keys_commands(tmp_path):
    from typer.testing import CliRunner

    from aiplatform.cli import app

    runner = CliRunner()
    home = str(tmp_path / "home")
    made = runner.invoke(app, ["keys", "create", "shop", "--role", "reader", "--quiet", "--home", home])
    assert made.exit_code == 0, made.output
    key = made.output.strip()
    assert KeyStore(home, env="").file_keys()[0].sha256 == hash_key(key)
    entry = runner.invoke(app, ["keys", "create", "ci", "--role", "writer", "--print-entry", "--home", home])
    assert "AIPLATFORM_API_KEYS entry: ci:writer:" in entry.output
    listed = runner.invoke(app, ["keys", "list", "--home", home])
    assert "shop" in listed.output and "reader" in listed.output and key not in listed.output
    bad = runner.invoke(app, ["keys", "create", "x", "--role", "root", "--home", home])
    assert bad.exit_code == 2 and "reader, writer, admin" in bad.output
    assert runner.invoke(app, ["keys", "revoke", "shop", "--home", home]).exit_code == 0
    assert runner.invoke(app, ["keys", "revoke", "shop", "--home", home]).exit_code != 0
