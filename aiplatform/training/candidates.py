"""Fitting the multi-source candidates and their ranker on the evaluation's target.

What is served lives in ``models.candidates`` (sources as arrays, features, the LightGBM
ranker, save/load); this module fits it from events.

Training (``fit_ranker``) never looks past the training data. Inside it, the training events
are split again (``split.adaptive_split``) at ``T_w = train_end - w * horizon`` (w = 1..
``n_windows``), or once per user when a window's time split has too few users: sources are
fitted on events up to ``T_w``, candidates are generated for the users active before it,
labelled with what those users clicked, carted or bought in ``(T_w, T_w + horizon]`` (what the
evaluation scores, not the next event), and LightGBM's LambdaRank is fitted on all windows with
one query group per (window, user). The sources are then refitted on all training events
(``fit_item_tables``), and after evaluation on every event (``refresh_sources``): what is
served. Pure numpy/pandas/lightgbm: no Ray.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from aiplatform.core.schemas import EVENT_WEIGHTS, RELEVANT_EVENTS
from aiplatform.models.candidates import (
    INTERNAL_SOURCES,
    POP_WINDOWS,
    TYPE_CODES,
    CandidateConfig,
    CandidateRanker,
    Cands,
    History,
    ItemTables,
    _lookup,
    candidate_features,
    feature_columns,
    source_candidates,
)
from aiplatform.models.category_model import CategoryModel
from aiplatform.training.baselines import EaseTooLarge, ease_weights, interaction_matrix
from aiplatform.training.evaluate import CooccurrenceBaseline
from aiplatform.training.split import EvalSplit, adaptive_split

ExternalSource = Callable[[History, ItemTables, "pd.Timestamp | pd.Series"], dict[str, Cands]]
"""(history, tables, at) -> {name: candidates}: sources this module does not fit (the two-tower).
``at`` is when each user of ``history`` is seen: one time, or a Series user_id -> time."""


def fit_item_tables(events: pd.DataFrame, items: pd.DataFrame, as_of: pd.Timestamp, config: CandidateConfig) -> ItemTables:
    """Fit the item-side tables on ``events`` at or before ``as_of`` (the catalogue: ``items``)."""
    item_ids = np.asarray(sorted(set(items["item_id"].astype(str))), dtype=object)
    catalogue = pd.Index(item_ids)
    it = items.assign(item_id=items["item_id"].astype(str)).drop_duplicates("item_id").set_index("item_id")
    it = it.reindex(item_ids)
    cats = it["category"].astype(object).where(it["category"].notna(), "") if "category" in it else \
        pd.Series("", index=it.index)
    cat_code, cat_names = pd.factorize(cats.astype(str))
    price = pd.to_numeric(it["price"], errors="coerce").to_numpy(dtype="float64") if "price" in it else \
        np.full(len(item_ids), np.nan)
    ts = pd.to_datetime(events["timestamp"], utc=True)
    ev = events[(ts <= as_of).to_numpy()]
    t_age = ((as_of - pd.to_datetime(ev["timestamp"], utc=True)) / pd.Timedelta(days=1)).to_numpy()
    code = catalogue.get_indexer(ev["item_id"].astype(str).to_numpy(dtype=object))
    w = ev["event_type"].map(EVENT_WEIGHTS).fillna(1.0).to_numpy(dtype="float64")
    pop = np.zeros((len(item_ids), len(POP_WINDOWS)))
    for j, days in enumerate(POP_WINDOWS):
        sel = (code >= 0) & (t_age <= days)
        pop[:, j] = np.bincount(code[sel], weights=w[sel], minlength=len(item_ids))
    n_cat = max(len(cat_names), 1)
    # in-category popularity: every item shown is one view, so view counts (not the noisier
    # funnel weights) over a long, slowly decaying window estimate it best
    views = (code >= 0) & (ev["event_type"].to_numpy(dtype=object) == "view")
    seen = np.bincount(code[views], weights=0.5 ** (t_age[views] / config.incat_half_life),
                       minlength=len(item_ids))
    cat_total = np.bincount(cat_code, weights=seen, minlength=n_cat)
    incat = np.divide(seen, cat_total[cat_code], out=np.zeros(len(item_ids)), where=cat_total[cat_code] > 0)
    m = config.per_source
    cat_top = np.full((n_cat, m), -1, np.int64)
    order = np.lexsort((np.arange(len(item_ids)), -incat, cat_code))
    for c in range(n_cat):
        members = order[cat_code[order] == c][:m]
        cat_top[c, :len(members)] = members
    ev_known = ev[code >= 0]
    cooc_idx, cooc_val = _cooc_neighbours(ev_known, item_ids, config)
    ease_idx, ease_val = _ease_neighbours(ev_known, item_ids, config)
    cat_model = CategoryModel.fit(ev_known, pd.Series(cat_code, index=catalogue), as_of, config.horizon_days) \
        if config.category_model else None
    if cat_model is not None and cat_model.n_categories != n_cat:
        cat_model.n_categories = n_cat
    return ItemTables(item_ids, cat_code.astype(np.int64), n_cat, np.log(price), pop, incat, cat_top,
               cooc_idx, cooc_val, ease_idx, ease_val, cat_model)


def _cooc_neighbours(events: pd.DataFrame, item_ids: np.ndarray, config: CandidateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``neighbours`` most co-occurring items (``CooccurrenceBaseline`` counts)."""
    n, m = len(item_ids), config.neighbours
    idx, val = np.full((n, m), -1, np.int64), np.zeros((n, m))
    if events.empty:
        return idx, val
    base = CooccurrenceBaseline.fit(events, (), window=config.cooc_window)
    code = pd.Index(item_ids).get_indexer(base.item_ids)
    for r in range(base.n_items):
        lo, hi = base.indptr[r], base.indptr[r + 1]
        cols, cnt = base.cols[lo:hi], base.counts[lo:hi]
        top = np.lexsort((cols, -cnt))[:m]
        idx[code[r], :len(top)] = code[cols[top]]
        val[code[r], :len(top)] = cnt[top]
    return idx, val


