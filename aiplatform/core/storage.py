"""The storage root and its layout (see DESIGN.md).

Every component asks ``Layout`` where its files live, so the tree is described once. Local
paths are made absolute so that Ray workers in other processes resolve them the same way.
"""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def filesystem_for(path: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and the path inside it, for a local path or an s3:// / gs:// URI."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class Layout:
    root: str

    @classmethod
    def at(cls, home: str) -> "Layout":
        root = home if is_uri(home) else str(Path(home).expanduser().resolve())
        return cls(root)

    def _join(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def lake(self) -> str:
        return self._join("lake")

    def lake_table(self, name: str) -> str:
        return self._join("lake", name)

    @property
    def features(self) -> str:
        return self._join("features")

    def feature_table(self, view: str) -> str:
        return self._join("features", f"{view}.lance")

    @property
    def online_sqlite(self) -> str:
        return self._join("online.sqlite")

    @property
    def registry(self) -> str:
        return self._join("registry")

    def model_dir(self, name: str, version: int) -> str:
        return self._join("models", name, str(version))

    @property
    def runs(self) -> str:
        return self._join("runs")

    @property
    def vectors(self) -> str:
        return self._join("vectors")

    @property
    def eventlog(self) -> str:
        return self._join("eventlog")

    def ensure(self) -> None:
        if not is_uri(self.root):
            for sub in ("lake", "features", "registry", "models", "runs", "vectors", "eventlog"):
                Path(self._join(sub)).mkdir(parents=True, exist_ok=True)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write a local file so readers see the old content or the new, never half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())
