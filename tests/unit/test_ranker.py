"""The ranker without Ray: features, loss, artifacts, list building and batch re-ranking."""

import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core.errors import ConfigError, UserInputError
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.ranker import (
    LABEL_GAINS,
    RankerModel,
    listwise_loss,
    load_ranker,
    ranker_dir_of,
    rerank,
    save_ranker,
)
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel
from aiplatform.training.ranker import (
    ListEncoder,
    RankerConfig,
    attach_ranker,
    item_count_matrix,
    retrieve,
)
from apps.shop.features import recommender_user

N_ITEMS = 40
SPEC = UserInputSpec.from_service(recommender_user)
N_DENSE, HISTORY_LEN = SPEC.n_dense, SPEC.history_len
ITEM_FEATURES = ["view_7d", "purchase_7d", "mean_price_paid_30d"]


@pytest.fixture(scope="module")
def vocab() -> ItemVocab:
    items = pd.DataFrame({
        "item_id": [f"i{i:03d}" for i in range(N_ITEMS)],
        "category": [f"c{i % 4}" for i in range(N_ITEMS)],
        "price": np.linspace(1, 100, N_ITEMS),
    })
    return ItemVocab.from_items(items)


def _ranker(vocab, **kw) -> RankerModel:
    return RankerModel.from_vocab(vocab, inputs=SPEC, item_features=ITEM_FEATURES, **kw)


def _tower(vocab) -> TwoTowerModel:
    return TwoTowerModel(**vocab.model_kwargs(), dim=8, inputs=SPEC)


def _batch(item_ids, event_types, histories, dense, **extra) -> dict:
    """A batch of examples as Ray Data hands it to the encoders (numpy columns)."""
    return {"item_id": np.array(item_ids, dtype=object), "event_type": np.array(event_types, dtype=object),
            "last_items": np.array(histories, dtype=object),
            "purchased_items": np.array([[]] * len(item_ids), dtype=object),
            **{c: np.asarray(dense, np.float32)[:, j] for j, c in enumerate(SPEC.dense)}, **extra}


def test_cross_features_match_their_definition(vocab):
    model = _ranker(vocab)
    hist = torch.from_numpy(vocab.encode_history([["i005", "i001", "i009"]], HISTORY_LEN))  # cats c1, c1, c1
    cands = torch.from_numpy(vocab.indices(["i001", "i013", "i002", "i000"])[None, :])  # c1, c1, c2, c0
    f = model.cross_features(hist, cands, None)[0].numpy()
    L = HISTORY_LEN
    # cat_count, cat_any, cat_recency, in_recent, item_recency, history_length, retrieval_score
    np.testing.assert_allclose(f[0], [3 / L, 1, 1.0, 1, 0.5, 3 / L, 0], rtol=1e-6)
    np.testing.assert_allclose(f[1], [3 / L, 1, 1.0, 0, 0, 3 / L, 0], rtol=1e-6)
    np.testing.assert_allclose(f[2], [0, 0, 0, 0, 0, 3 / L, 0], atol=1e-7)
    np.testing.assert_allclose(f[3], [0, 0, 0, 0, 0, 3 / L, 0], atol=1e-7)


def test_retrieval_score_is_used_only_when_configured(vocab):
    torch.manual_seed(0)
    hist = torch.from_numpy(vocab.encode_history([["i005"]], HISTORY_LEN))
    dense = torch.zeros(1, N_DENSE)
    cands = torch.tensor([[3, 4]])
    rs = torch.tensor([[0.9, -0.9]])
    with_rs = _ranker(vocab, use_retrieval_score=True)
    without = _ranker(vocab, use_retrieval_score=False)
    assert not torch.allclose(with_rs(hist, dense, cands, rs), with_rs(hist, dense, cands, torch.zeros(1, 2)))
    assert torch.allclose(without(hist, dense, cands, rs), without(hist, dense, cands, None))


def test_listwise_loss_prefers_the_positive_and_weights_by_gain():
    gains = torch.tensor([[3.0, 0.0, 0.0]])
    good = listwise_loss(torch.tensor([[2.0, 0.0, 0.0]]), gains)
    bad = listwise_loss(torch.tensor([[0.0, 2.0, 0.0]]), gains)
    assert good < bad
    # a purchase list weighs more than a view list in a mixed batch
    scores = torch.tensor([[0.0, 1.0], [0.0, 1.0]], requires_grad=True)
    listwise_loss(scores, torch.tensor([[3.0, 0.0], [0.5, 0.0]])).backward()
    assert abs(scores.grad[0, 0]) > abs(scores.grad[1, 0]) > 0
    # a padded candidate does not take probability mass
    masked = listwise_loss(torch.tensor([[0.0, 100.0]]), torch.tensor([[1.0, 0.0]]), valid=torch.tensor([[True, False]]))
    assert float(masked) == pytest.approx(0.0, abs=1e-6)
    assert LABEL_GAINS["purchase"] > LABEL_GAINS["add_to_cart"] > LABEL_GAINS["click"] > LABEL_GAINS["view"] > 0