def _ease_neighbours(events: pd.DataFrame, item_ids: np.ndarray, config: CandidateConfig) -> tuple[np.ndarray, np.ndarray]:
    """Each item's ``neighbours`` largest EASE weights (empty above the EASE size limit)."""
    n, m = len(item_ids), min(config.neighbours, max(len(item_ids) - 1, 1))
    idx, val = np.full((n, m), -1, np.int64), np.zeros((n, m))
    if events.empty or "ease" not in config.sources:
        return idx, val
    users = sorted(set(events["user_id"].astype(str)))
    try:
        b = ease_weights(interaction_matrix(events, item_ids, users, config.ease_weighting), config.ease_lambda)
    except EaseTooLarge:
        return idx, val
    b[np.diag_indices(n)] = -np.inf
    top = np.argpartition(-b, m - 1, axis=1)[:, :m]
    vals = np.take_along_axis(b, top, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)


def labels_for(frame: pd.DataFrame, history: History, item_ids: np.ndarray, truth_events: pd.DataFrame,
               label: str = "binary") -> np.ndarray:
    """Label of each candidate row: 1 (binary) or the best relevant event's grade (click 1,
    add_to_cart 2, purchase 3) when its user did that to the item in ``truth_events``."""
    n = len(item_ids)
    ev = truth_events[truth_events["event_type"].isin(RELEVANT_EVENTS)]
    r = pd.Index(history.users).get_indexer(ev["user_id"].astype(str).to_numpy(dtype=object))
    i = pd.Index(item_ids).get_indexer(ev["item_id"].astype(str).to_numpy(dtype=object))
    g = pd.Index(TYPE_CODES).get_indexer(ev["event_type"].to_numpy(dtype=object)).astype("float64")
    ok = (r >= 0) & (i >= 0)
    k = r[ok].astype(np.int64) * n + i[ok]
    grade = pd.Series(g[ok]).groupby(k).max() if ok.any() else pd.Series(dtype="float64")
    keys = frame["row"].to_numpy().astype(np.int64) * n + frame["item"].to_numpy()
    out = _lookup(keys, grade.index.to_numpy(np.int64), grade.to_numpy(), 0.0)
    return (out > 0).astype("float64") if label == "binary" else out


@dataclass
class RankerWindow:
    """One training window of the ranker: the events up to its end and its inner split."""

    events: pd.DataFrame  # training events up to the window's end (index: the fit's row numbers)
    split: EvalSplit  # its inner split: the sources' past and the labels' future

    @property
    def at(self) -> "pd.Timestamp | pd.Series":
        """Each user's context time (one cutoff, or per user)."""
        return self.split.user_cutoffs if self.split.kind == "per_user" else self.split.cutoff


