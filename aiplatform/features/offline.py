"""The offline store of the declared feature views: Ray Data computes, Lance stores, every run a version.

A view's rows live at ``layout.feature_table(view.table_name)`` (``<name>__<version>.lance``),
so a changed definition writes a new table and old and new values never mix.

Runs:
- **full**: read the whole source table with Ray Data, hash entities into the fixed buckets of
  ``partition.entity_bucket``, group by bucket (whole entities per call) and compute each group
  with ``engine.compute_view_rows``; the groups stream into ONE Lance commit (mode overwrite),
  each group's rows sorted by (key, event_timestamp) (one bucket per group);
- **incremental** (default once a full run has been recorded): the watermark is the latest
  event timestamp already processed; only source rows with ``ts > watermark - max_window`` are
  read (the history the new rows' windows need), rows with ``event_timestamp > watermark`` are
  emitted and appended as one new Lance version. No new events: ``noop``, no new version;
- static views (no timestamp field) are always recomputed in full, unless the source files
  are unchanged since the last run (``noop``).

The state (watermark, Lance version, the lake generation read) is a small JSON file under
``<root>/features/_state``, written atomically *after* the Lance commit. If a run dies between
the two, the table is ahead of its state; the next run restores the recorded Lance version
first, so no row is written twice.

A scalar BITMAP index on ``_bucket`` is (re)built after each write (64 distinct values: cheap),
because the point-in-time join and materialization read one bucket at a time
(``_bucket = b`` / ``_bucket IN (...)``).

Limitation: events that arrive later with a timestamp at or before the watermark (late data)
are not seen by an incremental run, and rows of other entities whose windows they would fall
in are not recomputed. A full run (``--full``) fixes both.

The root may be an object store: sources are read through ``lake.table_files`` and the
root's pyarrow filesystem, every Lance call gets ``storage_options`` of its path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import pyarrow as pa

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError, NotFoundError
from aiplatform.core.storage import Layout, storage_options
from aiplatform.data import eventlog, lake
from aiplatform.features.definitions import FeatureView
from aiplatform.features.engine import compute_view_rows, output_schema, source_columns
from aiplatform.features.partition import BUCKET_COLUMN, TIMESTAMP_COLUMN, entity_bucket

if TYPE_CHECKING:  # Ray is imported where it runs, so importing this module stays cheap
    import ray.data

RunMode = Literal["full", "incremental", "noop"]


@dataclass
class ViewRunSummary:
    view: str
    version: str
    mode: RunMode
    rows_written: int
    watermark_before: int | None
    watermark_after: int | None
    lance_version: int | None
    duration_s: float


def offline_table_path(layout: Layout, view: FeatureView) -> str:
    """The Lance table of this version of ``view``."""
    return layout.feature_table(view.table_name)


def state_path(layout: Layout, view: FeatureView) -> str:
    return f"{layout.features}/_state/{view.table_name}.json"


def read_state(layout: Layout, view: FeatureView) -> dict[str, Any] | None:
    return storage.read_json(state_path(layout, view))


def watermark(layout: Layout, view: FeatureView) -> int | None:
    """Latest source event timestamp (microseconds since the epoch) already in the table, or None."""
    state = read_state(layout, view)
    return None if state is None else state.get("watermark_us")


def read_view(layout: Layout, view: FeatureView):
    """The view's Lance dataset (raises NotFoundError before its first run)."""
    import lance

    path = offline_table_path(layout, view)
    if not storage.exists(path):
        raise NotFoundError(f"view {view.name!r} (version {view.version}) has no offline table yet: "
                            "run `aiplatform features run`")
    return lance.dataset(path, storage_options=storage_options(path))


# --- source inspection on the driver (one column, pushed-down filter) ---------------------------
def _source_path(layout: Layout, view: FeatureView) -> list[str]:
    """The source's Parquet files; for ``events``, the lake's plus the event log's (events
    pushed in real time), so batch values equal what ``push`` computed online."""
    files = lake.table_files(layout, view.source.table)
    if not files:
        raise NotFoundError(f"view {view.name!r}: source table {view.source.table!r} is not in the lake "
                            f"({layout.lake_table(view.source.table)}): import it with `aiplatform data import`")
    if view.source.table == "events":
        return files + eventlog.files(layout)
    return files


def _ts_scalar(us: int) -> pa.Scalar:
    return pa.scalar(us, pa.timestamp("us", tz="UTC"))


