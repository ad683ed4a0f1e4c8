"""EASE, the strongest simple baseline, and the paired per-user comparison used to call a win.

EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019) is an item-item
model with a closed form: with X the user x item interaction matrix and
``P = (X^T X + lambda I)^-1``, the weights are ``B = I - P / diag(P)`` (column-wise), i.e.
``B[i, j] = -P[i, j] / P[j, j]`` off the diagonal and 0 on it. A user's scores are ``x_u B``.
On public data sets it matches or beats far larger models, and on real ratings data it beat
this project's served system by about two standard errors: a recommender that does not beat
it is not worth serving.

Memory bounds where it applies: the Gram matrix and its inverse are dense n x n, so EASE runs
only up to ``MAX_EASE_ITEMS`` items (30,000: two float32 30k x 30k matrices are 7.2 GB, and one
inversion is about 10^13 flops). Above it ``Ease.fit`` raises ``EaseTooLarge`` and callers skip
the baseline with that message. Up to ``FLOAT64_MAX_ITEMS`` the algebra runs in float64.

``lambda`` is chosen on the training side only (``Ease.fit_select``): the training events are
split by time once more, each lambda of a grid is fitted on the inner training part and scored
by recall@k on the inner hold-out, and the winner is refitted on all training events. The
evaluation's truth is never an argument, so it cannot leak into the choice.

``paired_difference`` is the significance check the issue asks for: per-user metric
differences between two rankers on the same users, their mean and its standard error.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from aiplatform.training.evaluate import EVENT_WEIGHTS, recall_at_k, split_by_time

MAX_EASE_ITEMS = 30_000
FLOAT64_MAX_ITEMS = 10_000
DEFAULT_LAMBDAS: tuple[float, ...] = (10.0, 50.0, 200.0, 500.0, 1000.0, 3000.0)
WEIGHTINGS = ("binary", "funnel", "log_funnel")


class EaseTooLarge(ValueError):
    """The catalogue is too large for a dense item-item matrix: skip the EASE baseline."""


def interaction_matrix(events: pd.DataFrame, item_ids: Sequence[str], users: Sequence[str],
                       weighting: str = "binary") -> sparse.csr_matrix:
    """Sparse [users, items] matrix (CSR, float64) of ``events`` over the given users and item ids.

    ``binary``: 1 when the user touched the item at all (Steck's setting); ``funnel``: the sum
    of the event weights (view 1, click 2, add_to_cart 4, purchase 8, as in popularity);
    ``log_funnel``: ``log1p`` of that sum, so one item viewed 30 times does not dominate.
    Events of other users or items are ignored.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}, got {weighting!r}")
    rows = pd.Index(list(users)).get_indexer(events["user_id"].astype(str))
    cols = pd.Index(list(item_ids)).get_indexer(events["item_id"].astype(str))
    ok = (rows >= 0) & (cols >= 0)
    w = events["event_type"].map(EVENT_WEIGHTS).fillna(EVENT_WEIGHTS["view"]).to_numpy(dtype="float64")
    out = sparse.csr_matrix((w[ok], (rows[ok], cols[ok])), shape=(len(users), len(item_ids)))
    out.sum_duplicates()
    if weighting == "binary":
        out.data = (out.data > 0).astype("float64")
    elif weighting == "log_funnel":
        out.data = np.log1p(out.data)
    return out


def ease_weights(x: "np.ndarray | sparse.spmatrix", lam: float) -> np.ndarray:
    """``B = I - P / diag(P)`` with ``P = (X^T X + lam I)^-1`` (zero diagonal), for X [users, items]."""
    if lam <= 0:
        raise ValueError(f"lambda must be > 0, got {lam}")
    n = x.shape[1]
    if n > MAX_EASE_ITEMS:
        raise EaseTooLarge(f"EASE skipped: {n} items > {MAX_EASE_ITEMS} (a dense {n} x {n} item-item matrix "
                           "does not fit in memory)")
    dtype = np.float64 if n <= FLOAT64_MAX_ITEMS else np.float32
    xs = sparse.csr_matrix(x, dtype=dtype)
    g = np.asarray((xs.T @ xs).toarray(), dtype=dtype)
    g[np.diag_indices(n)] += lam
    p = np.linalg.inv(g)
    b = -p / np.diag(p)[None, :]
    b[np.diag_indices(n)] = 0.0
    return b