def ranker_windows(train_events: pd.DataFrame, config: CandidateConfig) -> list[RankerWindow]:
    """The ranker's training windows inside ``train_events`` (see the module docstring).

    Deterministic, so a caller can compute them first (e.g. to join each window's users'
    feature rows for an external source) and pass them to ``fit_ranker``."""
    _check_events(train_events)
    train_events = train_events.reset_index(drop=True)
    ts = pd.to_datetime(train_events["timestamp"], utc=True)
    train_end = ts.max()
    out: list[RankerWindow] = []
    for w in range(1, config.n_windows + 1):
        upto = train_events[(ts <= train_end - pd.Timedelta(days=(w - 1) * config.horizon_days)).to_numpy()]
        if upto.empty:
            break
        inner = adaptive_split(upto, config.horizon_days, min_users=config.min_window_users)
        if inner.kind == "per_user" and w > 1:
            break  # earlier windows of a per-user split would repeat the same users' pasts
        if not inner.truth:
            continue
        out.append(RankerWindow(upto, inner))
        if inner.kind == "per_user":
            break
    return out


def fit_ranker(train_events: pd.DataFrame, items: pd.DataFrame, config: CandidateConfig | None = None,
               external: ExternalSource | None = None, log: Callable[[str], None] = lambda _: None,
               windows: list[RankerWindow] | None = None) -> CandidateRanker:
    """Fit the ranker on inner windows of ``train_events`` and the sources on all of them.

    ``external`` (e.g. the two-tower model) is asked for candidates at each window's user
    times and must then use nothing after them; a model trained on all of ``train_events`` leaks
    the window's interactions into its scores (the report records which sources are external).
    ``windows``: ``ranker_windows(train_events, config)`` when the caller computed them already.
    """
    import lightgbm as lgb

    config = config or CandidateConfig()
    _check_frames(train_events, items)
    train_end = pd.to_datetime(train_events["timestamp"], utc=True).max()
    windows_ = ranker_windows(train_events, config) if windows is None else windows
    xs, ys, groups, windows = [], [], [], []
    for w, window in enumerate(windows_, start=1):
        upto, inner = window.events, window.split
        tables = fit_item_tables(inner.train, items, inner.cutoff, config)
        at = window.at
        history = History.from_events(inner.train, pd.Index(tables.item_ids), at, sorted(inner.truth),
                                      config.history_events, config.history_days)
        exclude = purchases(inner.train, pd.Index(tables.item_ids), at, sorted(inner.truth))
        frame = _frame(tables, history, config, external, at, exclude)
        held = upto[~upto.index.isin(inner.train.index)]
        y = labels_for(frame, history, tables.item_ids, held, config.label)
        keep = pd.Series(y).groupby(frame["row"].to_numpy()).transform("max").to_numpy() > 0
        frame, y = frame[keep], y[keep]
        xs.append(frame)
        ys.append(y)
        groups.append(frame.groupby("row", sort=True).size().to_numpy())
        windows.append({"split": inner.name, "cutoff": str(inner.cutoff), "users": int(len(groups[-1])),
                        "rows": int(len(frame)), "positives": int((y > 0).sum()),
                        "candidate_recall": float((y > 0).sum() / max(_n_truth_pairs(inner.truth, tables), 1))})
        log(f"window {w} ({inner.name}): cutoff {inner.cutoff}, {windows[-1]['users']} users, {len(frame)} "
            f"candidates, candidate recall {windows[-1]['candidate_recall']:.3f}")
    if not xs:
        raise ValueError("CandidateRanker.fit: no user has relevant events in any inner window; "
                         f"use a shorter horizon_days than {config.horizon_days} or more data")
    frame = pd.concat(xs, ignore_index=True)
    names = feature_columns(frame, config)
    x = frame[names].to_numpy(dtype="float32")
    y = np.concatenate(ys)
    group = np.concatenate(groups)
    booster = _train_lgb(lgb, x, y, group, names, config)
    tables = fit_item_tables(train_events, items, train_end, config)
    ext_names = sorted({c[:-6] for c in frame.columns if c.endswith("_score")} - set(INTERNAL_SOURCES))
    return CandidateRanker(config, tables, booster, names, ext_names,
               {"windows": windows, "train_end": str(train_end), "features": names})


