"""Training job: lake -> point-in-time examples -> Ray Train -> evaluation -> registry.

This is the entrypoint for ``ray job submit``::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python -m aiplatform.jobs.train --home /data/aiplatform --epochs 3

It runs on whatever cluster ``RAY_ADDRESS`` names (a job's driver inherits it), reads the
lake under the storage root, evaluates the model against the popularity and co-occurrence
baselines on the held-out days and checks the config's quality ``gates``.

Features: the model's inputs are derived from the served feature service
(``models.inputs.UserInputSpec``: its numeric features, the history and exclusion lists named by
``history_feature``/``exclude_feature``). The job first brings the offline tables up to date, an
explicit step and the only write to the feature store, then builds every frame it needs with ONE
point-in-time join: the training examples (features just before each event) and the validation
users' features at the cutoff are one labels frame, told apart by ``label_kind``.

Gates:

- every trained model is registered (its metrics are worth keeping);
- a model that passes every gate gets the alias ``challenger``, and ``champion`` too when the
  model has no champion yet (so a first run can serve) or with ``--promote``;
- a model that fails a gate gets no alias; the log and the report name the gate and the
  numbers. The exit code stays 0 unless ``--fail-on-gate`` (then 3);
- ``--always-promote`` makes the new version champion whatever the gates say.
"""

import argparse
import contextlib
import json
import logging
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow.compute as pc
import pyarrow.fs as pafs

from aiplatform.core.errors import AIPlatformError, UserInputError
from aiplatform.core.runtime import ensure_ray
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout, filesystem_for, is_uri
from aiplatform.data import eventlog, lake
from aiplatform.features import pipeline as features
from aiplatform.models.inputs import UserInputSpec
from aiplatform.registry.lineage import collect as collect_lineage
from aiplatform.registry.registry import ModelRegistry, ModelVersion
from aiplatform.training.config import TrainConfig
from aiplatform.training.evaluate import (
    CooccurrenceBaseline,
    check_gates,
    evaluate_model,
    popularity_ranking,
    ranker_verdict,
    split_by_time,
)
from aiplatform.training.ranker import RankerConfig, attach_ranker, evaluate_ranker, train_ranker
from aiplatform.training.train import train_two_tower

log = logging.getLogger("aiplatform.jobs.train")

TARGET_TYPES = ("view", "click", "add_to_cart", "purchase")
EXIT_GATE_FAILED = 3
BASELINES = ("popularity", "cooccurrence")
LABEL_KIND = "label_kind"
"""Marker column of the one labels frame: ``example`` (a training example) or ``context`` (a
validation user at the cutoff)."""


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
    aliases: list[str] = field(default_factory=list)
    gates: list[dict] = field(default_factory=list)

    @property
    def gates_passed(self) -> bool:
        return all(g["passed"] for g in self.gates)

    @property
    def failed_gates(self) -> list[dict]:
        return [g for g in self.gates if not g["passed"]]

    def beats_baselines(self) -> dict[str, bool]:
        """Per evaluated baseline: is the model ahead on both recall@k and NDCG@k?"""
        return dict(self.metrics.get("beats_baselines", {}))

    def beats_baseline(self) -> bool:
        """Ahead of the popularity baseline (the check older callers use)."""
        return bool(self.beats_baselines().get("popularity", False))


