"""EASE on matrices with known answers, lambda chosen on the training side only, paired errors."""

import numpy as np
import pandas as pd
import pytest

import aiplatform.training.baselines as baselines
from apps.shop.generate import ShopSize, generate
from aiplatform.training.baselines import (Ease, EaseTooLarge, beats_by_two_se, ease_weights, interaction_matrix,
                                           paired_difference)
from aiplatform.training.split import adaptive_split

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _events(rows: list[tuple[str, str, str, int]]) -> pd.DataFrame:
    return pd.DataFrame([(u, i, t, T0 + pd.Timedelta(hours=h)) for u, i, t, h in rows],
                        columns=["user_id", "item_id", "event_type", "timestamp"])


def test_ease_closed_form_on_a_hand_made_matrix():
    # items 0 and 1 always together, item 2 alone; lambda 1:
    # G + I = [[3,2,0],[2,3,0],[0,0,2]], P = [[.6,-.4,0],[-.4,.6,0],[0,0,.5]], B = -P / diag(P)
    x = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=float)
    b = ease_weights(x, 1.0)
    expected = np.array([[0, 2 / 3, 0], [2 / 3, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(b, expected, atol=1e-12)
    # the general identity: B = I - P diag(1/diag(P)) with a zero diagonal
    rng = np.random.default_rng(0)
    x = (rng.random((40, 12)) < 0.3).astype(float)
    p = np.linalg.inv(x.T @ x + 5.0 * np.eye(12))
    ref = np.eye(12) - p / np.diag(p)
    np.fill_diagonal(ref, 0.0)
    np.testing.assert_allclose(ease_weights(x, 5.0), ref, atol=1e-10)


def test_ease_recommends_the_co_bought_item_and_honours_exclusions():
    ev = _events([("u1", "a", "click", 0), ("u1", "b", "click", 1), ("u2", "a", "click", 0), ("u2", "b", "view", 1),
                  ("u3", "c", "purchase", 0), ("u4", "c", "view", 0), ("u4", "d", "view", 1)])
    model = Ease.fit(ev, lam=0.5)
    assert model.recommend([["a"]], [set()], k=1) == [["b"]]
    assert model.recommend([["a"]], [{"b"}], k=1)[0] != ["b"]
    assert model.recommend([["d"]], [set()], k=1) == [["c"]]
    assert model.recommend([["zzz"]], [set()], k=2)[0] != []  # unknown history: still k items
    rows = model.user_rows(ev, ["u1"])
    assert rows.toarray().tolist() == [[1.0, 1.0, 0.0, 0.0]]  # binary
    assert interaction_matrix(ev, ["a", "b"], ["u1"], "funnel").toarray().tolist() == [[2.0, 2.0]]
    idx, val = model.neighbours(1)
    assert model.item_ids[idx[0, 0]] == "b" and val[0, 0] > 0


def test_ease_refuses_a_catalogue_above_the_limit(monkeypatch):
    monkeypatch.setattr(baselines, "MAX_EASE_ITEMS", 3)
    ev = _events([("u1", i, "view", k) for k, i in enumerate("abcd")])
    with pytest.raises(EaseTooLarge, match="4 items > 3"):
        Ease.fit(ev, lam=1.0)
    with pytest.raises(ValueError, match="weighting"):
        interaction_matrix(ev, ["a"], ["u1"], "tfidf")


def test_lambda_is_chosen_without_the_evaluation_truth():
    """Two data sets share their training part and differ only after the evaluation cutoff:
    the chosen lambda and the fitted weights must be identical (by construction, the selection
    never sees what follows the training data), and the inner cutoff precedes the outer one."""
    frames = generate(ShopSize(users=120, items=60), seed=5)
    events = frames["events"]
    split = adaptive_split(events, 7, min_users=50)
    other = events.copy()
    after = pd.to_datetime(other["timestamp"], utc=True) > split.cutoff
    other.loc[after, "item_id"] = np.random.default_rng(1).permutation(other.loc[after, "item_id"].to_numpy())
    split_other = adaptive_split(other, 7, min_users=50)
    assert split_other.truth != split.truth and split_other.train.equals(split.train)
    grid = (1.0, 30.0, 1000.0)
    a = Ease.fit_select(split.train, 7, lambdas=grid, item_ids=frames["items"]["item_id"])
    b = Ease.fit_select(split_other.train, 7, lambdas=grid, item_ids=frames["items"]["item_id"])
    assert a.lam == b.lam and np.array_equal(a.weights, b.weights)
    assert pd.Timestamp(a.selection["inner_cutoff"]) < split.cutoff
    scores = a.selection["inner_recall@10"]
    assert set(scores) == {str(x) for x in grid}
    assert scores[str(a.lam)] == max(scores.values())


def test_paired_difference_known_numbers():
    mean, se = paired_difference([1, 0, 1, 1], [0, 0, 1, 0])  # d = [1, 0, 0, 1]
    assert mean == pytest.approx(0.5)
    assert se == pytest.approx(np.std([1, 0, 0, 1], ddof=1) / 2)
    assert np.isnan(paired_difference([1.0], [0.0])[1])
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([1, 0], [1])
    ok, text = beats_by_two_se([0.5] * 50 + [0.6] * 50, [0.1] * 100)
    assert ok and "beats it" in text
    ok, text = beats_by_two_se([1, 0, 1, 0], [0, 1, 0, 1])
    assert not ok and "does NOT" in text
