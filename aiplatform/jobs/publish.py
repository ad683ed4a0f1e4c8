"""What a training run leaves in the registry: the version with its artifact and lineage, the
quality gates' verdicts, and the aliases those verdicts earn.

Every trained model is registered, gates passed or not (its metrics are worth keeping); only
its aliases depend on the gates, and the first champion is set by compare-and-set so that two
jobs finishing at once cannot both win."""

import contextlib
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pyarrow.fs as pafs

from aiplatform.core.errors import ConflictError
from aiplatform.core.storage import Layout, filesystem_for, is_uri, join
from aiplatform.features.definitions import FeatureService
from aiplatform.jobs.train_report import TrainingReport
from aiplatform.models.candidates import CANDIDATES_DIR, CandidateRanker
from aiplatform.observability.cost import training_resources
from aiplatform.registry.lineage import collect as collect_lineage
from aiplatform.registry.registry import ModelRegistry, ModelVersion
from aiplatform.training.config import TrainConfig
from aiplatform.training.evaluate import GateResult, check_gates
from aiplatform.training.split import EvalSplit
from aiplatform.training.train import TrainResult

log = logging.getLogger("aiplatform.jobs.train")


def quality_gates(metrics: dict, split: EvalSplit, events: pd.DataFrame, config: TrainConfig) -> list[dict]:
    """Every gate's result (``check_gates`` on the metrics, then ``enough_users_gate``), as the
    JSON-ready dicts the registry and the report keep."""
    gates = [asdict(g) for g in check_gates(metrics, config.gates, config.eval_k)]
    gates.append(asdict(enough_users_gate(split, config.min_validation_users, events)))
    return gates


def enough_users_gate(split: EvalSplit, min_users: int, events: pd.DataFrame) -> GateResult:
    """Gates never decide on fewer validation users than ``min(min_users, all users)``."""
    n_all = int(events["user_id"].astype(str).nunique())
    need = min(min_users, n_all)
    ok = split.n_users >= need
    return GateResult("min_validation_users", ok, float(split.n_users), float(need),
                      f"gate min_validation_users {'passed' if ok else 'FAILED'}: {split.n_users} validation users "
                      f"({split.name}; need >= {need})" + ("" if ok else
                      ": not enough validation data to decide; the model is not promoted unless --promote"))


def register_version(registry: ModelRegistry, layout: Layout, service: FeatureService, config: TrainConfig, *,
                     model_name: str, run_name: str, result: TrainResult, served: CandidateRanker | None,
                     metrics: dict, split: EvalSplit, counts: dict[str, int]) -> ModelVersion:
    """Register the run's best checkpoint (with the served candidate ranker in it) under
    ``model_name``, gates passed or not: a model's metrics are worth keeping either way. The
    lineage records what it was trained on; ``counts`` are the events, items and examples."""
    lineage = collect_lineage(
        layout, service, config.model_dump(mode="json"),
        evaluation={"split": split.name, "cutoff": str(split.cutoff), "users": int(metrics["users"]),
                    "reason": split.reason},
        **counts, run=run_name,
        training=training_resources(result.duration_s, result.params))  # what `aiplatform report cost` prices
    with artifact_to_register(result.checkpoint_path, served) as artifact_dir:
        return registry.register(model_name, artifact_dir, metrics=metrics, params=result.params,
                                 checkpoint_uri=result.checkpoint_path, lineage=lineage)


@contextlib.contextmanager
def artifact_to_register(checkpoint: str, ranker: CandidateRanker | None = None) -> Iterator[str]:
    """The folder to register: the run's best checkpoint, with the candidate ranker in
    ``candidates/`` when one is served.

    A local checkpoint gets the ranker written in place. A checkpoint in the object store is
    never written to: it is downloaded to a temporary folder, the ranker is added there and
    that folder is registered (the registry uploads it to the version's own folder). Without a
    ranker the checkpoint is registered as it is, wherever it is."""
    if ranker is None:
        yield checkpoint
        return
    if not is_uri(checkpoint):
        ranker.save(join(checkpoint, CANDIDATES_DIR))
        yield checkpoint
        return
    with tempfile.TemporaryDirectory(prefix="aiplatform-artifact-") as tmp:
        local = Path(tmp) / "artifact"
        local.mkdir()
        fs, path = filesystem_for(checkpoint)
        pafs.copy_files(path, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        ranker.save(str(local / CANDIDATES_DIR))
        yield str(local)


def apply_aliases(registry: ModelRegistry, model_name: str, version: int, gates_passed: bool,
                  promote: bool = False, always_promote: bool = False, enough_data: bool = True) -> list[str]:
    """Set and return the aliases a new version earns.

    Passing every gate earns ``challenger``; ``champion`` too when the model has none yet (a
    first run must be servable) or with ``promote``. ``always_promote`` makes it champion
    whatever the gates say. A version that fails a gate and is not forced gets nothing. With
    too few validation users (``enough_data`` false) the gates cannot decide: nothing, unless
    ``promote`` (or ``always_promote``) makes it champion.
    """
    aliases: list[str] = []
    if not enough_data:
        if promote or always_promote:
            registry.set_alias(model_name, "champion", version,
                               reason="not enough validation data to decide; --promote")
            aliases.append("champion")
        return aliases
    if gates_passed:
        registry.set_alias(model_name, "challenger", version, reason="passed the quality gates")
        aliases.append("challenger")
        if promote:
            registry.set_alias(model_name, "champion", version, reason="passed the gates; --promote")
            aliases.append("champion")
        elif "champion" not in registry.aliases(model_name):
            # Compare-and-set on "no champion yet": of two first jobs finishing at once, one
            # becomes champion; the other keeps its challenger alias and the job succeeds.
            try:
                registry.set_alias(model_name, "champion", version, reason="passed the gates; first champion",
                                   expected=None)
                aliases.append("champion")
            except ConflictError as exc:
                log.info("v%d stays challenger: another version became the first champion (%s)", version, exc)
    if always_promote and "champion" not in aliases:
        registry.set_alias(model_name, "champion", version, reason="forced (--always-promote)")
        aliases.append("champion")
    return aliases


def apply_gate_outcome(registry: ModelRegistry, report: TrainingReport, *, promote: bool,
                       always_promote: bool) -> None:
    """Log each gate, give the registered version the aliases it earned (``apply_aliases``) and
    record them in ``report``; a failed gate is a warning that says whether it was forced."""
    for g in report.gates:
        (log.info if g["passed"] else log.warning)(g["message"])
    enough = next(g["passed"] for g in report.gates if g["gate"] == "min_validation_users")
    report.aliases = apply_aliases(registry, report.model_name, report.version, report.gates_passed,
                                   promote=promote, always_promote=always_promote, enough_data=enough)
    if not report.gates_passed:
        log.warning("model %s v%d failed %d gate(s): %s", report.model_name, report.version,
                    len(report.failed_gates), "champion anyway" if "champion" in report.aliases
                    else "registered without an alias")
    report.promoted = "champion" in report.aliases
