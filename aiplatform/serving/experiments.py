"""Experiments inside a replica: which variant answers a user, and what is recorded about it.

An experiment is declared once in the storage root (``aiplatform experiments start FILE``, or a
canary that ``aiplatform experiments canary`` steps), and every replica of every application
that serves its model follows it: a thread reads the active experiment every ``poll_s`` seconds
and, when it (or an alias a variant follows) changed, loads the versions its variants need
beside the served one and publishes a new ``Routing`` in one assignment, like
``serving.versions`` does for an alias. A request's variant is ``Experiment.assign(user_id)``:
a hash of the experiment's salt and the user id, so a user stays in one variant across
requests, replicas and restarts.

What is recorded, buffered here and appended to the experiment store by the same thread about
once a second (so a request never waits for storage):

- an *exposure* per answered request: variant, model version, status (ok, popular, degraded,
  error) and latency; what ``aiplatform experiments report`` and the canary read;
- an *outcome* per event posted with a ``request_id``: the click, cart or purchase that
  followed a recommendation;
- a *shadow* record per mirrored request: the shadow variant's latency and its overlap@k with
  the live answer (the shadow's answer itself is discarded).

The shadow is answered by its own deployment (``serving.shadow``, scaled to zero while idle):
the router only resolves the shadow's version (its ``Served.pipeline`` is None), it never loads
it into the live replicas.
"""

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from aiplatform.experiments.config import Experiment
from aiplatform.experiments.store import ExperimentStore
from aiplatform.registry import ModelRegistry
from aiplatform.serving.pipeline import RecommendPipeline
from aiplatform.serving.versions import Served, ServedVersion, VersionSwitcher, resolve_version

log = logging.getLogger(__name__)

MAX_BUFFERED = 100_000
"""Most records held while the store cannot be written; the oldest are dropped beyond it."""


@dataclass(frozen=True)
class Routing:
    """One revision of the active experiment, ready to answer: a ``Served`` per variant that
    gets traffic, and the shadow's, if any."""

    experiment: Experiment
    revision: int
    variants: dict[str, Served]
    shadow: Served | None

    def served_for(self, user_id: str) -> Served:
        return self.variants[self.experiment.assign(user_id).name]

    def versions(self) -> dict[str, int]:
        return {name: s.version.version for name, s in self.variants.items()}


