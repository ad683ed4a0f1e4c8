"""Synthetic e-commerce data with structure a model can learn and popularity cannot capture.

What is in it, and why:
- long-tail item popularity (Zipf within each category): a popularity baseline is not trivial;
- users prefer two or three categories, and one preference drifts to a new category at a
  random day: personal history matters, and recent history matters more than old;
- sessions: a run of views in one category, some leading to click, add-to-cart and purchase:
  the funnel gives graded signals and session continuity;
- weekly seasonality (more sessions at the weekend).

Everything is vectorised numpy and seeded, so the same flags give the same files, and
``--scale 10`` (about 1.3M events) takes seconds.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

ADJECTIVES = ["classic", "eco", "smart", "compact", "premium", "vintage", "urban", "pro",
              "soft", "bold", "mini", "ultra", "daily", "travel", "home", "sport"]
CATEGORIES = ["shoes", "jackets", "phones", "laptops", "headphones", "cookware", "lamps",
              "books", "toys", "watches", "bags", "cameras", "chairs", "desks", "bikes",
              "tents", "perfume", "skincare", "games", "tea", "coffee", "plants", "rugs",
              "mugs", "pens", "socks", "hats", "scarves", "kettles", "speakers"]


@dataclass(frozen=True)
class ShopSize:
    users: int = 2000
    items: int = 1000
    categories: int = 20
    days: int = 60
    sessions_per_user_day: float = 0.25

    def scaled(self, scale: float) -> "ShopSize":
        return ShopSize(
            users=max(20, int(self.users * scale)),
            items=max(30, int(self.items * scale)),
            categories=self.categories,
            days=self.days,
            sessions_per_user_day=self.sessions_per_user_day,
        )


@dataclass(frozen=True)
class Latent:
    """The generator's hidden truth: what no model can see, kept to measure how far from the
    best possible ranking a model is (benchmarks/quality_ceiling.py), not for training."""

    start: pd.Timestamp
    categories: list[str]  # category code -> name
    item_cat: np.ndarray  # [items] category code
    pop_weight: np.ndarray  # [items] Zipf weight within the item's category
    prefs: np.ndarray  # [users, 3] preferred category codes
    pref_w: np.ndarray  # [users, 3] session share of each preference
    drift_day: np.ndarray  # [users] day from which preference 0 becomes drift_to
    drift_to: np.ndarray  # [users]
    explore: float = 0.1  # share of sessions in a uniformly random category

    def category_probabilities(self, days: "np.ndarray | range") -> np.ndarray:
        """[users, categories]: each user's expected share of sessions per category over
        ``days`` (day indices from ``start``), with the drift as it happens on each day."""
        users, n_cat = len(self.prefs), len(self.categories)
        out = np.zeros((users, n_cat))
        rows = np.arange(users)
        for d in days:
            for slot in range(3):
                cat = self.prefs[:, slot]
                if slot == 0:
                    cat = np.where(d >= self.drift_day, self.drift_to, cat)
                np.add.at(out, (rows, cat), (1 - self.explore) * self.pref_w[:, slot])
            out += self.explore / n_cat
        return out / max(len(days), 1)


def generate(size: ShopSize = ShopSize(), seed: int = 42,
             end: str = "2026-11-01") -> dict[str, pd.DataFrame]:
    """Return {'users', 'items', 'events'} frames in docs/architecture.md's schema."""
    return generate_with_latent(size, seed, end)[0]


