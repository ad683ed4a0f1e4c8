"""The event log: events received in real time (``POST /v1/events``, ``features.push``).

Each accepted batch is validated exactly like an imported events file (same schema, same
errors) and written as one Parquet file under ``<root>/eventlog`` with ``storage.write_bytes``
(one PUT on an object store, a temp-file rename on a local disk), so a batch is either wholly
there or not at all, and a refused batch leaves nothing behind.

The lake's events plus the event log are "all events": the batch feature pipeline reads both,
so a value pushed online is the value a later batch run computes from the same events.
A new ``aiplatform data import`` replaces the lake and clears the log (it belonged to the old data).
"""

import time
import uuid

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aiplatform.core import schemas, storage
from aiplatform.core.storage import Layout
from aiplatform.data import lake, validate


def validate_pushed(events: "pa.Table | pd.DataFrame | list[dict]") -> pa.Table:
    """Events in the lake's schema, or a ``DataValidationError`` naming the field and the fix."""
    if isinstance(events, pa.Table):
        table = events
    elif isinstance(events, pd.DataFrame):
        table = pa.Table.from_pandas(events, preserve_index=False)
    else:
        table = pa.Table.from_pylist(list(events))
    # Optional fields that are None in every event arrive untyped: give them the contract's type.
    for i, name in enumerate(table.column_names):
        if pa.types.is_null(table.schema.field(name).type) and name in schemas.EVENTS.names:
            table = table.set_column(i, name, pa.nulls(table.num_rows, schemas.EVENTS.field(name).type))
    return validate.validate_events(table, "pushed events")


def append(layout: Layout, events: pa.Table) -> str:
    """Write one validated batch atomically; returns the file's path (or URI)."""
    name = f"events-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
    buffer = pa.BufferOutputStream()
    pq.write_table(events.cast(schemas.EVENTS), buffer)
    path = storage.join(layout.eventlog, name)
    storage.write_bytes(path, buffer.getvalue().to_pybytes())
    return path


def files(layout: Layout) -> list[str]:
    """The log's committed files, oldest first (temp files of a batch in flight are skipped)."""
    return storage.list_files(layout.eventlog, suffix=".parquet", prefix="events-")


def event_paths(layout: Layout) -> list[str]:
    """Every Parquet file of all events: the lake's, then the log's."""
    return lake.table_files(layout, "events") + files(layout)


def read_events(layout: Layout, *, key: str | None = None, keys=None, since_us: int | None = None,
                columns: list[str] | None = None) -> pa.Table:
    """All events (lake + log), optionally only those of some entities and after a time.

    Filters are pushed down into the Parquet scan, so reading a few users' recent events does
    not load the whole lake."""
    paths = event_paths(layout)
    if not paths:
        return schemas.EVENTS.empty_table()
    dataset = lake.parquet_dataset(paths, schema=schemas.EVENTS)
    flt = None
    if keys is not None:
        flt = pc.field(key).isin(pa.array(list(keys), pa.string()))
    if since_us is not None:
        cond = pc.field("timestamp") > pa.scalar(since_us, pa.timestamp("us", tz="UTC"))
        flt = cond if flt is None else flt & cond
    return dataset.to_table(filter=flt, columns=columns)


def clear(layout: Layout) -> None:
    """Remove the log (a new import replaces the data it belonged to)."""
    for path in files(layout):
        storage.delete_file(path)