@dataclass
class Ease:
    """A fitted EASE model: item ids and their dense weight matrix B [items, items]."""

    item_ids: np.ndarray
    weights: np.ndarray
    lam: float
    weighting: str = "binary"
    selection: dict = field(default_factory=dict)  # how lambda was chosen (fit_select)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def fit(cls, events: pd.DataFrame, lam: float, weighting: str = "binary",
            item_ids: Sequence[str] | None = None) -> "Ease":
        """Fit on ``events``; ``item_ids`` fixes the catalogue (default: the items in ``events``).

        Raises ``EaseTooLarge`` above ``MAX_EASE_ITEMS`` items, before any large allocation.
        """
        ids = np.asarray(sorted(set(events["item_id"].astype(str))) if item_ids is None else
                         [str(i) for i in item_ids], dtype=object)
        if len(ids) > MAX_EASE_ITEMS:
            raise EaseTooLarge(f"EASE skipped: {len(ids)} items > {MAX_EASE_ITEMS} (a dense item-item matrix "
                               "does not fit in memory)")
        users = sorted(set(events["user_id"].astype(str)))
        x = interaction_matrix(events, ids, users, weighting)
        return cls(ids, ease_weights(x, lam), float(lam), weighting)

    @classmethod
    def fit_select(cls, train_events: pd.DataFrame, holdout_days: int = 7,
                   lambdas: Sequence[float] = DEFAULT_LAMBDAS, weighting: str = "binary", k: int = 10,
                   item_ids: Sequence[str] | None = None) -> "Ease":
        """Choose lambda on ``train_events`` alone, then refit on all of them.

        The inner split is ``split_by_time(train_events, holdout_days)``: each lambda is fitted
        on the inner training part, users are scored from their inner-training rows (their
        purchases excluded, as in the evaluation) and recall@k on the inner hold-out picks the
        winner; ties go to the larger lambda (the smoother model). ``selection`` records the grid.
        """
        if not lambdas:
            raise ValueError("lambdas: give at least one candidate value")
        ids = np.asarray(sorted(set(train_events["item_id"].astype(str))) if item_ids is None else
                         [str(i) for i in item_ids], dtype=object)
        if len(ids) > MAX_EASE_ITEMS:
            raise EaseTooLarge(f"EASE skipped: {len(ids)} items > {MAX_EASE_ITEMS} (a dense item-item matrix "
                               "does not fit in memory)")
        inner_cutoff, inner_train, inner_truth = split_by_time(train_events, holdout_days)
        users = sorted(inner_truth)
        scores: dict[float, float] = {}
        if users:
            all_users = sorted(set(inner_train["user_id"].astype(str)))
            x_all = interaction_matrix(inner_train, ids, all_users, weighting)
            x_val = x_all[pd.Index(all_users).get_indexer(users)]  # sparse rows
            exclude = _purchases(inner_train, users)
            for lam in lambdas:
                model = cls(ids, ease_weights(x_all, lam), float(lam), weighting)
                recs = model.recommend_rows(x_val, exclude, k)
                scores[float(lam)] = float(np.mean([recall_at_k(r, inner_truth[u], k)
                                                    for r, u in zip(recs, users, strict=True)]))
            best = max(scores, key=lambda lam_: (scores[lam_], lam_))
        else:  # no inner validation users: the middle of the grid
            best = float(sorted(lambdas)[len(lambdas) // 2])
        fitted = cls.fit(train_events, best, weighting, ids)
        fitted.selection = {"inner_cutoff": str(inner_cutoff), "inner_users": len(users),
                            f"inner_recall@{k}": {str(lam): s for lam, s in scores.items()}, "lambda": best}
        return fitted

    # ---- scoring --------------------------------------------------------------------------------
    def user_rows(self, events: pd.DataFrame, users: Sequence[str]) -> sparse.csr_matrix:
        """[users, items] input rows of ``users`` from their ``events`` (the fit's weighting)."""
        return interaction_matrix(events, self.item_ids, [str(u) for u in users], self.weighting)

    def history_rows(self, histories: Sequence[Sequence[str]]) -> sparse.csr_matrix:
        """[B, items] binary rows from item lists (e.g. a feature service's ``last_items``)."""
        lengths = [len(h) for h in histories]
        idx = pd.Index(self.item_ids).get_indexer([str(x) for h in histories for x in h]) if sum(lengths) \
            else np.zeros(0, np.int64)
        rows = np.repeat(np.arange(len(histories)), lengths)
        ok = idx >= 0
        out = sparse.csr_matrix((np.ones(int(ok.sum())), (rows[ok], idx[ok])), shape=(len(histories), self.n_items))
        out.data[:] = 1.0  # an item listed twice is still one interaction
        return out

    def scores(self, rows: "np.ndarray | sparse.spmatrix") -> np.ndarray:
        """[B, items] EASE scores ``rows @ B``."""
        if sparse.issparse(rows):
            return np.asarray(rows.astype(self.weights.dtype) @ self.weights)
        return np.asarray(rows, dtype=self.weights.dtype) @ self.weights

    def recommend_rows(self, rows: "np.ndarray | sparse.spmatrix", exclude: Sequence[set[str]], k: int,
                       batch_size: int = 1024) -> list[list[str]]:
        """Top-``k`` item ids per input row, never an item of that row's ``exclude`` set."""
        index = pd.Index(self.item_ids)
        out: list[list[str]] = []
        k_eff = min(k, self.n_items)
        for s in range(0, rows.shape[0], batch_size):
            sc = self.scores(rows[s:s + batch_size]).astype("float64")
            for r, ex in enumerate(exclude[s:s + batch_size]):
                idx = index.get_indexer(list(ex))
                sc[r, idx[idx >= 0]] = -np.inf
            if k_eff <= 0:
                out += [[] for _ in range(len(sc))]
                continue
            top = np.argpartition(-sc, k_eff - 1, axis=1)[:, :k_eff]
            for r, cand in enumerate(top):
                cand = cand[np.lexsort((cand, -sc[r, cand]))]
                out.append([self.item_ids[c] for c in cand if np.isfinite(sc[r, c])])
        return out

    def recommend(self, histories: Sequence[Sequence[str]], exclude: Sequence[set[str]], k: int) -> list[list[str]]:
        """Like ``CooccurrenceBaseline.recommend``: top-``k`` from item histories (binary rows)."""
        return self.recommend_rows(self.history_rows(histories), exclude, k)

    def neighbours(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """([items, n] column indices, [items, n] weights): each item's ``n`` largest B entries.

        What serving keeps instead of the dense matrix: a user's score for ``j`` is the sum of
        ``B[i, j]`` over the user's items ``i``, so truncating each row to its largest entries
        keeps the candidates that matter at O(items x n) memory.
        """
        n = min(n, self.n_items)
        w = self.weights.copy()
        w[np.diag_indices(self.n_items)] = -np.inf
        top = np.argpartition(-w, n - 1, axis=1)[:, :n]
        vals = np.take_along_axis(w, top, axis=1)
        order = np.argsort(-vals, axis=1, kind="stable")
        return np.take_along_axis(top, order, axis=1), np.take_along_axis(vals, order, axis=1)


def _purchases(events: pd.DataFrame, users: Sequence[str]) -> list[set[str]]:
    bought = events[events["event_type"] == "purchase"]
    by_user = bought.groupby(bought["user_id"].astype(str))["item_id"].agg(lambda s: set(map(str, s)))
    return [set(by_user.get(u, set())) for u in users]


def paired_difference(model_scores: Sequence[float], baseline_scores: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error) of the per-user difference ``model - baseline``.

    Both sequences hold one metric value per user, for the same users in the same order (e.g.
    recall@10 of each validation user). The standard error is ``std(d, ddof=1) / sqrt(n)``:
    pairing removes the between-user variance both rankers share, so a win of more than two
    standard errors is unlikely to be noise. One user gives an undefined error (nan).
    """
    m = np.asarray(model_scores, dtype="float64")
    b = np.asarray(baseline_scores, dtype="float64")
    if m.shape != b.shape or m.ndim != 1:
        raise ValueError(f"paired_difference: model_scores and baseline_scores must be 1-d and equally long "
                         f"(one value per user), got shapes {m.shape} and {b.shape}")
    if len(m) == 0:
        raise ValueError("paired_difference: no users to compare")
    d = m - b
    se = float(np.std(d, ddof=1) / np.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def per_user_metrics(recs: Sequence[Sequence[str]], relevant: Sequence[set[str]], k: int) -> dict[str, np.ndarray]:
    """Per-user recall@k and NDCG@k arrays (inputs of ``paired_difference``)."""
    from aiplatform.training.evaluate import ndcg_at_k

    return {f"recall@{k}": np.array([recall_at_k(r, t, k) for r, t in zip(recs, relevant, strict=True)]),
            f"ndcg@{k}": np.array([ndcg_at_k(r, t, k) for r, t in zip(recs, relevant, strict=True)])}


def beats_by_two_se(model_scores: Sequence[float], baseline_scores: Sequence[float]) -> tuple[bool, str]:
    """(verdict, sentence): does the model beat the baseline by more than two paired standard errors?"""
    mean, se = paired_difference(model_scores, baseline_scores)
    ok = bool(np.isfinite(se) and mean > 2 * se)
    z = mean / se if se and np.isfinite(se) and se > 0 else float("nan")
    return ok, (f"difference {mean:+.4f} +/- {se:.4f} (z = {z:.1f}): "
                + ("beats it by more than two standard errors" if ok else "does NOT beat it by two standard errors"))


__all__ = ["DEFAULT_LAMBDAS", "Ease", "EaseTooLarge", "MAX_EASE_ITEMS", "beats_by_two_se", "ease_weights",
           "interaction_matrix", "paired_difference", "per_user_metrics"]
