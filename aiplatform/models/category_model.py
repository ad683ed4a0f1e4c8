"""Where a user's next sessions go: a learned next-horizon category distribution.

Why a separate model. On shop-like data the best ranking of a user's next-week interactions is
"how likely the user is to browse category c" x "how popular the item is within c", and almost
all of the remaining error is in the first factor (benchmarks/quality_ceiling.py: true category
preferences would lift recall@10 from 0.33 to 0.42). The item ranker learns from a few clicks
per user; the category distribution can learn from every session of the next horizon, which is
several times more signal. So it is fitted on its own target, the share of a user's sessions
per category over the next ``horizon_days``, at many past cutoffs (every ``stride_days``), and
fed to the candidate sources and the ranker as one feature.

Rows are (user, category) pairs the user has touched (sparse: a large category tree costs
nothing for categories a user never saw); a category the user never touched gets an equal part
of the mass users put in unseen categories during training (``unseen_mass``). Features per pair
are the user's session counts and shares in the category at several half-lives, the days since
the last event in it, its rank, and context across categories (how many sessions the shares rest
on, how concentrated the user is). LightGBM with the ``cross_entropy`` objective: the label is a
share in [0, 1], weighted by the user's number of sessions in the horizon.
"""

from dataclasses import dataclass

import numpy as np
import pandas as pd

HALF_LIVES = (1.0, 3.0, 7.0, 14.0, 30.0, 1e9)
SESSION_GAP_DAYS = 30 / 1440


def session_weights(row: np.ndarray, ages: np.ndarray) -> np.ndarray:
    """Per event (sorted by row, most recent first), 1 / (events in its browsing session)."""
    new = np.ones(len(row), bool)
    new[1:] = (row[1:] != row[:-1]) | (ages[1:] - ages[:-1] > SESSION_GAP_DAYS)
    sid = np.cumsum(new) - 1
    return 1.0 / np.bincount(sid)[sid] if len(sid) else np.zeros(0)


