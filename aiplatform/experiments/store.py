"""Experiments and what they observed, as append-only Lance tables under ``Layout.experiments``.

Why Lance, like the registry: the storage root may be a bucket, many serving replicas append
exposures at once, and Lance's commit protocol (a rename on disk, a conditional PUT on an
object store) serialises their commits without losing any. Every write here is one append
(one commit); nothing is rewritten or deleted, so the tables are also the audit trail.

Tables:

- ``configs``: one row per requested change of an experiment (start, new weights, stop):
  its config as JSON, ``active``, who, when and why. The state of every experiment is the
  *replay* of these rows in commit order (``_replay``), the way the registry replays alias
  moves: a row that would activate an experiment on a model that already has another active
  one is rejected (it stays in the table and changes nothing), so at most one experiment per
  model is active whatever the interleaving of two ``put`` calls. ``put`` replays the table
  as its own commit made it and raises when its row lost.
  An experiment's *revision* is its row's place among its applied rows (1, 2, ...): derived
  from commit order, never stored, so two concurrent writers cannot get the same number.
- ``exposures``: one row per answered request inside an experiment (which variant and model
  version answered, its status and latency), written by serving.
- ``outcomes``: events that followed a recommendation (click, add_to_cart, purchase), keyed by
  the request id they followed.
- ``shadow``: one row per mirrored request: the shadow's latency and the overlap@k of its
  answer with the live one.

The tables are created by one commit of table version 1 that is never retried (as the
registry's ``_table``): on an object store Lance turns a losing concurrent create into an
overwrite, which could drop rows appended in between.
"""

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import lance
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from aiplatform.core import storage
from aiplatform.core.errors import UserInputError
from aiplatform.core.settings import default_actor
from aiplatform.core.storage import Layout
from aiplatform.experiments.config import Experiment, check_name

log = logging.getLogger(__name__)

CONFIGS_TABLE = "configs"
EXPOSURES_TABLE = "exposures"
OUTCOMES_TABLE = "outcomes"
SHADOW_TABLE = "shadow"

STATUSES = ("ok", "popular", "degraded", "error")

_TS = pa.timestamp("us", tz="UTC")

CONFIGS_SCHEMA = pa.schema([
    pa.field("name", pa.string(), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("config", pa.string(), nullable=False),
    pa.field("active", pa.bool_(), nullable=False),
    pa.field("set_at", _TS, nullable=False),
    pa.field("actor", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("put_id", pa.string(), nullable=False),
])
EXPOSURES_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("experiment", pa.string(), nullable=False),
    pa.field("revision", pa.int64(), nullable=False),
    pa.field("variant", pa.string(), nullable=False),
    pa.field("model_version", pa.int64(), nullable=True),  # null: no model answered (an error)
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("k", pa.int64(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("latency_ms", pa.float64(), nullable=False),
    pa.field("at", _TS, nullable=False),
])
OUTCOMES_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("user_id", pa.string(), nullable=False),
    pa.field("event_type", pa.string(), nullable=False),
    pa.field("at", _TS, nullable=False),
])
SHADOW_SCHEMA = pa.schema([
    pa.field("request_id", pa.string(), nullable=False),
    pa.field("experiment", pa.string(), nullable=False),
    pa.field("shadow_version", pa.int64(), nullable=False),
    pa.field("live_version", pa.int64(), nullable=False),
    pa.field("latency_ms", pa.float64(), nullable=False),
    pa.field("overlap", pa.float64(), nullable=False),
    pa.field("k", pa.int64(), nullable=False),
    pa.field("at", _TS, nullable=False),
])


def _utc(value: Any, what: str) -> datetime:
    """A timestamp given as a datetime (naive = UTC), a pandas Timestamp or an ISO string."""
    if isinstance(value, pd.Timestamp):
        value = value.to_pydatetime()
    if isinstance(value, str):
        try:
            value = pd.Timestamp(value).to_pydatetime()
        except ValueError as exc:
            raise UserInputError(f"{what}: {value!r} is not an ISO timestamp") from exc
    if not isinstance(value, datetime):
        raise UserInputError(f"{what}: expected a datetime or an ISO timestamp, got {type(value).__name__}")
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


