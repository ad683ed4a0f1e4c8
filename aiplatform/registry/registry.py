"""The model registry: numbered versions of a model, named aliases, and the history of both.

Stored as two Lance tables under ``Layout.registry`` (so a registry on ``s3://`` works the same
as one on disk) and the artifact files under ``Layout.model_dir(name, version)``:

- ``model_versions``: one row per registered version (metrics, params, checkpoint and artifact
  locations, lineage). Rows are only ever appended.
- ``aliases``: one row per alias move. The current target of an alias is its latest row, so
  the table *is* the history: who pointed ``champion`` where, when and why.

Every write is one Lance commit, and the artifact is copied before its row is appended: a
version that the registry lists always has its files in place.
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

import lancedb
import pyarrow as pa
import pyarrow.fs as pafs

from aiplatform.core.errors import NotFoundError, UserInputError
from aiplatform.core.storage import Layout, filesystem_for, is_uri

log = logging.getLogger(__name__)

VERSIONS_TABLE = "model_versions"
ALIASES_TABLE = "aliases"

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


class ModelRegistry:
    """Versions and aliases of models under one storage root.

    Reads always see the latest commit (``read_consistency_interval=0``), so a registry opened
    by the serving driver sees a version registered by a training job a moment ago.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        if not is_uri(layout.registry):
            Path(layout.registry).mkdir(parents=True, exist_ok=True)
        self._db = lancedb.connect(layout.registry, read_consistency_interval=timedelta(0))

    # ---- tables -------------------------------------------------------------------------
    def _table(self, name: str, schema: pa.Schema):
        # exist_ok makes concurrent first use by two processes safe.
        return self._db.create_table(name, schema=schema, mode="create", exist_ok=True)

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

        The files are copied first (to a temporary directory renamed into place, so a reader
        never sees half an artifact) and the row is appended last: the row is the commit.
        If another process claims the same version number in between, the rename fails and
        the next number is tried.
        """
        _check_name("model name", name)
        src = Path(artifact_src_dir)
        if not src.is_dir() or not any(src.iterdir()):
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

        existing = [r["version"] for r in self._rows(VERSIONS_TABLE, _VERSIONS_SCHEMA, name)]
        version = max(existing, default=0) + 1
        for _ in range(100):
            dest = self.layout.model_dir(name, version)
            if self._copy_artifact(src, dest):
                break
            version += 1
        else:  # pragma: no cover - would need 100 concurrent registrations
            raise RuntimeError(f"could not claim a version directory for model {name!r}")

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

    def _copy_artifact(self, src: Path, dest: str) -> bool:
        """Copy ``src`` to ``dest``; False if ``dest`` is already taken."""
        if is_uri(dest):
            # Object stores have no directory rename; the registry row appended after the
            # copy is what makes the version visible, so a partial copy is never served.
            fs, path = filesystem_for(dest)
            if fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
                return False
            pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=fs)
            return True
        target = Path(dest)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() and any(target.iterdir()):
            return False
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{uuid.uuid4().hex[:8]}."))
        try:
            staged = tmp / "artifact"
            shutil.copytree(src, staged)
            try:
                # Atomic on POSIX; fails if another process renamed a non-empty dir there first.
                os.rename(staged, target)
            except OSError:
                return False
            return True
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

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
