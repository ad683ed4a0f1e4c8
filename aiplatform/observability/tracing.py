"""OpenTelemetry traces of the serving path, exported over OTLP/HTTP.

Configured by the standard variables, read where the application is built (``TracingConfig.
from_env``) and handed to every replica, like every other setting: ``OTEL_EXPORTER_OTLP_ENDPOINT``
(or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``; a collector's OTLP/HTTP port, e.g.
``http://otel-collector:4318``), ``OTEL_SERVICE_NAME`` (default ``aiplatform``),
``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG`` (default
``parentbased_always_on``), ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_BSP_*``. With no endpoint (or
``OTEL_SDK_DISABLED=true``) tracing is off and costs one attribute check per request.

One trace per request: a SERVER span for the HTTP request (named ``POST /v1/recommendations``
after its route, ``aiplatform.stage=ingress``; it continues the caller's W3C ``traceparent``), and
under it a span per stage of the pipeline: ``features`` (online store read), ``popular`` (the
popular items of a user without features), ``tower``, ``retriever``, ``ranker``; ``push`` for
events, ``shadow`` for the mirrored shadow variant (a child of the request's span that ends after
it: the mirror runs once the answer is out). Cache and fallback decisions are attributes
(``aiplatform.answer_cache``, ``aiplatform.fallback``, ``aiplatform.degraded``); a failed
component's span has status ERROR and the exception as an event.

The pipeline runs batched (``@serve.batch``): one run answers up to 32 requests. A span belongs
to one trace, so each stage is timed once (``Stages``) and then written as a span into the trace
of every request it served, with ``aiplatform.batch_size``: every request's trace is complete,
and a stage shared by a batch shows the same start and end in each.

Why our own ``TracerProvider`` rather than Ray Serve's built-in tracing
(``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH``): Serve's is configured once per cluster, when Serve
starts (its controller's environment or ``serve.start(tracing_config=...)``), not per
application; it samples with its own ``RAY_SERVE_TRACING_SAMPLING_RATIO`` (1% by default) and
ignores ``OTEL_TRACES_SAMPLER``; its ``TracingConfig`` is an alpha API; and its spans stop at
the replica's edge (``replica_handle_request``): the pipeline's stages are ours either way. Ours
is per application, standard, and off at no cost. The two compose: our provider is never made
the global one (Serve's ``setup_tracing`` sets that), and setting
``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH=aiplatform.observability.tracing:serve_span_processors``
in the Ray cluster's environment sends Serve's spans (``proxy_http_request`` ->
``route_to_replica`` -> ``replica_handle_request`` under the Python proxy) to the same collector,
in the same trace: both continue the caller's ``traceparent`` (Serve's context does not reach
the app's ASGI code, so they are siblings under the caller's span, not parent and child, and a
request without a ``traceparent`` gets Serve's spans and ours in two traces). A
global provider also wakes FastAPI's own telemetry (FastAPI 0.165, installed here: a SERVER span and
``fastapi.endpoint``-style spans); then ours annotates FastAPI's SERVER span instead of adding a
second one, and the stages hang under ``fastapi.endpoint``.

Spans are exported by a ``BatchSpanProcessor`` (a background thread, batches of up to 512 spans
every 5 s by default), flushed when the replica stops (``shutdown``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger(__name__)

ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
DEFAULT_SERVICE_NAME = "aiplatform"
INSTRUMENTATION = "aiplatform.serving"
STAGE = "aiplatform.stage"


@dataclass(frozen=True)
class TracingConfig:
    """The ``OTEL_*`` variables of the process that builds the application (what replicas apply)."""

    env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TracingConfig:
        """The ``OTEL_*`` variables of ``environ`` (default ``os.environ``); ``ConfigError`` for a
        protocol this exporter does not speak."""
        environ = os.environ if environ is None else environ
        config = cls({k: v for k, v in environ.items() if k.startswith("OTEL_") and v != ""})
        config.check()
        return config

    @property
    def enabled(self) -> bool:
        """An OTLP endpoint is set, and neither the SDK nor the trace exporter is turned off."""
        if self.env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return False
        if self.env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
            return False
        return any(self.env.get(name, "").strip() for name in ENDPOINT_VARS)

    def check(self) -> None:
        from aiplatform.core.errors import ConfigError

        for name in PROTOCOL_VARS:
            protocol = self.env.get(name, "").strip()
            if protocol and protocol != "http/protobuf":
                raise ConfigError(f"{name}={protocol!r}: aiplatform exports traces over OTLP/HTTP only; set it to "
                                  "http/protobuf (or unset it) and point OTEL_EXPORTER_OTLP_ENDPOINT at the "
                                  "collector's OTLP/HTTP port (4318 by default)")
        exporter = self.env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
        if exporter and exporter not in ("otlp", "none"):
            raise ConfigError(f"OTEL_TRACES_EXPORTER={exporter!r}: only otlp (or none) is supported")


class _State:
    provider: TracerProvider | None = None
    tracer: Tracer | None = None


def configure(config: TracingConfig) -> bool:
    """Set up this process's exporter from ``config`` (its variables are applied to this
    process's environment first, where the SDK reads them). Returns whether tracing is on;
    idempotent (the first configuration of a process stays)."""
    if _State.tracer is not None:
        return True
    if not config.enabled:
        return False
    os.environ.update(config.env)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": DEFAULT_SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(attributes))  # sampler from OTEL_TRACES_SAMPLER
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    use_provider(provider)
    return True


def use_provider(provider: TracerProvider | None) -> None:
    """Trace with ``provider`` (None: off). ``configure`` calls it; tests pass an in-memory one."""
    _State.provider = provider
    _State.tracer = provider.get_tracer(INSTRUMENTATION) if provider is not None else None


def tracer() -> Tracer | None:
    """This process's tracer; None while tracing is off."""
    return _State.tracer


