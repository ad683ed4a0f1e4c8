"""The shop's synthetic data (apps/shop/generate.py): deterministic, scalable, and with the
structure the rest of the platform relies on (catalogue integrity, funnel, long tail, weekly
seasonality)."""

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from apps.shop.generate import ShopSize, generate, write

SIZE = ShopSize(users=400, items=200)
END = pd.Timestamp("2026-11-01", tz="UTC")


@pytest.fixture(scope="module")
def shop() -> dict[str, pd.DataFrame]:
    return generate(SIZE, seed=7)


def _sessions(events: pd.DataFrame, gap: pd.Timedelta = pd.Timedelta(minutes=30)) -> pd.DataFrame:
    """Session starts: a user's first event, or one more than ``gap`` after their previous."""
    ev = events.sort_values(["user_id", "timestamp"], kind="stable")
    new_user = ev["user_id"].ne(ev["user_id"].shift())
    new_gap = ev["timestamp"].diff() > gap
    return ev[new_user | new_gap]


def test_same_seed_gives_identical_frames():
    a, b = generate(SIZE, seed=3), generate(SIZE, seed=3)
    assert set(a) == {"users", "items", "events"}
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])


def test_different_seeds_differ():
    a, b = generate(SIZE, seed=3), generate(SIZE, seed=4)
    assert len(a["events"]) != len(b["events"]) or not a["events"].equals(b["events"])
    assert not a["items"]["category"].equals(b["items"]["category"])
    # Ids are positional, so both catalogues name the same ids ...
    assert a["items"]["item_id"].tolist() == b["items"]["item_id"].tolist()
    # ... but what users do with them differs.
    pair_a = set(zip(a["events"]["user_id"], a["events"]["item_id"]))
    pair_b = set(zip(b["events"]["user_id"], b["events"]["item_id"]))
    assert len(pair_a ^ pair_b) > 0.3 * len(pair_a)


def test_sizes_scale_with_scale():
    small, big = ShopSize().scaled(0.1), ShopSize().scaled(0.3)
    assert (small.users, small.items) == (200, 100)
    assert (big.users, big.items) == (600, 300)
    ev_small = len(generate(small, seed=1)["events"])
    ev_big = len(generate(big, seed=1)["events"])
    # Events grow roughly with the number of users (3x here).
    assert 2.0 < ev_big / ev_small < 4.5
    # Tiny scales keep a usable minimum.
    tiny = ShopSize().scaled(0.001)
    assert tiny.users >= 20 and tiny.items >= 30


def test_frame_sizes_match_the_shop_size(shop):
    assert len(shop["users"]) == SIZE.users
    assert len(shop["items"]) == SIZE.items
    assert shop["items"]["item_id"].is_unique
    assert shop["users"]["user_id"].is_unique
    assert shop["events"]["event_id"].is_unique
    assert shop["items"]["category"].nunique() == SIZE.categories


def test_every_event_names_a_catalogue_item_and_a_known_user(shop):
    ev = shop["events"]
    assert ev["item_id"].isin(shop["items"]["item_id"]).all()
    assert ev["user_id"].isin(shop["users"]["user_id"]).all()
    assert set(ev["event_type"]) == {"view", "click", "add_to_cart", "purchase"}


def test_timestamps_are_utc_and_within_the_window(shop):
    ts = shop["events"]["timestamp"]
    assert str(ts.dt.tz) == "UTC"
    start = END - pd.Timedelta(days=SIZE.days)
    assert ts.min() >= start
    assert ts.max() < END
    # The whole window is used, not just a part of it.
    assert ts.dt.floor("D").nunique() >= SIZE.days - 1


def test_value_is_the_price_for_carts_and_purchases_only(shop):
    ev = shop["events"].merge(shop["items"][["item_id", "price"]], on="item_id")
    money = ev["event_type"].isin(["add_to_cart", "purchase"])
    assert np.allclose(ev.loc[money, "value"], ev.loc[money, "price"])
    assert ev.loc[~money, "value"].isna().all()