@dataclass
class _Revision:
    name: str
    model_name: str
    config: str
    active: bool
    set_at: datetime
    actor: str
    reason: str
    put_id: str
    revision: int


@dataclass
class _State:
    """All experiments after replaying ``configs``; ``rejected``: put_id -> (blocking name, revision)."""

    history: dict[str, list[_Revision]] = field(default_factory=dict)
    active: dict[str, str] = field(default_factory=dict)  # model -> experiment
    rejected: dict[str, tuple[str, int]] = field(default_factory=dict)


def _replay(rows: list[dict[str, Any]]) -> _State:
    """Apply config rows in commit order (module docstring): at most one active per model."""
    state = _State()
    for r in rows:
        hist = state.history.setdefault(r["name"], [])
        holder = state.active.get(r["model_name"])
        if r["active"] and holder is not None and holder != r["name"]:
            state.rejected[r["put_id"]] = (holder, state.history[holder][-1].revision)
            if not hist:
                del state.history[r["name"]]
            continue
        prev = hist[-1] if hist else None
        if prev is not None and prev.active and state.active.get(prev.model_name) == r["name"]:
            del state.active[prev.model_name]
        if r["active"]:
            state.active[r["model_name"]] = r["name"]
        hist.append(_Revision(name=r["name"], model_name=r["model_name"], config=r["config"],
                              active=bool(r["active"]), set_at=_utc(r["set_at"], "set_at"), actor=r["actor"],
                              reason=r["reason"], put_id=r["put_id"], revision=len(hist) + 1))
    return state


