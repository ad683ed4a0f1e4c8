"""Tracing and structured logs without Ray: the OTEL_* configuration, the request's SERVER span
(continuing a caller's traceparent), the batch's stage spans written into each request's trace,
and JSON log lines through Serve's own replica logger carrying request_id, trace_id and span_id."""

import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from aiplatform.core.errors import ConfigError
from aiplatform.observability import logs, tracing
from aiplatform.observability.tracing import NO_STAGES, Stages, TracingConfig, TracingMiddleware

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.fixture()
def spans():
    """Tracing on, into memory (what ``configure`` does with an OTLP exporter)."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)


# ---- configuration -------------------------------------------------------------------------------

def test_tracing_is_off_without_an_endpoint_and_on_with_one():
    assert not TracingConfig.from_env({"OTEL_SERVICE_NAME": "x", "PATH": "/bin"}).enabled
    on = TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "PATH": "/bin"})
    assert on.enabled and dict(on.env) == {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert TracingConfig.from_env({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}).enabled
    assert not TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                       "OTEL_SDK_DISABLED": "true"}).enabled
    assert not TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318",
                                       "OTEL_TRACES_EXPORTER": "none"}).enabled
    assert not tracing.configure(TracingConfig())  # off: nothing is set up
    assert tracing.tracer() is None


@pytest.mark.parametrize("env, says", [
    ({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "http/protobuf"),
    ({"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "only otlp"),
])
def test_a_configuration_the_exporter_cannot_follow_is_refused_naming_the_variable(env, says):
    with pytest.raises(ConfigError, match=says):
        TracingConfig.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", **env})


# ---- the request's span --------------------------------------------------------------------------

def _app() -> TestClient:
    from aiplatform.serving.app import RequestIdMiddleware

    app = FastAPI()
    app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict:
        with tracing.span("retriever", k=3):
            pass
        return {"item_id": item_id}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    return TestClient(app, raise_server_exceptions=False)


def test_a_request_continues_the_callers_trace_with_its_route_status_and_request_id(spans):
    resp = _app().get("/items/a1", headers={"traceparent": TRACEPARENT, "X-Request-ID": "req-7"})
    assert resp.status_code == 200 and resp.headers["x-request-id"] == "req-7"
    by_name = {s.name: s for s in spans.get_finished_spans()}
    server, child = by_name["GET /items/{item_id}"], by_name["retriever"]
    assert server.kind == SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID and f"{server.parent.span_id:016x}" == PARENT_ID
    assert server.attributes["aiplatform.request_id"] == "req-7"
    assert server.attributes["http.route"] == "/items/{item_id}"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["aiplatform.stage"] == "ingress"
    assert child.parent.span_id == server.context.span_id and child.context.trace_id == server.context.trace_id
    assert child.attributes["k"] == 3


def test_without_a_traceparent_a_request_starts_its_own_trace_and_a_5xx_is_an_error(spans):
    client = _app()
    client.get("/items/a1")
    client.get("/boom")
    servers = [s for s in spans.get_finished_spans() if s.kind == SpanKind.SERVER]
    assert len(servers) == 2 and servers[0].parent is None
    assert servers[0].context.trace_id != servers[1].context.trace_id
    assert servers[1].status.status_code == StatusCode.ERROR


def test_a_caller_that_does_not_sample_gets_no_spans(spans):
    _app().get("/items/a1", headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"})
    assert spans.get_finished_spans() == ()


def test_tracing_off_costs_no_span(spans):
    tracing.use_provider(None)
    assert _app().get("/items/a1", headers={"traceparent": TRACEPARENT}).status_code == 200
    assert spans.get_finished_spans() == ()
    assert Stages.for_batch([None]) is NO_STAGES


def test_fastapis_own_server_span_is_annotated_not_doubled(spans):
    """FastAPI's native telemetry (on when a tracer provider is set for it, e.g. globally by
    Serve's tracing) makes the SERVER span; ours then only adds its attributes."""
    import inspect

    from aiplatform.serving.app import RequestIdMiddleware

    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        pytest.skip("this FastAPI has no native telemetry")
    app = FastAPI(telemetry={"tracer_provider": tracing._State.provider, "metrics": False, "logs": False})
    app.add_middleware(TracingMiddleware)
    app.add_middleware(RequestIdMiddleware)

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict:
        with tracing.span("retriever"):
            return {"item_id": item_id}

    TestClient(app).get("/items/a1", headers={"traceparent": TRACEPARENT, "X-Request-ID": "req-8"})
    done = spans.get_finished_spans()
    servers = [s for s in done if s.kind == SpanKind.SERVER]
    assert len(servers) == 1 and f"{servers[0].parent.span_id:016x}" == PARENT_ID
    assert servers[0].attributes["aiplatform.request_id"] == "req-8"
    assert servers[0].attributes["aiplatform.stage"] == "ingress"
    assert {s.context.trace_id for s in done} == {int(TRACE_ID, 16)} and any(s.name == "retriever" for s in done)


# ---- the batch's stages --------------------------------------------------------------------------

