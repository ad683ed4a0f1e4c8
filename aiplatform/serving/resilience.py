"""What keeps a serving replica answering when a dependency fails: circuit breakers, bounded TTL
caches, and time limits on the Redis client.

Why breakers: when the online store (Redis) stops, every call to it fails, and each failure costs
a connection attempt or, for a hung server, a socket timeout. Without a breaker every batch pays
that and then answers with an error. A ``CircuitBreaker`` counts consecutive failures; after
``failure_threshold`` of them it *opens* and rejects calls at once for ``reset_after_s``, so the
pipeline answers from what it already has (the user's last good answer, the popular items) in
microseconds. Then it lets exactly one trial call through (*half-open*): success closes it, a
failure opens it for another ``reset_after_s``. A restarted Redis is therefore used again within
about ``reset_after_s`` without anything being restarted.

Why caches: a replica answers the same users again and again within seconds (page views,
pagination), and the features of a user change only when their events are pushed or the feature
job runs. A short TTL (``ResilienceConfig.feature_ttl_s``, 2 s by default) halves store reads on
such traffic and keeps answers fresh: a replica's own ``POST /v1/events`` invalidates the user
at once, and every other replica drops the user's entries when it next reads the online store's
change feed (``serving.freshness``, every ``feed_poll_s``), or at the latest after the TTL when it
cannot read the feed. The caches are
bounded (``cachetools.TTLCache``: least recently used entries go first when full), so a replica's
memory does not grow with the number of users.

The breaker is hand-written (a few dozen lines): pybreaker is not among the packages this project
may use, and the pipeline needs its counters in ``/healthz`` and an injectable clock for tests.
"""

import os
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from cachetools import TTLCache

from aiplatform.core.errors import ConfigError

T = TypeVar("T")
MISS: Any = object()
"""What ``CountingTTLCache.get`` returns for a key it does not hold (a stored None is a value)."""

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


class BreakerOpen(Exception):
    """A call was not made because its component's breaker is open."""

    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(f"{name}: circuit open after repeated failures; next trial in {retry_in_s:.1f}s")
        self.name, self.retry_in_s = name, retry_in_s


