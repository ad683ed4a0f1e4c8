"""Connecting to Ray the same way everywhere.

With no ``RAY_ADDRESS`` a private local instance is started with explicit, bounded resources
(``address="local"``, so a stray cluster on the machine is never joined by accident). With an
address, the existing cluster is used as it is.
"""

import logging
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from aiplatform.core.settings import Settings

log = logging.getLogger(__name__)

# Ray's high-throughput serving (its KubeRay guide): HAProxy as the ingress on the HTTP port,
# forwarding to the replicas' own HTTP servers, and gRPC between Serve's processes instead of
# Ray tasks. Read by Serve's processes when they start, so it is set where Ray starts.
HAPROXY_INGRESS_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_ingress_env(mode: str) -> dict[str, str]:
    """The environment a locally started Ray needs for Serve's ``mode`` ingress.

    HAProxy's defaults are one config file, admin socket and stats/metrics ports per machine
    (/tmp/haproxy-serve, 8404, 9101); a private Ray gets its own, so that two of them (a test
    and a benchmark, two users) never rewrite each other's proxy."""
    if mode != "haproxy":
        return {}
    state = _new_state_folder()
    return {**HAPROXY_INGRESS_ENV,
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(state, "haproxy.cfg"),
            "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(state, "admin.sock"),
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(state, "server-state"),
            # Ray's default is 4 threads; on 2 cores 1 thread measured ~15% more throughput and a
            # p99 at c=32 of 94 ms instead of 115-127 ms (benchmarks/serving.py)
            "RAY_SERVE_HAPROXY_NBTHREAD": str(max(1, min(4, (os.cpu_count() or 2) // 2))),
            # A stopping replica keeps answering this long so that load balancers outside Ray can
            # drop it (Ray's default 30 s: every `serve.delete` and scale-down waits that long).
            # Here the only balancer is HAProxy, which Serve updates itself within a second.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "3",
            # A client's keep-alive connection outlives HAProxy's reloads: the old process answers
            # its next request with the old server list, so after a scale to zero that request
            # first meets the stopped replica. Ray marks a server down after 3 refused connects,
            # 1 s apart (~3 s before the request falls to Serve's proxy, which starts a replica);
            # after one refused connect it costs ~1 s (benchmarks/cold_start.py: the first cold
            # round 5.7-6.3 s -> 3.8-3.9 s). A live replica wrongly marked down is back within a
            # health check, its traffic meanwhile through Serve's proxy.
            "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT": "1",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port())}


STATE_PREFIX = "aip-hap-"
OWNER_FILE = "owner.pid"


def _new_state_folder() -> str:
    """A new folder for one private Ray's HAProxy (config, socket, logs), named with the process
    that owns it, after removing the folders whose owners have exited: each run makes one, and
    nothing else would ever delete them."""
    # Serve adds a 56-character folder under it, and HAProxy refuses a socket path over 97
    base = "/tmp" if os.path.isdir("/tmp") else tempfile.gettempdir()  # nosec B108
    remove_orphaned_state_folders(base)
    state = tempfile.mkdtemp(prefix=STATE_PREFIX, dir=base)  # a new 0700 folder
    Path(state, OWNER_FILE).write_text(str(os.getpid()))
    return state


def remove_orphaned_state_folders(base: str) -> list[str]:
    """Delete the HAProxy state folders under ``base`` whose owning process is gone; returns
    them. A folder without an owner file (another tool's, or older) is left alone, and so is a
    live owner's: a recycled process id only keeps a stale folder a while longer."""
    removed = []
    for folder in Path(base).glob(f"{STATE_PREFIX}*"):
        try:
            pid = int((folder / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue
        if not _process_alive(pid):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(str(folder))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def ensure_ray(settings: Settings | None = None, *, quiet: bool = True) -> None:
    """Start or join Ray once per process; a no-op when already connected."""
    import ray

    if ray.is_initialized():
        return
    settings = settings or Settings.load()
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    # Workers must see the same storage root as the driver.
    env_vars = {"AIPLATFORM_HOME": settings.home}
    if settings.ray_address:
        ray.init(address=settings.ray_address, runtime_env={"env_vars": env_vars},
                 log_to_driver=not quiet)
    else:
        os.environ.setdefault("RAY_DEDUP_LOGS", "1")
        # Serve's processes inherit this environment; what the caller set explicitly wins.
        for key, value in serve_ingress_env(settings.ingress()).items():
            os.environ.setdefault(key, value)
        ray.init(
            address="local",
            num_cpus=settings.num_cpus,
            object_store_memory=settings.object_store_memory,
            include_dashboard=False,
            runtime_env={"env_vars": env_vars},
            log_to_driver=not quiet,
            configure_logging=True,
            logging_level=logging.WARNING,
        )
    # ray.init() installs its own SIGTERM handler; keep the caller's so Ctrl-C/TERM shut down cleanly.
    if callable(previous_sigterm) or previous_sigterm in (signal.SIG_DFL, signal.SIG_IGN):
        signal.signal(signal.SIGTERM, previous_sigterm)
