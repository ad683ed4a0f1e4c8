"""Distributed training of the two-tower model with Ray Train (V2) and Ray Data ingest.

Flow: the driver builds the item vocabulary, encodes the examples into model inputs with a
Ray Data ``map_batches`` (so workers receive ready-to-use integer/float columns, never pandas
frames), and hands the dataset to a ``TorchTrainer``. Each worker reads its shard with
``iter_torch_batches``; rank 0 writes a checkpoint per epoch that is itself a loadable model
artifact (``save_artifact``), so the registry can publish a checkpoint without converting it.

The run lives under ``RunConfig(storage_path=runs_dir, name=run_name)``; a restarted worker
group (``max_failures``) resumes from the last checkpoint, optimizer state included. ``runs_dir``
may be in the object store (``s3://…/runs``): Ray Train then writes through the storage root's
own filesystem (``RunStorage``), and checkpoint paths come back as URIs.

Reliability (why each piece exists):

- a ``validation`` slice (``validation_fraction`` of the encoded rows, not split between workers)
  is scored by rank 0 after every epoch against the *whole* catalogue (``val_loss``,
  ``val_recall``); checkpoints are ranked by ``checkpoint_metric`` and ``train_two_tower``
  returns the best one, so a late epoch that overfits never becomes the published model;
- every rank writes a tiny progress file (steps since its last checkpoint) under
  ``<run>/progress/``; after a worker failure the driver adds up the steps the dead attempt
  threw away (``TrainResult.steps_redone``), which is the real cost of a restart;
- ``precision``: bf16 autocast for forward+loss on CUDA, fp32 on CPU (``auto``).

Those pieces live in ``reliability.py``, the loop every worker runs in ``worker.py``; this module
is the data path and the driver.
"""

import logging
import time
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from aiplatform.core.errors import ConfigError, DataValidationError, NotFoundError
from aiplatform.core.schemas import EVENT_TYPES
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import (
    ItemVocab,
    TwoTowerModel,
    load_artifact,
    read_extra,
)
from aiplatform.training.config import TrainConfig
from aiplatform.training.reliability import (
    METRIC_ORDER,
    FaultInjection,
    RunStorage,
    best_checkpoint,
    collect_progress,
)

# The worker's seeding, under the name benchmarks/training.py imports to seed its plain-PyTorch
# peer the way the workers are seeded.
from aiplatform.training.worker import seed_everything as _seed_everything  # noqa: F401
from aiplatform.training.worker import train_loop_per_worker

if TYPE_CHECKING:
    import ray.data
    import ray.train

log = logging.getLogger(__name__)

EVENT_RANK: dict[str, int] = {t: i for i, t in enumerate(EVENT_TYPES)}
"""Funnel depth of each event type; unknown types rank as ``view`` (docs/architecture.md)."""
LABEL_COLUMNS: tuple[str, ...] = ("item_id", "event_type")
"""Columns of a training example besides the model inputs (``UserInputSpec.columns``)."""
ENCODE_BATCH_SIZE = 4096


@dataclass
class TrainResult:
    """What a training call produced.

    ``model``/``checkpoint_path`` are the run's *best* checkpoint by ``config.checkpoint_metric``
    (the latest one when there is no validation slice, or when no earlier checkpoint beats it by
    more than one standard error); ``history`` has every epoch of the run,
    earlier calls' epochs included when the run was resumed. ``steps_redone``: optimizer steps
    (per worker) that were trained and then lost to worker failures, ``restarts``: how many
    times the worker group was restarted during this call.
    """

    model: TwoTowerModel
    vocab: ItemVocab
    checkpoint_path: str
    history: list[dict]
    params: dict
    duration_s: float
    best_epoch: int = 0
    latest_checkpoint_path: str = ""
    steps_redone: int = 0
    restarts: int = 0


# ---- data: examples -> model inputs ------------------------------------------------------------
def example_columns(inputs: UserInputSpec) -> list[str]:
    """The columns of the training examples that training reads: the label and the model inputs."""
    return [*LABEL_COLUMNS, *inputs.columns]


