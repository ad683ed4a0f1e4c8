"""Candidate sources on hand-made data, leakage-free features, the ranker's artifact round trip."""

import numpy as np
import pandas as pd
import pytest

from apps.shop.generate import ShopSize, generate
from aiplatform.models.candidates import (CandidateConfig, CandidateRanker, History, candidate_features, dense_source,
                                          source_candidates)
from aiplatform.models.category_model import CategoryModel
from aiplatform.training.candidates import fit_item_tables, fit_ranker, labels_for, refresh_sources

T0 = pd.Timestamp("2026-03-01", tz="UTC")
ITEMS = pd.DataFrame({"item_id": ["a", "b", "c", "d", "e"], "category": ["X", "X", "Y", "Y", "Z"],
                      "price": [1.0, 2.0, 3.0, 4.0, 5.0]})
SMALL = CandidateConfig(per_source=5, neighbours=4, category_model=False, n_estimators=20, min_child_samples=5)


def _events(rows: list[tuple[str, str, str, float]]) -> pd.DataFrame:
    return pd.DataFrame([(u, i, t, T0 + pd.Timedelta(hours=h)) for u, i, t, h in rows],
                        columns=["user_id", "item_id", "event_type", "timestamp"])


@pytest.fixture(scope="module")
def hand_made():
    rows = []
    for u in range(6):  # a and b are browsed together; c is the most popular item
        rows += [(f"p{u}", "a", "view", 1 + u), (f"p{u}", "b", "click", 1.01 + u)]
        rows += [(f"q{u}", "c", "purchase", 2 + u), (f"q{u}", "c", "view", 3 + u)]
    rows += [("alice", "a", "click", 20), ("alice", "b", "view", 21), ("alice", "a", "view", 22),
             ("bob", "d", "view", 20), ("bob", "e", "purchase", 21)]
    events = _events(rows)
    at = T0 + pd.Timedelta(hours=30)
    tables = fit_item_tables(events, ITEMS, at, SMALL)
    history = History.from_events(events, pd.Index(tables.item_ids), at, ["alice", "bob", "nobody"])
    return events, tables, history


def _by_user(cands, history, tables) -> dict[str, list[str]]:
    rows, items, _ = cands
    out: dict[str, list[str]] = {u: [] for u in history.users}
    for r, i in zip(rows, items, strict=True):
        out[history.users[r]].append(tables.item_ids[i])
    return out


def test_history_keeps_only_the_past_most_recent_first(hand_made):
    events, tables, _ = hand_made
    h = History.from_events(events, pd.Index(tables.item_ids), T0 + pd.Timedelta(hours=21.5), ["alice"])
    assert [tables.item_ids[i] for i in h.items] == ["b", "a"]  # the view at hour 22 is in the future
    assert h.ages[0] == pytest.approx(0.5 / 24)
    h = History.from_events(events, pd.Index(tables.item_ids), T0 + pd.Timedelta(hours=30), ["alice"], max_events=2)
    assert len(h.items) == 2
    lists = History.from_lists(["x"], [["b", "unknown", "a"]], pd.Index(tables.item_ids))
    assert [tables.item_ids[i] for i in lists.items] == ["b", "a"] and lists.types.tolist() == [0, 0]


def test_each_source_returns_what_it_should(hand_made):
    _, tables, history = hand_made
    cands = source_candidates(tables, history, SMALL)
    cooc = _by_user(cands["cooc"], history, tables)
    assert cooc["alice"][0] in {"a", "b"} and set(cooc["alice"]) == {"a", "b"}  # each co-occurs with the other
    assert cooc["nobody"] == []
    assert _by_user(cands["pop"], history, tables)["nobody"][0] == "c"  # bought six times: most popular
    catpop = _by_user(cands["catpop"], history, tables)
    assert set(catpop["alice"]) == {"a", "b"}  # only category X
    assert set(catpop["bob"]) == {"c", "d", "e"}  # categories Y and Z
    own = _by_user(cands["own"], history, tables)
    assert own["alice"] == ["a", "b"]  # a: click + view, b: one view
    assert own["nobody"] == []
    ease = _by_user(cands["ease"], history, tables)
    assert ease["alice"] and ease["alice"][0] in {"a", "b"}
    rows, items, scores = dense_source(np.array([[1.0, 0.0]]), np.array([[0.0, 1.0], [2.0, 0.0], [1.0, 0.0]]), 2)
    assert items.tolist() == [1, 2] and scores.tolist() == [2.0, 1.0]


