"""Experiments without serving: who gets which variant (sticky, by weight, ramps that keep users
in place), the config file's errors, the store's revisions and its one-active-experiment-per-model
rule (also when the rule is decided by commit order), the observation tables on real Lance, the
statistics (an A/A simulation where peeking inflates a z-test but not the always-valid p-value,
a real lift detected, Wilson and confidence-sequence coverage) and the canary's decisions and
ramp with a fake clock over a real store."""

import json
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError
from scipy.stats import norm

from aiplatform.core.errors import UserInputError
from aiplatform.core.storage import Layout
from aiplatform.experiments import (
    CanaryPlan,
    Experiment,
    ExperimentStore,
    Shadow,
    Variant,
    decide,
    latency_and_errors,
    load_experiment,
    run_canary,
    variant_report,
)
from aiplatform.experiments.stats import (
    mixture_half_width,
    mixture_log_lambda,
    sequential_test,
    wilson_interval,
)
from aiplatform.experiments.store import (
    EXPOSURES_SCHEMA,
    OUTCOMES_SCHEMA,
    SHADOW_SCHEMA,
)


def _ab(name: str = "ab", model: str = "two_tower", weights=(50, 50), **kw) -> Experiment:
    return Experiment(name=name, model_name=model, variants=[
        Variant(name="control", alias="champion", weight=weights[0]),
        Variant(name="treatment", version=2, weight=weights[1])], **kw)


@pytest.fixture()
def store(tmp_path) -> ExperimentStore:
    return ExperimentStore(Layout.at(str(tmp_path / "home")))


# ---- config -----------------------------------------------------------------------------------
def test_assignment_is_sticky_follows_the_weights_and_never_picks_a_zero_weight():
    exp = Experiment(name="e1", variants=[Variant(name="a", alias="champion", weight=1),
                                          Variant(name="off", version=3, weight=0),
                                          Variant(name="b", version=2, weight=3)])
    users = [f"user-{i}" for i in range(20000)]
    first = [exp.assign(u).name for u in users]
    assert first == [exp.assign(u).name for u in users]  # sticky
    assert [Experiment.model_validate(exp.model_dump()).assign(u).name for u in users[:500]] == first[:500]
    counts = pd.Series(first).value_counts()
    assert "off" not in counts
    assert abs(counts["b"] / len(users) - 0.75) < 0.015
    assert exp.salt == "e1" and exp.control_variant.name == "a"
    other = Experiment.model_validate({**exp.model_dump(), "salt": "another"})
    agree = np.mean([other.assign(u).name == f for u, f in zip(users, first)])
    assert 0.55 < agree < 0.70  # independent split: 0.25^2 + 0.75^2 = 0.625


def test_a_ramp_keeps_canary_users_in_the_canary():
    exp = Experiment(name="c", control="control", variants=[
        Variant(name="control", alias="champion", weight=95), Variant(name="canary", version=4, weight=5)])
    users = [f"u{i}" for i in range(5000)]
    at5 = {u for u in users if exp.assign(u).name == "canary"}
    wider = exp.with_weights({"control": 75, "canary": 25})
    at25 = {u for u in users if wider.assign(u).name == "canary"}
    assert at5 and at5 < at25 and abs(len(at25) / len(users) - 0.25) < 0.03
    assert exp.variant("canary").weight == 5  # with_weights returned a copy
    off = exp.with_weights({"canary": 0})
    assert all(off.assign(u).name == "control" for u in users)
    with pytest.raises(UserInputError, match="no variant 'nope'"):
        exp.with_weights({"nope": 1})
    with pytest.raises(UserInputError, match="sum to 0"):
        exp.with_weights({"control": 0, "canary": 0})


def test_mirrored_requests_follow_the_share():
    exp = _ab(shadow=Shadow(version=3, share=0.2))
    share = np.mean([exp.mirrored(f"req-{i}") for i in range(20000)])
    assert abs(share - 0.2) < 0.015
    assert exp.mirrored("req-1") == exp.mirrored("req-1")
    assert not any(_ab().mirrored(f"req-{i}") for i in range(100))