def run_training(layout: Layout, config: TrainConfig, model_name: str = "two_tower",
                 always_promote: bool = False, promote: bool = False,
                 settings: Settings | None = None, resume: str | None = None) -> TrainingReport:
    """Train, evaluate on a time-based split against two baselines, register, apply the gates.

    Aliases: ``challenger`` when every gate passes; ``champion`` as well when none exists yet
    or ``promote`` is set; ``champion`` whatever the gates say with ``always_promote``.
    """
    if not lake.has_data(layout):
        raise UserInputError(
            f"no data in the lake at {layout.lake}: import some first "
            "(aiplatform data import --events E --items I) or run aiplatform quickstart")
    settings = settings or Settings.load()
    service = features.served_service(settings)
    # The model's inputs, from the declaration: a bad history/exclusion name fails here, first.
    inputs = UserInputSpec.from_service(service, config.history_feature, config.exclude_feature)
    popularity = features.popularity_view(settings) if config.ranker else None
    log.info("model inputs: %s", inputs.describe())
    events_pd = eventlog.read_events(layout).to_pandas()  # the lake plus events pushed since
    items = lake.read_items(layout)
    cutoff, train_events, truth = split_by_time(events_pd, config.holdout_days)
    if not truth:
        raise UserInputError(
            f"no user has both history before and clicks/carts/purchases after the cutoff "
            f"{cutoff} ({config.holdout_days} held-out days): bring more days of events or "
            "lower holdout_days")
    boundary = cutoff + pd.Timedelta(microseconds=1)  # events at the cutoff are training data
    allowed = TARGET_TYPES[TARGET_TYPES.index(config.min_event_type):]
    # Step 1, the only write: bring the offline tables up to date (explicitly, once).
    views = [*service.views, *([popularity] if popularity is not None else [])]
    started = time.perf_counter()
    for run in features.update_offline(layout, views):
        log.info("offline table %s (version %s): %s, %d rows written", run.view, run.version, run.mode,
                 run.rows_written)
    log.info("offline feature tables up to date in %.1fs", time.perf_counter() - started)
    # Step 2, reads only: ONE point-in-time join of every label with the service. Each example
    # gets the user's feature row as of just before its event (the row serving would have read
    # then); each validation user its row at the cutoff.
    labels = features.training_labels(events_pd, boundary, allowed).assign(**{LABEL_KIND: "example"})
    at_cutoff = pd.DataFrame({"user_id": sorted(truth), "event_timestamp": features.utc(cutoff), LABEL_KIND: "context"})
    frame = features.service_frame(layout, service, pd.concat([labels, at_cutoff], ignore_index=True)).materialize()
    examples = _rows_of(frame, "example").materialize()
    context = _rows_of(frame, "context").to_pandas()
    del frame
    n_examples = examples.count()
    if n_examples == 0:
        raise UserInputError("no training examples before the cutoff: bring more events")
    log.info("%d training examples before %s; %d validation users", n_examples, cutoff, len(truth))
    # A run whose driver died continues from its latest checkpoint (Ray Train V2 resumes by name).
    run_name = resume or f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = train_two_tower(examples, items, config, layout.runs, run_name, inputs=inputs,
                             require_existing=resume is not None)

    eval_started = time.perf_counter()
    popular = popularity_ranking(train_events)
    cooc = CooccurrenceBaseline.fit(train_events, popular)
    metrics = evaluate_model(result.model, result.vocab, context, truth, popular, k=config.eval_k,
                             cooccurrence=cooc, k_large=config.eval_k_large)
    ranker_path = None
    if config.ranker:
        # Retrieve-then-rank: the ranker re-orders the two-tower's top candidates; it travels
        # inside the same artifact (``ranker/``), so one registry version carries both.
        # Item features: the popularity view's latest row per item at the cutoff (point in time).
        ranker = train_ranker(examples, items, result.vocab, RankerConfig(), layout.runs, run_name + "-ranker",
                              retrieval_model=result.model, item_counts=_item_features(layout, popularity, cutoff),
                              inputs=inputs)
        metrics["ranker"] = evaluate_ranker(ranker.model, result.model, result.vocab, context, truth,
                                            k=config.eval_k)
        r, k = metrics["ranker"], config.eval_k
        log.info("ranker: NDCG@%d %.4f in retrieval order -> %.4f ranked; recall@%d %.4f -> %.4f",
                 k, r["retrieval"][f"ndcg@{k}"], r["ranked"][f"ndcg@{k}"],
                 k, r["retrieval"][f"recall@{k}"], r["ranked"][f"recall@{k}"])
        # Only a ranker that improves the held-out order is served (ranker_min_ndcg_gain).
        r["attached"], r["verdict"] = ranker_verdict(r, k, config.ranker_min_ndcg_gain)
        (log.info if r["attached"] else log.warning)(r["verdict"])
        if r["attached"]:
            ranker_path = ranker.path
    gates = [asdict(g) for g in check_gates(metrics, config.gates, config.eval_k)]
    metrics["gates"] = gates
    eval_seconds = time.perf_counter() - eval_started
    log.info(baseline_sentence(metrics, config.eval_k))

    registry = ModelRegistry(layout)
    lineage = collect_lineage(
        layout, service, config.model_dump(mode="json"),
        evaluation={"split": f"time: last {config.holdout_days} days", "cutoff": str(cutoff),
                    "users": int(metrics.get("users", len(truth)))},
        events=int(len(events_pd)), items=int(len(items)), examples=int(n_examples), run=run_name)
    with artifact_to_register(result.checkpoint_path, ranker_path) as artifact_dir:
        version: ModelVersion = registry.register(
            model_name, artifact_dir, metrics=metrics, params=result.params,
            checkpoint_uri=result.checkpoint_path, lineage=lineage)
    report = TrainingReport(
        model_name=model_name, version=version.version, promoted=False, metrics=metrics,
        examples=int(n_examples), validation_users=len(truth), cutoff=str(cutoff),
        checkpoint=result.checkpoint_path, train_seconds=result.duration_s, eval_seconds=eval_seconds,
        gates=gates)
    for g in gates:
        (log.info if g["passed"] else log.warning)(g["message"])
    report.aliases = apply_aliases(registry, model_name, version.version, report.gates_passed,
                                   promote=promote, always_promote=always_promote)
    if not report.gates_passed:
        log.warning("model %s v%d failed %d gate(s): %s", model_name, version.version,
                    len(report.failed_gates), "champion anyway (--always-promote)" if always_promote
                    else "registered without an alias")
    report.promoted = "champion" in report.aliases
    return report


