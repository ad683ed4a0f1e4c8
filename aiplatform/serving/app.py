"""The HTTP API (docs/architecture.md, 'HTTP'): one FastAPI ingress deployment on Ray Serve that
runs the served version's whole pipeline.

A recommendation is: the user's online features -> the two-tower user tower -> the vector
index's nearest items -> when the served version carries ``candidates/``, the candidate
pipeline (those items merged with co-occurrence, EASE, popularity, category x popularity and
the user's own items, ordered by the LightGBM ranker; the response says ``ranked: true``);
otherwise the nearest items in retrieval order. A user without features gets the popular
items. The whole path runs in the ingress replica (``serving.pipeline``), batched across
concurrent requests: no handle hop. The one other deployment is an experiment's shadow
(``serving.shadow``): mirrored requests go to it through a handle after the live answer went
out, and it holds no replica while nothing is mirrored.

``app`` is the Serve application builder (one typed argument, ``AppArgs``): ``serve run
aiplatform.serving.app:app home=…``, ``serve deploy`` of the config ``aiplatform serve build``
writes, and a KubeRay RayService all build the application through it. ``build_app`` resolves
the model version through the registry *where the application is built* (an alias such as
``champion``) and passes explicit paths to the deployments, so what is served is decided once,
visibly, at deploy time. ``start``/``stop`` run it on the local or configured Ray, and ``stop``
removes only this application: other teams' Serve apps on a shared cluster keep running.

Note: this module must not use ``from __future__ import annotations``: FastAPI would then see
the request-body annotations as strings and treat the body as query parameters (every POST
would get a 422).
"""

import asyncio
import logging
import os
import threading
import time
import uuid
from datetime import timezone

from fastapi import FastAPI, Path, Query, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aiplatform.core.errors import ConfigError, NotFoundError, UserInputError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.core.tls import TlsFiles, speaks_tls
from aiplatform.features.server import online_store_uri
from aiplatform.observability import tracing
from aiplatform.observability.logs import REQUEST_ID as _REQUEST_ID
from aiplatform.observability.logs import install_replica_logging, request_id_context, serve_logging_config
from aiplatform.observability.cost import ReplicaCpuClock, assigned_cpus
from aiplatform.observability.metrics import MetricsMiddleware, ServingMetrics, label_request
from aiplatform.observability.tracing import Stages, TracingConfig, TracingMiddleware
from aiplatform.registry import ModelRegistry
from aiplatform.security.guard import AUTH_MODES, KeyGuard
from aiplatform.security.keys import KEYS_ENV, ApiKey, KeyStore, Role, parse_env_keys
from aiplatform.serving import access, admin
from aiplatform import web
from aiplatform.serving.access import AUTH_RESPONSES, require
from aiplatform.serving.config import DEFAULT_APP_NAME, AppArgs
from aiplatform.serving.experiments import ExperimentRouter, Routing
from aiplatform.serving.gc_tuning import tune_gc
from aiplatform.serving.pipeline import RecommendPipeline
from aiplatform.serving.resilience import ResilienceConfig
from aiplatform.serving.shadow import MAX_MIRRORS_IN_FLIGHT, ShadowScorer
from aiplatform.serving.versions import Served, ServedVersion, VersionSwitcher, check_online_store, resolve_version
from aiplatform.serving.schemas import (
    MAX_EVENTS,
    MAX_K,
    MAX_REQUEST_ID,
    ErrorResponse,
    EventsAccepted,
    EventsRequest,
    Health,
    ModelRef,
    RecommendationRequest,
    RecommendationResponse,
    ScoredItem,
    SimilarItemsResponse,
)

log = logging.getLogger(__name__)

BATCH_SIZE = 32
"""Most requests per pipeline run: the benchmark's 32 in flight fit one batch."""
BATCH_WAIT_S = 0.0
"""No wait: a batch is what arrived while the last one ran, so a lone request is not held back."""
MAX_QUEUED_REQUESTS = 256
"""Requests waiting for a replica beyond this are refused with 503: two seconds of a replica's
throughput at most, so a queued request still has a chance within the HTTP deadline."""
RETRY_AFTER_S = 1.0
"""The ``Retry-After`` of a refused request."""
REQUEST_TIMEOUT_S = 10.0
"""The HTTP deadline of every request (Serve's proxy answers 408 after it)."""
MAX_BODY_BYTES = 2 * 1024 * 1024
"""Largest request body: 1,000 events with 256-character ids fit; anything bigger is a 413."""

