"""Offline evaluation: a time split, ranking metrics, and a popularity baseline to beat.

Pure numpy/pandas/torch (no Ray), so the same code scores a model in a unit test, in the
training job and in a quality gate before promotion.

The split is by time, not by random rows: the model must predict what users do *after* the
data it was trained on, as it will in production. The truth is the items users clicked, put in
the cart or bought in the hold-out window (views are too noisy to count as relevant).
"""

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from aiplatform.features.definitions import COUNT_COLUMNS
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel

EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
"""Popularity weight per event type; any other type counts as a view (DESIGN.md)."""
RELEVANT_EVENTS: tuple[str, ...] = ("click", "add_to_cart", "purchase")


def recall_at_k(recommended: Sequence[str], relevant: set[str], k: int) -> float:
    """Share of the relevant items found in the top ``k`` (0.0 when nothing is relevant).

    The denominator is ``len(relevant)``, not ``min(k, len(relevant))``: a user with more
    relevant items than ``k`` cannot reach 1.0, which keeps the metric comparable across k.
    """
    if not relevant or k <= 0:
        return 0.0
    return len(set(list(recommended)[:k]) & relevant) / len(relevant)


def ndcg_at_k(recommended: Sequence[str], relevant: set[str], k: int) -> float:
    """Binary-relevance NDCG@k: DCG of the top ``k`` over the DCG of a perfect top ``k``."""
    if not relevant or k <= 0:
        return 0.0
    dcg = sum(1.0 / np.log2(i + 2) for i, r in _first_hits(list(recommended)[:k], relevant))
    idcg = sum(1.0 / np.log2(i + 2) for i in range(min(k, len(relevant))))
    return float(dcg / idcg)


def _first_hits(top: list[str], relevant: set[str]) -> list[tuple[int, str]]:
    """(position, item) of relevant items, first occurrence only: a repeated hit takes a slot
    of the top k but is not rewarded twice."""
    seen: set[str] = set()
    out = []
    for i, x in enumerate(top):
        if x in relevant and x not in seen:
            seen.add(x)
            out.append((i, x))
    return out


def _weights(event_type: pd.Series) -> np.ndarray:
    return event_type.map(EVENT_WEIGHTS).fillna(EVENT_WEIGHTS["view"]).to_numpy(dtype="float64")


def popularity_ranking(train_events: pd.DataFrame, days: int = 7) -> list[str]:
    """Items by weighted event count over the last ``days`` days of ``train_events``.

    Weights grow along the funnel (purchase > add_to_cart > click > view) so a bought item
    outranks one that is merely looked at. Ties break by item id, so the ranking is stable.
    """
    if train_events.empty:
        return []
    ts = pd.to_datetime(train_events["timestamp"], utc=True)
    recent = train_events[ts > ts.max() - pd.Timedelta(days=days)]
    scores = (
        pd.DataFrame({"item_id": recent["item_id"].astype(str).to_numpy(), "w": _weights(recent["event_type"])})
        .groupby("item_id", sort=False)["w"]
        .sum()
        .reset_index()
        .sort_values(["w", "item_id"], ascending=[False, True], kind="stable")
    )
    return scores["item_id"].tolist()


def split_by_time(
    events: pd.DataFrame, holdout_days: int
) -> tuple[pd.Timestamp, pd.DataFrame, dict[str, set[str]]]:
    """(cutoff, train events, truth) with ``cutoff = max(timestamp) - holdout_days``.

    Events at or before the cutoff are training data; those after it are the hold-out. The
    truth maps each user who has at least one event up to the cutoff (so there is a context
    to recommend from) and at least one click/add_to_cart/purchase after it, to the items of
    those hold-out events.
    """
    if events.empty:
        raise ValueError("split_by_time: no events")
    ts = pd.to_datetime(events["timestamp"], utc=True)
    cutoff = ts.max() - pd.Timedelta(days=holdout_days)
    before = (ts <= cutoff).to_numpy()
    train = events[before]
    after = events[~before]
    after = after[after["event_type"].isin(RELEVANT_EVENTS)]
    known_users = set(train["user_id"].astype(str))
    truth: dict[str, set[str]] = {}
    for user, item in zip(after["user_id"].astype(str), after["item_id"].astype(str), strict=True):
        if user in known_users:
            truth.setdefault(user, set()).add(item)
    return cutoff, train, truth