def shutdown() -> None:
    """Export what is buffered and stop (a replica calls it when it stops)."""
    provider = _State.provider
    use_provider(None)
    if provider is not None:
        try:
            provider.shutdown()
        except Exception as exc:  # a collector that went away must not fail the replica's stop
            log.warning("tracing: flushing spans failed: %s", exc)


def serve_span_processors() -> list:
    """For ``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH``: Ray Serve's own spans (proxy, replica)
    exported to the same OTLP endpoint as ours, read from the Serve process's ``OTEL_*``."""
    if not TracingConfig.from_env().enabled:
        return []
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    return [BatchSpanProcessor(OTLPSpanExporter())]


def current_span() -> Span | None:
    """The current span when it is being recorded (the request's, in a handler), to hand to
    work done elsewhere (a batch, a background task); None when tracing is off or the request
    is not sampled."""
    if _State.tracer is None:
        return None
    from opentelemetry import trace

    current = trace.get_current_span()
    return current if current.is_recording() else None


def _context_of(parent: Span) -> Any:
    from opentelemetry import trace

    return trace.set_span_in_context(parent)


@contextmanager
def span(name: str, parent: Span | None = None, **attributes: Any) -> Iterator[Any]:
    """A child span of the current one (or of ``parent``), named ``name`` with
    ``aiplatform.stage=name``; yields None while tracing is off."""
    tracer = _State.tracer
    if tracer is None:
        yield None
        return
    context = _context_of(parent) if parent is not None else None
    with tracer.start_as_current_span(name, context=context, attributes={STAGE: name, **_clean(attributes)}) as s:
        yield s


def _clean(attributes: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attributes.items() if v is not None}


