"""Real-time events are refused before anything is written when they come from the future or
carry control characters, and a retried event_id is recorded once (claims in a real SQLite file
and a real redis-server); requests carry the client's X-Request-ID."""

import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from aiplatform.core.errors import ConfigError, DataValidationError
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, lake, validate
from aiplatform.features import push as push_module
from aiplatform.features.online import open_online_store
from aiplatform.features.push import push
from aiplatform.serving.schemas import MAX_REQUEST_ID, Event, EventsAccepted, EventsRequest
from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate, write

CONTROL = ["\x00", "\n", "\x1e", "\x1f", "\x7f", "\x85", "\u200b", "\u202e", "\ufeff"]
ID_FIELDS = ["user_id", "item_id", "event_type", "event_id", "request_id"]


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _event(**over) -> dict:
    event = {"user_id": "u1", "item_id": "i1", "event_type": "view",
             "timestamp": (_now() - timedelta(hours=1)).isoformat()}
    event.update(over)
    return event


def _errors(exc: ValidationError) -> dict[str, str]:
    return {".".join(str(p) for p in e["loc"]): e["msg"] for e in exc.errors()}


@pytest.fixture(autouse=True)
def _fresh_settings(monkeypatch):
    """The settings are read once per process: each test starts from the environment it sets."""
    monkeypatch.delenv(validate.MAX_EVENT_SKEW_ENV, raising=False)
    monkeypatch.delenv(push_module.DEDUP_WINDOW_ENV, raising=False)
    validate.max_event_skew_s.cache_clear()
    push_module.event_dedup_window_s.cache_clear()
    yield
    validate.max_event_skew_s.cache_clear()
    push_module.event_dedup_window_s.cache_clear()


# ---- the HTTP schema -------------------------------------------------------------------------

@pytest.mark.parametrize("timestamp", ["2100-01-01T00:00:00Z", "2100-01-01T00:00:00", "2100-01-01T09:00:00+09:00"])
def test_a_time_in_the_future_is_refused_naming_the_field_and_the_bound(timestamp):
    with pytest.raises(ValidationError) as info:
        EventsRequest(events=[_event(), _event(timestamp=timestamp)])
    errors = _errors(info.value)
    assert list(errors) == ["events.1.timestamp"]
    assert "in the future" in errors["events.1.timestamp"]
    assert "now + 300s" in errors["events.1.timestamp"] and validate.MAX_EVENT_SKEW_ENV in errors["events.1.timestamp"]


def test_a_time_within_the_skew_is_accepted_and_the_skew_is_a_setting(monkeypatch):
    soon = (_now() + timedelta(seconds=60)).isoformat()
    assert Event(**_event(timestamp=soon)).timestamp > _now()
    monkeypatch.setenv(validate.MAX_EVENT_SKEW_ENV, "0")
    validate.max_event_skew_s.cache_clear()
    with pytest.raises(ValidationError, match="now \\+ 0s"):
        Event(**_event(timestamp=soon))
    monkeypatch.setenv(validate.MAX_EVENT_SKEW_ENV, "3600")
    validate.max_event_skew_s.cache_clear()
    assert validate.max_event_skew_s() == 3600
    Event(**_event(timestamp=(_now() + timedelta(minutes=30)).isoformat()))


@pytest.mark.parametrize("raw", ["soon", "-5", "inf", "nan"])
def test_a_bad_skew_setting_is_a_config_error_naming_it(monkeypatch, raw):
    monkeypatch.setenv(validate.MAX_EVENT_SKEW_ENV, raw)
    with pytest.raises(ConfigError, match=validate.MAX_EVENT_SKEW_ENV):
        validate.max_event_skew_s()


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("char", CONTROL)
def test_control_characters_are_refused_in_every_id(field, char):
    with pytest.raises(ValidationError) as info:
        EventsRequest(events=[_event(**{field: f"ab{char}c"})])
    errors = _errors(info.value)
    assert list(errors) == [f"events.0.{field}"]
    assert f"U+{ord(char):04X} at position 2" in errors[f"events.0.{field}"]


def test_printable_unicode_ids_and_the_length_limits_are_kept():
    event = Event(**_event(user_id="ユーザー 1", item_id="café-ñ", event_id="x" * 256,
                           request_id="r" * MAX_REQUEST_ID))
    assert event.user_id == "ユーザー 1"
    with pytest.raises(ValidationError) as info:
        Event(**_event(item_id="x" * 257, request_id="r" * (MAX_REQUEST_ID + 1)))
    assert set(_errors(info.value)) == {"item_id", "request_id"}


def test_the_accepted_body_counts_duplicates():
    body = EventsAccepted(accepted=1, duplicates=2, entities_updated={}, request_id="r")
    assert body.model_dump()["duplicates"] == 2
    assert "duplicates" in EventsAccepted.model_json_schema()["properties"]


# ---- push itself (also called without the HTTP schema) ------------------------------------------

