"""Running a real server process for tests: one place for the free port, the log file, the wait
until it answers and the stop by its own pid, so the Redis, S3, GCS and Azure helpers
(tests/*_server.py) differ only in the command line and in what "it answers" means.

A server that dies or never answers fails the test with its log's tail in the message, because
that tail (a bad flag, a port in use, a missing dependency) is what tells a reader what to fix.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

LOG_TAIL_BYTES = 2000


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (the OS picks it, so parallel runs don't clash)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_binary(env_var: str, name: str) -> str | None:
    """``$env_var``, else ``name`` on PATH, else Debian's /usr/bin/``name``: an executable or None."""
    for candidate in (os.environ.get(env_var), shutil.which(name), f"/usr/bin/{name}"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def log_tail(path: Path, max_bytes: int = LOG_TAIL_BYTES) -> str:
    """The end of a server's log, where its reason for exiting is; empty when there is no log."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - max_bytes))
            return f.read().decode(errors="replace").strip()
    except OSError:
        return ""


def answers_http(url: str, status: int | None = None) -> bool:
    """Whether ``url`` gives an HTTP answer (of ``status``, when given): any answer means the server listens."""
    try:
        response = httpx.get(url, timeout=1)
    except httpx.HTTPError:
        return False
    return status is None or response.status_code == status


def wait_until_ready(proc: subprocess.Popen, ready: Callable[[], bool], name: str, log_path: Path,
                     timeout_s: float, poll_s: float = 0.1, hint: str = "") -> None:
    """Poll ``ready`` until it is true; raise, with the log's tail, if ``proc`` exits or ``timeout_s`` passes.

    ``ready`` returns False (rather than raising) while the server does not answer yet."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if proc.poll() is not None:
            problem = f"{name} exited with {proc.returncode}"
        elif time.monotonic() > deadline:
            problem = f"{name} did not answer within {timeout_s}s"
        else:
            time.sleep(poll_s)
            continue
        tail = log_tail(log_path)
        raise RuntimeError(f"{problem}; see {log_path}{f' ({hint})' if hint else ''}"
                           + (f":\n{tail}" if tail else " (empty)"))


def stop_process(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """Stop the process by its own pid (never by name, which could hit someone else's server):
    SIGTERM, then SIGKILL if it has not exited after ``grace_s``."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def kill_ray_node(sid: int, temp_dir: str) -> None:
    """SIGKILL a `ray start` node: every process of its session (``sid``) or naming its temp dir
    (Ray's daemons leave the session; `ray stop` would stop every Ray on the machine)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(pid) == sid or temp_dir in cmdline:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, FileNotFoundError):
            pass


@contextmanager
def serve_process(argv: Sequence[str], workdir: Path, ready: Callable[[], bool], name: str,
                  timeout_s: float = 30.0, *, log_name: str | None = None, poll_s: float = 0.1,
                  hint: str = "") -> Iterator[subprocess.Popen]:
    """Start ``argv`` in ``workdir`` (created), output to ``workdir/<log_name>``, yield the process
    once ``ready()`` is true, and stop it at exit, also when the wait or the body fails.

    Its own session keeps a Ctrl-C at the terminal from killing it before the tests are done with it."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / (log_name or f"{name}.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT, cwd=workdir,
                                start_new_session=True)
    try:
        wait_until_ready(proc, ready, name, log_path, timeout_s, poll_s, hint)
        yield proc
    finally:
        stop_process(proc)


def use_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                    clear: Sequence[str] = ()) -> dict[str, str]:
    """Set ``env`` for one test (and the processes it starts) after removing ``clear``, so a
    developer's real credentials in those variables are never picked up against an emulator."""
    for name in clear:
        monkeypatch.delenv(name, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return env
