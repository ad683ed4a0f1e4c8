"""Training job: lake -> point-in-time examples -> Ray Train -> evaluation -> registry.

This is the entrypoint for ``ray job submit``::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m aiplatform.jobs.train --home /data/aiplatform --epochs 3

It runs on whatever cluster ``RAY_ADDRESS`` names (a job's driver inherits it), reads the
lake under the storage root, and trains and evaluates what is served: the two-tower model
(Ray Train) and, on top of it, the candidate ranker (``training.candidates``: the two-tower,
co-occurrence, EASE, popularity and category sources merged by LightGBM LambdaRank). The
evaluation split adapts (``training.split``: the last ``holdout_days``, or each user's last
``holdout_fraction`` when that leaves too few users); the pipeline is scored against
popularity, co-occurrence and EASE with per-user paired verdicts (``training.recommender``).

Features: the model's inputs are derived from the served feature service
(``models.inputs.UserInputSpec``: its numeric features, the history and exclusion lists named by
``history_feature``/``exclude_feature``; the candidate ranker's recent-events lists, with their
``n`` and window). The job first brings the offline tables up to date, an explicit step and the
only write to the feature store, then builds every frame it needs with ONE point-in-time join:
the training examples (features just before each event), the validation users' features at
their cutoff and the ranker's window users' at theirs are one labels frame, told apart by
``label_kind``.

Gates:

- every trained model is registered (its metrics are worth keeping);
- a model that passes every gate gets the alias ``challenger``, and ``champion`` too when the
  model has no champion yet (so a first run can serve) or with ``--promote``;
- a model that fails a gate gets no alias; the log and the report name the gate and the
  numbers. The exit code stays 0 unless ``--fail-on-gate`` (then 3);
- ``--always-promote`` makes the new version champion whatever the gates say;
- fewer validation users than ``min(min_validation_users, all users)``: the gates cannot decide,
  "not enough validation data", no alias unless ``--promote``.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd
import pyarrow.compute as pc

from aiplatform.core.errors import AIPlatformError, ConfigError, UserInputError
from aiplatform.core.runtime import ensure_ray
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, lake
from aiplatform.features import pipeline as features
from aiplatform.features.definitions import FeatureService, FeatureView
from aiplatform.jobs.publish import apply_gate_outcome, quality_gates, register_version
from aiplatform.jobs.train_report import TrainingReport, baseline_sentence, format_metrics
from aiplatform.models.candidates import CandidateConfig, CandidateRanker
from aiplatform.models.inputs import UserInputSpec
from aiplatform.registry.registry import ModelRegistry
from aiplatform.training.baselines import Ease
from aiplatform.training.candidates import RankerWindow, fit_ranker, ranker_windows
from aiplatform.training.config import TrainConfig
from aiplatform.training.recommender import (
    TWO_TOWER,
    TwoTowerSource,
    evaluate_recommender,
    fit_ease,
    verdict_lines,
)
from aiplatform.training.split import EvalSplit, adaptive_split
from aiplatform.training.train import TrainResult, train_two_tower

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger("aiplatform.jobs.train")

TARGET_TYPES = ("view", "click", "add_to_cart", "purchase")
EXIT_GATE_FAILED = 3
LABEL_KIND = "label_kind"
"""Marker column of the one labels frame: ``example`` (a training example) or ``context`` (a
validation user at the cutoff)."""


@dataclass
class _EvalContext:
    """What every evaluation step reads: the split, every event and the catalogue, the trained
    two-tower as a candidate source and EASE (None when the catalogue is too large for it)."""

    split: EvalSplit
    events: pd.DataFrame
    items: pd.DataFrame
    two_tower: TwoTowerSource
    ease: Ease | None
    config: TrainConfig

    def score(self, ranker: CandidateRanker | None) -> dict:
        """The metrics of the pipeline (``ranker`` on top of the two-tower, or the two-tower
        alone when None) and of every baseline, on the held-out users."""
        return evaluate_recommender(ranker, self.two_tower, self.split, self.ease, self.config.eval_k,
                                    self.config.eval_k_large)


def run_training(layout: Layout, config: TrainConfig, model_name: str = "two_tower",
                 always_promote: bool = False, promote: bool = False,
                 settings: Settings | None = None, resume: str | None = None) -> TrainingReport:
    """Train the two-tower model and the candidate ranker, evaluate the served pipeline against
    every baseline on an adaptive split, register, apply the gates.

    Aliases: ``challenger`` when every gate passes; ``champion`` as well when none exists yet
    or ``promote`` is set; ``champion`` whatever the gates say with ``always_promote``. Too few
    validation users is a failed gate: no alias unless ``promote``/``always_promote``.
    """
    service, inputs, candidates = _served_contract(layout, config, settings)
    events_pd = eventlog.read_events(layout).to_pandas()  # the lake plus events pushed since
    items = lake.read_items(layout)
    split = _evaluation_split(events_pd, config)
    # The ranker's training windows: inside the training side (the ranker that is evaluated),
    # and over every event (the ranker that is served: the same procedure, refitted on all).
    windows = ranker_windows(split.train, candidates) if candidates is not None else []
    serve_windows = ranker_windows(events_pd, candidates) if candidates is not None else []
    allowed = TARGET_TYPES[TARGET_TYPES.index(config.min_event_type):]
    _update_offline_tables(layout, service)
    examples, contexts = _training_frames(layout, model_service(service, candidates), split,
                                          [*windows, *serve_windows], allowed)
    n_examples = examples.count()
    if n_examples == 0:
        raise UserInputError("no training examples before the cutoff: bring more events")
    log.info("%d training examples; %d validation users (%s)", n_examples, split.n_users, split.name)
    # A run whose driver died continues from its latest checkpoint (Ray Train V2 resumes by name).
    run_name = resume or f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train_two_tower(examples, items, config, layout.runs, run_name, inputs=inputs,
                             require_existing=resume is not None)

    eval_started = time.perf_counter()
    context = _eval_context(result, contexts, split, events_pd, items, candidates, config)
    metrics, served = _evaluate_pipeline(context, candidates, windows, serve_windows)
    metrics["split"] = split.summary()
    gates = quality_gates(metrics, split, events_pd, config)
    metrics["gates"] = gates
    eval_seconds = time.perf_counter() - eval_started
    for line in verdict_lines(metrics, config.eval_k):
        log.info(line)

    registry = ModelRegistry(layout)
    version = register_version(
        registry, layout, service, config, model_name=model_name, run_name=run_name, result=result, served=served,
        metrics=metrics, split=split,
        counts={"events": int(len(events_pd)), "items": int(len(items)), "examples": int(n_examples)})
    report = TrainingReport(
        model_name=model_name, version=version.version, promoted=False, metrics=metrics,
        examples=int(n_examples), validation_users=int(metrics["users"]), cutoff=str(split.cutoff),
        checkpoint=result.checkpoint_path, train_seconds=result.duration_s, eval_seconds=eval_seconds,
        gates=gates, split=split.name)
    apply_gate_outcome(registry, report, promote=promote, always_promote=always_promote)
    return report


def _served_contract(layout: Layout, config: TrainConfig,
                     settings: Settings | None) -> tuple[FeatureService, UserInputSpec, CandidateConfig | None]:
    """The served feature service, the model inputs read from it and the candidate ranker's
    config (None without ``ranker``). Runs first, before any data is read: an empty lake or a
    bad history/exclusion name in the declaration fails here, not after an hour of work."""
    if not lake.has_data(layout):
        raise UserInputError(
            f"no data in the lake at {layout.lake}: import some first "
            "(aiplatform data import --events E --items I) or run aiplatform quickstart")
    service = features.served_service(settings or Settings.load())
    inputs = UserInputSpec.from_service(service, config.history_feature, config.exclude_feature)
    candidates = candidate_config(service, config) if config.ranker else None
    log.info("model inputs: %s", inputs.describe())
    return service, inputs, candidates


def _evaluation_split(events: pd.DataFrame, config: TrainConfig) -> EvalSplit:
    """The adaptive split (``training.split``); one without a single scorable user is an error
    that says which knob to turn, since no gate could be decided on it."""
    split = adaptive_split(events, config.holdout_days, config.min_validation_users, config.holdout_fraction)
    log.info("evaluation split %s: %d validation users (%s)", split.name, split.n_users, split.reason)
    if not split.truth:
        raise UserInputError(
            f"no user has both history before and clicks/carts/purchases after the evaluation cutoff "
            f"({split.name}): bring more events, or lower holdout_days / raise holdout_fraction")
    return split


def _update_offline_tables(layout: Layout, service: FeatureService) -> None:
    """Step 1, the job's only write: bring the offline tables up to date (explicitly, once), so
    the point-in-time join that follows reads every event."""
    started = time.perf_counter()
    for run in features.update_offline(layout, service.views):
        log.info("offline table %s (version %s): %s, %d rows written", run.view, run.version, run.mode,
                 run.rows_written)
    log.info("offline feature tables up to date in %.1fs", time.perf_counter() - started)


def _training_frames(layout: Layout, service: FeatureService, split: EvalSplit, windows: list[RankerWindow],
                     allowed: tuple[str, ...]) -> "tuple[ray.data.Dataset, pd.DataFrame]":
    """Step 2, reads only: ONE point-in-time join of every label with the features of
    ``service`` (what the two-tower reads); returns the training examples and the context rows.

    Each example gets the user's feature row as of just before its event (the row serving would
    have read then); each validation user their row at their cutoff, and each user of the
    ranker's ``windows`` their row at that window's cutoff (the two-tower source's contexts).
    ``allowed``: the event types that make an example.
    """
    labels = features.training_labels(split.train, _after(split.train), allowed).assign(**{LABEL_KIND: "example"})
    seen = [split.user_cutoffs, *(w.split.user_cutoffs for w in windows)]
    context_rows = pd.concat([pd.DataFrame({"user_id": at.index.astype(str),
                                            "event_timestamp": pd.to_datetime(list(at), utc=True)}) for at in seen],
                             ignore_index=True).drop_duplicates().assign(**{LABEL_KIND: "context"})
    frame = features.service_frame(layout, service, pd.concat([labels, context_rows], ignore_index=True)).materialize()
    return _rows_of(frame, "example").materialize(), _rows_of(frame, "context").to_pandas()


def _eval_context(result: TrainResult, contexts: pd.DataFrame, split: EvalSplit, events: pd.DataFrame,
                items: pd.DataFrame, candidates: CandidateConfig | None, config: TrainConfig) -> _EvalContext:
    """The evaluation's inputs: the trained model as a candidate source (its users' feature rows
    from the one join) and EASE with its lambda chosen on the training side."""
    catalogue = pd.Index(sorted(set(items["item_id"].astype(str))))
    ease = fit_ease(split.train, catalogue, config.holdout_days, log.info)
    two_tower = TwoTowerSource(result.model, result.vocab, candidates.per_source if candidates else 100, contexts)
    return _EvalContext(split=split, events=events, items=items, two_tower=two_tower, ease=ease, config=config)


def _evaluate_pipeline(ev: _EvalContext, candidates: CandidateConfig | None, windows: list[RankerWindow],
                       serve_windows: list[RankerWindow]) -> tuple[dict, CandidateRanker | None]:
    """The metrics the gates judge and the candidate ranker to serve, if any.

    The ranker is fitted on the training side and kept only when the whole pipeline beats the
    two-tower alone (``pipeline_verdict``); then what is served is the same procedure refitted
    on every event (sources and LightGBM alike, its windows ending where the data ends), as the
    index covers the catalogue. Otherwise the two-tower alone is served, so it alone is judged.
    """
    if candidates is None:
        return ev.score(None), None
    if ev.ease is not None:
        candidates.ease_lambda = ev.ease.lam
    ranker = fit_ranker(ev.split.train, ev.items, candidates, external=ev.two_tower, windows=windows, log=log.info)
    metrics = ev.score(ranker)
    attached, verdict = pipeline_verdict(metrics, ev.config.eval_k, ev.config.ranker_min_ndcg_gain)
    metrics["ranker"] = {"attached": attached, "verdict": verdict, **ranker.report}
    (log.info if attached else log.warning)(verdict)
    if not attached:
        return ev.score(None) | {"ranker": metrics["ranker"]}, None
    served = fit_ranker(ev.events, ev.items, candidates, external=ev.two_tower, windows=serve_windows, log=log.info)
    metrics["ranker"]["served_fit"] = served.report
    return metrics, served


def _after(events: pd.DataFrame) -> pd.Timestamp:
    """Just after the last event: every training event may become a training example."""
    return pd.to_datetime(events["timestamp"], utc=True).max() + pd.Timedelta(microseconds=1)


def candidate_config(service, config: TrainConfig) -> CandidateConfig:
    """The candidate ranker's config, its history rule taken from the served declaration.

    Serving builds a user's history from three aligned ``last_n`` lists of the feature service
    (``CandidateConfig.events_features``); training must read the same events, so their ``n``
    and window become ``history_events``/``history_days``. Anything else is a ``ConfigError``
    that says what to declare."""
    cfg = CandidateConfig()
    names = list(cfg.events_features)
    found = {}
    for view in service.views:
        for agg in getattr(view, "aggregations", ()):
            if agg.name in names and agg.name in service.selected(view):
                found[agg.name] = agg
    expected = dict(zip(names, ("item_id", "event_type", "timestamp"), strict=True))
    problems = [f"{n} (last_n of {c}, not distinct)" for n, c in expected.items()
                if n not in found or found[n].function != "last_n" or found[n].column != c or found[n].distinct]
    if not problems and len({(a.n, a.window) for a in found.values()}) != 1:
        problems = ["the three lists with one n and one window"]
    if problems:
        raise ConfigError(
            f"the candidate ranker reads a user's recent events from feature service {service.name!r}, which "
            f"lacks {', '.join(problems)}: declare a view like user_recent_events in apps/shop/features.py "
            "and add it to the service, or set ranker: false in the training config")
    agg = found[names[0]]
    cfg.history_events = int(agg.n)
    cfg.history_days = agg.window.total_seconds() / 86_400
    return cfg


def model_service(service, candidates: CandidateConfig | None):
    """``service`` without the views that only the candidate ranker reads (its recent-events
    lists): the two-tower's training frame joins what the model reads, nothing more."""
    if candidates is None:
        return service
    only = set(candidates.events_features)
    keep = [i for i in service.features
            if not (isinstance(i, FeatureView) and set(service.selected(i)) <= only)]
    return FeatureService(service.name, tuple(keep), service.description)