def _rows_of(frame, kind: str):
    """The rows of the labels frame whose ``label_kind`` is ``kind``."""
    return frame.map_batches(lambda b: b.filter(pc.equal(b[LABEL_KIND], kind)), batch_format="pyarrow",
                             batch_size=None)


def _item_features(layout: Layout, view, as_of: pd.Timestamp) -> pd.DataFrame:
    """``item_id`` + the numeric features of ``view``: each item's latest row at ``as_of``."""
    names = [n for n, t in view.dtypes.items() if t in ("int64", "float64", "bool")]
    rows = features.latest_item_rows(layout, view, as_of, names)
    return rows.rename(columns={view.entity.join_key: "item_id"})[["item_id", *names]]


@contextlib.contextmanager
def artifact_to_register(checkpoint: str, ranker_path: str | None = None) -> Iterator[str]:
    """The folder to register: the run's best checkpoint, with the ranker in ``ranker/`` when
    one is given.

    A local checkpoint gets the ranker attached in place. A checkpoint in the object store is
    never written to: it is downloaded to a temporary folder, the ranker is attached there and
    that folder is registered (the registry uploads it to the version's own folder). Without a
    ranker the checkpoint is registered as it is, wherever it is."""
    if ranker_path is None:
        yield checkpoint
        return
    if not is_uri(checkpoint):
        attach_ranker(ranker_path, checkpoint)
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="aiplatform-artifact-") as tmp:
        local = Path(tmp) / "artifact"
        local.mkdir()
        fs, path = filesystem_for(checkpoint)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        attach_ranker(ranker_path, str(local))
        yield str(local)


def apply_aliases(registry: ModelRegistry, model_name: str, version: int, gates_passed: bool,
                  promote: bool = False, always_promote: bool = False) -> list[str]:
    """Set and return the aliases a new version earns.

    Passing every gate earns ``challenger``; ``champion`` too when the model has none yet (a
    first run must be servable) or with ``promote``. ``always_promote`` makes it champion
    whatever the gates say. A version that fails a gate and is not forced gets nothing.
    """
    aliases: list[str] = []
    if gates_passed:
        registry.set_alias(model_name, "challenger", version, reason="passed the quality gates")
        aliases.append("challenger")
        has_champion = "champion" in registry.aliases(model_name)
        if promote or not has_champion:
            registry.set_alias(model_name, "champion", version,
                               reason="passed the gates; --promote" if promote else "passed the gates; first champion")
            aliases.append("champion")
    if always_promote and "champion" not in aliases:
        registry.set_alias(model_name, "champion", version, reason="forced (--always-promote)")
        aliases.append("champion")
    return aliases


def baseline_sentence(metrics: dict, k: int = 10) -> str:
    """One plain sentence: does the model beat each baseline (recall@k and NDCG@k), by how much."""
    m = metrics["model"][f"recall@{k}"]
    parts = []
    for name, won in metrics.get("beats_baselines", {}).items():
        b = metrics[name][f"recall@{k}"]
        ratio = f", {m / b:.2f}x" if b > 0 else ""
        parts.append(f"{'beats' if won else 'does NOT beat'} {name} (recall@{k} {m:.4f} vs {b:.4f}{ratio})")
    return "the model " + " and ".join(parts) if parts else "no baseline was evaluated"


def format_metrics(metrics: dict) -> str:
    """A fixed-width table: one row per ranker, one column per metric of ``evaluate_model``."""
    rankers = [r for r in ("model", *BASELINES) if isinstance(metrics.get(r), dict)]
    cols = list(metrics["model"])
    rows = [f"{'':12s} " + " ".join(f"{c:>11s}" for c in cols)]
    for name in rankers:
        rows.append(f"{name:12s} " + " ".join(f"{metrics[name].get(c, float('nan')):11.4f}" for c in cols))
    ranker = metrics.get("ranker")
    if isinstance(ranker, dict) and "verdict" in ranker:
        rows.append(ranker["verdict"])
    return "\n".join(rows)


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
