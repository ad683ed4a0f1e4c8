"""The private Ray's HAProxy state folders: one per run, removed once their owner has exited."""

import os
import subprocess
import sys

from aiplatform.core import runtime
from aiplatform.core.runtime import OWNER_FILE, STATE_PREFIX, remove_orphaned_state_folders


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _folder(base, name: str, owner: int | str | None):
    folder = base / f"{STATE_PREFIX}{name}"
    (folder / "node").mkdir(parents=True)
    (folder / "node" / "haproxy.cfg").write_text("global\n")
    if owner is not None:
        (folder / OWNER_FILE).write_text(str(owner))
    return folder


def test_only_folders_whose_owner_exited_are_removed(tmp_path):
    gone = _folder(tmp_path, "gone", _exited_pid())
    live = _folder(tmp_path, "live", os.getpid())
    unowned = _folder(tmp_path, "unowned", None)  # another tool's, or made before owners were written
    garbled = _folder(tmp_path, "garbled", "not a pid")
    other = tmp_path / "someone-else"
    other.mkdir()
    assert remove_orphaned_state_folders(str(tmp_path)) == [str(gone)]
    assert not gone.exists()
    assert live.exists() and unowned.exists() and garbled.exists() and other.exists()


def test_each_ingress_environment_gets_its_own_owned_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(runtime.os.path, "isdir", lambda p: False if p == "/tmp" else os.path.isdir(p))
    monkeypatch.setattr(runtime.tempfile, "gettempdir", lambda: str(tmp_path))
    orphan = _folder(tmp_path, "orphan", _exited_pid())
    first = runtime.serve_ingress_env("haproxy")
    second = runtime.serve_ingress_env("haproxy")
    folders = {os.path.dirname(env["RAY_SERVE_HAPROXY_CONFIG_FILE_LOC"]) for env in (first, second)}
    assert len(folders) == 2 and not orphan.exists()
    for folder in folders:
        assert os.path.dirname(folder) == str(tmp_path)
        assert open(os.path.join(folder, OWNER_FILE)).read() == str(os.getpid())
    assert runtime.serve_ingress_env("proxy") == {}
