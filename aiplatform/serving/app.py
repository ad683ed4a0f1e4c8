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

What the routes lean on lives beside this module: ``serving.middleware`` (request ids, the body
limit), ``serving.http_errors`` (4xx bodies that name the field), ``serving.traffic`` (which
version or variant answers a batch; what an experiment records and mirrors),
``serving.events_intake`` (an events body to the push and back) and ``serving.replica_metrics``.

Note: this module must not use ``from __future__ import annotations``: FastAPI would then see
the request-body annotations as strings and treat the body as query parameters (every POST
would get a 422).
"""

import asyncio
import logging
import os
import time

from fastapi import FastAPI, Path, Query
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.config import BackpressureConfig
from ray.serve.handle import DeploymentHandle

from aiplatform import web
from aiplatform.core.errors import ConfigError, NotFoundError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.core.tls import TlsFiles, speaks_tls
from aiplatform.features.server import online_store_uri
from aiplatform.observability import tracing
from aiplatform.observability.logs import REQUEST_ID as _REQUEST_ID  # noqa: F401  # tests set this module's request id
from aiplatform.observability.logs import install_replica_logging, serve_logging_config
from aiplatform.observability.metrics import label_request
from aiplatform.observability.tracing import TracingConfig
from aiplatform.registry import ModelRegistry
from aiplatform.security.guard import AUTH_MODES, KeyGuard
from aiplatform.security.keys import KEYS_ENV, ApiKey, KeyStore, Role, parse_env_keys
from aiplatform.serving import access, admin
from aiplatform.serving.access import AUTH_RESPONSES, require
from aiplatform.serving.config import DEFAULT_APP_NAME, AppArgs
from aiplatform.serving.events_intake import accept_events
from aiplatform.serving.experiments import Routing
from aiplatform.serving.gc_tuning import tune_gc
from aiplatform.serving.http_errors import install_error_handlers
from aiplatform.serving.middleware import (MAX_BODY_BYTES, REQUEST_ID_HEADER, TOO_LARGE, BodyLimitMiddleware,
                                           RequestIdMiddleware, current_request_id, install_middleware,
                                           name_requests_in, valid_request_id)
from aiplatform.serving.pipeline import RecommendPipeline
from aiplatform.serving.replica_metrics import start_metrics_export
from aiplatform.serving.resilience import ResilienceConfig
from aiplatform.serving.schemas import (MAX_K, ErrorResponse, EventsAccepted, EventsRequest, Health, ModelRef,
                                        RecommendationRequest, RecommendationResponse, ScoredItem,
                                        SimilarItemsResponse)
from aiplatform.serving.shadow import ShadowScorer
from aiplatform.serving.traffic import ExperimentTraffic, answer_batch
from aiplatform.serving.versions import Served, ServedVersion, VersionSwitcher, check_online_store, resolve_version

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

api = FastAPI(
    title="aiplatform recommendations",
    version="1",
    description="Recommendations from multi-source candidates (a two-tower retrieval model, co-occurrence, "
                "EASE, popularity) ordered by a LightGBM ranker, served by Ray Serve.",
)

name_requests_in(log)  # this module's lines name their request (again in each replica: __init__)
install_middleware(api)
install_error_handlers(api)
api.include_router(admin.router)
api.include_router(web.router)  # the storefront (/shop) and the console (/console)


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
        name_requests_in(log)  # this class arrives pickled by value: this module's top level did not run here
        tracing.configure(tracing_config or TracingConfig())  # off unless an OTLP endpoint was set
        admin.install(Layout.at(home))
        web.install(Layout.at(home), self)  # the pages call this replica's handlers in-process
        self.versions = VersionSwitcher(home, online_store, features_module, service_name, first.name, first,
                                        variant or alias, resilience)
        if follow_alias:
            self.versions.follow(alias, alias_poll_s)
        # the experiment's routing, exposures, outcomes and mirrors to the shadow's deployment
        self.experiments = ExperimentTraffic(self.versions, alias_poll_s, shadow_scorer) if experiments else None
        self.service_name = service_name
        self.replica = serve.get_replica_context().replica_id.unique_id  # /healthz?detail=true names it
        self._stopped = start_metrics_export(lambda: self.pipeline, service_name)  # set by __del__
        tune_gc()  # last: what was loaded above is never scanned again

    def __del__(self) -> None:
        """Serve calls this when the replica stops: the spans still buffered are exported."""
        stopped = getattr(self, "_stopped", None)
        if stopped is not None:
            stopped.set()
        tracing.shutdown()

    async def reconfigure(self, config: dict) -> None:
        """Serve's in-place update of ``user_config`` (``VersionSwitcher.apply_user_config``):
        the new version is loaded in a worker thread while the current one keeps answering."""
        await asyncio.to_thread(self.versions.apply_user_config, dict(config or {}))

    @property
    def pipeline(self) -> RecommendPipeline:
        """The served version's pipeline, as of now."""
        return self.versions.current.pipeline

    @serve.batch(max_batch_size=BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _recommend(self, batch: list[tuple]) -> list[tuple[dict, Served, "Routing | None"]]:
        """The pipeline once for the requests that arrived together (``serving.traffic.answer_batch``),
        run on the replica's loop: CPU-bound, a thread would only add GIL hand-offs, which
        measured slower. Each request is ``(user_id, k, request_id, span)``."""
        return answer_batch(self.versions, self.experiments, batch)

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
        if routing is not None:  # recorded, and maybe mirrored to the shadow, after the answer is made
            self.experiments.observe(routing, request_id, body.user_id, body.k, served, answer, status,
                                     (time.perf_counter() - started) * 1000, request_span)
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
        return accept_events(self.pipeline, self.experiments, body)

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
        serving = {"replica": self.replica, **served.pipeline.serving_status()}
        health = Health(status="ok" if serving["healthy"] else "degraded",
                        model=ModelRef(name=served.version.name, version=served.version.version),
                        items=served.pipeline.count(), variant=served.variant, **self.versions.status(),
                        experiment=self.experiments.status() if self.experiments is not None else None,
                        serving=serving)
        if detail:
            return health
        return JSONResponse(content=jsonable_encoder(health, exclude={"serving"}))

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


__all__ = ["REQUEST_TIMEOUT_S", "RecommendationAPI", "api", "app", "build_app", "start", "stop",
           # defined in serving.middleware, still imported from here
           "MAX_BODY_BYTES", "REQUEST_ID_HEADER", "TOO_LARGE", "BodyLimitMiddleware", "RequestIdMiddleware",
           "current_request_id", "valid_request_id"]
