"""Serving runs exactly the candidate pipeline: the HTTP answer is the offline pipeline's answer.

A tiny shop goes through the real feature job (offline store -> online rows with the
``recent_*`` lists). A two-tower artifact (untrained, hand-made: its quality is beside the
point) is registered as champion with ``candidates/``: a ``CandidateRanker`` fitted with
``training.candidates.fit_ranker`` on the shop's events, with the two-tower as its external
source. Served over HTTP, each user's items must equal, in order, what this test computes
offline from the same online rows: ``history_from_rows`` + ``CandidateRanker.recommend`` with
the two-tower candidates the vector index gives for the user's vector. Also: a user without
features gets popular items, and a feature service without the ranker's events features is
refused at build time and at replica start with a ``ConfigError``.
"""

import socket
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core.errors import ConfigError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.features.online import open_online_store
from aiplatform.features.pipeline import run_feature_pipeline
from aiplatform.features.server import FeatureServer
from aiplatform.models.candidates import (
    CANDIDATES_DIR,
    CandidateConfig,
    CandidateRanker,
    candidates_dir_of,
    dense_source,
    history_from_rows,
)
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import (
    ItemVocab,
    TwoTowerModel,
    load_artifact,
    save_artifact,
)
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval import build_item_index
from aiplatform.retrieval.index import ItemIndex, vector_table_name
from aiplatform.serving.app import build_app, start, stop
from aiplatform.serving.pipeline import RecommendPipeline, check_events_features
from aiplatform.training.candidates import fit_ranker, refresh_sources
from apps.shop.features import recommender_user, user_recent_events
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.integration

APP = "aiplatform-candidates-test"
K = 10
RECENT = user_recent_events.aggregations[0]  # the recent-event lists' n and window: what the job trains with
CONFIG = CandidateConfig(per_source=20, neighbours=20, n_estimators=20, min_child_samples=5, category_model=False,
                         min_window_users=20, history_events=RECENT.n,
                         history_days=RECENT.window.total_seconds() / 86_400)