def test_features_and_labels_exclude_purchases_and_mark_sources(hand_made):
    events, tables, history = hand_made
    frame = candidate_features(tables, history, source_candidates(tables, history, SMALL), SMALL)
    bob = frame[frame["row"] == 1]
    assert "e" not in set(tables.item_ids[bob["item"]])  # bob bought e: never a candidate
    alice_a = frame[(frame["row"] == 0) & (frame["item"] == 0)].iloc[0]
    assert alice_a["own_n"] == 2 and alice_a["own_relevant"] == 1 and np.isfinite(alice_a["own_rank"])
    assert np.isnan(frame[(frame["row"] == 2)]["own_score"]).all()  # nobody: no own items
    later = _events([("alice", "c", "click", 40), ("alice", "a", "purchase", 41), ("bob", "zzz", "click", 40)])
    y = labels_for(frame, history, tables.item_ids, later, "graded")
    got = {(history.users[r], tables.item_ids[i]): v for r, i, v in zip(frame["row"], frame["item"], y, strict=True)}
    assert got[("alice", "c")] == 1.0 and got[("alice", "a")] == 3.0 and got[("alice", "b")] == 0.0


def test_features_at_a_cutoff_ignore_everything_after_it():
    events = generate(ShopSize(users=120, items=60), seed=1)
    ev, items = events["events"], events["items"]
    cutoff = pd.to_datetime(ev["timestamp"], utc=True).max() - pd.Timedelta(days=10)
    past = ev[pd.to_datetime(ev["timestamp"], utc=True) <= cutoff]
    config = CandidateConfig(per_source=20, neighbours=20, category_model=True)
    users = sorted(set(past["user_id"]))[:40]
    frames = []
    for data in (ev, past):  # all events vs only the past: the same features
        tables = fit_item_tables(data, items, cutoff, config)
        history = History.from_events(data, pd.Index(tables.item_ids), cutoff, users)
        frames.append(candidate_features(tables, history, source_candidates(tables, history, config), config))
    pd.testing.assert_frame_equal(frames[0], frames[1])


def test_category_model_gives_a_distribution_favouring_seen_categories():
    frames = generate(ShopSize(users=120, items=60), seed=2)
    ev, items = frames["events"], frames["items"]
    end = pd.to_datetime(ev["timestamp"], utc=True).max()
    tables = fit_item_tables(ev, items, end, CandidateConfig(per_source=10, neighbours=10))
    assert isinstance(tables.category_model, CategoryModel)
    history = History.from_events(ev, pd.Index(tables.item_ids), end, sorted(set(ev["user_id"]))[:30])
    p = tables.category_probabilities(history, CandidateConfig())
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    seen = np.zeros_like(p, dtype=bool)
    seen[history.row, tables.category[history.items]] = True
    assert p[seen].mean() > 5 * p[~seen].mean()


def test_ranker_fit_recommend_and_artifact_round_trip(tmp_path):
    frames = generate(ShopSize(users=120, items=60), seed=4)
    ev, items = frames["events"], frames["items"]
    config = CandidateConfig(per_source=30, neighbours=20, n_estimators=30, min_child_samples=20,
                             min_window_users=20)
    ranker = fit_ranker(ev, items, config)
    assert ranker.report["windows"] and ranker.booster.num_trees() > 0
    users = sorted(set(ev["user_id"]))[:25]
    end = pd.to_datetime(ev["timestamp"], utc=True).max()
    history = History.from_events(ev, pd.Index(ranker.tables.item_ids), end, users)
    recs = ranker.recommend(history, k=10)
    p_rows, p_items = history.purchased()
    for r, i in zip(p_rows, p_items, strict=True):
        assert ranker.tables.item_ids[i] not in recs[r]
    assert all(len(r) == 10 and len(set(r)) == 10 for r in recs)
    ranker.save(str(tmp_path / "ranker"))
    loaded = CandidateRanker.load(str(tmp_path / "ranker"))
    a, b = ranker.candidates(history), loaded.candidates(history)
    assert np.array_equal(a["score"].to_numpy(), b["score"].to_numpy())
    assert loaded.recommend(history, k=10) == recs
    with pytest.raises(FileNotFoundError, match="candidate-ranker artifact"):
        CandidateRanker.load(str(tmp_path / "nothing"))


