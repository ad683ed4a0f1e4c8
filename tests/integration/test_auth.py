"""API keys and roles on the real Serve application, deployed as `aiplatform serve` deploys it
(auth on, the default): every route x no key, a malformed or unknown key, and each role.

Keys come from the storage root's key file (``aiplatform keys create``) and from
``AIPLATFORM_API_KEYS`` (hashes only). Running replicas re-read the key file, so a revoked key
is refused and a new one accepted without a redeploy. The admin routes move aliases with the
registry's compare-and-set and record the key's name as the actor."""

import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from aiplatform.core.errors import ConfigError
from aiplatform.registry import ModelRegistry
from aiplatform.security.keys import KeyStore, Role, hash_key, new_key
from aiplatform.serving.app import build_app, start, stop
from tests.integration.test_rollout import _free_port, make_root

pytestmark = pytest.mark.integration

APP = "aiplatform-auth"


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    return make_root(tmp_path_factory.mktemp("auth"))


@pytest.fixture(scope="module")
def keys(home):
    store = KeyStore(home.root, env="")
    return {role.name: store.create(role.name, role, created_by="test")[0] for role in Role}


@pytest.fixture(scope="module")
def env_key():
    return new_key()


@pytest.fixture(scope="module")
def base_url(ray_session, home, keys, env_key):
    mp = pytest.MonkeyPatch()
    mp.setenv("AIPLATFORM_API_KEYS", f"ci-reader:reader:{hash_key(env_key)}")
    try:
        url = start(build_app(home.root, alias_poll_s=0.5, experiments=False), host="127.0.0.1",
                    port=_free_port(), name=APP, route_prefix="/auth")
    finally:
        mp.undo()  # read where the application was built: the replicas got the keys as an argument
    yield url
    stop(APP)


def _event() -> dict:
    return {"events": [{"user_id": "u1", "item_id": "item_001", "event_type": "click",
                        "timestamp": (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()}]}


# route -> (method, path, json body, least role, status when admitted); None: open to all
ROUTES = {
    "recommendations": ("POST", "/v1/recommendations", {"user_id": "u1", "k": 3}, Role.reader, 200),
    "similar": ("GET", "/v1/items/item_001/similar?k=3", None, Role.reader, 200),
    "events": ("POST", "/v1/events", None, Role.writer, 202),
    "model": ("GET", "/v1/models/two_tower", None, Role.admin, 200),
    "experiment": ("GET", "/v1/experiments/two_tower", None, Role.admin, 200),
    "promote": ("POST", "/v1/models/two_tower/promote", {"version": 1}, Role.admin, 200),  # v1 is champion
    "healthz": ("GET", "/healthz", None, None, 200),
}


def test_every_route_against_no_key_a_bad_key_and_each_role(base_url, keys):
    callers = {"no key": None, "not bearer": "Basic dXNlcjpwdw==", "empty bearer": "Bearer",
               "unknown key": f"Bearer {new_key()}", **{r: f"Bearer {k}" for r, k in keys.items()}}
    seen = {}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for route, (method, path, body, least, admitted) in ROUTES.items():
            for caller, header in callers.items():
                json_body = _event() if route == "events" else body
                r = client.request(method, path, json=json_body,
                                   headers={"Authorization": header} if header else {})
                role = Role[caller] if caller in Role.__members__ else None
                if least is None or (role is not None and role >= least):
                    expected = admitted
                else:
                    expected = 401 if role is None else 403
                seen[(route, caller)] = r.status_code
                assert r.status_code == expected, (route, caller, r.status_code, r.text)
                if expected == 401:
                    assert r.headers["www-authenticate"].lower().startswith("bearer")
                    assert "aiplatform keys create" in r.json()["detail"]
                if expected == 403:
                    assert least.name in r.json()["detail"] and caller in r.json()["detail"]
    assert len(seen) == len(ROUTES) * len(callers)


def test_a_key_from_the_environment_is_accepted(base_url, env_key):
    with httpx.Client(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {env_key}"}) as c:
        assert c.post("/v1/recommendations", json={"user_id": "u2", "k": 2}).status_code == 200
        assert c.post("/v1/events", json=_event()).status_code == 403  # a reader


def _wait_for_status(client: httpx.Client, headers: dict, status: int, deadline_s: float = 60) -> None:
    deadline = time.monotonic() + deadline_s
    while True:
        got = client.post("/v1/recommendations", json={"user_id": "u3", "k": 2}, headers=headers).status_code
        if got == status or time.monotonic() > deadline:
            assert got == status
            return
        time.sleep(0.5)


def test_created_and_revoked_keys_take_effect_without_a_redeploy(base_url, home):
    store = KeyStore(home.root, env="")
    key, _ = store.create("late-reader", Role.reader)
    with httpx.Client(base_url=base_url, timeout=30) as client:
        _wait_for_status(client, {"Authorization": f"Bearer {key}"}, 200)
        store.revoke("late-reader")
        _wait_for_status(client, {"Authorization": f"Bearer {key}"}, 401)


def test_admin_routes_move_the_alias_with_the_key_as_actor(base_url, home, keys):
    admin = {"Authorization": f"Bearer {keys['admin']}"}
    registry = ModelRegistry(home)
    with httpx.Client(base_url=base_url, timeout=30, headers=admin) as client:
        info = client.get("/v1/models/two_tower").json()
        assert info["aliases"] == {"champion": 1}
        assert [(v["version"], v["indexed"]) for v in info["versions"]] == [(1, True), (2, True), (3, False)]

        r = client.post("/v1/models/two_tower/promote", json={"version": 3})
        assert r.status_code == 409 and "no vector index" in r.json()["detail"]
        r = client.post("/v1/models/two_tower/promote", json={"version": 9})
        assert r.status_code == 404
        r = client.post("/v1/models/two_tower/promote", json={"version": "two"})
        assert r.status_code == 422

        r = client.post("/v1/models/two_tower/promote", json={"version": 2, "reason": "over http"})
        assert r.status_code == 200, r.text
        assert r.json() | {"reason": ""} == {"name": "two_tower", "alias": "champion", "version": 2, "previous": 1,
                                              "changed": True, "actor": "api-key:admin", "reason": ""}
        history = registry.alias_history("two_tower", "champion")
        assert history[-1]["actor"] == "api-key:admin" and history[-1]["reason"] == "over http"
        deadline = time.monotonic() + 60  # the replicas follow the alias
        while client.post("/v1/recommendations", json={"user_id": "u1", "k": 2}).json()["model"]["version"] != 2:
            assert time.monotonic() < deadline, "the replica did not switch to v2"
            time.sleep(0.5)

        r = client.post("/v1/models/two_tower/rollback", json={})
        assert r.status_code == 200 and r.json()["version"] == 1 and r.json()["previous"] == 2
        r = client.post("/v1/models/two_tower/rollback", json={})  # v1 was the first: nothing earlier
        assert r.status_code == 400 and "nothing earlier" in r.json()["detail"]
    assert registry.aliases("two_tower") == {"champion": 1}


def test_serving_with_keys_on_and_no_key_anywhere_is_refused_before_deploying(tmp_path, monkeypatch):
    monkeypatch.delenv("AIPLATFORM_API_KEYS", raising=False)
    layout = make_root(tmp_path)
    with pytest.raises(ConfigError, match="no API keys.*aiplatform keys create"):
        build_app(layout.root)
    monkeypatch.setenv("AIPLATFORM_API_KEYS", "ci:reader:nothex")
    with pytest.raises(ConfigError, match="AIPLATFORM_API_KEYS entry 1"):
        build_app(layout.root)