api = FastAPI(
    title="aiplatform recommendations",
    version="1",
    description="Recommendations from multi-source candidates (a two-tower retrieval model, co-occurrence, "
                "EASE, popularity) ordered by a LightGBM ranker, served by Ray Serve.",
)

REQUEST_ID_HEADER = "X-Request-ID"


def valid_request_id(value: str | None) -> str | None:
    """``value`` when it can be a request id: 1..128 printable ASCII characters (safe in a
    header, a log line and the experiment tables); otherwise None and a new id is made."""
    if value and len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable():
        return value
    return None


def current_request_id() -> str:
    """The id of the request being handled (the client's ``X-Request-ID`` or a new one)."""
    return _REQUEST_ID.get() or uuid.uuid4().hex


def _behind_serve_proxy() -> bool:
    try:
        from ray.serve.context import _get_internal_replica_context

        return _get_internal_replica_context() is not None
    except Exception:  # another Serve: assume it does not echo the header
        return False


class RequestIdMiddleware:
    """Gives each HTTP request its id: the client's ``X-Request-ID`` when valid, else a new one.
    The endpoints put it in the body (``request_id``), the response carries it in
    ``X-Request-ID`` (every response, errors too) and this module's log lines carry it.

    Serve's proxy already echoes the incoming header (or one it generated and passed on) in
    every response, 503s and 408s included; in a replica this middleware then adds the header
    only when it chose another id (the client's was invalid): that response has two
    ``X-Request-ID`` values, ours first. Pure ASGI (no extra task per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.echoed_by_proxy = _behind_serve_proxy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        request_id = valid_request_id(sent) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        add_header = not (self.echoed_by_proxy and sent == request_id)

        async def send_with_id(message: Message) -> None:
            if add_header and message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = _REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _REQUEST_ID.reset(token)


TOO_LARGE = {413: {"model": ErrorResponse, "description": f"The body is over {MAX_BODY_BYTES} bytes."}}


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: refused from its ``Content-Length`` before it is
    read, or, sent in chunks, as soon as the chunks pass the limit (never buffered whole)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send: Send) -> None:
        body = (f'{{"detail": "request body over {self.limit} bytes: send at most '
                f'{MAX_EVENTS} events per call, or import files with `aiplatform data import`"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)


class _RequestIdLogFilter(logging.Filter):
    """This module's log lines during a request name it (``record.request_id`` and a prefix)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _REQUEST_ID.get()
        record.request_id = request_id or ""
        if request_id and not getattr(record, "_request_id_prefixed", False):
            record.msg = f"[request {request_id}] {record.msg}"
            record._request_id_prefixed = True
        return True


log.addFilter(_RequestIdLogFilter())
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(TracingMiddleware)  # inside the metrics middleware, whose request labels it reads
api.add_middleware(MetricsMiddleware)  # outside the body limit: 413s are counted too
api.add_middleware(RequestIdMiddleware)  # added last: outermost, so a 413 carries the request id too
api.include_router(admin.router)
api.include_router(web.router)  # the storefront (/shop) and the console (/console)

_FIELD_HINTS = {
    "k": f"allowed range 1..{MAX_K}",
    "user_id": "a non-empty string",
}


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 whose ``message`` names each bad field and what it accepts, next to FastAPI's
    usual ``detail`` list (which clients and the OpenAPI docs already understand)."""
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            pos = err.get("loc", ("body", "?"))[-1]
            reason = (err.get("ctx") or {}).get("error", "")
            parts.append(f"body: invalid JSON at character {pos}: {reason}".rstrip(": "))
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        hint = _FIELD_HINTS.get(loc[-1]) if loc else None
        parts.append(f"{field}: {err.get('msg', 'invalid')}" + (f" ({hint})" if hint else ""))
    return JSONResponse(
        status_code=422,
        content={"detail": jsonable_encoder(exc.errors()), "message": "; ".join(parts)},
    )


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 400 for a body it cannot decode (not UTF-8) becomes the 422 every other
    unreadable body gets; anything else is answered as FastAPI would."""
    if exc.status_code == 400 and str(exc.detail).startswith("There was an error parsing the body"):
        message = "not JSON text (send UTF-8 encoded JSON)"
        return JSONResponse(status_code=422, content={
            "message": f"body: {message}", "detail": [{"loc": ["body"], "msg": message, "type": "json_invalid"}]})
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)


