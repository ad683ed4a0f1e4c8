"""`aiplatform experiments`: online experiments of model versions: A/B tests with shadow traffic
(start, show, stop, report) and canaries that ramp a version up and promote it (canary)."""

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, console, err, fail_named
from aiplatform.cli.models import print_move
from aiplatform.core.errors import AIPlatformError, UserInputError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout

experiments_app = typer.Typer(help="Online experiments: A/B tests, shadow traffic and canaries of model versions.",
                               no_args_is_help=True)


def _experiment_store(home: Optional[str]):
    from aiplatform.experiments.store import ExperimentStore

    layout = Layout.open(Settings.load(home=home).home)
    return layout, ExperimentStore(layout)


def _no_experiment(store, name: str) -> UserInputError:
    return UserInputError(f"no experiment {name!r} (experiments: {', '.join(store.names()) or 'none yet'}); "
                          "start one with: aiplatform experiments start FILE")


def _check_targets(layout: Layout, experiment) -> None:
    """Every variant (and the shadow) must name a version serving can load: a registered
    version, or an alias that is set. Said now, not by replicas that cannot route."""
    from aiplatform.registry.registry import ModelRegistry

    registry = ModelRegistry(layout)
    name = experiment.model_name
    targets = list(experiment.variants) + ([experiment.shadow] if experiment.shadow else [])
    aliases = registry.aliases(name)
    for target in targets:
        if target.version is not None:
            registry.get(name, target.version)  # NotFoundError names the versions there are
        elif target.alias not in aliases:
            if not registry.list_versions(name):
                raise UserInputError(f"model {name!r} of experiment {experiment.name!r} is not registered")
            have = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none set"
            raise UserInputError(f"{target.name!r} of experiment {experiment.name!r} uses alias {target.alias!r} "
                                 f"of {name}, which is not set (aliases: {have}); set it with: aiplatform models "
                                 f"promote {name} VERSION --alias {target.alias}")


def _describe_experiment(experiment, revision: int | None, active: bool) -> None:
    from rich.table import Table

    state = "[green]running[/]" if active else "stopped"
    console.print(f"[bold]{experiment.name}[/] on model {experiment.model_name}: {state}"
                  + (f", revision {revision}" if revision is not None else "") + f", salt {experiment.salt!r}",
                  highlight=False)
    table = Table(show_edge=False)
    for col in ("variant", "serves", "weight", "traffic"):
        table.add_column(col, justify="right" if col in ("weight", "traffic") else "left")
    shares = experiment.shares()
    control = experiment.control_variant.name
    for v in experiment.variants:
        table.add_row(v.name + (" (control)" if v.name == control else ""), v.target, f"{v.weight:g}",
                      f"{shares[v.name]:.1%}")
    console.print(table)
    if experiment.shadow is not None:
        sh = experiment.shadow
        console.print(f"shadow {sh.name}: {sh.target} gets a copy of {sh.share:.0%} of requests (not served)",
                      highlight=False)