def test_every_purchase_is_preceded_by_an_add_to_cart_of_the_same_user_and_item(shop):
    ev = shop["events"]
    funnel = ev[ev["event_type"].isin(["add_to_cart", "purchase"])].copy()
    assert (funnel["event_type"] == "purchase").sum() > 0
    # Ties at the same instant count against the funnel: purchases sort first.
    funnel["cart"] = (funnel["event_type"] == "add_to_cart").astype(int)
    funnel["buy"] = 1 - funnel["cart"]
    funnel = funnel.sort_values(["user_id", "item_id", "timestamp", "cart"], kind="stable")
    g = funnel.groupby(["user_id", "item_id"], sort=False)
    carts_before = g["cart"].cumsum() - funnel["cart"]  # carts strictly earlier in the group
    purchases_so_far = g["buy"].cumsum()
    is_purchase = funnel["buy"] == 1
    assert (carts_before[is_purchase] >= purchases_so_far[is_purchase]).all()
    # And the funnel narrows: views > clicks > carts > purchases.
    counts = ev["event_type"].value_counts()
    assert counts["view"] > counts["click"] > counts["add_to_cart"] > counts["purchase"]


def test_popularity_has_a_long_tail(shop):
    views = shop["events"].query("event_type == 'view'")
    per_item = views["item_id"].value_counts().reindex(shop["items"]["item_id"], fill_value=0)
    top = per_item.sort_values(ascending=False).head(len(per_item) // 10).sum()
    share = top / per_item.sum()
    assert share > 0.3, f"top 10% of items get only {share:.0%} of views"
    # And the tail is long: the median item gets far fewer views than the mean.
    assert per_item.median() < per_item.mean()


def test_weekend_days_have_more_sessions_than_weekdays(shop):
    starts = _sessions(shop["events"])
    per_day = starts.groupby(starts["timestamp"].dt.floor("D")).size()
    weekend = per_day[per_day.index.day_of_week >= 5]
    weekday = per_day[per_day.index.day_of_week < 5]
    assert len(weekend) >= 15 and len(weekday) >= 40
    # The generator weights weekend days 1.4x.
    assert weekend.mean() > 1.15 * weekday.mean(), (weekend.mean(), weekday.mean())


def test_users_mostly_stay_within_a_few_categories(shop):
    ev = shop["events"].merge(shop["items"][["item_id", "category"]], on="item_id")
    share_top3 = (ev.groupby("user_id")["category"]
                  .agg(lambda s: s.value_counts().head(3).sum() / len(s)))
    # 3 preferred categories (+ drift and 10% exploration): far from uniform over 20.
    assert share_top3.median() > 0.6


def test_write_round_trips_through_parquet(shop, tmp_path):
    paths = write(shop, str(tmp_path / "out"))
    assert set(paths) == {"users", "items", "events"}
    for name, path in paths.items():
        back = pq.read_table(path).to_pandas()
        assert len(back) == len(shop[name])
        assert list(back.columns) == list(shop[name].columns)
    back = pq.read_table(paths["events"]).to_pandas()
    assert (back["timestamp"].to_numpy() == shop["events"]["timestamp"].to_numpy()).all()


def test_cli_generate_is_deterministic_and_scales(tmp_path):
    from aiplatform.cli import app

    runner = CliRunner()
    for out, scale in (("a", "0.05"), ("b", "0.05"), ("c", "0.1")):
        result = runner.invoke(app, ["data", "generate", "--out", str(tmp_path / out),
                                     "--scale", scale, "--seed", "5"])
        assert result.exit_code == 0, result.output
    a = pq.read_table(tmp_path / "a" / "events.parquet")
    b = pq.read_table(tmp_path / "b" / "events.parquet")
    c = pq.read_table(tmp_path / "c" / "events.parquet")
    assert a.equals(b)
    assert pq.read_table(tmp_path / "c" / "users.parquet").num_rows == 200
    assert pq.read_table(tmp_path / "a" / "users.parquet").num_rows == 100
    assert c.num_rows > 1.5 * a.num_rows


def test_latent_parameters_match_the_frames(shop):
    from apps.shop.generate import generate_with_latent

    frames, latent = generate_with_latent(SIZE, seed=7)
    for name in shop:
        pd.testing.assert_frame_equal(frames[name], shop[name])
    names = np.array(latent.categories)[latent.item_cat]
    assert (names == shop["items"]["category"].to_numpy()).all()
    probs = latent.category_probabilities(range(SIZE.days))
    assert probs.shape == (SIZE.users, len(latent.categories))
    assert np.allclose(probs.sum(axis=1), 1.0)
    # every user's top category is one of its preferences (or where preference 0 drifted to)
    top = probs.argmax(axis=1)
    allowed = np.column_stack([latent.prefs, latent.drift_to])
    assert (allowed == top[:, None]).any(axis=1).all()
