"""Materialization: the latest offline feature row per entity -> the online store.

Why bucket by bucket: the offline tables are partitioned by ``_bucket`` (a stable hash of the
entity key, see ``partition``), so one bucket holds every row of its entities and the latest row
per entity needs that bucket only. Consecutive buckets are read together up to
``max_rows_per_read`` rows (a Lance scan filtered on one bucket still passes over the whole
``_bucket`` column, so 64 scans of a small table cost more than its data); memory stays bounded
by that (10M rows are never loaded at once) and each bucket is ONE atomic ``write_features``.

A service may read several views of its entity: their latest rows are joined by key (an entity
absent from a view gets nulls for that view's features) and the online row's event_timestamp is
the newest of them.

Incremental runs (the default once a watermark is recorded) read only rows newer than the
watermark (a filter pushed down into Lance) and upsert the same latest-per-entity rows, so the
result equals a full run. For a service of several views the untouched views of a touched entity
are re-read for those entities only, so a partial update never blanks the other views' values.
Rows that arrive late (event time <= watermark) need ``full=True``.
"""

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aiplatform.core.errors import NotFoundError
from aiplatform.core.storage import Layout, storage_options
from aiplatform.features.definitions import FeatureService, FeatureView, arrow_type
from aiplatform.features.online import OnlineStore, meta_prefix
from aiplatform.features.partition import BUCKET_COLUMN, TIMESTAMP_COLUMN

_TS_TYPE = pa.timestamp("us", tz="UTC")


@dataclass
class MaterializeSummary:
    rows_read: int
    entities_written: int
    duration_s: float
    watermark: int | None
    """Newest event_timestamp materialized (us since the epoch, UTC); None if nothing ever was."""


def watermark_key(service: FeatureService) -> str:
    return meta_prefix(service) + "materialize_watermark_us"


def _dataset(layout: Layout, view: FeatureView):
    import lance

    path = layout.feature_table(view.table_name)
    try:
        return lance.dataset(path, storage_options=storage_options(path))
    except (ValueError, FileNotFoundError, OSError) as e:
        raise NotFoundError(f"offline table of view {view.name!r} (version {view.version}) not found at {path}; "
                            "run the feature pipeline (`aiplatform features run`) first") from e


def _bucket_rows(ds, flt) -> dict[int, int]:
    """Rows per bucket (reads the ``_bucket`` column only)."""
    col = ds.to_table(columns=[BUCKET_COLUMN], filter=flt).column(BUCKET_COLUMN)
    if len(col) == 0:
        return {}
    counts = pc.value_counts(col).flatten()
    return dict(zip(counts[0].to_pylist(), counts[1].to_pylist()))


def _groups(rows: dict[int, int], max_rows: int) -> list[list[int]]:
    """Consecutive buckets grouped so that one read holds at most ``max_rows`` rows (or one
    bucket): a Lance scan per bucket costs a pass over the table, a scan per group far fewer."""
    groups: list[list[int]] = []
    size = 0
    for b in sorted(rows):
        if not groups or size + rows[b] > max_rows:
            groups.append([])
            size = 0
        groups[-1].append(b)
        size += rows[b]
    return groups


def latest_per_entity(table: pa.Table, key: str) -> pa.Table:
    """One row per ``key``: the newest event_timestamp; ties go to the row read last."""
    if table.num_rows == 0:
        return table
    indexed = pa.table({"k": table.column(key), "t": table.column(TIMESTAMP_COLUMN),
                        "i": np.arange(table.num_rows)})
    order = pc.sort_indices(indexed, sort_keys=[("k", "ascending"), ("t", "ascending"),
                                                ("i", "ascending")]).to_numpy()
    keys = table.column(key).take(pa.array(order)).to_numpy(zero_copy_only=False)
    last = np.ones(len(keys), bool)
    last[:-1] = keys[:-1] != keys[1:]
    return table.take(pa.array(order[last]))


def latest_by_bucket(table: pa.Table, key: str) -> dict[int, pa.Table]:
    """Per bucket, one row per ``key``: the newest event_timestamp; ties go to the row read
    last. One sort of (bucket, key, time, read position) and one ``take`` of the winners only."""
    if table.num_rows == 0:
        return {}
    indexed = pa.table({"b": table.column(BUCKET_COLUMN), "k": table.column(key),
                        "t": table.column(TIMESTAMP_COLUMN), "i": np.arange(table.num_rows)})
    order = pc.sort_indices(indexed, sort_keys=[("b", "ascending"), ("k", "ascending"), ("t", "ascending"),
                                                ("i", "ascending")]).to_numpy()
    keys = table.column(key).take(pa.array(order)).to_numpy(zero_copy_only=False)
    last = np.ones(len(keys), bool)
    last[:-1] = keys[:-1] != keys[1:]
    winners = table.take(pa.array(order[last]))
    buckets = winners.column(BUCKET_COLUMN).to_numpy()
    cuts = np.flatnonzero(np.diff(buckets)) + 1
    starts = [0, *cuts.tolist()]
    ends = [*cuts.tolist(), len(buckets)]
    return {int(buckets[s]): winners.slice(s, e - s) for s, e in zip(starts, ends)}