def test_external_source_is_required_at_serving_and_converted_from_ids():
    frames = generate(ShopSize(users=120, items=60), seed=4)
    rng = np.random.default_rng(0)
    item_vecs = rng.normal(size=(60, 4))

    def vectors(history, tables, as_of):  # an embedding source: fixed random item vectors
        users = np.stack([item_vecs[history.items[history.indptr[r]:history.indptr[r + 1]]].mean(axis=0)
                          if history.indptr[r + 1] > history.indptr[r] else np.zeros(4) for r in range(len(history))])
        return {"vec": dense_source(users, item_vecs, 10)}

    config = CandidateConfig(per_source=10, neighbours=10, n_estimators=5, category_model=False,
                             min_child_samples=20, n_windows=1, min_window_users=20)
    ranker = fit_ranker(frames["events"], frames["items"], config, external=vectors)
    assert ranker.external_sources == ["vec"] and "vec_score" in ranker.feature_names
    history = History.from_lists(["u"], [["i000001"]], pd.Index(ranker.tables.item_ids))
    with pytest.raises(ValueError, match="external source"):
        ranker.candidates(history)
    ext = ranker.external_candidates([["i000003", "nope", "i000002"]], [[0.9, 0.8, 0.5]])
    assert ranker.tables.item_ids[ext[1]].tolist() == ["i000003", "i000002"] and ext[2].tolist() == [0.9, 0.5]
    frame = ranker.candidates(history, external={"vec": ext})
    assert frame.loc[frame["item"] == ext[1][0], "vec_rank"].item() == 1.0
    refreshed = refresh_sources(ranker, frames["events"], frames["items"])
    assert refreshed.booster is ranker.booster and "sources_as_of" in refreshed.report


def test_fit_refuses_bad_input():
    with pytest.raises(ValueError, match="timestamp"):
        fit_ranker(pd.DataFrame({"user_id": ["a"], "item_id": ["i"], "event_type": ["view"]}), ITEMS)
    with pytest.raises(ValueError, match="item_id"):
        fit_ranker(_events([("a", "a", "view", 0)]), pd.DataFrame({"sku": ["a"]}))


