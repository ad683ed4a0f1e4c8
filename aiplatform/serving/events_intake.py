"""What ``POST /v1/events`` does with a validated body: the events pushed to the event log and the
online store, and the pipeline's answer turned into the HTTP one (202, 422 or 503).

Apart from the route (``serving.app``), whose decorator and docstring are the HTTP contract,
because the steps between are the events contract's: a time without a zone is UTC, an event's
``request_id`` (the recommendation it followed) goes to the experiment store and never into the
event log, and an outcome is recorded once per event, however often a client retries.
"""

import logging
import time
from datetime import timezone
from typing import Any

from fastapi.responses import JSONResponse

from aiplatform.observability import tracing
from aiplatform.observability.metrics import ServingMetrics
from aiplatform.serving.middleware import current_request_id, name_requests_in
from aiplatform.serving.pipeline import RecommendPipeline
from aiplatform.serving.schemas import EventsAccepted, EventsRequest
from aiplatform.serving.traffic import ExperimentTraffic

log = logging.getLogger(__name__)
name_requests_in(log)


def split_events(body: EventsRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The events as the event log takes them (a naive time read as UTC, no ``request_id``),
    and apart, with their ``request_id``, the ones that followed a recommendation."""
    events = [e.model_dump() for e in body.events]
    for e in events:
        if e["timestamp"].tzinfo is None:
            e["timestamp"] = e["timestamp"].replace(tzinfo=timezone.utc)
    followed = [dict(e) for e in events if e.get("request_id")]
    for e in events:  # the event log keeps the events contract; the link goes to the experiment store
        e.pop("request_id", None)
    return events, followed


def push_refusal(result: dict[str, Any]) -> JSONResponse | None:
    """The answer to a push the pipeline refused, or None when it accepted the events: a 422 when
    they break the data contract (checked after the schema: still the client's fault), a 503 with
    ``Retry-After`` while the online store is down (``recorded`` says whether the events reached
    the event log, so the client knows whether to send them again)."""
    if "error" in result:
        return JSONResponse(status_code=422, content={
            "message": f"events: {result['error']}",
            "detail": [{"loc": ["body", "events"], "msg": result["error"], "type": "value_error"}]})
    if "unavailable" in result:
        return JSONResponse(status_code=503, headers={"Retry-After": str(result["retry_after_s"])},
                            content={"message": f"events: {result['unavailable']}",
                                     "recorded": result["recorded"], "detail": result["unavailable"]})
    return None


def accept_events(pipeline: RecommendPipeline, experiments: ExperimentTraffic | None,
                  body: EventsRequest) -> EventsAccepted | JSONResponse:
    """Push ``body``'s events through ``pipeline`` (traced and counted in ``ServingMetrics``),
    then record the outcomes of the accepted ones that followed a recommendation."""
    events, followed = split_events(body)
    started = time.perf_counter()
    with tracing.span("push", **{"aiplatform.events": len(events)}):
        result = pipeline.push(events)
    outcome = "invalid" if "error" in result else "unavailable" if "unavailable" in result else "accepted"
    try:
        ServingMetrics.get().record_push(time.perf_counter() - started, outcome, int(result.get("accepted") or 0))
    except Exception as exc:  # metrics never fail a request
        log.debug("metrics: %s", exc)
    refusal = push_refusal(result)
    if refusal is not None:
        return refusal
    # duplicates: what the push skipped (a repeated event_id, here or within the window)
    duplicates = int(result.get("duplicates", len(events) - result["accepted"]))
    if followed and experiments is not None and result["accepted"]:
        experiments.outcomes(followed, result)
    return EventsAccepted(accepted=result["accepted"], duplicates=duplicates,
                          entities_updated=result["entities_updated"], request_id=current_request_id())


__all__ = ["accept_events", "push_refusal", "split_events"]
