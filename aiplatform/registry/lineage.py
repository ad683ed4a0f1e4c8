"""Lineage of a model version, and the model card that shows it.

Why: "which code, which config, which features, which data produced the model now serving?" must
be answerable from the registry alone, months later, after the offline tables have moved on.
So each version records, at registration:

- the code: the git commit when the job runs in a checkout (``git`` on PATH), and always a digest
  of the package's own source files (a ``ray job submit`` working dir has no ``.git``);
- the training config and its hash (two runs with the same hash trained the same way);
- the feature service and every view it reads, with their definition versions and the Lance
  version of each offline table the training frame was read from (``lance.dataset(uri,
  version=…)`` reopens exactly those rows);
- the lake generation of the imported data;
- the evaluation: the split, the number of validation users, and the metrics (kept in
  ``metrics``).
"""

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

from aiplatform.core.storage import Layout

PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def config_hash(config: dict[str, Any]) -> str:
    """A short, stable hash of a config (keys sorted, values as JSON)."""
    text = json.dumps(config, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def source_digest(root: Path = PACKAGE_ROOT) -> str:
    """SHA-256 (first 16 hex digits) of the package's Python files: their paths and contents."""
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git_commit(cwd: Path = PACKAGE_ROOT) -> dict[str, Any] | None:
    """{'sha', 'dirty'} of the checkout the package lives in, or None outside one."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return {"sha": sha, "dirty": bool(dirty)} if sha else None


def code_version() -> dict[str, Any]:
    from aiplatform import __version__

    return {"package": __version__, "source_digest": source_digest(), "git": git_commit()}


def feature_lineage(layout: Layout, service: Any) -> dict[str, Any]:
    """The service and each of its views: definition version, offline table and its current Lance
    version (call right after the frame was read: the version the training read)."""
    from aiplatform.core.errors import NotFoundError
    from aiplatform.features.offline import offline_table_path, read_view

    views = []
    for view in service.views:
        try:
            lance_version = int(read_view(layout, view).version)
        except NotFoundError:
            lance_version = None
        views.append({"name": view.name, "version": view.version,
                      "table": offline_table_path(layout, view), "lance_version": lance_version})
    return {"name": service.name, "version": service.version, "views": views}


def data_lineage(layout: Layout) -> dict[str, Any]:
    from aiplatform.data import lake

    pointer = lake.current(layout)
    return {"lake_generation": pointer.get("generation"), "imported_at": pointer.get("imported_at"),
            "tables": pointer.get("tables", {})}


def collect(layout: Layout, service: Any, config: dict[str, Any], evaluation: dict[str, Any],
            **extra: Any) -> dict[str, Any]:
    """Everything above, as the JSON-ready dict the registry stores with a version."""
    return {
        "code": code_version(),
        "config_hash": config_hash(config),
        "feature_service": feature_lineage(layout, service),
        "data": data_lineage(layout),
        "evaluation": evaluation,
        **extra,
    }


__all__ = ["code_version", "collect", "config_hash", "data_lineage", "feature_lineage", "git_commit",
           "source_digest"]
