"""Request and response bodies of the HTTP API (docs/architecture.md, 'HTTP').

These pydantic models are the contract and its documentation: FastAPI validates requests
against them (a bad field is a 422 that names it) and renders them in the OpenAPI page at
``/docs``.
"""

from datetime import datetime, timezone

from pydantic import BaseModel, ConfigDict, Field, field_validator

from aiplatform.data.validate import (
    CONTROL_CHARACTERS,
    MAX_EVENT_SKEW_ENV,
    describe_control_character,
    latest_event_time,
    max_event_skew_s,
)

MAX_K = 100
"""Largest number of items one request may ask for."""
MAX_REQUEST_ID = 128
"""Longest request id: an incoming ``X-Request-ID`` up to this long is used as the request's id,
so an event's ``request_id`` (the recommendation it followed) accepts as many characters."""


class RecommendationRequest(BaseModel):
    """Ask for the top ``k`` items for one user."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={"examples": [{"user_id": "u_00042", "k": 10}]},
    )

    user_id: str = Field(
        ..., min_length=1, max_length=256, description="The user to recommend for."
    )
    k: int = Field(
        10, ge=1, le=MAX_K, description=f"How many items to return (1..{MAX_K})."
    )


class ScoredItem(BaseModel):
    item_id: str
    score: float = Field(..., description="The candidate ranker's score when ranked, cosine similarity "
                                          "in retrieval order, popularity for the 'popular' fallback. "
                                          "Higher is better; comparable within one response only.")


class ModelRef(BaseModel):
    name: str
    version: int


class RecommendationResponse(BaseModel):
    user_id: str
    items: list[ScoredItem]
    model: ModelRef
    variant: str = Field(..., description="Which routed variant answered, e.g. 'champion'.")
    request_id: str = Field(..., description="Unique id of this request, for logs and feedback.")
    fallback: str | None = Field(
        None,
        description="Why the model was not used, if it was not: 'popular' when the user has "
                    "no features (a new or unknown user) and popular items were returned; 'degraded' "
                    "when a part of the serving path failed (e.g. the online store is down) and the "
                    "user's last good answer (its first k items) or else the popular items were returned.",
    )
    ranked: bool = Field(
        False,
        description="True when the model version's candidate ranker chose the items (the two-tower's "
                    "nearest items merged with co-occurrence, EASE, popularity and the user's own items, "
                    "scores are ranker scores); false for retrieval order or a fallback.",
    )


class SimilarItemsResponse(BaseModel):
    item_id: str
    items: list[ScoredItem]
    model: ModelRef
    request_id: str


class Health(BaseModel):
    status: str = Field("ok", description="'ok', or 'degraded' while a part of the serving path is failing "
                                          "and answers come from caches and popular items (still a 200: "
                                          "restarting the replica would not help).")
    model: ModelRef
    items: int = Field(..., description="Number of items in the served vector table.")
    variant: str = Field(..., description="How responses name what is served: the alias, or vN when pinned.")
    following: str | None = Field(None, description="The alias this replica follows (switching in place "
                                                    "when it moves), or null when a version is pinned.")
    switch_error: str | None = Field(None, description="Why the last switch to another version failed; "
                                                       "the model above is still served.")
    experiment: dict | None = Field(None, description="The active experiment this replica routes by: its name, "
                                                      "revision, each variant's model version and the shadow's; "
                                                      "null when none is active.")
    serving: dict | None = Field(None, description="With ?detail=true: which replica answered (`replica`, "
                                                  "Serve's id), its cache hit rates, degraded "
                                                  "answers per component (online_store, tower, retriever, ranker) "
                                                  "and circuit breakers (state, failures, rejections).")


class ErrorResponse(BaseModel):
    detail: str


MAX_EVENTS = 1000
"""Most events one ``POST /v1/events`` may carry (bigger loads: `aiplatform data import`)."""


class Event(BaseModel):
    """One user interaction, in the events data contract (docs/architecture.md)."""

    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(..., min_length=1, max_length=256)
    item_id: str = Field(..., min_length=1, max_length=256)
    event_type: str = Field(..., min_length=1, max_length=64,
                            description="view, click, add_to_cart or purchase (others count as view)")
    timestamp: datetime = Field(..., description="ISO 8601; a time without a zone is UTC")
    value: float | None = Field(None, description="A price or rating")
    event_id: str | None = Field(None, min_length=1, max_length=256,
                                 description="Unique id: an event_id accepted within the last 24 hours "
                                             "(AIPLATFORM_EVENT_DEDUP_WINDOW_S) is skipped and counted in "
                                             "`duplicates`, so a retried request records its events once.")
    request_id: str | None = Field(None, min_length=1, max_length=MAX_REQUEST_ID,
                                   description="The request_id of the recommendation this event followed (a click "
                                               "on a recommended item, say): links it to the experiment variant "
                                               "that answered, for `aiplatform experiments report`.")

    @field_validator("user_id", "item_id", "event_type", "event_id", "request_id")
    @classmethod
    def _printable(cls, value: str | None) -> str | None:
        """Control characters would split an id downstream (the online rows' list separators are
        U+001E/U+001F) or forge log lines: refused here, before anything is written."""
        if value is not None:
            found = describe_control_character(value)
            if found is not None:
                raise ValueError(f"contains the control character {found}; expected {CONTROL_CHARACTERS}")
        return value

    @field_validator("timestamp")
    @classmethod
    def _not_in_the_future(cls, value: datetime) -> datetime:
        """An event from the future would stay the user's latest one until then (hiding their
        real activity from every window): refused beyond the clock skew allowed."""
        aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
        bound = latest_event_time()
        if aware > bound:
            raise ValueError(f"{aware.isoformat()} is in the future: the latest time allowed now is "
                             f"{bound.isoformat(timespec='seconds')} (now + {max_event_skew_s():g}s of clock skew, "
                             f"{MAX_EVENT_SKEW_ENV}); send the time the event happened, with its zone or in UTC")
        return value


class EventsRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"events": [
            {"user_id": "u_00042", "item_id": "i_00007", "event_type": "click",
             "timestamp": "2026-11-28T12:00:00Z"}]}]},
    )

    events: list[Event] = Field(..., min_length=1, max_length=MAX_EVENTS)


class EventsAccepted(BaseModel):
    accepted: int = Field(..., description="Events written to the event log")
    duplicates: int = Field(0, description="Events skipped because their event_id was already accepted "
                                           "(earlier in this request, or by a request within the dedup window)")
    entities_updated: dict[str, int] = Field(..., description="Feature service -> entities whose "
                                                              "online row was rewritten")
    request_id: str