@pytest.mark.parametrize("history_events, history_days, shift_days", [(None, None, 0.0), (20, 7.0, 3.0)])
def test_history_from_rows_equals_history_from_events(history_events, history_days, shift_days):
    """Serving's History (from the feature store's recent_* rows, computed by the feature engine)
    is training's (``History.from_events``) for the same events: same items, types and ages, with
    ages from max(as_of, the user's newest event). None: the view's own n and window."""
    from aiplatform.features.engine import compute_view_rows
    from aiplatform.models.candidates import history_from_rows
    from apps.shop.features import user_recent_events

    agg = user_recent_events.aggregations[0]
    history_events = agg.n if history_events is None else history_events
    history_days = agg.window.total_seconds() / 86_400 if history_days is None else history_days

    frames = generate(ShopSize(users=120, items=60), seed=5)
    # events at the same (user, time) are ordered by a hash in the engine and by input order
    # here: drop such ties so that "most recent first" is one order
    ev = frames["events"].drop_duplicates(["user_id", "timestamp"], ignore_index=True)
    catalogue = pd.Index(sorted(frames["items"]["item_id"]))
    rows = compute_view_rows(user_recent_events, ev).to_pandas()
    online = rows.sort_values("event_timestamp").groupby("user_id").tail(1).set_index("user_id")  # the online row
    users = [*sorted(online.index)[:40], "never_seen"]
    end = pd.to_datetime(ev["timestamp"], utc=True).max()
    as_of = end - pd.Timedelta(days=5) + pd.Timedelta(days=shift_days)  # some users are active after it
    config = CandidateConfig(history_events=history_events, history_days=history_days)
    got = history_from_rows(users, [online.loc[u].to_dict() if u in online.index else None for u in users],
                            config, catalogue, as_of)
    newest = pd.to_datetime(ev["timestamp"], utc=True).groupby(ev["user_id"].astype(str)).max()
    at = newest.reindex(users).fillna(as_of).clip(lower=as_of)
    want = History.from_events(ev, catalogue, at, users, max_events=history_events, window_days=history_days)
    assert got.users.tolist() == want.users.tolist()
    assert got.indptr.tolist() == want.indptr.tolist() and got.indptr[-1] > 100
    assert np.array_equal(got.items, want.items) and np.array_equal(got.types, want.types)
    np.testing.assert_allclose(got.ages, want.ages, rtol=0, atol=1e-9)
    assert got.indptr[-1] - got.indptr[-2] == 0  # the user without a row has no events
    active_after = newest.reindex(users[:-1]) > as_of
    assert active_after.any() and (~active_after).any()  # both rules for the request time were used
    firsts = got.ages[got.indptr[:-2][np.diff(got.indptr)[:-1] > 0]]
    assert np.all(firsts[active_after.to_numpy()[np.diff(got.indptr)[:-1] > 0]] == 0.0)


def test_history_from_rows_reads_every_time_format_and_catalogue_form_alike():
    """The store's '+00:00' strings take numpy's fast parse; other offsets, 'Z' and Timestamps go
    through pandas; a catalogue given as an Index or as a code function (``ItemTables.codes``)
    gives the same codes. All must give one History; a bad time names the feature."""
    from aiplatform.models.candidates import history_from_rows

    catalogue = pd.Index(["a", "b", "c"])
    codes = {"a": 0, "b": 1, "c": 2}
    stamps = [pd.Timestamp("2026-10-22 12:38:17.250", tz="UTC"), pd.Timestamp("2026-10-21 08:00:00", tz="UTC"),
              pd.Timestamp("2026-10-01 00:00:00", tz="UTC")]
    forms = {
        "store": [str(t) for t in stamps],  # '2026-10-22 12:38:17.250000+00:00'
        "zulu": [t.strftime("%Y-%m-%dT%H:%M:%S.%fZ") for t in stamps],
        "offset": [t.tz_convert("Europe/Paris").isoformat() for t in stamps],
        "timestamps": stamps,
    }
    assert forms["store"][0].endswith("+00:00")
    config = CandidateConfig()
    histories = []
    for times in forms.values():
        rows = [{"recent_items": ["a", "x", "c"], "recent_types": ["click", "view", "purchase"], "recent_times": times},
                None]
        for cat in (catalogue, lambda ids: np.array([codes.get(i, -1) for i in ids], dtype=np.int64)):
            histories.append(history_from_rows(["u1", "u2"], rows, config, cat, pd.Timestamp("2026-10-20", tz="UTC")))
    first = histories[0]
    assert first.items.tolist() == [0, 2] and first.types.tolist() == [1, 3] and first.indptr.tolist() == [0, 2, 2]
    assert first.ages[0] == 0.0 and first.ages[1] == pytest.approx((stamps[0] - stamps[2]).total_seconds() / 86_400)
    for h in histories[1:]:
        assert h.items.tolist() == first.items.tolist() and h.types.tolist() == first.types.tolist()
        np.testing.assert_array_equal(h.ages, first.ages)
    bad = [{"recent_items": ["a"], "recent_types": ["view"], "recent_times": ["yesterday+00:00"]}]
    with pytest.raises(ValueError, match="recent_times"):
        history_from_rows(["u1"], bad, config, catalogue, None)
