"""Connecting to Ray the same way everywhere.

With no ``RAY_ADDRESS`` a private local instance is started with explicit, bounded resources
(``address="local"``, so a stray cluster on the machine is never joined by accident). With an
address, the existing cluster is used as it is.
"""

import logging
import os
import signal

from aiplatform.core.settings import Settings

log = logging.getLogger(__name__)


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
