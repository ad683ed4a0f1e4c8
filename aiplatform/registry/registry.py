"""The model registry: numbered versions of a model, named aliases, and the history of both.

Stored as Lance tables under ``Layout.registry`` (so a registry on ``s3://`` works the same
as one on disk) and the artifact files under ``Layout.model_dir(name, version)``:

- ``model_versions``: one row per registered version (metrics, params, checkpoint and artifact
  locations, lineage). Rows are only ever appended.
- ``alias_moves``: one row per requested alias move (who, when, why, and the target the mover
  expected to replace; see "Alias moves"). The table *is* the history of every alias.
- ``version_claims``: one row per version number handed out (see "Version numbers").
- ``indexes``: one row per build or update of a version's item index (``record_index``): its
  kind, size and measured recall@10, which decides whether serving may use it.

Every write is one Lance commit, and the artifact is copied before its row is appended: a
version that the registry lists always has its files in place.

Version numbers: many processes (training jobs on different pods) may register versions of one
model at the same moment, against a bucket where "is this folder free?" followed by a write is
a race (an object store has no exclusive create of a folder). The number is therefore decided
by Lance's commit protocol, which serialises commits (a rename on disk, a conditional PUT on an
object store): a registration appends one claim row to ``version_claims`` (one commit, which
creates one new table version ``V``), and the model's claims in table version ``V`` are exactly
the claims committed before it plus its own. With ``c`` claims of the model in ``V``, its
number is ``c``: nobody else can get it, whatever the interleaving (``V`` is the version the
append itself returns, not the table's latest, which may already hold later claims). Only
then is the artifact copied to ``models/<name>/<version>/`` (a folder nobody else will write)
and the ``model_versions`` row appended (that row is what makes the version visible). Tables
are only appended to (never compacted or deleted from), so these counts never change.

A registry written by an older release has ``model_versions`` rows but no claims: a claimed
number that such a row already uses is skipped, and the first claim appends as many claim rows
as it takes to pass them (in one commit). A registration that fails after its claim leaves its
number unused: versions are unique and increasing, but not always contiguous.

Alias moves: two people (or a person and a training job) may move ``champion`` at the same
moment, each having read where it points. A move is therefore compare-and-set, decided by the
same commit order as version numbers: the row records ``expected_version`` (the target its
mover read; null = "not set yet") and ``checked``. The current target of an alias is the replay
of its rows in commit (row) order: an unchecked move always applies, a checked one only when
``expected_version`` is the target at that point; a rejected row stays in the table and changes
nothing. After appending its row, ``set_alias`` replays the table *as its own commit made it*
(the version the append returned): of two promotions from the same expected target exactly one
applies, the other raises ``ConflictError`` naming the move that won, and every reader replays
to the same answer. Rollback walks back along the alias's line of versions (``rollback``).
The ``aliases`` table of older releases (one unconditional move per row) is still read, as moves
made before every ``alias_moves`` row; it is no longer written.

The tables themselves are created by one commit of table version 1 that is never retried
(``_table``): on an object store Lance turns a losing concurrent create into an overwrite,
which could drop rows appended in between.
"""

import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from numbers import Integral
from pathlib import Path
from typing import Any

import lance
import pyarrow as pa
import pyarrow.fs as pafs

from aiplatform.core import storage
from aiplatform.core.errors import ConflictError, NotFoundError, UserInputError
from aiplatform.core.storage import Layout, filesystem_for, is_uri
from aiplatform.registry.aliases import MOVES_SCHEMA, UNCHECKED, AliasState, default_actor, describe, replay
from aiplatform.registry.aliases import utc as _utc

log = logging.getLogger(__name__)

VERSIONS_TABLE = "model_versions"
ALIASES_TABLE = "aliases"  # older releases' alias moves: read, no longer written
MOVES_TABLE = "alias_moves"
CLAIMS_TABLE = "version_claims"
INDEXES_TABLE = "indexes"
MAX_CLAIM_ROUNDS = 20

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")

