import math

import pandas as pd
import pytest

from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel
from aiplatform.training.evaluate import (
    CooccurrenceBaseline,
    coverage,
    ndcg_at_k,
    popularity_ranking,
    recall_at_k,
    score_users,
    split_by_time,
)
from apps.shop.features import recommender_user

SPEC = UserInputSpec.from_service(recommender_user)


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


def test_coverage_hand_computed():
    recs = [["a", "b", "c"], ["b", "d"], []]
    assert coverage(recs, n_catalogue=10, k=2) == pytest.approx(3 / 10)  # a, b, d
    assert coverage(recs, n_catalogue=10, k=3) == pytest.approx(4 / 10)
    assert coverage([], n_catalogue=10, k=3) == 0.0
    assert coverage(recs, n_catalogue=0, k=3) == 0.0


def _cooc_events() -> pd.DataFrame:
    # u1: a b c within minutes, then x a day later; u2: a b; u3: c d
    return _events(
        [
            ("u1", "a", "view", "2026-01-01 10:00"),
            ("u1", "b", "view", "2026-01-01 10:01"),
            ("u1", "c", "click", "2026-01-01 10:02"),
            ("u1", "x", "view", "2026-01-02 10:00"),
            ("u2", "a", "view", "2026-01-01 11:00"),
            ("u2", "b", "purchase", "2026-01-01 11:05"),
            ("u2", "b", "view", "2026-01-01 11:06"),  # the same item again is not a pair
            ("u3", "c", "view", "2026-01-01 12:00"),
            ("u3", "d", "view", "2026-01-01 12:01"),
        ]
    )


def test_cooccurrence_counts_are_symmetric_windowed_and_gapped():
    ev = _cooc_events()
    full = CooccurrenceBaseline.fit(ev, window=10)
    assert full.pair_count("a", "b") == full.pair_count("b", "a") == 3  # u1 once, u2 twice (b, b)
    assert full.pair_count("a", "c") == 1 and full.pair_count("c", "d") == 1
    assert full.pair_count("c", "x") == 1  # no session gap by default
    assert full.pair_count("a", "a") == 0 and full.pair_count("a", "zzz") == 0
    assert full.pair_count("a", "d") == 0  # different users never co-occur
    near = CooccurrenceBaseline.fit(ev, window=1)
    assert near.pair_count("a", "c") == 0 and near.pair_count("b", "c") == 1
    session = CooccurrenceBaseline.fit(ev, window=10, session_gap_s=3600)
    assert session.pair_count("c", "x") == 0 and session.pair_count("a", "c") == 1
    with pytest.raises(ValueError, match="window"):
        CooccurrenceBaseline.fit(ev, window=0)


def test_cooccurrence_scores_rank_and_exclude():
    base = CooccurrenceBaseline.fit(_cooc_events(), popular=["d", "x", "c", "b", "a"], window=10)
    # history [a]: b (3) > c (1) > x (1 via u1's a..x, window 10) ... ties broken by popularity
    scores = base.scores([["a"], ["a", "c"], [], ["unknown"]])
    index = {item: i for i, item in enumerate(base.item_ids)}
    assert scores[0, index["b"]] == pytest.approx(3 + base.tie_break[index["b"]])
    # the user's score is the sum over history items: cooc(a, b) + cooc(c, b) = 3 + 1
    assert scores[1, index["b"]] - base.tie_break[index["b"]] == pytest.approx(4.0)
    recs = base.recommend([["a"], [], ["a"]], [set(), set(), {"b"}], k=3)
    assert recs[0] == ["b", "x", "c"]  # c and x both co-occur once with a: x is more popular
    assert recs[1] == ["d", "x", "c"]  # no history: the popularity order
    assert recs[2][0] == "x" and "b" not in recs[2]  # excluded items never come back
    assert base.recommend([["a"]], [set()], k=50)[0][-1] in base.item_ids  # k beyond the catalogue


def test_evaluation_reads_the_context_through_the_models_input_spec():
    """Exclusions and the dense columns come from the model's spec: a spec without an exclusion
    list excludes nothing, and a context without one of its dense features is refused by name."""
    items = pd.DataFrame({"item_id": ["a", "b"], "category": ["x", "y"], "price": [1.0, 2.0]})
    vocab = ItemVocab.from_items(items)
    ctx = pd.DataFrame({"user_id": ["u1"], "last_items": [["a"]], "purchased_items": [["a", "b"]],
                        **{c: [1.0] for c in SPEC.dense}})
    excluding = TwoTowerModel(**vocab.model_kwargs(), dim=8, inputs=SPEC)
    assert score_users(excluding, vocab, ctx, k=2) == [[]]  # both items were bought
    keeping = TwoTowerModel(**vocab.model_kwargs(), dim=8,
                            inputs=UserInputSpec.from_service(recommender_user, exclude=None))
    assert sorted(score_users(keeping, vocab, ctx, k=2)[0]) == ["a", "b"]
    ids, scores = score_users(keeping, vocab, ctx, k=2, with_scores=True)  # the candidate source's form
    assert sorted(ids[0]) == ["a", "b"] and scores[0] == sorted(scores[0], reverse=True)
    with pytest.raises(ValueError, match="purchase_share_7d"):
        score_users(excluding, vocab, ctx.drop(columns=["purchase_share_7d"]), k=2)
    bare = TwoTowerModel(**vocab.model_kwargs(), dim=8)
    with pytest.raises(ValueError, match="input spec"):
        score_users(bare, vocab, ctx, k=1)
