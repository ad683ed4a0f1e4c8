"""Is a variant better than control, and may we look at the answer every day?

People look at a running experiment's report again and again and stop when it looks good. A
fixed-sample z-test read that way finds "significant" differences between identical variants
far more often than its alpha says (20 looks at alpha 0.05: about one A/A experiment in four).
The comparison here is therefore *always valid*: a mixture sequential probability ratio test
(Johari et al. 2017, "Peeking at A/B tests"; Howard et al. 2021, "Time-uniform, nonparametric,
nonasymptotic confidence sequences"), whose p-value and confidence sequence keep their
guarantee whenever, and however often, the report is read.

For a metric with rates ``p1`` (variant) and ``p0`` (control) after ``n1`` and ``n0``
exposures, ``d = p1 - p0`` and ``V = p1(1-p1)/n1 + p0(1-p0)/n0``. Mixing the likelihood ratio
of a normal effect over a N(0, tau^2) prior gives

    Lambda = sqrt(V / (V + tau^2)) * exp(tau^2 d^2 / (2 V (V + tau^2)))

a (asymptotically) nonnegative martingale under "no difference", so by Ville's inequality
``p = min(1, 1/Lambda)``, kept as a running minimum over the looks, is below alpha with
probability at most alpha over the whole experiment. Inverting it gives the confidence
sequence ``d +- sqrt(V (V + tau^2) / tau^2 * (log((V + tau^2) / V) + 2 log(1/alpha)))``; the
one reported is the intersection over the looks (each is valid at all times at once, so their
intersection is too). The p-value crosses alpha exactly when that interval leaves 0.

Looks: exposures are taken in time order (``at``) and the test is evaluated after every
``look_every`` of them (of the two variants compared) and at the end. Each exposure is one
unit whose outcome is whether any event of the metric carried its request id; a late event
simply counts for its exposure.

tau (``DEFAULT_TAU``): the spread of absolute lifts we expect. It decides *when* the test is
most sensitive, never whether it is valid: the confidence sequence is narrowest where
``V ~= tau^2 / 8.2`` (for alpha 0.05; Howard et al. 2021, section 3.5). The defaults are
absolute lifts of about 10-20 % of typical shop rates (click ~10 %, add-to-cart ~3-5 %,
purchase ~1-2 % of recommendation requests), which puts that point at a few thousand
exposures per variant, the size of a day or two of a small shop's traffic. A fixed number
is chosen on purpose: a tau fitted to the data being tested would void the guarantee.

Caveats, said where they matter: units are requests, and requests of one user are
correlated, so with heavy repeat users the p-values are somewhat optimistic; a ramp whose
weights change over time (a canary) compares variants over different periods. Exposures of
every status count (intention to treat): a variant that errors pays for it in its rates.
"""

from dataclasses import dataclass, field
from datetime import datetime, timezone
from math import log, sqrt
from statistics import NormalDist
from typing import Any

import numpy as np
import pandas as pd

# metric -> the event types that count as a conversion for it
METRICS: dict[str, tuple[str, ...]] = {
    "click": ("click",),
    "cart": ("add_to_cart", "cart"),
    "purchase": ("purchase",),
}
DEFAULT_TAU: dict[str, float] = {"click": 0.02, "cart": 0.01, "purchase": 0.005}
ERROR_STATUSES = ("degraded", "error")


@dataclass(frozen=True)
class MetricStats:
    """One metric of one variant; the ``vs control`` fields are None for the control itself."""

    metric: str
    conversions: int
    rate: float
    ci: tuple[float, float]
    difference: float | None = None
    cs: tuple[float, float] | None = None
    p_value: float | None = None
    verdict: str | None = None  # "better", "worse" or "no difference yet"


@dataclass(frozen=True)
class VariantStats:
    variant: str
    is_control: bool
    exposures: int
    users: int
    metrics: dict[str, MetricStats] = field(default_factory=dict)