def test_artifact_round_trip_and_attach(vocab, tmp_path):
    torch.manual_seed(1)
    model = _ranker(vocab, dim=8, hidden=16, use_retrieval_score=True)
    model.set_item_counts(np.arange((N_ITEMS + 1) * len(ITEM_FEATURES), dtype=np.float32).reshape(N_ITEMS + 1, -1))
    with pytest.raises(ValueError, match="mean_price_paid_30d"):  # the item table has one column per item feature
        model.set_item_counts(np.zeros((N_ITEMS + 1, N_DENSE), np.float32))
    save_ranker(model, str(tmp_path / "r"), extra={"epoch": 1})
    loaded = load_ranker(str(tmp_path / "r"))
    assert loaded.inputs == SPEC and loaded.item_features == ITEM_FEATURES
    hist = torch.from_numpy(vocab.encode_history([["i001", "i002"], []], HISTORY_LEN))
    dense, cands, rs = torch.rand(2, N_DENSE), torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.rand(2, 3)
    with torch.no_grad():
        assert torch.equal(model.eval()(hist, dense, cands, rs), loaded(hist, dense, cands, rs))
    assert torch.equal(loaded.item_counts, model.item_counts)
    assert loaded.config() == model.config()

    artifact = tmp_path / "two_tower"
    artifact.mkdir()
    assert ranker_dir_of(str(artifact)) is None
    attach_ranker(str(tmp_path / "r"), str(artifact))
    attach_ranker(str(tmp_path / "r"), str(artifact))  # replacing works too
    assert ranker_dir_of(str(artifact)) == str(artifact / "ranker")
    assert sorted(p.name for p in artifact.iterdir()) == ["ranker"]
    with pytest.raises(FileNotFoundError, match="not a ranker artifact"):
        load_ranker(str(artifact))


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="'n_hardd'.*unknown setting.*n_hard"):
        RankerConfig(n_hardd=3)
    with pytest.raises(ConfigError, match="'lr'"):
        RankerConfig(lr=-1)
    with pytest.raises(ConfigError, match="'min_event_type'.*view, click"):
        RankerConfig(min_event_type="like")
    assert RankerConfig().num_workers >= 1


def test_rerank_is_batch_independent_and_marks_unknown_items(vocab):
    torch.manual_seed(2)
    model = _ranker(vocab, dim=8, hidden=16)
    hists, dense = [["i001", "i005"], ["i002"]], np.ones((2, N_DENSE), np.float32)
    cands = [["i003", "i007", "nope", "i011"], ["i004"]]
    both = rerank(model, vocab, hists, dense, cands)
    assert [len(s) for s in both] == [4, 1]
    assert np.isneginf(both[0][2]) and np.isfinite(both[0][[0, 1, 3]]).all()
    alone = rerank(model, vocab, hists[1:], dense[1:], cands[1:])
    np.testing.assert_allclose(alone[0], both[1], rtol=1e-5)
    # a candidate's score does not depend on the other candidates in its list
    np.testing.assert_allclose(rerank(model, vocab, hists[:1], dense[:1], [["i011"]])[0], both[0][3:], rtol=1e-5)
    with pytest.raises(UserInputError, match="2 users but 1 candidate lists"):
        rerank(model, vocab, hists, dense, cands[:1])


