"""Prometheus metrics of the serving path, named ``aiplatform_*``.

Recorded through Ray's metrics API (``ray.serve.metrics``, which adds the ``application``,
``deployment`` and ``replica`` tags): Ray's metrics agent on every node exposes them at the
node's metrics export port, next to Ray's own series, which is what Prometheus (or KubeRay's
PodMonitor) scrapes. Nothing here opens a port of its own.

Every request series carries the ``variant`` and ``model_version`` that answered, so a panel
or an alert can split by experiment arm. The metric objects are made in the replica, once, the
first time they are needed (``ServingMetrics.get``): Ray registers them with the process's
metrics agent.
"""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar
from collections.abc import Callable
from typing import Any

EXPORTED_SERIES = frozenset({
    # serving (ServingMetrics); a histogram's _sum and _count come with its _bucket
    "aiplatform_requests_total", "aiplatform_request_latency_seconds_bucket", "aiplatform_fallbacks_total",
    "aiplatform_cache_lookups_total", "aiplatform_circuit_breaker_state", "aiplatform_feature_age_seconds_bucket",
    "aiplatform_push_latency_seconds_bucket", "aiplatform_events_accepted_total", "aiplatform_replica_cpu_seconds_total",
    # training (TrainingMetrics)
    "aiplatform_train_epoch", "aiplatform_train_samples_per_second", "aiplatform_train_validation",
})
"""The series names Prometheus sees (what dashboards and alert rules may query; a test checks both)."""

LATENCY_BUCKETS_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]
AGE_BUCKETS_S = [1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0, 30 * 86400.0]
BREAKER_STATES = {"closed": 0, "half_open": 1, "half-open": 1, "open": 2}

# What the handler learnt about the request (variant, model version), for the middleware that
# records it once the response is out: a dict, so the handler's updates are seen whatever
# context the framework ran it in.
REQUEST_LABELS: ContextVar[dict[str, str] | None] = ContextVar("aiplatform_request_labels", default=None)


REQUEST_OBSERVERS: list[Callable[[str, int, float, dict[str, str]], None]] = []
"""In-process observers of every answered request (route, status, seconds, labels): the
console's recent-traffic window (``aiplatform.web.traffic``) reads the replica's own numbers."""


def label_request(**labels: Any) -> None:
    """Attach labels (``variant``, ``model_version``) to the request being handled."""
    current = REQUEST_LABELS.get()
    if current is not None:
        current.update({k: str(v) for k, v in labels.items() if v is not None})


