"""The serving replica's circuit breaker, TTL caches and Redis time limits (serving.resilience)."""

import socket
import threading

import pytest

from aiplatform.core.errors import ConfigError
from aiplatform.serving.resilience import (
    MISS,
    BreakerOpen,
    CircuitBreaker,
    CountingTTLCache,
    ResilienceConfig,
    bound_redis_client,
)


class Clock:
    """A timer the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _boom() -> None:
    raise ConnectionError("store down")


def _fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            breaker.call(_boom)


def test_breaker_opens_after_n_consecutive_failures_and_then_rejects_without_calling():
    clock = Clock()
    breaker = CircuitBreaker("online_store", failure_threshold=3, reset_after_s=2.0, timer=clock)
    _fail(breaker, 2)
    assert breaker.state == "closed"
    assert breaker.call(lambda: "ok") == "ok"  # a success resets the count: failures must be consecutive
    _fail(breaker, 2)
    assert breaker.state == "closed"
    _fail(breaker, 1)
    assert breaker.state == "open"
    called = []
    with pytest.raises(BreakerOpen, match="online_store: circuit open"):
        breaker.call(lambda: called.append(1))
    assert called == []
    stats = breaker.stats()
    assert stats["state"] == "open" and stats["failures"] == 5 and stats["rejections"] == 1
    assert stats["opened"] == 1 and stats["last_error"] == "ConnectionError: store down"


def test_half_open_lets_one_trial_through_and_closes_on_success():
    clock = Clock()
    breaker = CircuitBreaker("tower", failure_threshold=1, reset_after_s=2.0, timer=clock)
    _fail(breaker, 1)
    clock.advance(1.9)
    assert not breaker.allow()  # still open
    clock.advance(0.2)
    assert breaker.state == "half_open"
    assert breaker.allow()  # the trial
    assert not breaker.allow()  # only one at a time
    breaker.record_success()
    assert breaker.state == "closed"
    assert breaker.allow() and breaker.allow()
    assert breaker.stats()["rejections"] == 2


def test_a_failed_trial_opens_the_breaker_for_another_period():
    clock = Clock()
    breaker = CircuitBreaker("ranker", failure_threshold=3, reset_after_s=2.0, timer=clock)
    _fail(breaker, 3)
    clock.advance(2.0)
    _fail(breaker, 1)  # the trial fails: open again at once, not after three more
    assert breaker.state == "open" and breaker.stats()["opened"] == 2
    clock.advance(1.0)
    with pytest.raises(BreakerOpen):
        breaker.call(lambda: None)
    clock.advance(1.0)
    assert breaker.call(lambda: 7) == 7 and breaker.state == "closed"


def test_a_lost_trial_outcome_does_not_keep_the_breaker_half_open():
    clock = Clock()
    breaker = CircuitBreaker("retriever", failure_threshold=1, reset_after_s=1.0, timer=clock)
    _fail(breaker, 1)
    clock.advance(1.0)
    assert breaker.allow()  # a trial whose caller never reports
    assert not breaker.allow()
    clock.advance(1.0)
    assert breaker.allow()


def test_slow_calls_count_as_timeouts():
    clock = Clock()
    breaker = CircuitBreaker("online_store", failure_threshold=2, reset_after_s=5.0, slow_call_s=0.5, timer=clock)

    def slow():
        clock.advance(0.8)
        return "late"

    assert breaker.call(slow) == "late"  # the answer is still used
    assert breaker.call(slow) == "late"
    stats = breaker.stats()
    assert stats["state"] == "open" and stats["timeouts"] == 2 and "slow call" in stats["last_error"]


def test_timeout_errors_are_counted_as_timeouts():
    breaker = CircuitBreaker("online_store", failure_threshold=5)

    def hang():
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError):
        breaker.call(hang)
    assert breaker.stats()["timeouts"] == 1 and breaker.stats()["failures"] == 1


def test_breaker_settings_are_checked():
    with pytest.raises(ConfigError, match="failure_threshold"):
        CircuitBreaker("x", failure_threshold=0)
    with pytest.raises(ConfigError, match="reset_after_s"):
        CircuitBreaker("x", reset_after_s=-1)


def test_cache_entries_expire_after_the_ttl():
    clock = Clock()
    cache = CountingTTLCache(maxsize=10, ttl_s=2.0, timer=clock)
    cache.put("u1", {"history": ["a"]})
    cache.put("u2", None)  # a user without features is a value too
    clock.advance(1.5)
    assert cache.get("u1") == {"history": ["a"]}
    assert cache.get("u2") is None
    clock.advance(0.6)
    assert cache.get("u1") is MISS and cache.get("u2") is MISS
    stats = cache.stats()
    assert (stats["hits"], stats["misses"], stats["hit_rate"], stats["size"]) == (2, 2, 0.5, 0)


def test_cache_invalidate_drops_one_key():
    cache = CountingTTLCache(maxsize=10, ttl_s=60.0, timer=Clock())
    cache.put("u1", 1)
    cache.put("u2", 2)
    assert cache.invalidate("u1") is True
    assert cache.invalidate("nobody") is False
    assert cache.get("u1") is MISS and cache.get("u2") == 2
    assert cache.stats()["invalidations"] == 1


def test_cache_is_bounded_and_peek_does_not_count():
    cache = CountingTTLCache(maxsize=3, ttl_s=60.0, timer=Clock())
    for i in range(5):
        cache.put(f"u{i}", i)
    assert len(cache) == 3
    assert cache.peek("u4") == 4 and cache.peek("u0") is MISS
    assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 0 and cache.stats()["hit_rate"] is None


def test_a_zero_ttl_turns_the_cache_off():
    cache = CountingTTLCache(maxsize=10, ttl_s=0, timer=Clock())
    cache.put("u1", 1)
    assert cache.get("u1") is MISS and cache.stats()["size"] == 0


def test_config_from_the_environment_names_a_bad_variable():
    config = ResilienceConfig.from_env({"AIPLATFORM_SERVING_FEATURE_TTL_S": "5",
                                        "AIPLATFORM_SERVING_FAILURE_THRESHOLD": "4"})
    assert config.feature_ttl_s == 5.0 and config.failure_threshold == 4 and config.answer_ttl_s == 2.0
    with pytest.raises(ConfigError, match="AIPLATFORM_SERVING_RESET_AFTER_S='soon'"):
        ResilienceConfig.from_env({"AIPLATFORM_SERVING_RESET_AFTER_S": "soon"})
    with pytest.raises(ConfigError, match="AIPLATFORM_SERVING_CACHE_SIZE='-1'"):
        ResilienceConfig.from_env({"AIPLATFORM_SERVING_CACHE_SIZE": "-1"})


def test_a_bounded_redis_client_times_out_on_a_server_that_never_answers():
    """A listening socket that never replies (a hung Redis): with redis-py's defaults a read
    waits 5 s; bounded, it raises redis' TimeoutError after the client's timeout, without
    retrying (a retry would only double the wait)."""
    import redis

    from aiplatform.features.online_redis import RedisOnlineStore

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)  # the kernel completes connections; nobody reads or writes
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        store = RedisOnlineStore(f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
        assert bound_redis_client(store, timeout_s=0.2, retries=1)
        assert store.client.get_retry().get_retries() == 1
        with pytest.raises(redis.TimeoutError):
            store.get_popular_items(5)
        assert store.client.connection_pool.connection_kwargs["socket_timeout"] == 0.2
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()
    assert len(accepted) == 1  # a timeout is not retried


def test_bound_redis_client_leaves_other_stores_alone(tmp_path):
    from aiplatform.features.online import open_online_store

    assert bound_redis_client(open_online_store(f"sqlite:///{tmp_path / 'online.sqlite'}"), 0.2, 1) is False