class ExampleEncoder:
    """Ray Data UDF: example rows -> ``hist`` [B, L] int64, ``dense`` [B, n_dense] float32, ``item`` int64.

    The model inputs are read through the ``UserInputSpec`` (its history and dense features).

    Rows whose event is weaker than ``min_event_type`` or whose target item is not in the
    catalogue are dropped here, once, instead of being skipped in every worker every epoch.
    An instance (not a class) is passed to ``map_batches``, so it runs in plain tasks and
    holds no CPU between epochs; the vocabulary travels with it once per task.
    """

    def __init__(self, vocab: ItemVocab, inputs: UserInputSpec, min_event_type: str = "view") -> None:
        self.vocab, self.inputs = vocab, inputs
        self.min_rank = EVENT_RANK[min_event_type]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        columns = example_columns(self.inputs)
        missing = [c for c in columns if c not in batch]
        if missing:
            raise ValueError(f"training examples lack column(s) {missing} (feature service "
                             f"{self.inputs.service!r}); expected {columns}")
        rank = pd.Series(batch["event_type"], dtype=object).map(EVENT_RANK).fillna(0).to_numpy()
        item = self.vocab.indices(batch["item_id"])
        keep = (rank >= self.min_rank) & (item > 0)
        hist, dense = self.vocab.encode_batch(self.inputs, {c: np.asarray(batch[c])[keep] for c in self.inputs.columns})
        return {"hist": hist, "dense": dense, "item": item[keep]}


def encode_examples(
    examples: "ray.data.Dataset", vocab: ItemVocab, config: TrainConfig, inputs: UserInputSpec
) -> "ray.data.Dataset":
    """The encoded, shuffled training dataset.

    By default the rows are shuffled once (seeded) and kept in the object store, so an epoch
    only reads memory plus each worker's local shuffle buffer: re-encoding and re-shuffling
    every epoch cost about half of the step time on 2 cores (benchmarks/training.py).
    ``global_shuffle=True`` re-shuffles everything every epoch instead.
    """
    import ray.data

    ds = examples.map_batches(
        ExampleEncoder(vocab, inputs, config.min_event_type),
        batch_format="numpy",
        batch_size=ENCODE_BATCH_SIZE,
        compute=ray.data.TaskPoolStrategy(),
    )
    if config.global_shuffle:
        # A new, reproducible order each epoch: every epoch re-executes the dataset and
        # reseed_after_execution derives that execution's seed from config.seed.
        return ds.random_shuffle(seed=ray.data.RandomSeedConfig(seed=config.seed, reseed_after_execution=True))
    return ds.random_shuffle(seed=config.seed).materialize()


def training_datasets(
    examples: "ray.data.Dataset", vocab: ItemVocab, config: TrainConfig, inputs: UserInputSpec
) -> dict[str, "ray.data.Dataset"]:
    """``{"train": ..., "validation": ...}``: the encoded rows, shuffled once (seeded) and
    materialized, split ``1 - validation_fraction`` / ``validation_fraction``.

    The validation slice is held out from training on every epoch, so its metric measures
    generalisation, not memorisation; it is absent when the fraction is 0 or rounds to no
    row. ``global_shuffle=True`` re-shuffles the training part every epoch.
    """
    import ray.data

    encoded = examples.map_batches(
        ExampleEncoder(vocab, inputs, config.min_event_type),
        batch_format="numpy",
        batch_size=ENCODE_BATCH_SIZE,
        compute=ray.data.TaskPoolStrategy(),
    ).random_shuffle(seed=config.seed).materialize()
    datasets: dict[str, ray.data.Dataset] = {"train": encoded}
    if config.validation_fraction > 0:
        n = encoded.count()
        n_val = int(n * config.validation_fraction)
        if n_val >= 1 and n - n_val >= 2:
            train, val = encoded.split_at_indices([n - n_val])
            datasets = {"train": train, "validation": val}
    if config.global_shuffle:
        datasets["train"] = datasets["train"].random_shuffle(
            seed=ray.data.RandomSeedConfig(seed=config.seed, reseed_after_execution=True))
    return datasets


class _TargetCounter:
    """Ray Data UDF: how often each item index is a (kept) training target, per batch."""

    def __init__(self, vocab: ItemVocab, min_event_type: str) -> None:
        self.vocab, self.min_rank = vocab, EVENT_RANK[min_event_type]

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        rank = pd.Series(batch["event_type"], dtype=object).map(EVENT_RANK).fillna(0).to_numpy()
        item = self.vocab.indices(batch["item_id"])
        item = item[(rank >= self.min_rank) & (item > 0)]
        return {"counts": np.bincount(item, minlength=self.vocab.n_items + 1)[None, :]}