def generate_with_latent(size: ShopSize = ShopSize(), seed: int = 42,
                         end: str = "2026-11-01") -> tuple[dict[str, pd.DataFrame], Latent]:
    """``generate``'s frames and the hidden parameters they were drawn from."""
    rng = np.random.default_rng(seed)
    n_cat = min(size.categories, len(CATEGORIES))
    end_ts = pd.Timestamp(end, tz="UTC")
    start_ts = end_ts - pd.Timedelta(days=size.days)

    # ---- items: uneven category sizes, Zipf popularity within each category ----
    cat_share = rng.dirichlet(np.full(n_cat, 3.0))
    item_cat = rng.choice(n_cat, size=size.items, p=cat_share)
    item_cat[:n_cat] = np.arange(n_cat)  # every category has at least one item
    base_price = np.exp(rng.uniform(np.log(5), np.log(500), n_cat))
    price = np.round(base_price[item_cat] * rng.lognormal(0, 0.35, size.items), 2)
    pop_weight = np.empty(size.items)
    cat_items: list[np.ndarray] = []
    for c in range(n_cat):
        idx = np.flatnonzero(item_cat == c)
        rng.shuffle(idx)
        pop_weight[idx] = 1.0 / np.arange(1, len(idx) + 1) ** 1.1
        cat_items.append(idx)
    item_ids = np.array([f"i{i:06d}" for i in range(size.items)])
    titles = [f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]} {CATEGORIES[c].rstrip('s')} {i}"
              for i, c in enumerate(item_cat)]
    items = pd.DataFrame({"item_id": item_ids, "title": titles,
                          "category": np.array(CATEGORIES)[item_cat], "price": price})

    # ---- users: 3 preferred categories with weights; one drifts at a random day ----
    prefs = np.stack([rng.choice(n_cat, 3, replace=False) for _ in range(size.users)])
    pref_w = rng.dirichlet(np.array([4.0, 2.0, 1.0]), size.users)
    drift_day = rng.integers(size.days // 3, size.days, size.users)
    drift_to = rng.integers(0, n_cat, size.users)
    activity = rng.lognormal(0, 0.6, size.users)
    user_ids = np.array([f"u{u:06d}" for u in range(size.users)])
    users = pd.DataFrame({
        "user_id": user_ids,
        "country": rng.choice(["DE", "FR", "US", "GB", "PL"], size.users),
        "signup_days_ago": rng.integers(0, 1000, size.users),
    })

    # ---- sessions: weekly seasonality, category from the (possibly drifted) preference ----
    n_sess = rng.poisson(activity * size.days * size.sessions_per_user_day)
    s_user = np.repeat(np.arange(size.users), n_sess)
    weekday = (start_ts + pd.to_timedelta(np.arange(size.days), unit="D")).day_of_week.to_numpy()
    day_w = np.where(weekday >= 5, 1.4, 1.0)
    s_day = rng.choice(size.days, size=len(s_user), p=day_w / day_w.sum())
    s_secs = s_day * 86400 + rng.integers(6 * 3600, 24 * 3600, len(s_user))
    slot = (rng.random(len(s_user))[:, None] > np.cumsum(pref_w[s_user], axis=1)).sum(axis=1)
    slot = np.minimum(slot, 2)
    s_cat = prefs[s_user, slot]
    drifted = (s_day >= drift_day[s_user]) & (slot == 0)
    s_cat = np.where(drifted, drift_to[s_user], s_cat)
    explore = rng.random(len(s_user)) < Latent.explore
    s_cat = np.where(explore, rng.integers(0, n_cat, len(s_user)), s_cat)

    # ---- views within a session: items of the session's category by popularity ----
    s_len = np.minimum(1 + rng.geometric(0.3, len(s_user)), 10)
    v_sess = np.repeat(np.arange(len(s_user)), s_len)
    v_cat = s_cat[v_sess]
    v_item = np.empty(len(v_sess), dtype=np.int64)
    for c in range(n_cat):
        mask = v_cat == c
        idx = cat_items[c]
        w = pop_weight[idx] / pop_weight[idx].sum()
        v_item[mask] = idx[rng.choice(len(idx), size=int(mask.sum()), p=w)]
    pos_in_sess = np.arange(len(v_sess)) - np.repeat(np.cumsum(s_len) - s_len, s_len)
    v_secs = s_secs[v_sess] + pos_in_sess * 45 + rng.integers(0, 30, len(v_sess))

    # ---- the funnel: view -> click -> add_to_cart -> purchase ----
    clicked = rng.random(len(v_sess)) < 0.35
    carted = clicked & (rng.random(len(v_sess)) < 0.30)
    bought = carted & (rng.random(len(v_sess)) < 0.50)
    parts = []
    for name, mask, offset in (("view", np.ones(len(v_sess), bool), 0), ("click", clicked, 5),
                               ("add_to_cart", carted, 20), ("purchase", bought, 40)):
        parts.append((np.full(int(mask.sum()), name), v_sess[mask], v_item[mask], v_secs[mask] + offset))
    etype = np.concatenate([p[0] for p in parts])
    e_sess = np.concatenate([p[1] for p in parts])
    e_item = np.concatenate([p[2] for p in parts])
    e_secs = np.concatenate([p[3] for p in parts])
    order = np.lexsort((e_secs, s_user[e_sess]))
    etype, e_sess, e_item, e_secs = etype[order], e_sess[order], e_item[order], e_secs[order]
    value = np.where(np.isin(etype, ["add_to_cart", "purchase"]), price[e_item], np.nan)
    ts = start_ts.as_unit("us") + pd.to_timedelta(e_secs, unit="s")
    events = pd.DataFrame({
        "user_id": user_ids[s_user[e_sess]],
        "item_id": item_ids[e_item],
        "event_type": etype,
        "timestamp": ts,
        "value": value,
        "event_id": np.char.add("e", np.arange(len(etype)).astype(str)),
    })
    events = events[events["timestamp"] < end_ts].reset_index(drop=True)
    latent = Latent(start=start_ts, categories=CATEGORIES[:n_cat], item_cat=item_cat, pop_weight=pop_weight,
                    prefs=prefs, pref_w=pref_w, drift_day=drift_day, drift_to=drift_to)
    return {"users": users, "items": items, "events": events}, latent


def write(frames: dict[str, pd.DataFrame], out_dir: str) -> dict[str, str]:
    """Write each frame as one Parquet file; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, frame in frames.items():
        path = out / f"{name}.parquet"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
        paths[name] = str(path)
    return paths