class TracingMiddleware:
    """The SERVER span of every HTTP request (pure ASGI). It continues the caller's trace
    (``traceparent``, or whatever ``OTEL_PROPAGATORS`` names), or Serve's span when Serve's own
    tracing is on; at the end it is named after the route and carries the status, the request
    id and what the handler labelled the request with (``metrics.label_request``: variant, model
    version, fallback). Put it inside ``MetricsMiddleware`` (whose labels it reads) and inside
    the request-id middleware."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        tracer = _State.tracer
        if tracer is None or scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        from opentelemetry import context, propagate, trace

        from aiplatform.observability.logs import REQUEST_ID
        from aiplatform.observability.metrics import REQUEST_LABELS

        method = scope.get("method", "HTTP")
        status = {"code": 500}

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = int(message["status"])
            await send(message)

        native = getattr(scope.get("fastapi.telemetry"), "span", None)
        if native is not None and native.is_recording():
            # FastAPI's own telemetry (FastAPI >= 0.16x, on whenever a global tracer provider is
            # set, as Serve's tracing does) already made the SERVER span: annotate it, no second one
            native.set_attribute(STAGE, "ingress")

            async def annotate_then_send(message: dict) -> None:  # FastAPI ends its span with the body
                if message["type"] == "http.response.start":
                    self._annotate(native, scope, method, int(message["status"]), REQUEST_ID, REQUEST_LABELS,
                                   rename=False)
                await send(message)

            await self.app(scope, receive, annotate_then_send)
            return
        if trace.get_current_span().get_span_context().is_valid:
            parent = context.get_current()  # a span of Serve's own tracing
        else:
            parent = propagate.extract({k.decode("latin-1"): v.decode("latin-1") for k, v in scope.get("headers", ())})
        with tracer.start_as_current_span(method, context=parent, kind=trace.SpanKind.SERVER,
                                          attributes={STAGE: "ingress", "http.request.method": method,
                                                      "url.path": scope.get("path", "")}) as server:
            try:
                await self.app(scope, receive, watch)
            finally:
                self._annotate(server, scope, method, status["code"], REQUEST_ID, REQUEST_LABELS)

    @staticmethod
    def _annotate(server: Any, scope: dict, method: str, code: int, request_ids: Any, labels: Any,
                  rename: bool = True) -> None:
        route = getattr(scope.get("route"), "path", None)
        if route:
            if rename:
                server.update_name(f"{method} {route}")
            server.set_attribute("http.route", route)
        server.set_attribute("http.response.status_code", code)
        request_id = request_ids.get() or (scope.get("state") or {}).get("request_id")
        if request_id:
            server.set_attribute("aiplatform.request_id", request_id)
        for key, value in (labels.get() or {}).items():
            server.set_attribute(f"aiplatform.{key}", value)
        if code >= 500:
            from opentelemetry.trace import Status, StatusCode

            server.set_status(Status(StatusCode.ERROR, f"HTTP {code}"))


class _Record:
    """One stage of one batch run: its time, the requests (rows) it served, its attributes."""

    __slots__ = ("name", "rows", "start_ns", "end_ns", "attributes", "row_attributes", "error")

    def __init__(self, name: str, rows: Sequence[int], attributes: dict[str, Any]) -> None:
        self.name, self.rows, self.attributes = name, list(rows), attributes
        self.row_attributes: dict[int, dict[str, Any]] = {}
        self.start_ns = time.time_ns()
        self.end_ns = self.start_ns
        self.error: BaseException | None = None

    def set(self, row: int, key: str, value: Any) -> None:
        """An attribute of this stage's span in request ``row``'s trace only."""
        self.row_attributes.setdefault(row, {})[key] = value

    def fail(self, error: BaseException) -> None:
        self.error = error


class _NoRecord:
    def set(self, row: int, key: str, value: Any) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass


class _NoStages:
    """What the pipeline records into while tracing is off: nothing, at the cost of a call."""

    _record = _NoRecord()

    @contextmanager
    def stage(self, name: str, rows: Sequence[int], **attributes: Any) -> Iterator[Any]:
        yield self._record

    def note(self, row: int, key: str, value: Any) -> None:
        pass

    def subset(self, rows: Sequence[int]) -> _NoStages:
        return self


NO_STAGES = _NoStages()


class Stages:
    """The stages of one batch run of the pipeline, timed once, then written as spans into the
    trace of each request they served (``emit``). ``parents[i]`` is request ``i``'s live span
    (None: not traced), which also receives the request's notes; rows are request positions in
    the batch."""

    def __init__(self, parents: Sequence[Span | None], _records: list[_Record] | None = None,
                 _rows: Sequence[int] | None = None) -> None:
        self.parents = list(parents)
        self.records: list[_Record] = [] if _records is None else _records
        self.notes: dict[int, dict[str, Any]] = {}
        self._rows = _rows  # a subset's positions in the whole batch

    @classmethod
    def for_batch(cls, parents: Sequence[Span | None]) -> Stages | _NoStages:
        """``Stages`` when tracing is on and a request of the batch is traced, else ``NO_STAGES``."""
        if _State.tracer is None or not any(p is not None for p in parents):
            return NO_STAGES
        return cls(parents)

    def _global(self, rows: Sequence[int]) -> list[int]:
        return list(rows) if self._rows is None else [self._rows[r] for r in rows]

    def subset(self, rows: Sequence[int]) -> Stages:
        """The stages of a run over the requests ``rows`` of this batch (rows renumbered from 0)."""
        view = Stages(self.parents, self.records, self._global(rows))
        view.notes = self.notes
        return view

    @contextmanager
    def stage(self, name: str, rows: Sequence[int], **attributes: Any) -> Iterator[_Record]:
        """Time a stage serving the requests ``rows``; the record takes per-request attributes and
        a failure (``fail``: the spans get status ERROR and the exception)."""
        record = _Record(name, self._global(rows), _clean(attributes))
        self.records.append(record)
        try:
            yield record
        except BaseException as exc:
            record.error = exc
            raise
        finally:
            record.end_ns = time.time_ns()
            if self._rows is not None and record.row_attributes:
                record.row_attributes = {self._rows[r]: v for r, v in record.row_attributes.items()}

    def note(self, row: int, key: str, value: Any) -> None:
        """An attribute of request ``row``, set on its span (``parents[row]``) by ``emit``."""
        self.notes.setdefault(self._global([row])[0], {})[key] = value

    def emit(self) -> None:
        """Write the spans, each stage into the trace of each request it served, and set each
        request's notes on its span."""
        tracer = _State.tracer
        if tracer is None:
            return
        from opentelemetry.trace import Status, StatusCode

        size = len(self.parents)
        for record in self.records:
            for row in record.rows:
                parent = self.parents[row]
                if parent is None:
                    continue
                attributes = {STAGE: record.name, "aiplatform.batch_size": size, **record.attributes,
                              **record.row_attributes.get(row, {})}
                span = tracer.start_span(record.name, context=_context_of(parent), attributes=attributes,
                                         start_time=record.start_ns)
                if record.error is not None:
                    span.set_status(Status(StatusCode.ERROR, f"{type(record.error).__name__}: {record.error}"))
                    span.record_exception(record.error)
                span.end(end_time=record.end_ns)
        for row, notes in self.notes.items():
            target = self.parents[row]
            if target is not None and target.is_recording():
                target.set_attributes(notes)


__all__ = ["NO_STAGES", "Stages", "TracingConfig", "TracingMiddleware", "configure", "current_span",
           "serve_span_processors", "shutdown", "span", "tracer", "use_provider"]
