"""The replica's recent traffic, for the console's Serving tab.

The tab sums every replica's Prometheus series from Ray's metrics endpoints
(``web.serving_metrics``); when none of those endpoints answers, it falls back to this: each
replica keeps its last few minutes of requests in memory, fed by the same middleware that
records the Prometheus series (``observability.metrics.REQUEST_OBSERVERS``), and the tab shows
the numbers of the replica that answered it, labelled "this replica only".
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

WINDOW_S = 300.0
MAX_KEPT = 50_000
"""Bounded: at 500 requests/s the window holds the last 100 s rather than growing."""


@dataclass(frozen=True)
class RouteStats:
    route: str
    requests: int
    rate_per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    fallbacks: int

    @property
    def fallback_rate(self) -> float:
        return self.fallbacks / self.requests if self.requests else 0.0


class RequestWindow:
    """Requests answered in the last ``window_s`` seconds (route, status, latency, fallback)."""

    def __init__(self, window_s: float = WINDOW_S, max_kept: int = MAX_KEPT) -> None:
        self.window_s = window_s
        self._rows: deque[tuple[float, str, int, float, bool]] = deque(maxlen=max_kept)
        self._lock = threading.Lock()
        self.started = time.monotonic()

    def observe(self, route: str, status: int, seconds: float, labels: dict[str, str]) -> None:
        with self._lock:
            self._rows.append((time.monotonic(), route, int(status), float(seconds), bool(labels.get("fallback"))))

    def stats(self, now: float | None = None) -> list[RouteStats]:
        """Per route (busiest first, then ``all``): rate over the window, p50/p99, 5xx, fallbacks."""
        now = time.monotonic() if now is None else now
        with self._lock:
            rows = [r for r in self._rows if r[0] >= now - self.window_s]
        span = max(1.0, min(self.window_s, now - min((r[0] for r in rows), default=now)))
        groups: dict[str, list[tuple[float, str, int, float, bool]]] = {}
        for row in rows:
            groups.setdefault(row[1], []).append(row)
        out = [self._summary(route, group, span) for route, group in groups.items()]
        out.sort(key=lambda s: -s.requests)
        if len(groups) > 1:
            out.append(self._summary("all", rows, span))
        return out

    @staticmethod
    def _summary(route: str, rows: list, span: float) -> RouteStats:
        latency_ms = np.array([r[3] for r in rows]) * 1000
        return RouteStats(route=route, requests=len(rows), rate_per_s=len(rows) / span,
                          p50_ms=float(np.percentile(latency_ms, 50)) if len(rows) else float("nan"),
                          p99_ms=float(np.percentile(latency_ms, 99)) if len(rows) else float("nan"),
                          errors=sum(1 for r in rows if r[2] >= 500), fallbacks=sum(1 for r in rows if r[4]))


_window: RequestWindow | None = None


def window() -> RequestWindow:
    """This process's window, registered with the metrics middleware the first time."""
    global _window
    if _window is None:
        from aiplatform.observability.metrics import REQUEST_OBSERVERS

        _window = RequestWindow()
        REQUEST_OBSERVERS.append(_window.observe)
    return _window
