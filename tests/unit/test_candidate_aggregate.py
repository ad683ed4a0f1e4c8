"""The serving batch's fast paths of the candidate sources and features give the same result to
the bit as the sorting paths that large offline batches take: the per-(user, item) sums, each
user's top m of them (ties broken by item, as ``_top_per_row`` does), the lookups of every
source's score and rank at the merged candidates, and the user's own events per candidate."""

import numpy as np
import pytest

from aiplatform.models.candidate_sources import (_aggregate, _gather, _own_features, _top_distinct, _top_per_row,
                                                 _top_summed)
from aiplatform.models.user_history import History


@pytest.mark.parametrize("users,items,events", [(32, 1000, 30_000), (5, 50, 200), (3, 7, 1), (400, 20_000, 5_000)])
def test_dense_and_sorted_sums_are_identical(users, items, events):
    rng = np.random.default_rng(users + items)
    row, item = rng.integers(0, users, events), rng.integers(0, items, events)
    weight = rng.random(events) * rng.choice([-1.0, 1.0], events)  # sums that may cancel to 0 stay
    dense, sorted_ = _aggregate(row, item, weight, items, dense=True), _aggregate(row, item, weight, items, dense=False)
    for a, b in zip(dense, sorted_, strict=True):
        np.testing.assert_array_equal(a, b)
    keys = set(zip(row.tolist(), item.tolist(), strict=True))
    assert len(dense[0]) == len(keys)  # one entry per distinct pair, ordered by user then item
    assert list(zip(dense[0].tolist(), dense[1].tolist(), strict=True)) == sorted(keys)


def test_empty_input_gives_empty_candidates():
    empty = np.zeros(0, dtype=np.int64)
    for dense in (True, False, None):
        rows, items, sums = _aggregate(empty, empty, np.zeros(0), 10, dense=dense)
        assert len(rows) == len(items) == len(sums) == 0
        rows, items, sums = _top_summed(empty, empty, np.zeros(0), 10, 4, 3, dense=dense)
        assert len(rows) == len(items) == len(sums) == 0


@pytest.mark.parametrize("users,items,events,m,levels", [
    (32, 1000, 30_000, 100, 0),  # a serving batch, continuous sums
    (32, 1000, 30_000, 100, 4),  # integer weights: many sums tie at the m-th place
    (6, 40, 300, 5, 2),
    (4, 300, 50, 20, 3),  # fewer than m items per user: all of them kept
    (3, 7, 1, 2, 0),
])
def test_top_summed_equals_sorting_every_sum(users, items, events, m, levels):
    rng = np.random.default_rng(users * items + m)
    row = np.sort(rng.integers(0, users, events))
    item = rng.integers(0, items, events)
    weight = rng.integers(1, levels + 1, events).astype("float64") if levels else rng.random(events)
    expected = _top_per_row(*_aggregate(row, item, weight, items, dense=False), m)
    for dense in (True, False):
        got = _top_summed(row, item, weight, items, users, m, dense=dense)
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a, b)
            assert a.dtype == b.dtype
    if levels:  # the tie rule was exercised: some user had more equal sums than places left
        r, _, s = expected
        assert any((s[r == u] == s[r == u].min()).sum() > 1 for u in np.unique(r))


def test_gather_takes_the_first_occurrence_like_the_sorted_lookup():
    rng = np.random.default_rng(7)
    size = 500
    k = rng.integers(0, size, 300)  # duplicated keys: the first one counts
    values = rng.random(300)
    keys = np.unique(rng.integers(0, size, 200))
    assert len(k) > len(np.unique(k))
    dense = _gather(keys, k, [values], np.nan, size)[0]
    sorted_ = _gather(keys, k, [values], np.nan, 10**9)[0]  # too large for the dense path
    np.testing.assert_array_equal(dense, sorted_)
    first = {}
    for key, v in zip(k.tolist(), values.tolist(), strict=True):
        first.setdefault(key, v)
    np.testing.assert_array_equal(dense, [first.get(key, np.nan) for key in keys.tolist()])


def test_own_features_dense_and_sorted_agree():
    rng = np.random.default_rng(3)
    users, items, events = 8, 60, 400
    row = np.sort(rng.integers(0, users, events))
    history = History(np.array([f"u{i}" for i in range(users)], dtype=object),
                      np.searchsorted(row, np.arange(users + 1)).astype(np.int64),
                      rng.integers(0, items, events).astype(np.int64), rng.integers(0, 4, events).astype(np.int8),
                      np.sort(rng.random(events) * 40))
    hk = history.row.astype(np.int64) * items + history.items
    keys = np.unique(rng.integers(0, users * items, 150))
    dense = _own_features(keys, hk, history, users * items)
    sorted_ = _own_features(keys, hk, history, 10**9)
    assert list(dense) == list(sorted_) == ["own_w7", "own_n", "own_relevant", "own_age"]
    for name in dense:
        np.testing.assert_array_equal(dense[name], sorted_[name], err_msg=name)
    assert np.isnan(dense["own_age"]).any() and (dense["own_n"] > 0).any()


@pytest.mark.parametrize("repeat", [False, True])
def test_top_distinct_equals_sorting_with_ties_and_falls_back_on_a_repeated_pair(repeat):
    """The catpop source's candidates: each (user, item) once, scores with ties; a repeated
    pair (not expected, but possible for a caller) takes the sort, with the same result."""
    rng = np.random.default_rng(11)
    users, items, m = 16, 400, 30
    row = np.repeat(np.arange(users), 60)
    item = np.concatenate([rng.choice(items, 60, replace=False) for _ in range(users)])
    score = rng.integers(1, 6, len(row)) / 8.0  # five levels: ties at the cut
    if repeat:
        row, item, score = np.append(row, 0), np.append(item, item[0]), np.append(score, 1.0)
    got = _top_distinct(row, item, score, items, users, m)
    for a, b in zip(got, _top_per_row(row, item, score, m), strict=True):
        np.testing.assert_array_equal(a, b)