def item_frequencies(examples: "ray.data.Dataset", vocab: ItemVocab, config: TrainConfig) -> np.ndarray:
    """Target counts per item index (for the logQ correction), summed over the cluster: only
    one vector per batch comes back to the driver, never the examples."""
    import ray.data

    counts = examples.select_columns(["item_id", "event_type"]).map_batches(
        _TargetCounter(vocab, config.min_event_type), batch_format="numpy",
        batch_size=ENCODE_BATCH_SIZE, compute=ray.data.TaskPoolStrategy())
    total = np.zeros(vocab.n_items + 1, dtype=np.int64)
    for batch in counts.iter_batches(batch_format="numpy", batch_size=None):
        total += np.asarray(batch["counts"]).sum(axis=0)
    return total


def _check_examples(examples: "ray.data.Dataset", inputs: UserInputSpec) -> None:
    schema = examples.schema()
    names = set(schema.names) if schema is not None else set()
    columns = example_columns(inputs)
    missing = [c for c in columns if c not in names]
    if schema is not None and missing:
        raise DataValidationError(
            "training examples",
            f"missing column(s) {', '.join(missing)}",
            expected=f"the label and the inputs of feature service {inputs.service!r} (a point-in-time "
                     "frame of features.pipeline.service_frame): " + ", ".join(columns),
        )


# ---- the driver ----------------------------------------------------------------------------------
@dataclass
class _RunOutcome:
    """What a finished ``fit()`` left: the checkpoint to return (the best one) and the history."""

    model: TwoTowerModel
    vocab: ItemVocab
    best: "ray.train.Checkpoint"
    best_epoch: int
    latest: "ray.train.Checkpoint"
    history: list[dict]


def _resolve_use_gpu(config: TrainConfig) -> bool:
    """``use_gpu=None``: GPUs only when the cluster has one per worker (else workers never start)."""
    import ray

    if config.use_gpu is not None:
        return config.use_gpu
    return ray.cluster_resources().get("GPU", 0) >= config.num_workers


def _previous_result(runs: RunStorage, run_name: str) -> "ray.train.Result | None":
    import ray.train

    try:
        previous = ray.train.Result.from_path(runs.run_path(run_name), storage_filesystem=runs.filesystem)
    except RuntimeError:  # no such run (or never checkpointed): a fresh start
        return None
    return previous if previous.checkpoint is not None else None


def latest_epoch_of_run(runs_dir: str, run_name: str) -> int | None:
    """The last checkpointed epoch of ``<runs_dir>/<run_name>`` (a local folder or a URI), or
    None when there is no such run. For a ``--resume RUN_NAME`` flag: check the run exists
    before starting a job."""
    previous = _previous_result(RunStorage.of(runs_dir), run_name)
    if previous is None:
        return None
    with previous.checkpoint.as_directory() as d:
        return int(read_extra(d).get("epoch", 0))


def _vocab_of_existing_run(runs: RunStorage, run_name: str,
                           inputs: UserInputSpec) -> ItemVocab | None:
    """The vocabulary of the latest checkpoint of ``run_name``, if that run exists; a run
    trained on other model inputs cannot be continued (``ConfigError``)."""
    previous = _previous_result(runs, run_name)
    if previous is None:
        return None
    with previous.checkpoint.as_directory() as d:
        model, vocab = load_artifact(d)
    if model.inputs != inputs:
        raise ConfigError(f"run {run_name!r} was trained on other model inputs "
                          f"({model.inputs.describe() if model.inputs else 'none recorded'}) than this call's "
                          f"({inputs.describe()}): start a new run instead of resuming it")
    log.info("resuming run %s from %s", run_name, runs.uri_of(previous.checkpoint.path))
    return vocab


def _require_train_v2() -> None:
    """The loop relies on V2 behaviour (resume by run name, ``checkpoint_dir_name``): refuse V1."""
    from ray.train.v2._internal.constants import is_v2_enabled

    if not is_v2_enabled():
        raise ConfigError("RAY_TRAIN_V2_ENABLED=0 is not supported: unset it to use Ray Train V2")


def _run_vocab(runs: RunStorage, run_name: str, items: pd.DataFrame, config: TrainConfig,
               inputs: UserInputSpec, require_existing: bool) -> ItemVocab:
    """The vocabulary the examples are encoded with: a resumed run keeps its own (so examples
    are encoded as its weights expect), a new run builds one from today's catalogue."""
    previous_vocab = _vocab_of_existing_run(runs, run_name, inputs)
    if previous_vocab is None and require_existing:
        raise NotFoundError(f"no training run '{run_name}' with a checkpoint under {runs.uri}: "
                            "check the run name (aiplatform keeps runs under <home>/runs/) or start a new run")
    vocab = previous_vocab or ItemVocab.from_items(items, n_price_buckets=config.price_buckets)
    if vocab.n_items < 2:
        raise DataValidationError("items", f"{vocab.n_items} item(s) in the catalogue", column="item_id",
                                  expected="at least 2 distinct item ids")
    return vocab


