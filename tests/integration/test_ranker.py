"""The ranker end to end: Ray Train V2 training, offline retrieve-then-rank evaluation, and
retrieve-then-rank serving over real HTTP when the model version carries a ranker."""

import socket

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core.errors import DataValidationError, UserInputError
from aiplatform.core.storage import Layout
from aiplatform.features.definitions import FeatureService
from aiplatform.features.pipeline import frame_from_events, training_labels
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.ranker import load_ranker, ranker_dir_of, rerank
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel, load_artifact, save_artifact
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval import build_item_index
from aiplatform.retrieval.index import ItemIndex, vector_table_name
from aiplatform.serving.app import build_app, rank_candidates, start, stop
from aiplatform.training.evaluate import split_by_time
from aiplatform.training.ranker import RankerConfig, attach_ranker, evaluate_ranker, train_ranker
from tests.feature_rows import write_user_rows
from apps.shop.features import item_popularity, recommender_user
from apps.shop.generate import ShopSize, generate

pytestmark = pytest.mark.integration

TYPES = ("view", "click", "add_to_cart", "purchase")
INPUTS = UserInputSpec.from_service(recommender_user)


@pytest.fixture(scope="module")
def shop():
    data = generate(ShopSize(users=250, items=150, categories=10, days=40), seed=3)
    events, items = data["events"], data["items"]
    cutoff, train_ev, truth = split_by_time(events, 7)
    boundary = cutoff + pd.Timedelta(microseconds=1)
    # the shop's declared features, joined point-in-time in memory: examples just before each
    # event, the users' rows at the cutoff, and the items' popularity rows at the cutoff
    examples = frame_from_events(recommender_user, train_ev, training_labels(train_ev, boundary, TYPES))
    users = sorted(train_ev["user_id"].unique())
    context = frame_from_events(recommender_user, train_ev, pd.DataFrame({"user_id": users, "event_timestamp": cutoff}))
    popularity = FeatureService("item_rows", (item_popularity,))
    item_rows = frame_from_events(popularity, train_ev,
                                  pd.DataFrame({"item_id": sorted(items["item_id"]), "event_timestamp": cutoff}))
    item_counts = item_rows[["item_id", *item_popularity.features]]
    vocab = ItemVocab.from_items(items)
    torch.manual_seed(0)
    # An untrained two-tower: its order is close to random, so a ranker that learned the
    # shop's structure (users stay in their categories) must clearly beat it.
    retrieval = TwoTowerModel(**vocab.model_kwargs(), dim=16, inputs=INPUTS).eval()
    return {"items": items, "examples": examples, "context": context, "truth": truth,
            "vocab": vocab, "retrieval": retrieval, "item_counts": item_counts}


@pytest.fixture(scope="module")
def trained(ray_session, shop, tmp_path_factory):
    runs = str(tmp_path_factory.mktemp("ranker_runs"))
    cfg = RankerConfig(epochs=2, n_hard=8, hard_pool=60, n_random=8, batch_size=128)
    return train_ranker(shop["examples"], shop["items"], shop["vocab"], cfg, runs, "ranker-test",
                        retrieval_model=shop["retrieval"], item_counts=shop["item_counts"])


