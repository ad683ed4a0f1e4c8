"""Which model version is served, and how a running replica moves to another one in place.

A version is served whole: its user tower, its item index and its candidate ranker live in one
``RecommendPipeline``, and a replica swaps that one object for the next version's in a single
assignment. A batch of requests reads the reference once, so an answer never mixes versions,
and the response names the version that made it.

Two ways move a replica, both without restarting it:

- *Following an alias* (the default): a thread polls the registry every ``poll_s`` seconds;
  when the alias points elsewhere (``aiplatform models promote`` / ``rollback``), it loads the
  new version next to the old one, which keeps answering, and swaps. Every application that
  serves the alias follows it, on one machine or on KubeRay, with nothing to redeploy.
- *Pinning a version* through Serve's ``user_config`` (``{"version": N}``): Serve calls the
  deployment's ``reconfigure`` in place, which loads and swaps the same way.

A version that cannot be served (no index, a feature service it was not trained on) is
refused with the reason kept for ``/healthz``; the replica goes on serving what it served.
"""

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from aiplatform.core.storage import Layout
from aiplatform.models.candidates import candidates_dir_of, load_candidate_config
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval.index import require_table, vector_table_name
from aiplatform.serving.pipeline import RecommendPipeline, check_events_features, check_served_inputs, served_service
from aiplatform.serving.resilience import ResilienceConfig

log = logging.getLogger(__name__)

RETRY_FAILED_S = 30.0
"""How long a version that failed to load is left alone before it is tried again."""


@dataclass(frozen=True)
class ServedVersion:
    """A registered version, checked to be servable here: the paths its pipeline loads."""

    name: str
    version: int
    artifact_dir: str
    vectors_dir: str
    table: str
    ranked: bool
    service_version: str = ""
    """The feature service's definition version where the application was built: every
    pipeline of the replica must read this one (``RecommendPipeline`` refuses another)."""


def resolve_version(registry: ModelRegistry, layout: Layout, features_module: str, service_name: str,
                    model_name: str, alias: str = "champion", version: int | None = None) -> ServedVersion:
    """The version ``alias`` points at (or ``version``), after the checks that would otherwise
    fail later in a replica: its inputs are the served feature service's (``ConfigError``), its
    vector table exists (``NotFoundError`` naming the tables), and a candidate ranker's recent
    events are served (``ConfigError``)."""
    mv = registry.get(model_name, version) if version else registry.get_by_alias(model_name, alias)
    check_served_inputs(mv.artifact_uri, features_module, service_name)
    table = vector_table_name(mv.name, mv.version)
    require_table(layout.vectors, table, nonempty=True)  # NotFoundError naming the tables that exist
    candidates = candidates_dir_of(mv.artifact_uri)
    config = load_candidate_config(candidates) if candidates is not None else None
    if config is not None:
        check_events_features(config, served_service(features_module, service_name),
                              where=f"serving {candidates} with {features_module}")
        log.info("%s v%d: candidate pipeline (two-tower top %d + %s, LightGBM ranker)",
                 mv.name, mv.version, config.per_source, ", ".join(config.sources))
    else:
        log.info("%s v%d: two-tower retrieval order (the version has no candidates/)", mv.name, mv.version)
    return ServedVersion(mv.name, mv.version, mv.artifact_uri, layout.vectors, table, config is not None,
                         served_service(features_module, service_name).version)


def check_online_store(uri: str) -> None:
    """Refuse, where the application is built, an online store that cannot serve: a SQLite file
    that does not exist, a Redis that does not answer, or a store that was never materialized
    (no popular items: the feature job has not run against it). A replica that starts later
    while the store is briefly down still starts and degrades (``serving.resilience``)."""
    import os

    from aiplatform.core.errors import ConfigError
    from aiplatform.features.online import open_online_store

    fix = "run the feature job against it first (python -m aiplatform.jobs.features, or aiplatform quickstart)"
    path = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else uri
    if "://" not in path and not os.path.exists(path):
        raise ConfigError(f"online store {path} does not exist: {fix}, or set AIPLATFORM_ONLINE_STORE")
    try:
        store = open_online_store(uri)
        try:
            popular = store.get_popular_items(1)
        finally:
            store.close()
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"online store {uri} cannot be read ({type(exc).__name__}: {exc}): check that it "
                          "is running and reachable from here, or set AIPLATFORM_ONLINE_STORE") from exc
    if not popular:
        raise ConfigError(f"online store {uri} is empty (no popular items, no features materialized): {fix}")


@dataclass(frozen=True)
class Served:
    """What a replica answers with now: one version's pipeline and how responses name it."""

    pipeline: RecommendPipeline
    version: ServedVersion
    variant: str


