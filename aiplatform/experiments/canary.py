"""A canary: give a new version a growing share of live traffic, and back off at the first sign
of harm.

A version that passed offline evaluation can still fail in production: a slower index, a
feature that is missing online, an error path that the evaluation never took. ``run_canary``
therefore serves it to a small share of users first (an experiment with variants ``control``,
the alias that is live, and ``canary``, the version), widens the share step by step (default
5 %, 25 %, 50 %, 100 %), and at every poll compares the two sides' error rate and p99 latency
over the current step (``decide``). Any breach rolls back at once: the canary's weight goes
to 0 (its users return to control within one poll of the serving replicas) and the
experiment stops. When the last step has held for its time, the experiment stops and the
caller promotes the version (the CLI moves the alias).

The steps compare error rate and latency, not conversions: those need far more traffic than
a canary's minutes give (``stats.variant_report`` is for that, in an A/B test).

Control's numbers come from the current step while it has traffic; in a step where control
has none (100 %), from the last step in which it had.
"""

import logging
import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from aiplatform.experiments.config import Experiment, Variant
from aiplatform.experiments.stats import latency_and_errors
from aiplatform.experiments.store import ExperimentStore

log = logging.getLogger(__name__)

CONTROL = "control"
CANARY = "canary"


class CanaryPlan(BaseModel):
    """How a canary ramps up and what counts as harm."""

    model_config = ConfigDict(extra="forbid")

    steps: list[float] = Field(default_factory=lambda: [5.0, 25.0, 50.0, 100.0], min_length=1,
                               description="Canary traffic share per step, percent, increasing")
    step_s: float = Field(60.0, gt=0, allow_inf_nan=False, description="Seconds each step must stay healthy")
    max_error_rate_delta: float = Field(0.02, ge=0, le=1,
                                        description="Roll back when canary's error rate exceeds control's by more")
    max_p99_ratio: float = Field(1.5, gt=0, allow_inf_nan=False,
                                 description="Roll back when canary's p99 latency exceeds control's times this")
    min_p99_excess_ms: float = Field(25.0, ge=0, allow_inf_nan=False,
                                     description="...and by more than this many milliseconds: on a fast service "
                                                 "a p99 of 23 ms against 10 ms is noise of a few slow requests")
    min_requests: int = Field(50, ge=1, description="Hold (no verdict) while either side has fewer requests")
    max_step_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                     description="Longest a step waits for min_requests on both sides before it "
                                                 "rolls back for lack of traffic; default 5 x step_s")

    @field_validator("steps")
    @classmethod
    def _steps(cls, steps: list[float]) -> list[float]:
        if any(not (0 < s <= 100) or math.isnan(s) for s in steps):
            raise ValueError(f"steps {steps}: each is a percentage of traffic in (0, 100]")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"steps {steps}: must increase, e.g. 5,25,50,100")
        if steps[0] >= 100:
            raise ValueError(f"steps {steps}: the first step must leave control some traffic to compare "
                             "with, e.g. 5,25,50,100")
        return steps

    @model_validator(mode="after")
    def _wait(self) -> "CanaryPlan":
        if self.max_step_s is not None and self.max_step_s < self.step_s:
            raise ValueError(f"max_step_s={self.max_step_s} is shorter than step_s={self.step_s}")
        return self

    @property
    def poll_s(self) -> float:
        return min(5.0, self.step_s / 4)

    @property
    def wait_limit_s(self) -> float:
        return self.max_step_s if self.max_step_s is not None else 5 * self.step_s


def decide(plan: CanaryPlan, control: dict[str, Any] | None, canary: dict[str, Any] | None) -> str:
    """``advance``, ``hold`` or ``rollback`` from two ``latency_and_errors`` entries.

    Hold while either side has fewer than ``min_requests`` requests (too few to tell noise
    from harm); roll back when the canary's error rate exceeds control's by more than
    ``max_error_rate_delta`` or its p99 latency exceeds control's by more than
    ``max_p99_ratio`` times and by more than ``min_p99_excess_ms``."""
    control, canary = control or {}, canary or {}
    if control.get("requests", 0) < plan.min_requests or canary.get("requests", 0) < plan.min_requests:
        return "hold"
    if canary["error_rate"] - control["error_rate"] > plan.max_error_rate_delta:
        return "rollback"
    if _p99_breached(plan, control, canary):
        return "rollback"
    return "advance"


def _p99_breached(plan: CanaryPlan, control: dict[str, Any], canary: dict[str, Any]) -> bool:
    return (canary["p99_ms"] > plan.max_p99_ratio * control["p99_ms"]
            and canary["p99_ms"] - control["p99_ms"] > plan.min_p99_excess_ms)


def _why(plan: CanaryPlan, control: dict[str, Any], canary: dict[str, Any]) -> str:
    if canary["error_rate"] - control["error_rate"] > plan.max_error_rate_delta:
        return (f"error rate {canary['error_rate']:.1%} on canary vs {control['error_rate']:.1%} on control "
                f"(allowed difference {plan.max_error_rate_delta:.1%})")
    return (f"p99 latency {canary['p99_ms']:.0f} ms on canary vs {control['p99_ms']:.0f} ms on control "
            f"(allowed: {plan.max_p99_ratio:g}x and {plan.min_p99_excess_ms:g} ms more)")


