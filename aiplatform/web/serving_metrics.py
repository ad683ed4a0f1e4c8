"""The Serving tab's traffic numbers for the whole application, from the replicas' own
Prometheus series (``observability.metrics.ServingMetrics``) as Ray's metrics agents export them.

Any replica may answer the console, and each one only sees its own requests, so the tab reads
every node's metrics endpoint (``observability.scrape``) and sums over all replicas of this
application: the request and fallback counters, and the latency histogram bucket by bucket
(p50 and p99 then come from the summed buckets, interpolated as Prometheus's
``histogram_quantile`` does). Counters only say "since the replica started"; a rate needs two
scrapes, so each replica keeps its last few minutes of scrapes and shows the increase since the
oldest of them. A counter that went down between two scrapes belongs to a replica that
restarted: its whole current value is the increase (Prometheus's ``increase()`` rule).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from aiplatform.observability.scrape import Sample

REQUESTS = "aiplatform_requests_total"
LATENCY = "aiplatform_request_latency_seconds_bucket"
FALLBACKS = "aiplatform_fallbacks_total"
COUNTERS = (REQUESTS, LATENCY, FALLBACKS)
HISTORY_S = 300.0
"""A rate is the increase since the oldest scrape this replica kept within these seconds."""
MIN_SPAN_S = 5.0
"""Two scrapes closer than this (about Ray's export interval) make no rate: the totals show."""

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True)
class Snapshot:
    """One scrape of this application's counters: series (name and labels) to value."""

    taken: float
    """``time.monotonic()`` when it was taken."""
    series: dict[Key, float]

    @property
    def replicas(self) -> int:
        """Replicas whose series were in the scrape (each one exports at least its CPU counter)."""
        return len({dict(labels).get("replica") for _, labels in self.series} - {None, ""})


def snapshot(samples: list[Sample], application: str, taken: float | None = None) -> Snapshot:
    """The counters of ``application`` among ``samples`` (every replica's series kept apart)."""
    taken = time.monotonic() if taken is None else taken
    series: dict[Key, float] = {}
    for s in samples:
        if s.label("application") == application and (s.name in COUNTERS or s.name.endswith("_total")):
            series[(s.name, s.labels)] = series.get((s.name, s.labels), 0.0) + s.value
    return Snapshot(taken, series)


def increase(current: Snapshot, previous: Snapshot | None) -> dict[Key, float]:
    """Each series' increase since ``previous`` (everything, with no previous scrape). A series
    that is new, or lower than before (its replica restarted), counts its whole value."""
    if previous is None:
        return dict(current.series)
    out = {}
    for key, value in current.series.items():
        before = previous.series.get(key)
        out[key] = value if before is None or value < before else value - before
    return out


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of a cumulative histogram (upper bound ``le`` -> count), interpolated
    linearly inside the bucket it falls in, as Prometheus's ``histogram_quantile`` does: the
    lowest bucket starts at 0, and a quantile in the ``+Inf`` bucket is the highest finite bound.
    None for an empty histogram."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if math.isinf(bounds[-1]) else max(buckets.values())
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


@dataclass(frozen=True)
class TrafficRow:
    """One route's, or one variant and model version's, numbers over a span."""

    name: str
    requests: float
    errors: float
    rate_per_s: float | None
    p50_ms: float | None
    p99_ms: float | None
    fallbacks: float | None = None

    @property
    def fallback_rate(self) -> float | None:
        if self.fallbacks is None:
            return None
        return self.fallbacks / self.requests if self.requests else 0.0


def _row(name: str, counts: dict[str, float], buckets: dict[float, float], span_s: float | None,
         fallbacks: float | None = None) -> TrafficRow:
    p50, p99 = quantile(0.5, buckets), quantile(0.99, buckets)
    return TrafficRow(name=name, requests=counts.get("requests", 0.0), errors=counts.get("errors", 0.0),
                      rate_per_s=counts.get("requests", 0.0) / span_s if span_s else None,
                      p50_ms=None if p50 is None else p50 * 1000, p99_ms=None if p99 is None else p99 * 1000,
                      fallbacks=fallbacks)