class ServingMetrics:
    """The serving replica's metrics (one set per process)."""

    _instance: ServingMetrics | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        from ray.serve import metrics as m

        self.requests = m.Counter(
            "aiplatform_requests", description="HTTP requests answered, by route, method, status, variant "
                                               "and model version.",
            tag_keys=("route", "method", "status", "variant", "model_version"))
        self.latency = m.Histogram(
            "aiplatform_request_latency_seconds", description="Time from request to response, in the replica.",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("route", "variant", "model_version"))
        self.fallbacks = m.Counter(
            "aiplatform_fallbacks", description="Answers that were not the model's: popular items for an "
                                                "unknown user, degraded when a part failed.",
            tag_keys=("kind", "variant", "model_version"))
        self.cache_lookups = m.Counter(
            "aiplatform_cache_lookups", description="Serving cache lookups by cache and result (hit, miss).",
            tag_keys=("cache", "result"))
        self.breaker_state = m.Gauge(
            "aiplatform_circuit_breaker_state", description="Circuit breaker per component: 0 closed, "
                                                            "1 half-open, 2 open.",
            tag_keys=("component",))
        self.feature_age = m.Histogram(
            "aiplatform_feature_age_seconds", description="Age of a user's online features when read for a "
                                                          "recommendation (now minus their event time).",
            boundaries=AGE_BUCKETS_S, tag_keys=("feature_service",))
        self.push_latency = m.Histogram(
            "aiplatform_push_latency_seconds", description="Time to record a POST /v1/events batch (event log "
                                                           "and online features).",
            boundaries=LATENCY_BUCKETS_S, tag_keys=("outcome",))
        self.events_accepted = m.Counter(
            "aiplatform_events_accepted", description="Events recorded by POST /v1/events (duplicates not "
                                                      "counted).", tag_keys=())
        self.replica_cpu = m.Counter(
            "aiplatform_replica_cpu_seconds", description="CPU-seconds of the serving replica: 'reserved' (the "
                                                          "logical CPUs Ray assigned to it, times the seconds it "
                                                          "ran) and 'used' (its process's CPU time).",
            tag_keys=("kind",))
        self._cache_seen: dict[tuple[str, str], int] = {}

    @classmethod
    def get(cls) -> ServingMetrics:
        with cls._lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def record_request(self, route: str, method: str, status: int, seconds: float, labels: dict[str, str]) -> None:
        variant, version = labels.get("variant", ""), labels.get("model_version", "")
        self.requests.inc(1, tags={"route": route, "method": method, "status": str(status),
                                   "variant": variant, "model_version": version})
        self.latency.observe(seconds, tags={"route": route, "variant": variant, "model_version": version})
        fallback = labels.get("fallback")
        if fallback:
            self.fallbacks.inc(1, tags={"kind": fallback, "variant": variant, "model_version": version})

    def record_push(self, seconds: float, outcome: str, accepted: int) -> None:
        self.push_latency.observe(seconds, tags={"outcome": outcome})
        if accepted:
            self.events_accepted.inc(accepted)

    def record_replica_cpu(self, reserved_s: float, used_s: float) -> None:
        if reserved_s > 0:
            self.replica_cpu.inc(reserved_s, tags={"kind": "reserved"})
        if used_s > 0:
            self.replica_cpu.inc(used_s, tags={"kind": "used"})

    def record_feature_ages(self, service: str, ages_s: list[float]) -> None:
        for age in ages_s:
            self.feature_age.observe(max(0.0, age), tags={"feature_service": service})

    def record_serving_status(self, status: dict[str, Any]) -> None:
        """Caches and breakers from a pipeline's ``serving_status()``: hit and miss counts as
        counters (the increase since the last call), breaker states as gauges."""
        for cache, stats in (status.get("caches") or {}).items():
            for result in ("hits", "misses"):
                total = int(stats.get(result) or 0)
                seen = self._cache_seen.get((cache, result), 0)
                if total > seen:
                    self.cache_lookups.inc(total - seen, tags={"cache": cache, "result": result[:-1] if
                                                               result == "hits" else "miss"})
                self._cache_seen[(cache, result)] = total
        for component, stats in (status.get("breakers") or {}).items():
            self.breaker_state.set(BREAKER_STATES.get(str(stats.get("state")), 2), tags={"component": component})

    def forget_cache_counts(self) -> None:
        """After a version switch the new pipeline's caches count from zero."""
        self._cache_seen.clear()


class MetricsMiddleware:
    """Records every HTTP request (route template, method, status, latency, and the variant and
    model version the handler labelled it with). Pure ASGI: no task per request."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        labels: dict[str, str] = {}
        status = {"code": 500}
        token = REQUEST_LABELS.set(labels)

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            REQUEST_LABELS.reset(token)
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            try:
                seconds = time.perf_counter() - started
                ServingMetrics.get().record_request(route, scope.get("method", ""), status["code"], seconds, labels)
                for observe in REQUEST_OBSERVERS:
                    observe(route, status["code"], seconds, labels)
            except Exception:  # metrics never fail a request
                pass


class TrainingMetrics:
    """Progress of a training run, from its rank-0 worker (``ray.util.metrics``): throughput,
    the epoch reached and the validation metrics of the last epoch, by run."""

    _instance: TrainingMetrics | None = None

    def __init__(self) -> None:
        from ray.util import metrics as m

        self.samples_per_s = m.Gauge("aiplatform_train_samples_per_second",
                                     description="Training throughput of the last epoch (all workers).",
                                     tag_keys=("run",))
        self.epoch = m.Gauge("aiplatform_train_epoch", description="The last epoch finished.", tag_keys=("run",))
        self.validation = m.Gauge("aiplatform_train_validation", description="Validation metrics of the last "
                                                                            "epoch (val_loss, val_recall).",
                                  tag_keys=("run", "metric"))

    @classmethod
    def get(cls) -> TrainingMetrics:
        if cls._instance is None:
            cls._instance = cls()
        return cls._instance

    def record_epoch(self, run: str, metrics: dict[str, Any]) -> None:
        tags = {"run": run}
        self.epoch.set(float(metrics.get("epoch", 0)), tags=tags)
        self.samples_per_s.set(float(metrics.get("samples_per_s", 0.0)), tags=tags)
        for name in ("val_loss", "val_recall"):
            if isinstance(metrics.get(name), (int, float)):
                self.validation.set(float(metrics[name]), tags={"run": run, "metric": name})