def refresh_sources(ranker: CandidateRanker, events: pd.DataFrame, items: pd.DataFrame,
                    as_of: pd.Timestamp | None = None) -> CandidateRanker:
    """The same ranker with its sources refitted on ``events`` up to ``as_of`` (default: the
    last event): what to serve after evaluating at an earlier cutoff, as the index is rebuilt
    on the whole catalogue. The LightGBM model is kept as it is."""
    _check_frames(events, items)
    as_of = pd.to_datetime(events["timestamp"], utc=True).max() if as_of is None else as_of
    return CandidateRanker(ranker.config, fit_item_tables(events, items, as_of, ranker.config), ranker.booster,
                           list(ranker.feature_names), list(ranker.external_sources),
                           {**ranker.report, "sources_as_of": str(as_of)})


def purchases(events: pd.DataFrame, catalogue: pd.Index, at: "pd.Timestamp | pd.Series",
              users: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(rows, item codes) of each user's purchases that are never recommended: the feature
    service's ``purchased_items`` rule (the 50 most recent distinct ones within 90 days), read
    from all events, not only the ``history_events`` the sources see."""
    return History.from_events(events, catalogue, at, users).purchased(50, 90.0)


def _frame(tables: ItemTables, history: History, config: CandidateConfig, external: ExternalSource | None,
           at: "pd.Timestamp | pd.Series", exclude: tuple[np.ndarray, np.ndarray]) -> pd.DataFrame:
    cands = source_candidates(tables, history, config)
    if external is not None:
        cands.update(external(history, tables, at))
    return candidate_features(tables, history, cands, config, exclude)


def _check_events(events: pd.DataFrame) -> None:
    missing = [c for c in ("user_id", "item_id", "event_type", "timestamp") if c not in events.columns]
    if missing:
        raise ValueError(f"events: missing column(s) {', '.join(missing)} (docs/architecture.md, data contracts)")
    if events.empty:
        raise ValueError("events: no rows; the candidate ranker needs training events")


def _check_frames(events: pd.DataFrame, items: pd.DataFrame) -> None:
    missing = [c for c in ("user_id", "item_id", "event_type", "timestamp") if c not in events.columns]
    if missing:
        raise ValueError(f"events: missing column(s) {', '.join(missing)} (docs/architecture.md, data contracts)")
    if "item_id" not in items.columns:
        raise ValueError("items: column 'item_id' is required (docs/architecture.md, data contracts)")
    if events.empty:
        raise ValueError("events: no rows; the candidate ranker needs training events")


def _n_truth_pairs(truth: dict[str, set[str]], tables: ItemTables) -> int:
    known = set(tables.item_ids)
    return sum(len(v & known) for v in truth.values())


def _train_lgb(lgb, x: np.ndarray, y: np.ndarray, group: np.ndarray, names: list[str], config: CandidateConfig):
    """LambdaRank with early stopping on 15% of the query groups, then a refit on all of them
    for the best number of rounds."""
    if config.objective not in ("lambdarank", "binary"):
        raise ValueError(f"objective must be 'lambdarank' or 'binary', got {config.objective!r}")
    if config.objective == "binary":
        y = (y > 0).astype("float64")
    params = {"objective": config.objective, "metric": "ndcg", "eval_at": [10], "learning_rate": config.learning_rate,
              "num_leaves": config.num_leaves, "min_data_in_leaf": config.min_child_samples,
              "feature_fraction": 0.8, "bagging_fraction": 0.8, "bagging_freq": 1, "lambdarank_truncation_level": 20,
              "num_threads": 2, "verbose": -1, "seed": 0, "deterministic": True, "force_row_wise": True}
    rng = np.random.default_rng(0)
    val_group = rng.random(len(group)) < 0.15
    row_group = np.repeat(np.arange(len(group)), group)
    val_rows = val_group[row_group]
    train_set = lgb.Dataset(x[~val_rows], y[~val_rows], group=group[~val_group], feature_name=names,
                            free_raw_data=False)
    valid = lgb.Dataset(x[val_rows], y[val_rows], group=group[val_group], reference=train_set)
    probe = lgb.train(params, train_set, num_boost_round=config.n_estimators, valid_sets=[valid],
                      callbacks=[lgb.early_stopping(60, verbose=False)])
    rounds = max(int(probe.best_iteration or config.n_estimators), 10)
    full = lgb.Dataset(x, y, group=group, feature_name=names)
    return lgb.train(params, full, num_boost_round=rounds)


__all__ = ["ExternalSource", "RankerWindow", "fit_item_tables", "fit_ranker", "labels_for", "purchases",
           "ranker_windows", "refresh_sources"]
