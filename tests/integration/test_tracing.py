"""Traces and JSON logs of the served app on Ray Serve, as a collector and a log shipper see them.

An OTLP/HTTP receiver listens on 127.0.0.1 (``tests/otlp_receiver.py``: the protobuf
``ExportTraceServiceRequest`` a collector's otlp receiver decodes). The app is built with
``OTEL_EXPORTER_OTLP_ENDPOINT`` pointing at it (captured where the application is built and
applied in the replica) and serves a version with a candidate ranker, so that a recommendation
runs every stage. One ``POST /v1/recommendations`` with an ``X-Request-ID`` and a W3C
``traceparent`` must give exactly one trace, the caller's, holding the SERVER span of the request
and its ``features``, ``tower``, ``retriever`` and ``ranker`` children, and the replica's JSON log
lines for that request must carry its request id and trace id.
"""

import json
import os
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import httpx
import pandas as pd
import pytest

from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.features.online import SQLiteOnlineStore
from aiplatform.serving.app import build_app, start, stop
from apps.shop.generate import ShopSize, generate
from tests.feature_rows import write_user_rows
from tests.integration.test_served_candidates import _free_port, register_ranked_champion
from tests.otlp_receiver import otlp_receiver

pytestmark = pytest.mark.integration

APP = "aiplatform-tracing"
SERVICE = "aiplatform-tracing-test"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CALLER_SPAN = "b7ad6b7169203331"
STAGES = ("features", "tower", "retriever", "ranker")
SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER


@contextmanager
def _environment(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _online_rows(events: pd.DataFrame, users: list[str]) -> pd.DataFrame:
    """The users' online rows as the feature job writes them: recent events newest first."""
    rows = []
    for user in users:
        mine = events[events["user_id"] == user].sort_values("timestamp", ascending=False).head(100)
        rows.append({"user_id": user, "last_items": list(mine["item_id"].astype(str)[:20]),
                     "purchased_items": list(mine.loc[mine["event_type"] == "purchase", "item_id"].astype(str)),
                     "recent_items": list(mine["item_id"].astype(str)),
                     "recent_types": list(mine["event_type"].astype(str)),
                     "recent_times": [t.isoformat() for t in mine["timestamp"]]})
    frame = pd.DataFrame(rows)
    frame["as_of"] = datetime.now(timezone.utc)
    return frame


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """A champion whose artifact carries a candidate ranker (every stage runs), its index, and
    the online rows of the two most active users."""
    root = tmp_path_factory.mktemp("tracing")
    layout = Layout.at(str(root / "home"))
    layout.ensure()
    frames = generate(ShopSize(users=120, items=60), seed=7)
    items, events = frames["items"], frames["events"]
    mv = register_ranked_champion(layout, events, items, root / "artifact")
    users = list(events["user_id"].value_counts().index[:2].astype(str))
    write_user_rows(layout, _online_rows(events, users))
    SQLiteOnlineStore(layout.online_sqlite).write_popular_items([(str(i), float(60 - n)) for n, i in
                                                                 enumerate(items["item_id"])])
    return {"layout": layout, "users": users, "version": mv.version}


@pytest.fixture(scope="module")
def served(ray_session, shop):
    """The app exporting to a receiver of this module, with DEBUG JSON logs."""
    with otlp_receiver() as receiver:
        layout = shop["layout"]
        otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": SERVICE,
                "OTEL_BSP_SCHEDULE_DELAY": "100"}  # ms: export within a fraction of a second
        with _environment(otel):  # read where the application is built, as `serve run` would
            application = build_app(layout, settings=Settings.load(home=layout.root, log_level="DEBUG"),
                                    auth="off", experiments=False)
        url = start(application, host="127.0.0.1", port=_free_port(), name=APP, route_prefix="/traced")
        try:
            with httpx.Client(base_url=url, timeout=60) as client:
                yield {"client": client, "receiver": receiver}
        finally:
            stop(APP)


def _trace(spans, trace_id: str) -> list:
    return [s for s in spans if s.trace_id == trace_id]


def _complete(trace_id: str):
    def ready(spans) -> bool:
        names = {s.name for s in _trace(spans, trace_id)}
        return "POST /v1/recommendations" in names and set(STAGES) <= names
    return ready