def _combine(service: FeatureService, latest: dict[FeatureView, pa.Table]) -> pa.Table:
    """Join the views' latest rows by key; nulls where an entity is absent from a view."""
    key = service.entity.join_key
    tables = list(latest.values())
    keys = pc.unique(pa.chunked_array([t.column(key) for t in tables], pa.string()))
    columns: dict[str, pa.Array] = {key: keys}
    ts = None
    for view, table in latest.items():
        idx = pc.index_in(keys, value_set=table.column(key))
        taken = table.take(idx)
        view_ts = taken.column(TIMESTAMP_COLUMN).cast(_TS_TYPE).cast(pa.int64())
        ts = view_ts if ts is None else pc.max_element_wise(ts, view_ts, skip_nulls=True)
        for name in service.selected(view):
            columns[name] = taken.column(name)
    columns[TIMESTAMP_COLUMN] = ts.cast(_TS_TYPE)
    ordered = [key, TIMESTAMP_COLUMN] + list(service.stored_dtypes)
    return pa.table({name: columns[name] for name in ordered})


def latest_service_rows(service: FeatureService, events) -> pa.Table:
    """Each entity's latest row of ``service`` computed in memory from ``events`` (a DataFrame
    that every view of the service reads): what ``materialize`` would write, without the
    offline store. For data that fits in memory: tests, notebooks."""
    from aiplatform.features.engine import compute_view_rows

    key = service.entity.join_key
    return _combine(service, {v: latest_per_entity(compute_view_rows(v, events), key) for v in service.views})


def _read(ds, view: FeatureView, service: FeatureService, flt) -> pa.Table:
    key = service.entity.join_key
    cols = [key, TIMESTAMP_COLUMN, BUCKET_COLUMN] + service.selected(view)
    table = ds.to_table(columns=cols, filter=flt)
    return table.cast(pa.schema([pa.field(key, pa.string()), pa.field(TIMESTAMP_COLUMN, _TS_TYPE),
                                 pa.field(BUCKET_COLUMN, pa.int32())]
                                + [pa.field(n, arrow_type(view.dtypes[n])) for n in service.selected(view)]))


def materialize(layout: Layout, service: FeatureService, store: OnlineStore, *, full: bool = False,
                max_rows_per_read: int = 1_000_000) -> MaterializeSummary:
    """Write the latest offline row per entity of ``service`` into ``store``, one atomic write
    per bucket.

    Buckets are read in groups of at most ``max_rows_per_read`` offline rows (a single bucket
    may exceed it; it is never split), which bounds memory. ``full=False`` reads only rows newer
    than the recorded watermark (a full run when none is recorded). The watermark is recorded
    after every bucket succeeded; a failure leaves the previous one, so the next run redoes the
    work (writes are idempotent)."""
    start = time.perf_counter()
    key = service.entity.join_key
    views = service.views
    datasets = {view: _dataset(layout, view) for view in views}
    previous = None if full else store.get_meta(watermark_key(service))
    since = None if previous is None else int(previous)
    ts_filter = None if since is None else pc.field(TIMESTAMP_COLUMN) > pa.scalar(since, _TS_TYPE)
    rows: dict[int, int] = {}
    for ds in datasets.values():
        for b, count in _bucket_rows(ds, ts_filter).items():
            rows[b] = rows.get(b, 0) + count
    rows_read = written = 0
    watermark = since
    for group in _groups(rows, max_rows_per_read):
        in_group = (pc.field(BUCKET_COLUMN) >= group[0]) & (pc.field(BUCKET_COLUMN) <= group[-1])
        flt = in_group if ts_filter is None else in_group & ts_filter
        new = {view: _read(ds, view, service, flt) for view, ds in datasets.items()}
        rows_read += sum(t.num_rows for t in new.values())
        for t in new.values():
            if t.num_rows:
                top = pc.max(t.column(TIMESTAMP_COLUMN).cast(pa.int64())).as_py()
                watermark = top if watermark is None else max(watermark, top)
        if since is not None and len(views) > 1:
            # Touched entities need every view's latest row, including views with no new rows.
            touched = pc.unique(pa.chunked_array([t.column(key) for t in new.values()], pa.string()))
            if len(touched) == 0:
                continue
            flt_keys = in_group & pc.field(key).isin(touched)
            new = {view: _read(ds, view, service, flt_keys) for view, ds in datasets.items()}
            rows_read += sum(t.num_rows for t in new.values())
        by_bucket = {view: latest_by_bucket(t, key) for view, t in new.items()}
        for b in group:
            latest = {view: parts[b] if b in parts else _empty(new[view]) for view, parts in by_bucket.items()}
            if not any(t.num_rows for t in latest.values()):
                continue
            combined = _combine(service, latest)
            store.write_features(service, combined)
            written += combined.num_rows
    if watermark is not None:
        store.set_meta(watermark_key(service), str(watermark))
    return MaterializeSummary(rows_read=rows_read, entities_written=written,
                              duration_s=time.perf_counter() - start, watermark=watermark)


def _empty(table: pa.Table) -> pa.Table:
    return table.slice(0, 0)


__all__ = ["MaterializeSummary", "materialize", "latest_by_bucket", "latest_per_entity", "latest_service_rows",
           "watermark_key"]