def test_list_encoder_builds_hard_and_random_negatives(vocab):
    torch.manual_seed(3)
    tt = _tower(vocab)
    cfg = RankerConfig(n_hard=5, hard_pool=10, n_random=4, retrieved_positives_only=False)
    hist_items = [["i001", "i002", "i003"], ["i010"], []]
    batch = _batch(["i020", "i021", "unknown"], ["purchase", "click", "view"], hist_items, np.ones((3, N_DENSE)))
    out = ListEncoder(vocab, cfg, tt, SPEC)(batch)
    assert out["cands"].shape == (2, 1 + 5 + 4)  # the unknown target is dropped
    np.testing.assert_array_equal(out["cands"][:, 0], vocab.indices(["i020", "i021"]))
    np.testing.assert_array_equal(out["gains"][:, 0], [LABEL_GAINS["purchase"], LABEL_GAINS["click"]])
    assert (out["gains"][:, 1:] == 0).all()
    assert (out["cands"][:, 1:] != out["cands"][:, :1]).all() and (out["cands"] > 0).all()
    # hard negatives: from the retrieval top-10 after removing the target and the history
    top, _ = retrieve(tt, vocab, hist_items[:2], np.ones((2, N_DENSE), np.float32), 30)
    for row in range(2):
        hist = set(vocab.indices(hist_items[row]))
        allowed = [i for i in top[row] if i not in hist and i != out["cands"][row, 0]][:10]
        assert set(out["cands"][row, 1:6]) <= set(allowed)
    # the two-tower score of the positive is the dot product of the towers
    with torch.no_grad():
        hist_t, dense_t = vocab.encode_users(hist_items[:1], np.ones((1, N_DENSE), np.float32), HISTORY_LEN)
        positive = tt.item_embedding(torch.tensor([out["cands"][0, 0]]))[0]
        expected = float(tt.user_embedding(hist_t, dense_t)[0] @ positive)
    assert out["rscore"][0, 0] == pytest.approx(expected, abs=1e-5)
    # without a retrieval model every negative is random and scores are 0
    plain = ListEncoder(vocab, cfg, None, SPEC)(batch)
    assert plain["cands"].shape == (2, 10) and (plain["rscore"] == 0).all()


def test_item_count_matrix_places_counts_by_index(vocab):
    frame = pd.DataFrame({"item_id": ["i003", "zzz"], **{c: [2.0, 5.0] for c in ITEM_FEATURES}})
    frame.loc[0, "mean_price_paid_30d"] = np.nan  # no purchase in the window: a null feature is 0
    m = item_count_matrix(vocab, frame)
    assert m.shape == (N_ITEMS + 1, len(ITEM_FEATURES))
    assert m[vocab.index("i003")].tolist() == [2.0, 2.0, 0.0] and m.sum() == 4.0
    assert item_count_matrix(vocab, frame, ["view_7d"]).shape == (N_ITEMS + 1, 1)
    assert item_count_matrix(vocab, None) is None


def test_future_items_within_the_horizon_are_never_hard_negatives(vocab):
    from aiplatform.training.ranker import _FutureItems

    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    group = pd.DataFrame({
        "user_id": ["u"] * 4,
        "item_id": ["i004", "i001", "i002", "i003"],
        "timestamp": [t0 + pd.Timedelta(days=d) for d in (3, 0, 1, 10)],
    })
    out = _FutureItems(horizon_days=7)(group)
    assert out["item_id"].tolist() == ["i001", "i002", "i004", "i003"]  # sorted by time
    assert out["future_items"].tolist() == [["i002", "i004"], ["i004"], ["i003"], []]

    torch.manual_seed(4)
    tt = _tower(vocab)
    hist = [["i001"]] * 2
    counts = np.ones((2, N_DENSE), np.float32)
    top, _ = retrieve(tt, vocab, hist, counts, 12)
    future = [vocab.item_ids[i - 1] for i in top[0] if i != vocab.index("i001")][:6]
    batch = _batch(["i039", "i038"], ["click"] * 2, hist, counts, future_items=np.array([future, []], dtype=object))
    cfg = RankerConfig(n_hard=4, hard_pool=12, n_random=0, retrieved_positives_only=False)
    out = ListEncoder(vocab, cfg, tt, SPEC)(batch)
    assert not set(out["cands"][0, 1:]) & set(vocab.indices(future))
    assert set(out["cands"][1, 1:]) & set(vocab.indices(future))  # the same user without them: drawn


def test_only_retrieved_positives_make_lists_by_default(vocab):
    torch.manual_seed(5)
    tt = _tower(vocab)
    hist = [["i001", "i002"]] * 2
    counts = np.ones((2, N_DENSE), np.float32)
    top, _ = retrieve(tt, vocab, hist, counts, 5)
    inside = vocab.item_ids[top[0][0] - 1]
    outside = next(i for i in vocab.item_ids if vocab.index(i) not in set(top[0]) and i not in hist[0])
    batch = _batch([outside, inside], ["click"] * 2, hist, counts)
    out = ListEncoder(vocab, RankerConfig(n_hard=2, hard_pool=5, n_random=1), tt, SPEC)(batch)
    assert out["cands"][:, 0].tolist() == [vocab.index(inside)]
    assert set(out["cands"][0, 1:3]) <= set(top[0]) - {vocab.index(inside)}