def test_one_request_gives_one_trace_with_every_stage(served, shop):
    client, receiver = served["client"], served["receiver"]
    resp = client.post("/v1/recommendations", json={"user_id": shop["users"][0], "k": 5},
                       headers={"X-Request-ID": "trace-req-1", "traceparent": f"00-{TRACE_ID}-{CALLER_SPAN}-01"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["ranked"] is True and body["fallback"] is None and body["request_id"] == "trace-req-1"
    assert resp.headers.get_list("x-request-id") == ["trace-req-1"]

    spans = receiver.wait_for(_complete(TRACE_ID))
    time.sleep(0.5)  # anything else this request might have exported
    spans = receiver.snapshot()
    ours = [s for s in spans if s.attributes.get("aiplatform.request_id") == "trace-req-1"]
    assert {s.trace_id for s in ours} == {TRACE_ID}  # one trace: the caller's
    request = _trace(spans, TRACE_ID)
    ingress = [s for s in request if s.attributes.get("aiplatform.stage") == "ingress"]
    assert len(ingress) == 1
    server = ingress[0]
    assert server.name == "POST /v1/recommendations" and server.kind == SERVER_KIND
    assert server.parent_span_id == CALLER_SPAN  # continues the caller's span
    assert server.attributes["aiplatform.request_id"] == "trace-req-1"
    assert server.attributes["http.route"] == "/v1/recommendations"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["aiplatform.variant"] == "champion"
    assert server.attributes["aiplatform.model_version"] == str(shop["version"])
    assert server.resource["service.name"] == SERVICE

    by_stage = {}
    for span in request:
        if span is not server:
            by_stage.setdefault(span.name, []).append(span)
    assert set(STAGES) <= set(by_stage), by_stage.keys()
    for name in STAGES:
        assert len(by_stage[name]) == 1, name  # one request in its batch: one span per stage
        stage = by_stage[name][0]
        assert stage.parent_span_id == server.span_id, name  # children of the request's span
        assert stage.attributes["aiplatform.stage"] == name
        assert server.start_ns <= stage.start_ns <= stage.end_ns <= server.end_ns, name
    order = [by_stage[name][0].start_ns for name in STAGES]
    assert order == sorted(order)  # features -> tower -> retriever -> ranker
    assert by_stage["features"][0].attributes["aiplatform.feature_cache"] == "miss"
    assert all(s.status_code != 2 for s in request)  # no stage failed


def test_a_request_without_traceparent_starts_its_own_trace_and_a_cached_answer_says_so(served, shop):
    client, receiver = served["client"], served["receiver"]
    user = shop["users"][1]
    first = client.post("/v1/recommendations", json={"user_id": user, "k": 5}, headers={"X-Request-ID": "fresh-1"})
    again = client.post("/v1/recommendations", json={"user_id": user, "k": 5}, headers={"X-Request-ID": "fresh-2"})
    assert first.status_code == again.status_code == 200

    def server_of(spans, request_id):
        return next((s for s in spans if s.attributes.get("aiplatform.request_id") == request_id), None)

    spans = receiver.wait_for(lambda spans: server_of(spans, "fresh-1") is not None
                              and server_of(spans, "fresh-2") is not None
                              and _complete(server_of(spans, "fresh-1").trace_id)(spans))
    one, two = server_of(spans, "fresh-1"), server_of(spans, "fresh-2")
    assert one.parent_span_id == "" and one.trace_id not in (TRACE_ID, two.trace_id)
    # the second is answered from the replica's answer cache (2 s): no stage ran for it
    assert two.attributes.get("aiplatform.answer_cache") == "hit"
    assert [s.name for s in _trace(spans, two.trace_id) if s is not two] == []


def _replica_log_lines() -> list[dict]:
    import ray

    folder = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    lines = []
    for name in sorted(os.listdir(folder)):
        if name.startswith(f"replica_{APP}_") and name.endswith(".log"):
            with open(os.path.join(folder, name)) as f:
                for line in f:
                    try:
                        lines.append(json.loads(line))
                    except ValueError:  # a line written before JSON was configured
                        continue
    return lines


def test_the_replica_writes_json_log_lines_naming_the_request_and_its_trace(served, shop):
    client = served["client"]
    trace_id, parent = "5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174"
    resp = client.post("/v1/recommendations", json={"user_id": "someone-new", "k": 3},
                       headers={"X-Request-ID": "log-req-1", "traceparent": f"00-{trace_id}-{parent}-01"})
    assert resp.status_code == 200 and resp.json()["fallback"] == "popular"
    deadline = time.monotonic() + 60
    while True:
        lines = [x for x in _replica_log_lines() if x.get("request_id") == "log-req-1"]
        ours = [x for x in lines if x.get("logger") == "aiplatform.serving.app"]
        if ours or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert ours, f"no aiplatform line for log-req-1 among {lines}"
    line = ours[0]
    assert line["message"].startswith("[request log-req-1] recommended 3 items for user 'someone-new'")
    assert line["levelname"] == "DEBUG" and line["trace_id"] == trace_id and len(line["span_id"]) == 16
    assert line["application"] == APP and line["deployment"].endswith("RecommendationAPI")
