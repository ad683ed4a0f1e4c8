"""The lake: validated copies of the user's data under ``<home>/lake``.

An import validates every file before it writes any, then swaps each table in with a rename,
so a refused import leaves the previous good lake exactly as it was.
"""

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from aiplatform.core.errors import DataValidationError
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, validate


@dataclass
class ImportSummary:
    events: int
    items: int
    users: int
    start: pd.Timestamp
    end: pd.Timestamp


def import_files(layout: Layout, events: str, items: str, users: str | None = None) -> ImportSummary:
    """Validate the three files, then replace the lake's tables atomically (one rename each)."""
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
    for name, table in (("events", ev), ("items", it), ("users", us)):
        _swap_in(Path(layout.lake_table(name)), table)
    eventlog.clear(layout)  # real-time events of the replaced data do not belong to the new one
    ts = ev.column("timestamp")
    return ImportSummary(ev.num_rows, it.num_rows, us.num_rows,
                         pd.Timestamp(ts[0].as_py()), pd.Timestamp(ts[-1].as_py()))


def _swap_in(target: Path, table: pa.Table, rows_per_file: int = 500_000) -> None:
    staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}")
    staging.mkdir(parents=True)
    for i, start in enumerate(range(0, max(table.num_rows, 1), rows_per_file)):
        pq.write_table(table.slice(start, rows_per_file), staging / f"part-{i:05d}.parquet")
    old = target.with_name(f".{target.name}.old.{uuid.uuid4().hex}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)


def has_data(layout: Layout) -> bool:
    return all(Path(layout.lake_table(n)).exists() for n in ("events", "items"))


def read_items(layout: Layout) -> pd.DataFrame:
    return pq.read_table(layout.lake_table("items")).to_pandas()


def read_events(layout: Layout, columns: list[str] | None = None) -> pd.DataFrame:
    return pq.read_table(layout.lake_table("events"), columns=columns).to_pandas()