def test_invalid_experiments_name_the_problem():
    with pytest.raises(ValueError, match="variant 'b' sets both of alias and version"):
        Variant(name="b", alias="champion", version=2, weight=1)
    with pytest.raises(ValueError, match="variant 'b' sets neither"):
        Variant(name="b", weight=1)
    with pytest.raises(ValueError, match="variant name"):
        Variant(name="has space", version=1, weight=1)
    with pytest.raises(ValueError, match="shadow 'shadow' sets neither"):
        Shadow(share=0.1)
    with pytest.raises(ValidationError):
        Shadow(version=1, share=0)
    with pytest.raises(ValueError, match="unique; repeated: a"):
        Experiment(name="x", variants=[Variant(name="a", version=1, weight=1), Variant(name="a", version=2, weight=1)])
    with pytest.raises(ValueError, match="sum to 0"):
        Experiment(name="x", variants=[Variant(name="a", version=1, weight=0)])
    with pytest.raises(ValueError, match="control 'z' is not a variant"):
        Experiment(name="x", control="z", variants=[Variant(name="a", version=1, weight=1)])
    with pytest.raises(ValueError, match="invalid experiment name"):
        Experiment(name="x'; drop", variants=[Variant(name="a", version=1, weight=1)])
    with pytest.raises(ValidationError, match="Extra inputs"):
        Experiment(name="x", variants=[Variant(name="a", version=1, weight=1)], weights=[1])


def test_load_experiment_reads_yaml_and_json_and_names_the_file_and_field(tmp_path):
    good = tmp_path / "exp.yaml"
    good.write_text("name: rank-test\ncontrol: b\nvariants:\n  - {name: a, alias: champion, weight: 1}\n"
                    "  - {name: b, version: 2, weight: 1}\nshadow: {version: 3, share: 0.1}\n")
    exp = load_experiment(good)
    assert (exp.name, exp.model_name, exp.salt, exp.control_variant.name) == ("rank-test", "two_tower", "rank-test", "b")
    as_json = tmp_path / "exp.json"
    as_json.write_text(json.dumps({"experiment": exp.model_dump(mode="json")}))
    assert load_experiment(as_json) == exp
    assert load_experiment(exp.model_dump()) == exp

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nvariants:\n  - {name: a, alias: champion, weight: 1}\n  - {name: b, version: 2, weight: -1}\n")
    with pytest.raises(UserInputError, match=r"bad.yaml: experiment field 'variants.1.weight'.*greater than or equal to 0"):
        load_experiment(bad)
    bad.write_text("name: t\nvariant: []\n")
    with pytest.raises(UserInputError, match=r"field 'variant': unknown field; valid ones are name, model_name"):
        load_experiment(bad)
    bad.write_text("name: t\nvariants:\n  - {name: a, alias: champion, version: 1, weight: 1}\n")
    with pytest.raises(UserInputError, match=r"field 'variants.0': variant 'a' sets both"):
        load_experiment(bad)
    bad.write_text("name: [unclosed\n")
    with pytest.raises(UserInputError, match="bad.yaml: not valid YAML"):
        load_experiment(bad)
    with pytest.raises(UserInputError, match="cannot read the experiment file"):
        load_experiment(tmp_path / "missing.yaml")


# ---- store ------------------------------------------------------------------------------------
def test_revisions_history_and_stop(store):
    assert store.get("ab") is None and store.active("two_tower") is None and store.history("ab") == []
    assert store.put(_ab(), actor="alice", reason="start") == 1
    assert store.put(_ab(weights=(80, 20)), actor="bob", reason="less risk") == 2
    exp, rev = store.active("two_tower")
    assert rev == 2 and exp.variant("treatment").weight == 20
    assert store.stop("ab", actor="carol", reason="done") == 3
    assert store.stop("ab") == 3  # already stopped: nothing written
    assert store.active("two_tower") is None and store.get("ab").variant("treatment").weight == 20
    history = store.history("ab")
    assert [(h["revision"], h["active"], h["actor"], h["reason"]) for h in history] == [
        (1, True, "alice", "start"), (2, True, "bob", "less risk"), (3, False, "carol", "done")]
    assert history[1]["config"]["variants"][1]["weight"] == 20
    again = ExperimentStore(store.layout)  # another process sees the same state
    assert again.put(_ab()) == 4 and again.active("two_tower")[1] == 4
    with pytest.raises(UserInputError, match="no experiment 'nope' \\(experiments: ab\\)"):
        store.stop("nope")