def pipeline_verdict(metrics: dict, k: int, min_gain: float) -> tuple[bool, str]:
    """(serve the candidate ranker?, why): only when the whole pipeline orders the held-out
    users' items better than the two-tower alone (NDCG@k, by more than ``min_gain``)."""
    before, after = float(metrics[TWO_TOWER][f"ndcg@{k}"]), float(metrics["model"][f"ndcg@{k}"])
    need = before * (1.0 + min_gain)
    ok = min_gain <= -1.0 or after > need
    verb = "served" if ok else "NOT served (the two-tower alone is)"
    return ok, (f"candidate ranker {verb}: NDCG@{k} {before:.4f} two-tower alone -> {after:.4f} merged and ranked "
                f"(needs > {need:.4f}, ranker_min_ndcg_gain {min_gain:g})")


def _rows_of(frame, kind: str):
    """The rows of the labels frame whose ``label_kind`` is ``kind``."""
    return frame.map_batches(lambda b: b.filter(pc.equal(b[LABEL_KIND], kind)), batch_format="pyarrow",
                             batch_size=None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiplatform.jobs.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="storage root (default: $AIPLATFORM_HOME or ./.aiplatform)")
    parser.add_argument("--config", help="training config YAML (see apps/shop/train.yaml)")
    parser.add_argument("--model-name", default="two_tower")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--placement-strategy", choices=["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"],
                        help="how Ray places the training workers (STRICT_SPREAD: one per node)")
    parser.add_argument("--promote", action="store_true",
                        help="make the new version champion (not only challenger) when it passes the gates")
    parser.add_argument("--always-promote", action="store_true",
                        help="make the new version champion even if it fails the quality gates")
    parser.add_argument("--fail-on-gate", action="store_true",
                        help=f"exit with code {EXIT_GATE_FAILED} when the model fails a quality gate")
    parser.add_argument("--report", help="also write the report as JSON to this path")
    parser.add_argument("--resume", metavar="RUN_NAME",
                        help="continue this run (under <home>/runs) from its latest checkpoint, e.g. after the driver died")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        overrides = {k: v for k, v in {"epochs": args.epochs, "num_workers": args.num_workers,
                                        "placement_strategy": args.placement_strategy}.items()
                     if v is not None}
        config = (TrainConfig.from_yaml(args.config, **overrides) if args.config
                  else TrainConfig(**overrides))
        settings = Settings.load(home=args.home)
        layout = Layout.open(settings.home)  # a root that cannot be used fails here, before any work
        ensure_ray(settings, quiet=False)
        log.info("training %s on %s with %s", args.model_name, layout.root, config.model_dump())
        report = run_training(layout, config, args.model_name, args.always_promote, args.promote,
                              settings=settings, resume=args.resume)
    except AIPlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_metrics(report.metrics))
    print(f"model {report.model_name} v{report.version}: {baseline_sentence(report.metrics, config.eval_k)}")
    for g in report.failed_gates:
        print(g["message"])
    aliases = ", ".join(report.aliases) or "none (a quality gate failed)"
    print(f"model {report.model_name} v{report.version}: "
          f"{'passed' if report.gates_passed else 'FAILED'} the quality gates; aliases: {aliases}"
          + ("; promoted to champion" if report.promoted else ""))
    if args.report:
        payload = {**asdict(report), "gates_passed": report.gates_passed,
                   "beats_baselines": report.beats_baselines()}
        Path(args.report).write_text(json.dumps(payload, indent=2, default=str))
    if args.fail_on_gate and not report.gates_passed:
        return EXIT_GATE_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
