"""The SQLite online store: real SQLite, no Ray."""

import numpy as np
import pandas as pd
import pytest

from aiplatform.features.definitions import COUNT_COLUMNS
from aiplatform.features.online import open_online_store

AS_OF = pd.Timestamp("2026-11-01T00:00:00Z")


def _frame(users, history_len=2):
    rows = []
    for n, uid in enumerate(users):
        row = {"user_id": uid, "last_items": [f"i{n}{j}" for j in range(history_len + n)],
               "purchased_items": [f"i{n}0"], "as_of": AS_OF}
        row.update({c: float(n + k) for k, c in enumerate(COUNT_COLUMNS)})
        rows.append(row)
    return pd.DataFrame(rows)


def test_round_trip_and_upsert(tmp_path):
    store = open_online_store(str(tmp_path / "online.sqlite"))
    assert store.write_user_features(_frame(["a", "b"])) == 2
    feats = store.get_user_features("b")
    assert feats.last_items == ["i10", "i11", "i12"] and feats.purchased_items == ["i10"]
    assert feats.counts.dtype == np.float32 and feats.counts.tolist() == [1.0 + k for k in range(len(COUNT_COLUMNS))]
    assert feats.as_of == AS_OF.to_pydatetime()
    store.write_user_features(_frame(["a", "b"]))  # the same batch again: still two rows
    assert store.count_users() == 2
    assert store.get_user_features("nobody") is None
    assert store.most_active_user() == "b"


def test_a_bad_batch_writes_nothing(tmp_path):
    store = open_online_store(str(tmp_path / "online.sqlite"))
    store.write_user_features(_frame(["a"]))
    bad = _frame(["a", "c"]).drop(columns=[COUNT_COLUMNS[0]])
    with pytest.raises(KeyError):
        store.write_user_features(bad)
    assert store.count_users() == 1 and store.get_user_features("c") is None


def test_popular_items_replace_the_previous_list(tmp_path):
    store = open_online_store(str(tmp_path / "online.sqlite"))
    store.write_popular_items([("x", 3.0), ("y", 2.0), ("z", 1.0)])
    store.write_popular_items([("y", 5.0), ("x", 4.0)])
    assert store.get_popular_items(10) == [("y", 5.0), ("x", 4.0)]
    assert store.get_popular_items(1) == [("y", 5.0)]