def _as_list(x) -> list[str]:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return []
    return [str(v) for v in x]


@torch.no_grad()
def score_users(
    model: TwoTowerModel, vocab: ItemVocab, context: pd.DataFrame, k: int, batch_size: int = 1024
) -> list[list[str]]:
    """Top-``k`` item ids per row of ``context`` by exhaustive dot product over the catalogue.

    The padding index and each user's ``purchased_items`` are never recommended.
    """
    model.eval()
    item_vecs = model.all_item_embeddings()  # [n_items + 1, dim]
    n_items = item_vecs.shape[0] - 1
    k_eff = min(k, n_items)
    out: list[list[str]] = []
    for start in range(0, len(context), batch_size):
        chunk = context.iloc[start : start + batch_size]
        counts = chunk.reindex(columns=COUNT_COLUMNS).to_numpy(dtype="float32", na_value=0.0)
        hist, dense = vocab.encode_users([_as_list(x) for x in chunk["last_items"]], counts)
        scores = model.user_embedding(hist, dense) @ item_vecs.T  # [B, n_items + 1]
        scores[:, 0] = float("-inf")
        if "purchased_items" in chunk.columns:
            for row, bought in enumerate(chunk["purchased_items"]):
                idx = vocab.indices(_as_list(bought))
                idx = idx[idx > 0]
                if len(idx):
                    scores[row, torch.from_numpy(idx)] = float("-inf")
        top = torch.topk(scores, k_eff, dim=1)
        for idx_row, score_row in zip(top.indices.numpy(), top.values.numpy(), strict=True):
            # -inf means excluded: a user who bought almost everything gets fewer than k
            out.append([vocab.item_ids[i - 1] for i, s in zip(idx_row, score_row, strict=True) if np.isfinite(s)])
    return out


def evaluate_model(
    model: TwoTowerModel,
    vocab: ItemVocab,
    context: pd.DataFrame,
    truth: dict[str, set[str]],
    popular: list[str],
    k: int = 10,
) -> dict:
    """Mean recall@k and NDCG@k of the model and of the popularity baseline.

    Only users present in both ``context`` and ``truth`` are scored, and both rankers get the
    same treatment (already purchased items removed), so the comparison is fair.
    """
    ctx = context.copy()
    ctx["user_id"] = ctx["user_id"].astype(str)
    ctx = ctx[ctx["user_id"].isin(truth.keys())].drop_duplicates("user_id", keep="last")
    names = (f"recall@{k}", f"ndcg@{k}")
    empty = {names[0]: 0.0, names[1]: 0.0}
    if ctx.empty:
        return {"model": dict(empty), "popularity": dict(empty), "users": 0}

    model_recs = score_users(model, vocab, ctx, k)
    m_recall, m_ndcg, p_recall, p_ndcg = [], [], [], []
    bought_col = ctx["purchased_items"] if "purchased_items" in ctx.columns else [None] * len(ctx)
    for user, recs, bought in zip(ctx["user_id"], model_recs, bought_col, strict=True):
        relevant = truth[user]
        exclude = set(_as_list(bought))
        pop = [i for i in popular if i not in exclude][:k]
        m_recall.append(recall_at_k(recs, relevant, k))
        m_ndcg.append(ndcg_at_k(recs, relevant, k))
        p_recall.append(recall_at_k(pop, relevant, k))
        p_ndcg.append(ndcg_at_k(pop, relevant, k))
    return {
        "model": {names[0]: float(np.mean(m_recall)), names[1]: float(np.mean(m_ndcg))},
        "popularity": {names[0]: float(np.mean(p_recall)), names[1]: float(np.mean(p_ndcg))},
        "users": len(ctx),
    }


__all__ = [
    "evaluate_model",
    "ndcg_at_k",
    "popularity_ranking",
    "recall_at_k",
    "score_users",
    "split_by_time",
]