def run_canary(store: ExperimentStore, model_name: str, version: int, plan: CanaryPlan | None = None,
               control_alias: str = "champion", name: str | None = None, actor: str | None = None,
               sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
               on_step: Callable[[dict[str, Any]], None] | None = None,
               stop_when_passed: bool = True) -> dict[str, Any]:
    """Ramp ``version`` of ``model_name`` up through ``plan.steps`` against ``control_alias``.

    Returns ``{"outcome": "passed", ...}`` or ``{"outcome": "rolled_back", "reason", "step", ...}``
    (``step``: the percentage at which it rolled back). ``on_step`` gets a dict per event:
    ``event`` is ``step_started``, ``checked`` (every poll), ``step_passed`` or ``rolled_back``.
    ``sleep``/``clock`` are injectable so tests need not wait. ``stop_when_passed=False``
    leaves the passed experiment running at its last step, for a caller that moves the alias
    first and stops it then (so users on the canary never flip back to the old version in
    between); a rollback always stops it."""
    plan = plan or CanaryPlan()
    name = name or f"canary-{model_name}-v{version}"
    notify = on_step or (lambda event: None)
    first = plan.steps[0]
    experiment = Experiment(
        name=name, model_name=model_name, control=CONTROL,
        variants=[Variant(name=CONTROL, alias=control_alias, weight=100 - first),
                  Variant(name=CANARY, version=int(version), weight=first)])
    control_since: datetime | None = None
    revision = 0
    try:
        for index, share in enumerate(plan.steps):
            experiment = experiment.with_weights({CONTROL: 100 - share, CANARY: share})
            step_since = datetime.now(timezone.utc)
            revision = store.put(experiment, actor=actor, reason=f"canary step {index + 1}/{len(plan.steps)}: "
                                                                   f"{share:g}% to v{version}")
            if share < 100:
                control_since = step_since
            window = control_since or step_since  # control's: this step, or the last one it had traffic in
            started = clock()
            base = {"name": name, "step": share, "index": index, "revision": revision}
            notify({**base, "event": "step_started"})
            while True:
                sleep(plan.poll_s)
                elapsed = clock() - started
                frame = store.exposures(name, since=window)
                canary = latency_and_errors(frame, since=step_since).get(CANARY, {})
                control = latency_and_errors(frame, since=window).get(CONTROL, {})
                verdict = decide(plan, control, canary)
                notify({**base, "event": "checked", "elapsed_s": elapsed, "decision": verdict,
                        "control": control, "canary": canary})
                reason = None
                if verdict == "rollback":
                    reason = _why(plan, control, canary)
                elif verdict == "hold" and elapsed >= plan.wait_limit_s:
                    reason = (f"not enough traffic to judge after {elapsed:.0f} s: {canary.get('requests', 0)} "
                              f"canary and {control.get('requests', 0)} control requests, {plan.min_requests} "
                              "needed on each side")
                if reason is not None:
                    return _roll_back(store, experiment, actor, reason, base, control, canary, notify)
                if verdict == "advance" and elapsed >= plan.step_s:
                    notify({**base, "event": "step_passed", "elapsed_s": elapsed, "control": control,
                            "canary": canary})
                    break
    except BaseException as exc:
        # Interrupted (Ctrl-C, a storage error): never leave a half-ramped canary serving.
        if store.is_active(name):
            try:
                store.put(experiment.with_weights({CONTROL: 100, CANARY: 0}), actor=actor,
                          reason=f"canary interrupted: {type(exc).__name__}")
                store.stop(name, actor=actor, reason=f"canary interrupted: {type(exc).__name__}: {exc}")
            except Exception:  # pragma: no cover - the original error matters more
                log.exception("canary %s: could not roll back after it was interrupted", name)
        raise
    if stop_when_passed:
        revision = store.stop(name, actor=actor, reason=f"canary of v{version} passed every step")
    log.info("canary %s passed %s", name, plan.steps)
    return {"outcome": "passed", "name": name, "steps": list(plan.steps), "revision": revision}


def _roll_back(store: ExperimentStore, experiment: Experiment, actor: str | None, reason: str,
               base: dict[str, Any], control: dict[str, Any], canary: dict[str, Any],
               notify: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Canary weight 0 first (its users go back to control at once), then stop."""
    store.put(experiment.with_weights({CONTROL: 100, CANARY: 0}), actor=actor, reason=f"canary rollback: {reason}")
    revision = store.stop(experiment.name, actor=actor, reason=f"canary rolled back: {reason}")
    log.warning("canary %s rolled back at %g%%: %s", experiment.name, base["step"], reason)
    result = {"outcome": "rolled_back", "reason": reason, "step": base["step"], "index": base["index"],
              "name": experiment.name, "revision": revision, "control": control, "canary": canary}
    notify({**base, "event": "rolled_back", "reason": reason})
    return result