@api.exception_handler(UserInputError)
async def _user_error(request: Request, exc: UserInputError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": str(exc)})


@api.exception_handler(NotFoundError)
async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(exc)})


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 32},
    max_ongoing_requests=128,
    # overload is refused at once (503 + Retry-After) rather than queued into unbounded latency
    max_queued_requests=MAX_QUEUED_REQUESTS,
    backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
    ray_actor_options={"num_cpus": 0.25},
)
@serve.ingress(api)
class RecommendationAPI:
    """The served version: validates requests and runs its whole pipeline in this replica
    (``serving.pipeline.RecommendPipeline``: online features, user tower, item index, candidate
    ranker), batched across concurrent requests.

    No handle hop: on the 2-core machine each hop between deployments measured several
    milliseconds and most of the CPU (benchmarks/serving.py, README 'The HTTP API'). To serve
    more, add replicas of this deployment. The pipeline's arguments are paths the driver
    resolved (``build_app``): a replica never reads the registry or the environment."""

    def __init__(
        self,
        home: str,
        online_store: str,
        features_module: str,
        service_name: str,
        first: ServedVersion,
        alias: str = "champion",
        follow_alias: bool = True,
        alias_poll_s: float = 2.0,
        variant: str | None = None,
        resilience: ResilienceConfig | None = None,
        experiments: bool = True,
        auth: str = "keys",
        env_keys: list[ApiKey] | None = None,
        tracing_config: TracingConfig | None = None,
        shadow_scorer: "DeploymentHandle | None" = None,
    ) -> None:
        access.install(KeyGuard(home, auth, env_keys))  # first: no route is ever served unguarded
        install_replica_logging()  # aiplatform's lines into this replica's (JSON) log, with their request
        tracing.configure(tracing_config or TracingConfig())  # off unless an OTLP endpoint was set
        admin.install(Layout.at(home))
        web.install(Layout.at(home), self)  # the pages call this replica's handlers in-process
        self.versions = VersionSwitcher(home, online_store, features_module, service_name, first.name, first,
                                        variant or alias, resilience)
        if follow_alias:
            self.versions.follow(alias, alias_poll_s)
        self.alias = alias
        self.experiments = ExperimentRouter(self.versions, poll_s=alias_poll_s) if experiments else None
        self.shadow_scorer = shadow_scorer  # the shadow's own deployment (serving.shadow), bound with experiments
        self.mirrors_in_flight = self.mirrors_dropped = 0
        self.service_name = service_name
        self._stopped = threading.Event()
        threading.Thread(target=self._export_metrics, daemon=True, name="aiplatform-metrics").start()
        tune_gc()  # last: what was loaded above is never scanned again

    def _export_metrics(self, every_s: float = 2.0) -> None:
        """Caches, breakers and feature ages of the served pipeline into ``ServingMetrics``
        (request metrics are recorded per request by ``MetricsMiddleware``)."""
        metrics, seen = ServingMetrics.get(), None
        cpu = ReplicaCpuClock(assigned_cpus())
        while True:
            try:
                metrics.record_replica_cpu(*cpu.tick())
                pipeline = self.pipeline
                if pipeline is not seen:  # a new version: its caches count from zero
                    metrics.forget_cache_counts()
                    pipeline.on_feature_ages = lambda ages: metrics.record_feature_ages(self.service_name, ages)
                    seen = pipeline
                metrics.record_serving_status(pipeline.serving_status())
            except Exception as exc:  # metrics never take a replica down
                log.debug("metrics export: %s", exc)
            if self._stopped.wait(every_s):
                return

    def __del__(self) -> None:
        """Serve calls this when the replica stops: the spans still buffered are exported."""
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
        tracing.shutdown()

    async def reconfigure(self, config: dict) -> None:
        """Serve's in-place update of ``user_config``: ``{"version": N}`` pins version N (the
        variant is ``vN``), ``{"alias": "champion"}`` follows an alias again. The new version is
        loaded in a worker thread while the current one keeps answering (``serving.versions``)."""
        config = dict(config or {})
        unknown = set(config) - {"version", "alias", "alias_poll_s"}
        if unknown:
            raise ValueError(f"user_config: unknown keys {sorted(unknown)}; use version, alias, alias_poll_s")
        if config.get("version") is not None:
            self.versions.unfollow()
            version = int(config["version"])
            await asyncio.to_thread(self.versions.switch, version=version, variant=f"v{version}")
        elif config.get("alias"):
            alias = str(config["alias"])
            await asyncio.to_thread(self.versions.switch, alias=alias, variant=alias)
            self.versions.follow(alias, float(config.get("alias_poll_s", 2.0)))
            self.alias = alias

    @property
    def pipeline(self) -> RecommendPipeline:
        """The served version's pipeline, as of now."""
        return self.versions.current.pipeline

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _recommend(self, batch: list[tuple]) -> list[tuple[dict, Served, "Routing | None"]]:
        """The pipeline once for the requests that arrived together (run on the replica's loop:
        CPU-bound, a thread would only add GIL hand-offs, which measured slower). What is served
        is read once, so each answer comes from one version, which it carries: the replica's
        version, or during an experiment the user's variant (one pipeline run per variant).

        Each request is ``(user_id, k, request_id, span)``: its log lines name the batch's
        requests and each stage is written into every request's trace (``tracing.Stages``)."""
        requests = [(user, k) for user, k, *_ in batch]
        stages = Stages.for_batch([r[3] if len(r) > 3 else None for r in batch])
        batch_ids = ",".join(dict.fromkeys(str(r[2]) for r in batch if len(r) > 2)) or None
        try:
            with request_id_context(batch_ids):  # the batch task's context is not the requests'
                routing = self.experiments.current if self.experiments is not None else None
                if routing is None:
                    served = self.versions.current
                    return [(answer, served, None) for answer in served.pipeline.recommend(requests, stages)]
                groups: dict[str, list[int]] = {}
                chosen = [routing.served_for(user) for user, _ in requests]
                for i, served in enumerate(chosen):
                    groups.setdefault(served.variant, []).append(i)
                out: list = [None] * len(requests)
                for rows in groups.values():
                    served = chosen[rows[0]]
                    answers = served.pipeline.recommend([requests[i] for i in rows], stages.subset(rows))
                    for i, answer in zip(rows, answers, strict=True):
                        out[i] = (answer, served, routing)
                return out
        finally:
            if isinstance(stages, Stages):
                stages.emit()

    async def _mirror(self, routing: "Routing", request_id: str, user_id: str, k: int, live: Served,
                      live_items: list[str], request_span=None) -> None:
        """The shadow variant's answer to a mirrored request, after the live answer went out:
        only its latency and overlap with the live answer are kept. It answers in the shadow's
        deployment (``serving.shadow``); mirrors beyond ``MAX_MIRRORS_IN_FLIGHT`` are dropped (a
        cold or slow shadow must not pile up work here)."""
        if self.mirrors_in_flight >= MAX_MIRRORS_IN_FLIGHT:
            self.mirrors_dropped += 1
            return
        self.mirrors_in_flight += 1
        with tracing.span("shadow", parent=request_span, **{"aiplatform.variant": routing.shadow.variant}):
            try:
                answer = await self.shadow_scorer.score.remote(routing.shadow.version, user_id, k)
            except Exception as exc:  # a failing shadow never touches live traffic
                log.warning("shadow %s failed: %s", routing.shadow.variant, exc)
                return
            finally:
                self.mirrors_in_flight -= 1
        self.experiments.shadowed(routing, request_id, live, live_items, answer["items"], k, answer["latency_ms"])

    def n_dense(self) -> int:
        """The width of the dense input the served tower reads (its input spec's)."""
        return self.pipeline.n_dense()

    @api.post(
        "/v1/recommendations",
        response_model=RecommendationResponse,
        responses={**AUTH_RESPONSES, **TOO_LARGE, 422: {"description": "A field is invalid; `message` names it."}},
        dependencies=[require(Role.reader)],
    )
    async def recommend(self, body: RecommendationRequest) -> RecommendationResponse:
        """Top ``k`` items for a user, leaving out what they already bought. A user without
        features (new or unknown) gets the popular items, marked ``fallback: "popular"``.
        When the served version has a candidate ranker, the two-tower's nearest items join the
        other sources' candidates, the ranker orders them and ``ranked`` is true; otherwise the
        nearest items are returned in retrieval order. When a part of the pipeline fails (the
        online store is down, say), the answer is the user's last good one or the popular items,
        marked ``fallback: "degraded"``: never a 5xx."""
        request_id = current_request_id()
        started = time.perf_counter()
        status = "ok"
        request_span = tracing.current_span()
        try:
            answer, served, routing = await self._recommend((body.user_id, body.k, request_id, request_span))
        except Exception:  # the pipeline degrades per component; this is the last line of defence
            log.exception("recommendation pipeline failed; answering degraded")
            routing = self.experiments.current if self.experiments is not None else None
            served = routing.served_for(body.user_id) if routing is not None else self.versions.current
            answer = served.pipeline.degraded_answer(body.user_id, body.k)
            status = "error"
        label_request(variant=served.variant, model_version=served.version.version, fallback=answer["fallback"])
        if routing is not None:
            if status == "ok" and answer["fallback"]:
                status = answer["fallback"]  # popular or degraded
            self.experiments.expose(routing, request_id, body.user_id, body.k, served, status,
                                    (time.perf_counter() - started) * 1000)
            if routing.shadow is not None and self.shadow_scorer is not None and routing.experiment.mirrored(request_id):
                asyncio.get_running_loop().create_task(self._mirror(
                    routing, request_id, body.user_id, body.k, served, [i for i, _ in answer["items"]],
                    request_span))
        log.debug("recommended %d items for user %r (variant %s, v%d, fallback %s)", len(answer["items"]),
                  body.user_id, served.variant, served.version.version, answer["fallback"])
        return RecommendationResponse(
            user_id=body.user_id,
            items=[ScoredItem(item_id=i, score=s) for i, s in answer["items"]],
            model=ModelRef(name=served.version.name, version=served.version.version),
            variant=served.variant,
            request_id=request_id,
            fallback=answer["fallback"],
            ranked=answer["ranked"],
        )

    @api.get(
        "/v1/items/{item_id}/similar",
        response_model=SimilarItemsResponse,
        responses={**AUTH_RESPONSES, 404: {"model": ErrorResponse, "description": "The item is not indexed."}},
        dependencies=[require(Role.reader)],
    )
    async def similar(
        self,
        item_id: str = Path(..., min_length=1, max_length=256),
        k: int = Query(10, ge=1, le=MAX_K, description=f"How many items (1..{MAX_K})."),
    ) -> SimilarItemsResponse:
        """Items whose vectors are nearest to this item's (never the item itself)."""
        served = self.versions.current
        label_request(variant=served.variant, model_version=served.version.version)
        with tracing.span("retriever", **{"aiplatform.k": k}):
            scored = served.pipeline.similar(item_id, k)
        model = ModelRef(name=served.version.name, version=served.version.version)
        if scored is None:
            raise NotFoundError(
                f"item {item_id!r} is not in the index of model {model.name} "
                f"v{model.version}; it may be new since the index was built"
            )
        return SimilarItemsResponse(
            item_id=item_id,
            items=[ScoredItem(item_id=i, score=s) for i, s in scored],
            model=model,
            request_id=current_request_id(),
        )

    @api.post(
        "/v1/events",
        status_code=202,
        response_model=EventsAccepted,
        responses={**AUTH_RESPONSES, **TOO_LARGE,
                   422: {"description": "An event is invalid; `message` names the field."},
                   503: {"description": "The online store is down: `recorded` says whether the events reached "
                                        "the event log; retry after `Retry-After` seconds when it is false."}},
        dependencies=[require(Role.writer)],
    )
    async def events(self, body: EventsRequest) -> EventsAccepted:
        """Record real-time events: they are appended to the event log (which the batch
        pipeline reads too) and the touched users' online features are recomputed at once,
        so the next recommendation sees them. While the online store is down: 503 with
        ``recorded`` saying whether the events reached the event log (false: send them again after
        ``Retry-After`` seconds; true: do not, their features catch up at the next feature job).
        A time later than now + 300 s or an id with a control character is a 422 naming the field
        (nothing is written). Events whose ``event_id`` was accepted within the last 24 hours are
        skipped and counted in ``duplicates``: a retried request is recorded once."""
        events = [e.model_dump() for e in body.events]
        for e in events:
            if e["timestamp"].tzinfo is None:
                e["timestamp"] = e["timestamp"].replace(tzinfo=timezone.utc)
        followed = [dict(e) for e in events if e.get("request_id")]
        for e in events:  # the event log keeps the events contract; the link goes to the experiment store
            e.pop("request_id", None)
        started = time.perf_counter()
        with tracing.span("push", **{"aiplatform.events": len(events)}):
            result = self.pipeline.push(events)
        outcome = "invalid" if "error" in result else "unavailable" if "unavailable" in result else "accepted"
        try:
            ServingMetrics.get().record_push(time.perf_counter() - started, outcome, int(result.get("accepted") or 0))
        except Exception as exc:  # metrics never fail a request
            log.debug("metrics: %s", exc)
        if "error" in result:  # checked by the data contract after the schema: still the client's fault
            return JSONResponse(status_code=422, content={
                "message": f"events: {result['error']}",
                "detail": [{"loc": ["body", "events"], "msg": result["error"], "type": "value_error"}]})
        if "unavailable" in result:
            return JSONResponse(status_code=503, headers={"Retry-After": str(result["retry_after_s"])},
                                content={"message": f"events: {result['unavailable']}",
                                         "recorded": result["recorded"], "detail": result["unavailable"]})
        # duplicates: what the push skipped (a repeated event_id, here or within the window)
        duplicates = int(result.get("duplicates", len(events) - result["accepted"]))
        if followed and self.experiments is not None and result["accepted"]:
            skipped, seen = set(result.get("duplicate_event_ids") or ()), set()
            outcomes = []
            for e in followed:  # an outcome once per event: not for a skipped or repeated event_id
                event_id = e.get("event_id")
                if event_id is not None and (event_id in skipped or event_id in seen):
                    continue
                seen.add(event_id)
                outcomes.append(e)
            self.experiments.outcomes(outcomes)
        return EventsAccepted(accepted=result["accepted"], duplicates=duplicates,
                              entities_updated=result["entities_updated"], request_id=current_request_id())

    @api.get("/healthz", response_model=Health)
    async def healthz(
        self,
        detail: bool = Query(False, description="Add `serving`: cache hit rates, degraded answers per "
                                                "component, circuit breakers."),
    ) -> Health:
        """The served model, the size of its item index, the alias it follows and, when the last
        switch to another version failed, why (the replica keeps serving the version named).
        ``status`` is "degraded" while a component's circuit breaker is not closed (answers
        come from caches and the popular items; a restart would not help, so this is still a
        200); ``?detail=true`` adds this replica's counters."""
        served = self.versions.current
        serving = served.pipeline.serving_status()
        health = Health(status="ok" if serving["healthy"] else "degraded",
                        model=ModelRef(name=served.version.name, version=served.version.version),
                        items=served.pipeline.count(), variant=served.variant, **self.versions.status(),
                        experiment=self._experiment_status(),
                        serving=serving)
        if detail:
            return health
        return JSONResponse(content=jsonable_encoder(health, exclude={"serving"}))

    def _experiment_status(self) -> dict | None:
        status = self.experiments.status() if self.experiments is not None else None
        if status and status.get("shadow") is not None and self.shadow_scorer is not None:
            status["mirrors"] = {"deployment": ShadowScorer.name, "in_flight": self.mirrors_in_flight,
                                 "dropped": self.mirrors_dropped}
        return status

    def check_health(self) -> None:
        """Serve's replica health check: raise only when this replica cannot answer at all (no
        pipeline loaded), which a restart fixes. A down online store is not that: answers
        degrade instead (``/healthz`` says so), and restarting replicas would not bring Redis
        back, only drop their caches and popular-items snapshots."""
        served = getattr(getattr(self, "versions", None), "current", None)
        if served is None or getattr(served, "pipeline", None) is None:
            raise RuntimeError("no model version is loaded in this replica")


