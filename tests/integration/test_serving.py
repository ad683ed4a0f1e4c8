"""The HTTP API on Ray Serve, called over real HTTP against a tiny storage root."""

import socket
import uuid
from pathlib import Path
from datetime import datetime, timezone

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core.errors import ConfigError, NotFoundError
from aiplatform.core.storage import Layout
from aiplatform.features.definitions import FeatureService
from aiplatform.features.online import SQLiteOnlineStore
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel, save_artifact
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval import build_item_index
from aiplatform.serving.app import build_app, start, stop
from aiplatform.serving.schemas import MAX_K
from apps.shop.features import recommender_user, user_activity
from tests.feature_rows import write_user_rows

pytestmark = pytest.mark.integration

N_ITEMS = 60
HISTORY = ["item_003", "item_017", "item_029", "item_041"]
POPULAR = [(f"item_{i:03d}", float(100 - i)) for i in range(0, 40, 2)]
INPUTS = UserInputSpec.from_service(recommender_user)
COUNTS = [n for n, t in recommender_user.stored_dtypes.items() if t == "int64"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_rows(rows: list[tuple[str, list[str], list[str]]]) -> pd.DataFrame:
    counts = np.tile(np.arange(len(COUNTS), dtype=np.int64), (len(rows), 1))
    frame = pd.DataFrame(counts, columns=COUNTS)
    frame.insert(0, "user_id", [r[0] for r in rows])
    frame["last_items"] = [r[1] for r in rows]
    frame["purchased_items"] = [r[2] for r in rows]
    frame["as_of"] = datetime(2024, 1, 1, tzinfo=timezone.utc)
    return frame


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A storage root with model v1 (decoy) and v2 (champion), its index and online features."""
    root = tmp_path_factory.mktemp("serving")
    layout = Layout.at(str(root / "home"))
    layout.ensure()
    items = pd.DataFrame({
        "item_id": [f"item_{i:03d}" for i in range(N_ITEMS)],
        "category": [f"cat_{i % 5}" for i in range(N_ITEMS)],
        "price": np.linspace(5.0, 120.0, N_ITEMS),
    })
    vocab = ItemVocab.from_items(items)
    torch.manual_seed(0)
    src = str(root / "artifact")
    save_artifact(TwoTowerModel(**vocab.model_kwargs(), dim=16, inputs=INPUTS), vocab, src)
    registry = ModelRegistry(layout)
    registry.register("two_tower", src, {"recall@10": 0.1}, {"dim": 16}, "runs/ck1")
    v2 = registry.register("two_tower", src, {"recall@10": 0.2}, {"dim": 16}, "runs/ck2")
    registry.set_alias("two_tower", "champion", v2.version, reason="test")

    store = SQLiteOnlineStore(layout.online_sqlite)
    # u_buyer and u_browser look identical to the model; only u_buyer has bought items
    write_user_rows(layout, _user_rows([("u_browser", HISTORY, []), ("u_buyer", HISTORY, [])]))
    store.write_popular_items(POPULAR)
    return {"layout": layout, "items": items, "artifact": v2.artifact_uri, "store": store}


@pytest.fixture(scope="module")
def base_url(ray_session, home):
    layout = home["layout"]
    build_item_index(layout.vectors, "two_tower", 2, home["artifact"], home["items"])
    url = start(build_app(layout.root, auth="off"), host="127.0.0.1", port=_free_port(), name="aiplatform-test")
    yield url
    stop("aiplatform-test")


@pytest.fixture(scope="module")
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


def _recommend(client, user_id: str, k: int = 10) -> dict:
    resp = client.post("/v1/recommendations", json={"user_id": user_id, "k": k})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_known_user_gets_k_items_from_the_champion(client):
    body = _recommend(client, "u_browser", k=7)
    assert body["user_id"] == "u_browser"
    assert len(body["items"]) == 7
    assert len({i["item_id"] for i in body["items"]}) == 7
    assert body["model"] == {"name": "two_tower", "version": 2}
    assert body["variant"] == "champion"
    assert body["fallback"] is None
    assert body["ranked"] is False  # this version has no ranker: retrieval order, as before
    uuid.UUID(body["request_id"])
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(-1.0001 <= s <= 1.0001 for s in scores)
    assert _recommend(client, "u_browser", k=7)["request_id"] != body["request_id"]


def test_purchased_items_are_excluded(client, home):
    top = [i["item_id"] for i in _recommend(client, "u_browser", k=10)["items"]]
    bought = top[:3]
    write_user_rows(home["layout"], _user_rows([("u_buyer", HISTORY, bought)]))
    got = [i["item_id"] for i in _recommend(client, "u_buyer", k=10)["items"]]
    assert len(got) == 10
    assert not set(bought) & set(got)
    assert set(got[:7]) == set(top[3:])


def test_posted_events_change_the_next_recommendation_at_once(client, home):
    """POST /v1/events -> event log + the user's online row recomputed -> purchases excluded."""
    top = [i["item_id"] for i in _recommend(client, "u_pusher", k=5)["items"]]
    assert _recommend(client, "u_pusher")["fallback"] == "popular"  # no features yet
    events = [{"user_id": "u_pusher", "item_id": item, "event_type": kind,
               "timestamp": f"2026-11-28T12:0{i}:00Z"}
              for i, (item, kind) in enumerate([(HISTORY[0], "view"), (HISTORY[1], "click"),
                                                (HISTORY[2], "purchase")])]
    resp = client.post("/v1/events", json={"events": events})
    assert resp.status_code == 202, resp.text
    assert resp.json()["accepted"] == 3 and resp.json()["entities_updated"] == {"recommender_user": 1}
    body = _recommend(client, "u_pusher", k=10)
    assert body["fallback"] is None  # the user has features now
    assert HISTORY[2] not in {i["item_id"] for i in body["items"]}  # bought: excluded
    assert top  # the popular fallback served before
    logged = list(Path(home["layout"].eventlog).glob("events-*.parquet"))
    assert len(logged) == 1


@pytest.mark.parametrize("event, field", [
    ({"user_id": "u1", "item_id": "i1", "event_type": "view"}, "timestamp"),
    ({"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": "yesterday"}, "timestamp"),
    ({"user_id": "", "item_id": "i1", "event_type": "view", "timestamp": "2026-11-28T12:00:00Z"}, "user_id"),
    ({"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": "2026-11-28T12:00:00Z",
      "colour": "red"}, "colour"),
])
def test_bad_events_are_422_naming_the_field_and_store_nothing(client, home, event, field):
    before = sorted(Path(home["layout"].eventlog).glob("events-*.parquet"))
    resp = client.post("/v1/events", json={"events": [event]})
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["message"]
    assert sorted(Path(home["layout"].eventlog).glob("events-*.parquet")) == before


def test_too_many_events_is_422(client):
    event = {"user_id": "u1", "item_id": "i1", "event_type": "view", "timestamp": "2026-11-28T12:00:00Z"}
    resp = client.post("/v1/events", json={"events": [event] * 1001})
    assert resp.status_code == 422 and resp.json()["message"].startswith("events:")


def test_unknown_user_gets_popular_items(client):
    body = _recommend(client, "never_seen_user", k=5)
    assert body["fallback"] == "popular"
    assert [(i["item_id"], i["score"]) for i in body["items"]] == POPULAR[:5]
    assert body["model"]["version"] == 2


@pytest.mark.parametrize("k", [0, MAX_K + 1, 10**9])
def test_k_out_of_range_is_422_naming_k(client, k):
    resp = client.post("/v1/recommendations", json={"user_id": "u_browser", "k": k})
    assert resp.status_code == 422
    body = resp.json()
    assert body["message"].startswith("k:")
    assert f"1..{MAX_K}" in body["message"]
    assert [e["loc"] for e in body["detail"]] == [["body", "k"]]


@pytest.mark.parametrize(
    "content",
    ['{"user_id": "u_browser", "k": 3', "not json", "", '["u_browser"]', '{"k": 3}', '{"user_id": ""}'],
)
def test_malformed_requests_are_4xx(client, content):
    resp = client.post("/v1/recommendations", content=content,
                       headers={"content-type": "application/json"})
    assert 400 <= resp.status_code < 500, resp.text


def test_invalid_json_message_says_so(client):
    resp = client.post("/v1/recommendations", content='{"user_id": "u_browser", "k": 3',
                       headers={"content-type": "application/json"})
    assert resp.status_code == 422
    assert resp.json()["message"].startswith("body: invalid JSON at character")


def test_similar_items(client):
    resp = client.get("/v1/items/item_010/similar", params={"k": 4})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    ids = [i["item_id"] for i in body["items"]]
    assert len(ids) == 4 and "item_010" not in ids
    assert body["model"] == {"name": "two_tower", "version": 2}


def test_similar_unknown_item_is_404_with_a_message(client):
    resp = client.get("/v1/items/no_such_item/similar")
    assert resp.status_code == 404
    assert "no_such_item" in resp.json()["detail"]
    assert client.get("/v1/items/item_010/similar", params={"k": 0}).status_code == 422


def test_healthz(client):
    resp = client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok", "model": {"name": "two_tower", "version": 2},
                           "items": N_ITEMS, "variant": "champion", "following": "champion",
                           "switch_error": None, "experiment": None}