_VERSIONS_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("metrics", pa.string(), nullable=False),
        pa.field("params", pa.string(), nullable=False),
        pa.field("checkpoint_uri", pa.string(), nullable=False),
        pa.field("artifact_uri", pa.string(), nullable=False),
        pa.field("lineage", pa.string(), nullable=False),
    ]
)
_ALIASES_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("alias", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("set_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)
_CLAIMS_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("claim_id", pa.string(), nullable=False),
        pa.field("claimed_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

_INDEXES_SCHEMA = pa.schema(
    [
        pa.field("name", pa.string(), nullable=False),
        pa.field("version", pa.int64(), nullable=False),
        pa.field("recorded_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("info", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: int
    created_at: datetime
    metrics: dict[str, Any] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    checkpoint_uri: str = ""
    artifact_uri: str = ""
    lineage: dict[str, Any] = field(default_factory=dict)


def _check_name(kind: str, value: str) -> str:
    """Names end up in paths and Lance filters, so only a safe alphabet is accepted."""
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise UserInputError(
            f"invalid {kind} {value!r}: use 1-128 letters, digits, '_', '-' or '.', "
            "starting with a letter or digit"
        )
    return value


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _row_to_version(row: dict[str, Any]) -> ModelVersion:
    created = _utc(row["created_at"])
    return ModelVersion(
        name=row["name"],
        version=int(row["version"]),
        created_at=created,
        metrics=json.loads(row["metrics"]),
        params=json.loads(row["params"]),
        checkpoint_uri=row["checkpoint_uri"],
        artifact_uri=row["artifact_uri"],
        lineage=json.loads(row["lineage"]),
    )


def _nonempty_dir(path: str) -> bool:
    """True when ``path`` (a local folder or a URI) holds at least one entry."""
    if not is_uri(path):
        src = Path(path)
        return src.is_dir() and any(src.iterdir())
    fs, inside = filesystem_for(path)
    return bool(fs.get_file_info(pafs.FileSelector(inside, allow_not_found=True, recursive=False)))


def _copy_artifact(src: str, dest: str) -> None:
    """Copy the folder ``src`` to ``dest`` (each a local path or a URI).

    ``dest`` belongs to this registration alone (its version number was claimed): whatever an
    earlier, failed registration of an older release left there is replaced. A local copy is
    staged next to the target and renamed into place, so the folder is complete or absent; on
    an object store there is no folder rename, but the version's row, appended after the copy,
    is what makes it visible, so a partial copy is never served.
    """
    src_fs, src_path = filesystem_for(src)
    if is_uri(dest):
        storage.delete_dir(dest)
        dest_fs, dest_path = filesystem_for(dest)
        pafs.copy_files(src_path, dest_path, source_filesystem=src_fs, destination_filesystem=dest_fs)
        return
    target = Path(dest)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{uuid.uuid4().hex[:8]}."))
    try:
        staged = tmp / "artifact"
        if is_uri(src):
            staged.mkdir()
            pafs.copy_files(src_path, str(staged), source_filesystem=src_fs,
                            destination_filesystem=pafs.LocalFileSystem())
        else:
            shutil.copytree(src, staged)
        if target.exists():
            os.rename(target, tmp / "left-over")
        os.rename(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class ModelRegistry:
    """Versions and aliases of models under one storage root.

    Reads always see the latest commit (``read_consistency_interval=0``), so a registry opened
    by the serving driver sees a version registered by a training job a moment ago.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        storage.make_dirs(layout.registry)
        import lancedb  # here, not at import: a serving replica imports this module on its way to ready

        self._datasets: dict[str, Any] = {}  # alias tables opened with lance, for alias_revision
        self._db = lancedb.connect(layout.registry, storage_options=storage.storage_options(layout.registry),
                                   read_consistency_interval=timedelta(0))

    # ---- tables -------------------------------------------------------------------------
    def _table(self, name: str, schema: pa.Schema):
        """The registry table ``name``, created empty on first use.

        Not ``create_table(exist_ok=True)``: when two processes create one table at once on
        an object store, Lance turns the loser's create into an *overwrite* at the next
        version, which would drop any row appended in between. Here the table is created by
        a single commit of version 1 that is never retried: exactly one process wins and the
        others open its table."""
        try:
            return self._db.open_table(name)
        except ValueError:  # "Table ... was not found"
            pass
        uri = storage.join(self.layout.registry, f"{name}.lance")
        try:
            lance.LanceDataset.commit(uri, lance.LanceOperation.Overwrite(schema, []), read_version=0,
                                      storage_options=storage.storage_options(uri) or None, max_retries=0)
        except OSError as exc:
            try:  # another process created it first
                return self._db.open_table(name)
            except ValueError:
                raise exc from None
        return self._db.open_table(name)

    def _rows(self, table: str, schema: pa.Schema, name: str) -> list[dict[str, Any]]:
        """All rows of one model. Registry tables are small (one row per version or alias
        move), so a filtered scan is simple and fast enough."""
        tbl = self._table(table, schema)
        data = tbl.to_lance().to_table(filter=f"name = '{name}'")
        return data.to_pylist()

    # ---- versions -----------------------------------------------------------------------
    def register(
        self,
        name: str,
        artifact_src_dir: str,
        metrics: dict[str, Any],
        params: dict[str, Any],
        checkpoint_uri: str,
        lineage: dict[str, Any] | None = None,
    ) -> ModelVersion:
        """Copy the artifact into the storage root as the next version and record it.

        ``artifact_src_dir`` is a local folder or an object-store URI (e.g. a Ray Train
        checkpoint in the bucket). The version number is claimed first (one Lance commit, see
        the module docstring: concurrent registrations get distinct numbers), the files are
        copied to that version's own folder, and the row is appended last: the row is the
        commit that makes the version visible, so a listed version always has its files.
        """
        _check_name("model name", name)
        if not _nonempty_dir(str(artifact_src_dir)):
            raise UserInputError(
                f"artifact directory {artifact_src_dir!r} does not exist or is empty; "
                "pass the directory written by save_artifact()"
            )
        try:
            metrics_json = json.dumps(metrics or {}, sort_keys=True, default=float)
            params_json = json.dumps(params or {}, sort_keys=True, default=str)
            lineage_json = json.dumps(lineage or {}, sort_keys=True, default=str)
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"metrics/params/lineage must be JSON-serialisable: {exc}") from exc

        version = self._claim_version(name)
        dest = self.layout.model_dir(name, version)
        try:
            _copy_artifact(str(artifact_src_dir), dest)
        except BaseException:
            # The number is ours alone: nothing else may be left in its folder.
            try:
                storage.delete_dir(dest)
            except OSError:  # pragma: no cover - best effort; the folder has no row anyway
                log.warning("could not remove the partial artifact copy at %s", dest)
            raise

        mv = ModelVersion(
            name=name,
            version=version,
            created_at=_now(),
            metrics=json.loads(metrics_json),
            params=json.loads(params_json),
            checkpoint_uri=str(checkpoint_uri or ""),
            artifact_uri=dest,
            lineage=json.loads(lineage_json),
        )
        row = {
            "name": name,
            "version": version,
            "created_at": mv.created_at,
            "metrics": metrics_json,
            "params": params_json,
            "checkpoint_uri": mv.checkpoint_uri,
            "artifact_uri": dest,
            "lineage": lineage_json,
        }
        self._table(VERSIONS_TABLE, _VERSIONS_SCHEMA).add(
            pa.Table.from_pylist([row], schema=_VERSIONS_SCHEMA)
        )
        log.info("registered %s version %d at %s", name, version, dest)
        return mv

    def _registered_versions(self, name: str) -> set[int]:
        tbl = self._table(VERSIONS_TABLE, _VERSIONS_SCHEMA)
        data = tbl.to_lance().to_table(columns=["version"], filter=f"name = '{name}'")
        return {int(v) for v in data.column("version").to_pylist()}

    def _claim_version(self, name: str) -> int:
        """A version number of ``name`` that no other registration can get (module docstring).

        One round appends ``n`` claim rows in one commit; the commit creates table version
        ``V``, and with ``c`` claims of the model in ``V`` this registration owns the numbers
        ``c - n + 1 .. c``. It takes the first one no ``model_versions`` row uses (rows that
        exist without a claim were written by an older release). ``n`` is 1 except to jump
        over such rows; the counts read before claiming are only a guess of how far to jump,
        the numbers themselves come from the commit.
        """
        claims = self._table(CLAIMS_TABLE, _CLAIMS_SCHEMA)
        taken = self._registered_versions(name)
        n_rows = 1
        if taken:
            claimed = claims.count_rows(f"name = '{name}'")
            n_rows = max(1, max(taken) - claimed + 1)
        uri, options = claims.to_lance().uri, storage.storage_options(self.layout.registry)
        for _ in range(MAX_CLAIM_ROUNDS):
            claim_id = uuid.uuid4().hex
            now = _now()
            rows = [{"name": name, "claim_id": claim_id, "claimed_at": now}] * n_rows
            # pylance's write returns the dataset as its own commit made it (LanceDB's add()
            # reports the table's latest version, which may already include a later commit).
            at_commit = lance.write_dataset(pa.Table.from_pylist(rows, schema=_CLAIMS_SCHEMA), uri,
                                            mode="append", storage_options=options or None)
            ids = at_commit.to_table(columns=["claim_id"], filter=f"name = '{name}'").column("claim_id").to_pylist()
            count = len(ids)
            if ids.count(claim_id) != n_rows:
                raise RuntimeError(  # pragma: no cover - would be a Lance commit bug
                    f"registry: claim {claim_id} of model {name!r} is not in table version "
                    f"{at_commit.version} that its own commit created")
            free = [n for n in range(count - n_rows + 1, count + 1) if n not in taken]
            log.debug("model %s: claim %s committed as table version %d: numbers %d..%d, free %s",
                      name, claim_id, at_commit.version, count - n_rows + 1, count, free)
            if free:
                if n_rows > 1:
                    log.info("model %s: skipped versions registered without a claim (older release)", name)
                return free[0]
            taken = self._registered_versions(name)
            n_rows = max(1, max(taken, default=0) - count + 1)
        raise RuntimeError(  # pragma: no cover - every round moves past the highest taken number
            f"could not claim a version number for model {name!r} in {MAX_CLAIM_ROUNDS} rounds")

    def list_versions(self, name: str) -> list[ModelVersion]:
        """All versions of ``name``, oldest first (empty if the model is unknown)."""
        _check_name("model name", name)
        rows = self._rows(VERSIONS_TABLE, _VERSIONS_SCHEMA, name)
        return sorted((_row_to_version(r) for r in rows), key=lambda v: v.version)

    def list_models(self) -> list[str]:
        """Names of all registered models, sorted."""
        tbl = self._table(VERSIONS_TABLE, _VERSIONS_SCHEMA)
        names = tbl.to_lance().to_table(columns=["name"]).column("name").to_pylist()
        return sorted(set(names))

    def _missing_model(self, name: str) -> NotFoundError:
        models = self.list_models()
        known = ", ".join(models) if models else "none registered yet"
        return NotFoundError(f"model {name!r} is not registered (registered models: {known})")

    def get(self, name: str, version: int) -> ModelVersion:
        versions = self.list_versions(name)
        if not versions:
            raise self._missing_model(name)
        for v in versions:
            if v.version == int(version):
                return v
        have = ", ".join(str(v.version) for v in versions)
        raise NotFoundError(f"model {name!r} has no version {version} (versions: {have})")

    def latest(self, name: str) -> ModelVersion:
        versions = self.list_versions(name)
        if not versions:
            raise self._missing_model(name)
        return versions[-1]

    # ---- aliases ------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int, reason: str = "", actor: str | None = None,
                  expected: int | None = UNCHECKED) -> dict[str, Any]:
        """Point ``alias`` at ``version`` (which must exist); earlier targets stay in history.

        ``expected`` makes the move compare-and-set: it applies only if the alias still points
        at ``expected`` (None: the alias must not be set yet) when its row is committed;
        otherwise ``ConflictError`` names the move that got there first, and the alias is left
        as that move set it. Left out, the move applies whatever the alias points at.
        Returns the applied move: alias, version, previous, set_at, reason, actor, move_id
        (and ``changed``, true).
        """
        _check_name("alias", alias)
        self.get(name, version)  # raises NotFoundError naming what exists
        checked = expected is not UNCHECKED
        if checked and expected is not None and (isinstance(expected, bool) or not isinstance(expected, Integral)):
            raise UserInputError(f"expected={expected!r}: pass the version number the alias points at "
                                 "now, or None for an alias that is not set yet")
        move_id = uuid.uuid4().hex
        row = {
            "name": name, "alias": alias, "version": int(version), "set_at": _now(),
            "reason": str(reason or ""), "actor": str(actor or default_actor()), "move_id": move_id,
            "expected_version": int(expected) if checked and expected is not None else None,
            "checked": checked,
        }
        moves = self._table(MOVES_TABLE, MOVES_SCHEMA)
        # As with version claims, replay the table as this append's own commit made it: the
        # moves committed before it decide whether it applies, whatever was committed since.
        at_commit = lance.write_dataset(pa.Table.from_pylist([row], schema=MOVES_SCHEMA), moves.to_lance().uri,
                                        mode="append",
                                        storage_options=storage.storage_options(self.layout.registry) or None)
        states, rejected = replay(self._legacy_alias_rows(name) + self._move_rows(name, at_commit))
        state = states.get(alias, AliasState())
        if move_id in rejected:
            winner = rejected[move_id]
            found = f"it was moved to {describe(winner)}" if winner else "it is not set"
            wanted = f"at v{expected}" if expected is not None else "unset"
            log.warning("alias %s/%s: move to v%d rejected (expected %s; %s)", name, alias, version, wanted, found)
            raise ConflictError(
                f"alias {alias!r} of model {name!r} was not moved to v{version}: you expected it to be "
                f"{wanted}, but {found}. Re-read it (aiplatform models list --name {name}) and retry "
                "if the move still makes sense")
        applied = next((m for m in reversed(state.history) if m["move_id"] == move_id), None)
        if applied is None:
            raise RuntimeError(  # pragma: no cover - would be a Lance commit bug
                f"registry: alias move {move_id} is not in table version {at_commit.version} "
                "that its own commit created")
        log.info("alias %s/%s: v%s -> v%d by %s (%s)", name, alias, applied["previous"], version,
                 row["actor"], reason)
        return {**applied, "alias": alias, "changed": True}

    def promote(self, name: str, version: int, alias: str = "champion", reason: str = "",
                actor: str | None = None) -> dict[str, Any]:
        """Move ``alias`` to ``version`` from the target read now (compare-and-set).

        If someone moves the alias between this read and the commit, ``ConflictError``: a
        promotion never silently undoes one it did not see. Promoting the current target
        changes nothing and returns the move with ``changed`` false.
        """
        _check_name("alias", alias)
        mv = self.get(name, version)
        state = self._alias_states(name).get(alias, AliasState())
        if state.target == mv.version:
            log.info("alias %s/%s already points at v%d: nothing to do", name, alias, mv.version)
            return {**state.history[-1], "alias": alias, "changed": False}
        return self.set_alias(name, alias, mv.version, reason=reason, actor=actor, expected=state.target)

    def rollback(self, name: str, alias: str = "champion", reason: str = "",
                 actor: str | None = None) -> dict[str, Any]:
        """Move ``alias`` back to the version before its current one (compare-and-set).

        "Before" is along the alias's line of versions: with champion moved v1 -> v2 -> v3,
        rollback goes to v2, a second rollback to v1, a third has nothing to go back to. A
        move back to the previous version by ``promote`` steps back the same way; a move to any
        other version is a new step (v1 -> v2 -> v1 -> v3: rollback goes to v1).
        """
        _check_name("alias", alias)
        states = self._alias_states(name)
        state = states.get(alias)
        if state is None or state.target is None:
            have = self._set_aliases_or_missing(name, states)
            raise UserInputError(f"alias {alias!r} of model {name!r} is not set (aliases: {have}): nothing "
                                 f"to roll back; point it at a version with: aiplatform models promote {name} VERSION")
        if len(state.line) < 2:
            raise UserInputError(
                f"alias {alias!r} of model {name!r} points at v{state.target}, the first version in its "
                f"history: there is nothing earlier to roll back to; move it with: aiplatform models "
                f"promote {name} VERSION --alias {alias}")
        target = state.line[-2]
        return self.set_alias(name, alias, target, reason=reason or f"rollback from v{state.target}",
                              actor=actor, expected=state.target)

    def _legacy_alias_rows(self, name: str) -> list[dict[str, Any]]:
        """Moves of an older release's ``aliases`` table (unconditional, before every
        ``alias_moves`` row). Opened, never created: new registries do not have it."""
        try:
            tbl = self._db.open_table(ALIASES_TABLE)
        except ValueError:  # "Table ... was not found"
            return []
        rows = tbl.to_lance().to_table(filter=f"name = '{name}'").to_pylist()
        # That release took the latest set_at as current (ties: append order); keep its answer.
        ordered = [r for _, r in sorted(enumerate(rows), key=lambda p: (p[1]["set_at"], p[0]))]
        return [{**r, "actor": "", "move_id": f"legacy-{i}", "checked": False, "expected_version": None}
                for i, r in enumerate(ordered)]

    def _move_rows(self, name: str, dataset: Any = None) -> list[dict[str, Any]]:
        """The model's ``alias_moves`` rows in commit order (appends only, scanned in order),
        from ``dataset`` (one table version) or the latest."""
        if dataset is None:
            dataset = self._table(MOVES_TABLE, MOVES_SCHEMA).to_lance()
        return dataset.to_table(filter=f"name = '{name}'", scan_in_order=True).to_pylist()

    def _set_aliases_or_missing(self, name: str, states: dict[str, AliasState]) -> str:
        """For a message about an unset alias: the aliases that are set ("none set"), after
        raising the missing-model error when the model has no version at all."""
        if not self.list_versions(name):
            raise self._missing_model(name)
        return ", ".join(sorted(a for a, st in states.items() if st.target is not None)) or "none set"

    def _alias_states(self, name: str) -> dict[str, AliasState]:
        _check_name("model name", name)
        return replay(self._legacy_alias_rows(name) + self._move_rows(name))[0]

    def alias_revision(self) -> tuple[int, ...]:
        """A stamp that changes whenever any alias may have moved: the latest commit number of
        the tables alias moves are kept in (0 for one that does not exist). Why: replaying the
        moves costs ~10 ms of CPU, and every serving replica polls its alias every few seconds;
        this reads only the tables' version listings (~0.02 ms), so a poller replays the moves
        only when the stamp changed."""
        stamp = []
        for table in (ALIASES_TABLE, MOVES_TABLE):
            uri = storage.join(self.layout.registry, f"{table}.lance")
            try:
                dataset = self._datasets.get(table)
                if dataset is None:
                    dataset = self._datasets[table] = lance.dataset(uri, storage_options=storage.storage_options(uri) or None)
                stamp.append(int(dataset.latest_version))
            except (ValueError, OSError):  # not created yet
                stamp.append(0)
        return tuple(stamp)

    def aliases(self, name: str) -> dict[str, int]:
        """Current alias -> version map of a model."""
        return {a: st.target for a, st in self._alias_states(name).items() if st.target is not None}

    def get_by_alias(self, name: str, alias: str) -> ModelVersion:
        states = self._alias_states(name)
        state = states.get(alias)
        if state is None or state.target is None:
            have = self._set_aliases_or_missing(name, states)
            raise NotFoundError(
                f"model {name!r} has no alias {alias!r} (aliases: {have}); "
                f"set one with set_alias({name!r}, {alias!r}, version)"
            )
        return self.get(name, state.target)

    def alias_history(self, name: str, alias: str) -> list[dict[str, Any]]:
        """The applied moves of ``alias``, oldest first (commit order): dicts with version,
        previous (None for the first), set_at, reason, actor and move_id. Rejected
        compare-and-set moves are not part of it."""
        state = self._alias_states(name).get(alias)
        return [dict(m) for m in state.history] if state else []

    # ---- index facts (retrieval) ----------------------------------------------------------
    def record_index(self, name: str, version: int, info: dict[str, Any]) -> None:
        """Record the facts of a version's item index (kind, rows, measured recall@10, ...).

        Appended to the ``indexes`` table like every other registry write (one commit, never
        rewritten), so a rebuild or an upsert adds a row and ``index_info`` returns the latest.
        """
        self.get(name, version)  # raises NotFoundError naming what exists
        try:
            info_json = json.dumps(info or {}, sort_keys=True, default=str)
        except (TypeError, ValueError) as exc:
            raise UserInputError(f"index info must be JSON-serialisable: {exc}") from exc
        row = {"name": name, "version": int(version), "recorded_at": _now(), "info": info_json}
        self._table(INDEXES_TABLE, _INDEXES_SCHEMA).add(pa.Table.from_pylist([row], schema=_INDEXES_SCHEMA))
        log.info("recorded the index of %s version %d: %s", name, version, info_json)

    def index_info(self, name: str, version: int) -> dict[str, Any] | None:
        """The latest recorded index facts of a version (with ``recorded_at``), or None."""
        _check_name("model name", name)
        rows = [r for r in self._rows(INDEXES_TABLE, _INDEXES_SCHEMA, name) if int(r["version"]) == int(version)]
        if not rows:
            return None
        last = max(enumerate(rows), key=lambda p: (p[1]["recorded_at"], p[0]))[1]
        return {**json.loads(last["info"]), "recorded_at": _utc(last["recorded_at"]).isoformat()}