@experiments_app.command("start")
def experiments_start(
    file: Path = typer.Argument(..., help="The experiment, YAML or JSON: name, model_name, variants, shadow."),
    reason: str = typer.Option("", help="Why (kept in the experiment's history)."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Start an experiment, or change a running one (weights, variants) from its file.

    Serving replicas pick it up within seconds: each user gets one variant, the same on every
    request for as long as the weights stay the same. One experiment per model at a time.
    """
    from aiplatform.experiments.config import load_experiment

    try:
        experiment = load_experiment(file)
        layout, store = _experiment_store(home)
        _check_targets(layout, experiment)
        revision = store.put(experiment, reason=reason)
    except AIPlatformError as exc:
        raise fail_named(exc)
    _describe_experiment(experiment, revision, True)
    console.print(f"started {experiment.name} (revision {revision}); results: aiplatform experiments report "
                  f"{experiment.name}", highlight=False)


@experiments_app.command("show")
def experiments_show(name: str = typer.Argument(..., help="Experiment name."), home: Optional[str] = HomeOpt) -> None:
    """An experiment's variants, weights and shadow, and the history of its revisions."""
    try:
        _, store = _experiment_store(home)
        history = store.history(name)
        if not history:
            raise _no_experiment(store, name)
        experiment = store.get(name)
    except AIPlatformError as exc:
        raise fail_named(exc)
    last = history[-1]
    _describe_experiment(experiment, last["revision"], last["active"])
    for rev in history:
        weights = ", ".join(f"{v['name']} {v['weight']:g}" for v in rev["config"]["variants"])
        console.print(f"  revision {rev['revision']} at {rev['set_at']:%Y-%m-%d %H:%M:%S UTC} by {rev['actor'] or 'unknown'}: "
                      f"{'active' if rev['active'] else 'stopped'} ({weights}) {rev['reason'] or ''}".rstrip(),
                      highlight=False)


@experiments_app.command("stop")
def experiments_stop(name: str = typer.Argument(..., help="Experiment name."),
                     reason: str = typer.Option("", help="Why (kept in the experiment's history)."),
                     home: Optional[str] = HomeOpt) -> None:
    """Stop an experiment: every user gets the model's alias again within seconds."""
    try:
        _, store = _experiment_store(home)
        was_active = store.is_active(name)
        revision = store.stop(name, reason=reason)
    except AIPlatformError as exc:
        raise fail_named(exc)
    if was_active:
        console.print(f"stopped {name} (revision {revision})", highlight=False)
    else:
        console.print(f"{name} is already stopped (revision {revision}): nothing to do", highlight=False)


def _fmt_ci(rate: float, ci: tuple[float, float]) -> str:
    return f"{rate:.2%} [{ci[0]:.2%}, {ci[1]:.2%}]"


@experiments_app.command("report")
def experiments_report(
    name: str = typer.Argument(..., help="Experiment name."),
    alpha: float = typer.Option(0.05, min=0.0001, max=0.5, help="Error level of intervals and verdicts."),
    look_every: int = typer.Option(100, min=1, help="Exposures between the looks of the sequential test."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Per variant: exposures, users, click/cart/purchase rates with intervals and, against
    control, the difference with an always-valid p-value and confidence sequence.

    Always valid: reading this report every hour and stopping when it says "better" keeps
    the error rate at alpha (a plain z-test read that way does not). Verdicts: better, worse,
    or no difference yet.
    """
    from rich.table import Table

    from aiplatform.experiments.stats import variant_report

    try:
        _, store = _experiment_store(home)
        experiment = store.get(name)
        if experiment is None:
            raise _no_experiment(store, name)
        exposures = store.exposures(name)
        outcomes = store.outcomes(set(exposures["request_id"]))
        shadow = store.shadow(name)
        report = variant_report(exposures, outcomes, experiment.control_variant.name, alpha=alpha,
                                look_every=look_every, variants=[v.name for v in experiment.variants])
    except AIPlatformError as exc:
        raise fail_named(exc)
    active = store.is_active(name)
    console.print(f"[bold]{name}[/] on model {experiment.model_name} ({'running' if active else 'stopped'}): "
                  f"{len(exposures):,} exposures; intervals at {1 - alpha:.0%}", highlight=False)
    for vs in report:
        title = (f"{vs.variant}{' (control)' if vs.is_control else ''}: {vs.exposures:,} exposures, "
                 f"{vs.users:,} users")
        console.print(f"[bold]{title}[/]", highlight=False)
        table = Table(show_edge=False)
        columns = ["metric", "rate [CI]"] + ([] if vs.is_control else
                                             ["vs control", "confidence sequence", "always-valid p", "verdict"])
        for col in columns:
            table.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
        for m in vs.metrics.values():
            row = [m.metric, _fmt_ci(m.rate, m.ci)]
            if not vs.is_control:
                style = {"better": "green", "worse": "red"}.get(m.verdict or "", "")
                row += [f"{m.difference:+.2%}", f"[{m.cs[0]:+.2%}, {m.cs[1]:+.2%}]",
                        f"{m.p_value:.3f}" if m.p_value >= 0.001 else "<0.001",
                        f"[{style}]{m.verdict}[/]" if style else str(m.verdict)]
            table.add_row(*row)
        console.print(table)
    if len(shadow):
        console.print(f"shadow: {len(shadow):,} mirrored requests, mean latency {shadow['latency_ms'].mean():.1f} ms, "
                      f"mean overlap@k with the live answer {shadow['overlap'].mean():.2f}", highlight=False)


@experiments_app.command("canary")
def experiments_canary(
    model: str = typer.Argument(..., help="Model name, e.g. two_tower."),
    version: int = typer.Argument(..., min=1, help="The version to ramp up."),
    steps: str = typer.Option("5,25,50,100", help="Canary traffic per step, percent, increasing."),
    step_seconds: float = typer.Option(60.0, help="How long each step must stay healthy."),
    max_error_rate_delta: float = typer.Option(0.02, help="Roll back when the canary's error rate exceeds "
                                                          "control's by more than this."),
    max_p99_ratio: float = typer.Option(1.5, help="Roll back when the canary's p99 latency exceeds control's "
                                                  "times this..."),
    min_p99_excess_ms: float = typer.Option(25.0, help="...and by more than this many milliseconds (a fast "
                                                       "service's p99 is noisy)."),
    min_requests: int = typer.Option(50, help="Requests each side needs before a step is judged."),
    alias: str = typer.Option("champion", help="The alias that control serves, and that is promoted."),
    reason: str = typer.Option("", help="Why (kept in the histories)."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Ramp VERSION up against the alias step by step; promote it if every step stays healthy.

    Each step gives the canary its share of users and compares error rate and p99 latency
    with control's over the step; a breach rolls back at once (canary weight 0, experiment
    stopped, exit 1) and the alias stays where it was. Passing every step moves the alias to
    VERSION (compare-and-set, like models promote).
    """
    from aiplatform.experiments.canary import run_canary
    from aiplatform.registry.aliases import default_actor
    from aiplatform.registry.registry import ModelRegistry

    try:
        plan = _canary_plan(steps, step_s=step_seconds, max_error_rate_delta=max_error_rate_delta,
                            max_p99_ratio=max_p99_ratio, min_p99_excess_ms=min_p99_excess_ms,
                            min_requests=min_requests)
        layout, store = _experiment_store(home)
        registry = ModelRegistry(layout)
        before = _check_canary_target(registry, store, model, version, alias)
    except AIPlatformError as exc:
        raise fail_named(exc)
    actor = default_actor()
    console.print(f"canary of {model} v{version} against {alias} (v{before}): steps "
                  f"{_percentages(plan.steps)}, {plan.step_s:g} s each", highlight=False)
    try:
        result = run_canary(store, model, version, plan, control_alias=alias, actor=actor,
                            on_step=_step_printer(len(plan.steps)), stop_when_passed=False)
    except AIPlatformError as exc:
        raise fail_named(exc)
    if result["outcome"] != "passed":
        err.print(f"[bold red]canary rolled back[/] at {result['step']:g}%: {result['reason']}; {alias} of {model} "
                  f"stays at v{before}", highlight=False)
        raise typer.Exit(1)
    console.print("canary passed every step", highlight=False)
    move = _promote_canary(registry, store, result["name"], model, version, alias, actor=actor,
                           reason=reason or f"canary {result['name']} passed {_percentages(plan.steps)}")
    print_move(model, move)


def _percentages(steps: list[float]) -> str:
    return ", ".join(f"{s:g}%" for s in steps)


def _canary_plan(steps: str, **thresholds: float):
    """Parse --steps and check the whole plan before anything starts: a typo is bad input (2),
    not a canary that ramps up on a plan nobody meant."""
    from pydantic import ValidationError

    from aiplatform.experiments.canary import CanaryPlan
    from aiplatform.experiments.config import describe_validation_error

    try:
        parsed = [float(s) for s in steps.split(",") if s.strip()]
    except ValueError:
        raise UserInputError(f"--steps {steps!r}: give increasing percentages separated by commas, "
                             "e.g. 5,25,50,100") from None
    try:
        return CanaryPlan(steps=parsed, **thresholds)
    except ValidationError as exc:
        raise UserInputError(describe_validation_error(exc, "canary")) from None


def _check_canary_target(registry, store, model: str, version: int, alias: str) -> int:
    """The version the alias points at now, once the canary is known to make sense.

    VERSION must be registered and not already the alias's, and the model must have no other
    experiment running (one per model); its own canary experiment, left running by an earlier
    attempt, is picked up again by run_canary."""
    registry.get(model, version)
    before = registry.get_by_alias(model, alias).version
    if before == version:
        raise UserInputError(f"{alias} of {model} already points at v{version}: nothing to canary")
    running = store.active(model)
    canary_name = f"canary-{model}-v{version}"
    if running is not None and running[0].name != canary_name:
        raise UserInputError(f"model {model!r} already has an active experiment, {running[0].name!r} (revision "
                             f"{running[1]}): stop it first (aiplatform experiments stop {running[0].name})")
    return before


def _step_printer(n_steps: int) -> Callable[[dict], None]:
    """run_canary's on_step callback: one line when a step starts, one when it is judged healthy,
    so whoever watches a long ramp sees where it is (a breach is said once, by the caller)."""

    def on_step(event: dict) -> None:
        where = f"step {event['index'] + 1}/{n_steps} ({event['step']:g}%)"
        if event["event"] == "step_started":
            console.print(f"{where}: started (revision {event['revision']})", highlight=False)
        elif event["event"] == "step_passed":
            c, k = event["control"], event["canary"]
            console.print(f"{where}: [green]healthy[/] after {event['elapsed_s']:.1f} s: canary "
                          f"{k['requests']} requests, {k['error_rate']:.1%} errors, p99 {k['p99_ms']:.0f} ms; "
                          f"control {c['requests']} requests, {c['error_rate']:.1%} errors, p99 {c['p99_ms']:.0f} ms",
                          highlight=False)

    return on_step


def _promote_canary(registry, store, experiment: str, model: str, version: int, alias: str, *,
                    actor: str, reason: str) -> dict:
    """Move the alias to the canary's version, then stop the canary's experiment.

    The alias moves first and the experiment stops after: users on the canary stay on VERSION
    throughout (stopped first, they would flip back to the old version until the move). The
    experiment is stopped even when the move fails, so no half-finished canary keeps running."""
    try:
        return registry.promote(model, version, alias, reason=reason, actor=actor)
    except AIPlatformError as exc:
        raise fail_named(exc)
    finally:
        store.stop(experiment, actor=actor, reason=f"canary of v{version} passed every step")