def test_openapi_documents_the_api(client):
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/recommendations", "/v1/items/{item_id}/similar", "/healthz"} <= set(paths)


def test_build_app_refuses_a_missing_alias_or_index(home, tmp_path):
    with pytest.raises(NotFoundError, match="no alias 'canary'"):
        build_app(home["layout"].root, alias="canary", auth="off")
    layout = Layout.at(str(tmp_path / "other"))
    registry = ModelRegistry(layout)
    registry.register("two_tower", home["artifact"], {}, {}, "")
    registry.set_alias("two_tower", "champion", 1)
    with pytest.raises(NotFoundError, match="two_tower_v1"):
        build_app(layout.root, auth="off")


def test_build_app_refuses_a_model_trained_on_other_inputs(home, tmp_path):
    """A model whose input spec is not the served feature service's, or that records none, is
    refused where the application is built, naming both services: never served with zeros."""
    vocab = ItemVocab.from_items(home["items"])
    layout = Layout.at(str(tmp_path / "mismatch"))
    registry = ModelRegistry(layout)
    other = FeatureService("recommender_user", (user_activity,))  # without the on-demand feature
    for name, inputs, error in (("other", UserInputSpec.from_service(other), r"purchase_share_7d.*are new"),
                                ("bare", None, "records no input spec.*retrain")):
        src = str(tmp_path / name)
        save_artifact(TwoTowerModel(**vocab.model_kwargs(), dim=8, inputs=inputs), vocab, src)
        mv = registry.register("two_tower", src, {}, {}, "")
        registry.set_alias("two_tower", "champion", mv.version)
        with pytest.raises(ConfigError, match=error):
            build_app(layout.root, auth="off")



