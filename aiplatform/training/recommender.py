"""The served recommender at training time: fit its candidate ranker, evaluate the whole pipeline.

What is served is a pipeline, so what is evaluated is that pipeline: the two-tower model's
candidates next to the fitted sources (co-occurrence, EASE, popularity, category x popularity,
the user's own items), merged and ordered by the LightGBM ranker (``models.candidates``). The
evaluation scores it, the two-tower alone and every baseline (popularity, co-occurrence, EASE)
on the same validation users with the same exclusions, and calls a win only when the per-user
paired difference is more than two standard errors (``baselines.paired_difference``): a mean
ahead by noise on a few users is not a win.

The two-tower source reads each user's feature row at the time (``TwoTowerSource``: a context
frame per cutoff from the job's one point-in-time join). Its model is the one trained on all
training events, so its scores at the ranker's inner windows are optimistic (it saw those
weeks): measured on the shop, the ranker loses nothing by it (benchmarks/candidates.py).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from aiplatform.models.candidates import CandidateConfig, CandidateRanker, Cands, History, ItemTables
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel
from aiplatform.training.baselines import Ease, EaseTooLarge, paired_difference
from aiplatform.training.candidates import purchases
from aiplatform.training.evaluate import (
    CooccurrenceBaseline,
    _ranker_metrics,
    input_spec,
    popularity_ranking,
    recall_at_k,
    ndcg_at_k,
    score_users,
)
from aiplatform.training.split import EvalSplit

BASELINES = ("popularity", "cooccurrence", "ease")
TWO_TOWER = "two_tower"


@dataclass
class TwoTowerSource:
    """The two-tower model as a candidate source: each user's top ``depth`` items, scored from
    their feature row at the time they are seen. ``contexts`` holds those rows (``user_id``,
    ``event_timestamp``: the time of the row's lookup, and the model's input columns), for every
    (user, time) the job asks about, from its one point-in-time join."""

    model: TwoTowerModel
    vocab: ItemVocab
    depth: int
    contexts: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["user_id", "event_timestamp"]))

    def __post_init__(self) -> None:
        ctx = self.contexts.assign(user_id=self.contexts["user_id"].astype(str))
        ctx["_at"] = _micros(ctx["event_timestamp"])
        self.contexts = ctx.drop_duplicates(["user_id", "_at"], keep="last").set_index(["user_id", "_at"])

    def __call__(self, history: History, tables: ItemTables, at: "pd.Timestamp | pd.Series") -> dict[str, Cands]:
        ids, scores = self.lists(history.users, at)
        return {TWO_TOWER: CandidateRanker(CandidateConfig(), tables).external_candidates(ids, scores)}

    def rows(self, users: Sequence[str], at: "pd.Timestamp | pd.Series") -> pd.DataFrame:
        """The feature rows of ``users`` at ``at`` (one time, or a Series user_id -> time), in
        order; users without one are left out."""
        users = [str(u) for u in users]
        times = (at.reindex(users) if isinstance(at, pd.Series) else pd.Series(at, index=users, dtype=object))
        keys = pd.MultiIndex.from_arrays([users, _micros(times)])
        found = keys[keys.isin(self.contexts.index)]
        return self.contexts.loc[found].reset_index().drop(columns="_at")

    def lists(self, users: np.ndarray, at: "pd.Timestamp | pd.Series") -> tuple[list[list[str]], list[list[float]]]:
        """Per user (in order): the model's top items and scores; users without a row get none."""
        rows = self.rows(users, at)
        ids: list[list[str]] = [[] for _ in users]
        scores: list[list[float]] = [[] for _ in users]
        if len(rows):
            got_ids, got_scores = score_users(self.model, self.vocab, rows, self.depth, with_scores=True)
            where = {str(u): i for i, u in enumerate(users)}
            for u, i_, s_ in zip(rows["user_id"], got_ids, got_scores, strict=True):
                ids[where[u]], scores[where[u]] = i_, s_
        return ids, scores


def _micros(times) -> np.ndarray:
    """UTC microseconds of each time: the exact key a feature row was looked up with."""
    return pd.to_datetime(pd.Series(list(times), dtype=object), utc=True).dt.as_unit("us").astype("int64").to_numpy()


def fit_ease(train_events: pd.DataFrame, catalogue: pd.Index, holdout_days: int,
             log: Callable[[str], None] = lambda _: None) -> Ease | None:
    """EASE with lambda chosen on the training side, or None (with a message) when the
    catalogue is too large for a dense item-item matrix."""
    try:
        ease = Ease.fit_select(train_events, holdout_days, item_ids=list(catalogue))
    except EaseTooLarge as exc:
        log(str(exc))
        return None
    log(f"EASE: lambda {ease.lam:g} chosen on the training side ({ease.selection['inner_users']} inner users)")
    return ease


