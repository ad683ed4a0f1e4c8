"""An evaluation split that works on any data: a global time split when it leaves enough
validation users, otherwise the last fraction of each user's events.

Why two kinds. A global time split (the last ``holdout_days`` held out) is the honest one: the
model predicts what happens after the data it saw, exactly as in production, and every ranker
sees one shared past. But it assumes activity is spread evenly over time. A real data set that
spans years with a quiet last week leaves a handful of validation users (11 on one ratings
data set), and a gate decided on 11 users is noise. The per-user split (a user's last
``holdout_fraction`` of events held out, their earlier events kept for training) always has
every user with two or more events, at the price of a blurred global timeline: another user's
training events may come after this user's cutoff. Both kinds keep the essential rule per
user: every training event of a user precedes that user's cutoff, and the truth is what the
user clicked, put in the cart or bought after it.

``min_users`` is the bar for the time split: it is used when it yields at least
``min(min_users, all users)`` validation users; a data set with fewer users than the minimum
must then put *all* of them in validation, which in practice means the per-user split.

Pure pandas/numpy (no Ray), like ``training.evaluate``.
"""

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from aiplatform.training.evaluate import RELEVANT_EVENTS, split_by_time

DEFAULT_MIN_USERS = 500
DEFAULT_HOLDOUT_FRACTION = 0.2


@dataclass
class EvalSplit:
    """One evaluation split: what the report names, what training sees, what is scored.

    ``cutoff`` is the global cutoff of a time split; for a per-user split it is the latest of
    the per-user cutoffs (a summary: use ``user_cutoffs`` for point-in-time features).
    ``user_cutoffs`` maps every validation user to the time of their last training event
    boundary: their features must be computed from events at or before it (time split: the
    global cutoff for everyone).
    """

    kind: str  # "time" | "per_user"
    name: str  # "time: last 7 days" | "per-user: last 20% of each user's events"
    cutoff: pd.Timestamp
    train: pd.DataFrame
    truth: dict[str, set[str]]
    user_cutoffs: pd.Series  # user_id (index) -> UTC timestamp; validation users only
    holdout_days: int | None = None
    holdout_fraction: float | None = None
    reason: str = ""
    details: dict = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        """Validation users: users with a context before their cutoff and a relevant event after it."""
        return len(self.truth)

    def summary(self) -> dict:
        """JSON-friendly description for reports and the registry (no frames)."""
        return {"kind": self.kind, "name": self.name, "cutoff": str(self.cutoff), "users": self.n_users,
                "holdout_days": self.holdout_days, "holdout_fraction": self.holdout_fraction,
                "reason": self.reason, **self.details}


def _check_events(events: pd.DataFrame) -> None:
    missing = [c for c in ("user_id", "item_id", "event_type", "timestamp") if c not in events.columns]
    if missing:
        raise ValueError(f"events: missing column(s) {', '.join(missing)}; the split needs user_id, item_id, "
                         "event_type and timestamp (docs/architecture.md, data contracts)")
    if events.empty:
        raise ValueError("events: no rows to split; import events first")


def time_split(events: pd.DataFrame, holdout_days: int) -> EvalSplit:
    """The global time split of ``training.evaluate.split_by_time`` as an ``EvalSplit``."""
    _check_events(events)
    cutoff, train, truth = split_by_time(events, holdout_days)
    users = sorted(truth)
    return EvalSplit(kind="time", name=f"time: last {holdout_days} days", cutoff=cutoff, train=train, truth=truth,
                     user_cutoffs=pd.Series(cutoff, index=pd.Index(users, name="user_id"), dtype=object),
                     holdout_days=holdout_days)


def per_user_split(events: pd.DataFrame, holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> EvalSplit:
    """Hold out the last ``holdout_fraction`` of each user's events (at least one, never all).

    Only users with two or more events are split; the others stay whole in training. A user's
    cutoff is the timestamp of their last training event; events at exactly that timestamp stay
    in training too, so every training event of a user is at or before their cutoff and every
    held-out one strictly after it (a user whose events all share one timestamp is not split).
    """
    _check_events(events)
    if not 0.0 < holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
    ts = pd.to_datetime(events["timestamp"], utc=True)
    user = events["user_id"].astype(str).to_numpy(dtype=object)
    order = np.lexsort((np.arange(len(events)), ts.to_numpy(), user))  # by user, then time, stable
    u_sorted = user[order]
    t_sorted = ts.to_numpy()[order]
    starts = np.flatnonzero(np.r_[True, u_sorted[1:] != u_sorted[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    n_hold = np.where(sizes >= 2, np.clip(np.ceil(sizes * holdout_fraction).astype(np.int64), 1, sizes - 1), 0)
    # the cutoff is the last training event's time; ties with it are training data
    last_train = starts + sizes - n_hold - 1
    cut_of_user = t_sorted[last_train]
    user_cut = np.repeat(cut_of_user, sizes)
    split_user = np.repeat(n_hold > 0, sizes)
    held_sorted = split_user & (t_sorted > user_cut)
    held = np.zeros(len(events), bool)
    held[order] = held_sorted
    train = events[~held]
    after = events[held & events["event_type"].isin(RELEVANT_EVENTS).to_numpy()]
    truth: dict[str, set[str]] = {}
    for u, item in zip(after["user_id"].astype(str), after["item_id"].astype(str), strict=True):
        truth.setdefault(u, set()).add(item)
    cutoffs = pd.Series(pd.to_datetime(cut_of_user, utc=True), index=pd.Index(u_sorted[starts], name="user_id"))
    cutoffs = cutoffs[cutoffs.index.isin(list(truth))].sort_index()
    pct = f"{holdout_fraction * 100:g}%"
    return EvalSplit(kind="per_user", name=f"per-user: last {pct} of each user's events",
                     cutoff=cutoffs.max() if len(cutoffs) else ts.max(), train=train, truth=truth,
                     user_cutoffs=cutoffs.astype(object), holdout_fraction=holdout_fraction)


def adaptive_split(events: pd.DataFrame, holdout_days: int = 7, min_users: int = DEFAULT_MIN_USERS,
                   holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> EvalSplit:
    """The time split when it leaves ``min(min_users, all users)`` validation users, else the
    per-user split; ``reason`` says which and why (the report prints it)."""
    _check_events(events)
    if holdout_days < 1:
        raise ValueError(f"holdout_days must be >= 1, got {holdout_days}")
    if min_users < 1:
        raise ValueError(f"min_users must be >= 1, got {min_users}")
    n_all = int(events["user_id"].astype(str).nunique())
    need = min(min_users, n_all)
    timed = time_split(events, holdout_days)
    if timed.n_users >= need:
        timed.reason = (f"the last {holdout_days} days leave {timed.n_users} validation users "
                        f"(>= {need}: min_users {min_users}, {n_all} users in all)")
        timed.details = {"min_users": min_users, "all_users": n_all}
        return timed
    per_user = per_user_split(events, holdout_fraction)
    per_user.reason = (f"the last {holdout_days} days leave only {timed.n_users} validation users "
                       f"(< {need}: min_users {min_users}, {n_all} users in all); the per-user split "
                       f"leaves {per_user.n_users}")
    per_user.details = {"min_users": min_users, "all_users": n_all, "time_split_users": timed.n_users}
    return per_user


__all__ = ["DEFAULT_HOLDOUT_FRACTION", "DEFAULT_MIN_USERS", "EvalSplit", "adaptive_split", "per_user_split",
           "time_split"]
