"""The HTTP request/response schemas: what the API accepts and refuses."""

import pytest
from pydantic import ValidationError

from aiplatform.serving.schemas import (
    MAX_K,
    ModelRef,
    RecommendationRequest,
    RecommendationResponse,
    ScoredItem,
)


def _fields(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_defaults():
    req = RecommendationRequest(user_id="u1")
    assert req.k == 10
    assert RecommendationRequest.model_validate_json('{"user_id": "u1", "k": 100}').k == MAX_K


@pytest.mark.parametrize("k", [0, -1, MAX_K + 1, 10**9])
def test_k_out_of_range_is_refused_naming_k(k):
    with pytest.raises(ValidationError) as info:
        RecommendationRequest(user_id="u1", k=k)
    assert _fields(info.value) == {"k"}


def test_k_must_be_an_integer():
    with pytest.raises(ValidationError) as info:
        RecommendationRequest.model_validate_json('{"user_id": "u1", "k": "many"}')
    assert _fields(info.value) == {"k"}


@pytest.mark.parametrize("body", ['{"user_id": ""}', "{}", '{"user_id": null}'])
def test_user_id_is_required_and_non_empty(body):
    with pytest.raises(ValidationError) as info:
        RecommendationRequest.model_validate_json(body)
    assert _fields(info.value) == {"user_id"}


def test_schema_documents_the_range_of_k():
    props = RecommendationRequest.model_json_schema()["properties"]
    assert props["k"]["minimum"] == 1 and props["k"]["maximum"] == MAX_K
    assert props["user_id"]["minLength"] == 1


def test_response_round_trip_with_fallback():
    resp = RecommendationResponse(
        user_id="u1",
        items=[ScoredItem(item_id="i1", score=0.5)],
        model=ModelRef(name="two_tower", version=3),
        variant="champion",
        request_id="abc",
        fallback="popular",
    )
    data = resp.model_dump()
    assert data["model"] == {"name": "two_tower", "version": 3}
    assert RecommendationResponse.model_validate(data) == resp
    assert RecommendationResponse.model_validate({**data, "fallback": None}).fallback is None