@pytest.fixture()
def shop(tmp_path):
    frames = generate(ShopSize(users=20, items=30, categories=5, days=5), seed=5)
    paths = write(frames, str(tmp_path / "in"))
    layout = Layout.at(str(tmp_path / "home"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    return layout, frames


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = open_online_store(str(tmp_path / "online.sqlite"))
    else:
        s = open_online_store(request.getfixturevalue("redis_url"))
    yield s
    s.close()


def _events(frames, user: str, n: int, ids: list[str | None] | None = None, start: datetime | None = None) -> list[dict]:
    items = frames["items"]["item_id"].tolist()
    start = start or (_now() - timedelta(days=1))
    ids = ids if ids is not None else [None] * n
    return [{"user_id": user, "item_id": items[j % len(items)], "event_type": "click",
             "timestamp": start + timedelta(minutes=j), "event_id": ids[j]} for j in range(n)]


def _logged(layout: Layout, user: str) -> int:
    return eventlog.read_events(layout, key="user_id", keys=[user]).num_rows


def _row(store, user: str) -> dict:
    return store.get_online_features(recommender_user, [user]).to_dict(0)


@pytest.mark.parametrize("bad, column", [
    ({"timestamp": datetime(2100, 1, 1, tzinfo=timezone.utc)}, "timestamp"),
    ({"timestamp": pd.Timestamp("2100-01-01")}, "timestamp"),  # naive: UTC
    ({"item_id": "i\x1e1"}, "item_id"),
    ({"user_id": "u\x00"}, "user_id"),
    ({"event_type": "vi\u200bew"}, "event_type"),
    ({"event_id": "e\x7f"}, "event_id"),
])
def test_push_refuses_future_times_and_control_characters_before_writing(shop, store, bad, column):
    layout, frames = shop
    good = _events(frames, "u-hard", 2)
    push(layout, good, [recommender_user], store)
    before_files, before_row = eventlog.files(layout), _row(store, "u-hard")
    with pytest.raises(DataValidationError) as info:
        push(layout, _events(frames, "u-hard", 3)[:2] + [{**good[0], **bad}], [recommender_user], store)
    assert info.value.column == column and info.value.failed_rows == 1
    if column == "timestamp":
        assert "in the future" in str(info.value) and validate.MAX_EVENT_SKEW_ENV in str(info.value)
    else:
        assert "control characters" in str(info.value) and "U+" in str(info.value)
    assert eventlog.files(layout) == before_files
    assert _row(store, "u-hard") == before_row


def test_the_same_event_ids_pushed_twice_are_recorded_once(shop, store):
    layout, frames = shop
    first = _events(frames, "u-retry", 3, ids=["e1", "e2", None])
    got = push(layout, first, [recommender_user], store)
    assert (got.events, got.duplicates, got.duplicate_event_ids) == (3, 0, ())
    row = _row(store, "u-retry")
    again = push(layout, first, [recommender_user], store)
    assert again.events == 1 and again.duplicates == 2 and set(again.duplicate_event_ids) == {"e1", "e2"}
    assert _logged(layout, "u-retry") == 4  # the event without an id is never deduplicated
    assert _row(store, "u-retry")["click_7d"] == row["click_7d"] + 1
    mixed = _events(frames, "u-retry", 3, ids=["e1", "e3", "e3"], start=_now() - timedelta(hours=3))
    result = push(layout, mixed, [recommender_user], store)
    assert (result.events, result.duplicates, result.duplicate_event_ids) == (1, 2, ("e1",))
    logged = eventlog.read_events(layout, key="user_id", keys=["u-retry"]).column("event_id").to_pylist()
    assert sorted(i for i in logged if i) == ["e1", "e2", "e3"]


def test_all_duplicates_write_nothing(shop, store):
    layout, frames = shop
    events = _events(frames, "u-dup", 2, ids=["d1", "d2"])
    push(layout, events, [recommender_user], store)
    files = eventlog.files(layout)
    result = push(layout, events, [recommender_user], store)
    assert (result.events, result.duplicates, result.eventlog_file) == (0, 2, None)
    assert result.entities_updated == {recommender_user.name: 0}
    assert eventlog.files(layout) == files


def test_claims_belong_to_one_event_log(shop, store, tmp_path):
    """Two storage roots sharing an online store do not see each other's event ids."""
    layout, frames = shop
    other = Layout.at(str(tmp_path / "other-home"))
    events = _events(frames, "u-scope", 1, ids=["shared-id"])
    assert push(layout, events, [recommender_user], store).events == 1
    assert push(other, events, [recommender_user], store).events == 1
    assert push(other, events, [recommender_user], store).events == 0


def test_a_zero_window_turns_deduplication_off(shop, store, monkeypatch):
    layout, frames = shop
    monkeypatch.setenv(push_module.DEDUP_WINDOW_ENV, "0")
    events = _events(frames, "u-off", 1, ids=["x1"])
    push(layout, events, [recommender_user], store)
    assert push(layout, events, [recommender_user], store).events == 1
    assert _logged(layout, "u-off") == 2


@pytest.mark.parametrize("raw", ["a day", "-1"])
def test_a_bad_window_setting_is_a_config_error_naming_it(monkeypatch, raw):
    monkeypatch.setenv(push_module.DEDUP_WINDOW_ENV, raw)
    with pytest.raises(ConfigError, match=push_module.DEDUP_WINDOW_ENV):
        push_module.event_dedup_window_s()


def test_concurrent_retries_write_an_event_once(shop, store):
    layout, frames = shop
    events = _events(frames, "u-race", 4, ids=[f"race-{j}" for j in range(4)])
    barrier = threading.Barrier(4)
    results, errors = [], []

    def send() -> None:
        barrier.wait()
        try:
            results.append(push(layout, events, [recommender_user], store))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=send) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(r.events for r in results) == 4 and sum(r.duplicates for r in results) == 12
    assert _logged(layout, "u-race") == 4


def test_a_failed_append_releases_the_claims_so_a_retry_is_accepted(shop, store):
    layout, frames = shop
    events = _events(frames, "u-fail", 2, ids=["f1", "f2"])
    blocker = Path(layout.eventlog)
    if blocker.exists():
        blocker.rmdir()
    blocker.write_text("not a folder")  # the append fails: the log's folder cannot be created
    try:
        with pytest.raises(OSError):
            push(layout, events, [recommender_user], store)
    finally:
        blocker.unlink()
    assert _logged(layout, "u-fail") == 0
    result = push(layout, events, [recommender_user], store)
    assert (result.events, result.duplicates) == (2, 0)
    assert _logged(layout, "u-fail") == 2


# ---- the stores' claims ----------------------------------------------------------------------------

def test_claims_are_exclusive_until_released_or_expired(online_store):
    import time

    assert online_store.claim_event_ids(["a", "b"], 60) == [True, True]
    assert online_store.claim_event_ids(["b", "c", "c"], 60) == [False, True, False]
    online_store.release_event_ids(["b"])
    assert online_store.claim_event_ids(["a", "b"], 60) == [False, True]
    assert online_store.claim_event_ids([], 60) == []
    assert online_store.claim_event_ids(["short"], 0.001) == [True]
    time.sleep(0.05)  # far past the claim's 1 ms
    assert online_store.claim_event_ids(["short"], 60) == [True]


def test_sqlite_prunes_expired_claims(tmp_path):
    import sqlite3
    import time

    store = open_online_store(str(tmp_path / "online.sqlite"))
    store.claim_event_ids([f"old-{i}" for i in range(50)], 0.001)
    time.sleep(0.05)
    store.claim_event_ids(["new"], 60)
    with sqlite3.connect(store.path) as conn:
        assert [r[0] for r in conn.execute("SELECT event_id FROM event_ids")] == ["new"]
    store.close()


# ---- X-Request-ID --------------------------------------------------------------------------------

@pytest.fixture()
def id_app():
    from fastapi import FastAPI, Request
    from fastapi.testclient import TestClient

    from aiplatform.serving.app import RequestIdMiddleware, current_request_id

    app = FastAPI()
    app.add_middleware(RequestIdMiddleware)

    @app.get("/id")
    async def _id(request: Request) -> dict:
        return {"request_id": current_request_id(), "state": request.state.request_id}

    @app.get("/need")
    async def _need(n: int) -> dict:
        return {"n": n}

    with TestClient(app) as client:
        yield client


@pytest.mark.parametrize("sent, used", [
    ("abc-123", True), ("x" * 128, True), ("has space ok", True),
    ("x" * 129, False), ("", False), ("caf\u00e9", False),
])
def test_a_valid_incoming_request_id_is_used_and_echoed(id_app, sent, used):
    resp = id_app.get("/id", headers={"X-Request-ID": sent.encode("latin-1")})
    body = resp.json()
    assert body["request_id"] == body["state"] == resp.headers["x-request-id"]
    assert (body["request_id"] == sent) is used
    if not used:
        assert len(body["request_id"]) == 32


def test_every_response_carries_a_request_id_errors_too(id_app):
    bad = id_app.get("/need", params={"n": "many"}, headers={"X-Request-ID": "mine-422"})
    assert bad.status_code == 422 and bad.headers["x-request-id"] == "mine-422"
    missing = id_app.get("/nowhere")
    assert missing.status_code == 404 and len(missing.headers["x-request-id"]) == 32
    one, two = id_app.get("/id").json()["request_id"], id_app.get("/id").json()["request_id"]
    assert one != two


def test_log_lines_of_a_request_name_it(caplog):
    import logging

    from aiplatform.serving import app as app_module

    token = app_module._REQUEST_ID.set("req-log-1")
    try:
        with caplog.at_level(logging.INFO, logger=app_module.log.name):
            app_module.log.info("hello %s", "there")
    finally:
        app_module._REQUEST_ID.reset(token)
    assert caplog.records[-1].request_id == "req-log-1"
    assert caplog.records[-1].getMessage() == "[request req-log-1] hello there"