class VersionSwitcher:
    """Holds a replica's ``Served`` and replaces it in place (module docstring).

    ``current`` is read without a lock: the swap is one attribute assignment. Loading runs in
    the caller's thread (the watcher thread, or a worker thread of ``reconfigure``), never on
    the replica's event loop, so requests keep being answered by the old version meanwhile."""

    def __init__(self, home: str, online_store: str, features_module: str, service_name: str,
                 model_name: str, first: ServedVersion, variant: str,
                 resilience: ResilienceConfig | None = None) -> None:
        self.layout = Layout.at(home)
        self.resilience = resilience
        self.service_version = first.service_version  # fixed at deploy time, like the model version
        self.online_store, self.features_module, self.service_name = online_store, features_module, service_name
        self.model_name = model_name
        self.current = Served(self.load(first), first, variant)
        self.last_error: str | None = None
        self._failed: dict[int, float] = {}
        self._switch_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._alias: str | None = None

    def load(self, version: ServedVersion) -> RecommendPipeline:
        """A new pipeline of ``version`` with this replica's stores and settings."""
        return RecommendPipeline(str(self.layout.root), self.online_store, self.features_module, self.service_name,
                                 version.artifact_dir, version.vectors_dir, version.table, config=self.resilience,
                                 service_version=self.service_version or None)

    def switch(self, alias: str | None = None, version: int | None = None, variant: str | None = None) -> bool:
        """Serve ``version`` (or the one ``alias`` points at) from now on; True if it changed.
        Raises what ``resolve_version`` raises, after recording it in ``last_error``."""
        with self._switch_lock:
            registry = ModelRegistry(self.layout)
            target = registry.get(self.model_name, version).version if version else \
                registry.get_by_alias(self.model_name, alias or "champion").version
            if target == self.current.version.version:
                self.last_error = None
                return False
            try:
                resolved = resolve_version(registry, self.layout, self.features_module, self.service_name,
                                           self.model_name, version=target)
                pipeline = self.load(resolved)
            except Exception as exc:
                self._failed[target] = time.monotonic()
                self.last_error = f"cannot serve {self.model_name} v{target}: {exc}"
                log.error("%s; still serving v%d", self.last_error, self.current.version.version)
                raise
            before, replaced = self.current.version.version, self.current.pipeline
            self.current = Served(pipeline, resolved, variant or self.current.variant)
            replaced.close()  # its change-feed thread; requests already holding it still finish
            self.last_error = None
            self._failed.pop(target, None)
            log.info("switched %s from v%d to v%d in place", self.model_name, before, target)
            return True

    def apply_user_config(self, config: dict) -> None:
        """A deployment's ``user_config`` (Serve's in-place update, ``reconfigure``):
        ``{"version": N}`` pins version N (the variant is ``vN``) and stops following an alias;
        ``{"alias": "champion"}`` switches to the alias's version and follows it again (every
        ``alias_poll_s``, default 2 s). Blocks while the new version loads; the current one keeps
        answering until then. An unknown key is a ValueError naming the keys allowed."""
        unknown = set(config) - {"version", "alias", "alias_poll_s"}
        if unknown:
            raise ValueError(f"user_config: unknown keys {sorted(unknown)}; use version, alias, alias_poll_s")
        if config.get("version") is not None:
            self.unfollow()
            version = int(config["version"])
            self.switch(version=version, variant=f"v{version}")
        elif config.get("alias"):
            alias = str(config["alias"])
            self.switch(alias=alias, variant=alias)
            self.follow(alias, float(config.get("alias_poll_s", 2.0)))

    # ---- following an alias ---------------------------------------------------------------
    def follow(self, alias: str, poll_s: float) -> None:
        """Poll ``alias`` every ``poll_s`` seconds in a daemon thread and switch when it moves."""
        self.unfollow()
        self._alias, self._stop = alias, threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(alias, poll_s, self._stop),
                                        name=f"follow-{alias}", daemon=True)
        self._thread.start()

    def unfollow(self) -> None:
        self._stop.set()
        self._alias = None

    @property
    def following(self) -> str | None:
        return self._alias

    def _watch(self, alias: str, poll_s: float, stop: threading.Event) -> None:
        registry: ModelRegistry | None = None
        seen: tuple | None = None  # the alias tables' stamp when the alias was last read
        while not stop.wait(poll_s):
            try:
                registry = registry or ModelRegistry(self.layout)
                stamp = registry.alias_revision()
                if stamp == seen and self.last_error is None:  # no alias moved: nothing to replay
                    continue
                target = registry.get_by_alias(self.model_name, alias).version
                seen = stamp
            except Exception as exc:  # the registry unreachable for a moment: keep serving, retry
                log.warning("cannot read alias %s of %s: %s", alias, self.model_name, exc)
                continue
            if target == self.current.version.version:  # (back) where it is: nothing is pending
                self.last_error = None
                continue
            failed_at = self._failed.get(target)
            if failed_at is not None and time.monotonic() - failed_at < RETRY_FAILED_S:
                continue
            try:
                self.switch(version=target)
            except Exception:  # recorded in last_error and logged by switch
                pass

    def status(self) -> dict[str, Any]:
        """For ``/healthz``: what is served, what is followed, why a switch failed."""
        return {"following": self._alias, "switch_error": self.last_error}


__all__ = ["Served", "ServedVersion", "VersionSwitcher", "check_online_store", "resolve_version"]