def summarize(series: dict[Key, float], span_s: float | None = None) -> dict[str, list[TrafficRow]]:
    """Per route (busiest first, then ``all``) and per variant and model version (the requests
    a handler labelled with the version that answered): requests, rate over ``span_s`` (None:
    no rate), p50/p99 from the summed latency buckets, 5xx, and for variants the fallback share."""
    routes: dict[str, dict[str, float]] = {}
    variants: dict[tuple[str, str], dict[str, float]] = {}
    route_buckets: dict[str, dict[float, float]] = {}
    variant_buckets: dict[tuple[str, str], dict[float, float]] = {}
    every_bucket: dict[float, float] = {}
    fallbacks: dict[tuple[str, str], float] = {}
    for (name, labels), value in series.items():
        tags = dict(labels)
        route, arm = tags.get("route", ""), (tags.get("variant", ""), tags.get("model_version", ""))
        if name == REQUESTS:
            failed = value if tags.get("status", "").startswith("5") else 0.0
            for counts in (routes.setdefault(route, {}), *((variants.setdefault(arm, {}),) if arm[0] else ())):
                counts["requests"] = counts.get("requests", 0.0) + value
                counts["errors"] = counts.get("errors", 0.0) + failed
        elif name == LATENCY and "le" in tags:
            le = float(tags["le"])
            for buckets in (route_buckets.setdefault(route, {}), every_bucket,
                            *((variant_buckets.setdefault(arm, {}),) if arm[0] else ())):
                buckets[le] = buckets.get(le, 0.0) + value
        elif name == FALLBACKS and arm[0]:
            fallbacks[arm] = fallbacks.get(arm, 0.0) + value
    route_rows = sorted((_row(r, c, route_buckets.get(r, {}), span_s) for r, c in routes.items()),
                        key=lambda row: (-row.requests, row.name))
    if len(route_rows) > 1:
        total = {k: sum(c.get(k, 0.0) for c in routes.values()) for k in ("requests", "errors")}
        route_rows.append(_row("all", total, every_bucket, span_s))
    variant_rows = sorted((_row(f"{arm[0]} (v{arm[1]})" if arm[1] else arm[0], c, variant_buckets.get(arm, {}),
                                span_s, fallbacks.get(arm, 0.0)) for arm, c in variants.items()),
                          key=lambda row: (-row.requests, row.name))
    return {"routes": route_rows, "variants": variant_rows}


class ScrapeHistory:
    """This replica's recent scrapes, to measure a rate against the oldest of them."""

    def __init__(self, keep_s: float = HISTORY_S, min_span_s: float = MIN_SPAN_S) -> None:
        self.keep_s, self.min_span_s = keep_s, min_span_s
        self._kept: deque[Snapshot] = deque()
        self._lock = threading.Lock()

    def add(self, current: Snapshot) -> Snapshot | None:
        """Keep ``current``; return the oldest kept scrape at least ``min_span_s`` older and at
        most ``keep_s`` older, or None (the first visit, or one right after another)."""
        with self._lock:
            while self._kept and current.taken - self._kept[0].taken > self.keep_s:
                self._kept.popleft()
            base = self._kept[0] if self._kept and current.taken - self._kept[0].taken >= self.min_span_s else None
            # at most one kept per min_span_s: a page reloaded in a loop keeps memory bounded
            if not self._kept or current.taken - self._kept[-1].taken >= self.min_span_s:
                self._kept.append(current)
            return base


_history = ScrapeHistory()


def cluster_traffic(application: str, samples: list[Sample], nodes: int, failed: dict[str, str],
                    history: ScrapeHistory | None = None, now: float | None = None) -> dict[str, Any]:
    """What the tab shows from one scrape of every node: totals since the replicas started and,
    given an earlier scrape, the increase and rate since then."""
    history = _history if history is None else history
    current = snapshot(samples, application, now)
    base = history.add(current)
    span = current.taken - base.taken if base is not None else None
    return {"application": application, "nodes": nodes, "failed": failed, "replicas_reporting": current.replicas,
            "totals": summarize(increase(current, None)),
            "window": summarize(increase(current, base), span) if base is not None else None,
            "window_s": span}


__all__ = ["ScrapeHistory", "Snapshot", "TrafficRow", "cluster_traffic", "increase", "quantile", "snapshot",
           "summarize"]