def build_app(
    home: "str | Layout",
    model_name: str = "two_tower",
    alias: str = "champion",
    settings: Settings | None = None,
    version: int | None = None,
    follow_alias: bool = True,
    alias_poll_s: float = 2.0,
    options: dict | None = None,
    experiments: bool = True,
    auth: str = "keys",
    shadow_options: dict | None = None,
) -> serve.Application:
    """The Serve application for the version ``alias`` points at (or ``version``), following
    the alias afterwards unless ``follow_alias`` is false or a version is pinned. ``options``
    are Serve deployment options over the declared ones (``user_config``, ``max_queued_requests``, …);
    ``shadow_options`` the same for the shadow's deployment (``serving.shadow``), which exists
    when ``experiments`` is on and holds no replica while nothing is mirrored.

    Resolved here, where the application is built, and checked before anything is deployed:
    a missing alias, artifact or vector table (or an empty one) is a clear ``NotFoundError``, a
    missing, unreachable or never-materialized online store a ``ConfigError``, and a model trained
    on another feature service than the served one a ``ConfigError``, now rather than replicas
    failing to start later. A version whose artifact carries ``candidates/`` is served through
    the candidate pipeline (a feature service without the ranker's recent-event features is a
    ``ConfigError`` here); otherwise in retrieval order.

    ``auth="keys"`` (the default) admits only API keys (``security.keys``: the root's key file
    and ``AIPLATFORM_API_KEYS``, checked here: none at all is a ``ConfigError``); ``"off"``
    leaves every route open to whoever reaches the port.
    """
    layout = home if isinstance(home, Layout) else Layout.at(home)
    settings = settings or Settings.load()
    first = resolve_version(ModelRegistry(layout), layout, settings.features_module, settings.feature_service,
                            model_name, alias, version)
    online_store = online_store_uri(settings, layout)
    check_online_store(online_store)
    env_keys = _resolve_auth(layout, auth)
    tracing_config = TracingConfig.from_env()  # OTEL_* of this process, applied in every replica
    log.info("serving %s v%d (%s) from %s", first.name, first.version,
             "pinned" if version else f"alias {alias}" + (", followed" if follow_alias else ""), first.artifact_dir)
    options = {"logging_config": serve_logging_config(settings.log_format, settings.log_level), **(options or {})}
    deployment = RecommendationAPI.options(**options)
    resilience = ResilienceConfig.from_env()  # read here, where the app is built, like every setting
    shadow = ShadowScorer.options(**{"logging_config": options["logging_config"], **(shadow_options or {})}).bind(
        layout.root, online_store, settings.features_module, settings.feature_service, resilience,
        first.service_version) if experiments else None
    return deployment.bind(
        layout.root, online_store, settings.features_module, settings.feature_service,
        first, alias=alias, follow_alias=bool(follow_alias and not version), alias_poll_s=alias_poll_s,
        variant=f"v{first.version}" if version else alias,
        resilience=resilience,
        experiments=experiments,
        auth=auth,
        env_keys=env_keys,
        tracing_config=tracing_config,
        shadow_scorer=shadow,
    )