def test_a_replica_refuses_other_feature_definitions_than_its_deployment(home):
    """The feature service's definition version is fixed where the application is built: a
    replica started later (autoscaling) from code declaring another version refuses to load
    rather than read other features than its siblings."""
    from aiplatform.serving.pipeline import RecommendPipeline

    layout = home["layout"]
    with pytest.raises(ConfigError, match="deployed reading version 0123abcd"):
        RecommendPipeline(layout.root, f"sqlite:///{layout.online_sqlite}", "apps.shop.features", "recommender_user",
                          home["artifact"], layout.vectors, "two_tower_v2", service_version="0123abcd")


def test_build_app_refuses_a_missing_unreachable_or_empty_online_store_and_an_empty_index(base_url, home, tmp_path):
    """Deploy time, before any replica starts: each refusal names what is wrong and the fix."""
    import lancedb
    import pyarrow as pa

    from aiplatform.core.settings import Settings
    from aiplatform.retrieval.index import require_table

    root = home["layout"].root
    missing = tmp_path / "nope.sqlite"
    with pytest.raises(ConfigError, match="nope.sqlite does not exist.*feature job"):
        build_app(root, settings=Settings.load(home=root, online_store=f"sqlite:///{missing}"), auth="off")
    assert not missing.exists()  # the check creates nothing
    empty = tmp_path / "empty.sqlite"
    SQLiteOnlineStore(str(empty)).close()
    with pytest.raises(ConfigError, match="empty.sqlite is empty.*feature job"):
        build_app(root, settings=Settings.load(home=root, online_store=f"sqlite:///{empty}"), auth="off")
    with pytest.raises(ConfigError, match="redis://127.0.0.1:1/0 cannot be read"):
        build_app(root, settings=Settings.load(home=root, online_store="redis://127.0.0.1:1/0"), auth="off")
    vectors = str(tmp_path / "vectors")
    lancedb.connect(vectors).create_table("two_tower_v9", schema=pa.schema(
        [pa.field("item_id", pa.string()), pa.field("vector", pa.list_(pa.float32(), 4))]))
    with pytest.raises(NotFoundError, match="two_tower_v9.*is empty"):
        require_table(vectors, "two_tower_v9", nonempty=True)
