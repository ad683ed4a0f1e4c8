import math

import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.features.definitions import COUNT_COLUMNS
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel
from aiplatform.training.evaluate import (
    evaluate_model,
    ndcg_at_k,
    popularity_ranking,
    recall_at_k,
    split_by_time,
)


def test_recall_hand_computed():
    recs = ["a", "b", "c", "d", "e"]
    assert recall_at_k(recs, {"b", "e", "z"}, 5) == pytest.approx(2 / 3)
    assert recall_at_k(recs, {"b", "e", "z"}, 2) == pytest.approx(1 / 3)
    assert recall_at_k(recs, {"z"}, 5) == 0.0
    assert recall_at_k(recs, set(), 5) == 0.0
    # a repeated hit takes a slot of the top k and counts once
    assert recall_at_k(["a", "a", "b"], {"a", "b"}, 2) == pytest.approx(0.5)


def test_ndcg_hand_computed():
    # hits at ranks 2 and 4 (1-based); two relevant items -> ideal hits at ranks 1 and 2
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 / math.log2(2) + 1 / math.log2(3)
    assert ndcg_at_k(["x", "a", "y", "b"], {"a", "b"}, 4) == pytest.approx(dcg / idcg)
    assert ndcg_at_k(["a", "b", "x"], {"a", "b"}, 3) == pytest.approx(1.0)
    # more relevant items than k: the ideal list is capped at k
    assert ndcg_at_k(["a", "b"], {"a", "b", "c", "d"}, 2) == pytest.approx(1.0)
    assert ndcg_at_k(["x", "a"], {"a"}, 1) == 0.0
    assert ndcg_at_k(["x", "a"], {"a"}, 2) == pytest.approx(1 / math.log2(3))
    assert ndcg_at_k(["a", "a"], {"a", "b"}, 2) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def _events(rows) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp"])
    df["timestamp"] = pd.to_datetime(df["timestamp"], utc=True)
    return df


def test_split_by_time():
    ev = _events(
        [
            ("u1", "a", "view", "2026-01-01"),
            ("u1", "b", "purchase", "2026-01-09"),  # after cutoff: truth
            ("u1", "c", "view", "2026-01-09"),  # a view is not relevant
            ("u2", "a", "click", "2026-01-02"),
            ("u2", "d", "view", "2026-01-10"),  # only a view after cutoff: not in truth
            ("u3", "e", "click", "2026-01-09"),  # no history before the cutoff: not in truth
            ("u4", "f", "click", "2026-01-03"),  # exactly at the cutoff: training side
            ("u4", "g", "add_to_cart", "2026-01-10"),
            ("u4", "h", "click", "2026-01-05"),
        ]
    )
    cutoff, train, truth = split_by_time(ev, holdout_days=7)
    assert cutoff == pd.Timestamp("2026-01-03", tz="UTC")
    assert (train["timestamp"] <= cutoff).all()
    assert sorted(train["item_id"]) == ["a", "a", "f"]
    assert truth == {"u1": {"b"}, "u4": {"g", "h"}}


def test_popularity_ranking_weights_and_window():
    ev = _events(
        [
            ("u1", "old", "purchase", "2026-01-01"),  # outside the last 7 days
            ("u1", "old", "purchase", "2026-01-01"),
            ("u1", "v", "view", "2026-01-20"),
            ("u2", "v", "view", "2026-01-20"),
            ("u3", "v", "view", "2026-01-20"),
            ("u1", "p", "purchase", "2026-01-19"),  # one purchase beats three views
            ("u1", "c", "click", "2026-01-18"),
            ("u1", "o", "wishlist", "2026-01-18"),  # unknown type weighs as a view
            ("u1", "a", "view", "2026-01-18"),
        ]
    )
    ranking = popularity_ranking(ev, days=7)
    assert ranking[:3] == ["p", "v", "c"]
    assert ranking[3:] == ["a", "o"]  # equal weight: ties by item id
    assert "old" not in ranking


def test_evaluate_model_scores_catalogue_and_excludes_purchases():
    items = pd.DataFrame({"item_id": ["a", "b", "c", "d"], "category": ["x", "x", "y", "y"], "price": [1.0, 2, 3, 4]})
    vocab = ItemVocab.from_items(items)
    torch.manual_seed(0)
    model = TwoTowerModel(**vocab.model_kwargs(), dim=8)
    zeros = {c: [0.0, 0.0, 0.0] for c in COUNT_COLUMNS}
    context = pd.DataFrame(
        {"user_id": ["u1", "u2", "u9"], "last_items": [["a"], [], ["c"]],
         "purchased_items": [["a", "b", "c"], [], []], **zeros}
    )
    truth = {"u1": {"d"}, "u2": {"a", "zzz"}}
    res = evaluate_model(model, vocab, context, truth, popular=["d", "a", "b"], k=1)
    assert res["users"] == 2  # u9 has no truth
    # u1 bought a, b, c: the only item left for the model is d; popularity's top is d too
    # u2: popularity recommends d (miss); the model's top-1 is whatever it scores highest
    assert set(res) == {"model", "popularity", "users"}
    assert res["popularity"]["recall@1"] == pytest.approx((1.0 + 0.0) / 2)
    assert res["model"]["recall@1"] >= 0.5
    assert 0.0 <= res["model"]["ndcg@1"] <= 1.0

    with torch.no_grad():
        hist, dense = vocab.encode_users([[]], np.zeros((1, len(COUNT_COLUMNS))))
        scores = (model.user_embedding(hist, dense) @ model.all_item_embeddings().T)[0, 1:]
    u2_top = vocab.item_ids[int(scores.argmax())]
    assert res["model"]["recall@1"] == pytest.approx((1.0 + (0.5 if u2_top == "a" else 0.0)) / 2)


def test_evaluate_model_with_no_overlap_returns_zero_users():
    items = pd.DataFrame({"item_id": ["a", "b"]})
    vocab = ItemVocab.from_items(items)
    model = TwoTowerModel(**vocab.model_kwargs(), dim=8)
    ctx = pd.DataFrame({"user_id": ["u1"], "last_items": [["a"]], "purchased_items": [[]],
                        **{c: [0.0] for c in COUNT_COLUMNS}})
    assert evaluate_model(model, vocab, ctx, {"other": {"a"}}, ["a"], k=10)["users"] == 0