def _loop_config(examples: "ray.data.Dataset", vocab: ItemVocab, config: TrainConfig, inputs: UserInputSpec, *,
                 validate: bool, run_uri: str, call_id: str, fault: FaultInjection | None) -> dict[str, Any]:
    """``train_loop_config``: plain values and object refs only, since Ray pickles it to every
    worker (the vocabulary and item counts go once through the object store)."""
    import ray

    return {
        "train_config": config.model_dump(),
        "vocab_ref": ray.put(vocab.to_dict()),
        "inputs": inputs.to_dict(),
        "item_counts_ref": ray.put(item_frequencies(examples, vocab, config)) if config.logq_correction else None,
        "validate": validate,
        "run_uri": run_uri,
        "call_id": call_id,
        "fault": asdict(fault) if fault is not None else None,
    }


def _scaling_config(config: TrainConfig, use_gpu: bool) -> "ray.train.ScalingConfig":
    """Workers, their resources (one GPU each when ``use_gpu``) and how Ray places them."""
    import ray.train

    return ray.train.ScalingConfig(
        num_workers=config.num_workers,
        use_gpu=use_gpu,
        resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        placement_strategy=config.placement_strategy,
    )


def _run_config(runs: RunStorage, run_name: str, config: TrainConfig, metric: str | None) -> "ray.train.RunConfig":
    """Where the run lives (``<runs>/<run_name>``, the storage root's own filesystem), which
    checkpoints are kept (ranked by ``metric``, else by recency) and how many failures it survives."""
    import ray.train

    return ray.train.RunConfig(
        storage_path=runs.path,
        storage_filesystem=runs.filesystem,
        name=run_name,
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=config.checkpoints_to_keep,
            checkpoint_score_attribute=metric,
            checkpoint_score_order=METRIC_ORDER[metric] if metric else "max",
        ),
        failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
    )


def _run_outcome(result: "ray.train.Result", run_name: str, metric: str | None) -> _RunOutcome:
    """The checkpoint to return (``best_checkpoint``: the latest unless an earlier one beats it
    by more than the validation noise), loaded, and the run's history."""
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint (no epoch completed)")
    with result.checkpoint.as_directory() as d:
        latest_extra = read_extra(d)
    best = best_checkpoint(result, metric, latest_extra.get("metrics") or {})
    with best.as_directory() as d:
        model, vocab = load_artifact(d)
        best_epoch = int(read_extra(d).get("epoch", 0))
    history = result.return_value or latest_extra.get("history") or []
    return _RunOutcome(model=model, vocab=vocab, best=best, best_epoch=best_epoch, latest=result.checkpoint,
                       history=list(history))


def _check_trained_on_something(history: list[dict], config: TrainConfig) -> None:
    """A run whose every epoch saw no sample trained nothing: say why rather than return it."""
    if history and all(h["samples"] == 0 for h in history):
        raise DataValidationError(
            "training examples",
            f"no example has a target item in the catalogue and an event of at least "
            f"'{config.min_event_type}'",
            column="item_id",
            hint="Check that the items file covers the events' item ids, or lower min_event_type",
        )


def _log_run(run_name: str, outcome: _RunOutcome, metric: str | None, steps_redone: int, restarts: int) -> None:
    """The driver's summary: every epoch, what restarts cost, which epoch is returned and why."""
    for m in outcome.history:
        log.info("epoch %d loss=%.4f val_loss=%s val_recall=%s samples/s=%.0f", m["epoch"], m["loss"],
                 m.get("val_loss"), m.get("val_recall"), m["samples_per_s"])
    if restarts or steps_redone:
        log.warning("run %s: %d worker-group restart(s), %d step(s) per worker redone", run_name,
                    restarts, steps_redone)
    log.info("run %s: best epoch %d by %s (of %d)", run_name, outcome.best_epoch, metric or "recency",
             len(outcome.history))