class ExperimentStore:
    """Experiment configs and their observations under one storage root.

    Reads always open the latest table version, so a serving replica polling ``active`` sees
    a change a moment after ``put`` commits it."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.root = layout.experiments
        storage.make_dirs(self.root)
        self._options = storage.storage_options(self.root) or None
        self._created: set[str] = set()

    # ---- tables -------------------------------------------------------------------------
    def _uri(self, table: str) -> str:
        return storage.join(self.root, f"{table}.lance")

    def _open(self, table: str) -> "lance.LanceDataset | None":
        """The table's latest version, or None when nothing was ever written to it (a read
        does not create it: on an object store that would be a write)."""
        try:
            return lance.dataset(self._uri(table), storage_options=self._options)
        except ValueError as exc:  # "Dataset at path ... was not found"; anything else is a real failure
            if "not found" in str(exc).lower():
                return None
            raise

    def _ensure(self, table: str, schema: pa.Schema) -> str:
        """The table's URI, created empty by one never-retried commit on first use (module doc)."""
        uri = self._uri(table)
        if table in self._created or self._open(table) is not None:
            self._created.add(table)
            return uri
        try:
            lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, []), read_version=0,
                                      storage_options=self._options, max_retries=0)
        except OSError:
            if self._open(table) is None:  # not "another process created it first"
                raise
        self._created.add(table)
        return uri

    def _append(self, table: str, schema: pa.Schema, rows: list[dict[str, Any]]) -> "lance.LanceDataset":
        """One commit; returns the table version that commit created."""
        try:
            data = pa.Table.from_pylist(rows, schema=schema)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise UserInputError(f"{table} rows do not match the table's columns "
                                 f"({', '.join(f'{f.name} {f.type}' for f in schema)}): {exc}") from exc
        return lance.write_dataset(data, self._ensure(table, schema), mode="append",
                                   storage_options=self._options)

    # ---- configs ------------------------------------------------------------------------
    def _state(self, dataset: "lance.LanceDataset | None" = None) -> _State:
        dataset = dataset if dataset is not None else self._open(CONFIGS_TABLE)
        if dataset is None:
            return _State()
        return _replay(dataset.to_table(scan_in_order=True).to_pylist())

    def _write_config(self, experiment: Experiment, active: bool, actor: str | None, reason: str) -> int:
        put_id = uuid.uuid4().hex
        row = {"name": experiment.name, "model_name": experiment.model_name, "config": experiment.to_json(),
               "active": active, "set_at": datetime.now(timezone.utc), "actor": str(actor or default_actor()),
               "reason": str(reason or ""), "put_id": put_id}
        # Replay the table as this append's own commit made it: the rows committed before it
        # decide whether it applies, whatever was committed since.
        at_commit = self._append(CONFIGS_TABLE, CONFIGS_SCHEMA, [row])
        state = self._state(at_commit)
        if put_id in state.rejected:
            holder, revision = state.rejected[put_id]
            raise UserInputError(self._conflict(experiment, holder, revision))
        mine = next((r for r in state.history.get(experiment.name, []) if r.put_id == put_id), None)
        if mine is None:
            raise RuntimeError(  # pragma: no cover - would be a Lance commit bug
                f"experiment config {put_id} is not in table version {at_commit.version} that its own commit created")
        log.info("experiment %s revision %d (%s) by %s: %s", experiment.name, mine.revision,
                 "active" if active else "stopped", row["actor"], reason)
        return mine.revision

    @staticmethod
    def _conflict(experiment: Experiment, holder: str, revision: int) -> str:
        return (f"model {experiment.model_name!r} already has an active experiment, {holder!r} (revision "
                f"{revision}): a model runs one experiment at a time. Stop it first "
                f"(aiplatform experiments stop {holder}) or change {holder!r} instead")

    def put(self, experiment: Experiment, actor: str | None = None, reason: str = "") -> int:
        """Start an experiment, or change a running one (new weights, variants): returns its
        revision. Raises ``UserInputError`` naming the other active experiment of the model."""
        if not isinstance(experiment, Experiment):
            raise UserInputError(f"put() takes an Experiment (load_experiment reads one), got "
                                 f"{type(experiment).__name__}")
        state = self._state()
        holder = state.active.get(experiment.model_name)
        if holder is not None and holder != experiment.name:  # the usual case, said before writing
            raise UserInputError(self._conflict(experiment, holder, state.history[holder][-1].revision))
        return self._write_config(experiment, True, actor, reason)

    def stop(self, name: str, actor: str | None = None, reason: str = "") -> int:
        """Stop an experiment (serving goes back to the model's alias); returns the revision
        that stopped it. Stopping a stopped experiment changes nothing."""
        history = self._history(name)
        last = history[-1]
        if not last.active:
            return last.revision
        return self._write_config(Experiment.model_validate_json(last.config), False, actor, reason)

    def _history(self, name: str) -> list[_Revision]:
        check_name_input("experiment name", name)
        state = self._state()
        history = state.history.get(name)
        if not history:
            known = ", ".join(sorted(state.history)) or "none yet"
            raise UserInputError(f"no experiment {name!r} (experiments: {known}); start one with "
                                 "aiplatform experiments start FILE")
        return history

    def get(self, name: str) -> Experiment | None:
        """The latest revision's config (running or stopped), None if unknown."""
        check_name_input("experiment name", name)
        history = self._state().history.get(name)
        return Experiment.model_validate_json(history[-1].config) if history else None

    def is_active(self, name: str) -> bool:
        history = self._state().history.get(name)
        return bool(history and history[-1].active)

    def active(self, model_name: str) -> tuple[Experiment, int] | None:
        """The model's active experiment and its revision (None when it has none)."""
        state = self._state()
        name = state.active.get(model_name)
        if name is None:
            return None
        last = state.history[name][-1]
        return Experiment.model_validate_json(last.config), last.revision

    def history(self, name: str) -> list[dict[str, Any]]:
        """Every applied revision, oldest first: revision, active, set_at, actor, reason,
        model_name and config (a dict). Empty for an unknown experiment."""
        check_name_input("experiment name", name)
        return [{"revision": r.revision, "active": r.active, "set_at": r.set_at, "actor": r.actor,
                 "reason": r.reason, "model_name": r.model_name, "config": json.loads(r.config)}
                for r in self._state().history.get(name, [])]

    def names(self) -> list[str]:
        return sorted(self._state().history)

    # ---- observations -------------------------------------------------------------------
    def record_exposures(self, rows: list[dict[str, Any]]) -> None:
        """Append answered requests (one commit). ``at`` defaults to now."""
        self._record(EXPOSURES_TABLE, EXPOSURES_SCHEMA, rows)

    def record_outcomes(self, rows: list[dict[str, Any]]) -> None:
        """Append events that followed a recommendation, keyed by its request id (one commit)."""
        self._record(OUTCOMES_TABLE, OUTCOMES_SCHEMA, rows)

    def record_shadow(self, rows: list[dict[str, Any]]) -> None:
        """Append mirrored requests' comparisons (one commit)."""
        self._record(SHADOW_TABLE, SHADOW_SCHEMA, rows)

    def _record(self, table: str, schema: pa.Schema, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        now = datetime.now(timezone.utc)
        clean = []
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise UserInputError(f"{table} row {i}: expected a dict, got {type(row).__name__}")
            unknown = sorted(set(row) - set(schema.names))
            if unknown:
                raise UserInputError(f"{table} row {i}: unknown column(s) {', '.join(unknown)}; "
                                     f"columns are {', '.join(schema.names)}")
            out = dict(row)
            out["at"] = now if row.get("at") is None else _utc(row["at"], f"{table} row {i}: 'at'")
            missing = [f.name for f in schema if not f.nullable and out.get(f.name) is None]
            if missing:
                raise UserInputError(f"{table} row {i}: missing {', '.join(missing)}")
            if table == EXPOSURES_TABLE and out["status"] not in STATUSES:
                raise UserInputError(f"{table} row {i}: status {out['status']!r} is not one of {', '.join(STATUSES)}")
            if table == SHADOW_TABLE and not 0.0 <= float(out["overlap"]) <= 1.0:
                raise UserInputError(f"{table} row {i}: overlap {out['overlap']!r} is outside [0, 1]")
            clean.append(out)
        self._append(table, schema, clean)

    def _read(self, table: str, schema: pa.Schema, where: "pc.Expression | None" = None) -> pd.DataFrame:
        dataset = self._open(table)
        data = schema.empty_table() if dataset is None else dataset.to_table(filter=where)
        return data.to_pandas()

    def exposures(self, name: str, since: datetime | None = None) -> pd.DataFrame:
        """The experiment's exposures (all revisions), optionally only those at or after ``since``."""
        check_name_input("experiment name", name)
        where = pc.field("experiment") == name
        if since is not None:
            where = where & (pc.field("at") >= pa.scalar(_utc(since, "since"), _TS))
        return self._read(EXPOSURES_TABLE, EXPOSURES_SCHEMA, where)

    def outcomes(self, request_ids: "list[str] | set[str] | pd.Series | None" = None) -> pd.DataFrame:
        """Recorded outcomes, only those of ``request_ids`` when given."""
        frame = self._read(OUTCOMES_TABLE, OUTCOMES_SCHEMA)
        if request_ids is not None:
            frame = frame[frame["request_id"].isin(pd.Index(list(request_ids)))].reset_index(drop=True)
        return frame

    def shadow(self, name: str) -> pd.DataFrame:
        """The experiment's mirrored requests."""
        check_name_input("experiment name", name)
        return self._read(SHADOW_TABLE, SHADOW_SCHEMA, pc.field("experiment") == name)


def check_name_input(kind: str, value: str) -> str:
    """``check_name`` as a ``UserInputError`` (a name given on a command line or by a caller)."""
    try:
        return check_name(kind, value)
    except ValueError as exc:
        raise UserInputError(str(exc)) from None
