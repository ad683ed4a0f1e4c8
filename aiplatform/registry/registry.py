"""The model registry: numbered versions of a model, named aliases, and the history of both.

Stored as Lance tables under ``Layout.registry`` (so a registry on ``s3://`` works the same
as one on disk) and the artifact files under ``Layout.model_dir(name, version)``:

- ``model_versions``: one row per registered version (metrics, params, checkpoint and artifact
  locations, lineage). Rows are only ever appended.
- ``aliases``: one row per alias move. The current target of an alias is its latest row, so
  the table *is* the history: who pointed ``champion`` where, when and why.
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
from pathlib import Path
from typing import Any

import lance
import lancedb
import pyarrow as pa
import pyarrow.fs as pafs

from aiplatform.core import storage
from aiplatform.core.errors import NotFoundError, UserInputError
from aiplatform.core.storage import Layout, filesystem_for, is_uri

log = logging.getLogger(__name__)

VERSIONS_TABLE = "model_versions"
ALIASES_TABLE = "aliases"
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


def _utc(ts: datetime) -> datetime:
    if ts.tzinfo is None:
        return ts.replace(tzinfo=timezone.utc)
    return ts.astimezone(timezone.utc)


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
    def set_alias(self, name: str, alias: str, version: int, reason: str = "") -> None:
        """Point ``alias`` at ``version`` (which must exist); earlier targets stay in history."""
        _check_name("alias", alias)
        self.get(name, version)  # raises NotFoundError naming what exists
        row = {
            "name": name,
            "alias": alias,
            "version": int(version),
            "set_at": _now(),
            "reason": str(reason or ""),
        }
        self._table(ALIASES_TABLE, _ALIASES_SCHEMA).add(
            pa.Table.from_pylist([row], schema=_ALIASES_SCHEMA)
        )
        log.info("alias %s/%s -> version %d (%s)", name, alias, version, reason)

    def _alias_rows(self, name: str, alias: str | None = None) -> list[dict[str, Any]]:
        _check_name("model name", name)
        rows = self._rows(ALIASES_TABLE, _ALIASES_SCHEMA, name)
        if alias is not None:
            rows = [r for r in rows if r["alias"] == alias]
        # Lance keeps append order within a table, but sort explicitly: set_at then position.
        return [r for _, r in sorted(enumerate(rows), key=lambda p: (p[1]["set_at"], p[0]))]

    def aliases(self, name: str) -> dict[str, int]:
        """Current alias -> version map of a model."""
        current: dict[str, int] = {}
        for r in self._alias_rows(name):
            current[r["alias"]] = int(r["version"])
        return current

    def get_by_alias(self, name: str, alias: str) -> ModelVersion:
        rows = self._alias_rows(name, alias)
        if not rows:
            if not self.list_versions(name):
                raise self._missing_model(name)
            have = ", ".join(sorted(self.aliases(name))) or "none set"
            raise NotFoundError(
                f"model {name!r} has no alias {alias!r} (aliases: {have}); "
                f"set one with set_alias({name!r}, {alias!r}, version)"
            )
        return self.get(name, int(rows[-1]["version"]))

    def alias_history(self, name: str, alias: str) -> list[dict[str, Any]]:
        """Every move of ``alias``, oldest first: dicts with version, set_at and reason."""
        return [
            {"version": int(r["version"]), "set_at": _utc(r["set_at"]), "reason": r["reason"]}
            for r in self._alias_rows(name, alias)
        ]

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
