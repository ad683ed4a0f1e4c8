"""POST /v1/events over real HTTP on Ray Serve: events from the future or with control characters
are a 422 naming the field and leave the event log as it was; a retried event_id is recorded
once; every response carries the request's X-Request-ID, which is the body's request_id."""

import socket
from datetime import datetime, timedelta, timezone

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core.storage import Layout
from aiplatform.data import eventlog
from aiplatform.features.online import SQLiteOnlineStore
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel, save_artifact
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval import build_item_index
from aiplatform.serving.app import build_app, start, stop
from apps.shop.features import recommender_user
from tests.feature_rows import write_user_rows

pytestmark = pytest.mark.integration

APP_NAME = "aiplatform-events-test"
N_ITEMS = 30
INPUTS = UserInputSpec.from_service(recommender_user)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A storage root with one champion version, its index and online features."""
    root = tmp_path_factory.mktemp("events_http")
    layout = Layout.at(str(root / "home"))
    layout.ensure()
    items = pd.DataFrame({
        "item_id": [f"item_{i:03d}" for i in range(N_ITEMS)],
        "category": [f"cat_{i % 3}" for i in range(N_ITEMS)],
        "price": np.linspace(5.0, 50.0, N_ITEMS),
    })
    vocab = ItemVocab.from_items(items)
    torch.manual_seed(0)
    src = str(root / "artifact")
    save_artifact(TwoTowerModel(**vocab.model_kwargs(), dim=8, inputs=INPUTS), vocab, src)
    registry = ModelRegistry(layout)
    v1 = registry.register("two_tower", src, {"recall@10": 0.1}, {"dim": 8}, "runs/e1")
    registry.set_alias("two_tower", "champion", v1.version, reason="test")
    write_user_rows(layout, pd.DataFrame({"user_id": ["u_known"], "last_items": [["item_001", "item_002"]],
                                          "purchased_items": [[]]}))
    SQLiteOnlineStore(layout.online_sqlite).write_popular_items([(f"item_{i:03d}", float(50 - i)) for i in range(20)])
    return {"layout": layout, "items": items, "artifact": v1.artifact_uri}


@pytest.fixture(scope="module")
def base_url(ray_session, home):
    layout = home["layout"]
    build_item_index(layout.vectors, "two_tower", 1, home["artifact"], home["items"])
    url = start(build_app(layout.root, auth="off"), host="127.0.0.1", port=_free_port(), name=APP_NAME)
    yield url
    stop(APP_NAME)


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def _event(**over) -> dict:
    event = {"user_id": "u_events", "item_id": "item_003", "event_type": "click",
             "timestamp": (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat()}
    event.update(over)
    return event


def _log(layout: Layout) -> tuple[list[str], int]:
    """The log's files and its number of events."""
    files = eventlog.files(layout)
    return files, (eventlog.read_events(layout).num_rows if files else 0)


@pytest.mark.parametrize("bad, field, says", [
    ({"timestamp": "2100-01-01T00:00:00Z"}, "events.1.timestamp", "now + 300s"),
    ({"timestamp": "2100-01-01T00:00:00"}, "events.1.timestamp", "now + 300s"),
    ({"item_id": "item\u001e003"}, "events.1.item_id", "U+001E"),
    ({"user_id": "u\u0000x"}, "events.1.user_id", "U+0000"),
    ({"event_id": "e\u200b1"}, "events.1.event_id", "U+200B"),
])
def test_a_bad_event_is_422_naming_the_field_and_nothing_is_logged(client, home, bad, field, says):
    before = _log(home["layout"])
    resp = client.post("/v1/events", json={"events": [_event(), _event(**bad)]},
                       headers={"X-Request-ID": "client-422"})
    assert resp.status_code == 422, resp.text
    message = resp.json()["message"]
    assert message.startswith(f"{field}:") and says in message
    assert resp.headers.get_list("x-request-id") == ["client-422"]
    assert _log(home["layout"]) == before


def test_a_body_over_the_limit_is_413_and_nothing_is_logged(client, home):
    before = _log(home["layout"])
    huge = {"events": [_event(item_id="i" * 256, event_id=f"{n:0>250}") for n in range(5000)]}  # ~3 MB
    resp = client.post("/v1/events", json=huge, headers={"X-Request-ID": "client-413"})
    assert resp.status_code == 413 and "bytes" in resp.json()["detail"], resp.text
    assert resp.headers.get_list("x-request-id") == ["client-413"]
    assert _log(home["layout"]) == before


def test_the_same_event_id_in_two_requests_is_recorded_once(client, home):
    layout = home["layout"]
    event = _event(user_id="u_retry", event_id="evt-http-1")
    first = client.post("/v1/events", json={"events": [event]})
    assert first.status_code == 202, first.text
    assert first.json()["accepted"] == 1 and first.json()["duplicates"] == 0
    files, count = _log(layout)
    again = client.post("/v1/events", json={"events": [event, _event(user_id="u_retry", event_id="evt-http-2")]})
    assert again.status_code == 202, again.text
    assert again.json()["accepted"] == 1 and again.json()["duplicates"] == 1
    logged = eventlog.read_events(layout, key="user_id", keys=["u_retry"]).column("event_id").to_pylist()
    assert sorted(logged) == ["evt-http-1", "evt-http-2"]
    assert _log(layout)[1] == count + 1 and len(eventlog.files(layout)) == len(files) + 1
    only_dups = client.post("/v1/events", json={"events": [event]})
    assert only_dups.status_code == 202 and only_dups.json()["accepted"] == 0
    assert only_dups.json()["duplicates"] == 1 and len(eventlog.files(layout)) == len(files) + 1


def test_an_incoming_request_id_is_the_body_request_id_and_the_header(client):
    rec = client.post("/v1/recommendations", json={"user_id": "u_known", "k": 3},
                      headers={"X-Request-ID": "trace-abc.123"})
    assert rec.status_code == 200, rec.text
    assert rec.json()["request_id"] == "trace-abc.123" and rec.headers.get_list("x-request-id") == ["trace-abc.123"]
    similar = client.get("/v1/items/item_004/similar", params={"k": 2}, headers={"X-Request-ID": "sim-1"})
    assert similar.status_code == 200 and similar.json()["request_id"] == "sim-1"
    assert similar.headers.get_list("x-request-id") == ["sim-1"]
    events = client.post("/v1/events", json={"events": [_event()]}, headers={"X-Request-ID": "ev-1"})
    assert events.status_code == 202 and events.json()["request_id"] == "ev-1"
    assert events.headers.get_list("x-request-id") == ["ev-1"]
    bad_k = client.post("/v1/recommendations", json={"user_id": "u_known", "k": 0}, headers={"X-Request-ID": "k-0"})
    assert bad_k.status_code == 422 and bad_k.headers.get_list("x-request-id") == ["k-0"]


def test_without_a_valid_request_id_one_is_made_and_returned(client):
    plain = client.post("/v1/recommendations", json={"user_id": "u_known", "k": 3})
    assert plain.status_code == 200
    assert plain.headers.get_list("x-request-id") == [plain.json()["request_id"]]
    other = client.post("/v1/recommendations", json={"user_id": "u_known", "k": 3})
    assert other.json()["request_id"] != plain.json()["request_id"]
    too_long = "x" * 129
    resp = client.post("/v1/recommendations", json={"user_id": "u_known", "k": 3}, headers={"X-Request-ID": too_long})
    assert resp.status_code == 200
    ours = resp.json()["request_id"]
    assert ours != too_long and len(ours) == 32
    assert resp.headers.get_list("x-request-id")[0] == ours  # Serve's proxy echoes the client's after it
