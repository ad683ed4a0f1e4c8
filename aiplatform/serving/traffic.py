"""The ingress replica's traffic: which served version answers each request of a batch, and,
during an experiment, the exposure recorded for each answer, the request mirrored to the
shadow, and the outcome recorded for each event that follows a recommendation.

``serving.versions`` and ``serving.experiments`` decide *what* is served (the replica's version,
the active experiment's ``Routing``) and the latter buffers the records; this module is how the
ingress applies them to live traffic. It is apart from the routes (``serving.app``) so that a
route reads as "answer, then let the experiment observe", and so that the one rule every part
of the experiment's side keeps is in one place: nothing there can fail or slow the live answer
(a mirror runs after the answer went out, in the shadow's own deployment, and is dropped rather
than queued when too many are in flight).
"""

import asyncio
import logging
from typing import Any

from ray.serve.handle import DeploymentHandle

from aiplatform.observability import tracing
from aiplatform.observability.logs import request_id_context
from aiplatform.observability.tracing import Stages
from aiplatform.serving.experiments import ExperimentRouter, Routing
from aiplatform.serving.middleware import name_requests_in
from aiplatform.serving.shadow import MAX_MIRRORS_IN_FLIGHT, ShadowScorer
from aiplatform.serving.versions import Served, VersionSwitcher

log = logging.getLogger(__name__)
name_requests_in(log)  # a failed mirror's line names the request it mirrored


def answer_batch(versions: VersionSwitcher, experiments: "ExperimentTraffic | None",
                 batch: list[tuple]) -> list[tuple[dict, Served, "Routing | None"]]:
    """The pipeline once for the requests that arrived together. What is served is read once,
    so each answer comes from one version, which it carries: the replica's version, or during an
    experiment the user's variant (one pipeline run per variant).

    Each request is ``(user_id, k, request_id, span)``: its log lines name the batch's requests
    and each stage is written into every request's trace (``tracing.Stages``)."""
    requests = [(user, k) for user, k, *_ in batch]
    stages = Stages.for_batch([r[3] if len(r) > 3 else None for r in batch])
    batch_ids = ",".join(dict.fromkeys(str(r[2]) for r in batch if len(r) > 2)) or None
    try:
        with request_id_context(batch_ids):  # the batch task's context is not the requests'
            routing = experiments.current if experiments is not None else None
            if routing is None:
                served = versions.current
                return [(answer, served, None) for answer in served.pipeline.recommend(requests, stages)]
            return recommend_by_variant(routing, requests, stages)
    finally:
        if isinstance(stages, Stages):
            stages.emit()


def recommend_by_variant(routing: Routing, requests: list[tuple[str, int]],
                         stages: Any) -> list[tuple[dict, Served, Routing]]:
    """Answer a batch during an experiment: one pipeline run per variant, over the requests of
    the users assigned to it, so each answer comes from its user's variant. ``stages`` is the
    batch's ``tracing.Stages`` (or its no-op stand-in); each run writes into its own requests'
    traces."""
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


class ExperimentTraffic:
    """The active experiment as the ingress replica applies it (module docstring): the router
    that follows it, and the shadow's deployment handle with the mirrors in flight."""

    def __init__(self, versions: VersionSwitcher, poll_s: float = 2.0,
                 shadow_scorer: "DeploymentHandle | None" = None) -> None:
        self.router = ExperimentRouter(versions, poll_s=poll_s)
        self.shadow_scorer = shadow_scorer  # the shadow's own deployment (serving.shadow), bound with experiments
        self.mirrors_in_flight = self.mirrors_dropped = 0

    @property
    def current(self) -> "Routing | None":
        """The experiment's routing as of now; None while no experiment is active."""
        return self.router.current

    def observe(self, routing: Routing, request_id: str, user_id: str, k: int, served: Served, answer: dict,
                status: str, latency_ms: float, request_span: Any = None) -> None:
        """After a recommendation during an experiment: record its exposure (its status is the
        answer's fallback when it fell back) and, when the experiment mirrors this request, have
        the shadow answer it too, in a task that outlives the response."""
        if status == "ok" and answer["fallback"]:
            status = answer["fallback"]  # popular or degraded
        self.router.expose(routing, request_id, user_id, k, served, status, latency_ms)
        if routing.shadow is not None and self.shadow_scorer is not None and routing.experiment.mirrored(request_id):
            asyncio.get_running_loop().create_task(self._mirror(
                routing, request_id, user_id, k, served, [i for i, _ in answer["items"]], request_span))

    async def _mirror(self, routing: Routing, request_id: str, user_id: str, k: int, live: Served,
                      live_items: list[str], request_span: Any = None) -> None:
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
        self.router.shadowed(routing, request_id, live, live_items, answer["items"], k, answer["latency_ms"])

    def outcomes(self, followed: list[dict[str, Any]], result: dict[str, Any]) -> None:
        """Record the events that name the recommendation they followed, once per event: not
        for an ``event_id`` the push skipped as a duplicate, nor for one repeated in the batch
        (a retried request must not count its clicks twice)."""
        skipped, seen = set(result.get("duplicate_event_ids") or ()), set()
        outcomes = []
        for e in followed:
            event_id = e.get("event_id")
            if event_id is not None and (event_id in skipped or event_id in seen):
                continue
            seen.add(event_id)
            outcomes.append(e)
        self.router.outcomes(outcomes)

    def status(self) -> dict | None:
        """For ``/healthz``: the router's status and, while a shadow is mirrored to, the mirrors'."""
        status = self.router.status()
        if status and status.get("shadow") is not None and self.shadow_scorer is not None:
            status["mirrors"] = {"deployment": ShadowScorer.name, "in_flight": self.mirrors_in_flight,
                                 "dropped": self.mirrors_dropped}
        return status


__all__ = ["ExperimentTraffic", "answer_batch", "recommend_by_variant"]
