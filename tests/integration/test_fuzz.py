"""Schemathesis against the real Serve application's own ``/openapi.json``, every route, with
an admin key (so the role checks pass and the routes behind them are reached) and a bounded
number of generated cases per route, valid and invalid: no 5xx, every status code the
application answers is one its schema documents, and every answer matches its declared
content type and schema."""

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from aiplatform.security.keys import KeyStore, Role
from aiplatform.serving.app import build_app, start, stop
from tests.integration.test_rollout import _free_port, make_root

pytestmark = pytest.mark.integration

APP = "aiplatform-fuzz"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_ROUTE = 30


@pytest.fixture(scope="module")
def fuzzed(ray_session, tmp_path_factory):
    home = make_root(tmp_path_factory.mktemp("fuzz"))
    key, _ = KeyStore(home.root, env="").create("fuzzer", Role.admin)
    url = start(build_app(home.root, experiments=False), host="127.0.0.1", port=_free_port(), name=APP,
                route_prefix="/fuzz")
    yield {"url": url, "key": key}
    stop(APP)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_route_answers_within_its_schema(fuzzed, mode):
    # (schemathesis.pytest.from_fixture needs pytest < 9: the operations are walked here instead)
    schema = schemathesis.openapi.from_url(f"{fuzzed['url']}/openapi.json")
    headers = {"Authorization": f"Bearer {fuzzed['key']}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/recommendations", "GET /v1/items/{item_id}/similar",
                                              "POST /v1/events", "GET /healthz", "POST /v1/models/{name}/promote"}
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES_PER_ROUTE, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            case.call_and_validate(base_url=fuzzed["url"], headers=headers, checks=CHECKS)

        fuzz()
