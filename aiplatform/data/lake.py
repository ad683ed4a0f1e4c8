"""The lake: validated copies of the user's data under ``<root>/lake``.

Layout (the same on a local folder and on an object store)::

    lake/_current.json                        {"tables": {"events": G, "items": G, "users": G},
                                               "generation": G, "imported_at": ISO time}
    lake/<table>/<generation G>/part-00000.parquet

Why generations and a pointer: an import must be all-or-nothing, and an object store has no
directory rename to swap a table in with. So an import validates every file before it writes
any, writes each table into a new generation folder that no reader looks at yet, then switches
all tables at once by writing the one pointer object (a single PUT, or a temp-file rename on a
local disk: atomic either way), and only then deletes the old generations (best effort: a
leftover is never read). A refused import, or one that dies before the pointer is written,
leaves the previous lake exactly as it was.

Readers never list the lake themselves: ``table_files`` names the current generation's Parquet
files, and ``on_filesystem`` / ``parquet_dataset`` turn them into what pyarrow and Ray Data take.
A table folder holding Parquet files directly and absent from the pointer (a lake written before
generations existed, or by hand) is read as it is.
"""

import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aiplatform.core import storage
from aiplatform.core.errors import DataValidationError
from aiplatform.core.storage import Layout
from aiplatform.data import validate

POINTER = "_current.json"
ROWS_PER_FILE = 500_000


@dataclass
class ImportSummary:
    events: int
    items: int
    users: int
    start: pd.Timestamp
    end: pd.Timestamp


# ---- the pointer ------------------------------------------------------------------------------
def pointer_path(layout: Layout) -> str:
    return storage.join(layout.lake, POINTER)


def current(layout: Layout) -> dict[str, Any]:
    """The pointer (``{}`` before the first import, or for a lake without generations)."""
    return storage.read_json(pointer_path(layout), default={}) or {}


def table_generation(layout: Layout, name: str) -> str | None:
    """The generation of ``name`` that readers see (None: no import wrote it)."""
    return current(layout).get("tables", {}).get(name)


def imported_at(layout: Layout) -> pd.Timestamp | None:
    """When the current pointer was written (None without one)."""
    value = current(layout).get("imported_at")
    return None if not value else pd.Timestamp(value)


# ---- readers ----------------------------------------------------------------------------------
def table_files(layout: Layout, name: str) -> list[str]:
    """The Parquet files of table ``name`` as readers must see it, sorted, in the root's own form
    (local paths or URIs); empty when the table is not in the lake."""
    folder = layout.lake_table(name)
    generation = table_generation(layout, name)
    if generation is not None:
        return storage.list_files(storage.join(folder, generation), suffix=".parquet")
    return storage.list_files(folder, suffix=".parquet")


def has_table(layout: Layout, name: str) -> bool:
    return bool(table_files(layout, name))


def has_data(layout: Layout) -> bool:
    """True once events and items have been imported."""
    return all(has_table(layout, n) for n in ("events", "items"))


def on_filesystem(paths: list[str]) -> tuple[pafs.FileSystem, list[str]]:
    """The filesystem holding ``paths`` (all under one root) and the paths inside it: what
    ``pyarrow.dataset.dataset`` and ``ray.data.read_parquet`` take (``filesystem=``)."""
    if not paths:
        return pafs.LocalFileSystem(), []
    fs, _ = storage.filesystem_for(paths[0])
    return fs, [storage.filesystem_for(p)[1] for p in paths]


def parquet_dataset(paths: list[str], schema: pa.Schema | None = None) -> pads.Dataset:
    """A pyarrow dataset over Parquet files of the root, local or in an object store."""
    fs, inside = on_filesystem(paths)
    return pads.dataset(inside, schema=schema, format="parquet", filesystem=fs)


def table_dataset(layout: Layout, name: str) -> pads.Dataset | None:
    """Table ``name`` as a pyarrow dataset (None when it is not in the lake)."""
    files = table_files(layout, name)
    return parquet_dataset(files) if files else None


