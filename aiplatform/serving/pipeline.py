"""One model version's whole recommendation path, as plain Python: online features -> user
tower -> item index -> candidate ranker, for a batch of users at once.

Why one object instead of one Serve deployment per step: on a small catalogue every step costs
microseconds to a few milliseconds, while each hop between Serve deployments costs several
milliseconds of serialisation, scheduling and an extra process competing for the same cores
(benchmarks/serving.py measured the four-hop pipeline at 16 req/s at one request in flight, a
sixth of one plain process). Held together, a batch of users costs one online-store read, one
tower forward pass, one index search per user (in memory) and one LightGBM prediction; and the
user tower, the index and the ranker of a version are always the same version's, never mixed.

The ingress deployment (``serving.app.RecommendationAPI``) holds this object and calls it with
``@serve.batch``; benchmarks/serving_plain.py runs the very same object inside one plain
uvicorn process, the peer the Serve app is measured against.

The checks below (``check_served_inputs``, ``check_events_features``) run where the application
is built and again when the object is made: a model served against another feature service
fails with a message naming both, instead of reading zeros.

Failures degrade answers, never into errors (``serving.resilience``): each component (the online
store, the user tower, the index search, the ranker) is called through a circuit breaker, and a
request whose component failed, or whose breaker is open, is answered with the user's last good
answer (its first ``k`` items) or, without one, the popular items of this replica's snapshot
(refreshed whenever the store answers), marked ``fallback: "degraded"`` and counted per
component for ``/healthz``. A stopped Redis thus costs a few failed reads, then answers come from
memory at once; one trial read every ``reset_after_s`` brings the store back when it returns.

Per replica, user feature rows and answers are cached for a short TTL (2 s by default,
``ResilienceConfig``): ``push`` drops the touched users' entries in this replica at once, and
other replicas drop them when they next read the online store's change feed
(``serving.freshness``, every 0.25 s by default; at the latest after the TTL).
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import pandas as pd

from aiplatform.observability.tracing import NO_STAGES
from aiplatform.serving.freshness import ChangeFeedPoller
from aiplatform.serving.resilience import MISS, BreakerOpen, CountingTTLCache, ResilienceConfig, bound_redis_client

if TYPE_CHECKING:
    from aiplatform.features.definitions import FeatureService
    from aiplatform.models.candidates import CandidateConfig, CandidateRanker
    from aiplatform.models.inputs import UserInputSpec
    from aiplatform.observability.tracing import Stages

log = logging.getLogger(__name__)

POPULAR_FALLBACK = "popular"
DEGRADED_FALLBACK = "degraded"
COMPONENTS = ("online_store", "tower", "retriever", "ranker")
"""What a request can be degraded by (each has its own breaker)."""
POPULAR_SNAPSHOT = 100
"""Popular items read at once and kept for when the store is down (the largest ``k`` a request may ask)."""
Scored = list[tuple[str, float]]


class Answer(NamedTuple):
    """A computed answer kept for reuse: ``items`` were the top ``k``."""

    k: int
    items: Scored
    fallback: str | None
    ranked: bool


def served_service(features_module: str, service_name: str) -> "FeatureService":
    """The declared feature service ``service_name`` of ``features_module``."""
    from aiplatform.features.apply import load_definitions

    _, services, _ = load_definitions(features_module)
    matches = [s for s in services if s.name == service_name]
    if not matches:
        raise ValueError(f"feature service {service_name!r} is not declared in {features_module} "
                         f"(SERVICES: {[s.name for s in services]})")
    return matches[0]


def check_served_inputs(artifact_dir: str, features_module: str, service_name: str) -> "UserInputSpec":
    """The artifact's ``UserInputSpec``, after checking that it is the served service's
    (``ConfigError`` naming both otherwise): what ``build_app`` and every replica run first."""
    from aiplatform.models.artifact import load_input_spec

    spec = load_input_spec(artifact_dir)
    spec.check_service(served_service(features_module, service_name),
                       where=f"serving {artifact_dir} with {features_module}")
    return spec


def check_events_features(config: "CandidateConfig", service: "FeatureService", where: str = "serving") -> None:
    """Raise ``ConfigError`` unless ``service`` serves the recent-event lists the candidate
    ranker reads (``config.events_features``), each keeping at least the events it was trained on
    (``history_events`` within ``history_days``): fewer would feed the ranker thinner histories
    than it learnt from, without any error."""
    from aiplatform.core.errors import ConfigError

    names = list(config.events_features)
    aggs = {a.name: a for view in service.views for a in view.aggregations if a.name in service.selected(view)}
    fix = ("declare them in the service as last_n aggregations over the same events (item_id, event_type, "
           "timestamp), like user_recent_events in apps/shop/features.py, then run the feature job "
           "(python -m aiplatform.jobs.features); or serve a model version without candidates/")
    missing = [n for n in names if n not in aggs or aggs[n].function != "last_n"]
    if missing:
        raise ConfigError(f"{where}: the candidate ranker reads the user's recent events from the list "
                          f"features {names}, but feature service {service.name!r} does not serve "
                          f"{missing} as last_n lists: {fix}")
    shapes = {(aggs[n].n, aggs[n].window, aggs[n].where) for n in names}
    if len(shapes) != 1:
        raise ConfigError(f"{where}: features {names} of service {service.name!r} must be aligned lists (one n, "
                          f"one window, one filter), got {[(n, aggs[n].n, str(aggs[n].window)) for n in names]}: "
                          f"{fix}")
    n, window, _ = shapes.pop()
    days = window.total_seconds() / 86_400
    if n < config.history_events or (config.history_days is None or days < config.history_days):
        trained = f"{config.history_events} events" + (f" within {config.history_days:g} days"
                                                       if config.history_days is not None else " of any age")
        raise ConfigError(f"{where}: the candidate ranker was trained on a user's last {trained}, but service "
                          f"{service.name!r} keeps only {n} within {days:g} days in {names}: retrain it on this "
                          "service (the training job takes history_events/history_days from these features), "
                          "or serve the service it was trained on")


def rank_requests(ranker: "CandidateRanker", requests: list[dict[str, Any]], *,
                  as_of: "pd.Timestamp | None" = None) -> list[Scored]:
    """The candidate pipeline on a batch of requests ``{'user_id', 'events': the feature row's
    recent-event lists, 'exclude': item ids never to recommend, 'candidates': [(item_id,
    retrieval score)], 'k'}``: ``history_from_rows`` -> ``ranker.scored`` with the
    two-tower's candidates as the external source and the request's exclusions -> top ``k`` per
    request, in ``CandidateRanker.recommend``'s order (score, then catalogue order). Item ids
    become codes through the ranker's own table (``ItemTables.codes``)."""
    from aiplatform.models.candidates import history_from_rows

    as_of = ranker.as_of if as_of is None else as_of
    history = history_from_rows([r["user_id"] for r in requests], [r.get("events") for r in requests],
                                ranker.config, ranker.tables.codes, as_of)
    external = None
    if "two_tower" in ranker.external_sources:
        external = {"two_tower": ranker.external_candidates(
            [[str(c[0]) for c in r["candidates"]] for r in requests],
            [[float(c[1]) for c in r["candidates"]] for r in requests])}
    excluded = [list(r.get("exclude") or ()) for r in requests]
    ex_codes = ranker.tables.codes([str(i) for x in excluded for i in x])
    ex_rows = np.repeat(np.arange(len(requests)), [len(x) for x in excluded])
    known = ex_codes >= 0
    columns, score = ranker.scored(history, external, (ex_rows[known], ex_codes[known]))
    row, item = columns["row"], columns["item"]
    order = np.lexsort((-score, row))  # rows come sorted by (row, item): recommend's order, score then catalogue
    row, item, score = row[order], item[order], score[order]
    ks = np.asarray([int(r["k"]) for r in requests], dtype=np.int64)
    keep = np.arange(len(row)) - np.searchsorted(row, row, side="left") < ks[row]
    out: list[Scored] = [[] for _ in requests]
    ids = ranker.tables.item_ids
    for r, i, s in zip(row[keep].tolist(), item[keep].tolist(), score[keep].tolist(), strict=True):
        out[r].append((str(ids[i]), s))
    return out