class CircuitBreaker:
    """Closed -> open after ``failure_threshold`` consecutive failures (an exception, or a call
    slower than ``slow_call_s`` when set); open for ``reset_after_s``; then half-open: one trial
    call, which closes it on success and opens it again on failure. Thread-safe."""

    def __init__(self, name: str, failure_threshold: int = 3, reset_after_s: float = 2.0,
                 slow_call_s: float | None = None, timer: Callable[[], float] = time.monotonic) -> None:
        if failure_threshold < 1:
            raise ConfigError(f"{name}: failure_threshold must be >= 1, got {failure_threshold}")
        if reset_after_s < 0:
            raise ConfigError(f"{name}: reset_after_s must be >= 0, got {reset_after_s}")
        self.name, self.failure_threshold, self.reset_after_s = name, int(failure_threshold), float(reset_after_s)
        self.slow_call_s = slow_call_s
        self._timer = timer
        self._lock = threading.Lock()
        self._state = CLOSED
        self._consecutive = 0
        self._opened_at = 0.0
        self._trial_started: float | None = None
        self.calls = self.failures = self.timeouts = self.rejections = self.opened = 0
        self.last_error: str | None = None

    @property
    def state(self) -> str:
        """closed, open or half_open, as of now (an open breaker whose time is up is half-open)."""
        with self._lock:
            if self._state == OPEN and self._timer() - self._opened_at >= self.reset_after_s:
                return HALF_OPEN
            return self._state

    def allow(self) -> bool:
        """Whether a call may go ahead now; a False is counted as a rejection. The caller must
        report the call's outcome (``record_success``/``record_failure``); ``call`` does."""
        with self._lock:
            now = self._timer()
            if self._state == CLOSED:
                return True
            if self._state == OPEN and now - self._opened_at >= self.reset_after_s:
                self._state = HALF_OPEN
                self._trial_started = None
            if self._state == HALF_OPEN:
                # one trial at a time; a trial whose outcome never came back is replaced after
                # reset_after_s, so a lost report cannot keep the breaker half-open forever
                if self._trial_started is None or now - self._trial_started >= self.reset_after_s:
                    self._trial_started = now
                    return True
            self.rejections += 1
            return False

    def record_success(self, elapsed_s: float | None = None) -> None:
        """A call succeeded (one slower than ``slow_call_s`` counts as a timeout: a failure)."""
        if self.slow_call_s is not None and elapsed_s is not None and elapsed_s > self.slow_call_s:
            self._failed(f"slow call: {elapsed_s:.3f}s > {self.slow_call_s}s", timeout=True)
            return
        with self._lock:
            self.calls += 1
            self._consecutive = 0
            self._state, self._trial_started = CLOSED, None

    def record_failure(self, error: BaseException | str | None = None) -> None:
        """A call failed; ``error`` is kept (as text) for ``/healthz``."""
        self._failed(error, timeout=_is_timeout(error))

    def _failed(self, error: BaseException | str | None, timeout: bool) -> None:
        with self._lock:
            self.calls += 1
            self.failures += 1
            self.timeouts += int(timeout)
            self._consecutive += 1
            if error is not None:
                self.last_error = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
            if self._state == HALF_OPEN or self._consecutive >= self.failure_threshold:
                if self._state != OPEN:
                    self.opened += 1
                self._state, self._opened_at, self._trial_started = OPEN, self._timer(), None

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` through the breaker: ``BreakerOpen`` without calling it when
        open, and its outcome recorded (its exception re-raised)."""
        if not self.allow():
            with self._lock:
                retry_in = max(0.0, self.reset_after_s - (self._timer() - self._opened_at))
            raise BreakerOpen(self.name, retry_in)
        started = self._timer()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.record_failure(exc)
            raise
        self.record_success(self._timer() - started)
        return result

    def stats(self) -> dict[str, Any]:
        """State and counters, for ``/healthz``."""
        state = self.state
        with self._lock:
            return {"state": state, "calls": self.calls, "failures": self.failures, "timeouts": self.timeouts,
                    "rejections": self.rejections, "opened": self.opened,
                    "consecutive_failures": self._consecutive, "last_error": self.last_error}


def _is_timeout(error: BaseException | str | None) -> bool:
    if isinstance(error, TimeoutError):
        return True
    return isinstance(error, BaseException) and "Timeout" in type(error).__name__  # redis.TimeoutError


class CountingTTLCache:
    """A bounded TTL cache (``cachetools.TTLCache``: entries expire ``ttl_s`` after being put,
    the least recently used go first when full) that counts hits and misses. Thread-safe.
    ``ttl_s`` or ``maxsize`` of 0 turns it off: every get is a miss, nothing is kept."""

    def __init__(self, maxsize: int, ttl_s: float, timer: Callable[[], float] = time.monotonic) -> None:
        if maxsize < 0 or ttl_s < 0:
            raise ConfigError(f"cache: maxsize and ttl_s must be >= 0, got {maxsize} and {ttl_s}")
        self.maxsize, self.ttl_s = int(maxsize), float(ttl_s)
        self.enabled = self.maxsize > 0 and self.ttl_s > 0
        self._cache: TTLCache = TTLCache(max(1, self.maxsize), max(self.ttl_s, 1e-9), timer=timer)
        self._lock = threading.Lock()
        self.hits = self.misses = self.invalidations = 0

    def get(self, key: Hashable) -> Any:
        """The value of ``key``, or ``MISS``."""
        with self._lock:
            value = self._cache.get(key, MISS) if self.enabled else MISS
            if value is MISS:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def peek(self, key: Hashable) -> Any:
        """Like ``get`` without counting (for fallbacks that are not the cache's own traffic)."""
        with self._lock:
            return self._cache.get(key, MISS) if self.enabled else MISS

    def put(self, key: Hashable, value: Any) -> None:
        if self.enabled:
            with self._lock:
                self._cache[key] = value

    def invalidate(self, key: Hashable) -> bool:
        """Drop ``key``; True if it was held."""
        with self._lock:
            held = self._cache.pop(key, MISS) is not MISS
            self.invalidations += int(held)
            return held

    def clear(self) -> int:
        """Drop every entry (counted as invalidations); how many were held."""
        with self._lock:
            self._cache.expire()
            held = len(self._cache)
            self._cache.clear()
            self.invalidations += held
            return held

    def __len__(self) -> int:
        with self._lock:
            self._cache.expire()
            return len(self._cache)

    def stats(self) -> dict[str, Any]:
        """Hits, misses, hit rate (None before the first get), size and TTL, for ``/healthz``."""
        with self._lock:
            looked = self.hits + self.misses
            self._cache.expire()
            return {"hits": self.hits, "misses": self.misses,
                    "hit_rate": round(self.hits / looked, 4) if looked else None,
                    "size": len(self._cache) if self.enabled else 0, "maxsize": self.maxsize,
                    "ttl_s": self.ttl_s, "invalidations": self.invalidations}


ENV_PREFIX = "AIPLATFORM_SERVING_"


@dataclass(frozen=True)
class ResilienceConfig:
    """How a replica caches and degrades. Each field can be set in the replica's environment as
    ``AIPLATFORM_SERVING_<FIELD>`` (e.g. ``AIPLATFORM_SERVING_FEATURE_TTL_S=5``)."""

    feature_ttl_s: float = 2.0
    """How long a user's feature row (or its absence) is reused: the longest another replica
    takes to see that user's pushed events."""
    answer_ttl_s: float = 2.0
    """How long a computed answer is served again as is (not longer than the feature TTL, or
    answers would outlive the features they came from)."""
    last_good_ttl_s: float = 3600.0
    """How long a user's last good answer may stand in for a failed one."""
    cache_size: int = 100_000
    """Most users per cache (three caches per replica and served version)."""
    failure_threshold: int = 3
    """Consecutive failures that open a component's breaker."""
    reset_after_s: float = 2.0
    """How long an open breaker rejects calls before one trial: about how long a restarted
    Redis waits to be used again."""
    store_timeout_s: float = 0.5
    """Socket (and connect) timeout of the Redis online store's client (redis-py's default: 5 s)."""
    store_retries: int = 1
    """Retries of a Redis command whose connection failed (a pooled connection to a Redis that
    has since restarted fails once, then a new one works); a timeout is never retried."""
    slow_call_s: float | None = None
    """When set, a component call slower than this counts as a failure (a timeout)."""
    feed_poll_s: float = 0.25
    """How often a replica reads the online store's change feed and drops the cached entries of
    users another replica pushed events for (``serving.freshness``); 0 turns the reading off
    (other replicas' pushes then show after the TTLs above)."""

    @classmethod
    def from_env(cls, environ: "dict[str, str] | None" = None) -> "ResilienceConfig":
        """Defaults, overridden by ``AIPLATFORM_SERVING_*`` variables (``ConfigError`` naming the
        variable for a value that is not a number >= 0)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None or raw.strip() == "":
                continue
            kind = int if f.name in ("cache_size", "failure_threshold", "store_retries") else float
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: expected {'an integer' if kind is int else 'a number'} "
                                  f">= 0; unset it for the default {getattr(cls, f.name)!r}") from None
            if value < 0:
                raise ConfigError(f"{name}={raw!r}: must be >= 0")
            values[f.name] = value
        return cls(**values)

    def breaker(self, name: str, timer: Callable[[], float] = time.monotonic) -> CircuitBreaker:
        return CircuitBreaker(name, max(1, self.failure_threshold), self.reset_after_s, self.slow_call_s, timer)


def bound_redis_client(store: Any, timeout_s: float, retries: int) -> bool:
    """Give a Redis online store's client short socket timeouts, ``retries`` retries on a
    failed connection and none on a timeout; True if ``store`` is one.

    ``features.online_redis.RedisOnlineStore`` builds its client with redis-py's defaults: 5 s
    socket and connect timeouts, so every call to a hung server (or one behind a dropped
    network path) holds the replica's event loop, and all its requests, for 5 s. Applied before
    the first command, so every pooled connection is made with these settings."""
    client = getattr(store, "client", None)
    pool = getattr(client, "connection_pool", None)
    if pool is None or not hasattr(pool, "connection_kwargs"):
        return False
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.retry import Retry

    pool.connection_kwargs.update(socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
    retry = Retry(NoBackoff(), int(retries), supported_errors=(RedisConnectionError,))
    if hasattr(client, "set_retry"):
        client.set_retry(retry)
    else:  # pragma: no cover - older redis-py
        pool.connection_kwargs["retry"] = retry
    pool.disconnect()  # connections made before (none, normally) would keep the old settings
    return True


__all__ = ["BreakerOpen", "CircuitBreaker", "CountingTTLCache", "MISS", "ResilienceConfig", "bound_redis_client"]