def _max_source_ts(path: list[str], ts_field: str, after_us: int | None) -> int | None:
    """Latest timestamp of the source (of rows after ``after_us``), reading one column only."""
    import pyarrow.compute as pc

    dataset = lake.parquet_dataset(path)
    filt = None if after_us is None else pc.field(ts_field) > _ts_scalar(after_us)
    column = dataset.to_table(columns=[ts_field], filter=filt).column(ts_field)
    top = pc.max(column.cast(pa.timestamp("us", tz="UTC"))).as_py()
    return None if top is None else int(pd.Timestamp(top).value // 1000)


def _source_fingerprint(paths: list[str]) -> list[list[Any]]:
    """(path, size, mtime) of each source file: equal fingerprints mean unchanged sources."""
    fs, inside = lake.on_filesystem(paths)
    infos = fs.get_file_info(inside)
    return sorted([p, info.size, info.mtime_ns] for p, info in zip(paths, infos))


# --- the Ray Data pipeline ------------------------------------------------------------------------
def _add_bucket(batch: pd.DataFrame, key: str) -> pd.DataFrame:
    batch[BUCKET_COLUMN] = entity_bucket(batch[key].astype(str).to_numpy(dtype=object))
    return batch


def _keep_after(batch: pa.Table, ts_field: str, after_us: int) -> pa.Table:
    import pyarrow.compute as pc

    return batch.filter(pc.greater(batch.column(ts_field).cast(pa.timestamp("us", tz="UTC")), _ts_scalar(after_us)))


def _compute_group(frame: pd.DataFrame, view: FeatureView, emit_after_us: int | None) -> pa.Table:
    return compute_view_rows(view, frame, emit_after_us=emit_after_us)


def _shuffle_partitions() -> int:
    """Few, large shuffle partitions (2 per CPU, at most one per bucket): Ray Data's default
    of 200 makes hundreds of tiny tasks, and the engine is vectorised over whole buckets anyway."""
    import ray

    from aiplatform.features.partition import NUM_BUCKETS

    cpus = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else 2
    return max(2, min(NUM_BUCKETS, 2 * cpus))


def _rows_dataset(path: list[str], view: FeatureView, since_us: int | None,
                  emit_after_us: int | None) -> "ray.data.Dataset":
    import ray.data

    from ray.data.context import DataContext, ShuffleStrategy

    ts_field = view.source.timestamp_field
    fs, inside = lake.on_filesystem(path)
    ds = ray.data.read_parquet(inside, filesystem=fs).select_columns(source_columns(view))  # projection pushdown
    # Task-based sort shuffle: the default (hash shuffle) starts aggregator actors per job, which
    # costs tens of seconds on a small machine; grouping few large buckets needs no more.
    context = DataContext.get_current().copy()
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ds._context = context
    if since_us is not None and ts_field:
        ds = ds.map_batches(_keep_after, fn_kwargs={"ts_field": ts_field, "after_us": since_us},
                            batch_format="pyarrow", batch_size=None)
    return (ds.map_batches(_add_bucket, fn_kwargs={"key": view.entity.join_key}, batch_format="pandas",
                           batch_size=None)
            .groupby(BUCKET_COLUMN, num_partitions=_shuffle_partitions())
            .map_groups(_compute_group, fn_kwargs={"view": view, "emit_after_us": emit_after_us},
                        batch_format="pandas"))


def _write(ds: "ray.data.Dataset | None", view: FeatureView, path: str, mode: str) -> tuple[int, int, int | None]:
    """Stream the dataset's blocks into one Lance commit; returns (lance version, rows, max ts)."""
    import lance
    import pyarrow.compute as pc

    schema = output_schema(view)
    stats = {"rows": 0, "max": None}

    def batches():
        if ds is None:
            return
        for block in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            table = block.select(schema.names).cast(schema)
            if table.num_rows == 0:
                continue
            stats["rows"] += table.num_rows
            top = pc.max(table.column(TIMESTAMP_COLUMN)).as_py()
            top_us = int(pd.Timestamp(top).value // 1000)
            stats["max"] = top_us if stats["max"] is None else max(stats["max"], top_us)
            yield from table.to_batches()

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    if mode == "overwrite" and not storage.exists(path):
        mode = "create"
    options = storage_options(path)
    dataset = lance.write_dataset(reader, path, schema=schema, mode=mode, storage_options=options)
    _index_buckets(dataset)
    return lance.dataset(path, storage_options=options).version, stats["rows"], stats["max"]


def _index_buckets(dataset) -> None:
    if dataset.count_rows() == 0:
        return
    try:
        dataset.create_scalar_index(BUCKET_COLUMN, index_type="BITMAP", replace=True)
    except Exception:  # an index is an optimisation: reads stay correct (a scan) without it
        pass


def _sync_table_to_state(path: str, state: dict[str, Any]) -> None:
    """Undo a commit whose state file was never written (the run died in between)."""
    import lance

    options = storage_options(path)
    dataset = lance.dataset(path, storage_options=options)
    recorded = state.get("lance_version")
    if recorded is not None and dataset.latest_version != recorded:
        lance.dataset(path, version=recorded, storage_options=options).restore()


def _ensure_ray(ray_address_ok: bool) -> None:
    import ray

    if not ray.is_initialized() and not ray_address_ok:
        raise ConfigError("Ray is not initialised: call aiplatform.core.runtime.ensure_ray(settings) first")


def run_view(layout: Layout, view: FeatureView, *, full: bool = False,
             ray_address_ok: bool = True) -> ViewRunSummary:
    """Bring the view's offline table up to date with its source (see the module docstring).

    ``ray_address_ok=False`` refuses to start Ray implicitly (Ray Data would start a local one)."""
    started = time.perf_counter()
    _ensure_ray(ray_address_ok)
    generation = lake.table_generation(layout, view.source.table)  # read before the files it names
    source = _source_path(layout, view)
    path = offline_table_path(layout, view)
    state = read_state(layout, view) if storage.exists(path) else None
    ts_field = view.source.timestamp_field
    before = None if state is None else state.get("watermark_us")

    def summary(mode: RunMode, rows: int, after: int | None, version: int | None) -> ViewRunSummary:
        return ViewRunSummary(view.name, view.version, mode, rows, before, after, version,
                              time.perf_counter() - started)

    fingerprint = _source_fingerprint(source)
    if state is not None and not full:
        _sync_table_to_state(path, state)
        if ts_field is None:
            if state.get("source_fingerprint") == fingerprint:
                return summary("noop", 0, None, state.get("lance_version"))
        else:
            newest = _max_source_ts(source, ts_field, before) if before is not None else None
            if before is not None and newest is None:
                return summary("noop", 0, before, state.get("lance_version"))
            if before is not None:
                since = before - int(view.max_window.total_seconds() * 1_000_000)
                ds = _rows_dataset(source, view, since, before)
                version, rows, top = _write(ds, view, path, "append")
                after = max(before, top) if top is not None else before
                _save_state(layout, view, after, version, fingerprint, "incremental", generation)
                return summary("incremental", rows, after, version)
    storage.make_dirs(layout.features)
    if ts_field is not None and _max_source_ts(source, ts_field, None) is None:
        ds = None  # an empty source: an empty table (Ray Data's groupby wants rows)
    else:
        ds = _rows_dataset(source, view, None, None)
    version, rows, top = _write(ds, view, path, "overwrite")
    after = top if ts_field else None
    _save_state(layout, view, after, version, fingerprint, "full", generation)
    return summary("full", rows, after, version)


def _save_state(layout: Layout, view: FeatureView, watermark_us: int | None, lance_version: int,
                fingerprint: list, mode: str, lake_generation: str | None) -> None:
    """``lake_generation``: the source table's lake generation this run read, so a later run can
    tell that the lake was re-imported since (``pipeline.update_offline`` then runs in full)."""
    storage.write_json(state_path(layout, view), {
        "view": view.name, "version": view.version, "table": view.table_name,
        "watermark_us": watermark_us, "lance_version": lance_version, "source_fingerprint": fingerprint,
        "lake_generation": lake_generation, "last_mode": mode,
        "updated_at": datetime.now(timezone.utc).isoformat(),
    })


def run_views(layout: Layout, views, *, full: bool = False) -> list[ViewRunSummary]:
    """Run each view in turn (each a Ray Data job of its own)."""
    return [run_view(layout, v, full=full) for v in views]


__all__ = ["ViewRunSummary", "offline_table_path", "read_state", "read_view", "run_view", "run_views",
           "state_path", "watermark"]
