"""The candidate sources' per-(user, item) sums: the dense count (serving batches) and the key
sort (large offline batches) give the same result to the bit, and the choice follows the sizes."""

import numpy as np
import pytest

from aiplatform.models.candidate_sources import _aggregate


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
