"""Cross-replica cache freshness: every serving replica follows the online store's change feed.

Each replica caches users' feature rows and answers for a short TTL (``serving.resilience``).
A ``POST /v1/events`` reaches one replica, which drops that user's entries at once; without more,
every other replica would keep answering from its cache for up to the feature TTL plus the answer
TTL, so a shopper whose next page load lands on another replica would still be shown what they
just bought. ``features.push`` therefore publishes the entities it rewrote on the online store's
change feed (``publish_changes``: the store is the one thing all replicas already share, so no
other service is needed), and each pipeline runs a ``ChangeFeedPoller``: a daemon thread that
reads the feed every ``ResilienceConfig.feed_poll_s`` (0.25 s by default) and drops those users'
entries. A purchase thus shows on every replica within about one poll interval.

The poller starts at the feed's end when the pipeline is made (what was pushed before is already
in the store its caches fill from). When its cursor falls behind what the store pruned, or the
feed restarted, it cannot know which users it missed and clears the feature and answer caches
whole (``resets``). A failed read never stops the thread or the replica: it is logged at debug
level, counted (``poll_errors``) and retried at the next tick, through the poller's own circuit
breaker, so a hung store costs one timeout per ``reset_after_s`` on this thread, never a
request's. While the feed cannot be read, the caches' TTLs still bound how stale an answer gets.

The thread holds the poller only weakly: a pipeline dropped without ``close`` (an experiment's
variant, say) ends its thread at the next tick instead of being kept alive by it.
"""

import logging
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from aiplatform.serving.resilience import CircuitBreaker, CountingTTLCache

log = logging.getLogger(__name__)


class ChangeFeedPoller:
    """Reads ``store``'s change feed for ``service_name`` and drops the entities it names from
    ``caches`` (and clears ``clear_on_reset`` when entries were missed). ``poll_once`` is one
    tick (tests call it directly); ``start(interval_s)`` runs ticks in a daemon thread."""

    def __init__(self, store: Any, service_name: str, caches: Sequence[CountingTTLCache],
                 breaker: CircuitBreaker, clear_on_reset: Sequence[CountingTTLCache] | None = None) -> None:
        self.store, self.service_name, self.breaker = store, service_name, breaker
        self.caches = tuple(caches)
        self.clear_on_reset = tuple(self.caches if clear_on_reset is None else clear_on_reset)
        self.cursor: int | None = None
        self.interval_s = 0.0
        self.polls = self.keys = self.remote_invalidations = self.resets = self.poll_errors = 0
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._read_end()

    def _read_end(self) -> bool:
        """Take the feed's current end as the cursor; False (counted) when the store failed."""
        try:
            self.cursor = self.breaker.call(self.store.read_changes, self.service_name, None).cursor
        except Exception as exc:
            self._failed(exc)
            return False
        return True

    def start(self, interval_s: float) -> None:
        """Poll every ``interval_s`` seconds in a daemon thread (0: do not)."""
        self.interval_s = float(interval_s)
        if self.interval_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=_run, args=(weakref.ref(self), self._stop, self.interval_s),
                                        name=f"change-feed-{self.service_name}", daemon=True)
        self._thread.start()

    def poll_once(self) -> int:
        """Read what was published since the last tick and drop it from the caches; returns the
        cache entries dropped (0 after a failed read, which is counted in ``poll_errors``)."""
        with self._lock:
            if self.cursor is None:  # the store failed at start: begin now, and forget what may
                if not self._read_end():  # have been cached meanwhile (pushes were not followed)
                    return 0
                return self._reset()
            try:
                batch = self.breaker.call(self.store.read_changes, self.service_name, self.cursor)
            except Exception as exc:
                self._failed(exc)
                return 0
            self.polls += 1
            self.cursor = batch.cursor
            if batch.reset:
                return self._reset()
            dropped = 0
            for entity in batch.entity_ids:
                for cache in self.caches:
                    dropped += int(cache.invalidate(entity))
            self.keys += len(batch.entity_ids)
            self.remote_invalidations += dropped
            return dropped

    def _reset(self) -> int:
        self.resets += 1
        dropped = sum(cache.clear() for cache in self.clear_on_reset)
        self.remote_invalidations += dropped
        log.info("change feed of %s: entries were missed (pruned, or the feed restarted); dropped all %d "
                 "cached entries", self.service_name, dropped)
        return dropped

    def _failed(self, exc: Exception) -> None:
        self.poll_errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.debug("change feed of %s unreadable (%s); retrying next tick", self.service_name, self.last_error)

    def close(self) -> None:
        """Stop the thread (it ends within one tick; an in-flight read is not waited for)."""
        self._stop.set()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        """For ``/healthz?detail=true``: entries dropped because other replicas pushed
        (``remote_invalidations``, this replica's own pushes included), failed reads, resets."""
        return {"interval_s": self.interval_s, "running": self.running, "cursor": self.cursor,
                "polls": self.polls, "keys": self.keys, "remote_invalidations": self.remote_invalidations,
                "resets": self.resets, "poll_errors": self.poll_errors, "last_error": self.last_error,
                "breaker": self.breaker.state}


def _run(ref: "weakref.ref[ChangeFeedPoller]", stop: threading.Event, interval_s: float) -> None:
    while not stop.wait(interval_s):
        poller = ref()
        if poller is None:  # its pipeline is gone
            return
        try:
            poller.poll_once()
        except Exception:  # never let a bug end the thread silently: log it, keep polling
            log.exception("change feed poller of %s failed", poller.service_name)
        del poller


__all__ = ["ChangeFeedPoller"]