NO_EVENTS_MODULE = "shop_features_without_recent_events"
NO_EVENTS_SOURCE = '''
from aiplatform.features.definitions import FeatureService
from apps.shop.features import item_attributes, item_popularity, purchase_share, user_activity

recommender_user = FeatureService("recommender_user", features=(user_activity, purchase_share))
VIEWS = (user_activity, item_popularity, item_attributes)
SERVICES = (recommender_user,)
ON_DEMAND = (purchase_share,)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_tower_source(model: TwoTowerModel, vocab: ItemVocab):
    """The ranker's external 'two_tower' source at fitting time: the item tower's vectors and a
    user vector that is the mean of the history's (enough to give the ranker the feature)."""
    with torch.no_grad():
        item_vecs = model.all_item_embeddings().numpy()

    def source(history, tables, as_of):
        known = vocab.indices(list(tables.item_ids))
        vecs = item_vecs[known]
        users = np.stack([vecs[history.items[history.indptr[r]:history.indptr[r + 1]]].mean(axis=0)
                          if history.indptr[r + 1] > history.indptr[r] else np.zeros(vecs.shape[1])
                          for r in range(len(history))])
        return {"two_tower": dense_source(users, vecs, CONFIG.per_source)}

    return source


def register_ranked_champion(layout: Layout, events: pd.DataFrame, items: pd.DataFrame, src: Path, *,
                             sources_on_all_events: bool = False):
    """A small untrained two-tower with a fitted candidate ranker in its artifact (so every
    serving stage runs), registered as champion with its item index; returns the version."""
    vocab = ItemVocab.from_items(items)
    torch.manual_seed(0)
    model = TwoTowerModel(**vocab.model_kwargs(), dim=16, inputs=UserInputSpec.from_service(recommender_user))
    ranker = fit_ranker(events, items, CONFIG, external=_two_tower_source(model, vocab))
    if sources_on_all_events:
        ranker = refresh_sources(ranker, events, items)
    save_artifact(model, vocab, str(src))
    ranker.save(str(src / CANDIDATES_DIR))
    registry = ModelRegistry(layout)
    mv = registry.register("two_tower", str(src), {}, {}, "")
    registry.set_alias("two_tower", "champion", mv.version)
    build_item_index(layout.vectors, "two_tower", mv.version, mv.artifact_uri, items)
    return mv


@pytest.fixture(scope="module")
def shop(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("served_candidates")
    layout = Layout.at(str(root / "home"))
    frames = generate(ShopSize(users=120, items=60), seed=7)
    paths = write(frames, str(root / "data"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    settings = Settings.load(home=layout.root)
    run_feature_pipeline(layout, settings=settings)  # offline tables -> online rows (recent_* lists too)

    mv = register_ranked_champion(layout, frames["events"], frames["items"], root / "artifact",
                                  sources_on_all_events=True)  # what the job serves
    return {"layout": layout, "settings": settings, "frames": frames, "artifact": mv.artifact_uri,
            "version": mv.version, "root": root}


@pytest.fixture(scope="module")
def client(shop):
    url = start(build_app(shop["layout"], settings=shop["settings"], auth="off"), host="127.0.0.1", port=_free_port(), name=APP)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            yield c
    finally:
        stop(APP)


def _offline(shop, users: list[str], k: int) -> list[list[str]]:
    """The pipeline computed here, from the same online rows: the user tower (one user at a time,
    as the requests arrive), the vector index, ``history_from_rows`` and ``recommend``."""
    layout = shop["layout"]
    ranker = CandidateRanker.load(candidates_dir_of(shop["artifact"]))
    assert ranker.external_sources == ["two_tower"] and ranker.as_of is not None
    model, vocab = load_artifact(shop["artifact"])
    model.eval()
    spec = UserInputSpec.from_service(recommender_user)
    index = ItemIndex(layout.vectors, vector_table_name("two_tower", shop["version"]))
    feats = FeatureServer(open_online_store(layout.online_sqlite), recommender_user).get(users)
    rows = [feats.to_dict(i) for i in range(len(users))]
    assert all(r["status"] == "ok" for r in rows)
    candidates = []
    for row in rows:
        hist, dense = vocab.encode_users([row[spec.history] or []], spec.dense_row(row)[None, :], model.history_len)
        with torch.inference_mode():
            vector = model.user_embedding(hist, dense).numpy()[0]
        purchased = frozenset(row["purchased_items"] or ())
        candidates.append(index.search(vector, max(ranker.config.per_source, k), exclude=purchased))
    catalogue = pd.Index(ranker.tables.item_ids)
    history = history_from_rows(users, rows, ranker.config, catalogue, ranker.as_of)
    assert (np.diff(history.indptr) > 0).all()  # every user has recent events to rank with
    external = {"two_tower": ranker.external_candidates([[c[0] for c in cs] for cs in candidates],
                                                        [[c[1] for c in cs] for cs in candidates])}
    bought = [row["purchased_items"] or [] for row in rows]
    codes = catalogue.get_indexer([i for b in bought for i in b])
    ex_rows = np.repeat(np.arange(len(users)), [len(b) for b in bought])
    recs = ranker.recommend(history, k, external, (ex_rows[codes >= 0], codes[codes >= 0]))
    return recs, candidates, bought


def test_http_answers_are_the_offline_pipeline(shop, client):
    events = shop["frames"]["events"]
    last = pd.to_datetime(events["timestamp"], utc=True).groupby(events["user_id"]).max().sort_values()
    users = [str(u) for u in last.index[-40::4]]  # active users at various recent times
    buyers = events.loc[events["event_type"] == "purchase", "user_id"].astype(str)
    users += [u for u in buyers if u not in users][:2]  # and users with purchases to exclude
    served = []
    for user in users:
        resp = client.post("/v1/recommendations", json={"user_id": user, "k": K})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["ranked"] is True and body["fallback"] is None and body["model"]["version"] == shop["version"]
        scores = [i["score"] for i in body["items"]]
        assert scores == sorted(scores, reverse=True)
        served.append([i["item_id"] for i in body["items"]])
    offline, candidates, bought = _offline(shop, users, K)
    assert served == offline
    assert all(len(s) == K and len(set(s)) == K for s in served)
    assert all(not set(s) & set(b) for s, b in zip(served, bought, strict=True))
    assert any(b for b in bought)
    # the answer is the merged sources, not the two-tower's order: other sources' items get in
    assert any(set(s) - {c[0] for c in cs} for s, cs in zip(served, candidates, strict=True))


def test_a_user_without_features_gets_popular_items(client):
    body = client.post("/v1/recommendations", json={"user_id": "nobody_knows_me", "k": 5}).json()
    assert body["fallback"] == "popular" and body["ranked"] is False and len(body["items"]) == 5


def test_a_service_without_the_events_features_is_refused(shop, importable_dir, monkeypatch):
    """Build time (``build_app``) and replica start (``RecommendPipeline.__init__``) refuse a service that
    lacks the ranker's recent-event lists, naming them and the fix."""
    (importable_dir / f"{NO_EVENTS_MODULE}.py").write_text(NO_EVENTS_SOURCE)
    monkeypatch.syspath_prepend(str(importable_dir))
    import importlib

    service = importlib.import_module(NO_EVENTS_MODULE).recommender_user
    layout = Layout.at(str(shop["root"] / "no_events"))
    _, vocab = load_artifact(shop["artifact"])
    src = shop["root"] / "artifact_no_events"
    save_artifact(TwoTowerModel(**vocab.model_kwargs(), dim=16, inputs=UserInputSpec.from_service(service)),
                  vocab, str(src))
    CandidateRanker.load(candidates_dir_of(shop["artifact"])).save(str(src / CANDIDATES_DIR))
    registry = ModelRegistry(layout)
    mv = registry.register("two_tower", str(src), {}, {}, "")
    registry.set_alias("two_tower", "champion", mv.version)
    build_item_index(layout.vectors, "two_tower", mv.version, mv.artifact_uri, shop["frames"]["items"])
    settings = Settings.load(home=layout.root).model_copy(update={"features_module": NO_EVENTS_MODULE})
    pattern = r"recent_items.*recent_types.*recent_times.*user_recent_events"
    with pytest.raises(ConfigError, match=pattern):
        build_app(layout, settings=settings, auth="off")
    with pytest.raises(ConfigError, match=pattern):
        RecommendPipeline(layout.root, layout.online_sqlite, NO_EVENTS_MODULE, "recommender_user",
                          mv.artifact_uri, layout.vectors, vector_table_name("two_tower", mv.version))
    # a service keeping fewer events than the ranker was trained on is refused too
    with pytest.raises(ConfigError, match=rf"trained on a user's last {RECENT.n + 1} events of any age.*keeps only "
                                          rf"{RECENT.n} within"):
        check_events_features(CandidateConfig(history_events=RECENT.n + 1), recommender_user)
    check_events_features(CONFIG, recommender_user)  # the served config: accepted