def _resolve_auth(layout: Layout, auth: str) -> list[ApiKey]:
    """The ``AIPLATFORM_API_KEYS`` keys to deploy with, after checking that ``auth`` can admit
    anyone: with keys on and no key anywhere, every request would be a 401."""
    if auth not in AUTH_MODES:
        raise ConfigError(f"auth={auth!r}: expected 'keys' (API keys with roles) or 'off' (open)")
    if auth == "off":
        return []
    env_keys = parse_env_keys(os.environ.get(KEYS_ENV, ""))
    if not env_keys and not KeyStore(layout.root, env="").file_keys():
        raise ConfigError(
            f"no API keys for {layout.root}: every request would get 401. Create one with `aiplatform keys "
            f"create NAME --role admin --home {layout.root}` (or set {KEYS_ENV}), or serve open with "
            "auth=off (`aiplatform serve --auth off`): then anyone who reaches the port may call every route")
    return env_keys


def app(args: AppArgs) -> serve.Application:
    """Serve's application builder: ``serve run aiplatform.serving.app:app home=… alias=…``.

    Arguments left out come from the environment of the process that builds the application
    (``AIPLATFORM_HOME``, ``AIPLATFORM_ONLINE_STORE``, …); the storage root is checked first, so
    a bad root fails the deploy with a message that names it."""
    settings = args.settings()
    layout = Layout.open(settings.home)
    return build_app(layout, args.model_name, args.alias, settings=settings, version=args.version,
                     follow_alias=args.follow_alias, alias_poll_s=args.alias_poll_s, experiments=args.experiments,
                     auth=args.auth)