class ExperimentRouter:
    """Follows the active experiment of ``switcher``'s model and buffers what it records
    (module docstring). ``current`` is None while no experiment is active: the replica then
    answers with the switcher's version, as without experiments."""

    def __init__(self, switcher: VersionSwitcher, poll_s: float = 2.0, flush_s: float = 1.0) -> None:
        self.switcher = switcher
        self.store = ExperimentStore(switcher.layout)
        self.current: Routing | None = None
        self.last_error: str | None = None
        self._targets: tuple | None = None
        self._stamp: tuple | None = None  # the experiment revision and alias tables last resolved
        self._registry: ModelRegistry | None = None
        self._pipelines: dict[int, tuple[ServedVersion, RecommendPipeline]] = {}
        self._buffers: dict[str, list[dict[str, Any]]] = {"exposures": [], "outcomes": [], "shadow": []}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._poll_s, self._flush_s = float(poll_s), float(flush_s)
        self._thread = threading.Thread(target=self._run, name="experiments", daemon=True)
        self._thread.start()

    # ---- following the active experiment ----------------------------------------------------
    def refresh(self) -> None:
        """Read the active experiment and publish its routing when anything it serves changed."""
        active = self.store.active(self.switcher.model_name)
        if active is None:
            if self.current is not None:
                log.info("experiment %s ended: serving %s again", self.current.experiment.name,
                         self.switcher.current.variant)
            self.current, self._targets, self.last_error, self._stamp = None, None, None, None
            self._drop_pipelines(set())
            return
        experiment, revision = active
        self._registry = registry = self._registry or ModelRegistry(self.switcher.layout)
        stamp = (experiment.name, revision, registry.alias_revision())
        if stamp == self._stamp:  # neither the experiment nor an alias moved: resolving costs ~10 ms each
            return
        live = [v for v in experiment.variants if v.weight > 0]
        targets = {v.name: self._target(registry, v.alias, v.version) for v in live}
        shadow = experiment.shadow
        shadow_target = self._target(registry, shadow.alias, shadow.version) if shadow else None
        key = (experiment.name, revision, tuple(sorted(targets.items())), shadow_target)
        self._stamp = stamp
        if key == self._targets:
            return
        try:
            variants = {name: Served(self._pipeline(registry, version), self._pipelines[version][0], name)
                        for name, version in targets.items()}
            shadow_served = None
            if shadow is not None:  # answered by the shadow deployment: checked here, loaded there
                s = self.switcher
                resolved = resolve_version(registry, s.layout, s.features_module, s.service_name, s.model_name,
                                           version=shadow_target)
                shadow_served = Served(None, resolved, shadow.name)  # type: ignore[arg-type]
        except Exception as exc:  # a variant that cannot be served: keep what is served, say why
            self.last_error = f"experiment {experiment.name} revision {revision}: {exc}"
            log.error("%s; routing unchanged", self.last_error)
            self._targets = key  # not retried until the experiment or an alias moves
            return
        self.current = Routing(experiment, revision, variants, shadow_served)
        self._targets, self.last_error = key, None
        self._drop_pipelines(set(targets.values()))
        log.info("experiment %s revision %d: %s%s", experiment.name, revision, self.current.versions(),
                 f", shadow v{shadow_target} on {shadow.share:.0%}" if shadow else "")

    def _drop_pipelines(self, keep: set[int]) -> None:
        """Let go of the pipelines of versions no longer routed to: each was retained or loaded
        here, so its change-feed thread stops unless the switcher still serves it."""
        for version in [v for v in self._pipelines if v not in keep]:
            self._pipelines.pop(version)[1].close()

    def _target(self, registry: ModelRegistry, alias: str | None, version: int | None) -> int:
        model = self.switcher.model_name
        return registry.get(model, version).version if version else registry.get_by_alias(model, alias).version

    def _pipeline(self, registry: ModelRegistry, version: int) -> RecommendPipeline:
        """The pipeline of ``version``: the one the replica serves already, one loaded for an
        earlier revision, or a new one (checked like any served version)."""
        current = self.switcher.current
        held = self._pipelines.get(version)
        if current.version.version == version and (held is None or held[1] is not current.pipeline):
            if held is not None:  # loaded here before the switcher served it: one copy is enough
                held[1].close()
            # retained: the variant keeps its change feed after the switcher moves on
            self._pipelines[version] = (current.version, current.pipeline.retain())
        elif held is None:
            s = self.switcher
            resolved = resolve_version(registry, s.layout, s.features_module, s.service_name, s.model_name,
                                       version=version)
            self._pipelines[version] = (resolved, s.load(resolved))
        return self._pipelines[version][1]

    # ---- recording ---------------------------------------------------------------------------
    def expose(self, routing: Routing, request_id: str, user_id: str, k: int, served: Served, status: str,
               latency_ms: float) -> None:
        self._buffer("exposures", {
            "request_id": request_id, "experiment": routing.experiment.name, "revision": routing.revision,
            "variant": served.variant, "model_version": served.version.version, "user_id": user_id, "k": int(k),
            "status": status, "latency_ms": float(latency_ms), "at": datetime.now(timezone.utc)})

    def outcomes(self, events: list[dict[str, Any]]) -> None:
        """Events that carry the ``request_id`` of the recommendation they followed."""
        for e in events:
            if e.get("request_id"):
                self._buffer("outcomes", {"request_id": e["request_id"], "user_id": e["user_id"],
                                          "event_type": e["event_type"], "at": e["timestamp"]})

    def shadowed(self, routing: Routing, request_id: str, live: Served, live_items: list[str],
                 shadow_items: list[str], k: int, latency_ms: float) -> None:
        """A mirrored request: the shadow's latency and how many of the live top ``k`` it shares."""
        overlap = len(set(live_items[:k]) & set(shadow_items[:k])) / max(int(k), 1)
        self._buffer("shadow", {
            "request_id": request_id, "experiment": routing.experiment.name,
            "shadow_version": routing.shadow.version.version if routing.shadow else 0,
            "live_version": live.version.version, "latency_ms": float(latency_ms), "overlap": float(overlap),
            "k": int(k), "at": datetime.now(timezone.utc)})

    def _buffer(self, kind: str, row: dict[str, Any]) -> None:
        with self._lock:
            buffer = self._buffers[kind]
            buffer.append(row)
            if len(buffer) > MAX_BUFFERED:
                del buffer[: len(buffer) - MAX_BUFFERED]

    def flush(self) -> None:
        """Append what is buffered to the experiment store (kept for the next try on failure)."""
        writers = {"exposures": self.store.record_exposures, "outcomes": self.store.record_outcomes,
                   "shadow": self.store.record_shadow}
        for kind, write in writers.items():
            with self._lock:
                rows, self._buffers[kind] = self._buffers[kind], []
            if not rows:
                continue
            try:
                write(rows)
            except Exception as exc:
                log.warning("could not record %d %s (will retry): %s", len(rows), kind, exc)
                with self._lock:
                    self._buffers[kind] = rows + self._buffers[kind]

    def _run(self) -> None:
        next_poll = next_flush = 0.0
        while not self._stop.wait(min(self._flush_s, self._poll_s)):
            if time.monotonic() >= next_flush:
                next_flush = time.monotonic() + self._flush_s
                self.flush()
            if time.monotonic() >= next_poll:
                next_poll = time.monotonic() + self._poll_s
                try:
                    self.refresh()
                except Exception as exc:  # storage unreachable for a moment: keep routing, retry
                    log.warning("cannot read the active experiment: %s", exc)
        self.flush()

    def close(self) -> None:
        self._stop.set()

    def status(self) -> dict[str, Any] | None:
        """For ``/healthz``: the experiment followed, its revision and variants' versions."""
        routing = self.current
        if routing is None:
            return {"experiment": None, "error": self.last_error} if self.last_error else None
        return {"experiment": routing.experiment.name, "revision": routing.revision,
                "variants": routing.versions(),
                "shadow": routing.shadow.version.version if routing.shadow else None, "error": self.last_error}


__all__ = ["ExperimentRouter", "Routing"]