def pair_features(row: np.ndarray, cat: np.ndarray, ages: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(pair rows, pair categories, [pairs, features], names) over the (user, category) pairs
    present in the events (``row``, ``cat``, ``ages`` sorted by row, most recent first)."""
    sw = session_weights(row, ages)
    n_cat = int(cat.max()) + 1 if len(cat) else 1
    key = row.astype(np.int64) * n_cat + cat
    uk, inv = np.unique(key, return_inverse=True)
    p_row, p_cat = uk // n_cat, uk % n_cat
    cols: dict[str, np.ndarray] = {}
    for h in HALF_LIVES:
        name = f"{h:g}d" if h < 1e8 else "all"
        n = np.bincount(inv, weights=sw * 0.5 ** (ages / h), minlength=len(uk))
        tot = np.bincount(p_row, weights=n, minlength=n_users)[p_row]
        cols[f"sessions_{name}"] = n
        cols[f"user_sessions_{name}"] = tot
        cols[f"share_{name}"] = np.divide(n, tot, out=np.zeros(len(n)), where=tot > 0)
    last = np.full(len(uk), np.inf)
    np.minimum.at(last, inv, ages)
    cols["days_since"] = last
    share_all, share_7 = cols["share_all"], cols["share_7d"]
    for name, share in (("rank_all", share_all), ("rank_7d", share_7)):
        order = np.lexsort((-share, p_row))
        rank = np.empty(len(uk))
        rank[order] = np.arange(len(uk)) - np.searchsorted(p_row[order], p_row[order], side="left")
        cols[name] = rank
    cols["n_categories_seen"] = np.bincount(p_row, minlength=n_users)[p_row].astype("float64")
    order = np.lexsort((-share_all, p_row))
    srt_row, srt_share = p_row[order], share_all[order]
    pos = np.arange(len(order)) - np.searchsorted(srt_row, srt_row, side="left")
    for j in range(4):
        top = np.zeros(n_users)
        sel = pos == j
        top[srt_row[sel]] = srt_share[sel]
        cols[f"user_top{j + 1}_share"] = top[p_row]
    names = list(cols)
    return p_row, p_cat, np.stack([cols[c] for c in names], axis=1) if len(uk) else np.zeros((0, len(names))), names



SMALL_PREDICT_ROWS = 20_000
"""Below this many rows LightGBM predicts on one thread: a request's matrix is small and its
thread pool costs more than it saves; an evaluation's large matrices use every thread."""


def lgb_predict(booster, x: np.ndarray) -> np.ndarray:
    """``booster.predict`` with the thread rule above (shared by every LightGBM model served)."""
    return booster.predict(x, num_threads=1) if len(x) < SMALL_PREDICT_ROWS else booster.predict(x)

@dataclass
class CategoryModel:
    """A fitted next-horizon category distribution (LightGBM booster + the unseen mass)."""

    booster: object
    unseen_mass: float
    n_categories: int
    horizon_days: int
    report: dict

    @classmethod
    def fit(cls, events: pd.DataFrame, item_category: pd.Series, as_of: pd.Timestamp, horizon_days: int = 7,
            stride_days: int = 2, min_history_days: int = 10, rounds: int = 300) -> "CategoryModel | None":
        """Fit on cutoffs ``as_of - horizon - j * stride`` (j = 0, 1, ...) with at least
        ``min_history_days`` before them; only events at or before ``as_of`` are read.
        ``item_category`` maps item id -> category code. None when no cutoff has data."""
        import lightgbm as lgb

        ts = pd.to_datetime(events["timestamp"], utc=True)
        ev = events[(ts <= as_of).to_numpy()]
        ts = pd.to_datetime(ev["timestamp"], utc=True)
        t_us = ts.dt.as_unit("us").astype("int64").to_numpy()
        cat_all = item_category.reindex(ev["item_id"].astype(str)).to_numpy()
        known = ~pd.isna(cat_all)
        ev, t_us, cat_all = ev[known], t_us[known], cat_all[known].astype(np.int64)
        users_all = pd.factorize(ev["user_id"].astype(str).to_numpy(dtype=object))[0]  # int codes: fast isin
        n_cat = int(item_category.max()) + 1 if len(item_category) else 1
        xs, ys, ws, cutoffs = [], [], [], []
        unseen_num = unseen_den = 0.0
        first = ts.min() if len(ts) else as_of
        j = 0
        while True:
            cut = as_of - pd.Timedelta(days=horizon_days + j * stride_days)
            j += 1
            if cut - first < pd.Timedelta(days=min_history_days):
                break
            cut_us = int(cut.value // 1000)  # Timestamp.value is in ns
            before = t_us <= cut_us
            after = (t_us > cut_us) & (t_us <= cut_us + horizon_days * 86_400_000_000)
            users = np.unique(users_all[after])
            users = users[np.isin(users, users_all[before])]
            if not len(users):
                continue
            x_row, x_cat, x, names = _history_pairs(users_all[before], cat_all[before], t_us[before], cut_us, users)
            share, total = _shares(users_all[after], cat_all[after], t_us[after], users, n_cat)
            y = share[x_row, x_cat]
            seen = np.zeros((len(users), n_cat), bool)
            seen[x_row, x_cat] = True
            unseen_num += float((share * ~seen).sum(axis=1) @ total)
            unseen_den += float(total.sum())
            xs.append(x)
            ys.append(y)
            ws.append(total[x_row])
            cutoffs.append(str(cut))
        if not xs:
            return None
        x, y, w = np.concatenate(xs), np.concatenate(ys), np.concatenate(ws)
        params = {"objective": "cross_entropy", "learning_rate": 0.05, "num_leaves": 15, "min_data_in_leaf": 100,
                  "num_threads": 2, "verbose": -1, "seed": 0, "deterministic": True, "force_row_wise": True}
        booster = lgb.train(params, lgb.Dataset(x, y, weight=w, feature_name=names), num_boost_round=rounds)
        return cls(booster, unseen_num / max(unseen_den, 1e-9), n_cat, horizon_days,
                   {"cutoffs": cutoffs, "rows": int(len(x)), "unseen_mass": unseen_num / max(unseen_den, 1e-9)})

    def predict(self, row: np.ndarray, cat: np.ndarray, ages: np.ndarray, n_users: int) -> np.ndarray:
        """[n_users, n_categories] next-horizon category distribution from users' events
        (``row``, category ``cat``, ``ages`` in days; sorted by row, most recent first)."""
        out = np.zeros((n_users, self.n_categories))
        if len(row):
            p_row, p_cat, x, _ = pair_features(row, cat, ages, n_users)
            x = np.asarray(x)
            pred = lgb_predict(self.booster, x)
            out[p_row, p_cat] = np.clip(pred, 1e-6, None)
        seen = out > 0
        n_seen = seen.sum(axis=1, keepdims=True)
        mass = out.sum(axis=1, keepdims=True)
        seen_part = np.divide(out, mass, out=np.zeros_like(out), where=mass > 0) * (1.0 - self.unseen_mass)
        unseen_each = np.where(n_seen > 0, self.unseen_mass, 1.0) / np.maximum(self.n_categories - n_seen, 1)
        return np.where(seen, seen_part, unseen_each)

    # ---- persistence (inside the candidate ranker's artifact) --------------------------------------
    def to_dict(self) -> dict:
        return {"model": self.booster.model_to_string(), "unseen_mass": self.unseen_mass,
                "n_categories": self.n_categories, "horizon_days": self.horizon_days, "report": self.report}

    @classmethod
    def from_dict(cls, d: dict) -> "CategoryModel":
        import lightgbm as lgb

        return cls(lgb.Booster(model_str=d["model"]), float(d["unseen_mass"]), int(d["n_categories"]),
                   int(d["horizon_days"]), dict(d.get("report", {})))


def _history_pairs(users: np.ndarray, cat: np.ndarray, t_us: np.ndarray, at_us: int, query: np.ndarray):
    row = pd.Index(query).get_indexer(users)
    ok = row >= 0
    row, cat, t_us = row[ok], cat[ok], t_us[ok]
    order = np.lexsort((-t_us, row))
    row, cat, ages = row[order], cat[order], (at_us - t_us[order]) / 86_400e6
    return pair_features(row, cat, ages, len(query))


def _shares(users: np.ndarray, cat: np.ndarray, t_us: np.ndarray, query: np.ndarray, n_cat: int):
    """[users, n_cat] share of each user's sessions per category, and their session counts."""
    row = pd.Index(query).get_indexer(users)
    ok = row >= 0
    row, cat, t_us = row[ok], cat[ok], t_us[ok]
    order = np.lexsort((-t_us, row))
    row, cat, t_us = row[order], cat[order], t_us[order]
    sw = session_weights(row, (t_us.max(initial=0) - t_us) / 86_400e6)
    out = np.zeros((len(query), n_cat))
    np.add.at(out, (row, cat), sw)
    total = out.sum(axis=1)
    return np.divide(out, total[:, None], out=np.zeros_like(out), where=total[:, None] > 0), total


__all__ = ["CategoryModel", "pair_features", "session_weights"]