def test_training_writes_a_loadable_artifact_and_loss_falls(trained, shop):
    history = trained.metrics["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["loss"] < history[0]["loss"]
    assert trained.metrics["hard_negatives"] and trained.metrics["use_retrieval_score"]
    loaded = load_ranker(trained.path)
    assert loaded.config() == trained.model.config()
    assert float(loaded.item_counts.sum()) > 0  # popularity features travelled with the weights
    # the item features are the popularity view's, the user inputs the retrieval model's spec
    assert loaded.item_features == item_popularity.features == trained.metrics["item_features"]
    assert loaded.inputs == INPUTS


def test_ranker_beats_the_retrieval_order_on_the_held_out_week(trained, shop):
    m = evaluate_ranker(trained.model, shop["retrieval"], shop["vocab"], shop["context"], shop["truth"],
                        k=10, n_candidates=50)
    assert m["users"] > 50
    # same users and same candidates: only the order differs
    assert m["ranked"]["ndcg@10"] > m["retrieval"]["ndcg@10"] + 0.02, m
    assert m["ranked"]["recall@10"] > m["retrieval"]["recall@10"], m


def test_training_refuses_examples_without_catalogue_items(ray_session, shop, tmp_path):
    bad = shop["examples"].head(50).assign(item_id="not_in_catalogue")
    with pytest.raises(DataValidationError, match="item_id"):
        train_ranker(bad, shop["items"], shop["vocab"], RankerConfig(epochs=1), str(tmp_path), "bad", inputs=INPUTS)
    with pytest.raises(DataValidationError, match="last_items"):
        train_ranker(bad.drop(columns=["last_items"]), shop["items"], shop["vocab"], RankerConfig(epochs=1),
                     str(tmp_path), "bad2", inputs=INPUTS)
    with pytest.raises(UserInputError, match="inputs="):  # which columns are the model's inputs?
        train_ranker(bad, shop["items"], shop["vocab"], RankerConfig(epochs=1), str(tmp_path), "bad3")


# ---- serving: one registry version carries both models -------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(trained, shop, tmp_path_factory):
    root = tmp_path_factory.mktemp("ranked_serving")
    layout = Layout.at(str(root / "home"))
    layout.ensure()
    src = str(root / "artifact")
    save_artifact(shop["retrieval"], shop["vocab"], src)
    attach_ranker(trained.path, src)
    registry = ModelRegistry(layout)
    mv = registry.register("two_tower", src, {}, {}, "runs/x")
    registry.set_alias("two_tower", "champion", mv.version)
    assert ranker_dir_of(mv.artifact_uri) is not None  # the registry copied ranker/ too
    build_item_index(layout.vectors, "two_tower", mv.version, mv.artifact_uri, shop["items"])
    users = shop["context"][shop["context"]["user_id"].isin(list(shop["truth"])[:5])].reset_index(drop=True)
    write_user_rows(layout, users)
    url = start(build_app(layout.root), host="127.0.0.1", port=_free_port(), name="aiplatform-ranker-test")
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"client": client, "layout": layout, "users": users, "version": mv.version,
               "artifact": mv.artifact_uri}
    stop("aiplatform-ranker-test")


def test_served_recommendations_are_the_rankers_order_of_the_retrieved_candidates(served, shop):
    client, users = served["client"], served["users"]
    model, vocab = load_artifact(served["artifact"])
    ranker = load_ranker(ranker_dir_of(served["artifact"]))
    index = ItemIndex(served["layout"].vectors, vector_table_name("two_tower", served["version"]))
    for k in (3, 10):
        for i, row in users.iterrows():
            resp = client.post("/v1/recommendations", json={"user_id": row["user_id"], "k": k})
            assert resp.status_code == 200, resp.text
            body = resp.json()
            assert body["ranked"] is True and body["fallback"] is None
            assert body["model"] == {"name": "two_tower", "version": served["version"]}
            got = [(i["item_id"], i["score"]) for i in body["items"]]
            assert len(got) == k and len({g[0] for g in got}) == k
            assert not {g[0] for g in got} & set(row["purchased_items"])
            # offline: the same candidates (retrieval top max(5k, 100)) re-ordered by the ranker
            one = users.iloc[[i]]
            hist, dense = vocab.encode_batch(INPUTS, one)
            with torch.no_grad():
                vec = model.user_embedding(torch.from_numpy(hist), torch.from_numpy(dense))[0].numpy()
            cands = index.search(vec, rank_candidates(k), exclude=frozenset(row["purchased_items"]))
            scores = rerank(ranker, vocab, INPUTS.histories(one), INPUTS.dense_values(one),
                            [[c[0] for c in cands]], [[c[1] for c in cands]])[0]
            expected = [cands[j][0] for j in np.argsort(-scores, kind="stable")[:k]]
            assert [g[0] for g in got] == expected
            assert [g[1] for g in got] == sorted((g[1] for g in got), reverse=True)


def test_unknown_user_still_gets_the_popular_fallback_unranked(served):
    body = served["client"].post("/v1/recommendations", json={"user_id": "nobody", "k": 4}).json()
    assert body["fallback"] == "popular" and body["ranked"] is False


def test_rank_candidates_is_bounded():
    assert rank_candidates(1) == 100 and rank_candidates(30) == 150 and rank_candidates(10**6) == 500