def _result_params(config: TrainConfig, use_gpu: bool, run_name: str, outcome: _RunOutcome) -> dict[str, Any]:
    """The run's parameters as the registry records them: the config, what was resolved at run
    time, and the returned model's shape (without its per-item lookup tables)."""
    vocab = outcome.vocab
    return {
        **config.model_dump(),
        "use_gpu": use_gpu,
        "run_name": run_name,
        "best_epoch": outcome.best_epoch,
        "n_items": vocab.n_items,
        "n_categories": vocab.n_categories,
        "n_price_buckets": vocab.n_price_buckets,
        "model_config": {k: v for k, v in outcome.model.config().items()
                         if k not in ("item_category", "item_price_bucket")},
    }


def train_two_tower(
    examples: "ray.data.Dataset",
    items: pd.DataFrame,
    config: TrainConfig,
    runs_dir: str,
    run_name: str,
    *,
    inputs: UserInputSpec,
    require_existing: bool = False,
    fault: FaultInjection | None = None,
) -> TrainResult:
    """Train the two-tower model on ``examples`` and return the run's best checkpoint's model.

    ``inputs`` says which columns of the examples are the model's inputs
    (``UserInputSpec.from_service`` of the feature service the examples were joined with); it is
    saved in every checkpoint's model config, so serving and evaluation read the same contract.

    ``runs_dir`` is the Ray Train storage path (local or ``s3://``/``gs://``); a checkpoint is
    written every epoch to ``<runs_dir>/<run_name>/epoch_NNNN`` (checkpoint paths in the result
    are in the same form: local paths or URIs). ``validation_fraction`` of the
    rows is held out and scored every epoch; the ``checkpoints_to_keep`` best checkpoints by
    ``checkpoint_metric`` (plus the latest, needed to resume) are kept, and the best is what
    this returns (``result.checkpoint_path``; ``latest_checkpoint_path`` is the last epoch's);
    the latest counts as best when no earlier checkpoint beats it by more than one standard
    error of the validation metric (a noise-level "improvement" is not worth lost training).

    Failures: a worker that dies is replaced and the group restarts from the latest checkpoint,
    up to ``config.max_failures`` times (``steps_redone``/``restarts`` say what it cost). A
    driver that died is recovered by calling again with the same ``run_name``: the run
    *resumes* from its latest checkpoint (Ray Train V2 behaviour) up to ``config.epochs``;
    ``require_existing=True`` makes a missing run a ``NotFoundError`` instead of a fresh start.
    ``fault`` is for tests only (see ``FaultInjection``).

    Raises ``DataValidationError`` when no example can be trained on (no target item in the
    catalogue at ``min_event_type`` or above) and ``ray.train.TrainingFailedError`` when a
    worker fails more often than ``config.max_failures``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    _require_train_v2()
    started = time.perf_counter()
    runs = RunStorage.of(runs_dir)
    run_uri = runs.run_uri(run_name)
    vocab = _run_vocab(runs, run_name, items, config, inputs, require_existing)
    _check_examples(examples, inputs)
    use_gpu = _resolve_use_gpu(config)
    datasets = training_datasets(examples, vocab, config, inputs)
    metric = config.checkpoint_metric if "validation" in datasets else None
    call_id = uuid.uuid4().hex[:12]
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_loop_config(examples, vocab, config, inputs, validate="validation" in datasets,
                                       run_uri=run_uri, call_id=call_id, fault=fault),
        scaling_config=_scaling_config(config, use_gpu),
        run_config=_run_config(runs, run_name, config, metric),
        datasets=datasets,
        # Every worker sees the whole validation slice (only rank 0 scores it).
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    log.info("training %s: %d workers, gpu=%s, precision=%s, %d epochs, %d items, checkpoints ranked by %s; "
             "inputs: %s", run_name, config.num_workers, use_gpu, config.precision, config.epochs, vocab.n_items,
             metric or "recency", inputs.describe())
    result = trainer.fit()
    steps_redone, restarts = collect_progress(run_uri, call_id)
    outcome = _run_outcome(result, run_name, metric)
    _check_trained_on_something(outcome.history, config)
    _log_run(run_name, outcome, metric, steps_redone, restarts)
    return TrainResult(
        model=outcome.model,
        vocab=outcome.vocab,
        checkpoint_path=runs.uri_of(outcome.best.path),
        history=outcome.history,
        params=_result_params(config, use_gpu, run_name, outcome),
        duration_s=time.perf_counter() - started,
        best_epoch=outcome.best_epoch,
        latest_checkpoint_path=runs.uri_of(outcome.latest.path),
        steps_redone=steps_redone,
        restarts=restarts,
    )