def start(
    application: serve.Application,
    host: str = "127.0.0.1",
    port: int = 8000,
    name: str = DEFAULT_APP_NAME,
    route_prefix: str = "/",
    tls: TlsFiles | None = None,
) -> str:
    """Deploy ``application`` over HTTP (HTTPS with ``tls``) at ``host:port`` and return its base
    URL once it is ready.

    HTTP options are fixed when Serve first starts on a Ray cluster: on a cluster whose Serve
    already listens elsewhere, the application joins that proxy (Serve warns). With ``tls``, a
    listener that does not complete a TLS handshake (Serve's HAProxy ingress, or a proxy started
    earlier without a certificate) is refused and the application removed again.
    """
    http_options = {"host": host, "port": int(port), "request_timeout_s": REQUEST_TIMEOUT_S}
    serve.start(http_options={**http_options, **(tls.http_options() if tls else {})})
    serve.run(application, name=name, route_prefix=route_prefix)
    host, port = _proxy_address(host, int(port))
    if tls is not None and not speaks_tls(host, port):
        stop(name)
        raise ConfigError(
            f"TLS was asked for, but Serve's ingress at {host}:{port} answers plain HTTP: Serve's HAProxy "
            "ingress (RAY_SERVE_ENABLE_HA_PROXY=1) has no TLS in Ray 2.60, and a running Serve keeps the HTTP "
            "options it started with. Start Ray without RAY_SERVE_ENABLE_HA_PROXY (a Ray that aiplatform starts "
            "does so when a certificate is set), or terminate TLS in front of Serve (a Kubernetes Ingress)")
    scheme = "https" if tls is not None else "http"
    return f"{scheme}://{host}:{port}{route_prefix.rstrip('/')}"


def _proxy_address(host: str, port: int) -> tuple[str, int]:
    """Where Serve's proxy really listens: on a cluster whose Serve was already running, the
    options passed to ``serve.start`` are ignored, so ask the controller."""
    try:
        from ray.serve.context import _get_global_client

        options = _get_global_client().http_config
    except Exception:  # an older or newer Serve without this: trust the requested address
        return host, port
    actual_host = options.host if options.host not in (None, "", "0.0.0.0", "::") else host  # nosec B104  # a comparison
    return actual_host, int(options.port or port)


def stop(name: str = DEFAULT_APP_NAME) -> None:
    """Remove this application (its deployments and replicas) and nothing else: on a shared
    cluster other applications, the proxies and the controller keep running."""
    try:
        serve.delete(name)
    except Exception as exc:  # Serve not running, or the app already gone: nothing to remove
        log.debug("serve.delete(%r): %s", name, exc)


__all__ = ["RecommendationAPI", "api", "app", "build_app", "start", "stop"]