class RecommendPipeline:
    """Everything one served version needs to answer ``POST /v1/recommendations`` and its
    companions, loaded once: the online store (through the feature store's API), the user
    tower, the version's item index and, when the artifact carries ``candidates/``, the
    candidate ranker.

    ``recommend`` takes a batch of ``(user_id, k)`` and returns, per request, ``{'items':
    [(item_id, score)], 'fallback': None | 'popular' | 'degraded', 'ranked': bool}``: a user
    with features gets the ranker's top ``k`` of the merged candidates (or, without a ranker,
    the index's nearest items in retrieval order); a user without features gets the popular
    items; a request whose component failed gets a degraded answer (module docstring).

    ``config`` (default: ``ResilienceConfig()``; the driver may pass ``ResilienceConfig.from_env()``)
    sets the caches and breakers; ``timer`` is their clock (tests pass a fake one)."""

    def __init__(self, home: str, online_store: str, features_module: str, service_name: str,
                 artifact_dir: str, vectors_dir: str, table_name: str,
                 config: ResilienceConfig | None = None, timer: Callable[[], float] | None = None,
                 service_version: str | None = None) -> None:
        from aiplatform.core.storage import Layout
        from aiplatform.features.online import open_online_store
        from aiplatform.features.server import FeatureServer
        from aiplatform.models.candidates import CandidateRanker, candidates_dir_of
        from aiplatform.models.artifact import load_vocab
        from aiplatform.models.user_tower import load_user_tower
        from aiplatform.retrieval.index import ItemIndex

        self.layout = Layout.at(home)
        self.on_feature_ages: Callable[[list[float]], None] | None = None  # set by the serving replica
        self.service = served_service(features_module, service_name)
        if service_version and self.service.version != service_version:
            from aiplatform.core.errors import ConfigError

            raise ConfigError(
                f"feature service {service_name!r} in {features_module} is version {self.service.version} here, "
                f"but the application was deployed reading version {service_version}: a replica never reads "
                "other features than its deployment's. Run every replica from the same code (one image), or "
                "deploy the application again to serve the new definitions")
        self.inputs = check_served_inputs(artifact_dir, features_module, service_name)
        directory = candidates_dir_of(artifact_dir)
        self.ranker = CandidateRanker.load(directory) if directory is not None else None
        if self.ranker is not None:  # what build_app checked: checked again where it is loaded
            check_events_features(self.ranker.config, self.service,
                                  where=f"serving {directory} with {features_module}")
            self.n_candidates = int(self.ranker.config.per_source)
            names = self.ranker.config.events_features
            self.events_features = [n for n in names if n in self.service.stored_dtypes]
        else:
            self.n_candidates, self.events_features = 0, []
        self.config = config or ResilienceConfig()
        timer = timer or time.monotonic
        self.store = open_online_store(online_store)
        bound_redis_client(self.store, self.config.store_timeout_s, self.config.store_retries)
        self.server = FeatureServer(self.store, self.service)
        self.tower = load_user_tower(artifact_dir)  # numpy: a replica never imports torch
        self.vocab = load_vocab(artifact_dir)
        self.index = ItemIndex(vectors_dir, table_name)

        cfg = self.config
        self.breakers = {name: cfg.breaker(name, timer) for name in COMPONENTS}
        self.feature_cache = CountingTTLCache(cfg.cache_size, cfg.feature_ttl_s, timer)
        self.answer_cache = CountingTTLCache(cfg.cache_size, cfg.answer_ttl_s, timer)
        self.last_good = CountingTTLCache(cfg.cache_size, cfg.last_good_ttl_s, timer)
        self.feed = ChangeFeedPoller(self.store, self.service.name,  # other replicas' pushes (serving.freshness)
                                     (self.feature_cache, self.answer_cache, self.last_good),
                                     cfg.breaker("change_feed", timer), (self.feature_cache, self.answer_cache))
        self.feed.start(cfg.feed_poll_s)
        self._holders, self._holders_lock = 1, threading.Lock()  # see retain()
        self.degraded = dict.fromkeys((*COMPONENTS, "pipeline"), 0)
        self.degraded_sources = {"last_good": 0, "popular": 0}
        self.events_refused = self.events_not_applied = 0
        self._popular_snapshot: Scored = []
        if self._popular_items(POPULAR_SNAPSHOT) is None:  # a replica starts with the store down:
            log.warning("online store unreachable at start: degraded answers have no popular items "
                        "until it answers")  # it serves, and fills the snapshot when the store returns

    @property
    def ranked(self) -> bool:
        """Whether answers come from the candidate ranker (else retrieval order)."""
        return self.ranker is not None

    def n_dense(self) -> int:
        """The width of the dense input the served tower reads (its input spec's)."""
        return self.tower.n_dense

    def features(self, user_ids: list[str]) -> list[dict[str, Any] | None]:
        """Per user, the model inputs ``{'history', 'exclude', 'dense'}`` (raw values in the
        spec's order) plus ``'events'`` (the ranker's recent-event lists) when served; None for a
        user without a feature row. At most one online-store read for the whole batch (users
        read within ``feature_ttl_s`` come from the cache); raises what the store raised, or
        ``BreakerOpen``."""
        rows, error = self._user_rows(list(user_ids))
        if error is not None:
            raise error
        return [rows[u] for u in user_ids]

    def _user_rows(self, user_ids: list[str]) -> "tuple[dict[str, dict[str, Any] | None], Exception | None]":
        """The rows of the users the cache holds or the store gave; the store's error, if its
        read failed (those users are then absent)."""
        rows: dict[str, dict[str, Any] | None] = {}
        todo = []
        for user in dict.fromkeys(user_ids):
            row = self.feature_cache.get(user)
            if row is MISS:
                todo.append(user)
            else:
                rows[user] = row
        if not todo:
            return rows, None
        try:
            read = self.breakers["online_store"].call(self._read_features, todo)
        except Exception as exc:
            self._log_failure("online_store", exc)
            return rows, exc
        for user, row in zip(todo, read, strict=True):
            self.feature_cache.put(user, row)
            rows[user] = row
        return rows, None

    def _read_features(self, user_ids: list[str]) -> list[dict[str, Any] | None]:
        feats = self.server.get(user_ids)
        if self.on_feature_ages is not None:  # how old the rows read are (event time, microseconds)
            now_us = time.time() * 1e6
            self.on_feature_ages([(now_us - float(ts)) / 1e6 for ts in feats.event_timestamp if ts >= 0])
        spec = self.inputs
        out: list[dict[str, Any] | None] = []
        for i in range(len(user_ids)):
            if feats.status[i] != "ok":
                out.append(None)
                continue
            row = feats.to_dict(i)
            user = {"history": [str(x) for x in row.get(spec.history) or []],
                    "exclude": [str(x) for x in row.get(spec.exclude) or []] if spec.exclude else [],
                    "dense": spec.dense_row(row)}
            if self.events_features:
                user["events"] = {n: [str(x) for x in row.get(n) or []] for n in self.events_features}
            out.append(user)
        return out

    def embed(self, users: list[dict[str, Any]]) -> np.ndarray:
        """The user tower on a batch of ``features`` rows: one [B, dim] forward pass."""
        histories = [list(u["history"]) for u in users]
        dense = np.stack([np.asarray(u["dense"], dtype=np.float32).reshape(-1) for u in users])
        hist, dense = self.vocab.encode_user_arrays(histories, dense, self.tower.history_len)
        return self.tower.embed(hist, dense)

    def recommend(self, requests: list[tuple[str, int]], stages: "Stages | None" = None) -> list[dict[str, Any]]:
        """The answers to a batch of ``(user_id, k)`` requests, in order (see the class). Never
        raises for a failing store, tower, index or ranker: those requests are degraded.
        ``stages`` (``observability.tracing``) times each stage for the requests' traces."""
        stages = stages or NO_STAGES
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        pending = []
        for i, (user, k) in enumerate(requests):
            hit = self.answer_cache.get(user)
            if hit is not MISS and self._reusable(hit, int(k)):
                answers[i] = {"items": hit.items[:int(k)], "fallback": hit.fallback, "ranked": hit.ranked}
                stages.note(i, "aiplatform.answer_cache", "hit")
            else:
                pending.append(i)
        if not pending:
            return answers  # type: ignore[return-value]
        with stages.stage("features", pending, **{"aiplatform.users": len(pending)}) as st:
            if stages is not NO_STAGES:  # which rows the cache had, for the spans only
                for i in pending:
                    st.set(i, "aiplatform.feature_cache", "miss" if self.feature_cache.peek(requests[i][0])
                           is MISS else "hit")
            rows, error = self._user_rows([requests[i][0] for i in pending])
            if error is not None:
                st.fail(error)
        known, unknown = [], []
        for i in pending:
            user, k = requests[i]
            if user not in rows:  # the store's read failed
                answers[i] = self._degrade(user, int(k), "online_store")
                stages.note(i, "aiplatform.degraded", "online_store")
            elif rows[user] is None:
                unknown.append(i)
            else:
                known.append(i)
        if unknown:
            with stages.stage("popular", unknown) as st:
                popular = self._popular_items(max(int(requests[i][1]) for i in unknown))
                if popular is None:
                    st.fail(RuntimeError("the online store did not answer (popular items)"))
            for i in unknown:
                user, k = requests[i][0], int(requests[i][1])
                if popular is None:
                    answers[i] = self._degrade(user, k, "online_store")
                    stages.note(i, "aiplatform.degraded", "online_store")
                else:
                    answers[i] = self._keep(user, k, popular[:k], POPULAR_FALLBACK, False)
        if known:
            self._recommend_known(requests, known, rows, answers, stages)
        return answers  # type: ignore[return-value]

    def _recommend_known(self, requests: list[tuple[str, int]], known: list[int],
                         rows: dict[str, dict[str, Any] | None], answers: list[dict[str, Any] | None],
                         stages: "Stages | Any" = NO_STAGES) -> None:
        """The model's answers for the requests ``known`` (users with a feature row), in place."""
        users = [rows[requests[i][0]] for i in known]
        with stages.stage("tower", known) as st:
            try:
                vectors = self.breakers["tower"].call(self.embed, users)
            except Exception as exc:
                st.fail(exc)
                self._log_failure("tower", exc)
                for i, feats in zip(known, users, strict=True):
                    answers[i] = self._degrade(requests[i][0], int(requests[i][1]), "tower", feats["exclude"])
                    stages.note(i, "aiplatform.degraded", "tower")
                return
        batch, batch_rows = [], []
        for i, vec, feats in zip(known, vectors, users, strict=True):
            user, k = requests[i][0], int(requests[i][1])
            # the two-tower source as the ranker was trained with it (training.recommender.
            # TwoTowerSource): the nearest items the user has not bought, their ranks features
            n = k if self.ranker is None else max(self.n_candidates, k)
            with stages.stage("retriever", [i], **{"aiplatform.candidates": n}) as st:
                try:
                    candidates = self.breakers["retriever"].call(self.index.search, vec, n,
                                                                 exclude=frozenset(feats["exclude"]))
                except Exception as exc:
                    st.fail(exc)
                    self._log_failure("retriever", exc)
                    answers[i] = self._degrade(user, k, "retriever", feats["exclude"])
                    stages.note(i, "aiplatform.degraded", "retriever")
                    continue
            if self.ranker is None:
                answers[i] = self._keep(user, k, candidates, None, False)
                continue
            batch.append({"user_id": user, "events": feats.get("events") or {},
                          "exclude": feats["exclude"], "candidates": candidates, "k": k})
            batch_rows.append(i)
        if not batch:
            return
        with stages.stage("ranker", batch_rows) as st:
            try:
                ranked = self.breakers["ranker"].call(rank_requests, self.ranker, batch,
                                                      as_of=self.ranker.as_of)
            except Exception as exc:
                st.fail(exc)
                self._log_failure("ranker", exc)
                for i, req in zip(batch_rows, batch, strict=True):
                    answers[i] = self._degrade(req["user_id"], req["k"], "ranker", req["exclude"])
                    stages.note(i, "aiplatform.degraded", "ranker")
                return
        for i, req, items in zip(batch_rows, batch, ranked, strict=True):
            answers[i] = self._keep(req["user_id"], req["k"], items, None, True)

    def _keep(self, user: str, k: int, items: Scored, fallback: str | None, ranked: bool) -> dict[str, Any]:
        """An answer computed now: cached for reuse and, when the model made it, as the user's
        last good answer."""
        answer = Answer(k, items, fallback, ranked)
        self.answer_cache.put(user, answer)
        if fallback is None:
            self.last_good.put(user, answer)
        return {"items": items, "fallback": fallback, "ranked": ranked}

    def _reusable(self, hit: Answer, k: int) -> bool:
        """Whether a cached answer for ``hit.k`` items is what a computation for ``k`` would give:
        its first ``k`` items for the popular list, and for the ranker while the candidate pool
        (``max(per_source, k)``) is the same; the exact ``k`` otherwise (an approximate index's
        top k need not begin its top k+1)."""
        if k == hit.k:
            return True
        if k > hit.k:
            return False
        if hit.fallback == POPULAR_FALLBACK:
            return True
        return hit.ranked and max(self.n_candidates, k) == max(self.n_candidates, hit.k)

    def _degrade(self, user: str, k: int, component: str, exclude: "list[str] | None" = None) -> dict[str, Any]:
        """The answer when ``component`` failed: the user's last good answer (its first ``k``
        items), else the snapshot's popular items (less what the user bought, when known)."""
        self.degraded[component] += 1
        last = self.last_good.peek(user)
        if last is not MISS:
            self.degraded_sources["last_good"] += 1
            items = last.items[:k]
        else:
            self.degraded_sources["popular"] += 1
            skip = set(exclude or ())
            items = [p for p in self._popular_snapshot if p[0] not in skip][:k]
        return {"items": items, "fallback": DEGRADED_FALLBACK, "ranked": False}

    def degraded_answer(self, user_id: str, k: int, component: str = "pipeline") -> dict[str, Any]:
        """A degraded answer for a request the pipeline could not answer at all (the caller's
        last line of defence: ``recommend`` itself degrades per component)."""
        return self._degrade(user_id, int(k), component)

    def _log_failure(self, component: str, exc: Exception) -> None:
        if not isinstance(exc, BreakerOpen):  # rejections are counted, not logged: one line per real failure
            log.warning("%s failed, answering degraded (%s breaker: %s): %s: %s", component, component,
                        self.breakers[component].state, type(exc).__name__, exc)

    def _popular_items(self, n: int) -> Scored | None:
        """The first ``max(n, POPULAR_SNAPSHOT)`` popular items from the store, which also
        refresh the snapshot; None when the store failed or its breaker is open."""
        try:
            items = self.breakers["online_store"].call(self.store.get_popular_items, max(n, POPULAR_SNAPSHOT))
        except Exception as exc:
            self._log_failure("online_store", exc)
            return None
        self._popular_snapshot = list(items)
        return items

    def popular(self, k: int, exclude: list[str] | None = None) -> Scored:
        """The ``k`` most popular items, leaving out ``exclude`` (from the snapshot when the store
        does not answer)."""
        skip = set(exclude or ())
        items = self._popular_items(k + len(skip))
        return [p for p in (self._popular_snapshot if items is None else items) if p[0] not in skip][:k]

    def similar(self, item_id: str, k: int) -> Scored | None:
        """Items nearest to ``item_id`` in the version's index; None if it is not indexed."""
        return self.index.similar(item_id, k)

    def count(self) -> int:
        """Items in the version's index."""
        return len(self.index)

    def push(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Append ``events`` to the event log and update the touched users' online rows, then
        drop those users' cached rows and answers in this replica (other replicas drop them when
        they next read the change feed ``features.push`` publishes on).

        Returns {'accepted', 'entities_updated'}; {'error': message} for invalid events; or
        {'unavailable': message, 'recorded': bool, 'retry_after_s'} when the online store is
        down: with its breaker open nothing is written (``recorded`` false: send them again
        later); when a store call fails during the push, the events are already in the event
        log (``features.push`` appends them first), so ``recorded`` is true and the users' rows
        catch up at the next feature job run."""
        from aiplatform.core.errors import UserInputError
        from aiplatform.features.push import push

        breaker = self.breakers["online_store"]
        retry_after = max(1, int(np.ceil(self.config.reset_after_s)))
        if breaker.state == "open":
            self.events_refused += 1
            return {"unavailable": f"the online store is unavailable ({breaker.last_error}); nothing was "
                                   f"recorded: send the events again in {retry_after}s",
                    "recorded": False, "retry_after_s": retry_after}
        store = _WatchedStore(self.store)
        try:
            result = push(self.layout, events, [self.service], store)
        except UserInputError as exc:
            return {"error": str(exc)}
        except Exception as exc:
            if store.failed is None:  # not the store: a real error, for the caller to see
                raise
            breaker.record_failure(exc)
            self._log_failure("online_store", exc)
            self._invalidate(events)
            self.events_not_applied += 1
            return {"unavailable": f"the events were recorded in the event log, but the online store failed "
                                   f"({type(exc).__name__}: {exc}): the users' features catch up at the next "
                                   "feature job run; sending them again records them twice unless they carry "
                                   "event_id", "recorded": True, "retry_after_s": retry_after}
        if store.called:
            breaker.record_success()
        self._invalidate(events)
        return {"accepted": result.events, "entities_updated": result.entities_updated,
                "duplicates": result.duplicates, "duplicate_event_ids": list(result.duplicate_event_ids)}

    def _invalidate(self, events: list[dict[str, Any]]) -> None:
        """Drop the cached rows and answers of the users ``events`` touch (in this replica)."""
        key = self.service.entity.join_key
        for entity in {str(e[key]) for e in events if e.get(key) is not None}:
            self.feature_cache.invalidate(entity)
            self.answer_cache.invalidate(entity)
            self.last_good.invalidate(entity)

    def retain(self) -> "RecommendPipeline":
        """One more holder of this pipeline (an experiment's variant sharing the version the
        replica serves): ``close`` stops the change feed only when the last holder closes, so
        the switcher moving on does not leave the variant's caches without their feed."""
        with self._holders_lock:
            self._holders += 1
        return self

    def close(self) -> None:
        """Let go of this pipeline (the version switcher on the one it replaced, the experiment
        router on a variant it no longer routes to); the last holder's close stops following
        the change feed. The pipeline still answers: a request already holding it completes."""
        with self._holders_lock:
            self._holders -= 1
            if self._holders > 0:
                return
        self.feed.close()

    def serving_status(self) -> dict[str, Any]:
        """Counters for ``/healthz``: cache hits/misses/hit rates, degraded answers per
        component and where they came from, each component's breaker, refused events, and the
        change feed (``caches.feed``: entries dropped for other replicas' pushes, failed reads)."""
        return {"healthy": all(b.state == "closed" for b in self.breakers.values()),
                "caches": {"features": self.feature_cache.stats(), "answers": self.answer_cache.stats(),
                           "last_good": self.last_good.stats(), "feed": self.feed.stats()},
                "degraded": dict(self.degraded), "degraded_from": dict(self.degraded_sources),
                "breakers": {name: b.stats() for name, b in self.breakers.items()},
                "popular_snapshot": len(self._popular_snapshot),
                "events_refused": self.events_refused, "events_not_applied": self.events_not_applied}


class _WatchedStore:
    """The online store as ``features.push`` uses it, noting whether a call to it was made and
    whether one failed (so a store failure is told apart from any other)."""

    def __init__(self, store: Any) -> None:
        self._store, self.called, self.failed = store, False, None

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr

        def watched(*args: Any, **kwargs: Any) -> Any:
            self.called = True
            try:
                return attr(*args, **kwargs)
            except Exception as exc:
                self.failed = exc
                raise

        return watched


__all__ = ["COMPONENTS", "DEGRADED_FALLBACK", "POPULAR_FALLBACK", "RecommendPipeline", "check_events_features",
           "check_served_inputs", "rank_requests", "served_service"]