def wilson_interval(successes: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The (1 - alpha) Wilson score interval of a proportion: unlike p +- z se it stays inside
    [0, 1] and keeps its coverage at small counts and rates near 0 (purchases)."""
    if n <= 0:
        return 0.0, 1.0
    z = float(NormalDist().inv_cdf(1 - alpha / 2))  # the standard library: no scipy import on a replica
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes <= 0 else max(0.0, centre - half)  # exact at the ends, not 1e-18
    hi = 1.0 if successes >= n else min(1.0, centre + half)
    return lo, hi


def mixture_log_lambda(d: np.ndarray, v: np.ndarray, tau: float) -> np.ndarray:
    """log Lambda of the normal-mixture SPRT (module docstring), elementwise."""
    t2 = tau * tau
    return 0.5 * np.log(v / (v + t2)) + t2 * d * d / (2 * v * (v + t2))


def mixture_half_width(v: np.ndarray, tau: float, alpha: float) -> np.ndarray:
    """Half-width of the (1 - alpha) normal-mixture confidence sequence at variance ``v``."""
    t2 = tau * tau
    return np.sqrt(v * (v + t2) / t2 * (np.log((v + t2) / v) + 2 * log(1 / alpha)))


@dataclass(frozen=True)
class SequentialResult:
    difference: float
    p_value: float  # always valid: running minimum over the looks
    cs: tuple[float, float]  # intersection of the confidence sequence over the looks
    looks: int


def sequential_test(treated: np.ndarray, converted: np.ndarray, alpha: float = 0.05, tau: float = 0.02,
                    look_every: int = 100) -> SequentialResult:
    """The always-valid comparison of two arms from units in time order.

    ``treated[i]``: unit i is in the variant (else control); ``converted[i]``: it converted.
    A look needs at least two units in each arm and a positive variance; before the first
    such look the p-value is 1 and the interval [-1, 1]."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: use a level in (0, 1), e.g. 0.05")
    if not tau > 0:
        raise ValueError(f"tau={tau}: the mixing spread must be above 0")
    if look_every < 1:
        raise ValueError(f"look_every={look_every}: use 1 or more exposures between looks")
    treated = np.asarray(treated, dtype=bool)
    converted = np.asarray(converted, dtype=bool)
    total = len(treated)
    n1 = np.cumsum(treated)
    n0 = np.arange(1, total + 1) - n1
    s1 = np.cumsum(converted & treated)
    s0 = np.cumsum(converted & ~treated)
    at = np.arange(look_every, total + 1, look_every) - 1
    if total and (len(at) == 0 or at[-1] != total - 1):
        at = np.append(at, total - 1)
    n1, n0, s1, s0 = n1[at].astype(float), n0[at].astype(float), s1[at].astype(float), s0[at].astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        p1, p0 = s1 / n1, s0 / n0
        v = p1 * (1 - p1) / n1 + p0 * (1 - p0) / n0
        d = p1 - p0
        ok = (n1 >= 2) & (n0 >= 2) & (v > 0)
        d, v = d[ok], v[ok]
        p_looks = np.minimum(1.0, np.exp(-mixture_log_lambda(d, v, tau)))
        half = mixture_half_width(v, tau, alpha)
    final = float(p1[-1] - p0[-1]) if total and n1[-1] > 0 and n0[-1] > 0 else 0.0
    if not ok.any():
        return SequentialResult(final, 1.0, (-1.0, 1.0), 0)
    lo, hi = float(np.max(d - half)), float(np.min(d + half))
    if lo > hi:  # the looks disagree entirely (rare, far from the null): report the latest
        lo, hi = float(d[-1] - half[-1]), float(d[-1] + half[-1])
    return SequentialResult(final, float(np.min(p_looks)), (max(lo, -1.0), min(hi, 1.0)), int(ok.sum()))