def test_one_active_experiment_per_model(store):
    store.put(_ab("first"))
    with pytest.raises(UserInputError, match="already has an active experiment, 'first' \\(revision 1\\).*"
                                             "experiments stop first"):
        store.put(_ab("second"))
    assert store.get("second") is None
    assert store.put(_ab("other-model", model="ranker")) == 1  # another model: fine
    store.stop("first")
    assert store.put(_ab("second")) == 1
    assert store.active("two_tower")[0].name == "second" and store.active("ranker")[0].name == "other-model"


def test_the_rule_holds_when_commit_order_decides(store):
    """Past the cheap check before writing (as when two people start experiments at once): the
    row that commits second is rejected when replayed, stays in the table and changes nothing."""
    store.put(_ab("first"))
    with pytest.raises(UserInputError, match="'first'"):
        store._write_config(_ab("second"), True, "racer", "")
    assert store.get("second") is None and store.active("two_tower")[0].name == "first"
    assert store.put(_ab("first", weights=(1, 1))) == 2  # the rejected row took no revision
    store.stop("first")
    assert store.put(_ab("second")) == 1


def test_concurrent_starts_leave_exactly_one_active(store):
    store.put(_ab("warmup", model="other"))  # the table exists: the race is on appends
    barrier, results = threading.Barrier(4), {}

    def start(i: int) -> None:
        barrier.wait()
        try:
            results[i] = store.put(_ab(f"exp{i}"))
        except UserInputError as exc:
            results[i] = exc

    threads = [threading.Thread(target=start, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [i for i, r in results.items() if r == 1]
    assert len(winners) == 1
    assert store.active("two_tower")[0].name == f"exp{winners[0]}"
    assert all(isinstance(r, UserInputError) for i, r in results.items() if i != winners[0])


def test_observation_tables_round_trip(store):
    assert list(store.exposures("ab").columns) == EXPOSURES_SCHEMA.names and store.exposures("ab").empty
    assert list(store.outcomes().columns) == OUTCOMES_SCHEMA.names
    assert list(store.shadow("ab").columns) == SHADOW_SCHEMA.names
    store.record_exposures([])  # no-op: nothing created
    assert not (Path(store.root) / "exposures.lance").exists()
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    store.record_exposures([
        {"request_id": "r1", "experiment": "ab", "revision": 1, "variant": "control", "model_version": 1,
         "user_id": "u1", "k": 10, "status": "ok", "latency_ms": 12.5, "at": t0},
        {"request_id": "r2", "experiment": "ab", "revision": 1, "variant": "treatment", "model_version": None,
         "user_id": "u2", "k": 10, "status": "error", "latency_ms": 3.0, "at": "2026-01-01T00:10:00Z"},
        {"request_id": "r3", "experiment": "other", "revision": 1, "variant": "a", "model_version": 1,
         "user_id": "u3", "k": 5, "status": "ok", "latency_ms": 1.0}])
    got = store.exposures("ab")
    assert list(got["request_id"]) == ["r1", "r2"] and pd.isna(got["model_version"].iloc[1])
    assert str(got["at"].dtype) == "datetime64[us, UTC]"
    assert list(store.exposures("ab", since=t0 + timedelta(minutes=5))["request_id"]) == ["r2"]
    assert list(store.exposures("ab", since=datetime(2026, 1, 1, 0, 5))["request_id"]) == ["r2"]  # naive = UTC
    store.record_outcomes([{"request_id": "r1", "user_id": "u1", "event_type": "click", "at": t0},
                           {"request_id": "r9", "user_id": "u9", "event_type": "purchase", "at": t0}])
    assert list(store.outcomes(["r1", "r2"])["request_id"]) == ["r1"] and len(store.outcomes()) == 2
    store.record_shadow([{"request_id": "r1", "experiment": "ab", "shadow_version": 3, "live_version": 1,
                          "latency_ms": 20.0, "overlap": 0.7, "k": 10}])
    assert store.shadow("ab")["overlap"].tolist() == [0.7] and store.shadow("other").empty
    with pytest.raises(UserInputError, match="exposures row 0: status 'fine' is not one of ok, popular"):
        store.record_exposures([{**got.iloc[0].to_dict(), "status": "fine"}])
    with pytest.raises(UserInputError, match="outcomes row 1: missing user_id"):
        store.record_outcomes([{"request_id": "a", "user_id": "u", "event_type": "click"},
                               {"request_id": "b", "event_type": "click"}])
    with pytest.raises(UserInputError, match="unknown column\\(s\\) colour"):
        store.record_outcomes([{"request_id": "a", "user_id": "u", "event_type": "click", "colour": 1}])
    with pytest.raises(UserInputError, match="overlap 1.5 is outside"):
        store.record_shadow([{"request_id": "r1", "experiment": "ab", "shadow_version": 3, "live_version": 1,
                              "latency_ms": 2.0, "overlap": 1.5, "k": 10}])
    with pytest.raises(UserInputError, match="exposures rows do not match"):
        store.record_exposures([{**got.iloc[0].to_dict(), "k": "ten"}])
    assert len(store.exposures("ab")) == 2  # failed writes appended nothing


# ---- statistics -------------------------------------------------------------------------------
def _simulate(rng, n: int, rates: dict[str, float], start: datetime, outcome: str = "click"):
    """Exposures split evenly over the variants in time order, and the outcomes they led to."""
    names = list(rates)
    variant = rng.choice(names, size=n)
    converted = rng.random(n) < np.array([rates[v] for v in variant])
    ids = [f"r{i}" for i in range(n)]
    exposures = pd.DataFrame({
        "request_id": ids, "experiment": "e", "revision": 1, "variant": variant,
        "model_version": 1, "user_id": [f"u{i % max(n // 3, 1)}" for i in range(n)], "k": 10, "status": "ok",
        "latency_ms": 10.0, "at": pd.date_range(start, periods=n, freq="s", tz="UTC")})
    outcomes = pd.DataFrame({"request_id": [i for i, c in zip(ids, converted) if c], "user_id": "u",
                             "event_type": outcome, "at": start})
    return exposures, outcomes


def _naive_crossed(exposures: pd.DataFrame, outcomes: pd.DataFrame, alpha: float, look_every: int) -> bool:
    """A fixed-sample two-proportion z-test read at every look: what people do by default."""
    treated = (exposures["variant"] == "b").to_numpy()
    y = exposures["request_id"].isin(set(outcomes["request_id"])).to_numpy()
    n1 = np.cumsum(treated)
    n0 = np.arange(1, len(y) + 1) - n1
    s1, s0 = np.cumsum(y & treated), np.cumsum(y & ~treated)
    at = np.arange(look_every, len(y) + 1, look_every) - 1
    p1, p0 = s1[at] / n1[at], s0[at] / n0[at]
    v = p1 * (1 - p1) / n1[at] + p0 * (1 - p0) / n0[at]
    z = (p1 - p0) / np.sqrt(v)
    return bool((2 * norm.sf(np.abs(z)) < alpha).any())


def test_peeking_inflates_a_z_test_but_not_the_always_valid_p_value():
    """200 A/A experiments, each looked at 20 times (every 100 of 2000 exposures)."""
    rng, alpha, start = np.random.default_rng(20260101), 0.05, datetime(2026, 1, 1, tzinfo=timezone.utc)
    always_valid = naive = 0
    for _ in range(200):
        exposures, outcomes = _simulate(rng, 2000, {"a": 0.1, "b": 0.1}, start)
        report = variant_report(exposures, outcomes, control="a", alpha=alpha, look_every=100)
        click = report[1].metrics["click"]
        always_valid += click.p_value <= alpha
        assert (click.verdict == "no difference yet") == (click.p_value > alpha)
        naive += _naive_crossed(exposures, outcomes, alpha, 100)
    assert always_valid / 200 <= 2 * alpha
    assert naive / 200 > 2 * alpha  # the same data, read the naive way, "finds" far more effects
    assert naive > always_valid


def test_a_real_lift_is_detected_with_a_covering_confidence_sequence():
    rng, start = np.random.default_rng(5), datetime(2026, 1, 1, tzinfo=timezone.utc)
    exposures, outcomes = _simulate(rng, 10000, {"a": 0.10, "b": 0.14}, start)
    report = variant_report(exposures, outcomes, control="a")
    control, treated = report
    assert control.is_control and control.metrics["click"].p_value is None
    click = treated.metrics["click"]
    assert click.verdict == "better" and click.p_value < 0.01
    assert click.cs[0] > 0 and click.cs[0] <= 0.04 <= click.cs[1]
    assert click.ci[0] <= 0.14 <= click.ci[1] and control.metrics["click"].ci[0] <= 0.10 <= control.metrics["click"].ci[1]
    assert treated.metrics["purchase"].verdict == "no difference yet" and treated.metrics["purchase"].rate == 0
    worse = variant_report(exposures.assign(variant=exposures["variant"].map({"a": "b", "b": "a"})), outcomes, "a")
    assert worse[1].metrics["click"].verdict == "worse"


def test_confidence_sequences_cover_the_true_difference_at_every_look():
    rng, alpha, misses = np.random.default_rng(11), 0.05, 0
    for _ in range(200):
        treated = rng.random(3000) < 0.5
        y = np.where(treated, rng.random(3000) < 0.12, rng.random(3000) < 0.10)
        res = sequential_test(treated, y, alpha=alpha, tau=0.02, look_every=100)
        misses += not (res.cs[0] <= 0.02 <= res.cs[1])  # the intersection over all 30 looks
    assert misses / 200 <= alpha


def test_the_p_value_crosses_alpha_exactly_when_the_interval_leaves_zero():
    v, tau, alpha = np.full(5, 1e-4), 0.02, 0.05
    half = mixture_half_width(v, tau, alpha)
    d = np.array([0.5, 0.99, 1.01, 2.0, 0.0]) * half
    p = np.minimum(1, np.exp(-mixture_log_lambda(d, v, tau)))
    assert list(p <= alpha) == [False, False, True, True, False]
    assert p[4] == 1.0


def test_wilson_interval_values_and_coverage():
    lo, hi = wilson_interval(5, 10, 0.05)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert wilson_interval(0, 0) == (0.0, 1.0) and wilson_interval(0, 50)[0] == 0.0
    rng = np.random.default_rng(3)
    for p, n in ((0.02, 200), (0.3, 50)):
        hits = rng.binomial(n, p, size=2000)
        cover = np.mean([lo <= p <= hi for lo, hi in (wilson_interval(int(h), n) for h in hits)])
        assert cover >= 0.93


def test_conversions_count_once_per_request_by_event_type():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    exposures = pd.DataFrame({"request_id": ["r1", "r1", "r2", "r3"], "variant": ["a", "a", "b", "b"],
                              "user_id": ["u1", "u1", "u2", "u2"], "status": "ok", "latency_ms": 1.0,
                              "at": [t0, t0 + timedelta(seconds=1), t0, t0]})
    outcomes = pd.DataFrame({"request_id": ["r1", "r1", "r2", "r3", "rX"],
                             "event_type": ["click", "click", "add_to_cart", "view", "purchase"],
                             "user_id": "u", "at": t0})
    a, b = variant_report(exposures, outcomes, "a", variants=["a", "b", "c"])[:2]
    assert (a.exposures, a.users, a.metrics["click"].conversions) == (1, 1, 1)
    assert (b.exposures, b.users, b.metrics["cart"].conversions, b.metrics["click"].conversions) == (2, 1, 1, 0)
    c = variant_report(exposures, outcomes, "a", variants=["a", "b", "c"])[2]
    assert c.exposures == 0 and c.metrics["click"].p_value == 1.0


def test_latency_and_errors():
    t0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
    exposures = pd.DataFrame({
        "variant": ["a"] * 100 + ["b"] * 100,
        "status": ["ok"] * 100 + ["ok"] * 90 + ["degraded"] * 5 + ["error"] * 5,
        "latency_ms": list(np.arange(1, 101, dtype=float)) + [10.0] * 100,
        "at": [t0] * 150 + [t0 + timedelta(minutes=1)] * 50})
    stats = latency_and_errors(exposures)
    assert stats["a"]["requests"] == 100 and stats["a"]["error_rate"] == 0 and 99 <= stats["a"]["p99_ms"] <= 100
    assert stats["b"]["error_rate"] == pytest.approx(0.10)
    later = latency_and_errors(exposures, since=t0 + timedelta(seconds=30))
    assert set(later) == {"b"} and later["b"]["requests"] == 50 and later["b"]["error_rate"] == pytest.approx(0.2)
    assert latency_and_errors(exposures.iloc[:0]) == {}


# ---- canary -----------------------------------------------------------------------------------
def _side(requests: int, error_rate: float = 0.0, p99: float = 100.0) -> dict:
    return {"requests": requests, "error_rate": error_rate, "p99_ms": p99}


def test_decide():
    plan = CanaryPlan(min_requests=50, max_error_rate_delta=0.02, max_p99_ratio=1.5)
    assert decide(plan, _side(49), _side(500)) == "hold"
    assert decide(plan, _side(500), _side(10, error_rate=1.0)) == "hold"
    assert decide(plan, _side(500), {}) == "hold"
    assert decide(plan, _side(500, 0.01), _side(60, 0.03)) == "advance"
    assert decide(plan, _side(500, 0.01), _side(60, 0.04)) == "rollback"
    assert decide(plan, _side(500, p99=100), _side(60, p99=150)) == "advance"
    assert decide(plan, _side(500, p99=100), _side(60, p99=151)) == "rollback"
    assert decide(plan, _side(500, p99=0.1), _side(60, p99=1.2)) == "advance"  # sub-millisecond control
    # a fast service: 2.3x control, but 13 ms more is a few slow requests, not harm
    assert decide(plan, _side(500, p99=10), _side(60, p99=23)) == "advance"
    assert decide(plan, _side(500, p99=10), _side(60, p99=36)) == "rollback"
    strict = CanaryPlan(min_requests=50, max_p99_ratio=1.5, min_p99_excess_ms=0)
    assert decide(strict, _side(500, p99=10), _side(60, p99=16)) == "rollback"


def test_canary_plan_validation():
    assert CanaryPlan().steps == [5, 25, 50, 100] and CanaryPlan().poll_s == 5 and CanaryPlan(step_s=8).poll_s == 2
    for steps, match in (([5, 5], "must increase"), ([50, 20], "must increase"), ([5, 120], r"\(0, 100\]"),
                         ([100], "first step"), ([], "at least 1")):
        with pytest.raises(ValidationError, match=match):
            CanaryPlan(steps=steps)
    with pytest.raises(ValidationError):
        CanaryPlan(step_s=0)


class _Traffic:
    """A fake clock whose sleep is where serving's traffic happens: each sleep writes
    ``per_poll`` exposures split by the active experiment's weights."""

    def __init__(self, store: ExperimentStore, per_poll: int = 100, canary_status: str = "ok",
                 canary_latency: float = 20.0, fail_at_step: float | None = None):
        self.store, self.per_poll, self.now = store, per_poll, 0.0
        self.canary_status, self.canary_latency, self.fail_at_step = canary_status, canary_latency, fail_at_step
        self.requests = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        active = self.store.active("two_tower")
        if active is None:
            return
        exp, revision = active
        share = exp.shares()["canary"]
        n_canary = round(self.per_poll * share)
        failing = self.fail_at_step is not None and share * 100 >= self.fail_at_step
        rows = []
        for i in range(self.per_poll):
            self.requests += 1
            canary = i < n_canary
            rows.append({"request_id": f"r{self.requests}", "experiment": exp.name, "revision": revision,
                         "variant": "canary" if canary else "control", "model_version": 7 if canary else 6,
                         "user_id": f"u{i}", "k": 10,
                         "status": self.canary_status if canary and failing else "ok",
                         "latency_ms": self.canary_latency if canary else 20.0 + (i % 3)})
        self.store.record_exposures(rows)


def test_a_healthy_canary_passes_every_step(store):
    traffic, events = _Traffic(store), []
    plan = CanaryPlan(step_s=20, min_requests=20)
    result = run_canary(store, "two_tower", 7, plan, sleep=traffic.sleep, clock=traffic.clock, on_step=events.append)
    assert result["outcome"] == "passed" and result["name"] == "canary-two_tower-v7"
    passed = [e for e in events if e["event"] == "step_passed"]
    assert [e["step"] for e in passed] == [5, 25, 50, 100]
    assert all(e["elapsed_s"] >= 20 for e in passed)
    assert passed[-1]["control"]["requests"] >= 20  # at 100 %: control of the step before
    history = store.history("canary-two_tower-v7")
    assert [h["config"]["variants"][1]["weight"] for h in history] == [5, 25, 50, 100, 100]
    assert [h["active"] for h in history] == [True] * 4 + [False]
    assert history[0]["config"]["variants"][0]["alias"] == "champion" and history[0]["config"]["variants"][1]["version"] == 7
    assert store.active("two_tower") is None


def test_a_passed_canary_can_be_left_running_for_the_caller_to_stop(store):
    traffic = _Traffic(store)
    result = run_canary(store, "two_tower", 7, CanaryPlan(steps=[50, 100], step_s=10, min_requests=20),
                        sleep=traffic.sleep, clock=traffic.clock, stop_when_passed=False)
    assert result["outcome"] == "passed" and result["revision"] == 2
    exp, revision = store.active("two_tower")
    assert (exp.name, revision, exp.shares()["canary"]) == ("canary-two_tower-v7", 2, 1.0)


def test_a_failing_canary_rolls_back_at_once(store):
    traffic, events = _Traffic(store, canary_status="degraded", fail_at_step=25), []
    plan = CanaryPlan(step_s=20, min_requests=20, max_error_rate_delta=0.05)
    result = run_canary(store, "two_tower", 7, plan, name="c7", actor="ci", sleep=traffic.sleep,
                        clock=traffic.clock, on_step=events.append)
    assert result["outcome"] == "rolled_back" and result["step"] == 25
    assert "error rate 100.0% on canary vs 0.0% on control" in result["reason"]
    history = store.history("c7")
    assert [(h["config"]["variants"][1]["weight"], h["active"]) for h in history] == [
        (5, True), (25, True), (0, True), (0, False)]
    assert history[-1]["actor"] == "ci" and "rolled back" in history[-1]["reason"]
    assert store.active("two_tower") is None
    assert events[-1]["event"] == "rolled_back"
    checks = [e for e in events if e["event"] == "checked" and e["step"] == 25]
    assert checks[-1]["decision"] == "rollback" and checks[-1]["elapsed_s"] < plan.step_s  # did not wait the step out


def test_a_slow_canary_rolls_back_and_so_does_one_without_traffic(store):
    slow = _Traffic(store, canary_latency=90.0, fail_at_step=5)
    result = run_canary(store, "two_tower", 7, CanaryPlan(step_s=20, min_requests=5), name="slow",
                        sleep=slow.sleep, clock=slow.clock)
    assert result["outcome"] == "rolled_back" and result["step"] == 5 and "p99 latency 90 ms" in result["reason"]
    quiet = _Traffic(store, per_poll=0)
    result = run_canary(store, "two_tower", 7, CanaryPlan(step_s=20, max_step_s=60), name="quiet",
                        sleep=quiet.sleep, clock=quiet.clock)
    assert result["outcome"] == "rolled_back" and "not enough traffic to judge after 60 s" in result["reason"]
    assert quiet.now == 60


def test_a_canary_is_refused_while_another_experiment_runs_and_rolled_back_when_interrupted(store):
    store.put(_ab("running"))
    with pytest.raises(UserInputError, match="already has an active experiment, 'running'"):
        run_canary(store, "two_tower", 7, sleep=lambda s: None, clock=lambda: 0.0)
    assert store.get("canary-two_tower-v7") is None
    store.stop("running")

    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_canary(store, "two_tower", 7, name="ctrl-c", sleep=interrupt, clock=lambda: 0.0)
    history = store.history("ctrl-c")
    assert [(h["config"]["variants"][1]["weight"], h["active"]) for h in history] == [
        (5, True), (0, True), (0, False)]