def evaluate_recommender(ranker: CandidateRanker | None, two_tower: TwoTowerSource, split: EvalSplit,
                         ease: Ease | None, k: int = 10, k_large: int = 50) -> dict:
    """Metrics of the served pipeline (``model``), the two-tower alone and every baseline.

    One set of validation users (in ``split.truth``, with a feature row at their cutoff), one
    exclusion rule for every ranker (each user's purchases, as serving excludes them), the
    history the sources read built with the ranker's own limits. ``paired`` holds, per baseline,
    the per-user difference of recall@k and NDCG@k with its standard error; ``beats_baselines``
    says per baseline whether the model is ahead by more than two standard errors on both.
    ``ranker=None``: the model is the two-tower alone.
    """
    at_all = split.user_cutoffs if split.kind == "per_user" else split.cutoff
    ctx = two_tower.rows(sorted(split.truth), at_all)
    users = list(ctx["user_id"])
    if not users:
        raise ValueError("no validation user has a feature row at the cutoff: nothing to evaluate")
    at = split.user_cutoffs.reindex(users) if split.kind == "per_user" else split.cutoff
    relevant = [split.truth[u] for u in users]
    catalogue = pd.Index(two_tower.vocab.item_ids) if ranker is None else pd.Index(ranker.tables.item_ids)
    ex_rows, ex_items = purchases(split.train, catalogue, at, users)
    exclude: list[set[str]] = [set() for _ in users]
    for r, i in zip(ex_rows, ex_items, strict=True):
        exclude[r].add(str(catalogue[i]))
    depth = max(k, k_large)
    recs: dict[str, list[list[str]]] = {}
    tt_ids, _ = two_tower.lists(np.asarray(users, dtype=object), at)
    recs[TWO_TOWER] = [[i for i in ids if i not in ex][:depth] for ids, ex in zip(tt_ids, exclude, strict=True)]
    if ranker is not None:
        cfg = ranker.config
        history = History.from_events(split.train, catalogue, at, users, cfg.history_events, cfg.history_days)
        external = two_tower(history, ranker.tables, at) if TWO_TOWER in ranker.external_sources else None
        recs["model"] = ranker.recommend(history, depth, external=external, exclude=(ex_rows, ex_items))
    else:
        recs["model"] = recs[TWO_TOWER]
    popular = popularity_ranking(split.train)
    recs["popularity"] = [[i for i in popular if i not in ex][:depth] for ex in exclude]
    histories = input_spec(two_tower.model).histories(ctx)
    recs["cooccurrence"] = CooccurrenceBaseline.fit(split.train, popular).recommend(histories, exclude, depth)
    if ease is not None:
        recs["ease"] = ease.recommend(histories, exclude, depth)
    n_items = len(catalogue)
    out: dict = {name: _ranker_metrics(r, relevant, k, k_large, n_items) for name, r in recs.items()}
    out["users"] = len(users)
    per_user = {name: _per_user(r, relevant, k) for name, r in recs.items()}
    out["paired"], out["beats_baselines"] = {}, {}
    for base in [b for b in BASELINES if b in recs]:
        out["paired"][base] = {}
        for metric in (f"recall@{k}", f"ndcg@{k}"):
            mean, se = paired_difference(per_user["model"][metric], per_user[base][metric])
            out["paired"][base][metric] = {"difference": mean, "se": se,
                                           "beats_by_2se": bool(np.isfinite(se) and mean > 2 * se)}
        out["beats_baselines"][base] = all(v["beats_by_2se"] for v in out["paired"][base].values())
    return out


def _per_user(recs: list[list[str]], relevant: list[set[str]], k: int) -> dict[str, np.ndarray]:
    return {f"recall@{k}": np.array([recall_at_k(r, t, k) for r, t in zip(recs, relevant, strict=True)]),
            f"ndcg@{k}": np.array([ndcg_at_k(r, t, k) for r, t in zip(recs, relevant, strict=True)])}


def verdict_lines(metrics: dict, k: int = 10) -> list[str]:
    """One plain sentence per baseline: does the served model beat it, by how much, how sure."""
    lines = []
    m = metrics["model"]
    for base, won in metrics.get("beats_baselines", {}).items():
        b = metrics[base]
        p = metrics["paired"][base]
        r, n = p[f"recall@{k}"], p[f"ndcg@{k}"]
        lines.append(
            f"{'beats' if won else 'does NOT beat'} {base}: recall@{k} {m[f'recall@{k}']:.4f} vs "
            f"{b[f'recall@{k}']:.4f} ({r['difference']:+.4f} +/- {r['se']:.4f}), NDCG@{k} "
            f"{m[f'ndcg@{k}']:.4f} vs {b[f'ndcg@{k}']:.4f} ({n['difference']:+.4f} +/- {n['se']:.4f})"
            + ("" if won else "; not ahead by two standard errors on both"))
    return lines


__all__ = ["BASELINES", "TWO_TOWER", "TwoTowerSource", "evaluate_recommender", "fit_ease", "verdict_lines"]
