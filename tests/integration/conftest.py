"""One local Ray instance for the whole integration session (explicit, bounded resources)."""

import os

import pytest

from tests.servers import free_port

METRICS_PORT = free_port()


@pytest.fixture(scope="session")
def importable_dir(tmp_path_factory):
    """A folder on the PYTHONPATH of every Ray worker of the session (set before ``ray.init``),
    for modules a test writes, e.g. a copy of a feature-definitions module that Ray Data tasks
    and Serve replicas must import by name. The test adds it to its own ``sys.path``."""
    return tmp_path_factory.mktemp("importable")


@pytest.fixture(scope="session")
def metrics_port() -> int:
    """Ray's metrics export port of the session's instance (a fixture: test modules importing
    this conftest by name would get a second copy of the module, and another port)."""
    return METRICS_PORT


@pytest.fixture(scope="session")
def ray_session(s3_server, importable_dir):
    import ray

    from tests.s3_server import s3_environment

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(importable_dir), os.environ.get("PYTHONPATH")) if p)
    # Ray's workers inherit the environment of ray.init: the S3 test server's endpoint and
    # credentials must be there first, so that tasks can read an s3:// storage root.
    os.environ.update(s3_environment(s3_server))
    # Serve's ingress as `aiplatform serve` starts it (HAProxy unless AIPLATFORM_SERVE_INGRESS=proxy)
    from aiplatform.core.runtime import serve_ingress_env
    from aiplatform.core.settings import Settings

    for key, value in serve_ingress_env(Settings.load().serve_ingress).items():
        os.environ.setdefault(key, value)
    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            object_store_memory=512 * 1024 * 1024,
            include_dashboard=False,
            log_to_driver=False,
            _metrics_export_port=METRICS_PORT,  # where Prometheus scrapes the app's metrics (test_metrics)
        )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    try:
        from ray import serve

        serve.shutdown()
    except Exception:
        pass
    ray.shutdown()
