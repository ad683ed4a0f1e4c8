"""The served pipeline's evaluation: one set of users and exclusions for every ranker, paired
verdicts, and the two-tower source read from the users' feature rows at each cutoff."""

import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.models.candidates import CandidateConfig
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel
from aiplatform.training.baselines import Ease
from aiplatform.training.candidates import fit_ranker, ranker_windows
from aiplatform.training.recommender import TwoTowerSource, evaluate_recommender, verdict_lines
from aiplatform.training.split import adaptive_split
from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate

SPEC = UserInputSpec.from_service(recommender_user)


@pytest.fixture(scope="module")
def shop():
    frames = generate(ShopSize(users=120, items=60), seed=3)
    split = adaptive_split(frames["events"], 7, min_users=60)
    vocab = ItemVocab.from_items(frames["items"])
    torch.manual_seed(0)
    model = TwoTowerModel(**vocab.model_kwargs(), dim=8, inputs=SPEC)
    return frames, split, vocab, model


def _context(users, at):
    """Feature rows shaped as the job's context frame at ``at`` (empty lists, zero dense features)."""
    users = [str(u) for u in users]
    return pd.DataFrame({"user_id": users, "event_timestamp": at, "last_items": [[] for _ in users],
                         "purchased_items": [[] for _ in users],
                         **{c: [0.0] * len(users) for c in SPEC.dense}})


def test_two_tower_alone_is_the_model_and_every_ranker_excludes_purchases(shop):
    frames, split, vocab, model = shop
    users = sorted(split.truth)
    source = TwoTowerSource(model, vocab, depth=20, contexts=_context(users + ["stranger"], split.cutoff))
    res = evaluate_recommender(None, source, split, ease=None, k=5, k_large=10)
    assert res["users"] == len(users)  # a user without truth is not scored
    assert res["model"] == res["two_tower"]
    assert set(res["paired"]) == {"popularity", "cooccurrence"}  # EASE was not given
    for verdict in res["paired"].values():
        assert set(verdict) == {"recall@5", "ndcg@5"}
        assert all(np.isfinite(v["se"]) and v["se"] >= 0 for v in verdict.values())
    assert set(res["beats_baselines"]) == {"popularity", "cooccurrence"}
    assert len(verdict_lines(res, 5)) == 2


def test_the_pipeline_beats_the_baselines_on_the_shop_and_says_so(shop):
    frames, split, vocab, model = shop
    config = CandidateConfig(per_source=30, neighbours=30, n_estimators=60, min_child_samples=10,
                             category_model=False, min_window_users=20)
    windows = ranker_windows(split.train, config)
    assert windows and all(w.split.truth for w in windows)
    contexts = pd.concat([_context(w.split.truth, w.split.cutoff) for w in windows]
                         + [_context(split.truth, split.cutoff)], ignore_index=True)
    source = TwoTowerSource(model, vocab, depth=30, contexts=contexts)
    ranker = fit_ranker(split.train, frames["items"], config, external=source, windows=windows)
    assert ranker.external_sources == ["two_tower"]
    assert {"two_tower_score", "two_tower_rank", "cooc_score", "ease_score"} <= set(ranker.feature_names)
    ease = Ease.fit_select(split.train, 7, item_ids=list(vocab.item_ids))
    res = evaluate_recommender(ranker, source, split, ease, k=10, k_large=20)
    assert set(res["paired"]) == {"popularity", "cooccurrence", "ease"}
    # an untrained two-tower is noise; merged with the fitted sources the pipeline is far ahead of it
    assert res["model"]["ndcg@10"] > res["two_tower"]["ndcg@10"]
    assert res["beats_baselines"]["popularity"]
    diff = res["paired"]["popularity"]["ndcg@10"]
    assert diff["difference"] == pytest.approx(res["model"]["ndcg@10"] - res["popularity"]["ndcg@10"])


def test_users_are_found_at_their_own_time_only(shop):
    frames, split, vocab, model = shop
    users = sorted(split.truth)[:5]
    source = TwoTowerSource(model, vocab, depth=5, contexts=_context(users, split.cutoff))
    ids, _ = source.lists(np.array(users, dtype=object), split.cutoff)
    assert all(len(x) == 5 for x in ids)
    later = split.cutoff + pd.Timedelta(seconds=1)  # a row at another time is not the user's row then
    assert source.lists(np.array(users, dtype=object), later)[0] == [[] for _ in users]
    per_user = pd.Series([split.cutoff] * 2 + [later] * 3, index=users, dtype=object)
    assert [len(x) for x in source.lists(np.array(users, dtype=object), per_user)[0]] == [5, 5, 0, 0, 0]
    with pytest.raises(ValueError, match="no validation user has a feature row"):
        evaluate_recommender(None, TwoTowerSource(model, vocab, 5, _context(["nobody"], split.cutoff)), split, None)
