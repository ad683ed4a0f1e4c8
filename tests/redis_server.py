"""A real redis-server for tests (no fakeredis): started on a free port in a temp dir,
persistence off, stopped by its own pid. ``redis_url`` is registered in tests/conftest.py."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.servers import find_binary, free_port, serve_process

_free_port = free_port  # the name other tests import

INSTALL_HINT = ("redis-server is not installed: `sudo apt-get install -y redis-server` (Debian/Ubuntu), "
                "`brew install redis` (macOS), or set REDIS_SERVER to its path")


def find_redis_server() -> str | None:
    """REDIS_SERVER, else redis-server on PATH, else Debian's /usr/bin/redis-server."""
    return find_binary("REDIS_SERVER", "redis-server")


@contextmanager
def redis_server(workdir: str | Path, timeout_s: float = 15.0) -> Iterator[str]:
    """Run ``redis-server`` on 127.0.0.1 and yield its ``redis://`` URL; stop it at exit."""
    binary = find_redis_server()
    if binary is None:
        raise RuntimeError(INSTALL_HINT)
    import redis

    workdir = Path(workdir)
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"

    def pings() -> bool:
        try:
            with redis.Redis.from_url(url, socket_timeout=1) as client:
                return bool(client.ping())
        except redis.ConnectionError:
            return False

    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(workdir)]
    with serve_process(argv, workdir, pings, "redis-server", timeout_s, log_name="redis.log", poll_s=0.05):
        yield url


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory) -> Iterator[str]:
    """URL of a real redis-server for the whole session; fails (never skips) if it is missing."""
    if find_redis_server() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(params=["sqlite", "redis"])
def online_store(request, tmp_path):
    """An empty online store of each kind: a SQLite file (opened by ``sqlite:///`` URI) and a
    flushed database of the session's real redis-server."""
    from aiplatform.features.online import open_online_store

    if request.param == "sqlite":
        s = open_online_store(f"sqlite:///{tmp_path / 'online.sqlite'}")
    else:
        import redis

        url = request.getfixturevalue("redis_url")
        redis.Redis.from_url(url).flushdb()
        s = open_online_store(url)
    yield s
    s.close()