def _read(layout: Layout, name: str, columns: list[str] | None = None) -> pd.DataFrame:
    dataset = table_dataset(layout, name)
    if dataset is None:
        raise FileNotFoundError(f"table {name!r} is not in the lake at {layout.lake}: "
                                "import data with `aiplatform data import`")
    return dataset.to_table(columns=columns).to_pandas()


def read_items(layout: Layout) -> pd.DataFrame:
    return _read(layout, "items")


def read_events(layout: Layout, columns: list[str] | None = None) -> pd.DataFrame:
    return _read(layout, "events", columns)


# ---- writers ----------------------------------------------------------------------------------
def import_files(layout: Layout, events: str, items: str, users: str | None = None) -> ImportSummary:
    """Validate the three files, then replace the lake's tables all at once (``write_tables``)."""
    from aiplatform.data import eventlog  # the log reads the lake: imported here, not at the top

    ev = validate.validate_events(validate.read_file(events), events)
    it = validate.validate_items(validate.read_file(items), items)
    us = validate.validate_users(validate.read_file(users), users) if users else None
    validate.check_references(ev, it, events)
    if us is None:
        ids = pd.unique(ev.column("user_id").to_numpy(zero_copy_only=False))
        us = pa.table({"user_id": pa.array(ids, pa.string())})
    else:
        known = set(us.column("user_id").to_pylist())
        missing = set(pd.unique(ev.column("user_id").to_numpy(zero_copy_only=False))) - known
        if missing:
            raise DataValidationError(
                events, f"names users that are not in the users file (e.g. '{sorted(missing)[0]}')",
                column="user_id", failed_rows=len(missing),
                expected="every user_id to appear in the users file (or omit --users)")
    ev = ev.sort_by([("timestamp", "ascending")])
    layout.ensure()
    write_tables(layout, {"events": ev, "items": it, "users": us})
    eventlog.clear(layout)  # real-time events of the replaced data do not belong to the new one
    ts = ev.column("timestamp")
    return ImportSummary(ev.num_rows, it.num_rows, us.num_rows,
                         pd.Timestamp(ts[0].as_py()), pd.Timestamp(ts[-1].as_py()))


def write_tables(layout: Layout, tables: dict[str, pa.Table], rows_per_file: int = ROWS_PER_FILE) -> str:
    """Replace ``tables`` (name -> rows) in one atomic switch; other tables keep their data.
    Returns the new generation."""
    now = datetime.now(timezone.utc)
    generation = f"{now:%Y%m%dT%H%M%S%fZ}-{uuid.uuid4().hex[:8]}"
    # Generations that exist before this one is written: only these may be deleted afterwards,
    # never one that a concurrent import is still writing.
    earlier = {name: storage.list_dirs(layout.lake_table(name)) for name in tables}
    for name, table in tables.items():
        folder = storage.join(layout.lake_table(name), generation)
        storage.make_dirs(folder)
        fs, inside = storage.filesystem_for(folder)
        for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
            pq.write_table(table.slice(start, rows_per_file), f"{inside}/part-{i:05d}.parquet", filesystem=fs)
    live = {**current(layout).get("tables", {}), **{name: generation for name in tables}}
    storage.write_json(pointer_path(layout), {"tables": live, "generation": generation,
                                              "imported_at": now.isoformat()})
    _drop_unused(layout, earlier)
    return generation


def _drop_unused(layout: Layout, earlier: dict[str, list[str]]) -> None:
    """Delete generations the pointer no longer names, and Parquet files written before
    generations existed (best effort: readers never see either)."""
    live = current(layout).get("tables", {})
    for name, generations in earlier.items():
        folder = layout.lake_table(name)
        try:
            for generation in generations:
                if generation != live.get(name):
                    storage.delete_dir(storage.join(folder, generation))
            if name in live:
                for path in storage.list_files(folder, suffix=".parquet"):
                    storage.delete_file(path)
        except OSError:
            pass


__all__ = ["ImportSummary", "current", "has_data", "has_table", "import_files", "imported_at", "on_filesystem",
           "parquet_dataset", "pointer_path", "read_events", "read_items", "table_dataset", "table_files",
           "table_generation", "write_tables"]
