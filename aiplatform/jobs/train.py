"""Training job: lake -> point-in-time examples -> Ray Train -> evaluation -> registry.

This is the entrypoint for ``ray job submit``::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m aiplatform.jobs.train --home /data/aiplatform --epochs 3

It runs on whatever cluster ``RAY_ADDRESS`` names (a job's driver inherits it), reads the
lake under the storage root, and registers the model as ``champion`` when it beats the
popularity baseline on the held-out days (or always, with ``--always-promote``).
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from aiplatform.core.errors import AIPlatformError, UserInputError
from aiplatform.core.runtime import ensure_ray
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.features import pipeline as features
from aiplatform.features.compute import user_features_at
from aiplatform.registry.registry import ModelRegistry, ModelVersion
from aiplatform.training.config import TrainConfig
from aiplatform.training.evaluate import evaluate_model, popularity_ranking, split_by_time
from aiplatform.training.train import train_two_tower

log = logging.getLogger("aiplatform.jobs.train")

TARGET_TYPES = ("view", "click", "add_to_cart", "purchase")


@dataclass
class TrainingReport:
    model_name: str
    version: int
    promoted: bool
    metrics: dict
    examples: int
    validation_users: int
    cutoff: str
    checkpoint: str
    train_seconds: float
    eval_seconds: float

    def beats_baseline(self) -> bool:
        m, p = self.metrics["model"], self.metrics["popularity"]
        return m["recall@10"] > p["recall@10"] and m["ndcg@10"] > p["ndcg@10"]


def run_training(layout: Layout, config: TrainConfig, model_name: str = "two_tower",
                 always_promote: bool = False) -> TrainingReport:
    """Train, evaluate on a time-based split, register, and promote to ``champion``."""
    if not lake.has_data(layout):
        raise UserInputError(
            f"no data in the lake at {layout.lake}: import some first "
            "(aiplatform data import --events E --items I) or run aiplatform quickstart")
    events_pd = lake.read_events(layout)
    items = lake.read_items(layout)
    cutoff, train_events, truth = split_by_time(events_pd, config.holdout_days)
    if not truth:
        raise UserInputError(
            f"no user has both history before and clicks/carts/purchases after the cutoff "
            f"{cutoff} ({config.holdout_days} held-out days): bring more days of events or "
            "lower holdout_days")
    boundary = cutoff + pd.Timedelta(microseconds=1)  # events at the cutoff are training data
    events = features.read_events(layout)
    start = features.utc(events_pd["timestamp"].min())
    allowed = TARGET_TYPES[TARGET_TYPES.index(config.min_event_type):]
    examples = features.build_training_examples(events, start, boundary, allowed).materialize()
    n_examples = examples.count()
    if n_examples == 0:
        raise UserInputError("no training examples before the cutoff: bring more events")
    log.info("%d training examples before %s; %d validation users", n_examples, cutoff, len(truth))
    run_name = f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train_two_tower(examples, items, config, layout.runs, run_name)

    eval_started = time.perf_counter()
    # The validation users' features at the cutoff: the same function the pipeline runs on
    # Ray Data, here on the driver's copy of the events (small next to the training set).
    context = user_features_at(train_events[train_events["user_id"].isin(truth)], boundary)
    popular = popularity_ranking(train_events)
    metrics = evaluate_model(result.model, result.vocab, context, truth, popular, k=config.eval_k)
    eval_seconds = time.perf_counter() - eval_started

    registry = ModelRegistry(layout)
    lineage = {
        "events": int(len(events_pd)), "items": int(len(items)), "examples": int(n_examples),
        "cutoff": str(cutoff), "run": run_name,
    }
    version: ModelVersion = registry.register(
        model_name, result.checkpoint_path, metrics=metrics, params=result.params,
        checkpoint_uri=result.checkpoint_path, lineage=lineage)
    report = TrainingReport(
        model_name=model_name, version=version.version, promoted=False, metrics=metrics,
        examples=int(n_examples), validation_users=len(truth), cutoff=str(cutoff),
        checkpoint=result.checkpoint_path, train_seconds=result.duration_s, eval_seconds=eval_seconds)
    if always_promote or report.beats_baseline():
        registry.set_alias(model_name, "champion", version.version,
                           reason="beats popularity" if report.beats_baseline() else "forced")
        report.promoted = True
    return report


def format_metrics(metrics: dict) -> str:
    rows = [f"{'':12s} {'recall@10':>10s} {'ndcg@10':>10s}"]
    for name in ("model", "popularity"):
        m = metrics[name]
        rows.append(f"{name:12s} {m['recall@10']:10.4f} {m['ndcg@10']:10.4f}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiplatform.jobs.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", help="storage root (default: $AIPLATFORM_HOME or ./.aiplatform)")
    parser.add_argument("--config", help="training config YAML (see apps/shop/train.yaml)")
    parser.add_argument("--model-name", default="two_tower")
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--always-promote", action="store_true",
                        help="make the new version champion even if it does not beat popularity")
    parser.add_argument("--report", help="also write the report as JSON to this path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        overrides = {k: v for k, v in {"epochs": args.epochs, "num_workers": args.num_workers}.items()
                     if v is not None}
        config = (TrainConfig.from_yaml(args.config, **overrides) if args.config
                  else TrainConfig(**overrides))
        settings = Settings.load(home=args.home)
        layout = Layout.at(settings.home)
        ensure_ray(settings, quiet=False)
        log.info("training %s on %s with %s", args.model_name, layout.root, config.model_dump())
        report = run_training(layout, config, args.model_name, args.always_promote)
    except AIPlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_metrics(report.metrics))
    verdict = "beats" if report.beats_baseline() else "does NOT beat"
    print(f"model {report.model_name} v{report.version}: {verdict} the popularity baseline; "
          f"{'promoted to champion' if report.promoted else 'not promoted'}")
    if args.report:
        Path(args.report).write_text(json.dumps(asdict(report), indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