def _conversions(exposures: pd.DataFrame, outcomes: pd.DataFrame, metrics: dict[str, tuple[str, ...]]
                 ) -> dict[str, np.ndarray]:
    out = {}
    for metric, types in metrics.items():
        ids = outcomes.loc[outcomes["event_type"].isin(types), "request_id"] if len(outcomes) else []
        out[metric] = exposures["request_id"].isin(pd.Index(ids)).to_numpy()
    return out


def _tau(tau: "float | dict[str, float] | None", metric: str) -> float:
    if tau is None:
        return DEFAULT_TAU.get(metric, 0.01)
    if isinstance(tau, dict):
        return float(tau.get(metric, DEFAULT_TAU.get(metric, 0.01)))
    return float(tau)


def variant_report(exposures: pd.DataFrame, outcomes: pd.DataFrame, control: str, alpha: float = 0.05,
                   look_every: int = 100, tau: "float | dict[str, float] | None" = None,
                   variants: list[str] | None = None,
                   metrics: dict[str, tuple[str, ...]] | None = None) -> list[VariantStats]:
    """Per variant: exposures, users, each metric's rate with its (1 - alpha) Wilson interval
    and, against ``control``, the difference, its always-valid p-value and confidence sequence.

    ``exposures``/``outcomes`` as ``ExperimentStore.exposures``/``outcomes`` return them. A
    request id recorded twice counts once. ``variants``: which to report, in order (e.g. the
    experiment's, so one without traffic shows as 0); default control first, then the others
    by name."""
    metrics = metrics or METRICS
    if not 0 < alpha < 1:
        raise ValueError(f"alpha={alpha}: use a level in (0, 1), e.g. 0.05")
    exp = exposures.sort_values("at", kind="stable").drop_duplicates("request_id", keep="first")
    exp = exp.reset_index(drop=True)
    conv = _conversions(exp, outcomes, metrics)
    names = list(variants) if variants is not None else \
        [control] + sorted(set(exp["variant"].astype(str)) - {control})
    arm = exp["variant"].to_numpy()
    is_control = arm == control
    report = []
    for name in names:
        mine = arm == name
        n = int(mine.sum())
        users = int(exp.loc[mine, "user_id"].nunique())
        per_metric = {}
        for metric, converted in conv.items():
            s = int(converted[mine].sum())
            stats = MetricStats(metric=metric, conversions=s, rate=s / n if n else 0.0,
                                ci=wilson_interval(s, n, alpha))
            if name != control:
                both = mine | is_control
                res = sequential_test(mine[both], converted[both], alpha=alpha, tau=_tau(tau, metric),
                                      look_every=look_every)
                verdict = "no difference yet"
                if res.p_value <= alpha:
                    verdict = "better" if res.difference > 0 else "worse"
                stats = MetricStats(**{**stats.__dict__, "difference": res.difference, "cs": res.cs,
                                       "p_value": res.p_value, "verdict": verdict})
            per_metric[metric] = stats
        report.append(VariantStats(variant=name, is_control=name == control, exposures=n, users=users,
                                   metrics=per_metric))
    return report


def latency_and_errors(exposures: pd.DataFrame, since: datetime | None = None) -> dict[str, dict[str, Any]]:
    """Per variant: requests, error rate (status degraded or error) and p99 latency (ms), from
    the exposures at or after ``since``: what a canary watches."""
    frame = exposures
    if since is not None and len(frame):
        since = since.replace(tzinfo=timezone.utc) if since.tzinfo is None else since
        frame = frame[frame["at"] >= pd.Timestamp(since)]
    out: dict[str, dict[str, Any]] = {}
    for variant, group in frame.groupby("variant", sort=True):
        latency = group["latency_ms"].to_numpy(dtype=float)
        out[str(variant)] = {
            "requests": len(group),
            "error_rate": float(group["status"].isin(ERROR_STATUSES).mean()),
            "p99_ms": float(np.percentile(latency, 99)) if len(latency) else float("nan"),
        }
    return out