def test_each_stage_of_a_batch_is_written_into_the_trace_of_every_request_it_served(spans):
    tracer = tracing.tracer()
    one, two = tracer.start_span("r1"), tracer.start_span("r2")
    stages = Stages.for_batch([one, None, two])  # the middle request is not traced
    with stages.stage("features", [0, 1, 2], users=3) as st:
        st.set(2, "aiplatform.feature_cache", "hit")
    variant = stages.subset([1, 2])  # an experiment arm ran requests 1 and 2 of the batch
    with variant.stage("tower", [0, 1]):
        pass
    with pytest.raises(ValueError), variant.stage("ranker", [1]):
        raise ValueError("ranker broke")
    variant.note(1, "aiplatform.degraded", "ranker")
    stages.note(0, "aiplatform.answer_cache", "hit")
    stages.emit()
    one.end()
    two.end()
    done = spans.get_finished_spans()
    under = {parent: sorted(s.name for s in done if s.parent and s.parent.span_id == parent.context.span_id)
             for parent in (one, two)}
    assert under[one] == ["features"]
    assert under[two] == ["features", "ranker", "tower"]
    two_features = next(s for s in done if s.name == "features" and s.parent.span_id == two.context.span_id)
    assert two_features.attributes["aiplatform.feature_cache"] == "hit"
    assert two_features.attributes["aiplatform.batch_size"] == 3 and two_features.attributes["users"] == 3
    ranker = next(s for s in done if s.name == "ranker")
    assert ranker.status.status_code == StatusCode.ERROR and ranker.events[0].name == "exception"
    assert two.attributes["aiplatform.degraded"] == "ranker" and one.attributes["aiplatform.answer_cache"] == "hit"
    assert all(s.end_time >= s.start_time for s in done)


# ---- JSON logs -----------------------------------------------------------------------------------

@pytest.fixture()
def serve_logger(tmp_path):
    """Serve's logger configured as in a replica (JSON file), restored afterwards with ours."""
    from ray.serve._private.logging_utils import configure_component_logger
    from ray.serve.schema import LoggingConfig

    serve, ours = logging.getLogger(logs.SERVE_LOGGER), logging.getLogger(logs.OUR_LOGGER)
    saved = [(lg, list(lg.handlers), lg.level, lg.propagate) for lg in (serve, ours)]
    configure_component_logger(component_name="tracing-test", component_id="r1",
                               logging_config=LoggingConfig(encoding="JSON", logs_dir=str(tmp_path)),
                               max_bytes=1 << 20, backup_count=1)
    try:
        yield tmp_path
    finally:
        for lg, handlers, level, propagate in saved:
            for h in lg.handlers:
                if h not in handlers:
                    h.close()
            lg.handlers[:] = handlers
            lg.setLevel(level)
            lg.propagate = propagate


def _lines(folder) -> list[dict]:
    for handler in logging.getLogger(logs.SERVE_LOGGER).handlers:
        handler.flush()
    return [json.loads(line) for path in folder.glob("*.log") for line in path.read_text().splitlines()]


def test_our_log_lines_go_to_serves_json_log_with_request_and_trace_ids(serve_logger, spans):
    assert logs.install_replica_logging() and logs.install_replica_logging()  # idempotent
    log = logging.getLogger("aiplatform.serving.pipeline")
    with logs.request_id_context("req-42"), tracing.span("features") as span:
        log.info("read %d rows", 3)
    log.debug("below the level")
    logging.getLogger("ray.serve").info("serve's own line")
    lines = _lines(serve_logger)
    ours = [x for x in lines if x.get("logger") == "aiplatform.serving.pipeline"]
    assert [x["message"] for x in ours] == ["read 3 rows"]
    assert ours[0]["request_id"] == "req-42" and ours[0]["levelname"] == "INFO"
    assert ours[0]["trace_id"] == f"{span.get_span_context().trace_id:032x}"
    assert ours[0]["span_id"] == f"{span.get_span_context().span_id:016x}"
    assert any(x["message"] == "serve's own line" for x in lines)
    assert len(logging.getLogger(logs.OUR_LOGGER).handlers) == 1


def test_outside_a_replica_logging_is_left_alone():
    serve = logging.getLogger(logs.SERVE_LOGGER)
    saved = list(serve.handlers)
    serve.handlers[:] = []
    try:
        assert not logs.install_replica_logging()
        assert logging.getLogger(logs.OUR_LOGGER).propagate
    finally:
        serve.handlers[:] = saved


def test_the_log_format_setting_becomes_serves_logging_config(monkeypatch):
    from aiplatform.core.settings import Settings

    assert logs.serve_logging_config("json") == {"encoding": "JSON", "log_level": "INFO"}
    monkeypatch.setenv("AIPLATFORM_LOG_FORMAT", "text")
    monkeypatch.setenv("AIPLATFORM_LOG_LEVEL", "DEBUG")
    settings = Settings.load()
    assert logs.serve_logging_config(settings.log_format, settings.log_level) == {"encoding": "TEXT",
                                                                                  "log_level": "DEBUG"}
    monkeypatch.setenv("AIPLATFORM_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="log_format"):
        Settings.load()
