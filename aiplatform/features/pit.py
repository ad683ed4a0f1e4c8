"""Exact point-in-time joins: training frames whose features are what serving would have seen.

A label row (entity key, time ``T``) gets, from each feature view, the latest feature row of the
same entity with ``t <= T``; if that row is older than the view's ttl (``T - t > ttl``) or there
is none, the features are null and ``<view>__status`` says why (``expired`` / ``missing``).
Ties on (key, t) go to the row written later, as in the offline store.

Why this shape:
- the core (:func:`asof_join`) is pure Arrow + numpy: one stable sort of the feature rows by
  (key code, time) and one ``searchsorted`` per label, so it is exact (no time window that could
  miss an old match) and fast, and list columns are gathered with Arrow ``take`` (never per-row
  Python objects);
- on Ray Data both sides are partitioned by the offline store's entity bucket: labels are grouped
  by ``_bucket`` and each group reads only its bucket's rows from the Lance table itself, so
  nothing is broadcast;
- a bucket grows with the table (the bucket count is part of the stored layout), so a task
  streams its bucket in batches (:func:`asof_join_batches`) keeping only the best row so far per
  label: memory per task is one batch plus that bucket's labels, not a whole bucket.
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa

from aiplatform.core.errors import UserInputError
from aiplatform.core.storage import Layout, storage_options
from aiplatform.features.definitions import FeatureService, FeatureView, OnDemandFeatureView, arrow_type
from aiplatform.features.partition import BUCKET_COLUMN, NUM_BUCKETS, TIMESTAMP_COLUMN, entity_bucket

if TYPE_CHECKING:  # Ray is imported where it runs, so importing this module stays cheap
    import ray.data

OK, MISSING, EXPIRED = "ok", "missing", "expired"
STATUS_SUFFIX, TIMESTAMP_SUFFIX = "__status", "__event_timestamp"
UTC_US = pa.timestamp("us", tz="UTC")


# ---- the pure core ------------------------------------------------------------------------------
def _as_table(data: pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(data, pa.Table):
        return data
    if isinstance(data, pd.DataFrame):
        return pa.Table.from_pandas(data, preserve_index=False)
    raise TypeError(f"expected a pyarrow Table or a pandas DataFrame, got {type(data).__name__}")


def _column(table: pa.Table, name: str, side: str) -> pa.ChunkedArray:
    if name not in table.column_names:
        raise UserInputError(f"{side} have no column {name!r} (columns: {', '.join(table.column_names)}); "
                             f"add it or pass the right column name")
    return table.column(name)


def _micros(col: pa.ChunkedArray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Times as int64 microseconds since the epoch (naive = UTC) and a validity mask.

    Finer units are floored (``t <= T`` on whole microseconds is the same test)."""
    if pa.types.is_timestamp(col.type):
        raw = col.cast(pa.int64()).fill_null(0).to_numpy()
        values = np.floor_divide(raw, 1000) if col.type.unit == "ns" else \
            raw * {"s": 1_000_000, "ms": 1_000, "us": 1}[col.type.unit]
    elif pa.types.is_integer(col.type):  # already microseconds
        values = col.cast(pa.int64()).fill_null(0).to_numpy()
    else:
        raise UserInputError(f"column {name!r} has type {col.type}; expected a timestamp "
                             "(convert it with pd.to_datetime(..., utc=True))")
    valid = ~col.is_null().to_numpy(zero_copy_only=False) if col.null_count else np.ones(len(col), bool)
    return np.ascontiguousarray(values, dtype=np.int64), valid


def _key_codes(label_keys: pa.ChunkedArray, feature_keys: pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Dense integer codes shared by both sides (-1 for null keys); keys compare as strings."""
    n = len(label_keys)
    both = pa.chunked_array(label_keys.cast(pa.string()).chunks + feature_keys.cast(pa.string()).chunks,
                            type=pa.string())
    encoded = both.combine_chunks().dictionary_encode() if len(both) else pa.array([], pa.string()).dictionary_encode()
    codes = encoded.indices.cast(pa.int64()).fill_null(-1).to_numpy()
    return codes[:n], codes[n:]


def _check_no_clash(labels: pa.Table, feature_columns: Sequence[str], prefix_status: str) -> None:
    added = [*feature_columns, prefix_status + TIMESTAMP_SUFFIX, prefix_status + STATUS_SUFFIX]
    clash = [c for c in added if c in labels.column_names]
    if clash:
        raise UserInputError(f"labels already have column(s) {clash} that the join adds; rename or drop them")


def _within_ttl(has: np.ndarray, lab_t: np.ndarray, matched_t: np.ndarray, ttl_us: int | None) -> np.ndarray:
    """Labels whose matched row is at most ``ttl_us`` old (all matched ones when there is no ttl)."""
    return has & ((lab_t - matched_t) <= int(ttl_us)) if ttl_us is not None else has.copy()


def asof_join(labels: pa.Table | pd.DataFrame, features: pa.Table | pd.DataFrame, *, key: str, label_ts: str,
              ttl_us: int | None, feature_columns: list[str], prefix_status: str,
              feature_ts: str = TIMESTAMP_COLUMN) -> pa.Table:
    """Label rows (kept in input order, none dropped) + the as-of feature values.

    Adds ``feature_columns`` (null unless status is ``ok``), ``<prefix_status>__event_timestamp``
    (the matched row's time, null when none at or before ``T``) and ``<prefix_status>__status``
    (``ok`` | ``missing`` | ``expired``). ``ttl_us=None`` means rows never expire. Null label keys
    or times are ``missing``; feature rows with a null key or time are ignored.
    """
    labels, features = _as_table(labels), _as_table(features)
    _check_no_clash(labels, feature_columns, prefix_status)
    for c in feature_columns:
        _column(features, c, "feature rows")

    lab_t, lab_valid = _micros(_column(labels, label_ts, "labels"), label_ts)
    match, matched_t = _match(_column(labels, key, "labels"), lab_t, lab_valid,
                              _column(features, key, "feature rows"), features, feature_ts)
    has = match >= 0
    ok = _within_ttl(has, lab_t, matched_t, ttl_us)
    take = pa.array(np.where(ok, match, 0), pa.int64(), mask=~ok)
    gathered = features.select(feature_columns).take(take) if feature_columns else None
    return _assemble(labels, feature_columns, [features.schema.field(c) for c in feature_columns],
                     gathered, matched_t, has, ok, prefix_status)


def _match(label_keys: pa.ChunkedArray, lab_t: np.ndarray, lab_valid: np.ndarray, feature_keys: pa.ChunkedArray,
           features: pa.Table, feature_ts: str) -> tuple[np.ndarray, np.ndarray]:
    """Per label: the input position of its as-of feature row (-1 when none) and that row's time
    in microseconds (0 when none). Among equal (key, time) rows the later input row wins."""
    lab_codes, fea_codes = _key_codes(label_keys, feature_keys)
    fea_t, fea_valid = _micros(_column(features, feature_ts, "feature rows"), feature_ts)

    # Feature rows in (code, time, input position) order; lexsort is stable, so among equal
    # (key, time) the later input row comes last and wins the backward search below.
    keep = np.flatnonzero(fea_valid & (fea_codes >= 0))
    order = keep[np.lexsort((fea_t[keep], fea_codes[keep]))]
    s_codes, s_t = fea_codes[order], fea_t[order]

    # One sortable int64 per row: code * span + (t - t0). If that could overflow, rank the
    # times first (dense ranks keep the order and the ties, and always fit).
    lab_ok = lab_valid & (lab_codes >= 0)
    times = np.concatenate([s_t, lab_t[lab_ok]])
    n_codes = int(max(s_codes.max(initial=-1), lab_codes.max(initial=-1))) + 1
    if len(times):
        t0, span = int(times.min()), int(times.max()) - int(times.min()) + 1
        if n_codes * span < 2**62:
            f_rank, l_rank = s_t - t0, lab_t[lab_ok] - t0
        else:
            uniq, inverse = np.unique(times, return_inverse=True)
            span = len(uniq)
            f_rank, l_rank = inverse[:len(s_t)], inverse[len(s_t):]
    else:
        span, f_rank, l_rank = 1, s_t, lab_t[lab_ok]
    f_comp = s_codes * np.int64(span) + f_rank
    l_comp = lab_codes[lab_ok] * np.int64(span) + l_rank

    pos = np.searchsorted(f_comp, l_comp, side="right") - 1
    found = pos >= 0
    found[found] = s_codes[pos[found]] == lab_codes[lab_ok][found]

    n = len(lab_t)
    sorted_pos = np.full(n, -1, np.int64)  # sorted position of the matched row, -1 when none
    sorted_pos[np.flatnonzero(lab_ok)[found]] = pos[found]
    has = sorted_pos >= 0
    matched_t = np.zeros(n, np.int64)
    matched_t[has] = s_t[sorted_pos[has]]
    match = np.full(n, -1, np.int64)
    match[has] = order[sorted_pos[has]]
    return match, matched_t


def _assemble(labels: pa.Table, feature_columns: list[str], fields: list[pa.Field], gathered: pa.Table | None,
              matched_t: np.ndarray, has: np.ndarray, ok: np.ndarray, prefix_status: str) -> pa.Table:
    """Labels + gathered feature columns (one row per label) + matched time + status."""
    ts_name, status_name = prefix_status + TIMESTAMP_SUFFIX, prefix_status + STATUS_SUFFIX
    status = np.where(ok, OK, np.where(has, EXPIRED, MISSING))
    out = labels
    for field in fields:
        out = out.append_column(field, gathered.column(field.name))
    out = out.append_column(pa.field(ts_name, UTC_US), pa.array(matched_t, UTC_US, mask=~has))
    return out.append_column(pa.field(status_name, pa.string()), pa.array(status, pa.string()))


# ---- Ray Data: both sides partitioned by entity bucket -----------------------------------------
def _ttl_us(view: FeatureView) -> int | None:
    return None if view.ttl is None else int(view.ttl.total_seconds() * 1_000_000)


def _add_bucket(batch: pa.Table, key: str) -> pa.Table:
    return batch.append_column(pa.field(BUCKET_COLUMN, pa.int32()),
                               pa.array(entity_bucket(batch.column(key), NUM_BUCKETS), pa.int32()))


BUCKET_BATCH_ROWS = 131_072
"""Feature rows of one bucket joined at a time. A bucket grows with the table (the bucket count
is fixed by the stored layout), so a task reads its bucket in batches of about this many rows
and keeps only the best match so far per label: its memory is one batch plus its labels,
whatever the size of the table (about 36 MB a batch at 30 float64 features; measured on one
warm worker, a 400k-row bucket added ~25 MB batched vs ~130 MB read whole)."""

ROW_ORDER = "_rowaddr"


def asof_join_batches(labels: pa.Table, batches: Iterable[pa.Table], *, key: str, label_ts: str,
                      ttl_us: int | None, feature_columns: list[str], fields: Sequence[pa.Field],
                      prefix_status: str, feature_ts: str = TIMESTAMP_COLUMN,
                      order_column: str = ROW_ORDER) -> pa.Table:
    """:func:`asof_join` of ``labels`` against the concatenation of ``batches``, one batch in
    memory at a time.

    Each batch carries ``order_column``, a unique int giving the write order of its rows (Lance's
    row address); batches may come in any order. Per label the best row so far is kept (later
    time wins; equal time: the later write), and of its features only rows still within the ttl,
    at most one per label. ``fields`` are the feature columns' types (for labels with no match
    in any batch). Exactly equal to ``asof_join(labels, <all rows in write order>, ...)``.
    """
    _check_no_clash(labels, feature_columns, prefix_status)
    n = labels.num_rows
    label_keys = _column(labels, key, "labels")
    lab_t, lab_valid = _micros(_column(labels, label_ts, "labels"), label_ts)
    best_t = np.zeros(n, np.int64)
    best_order = np.full(n, -1, np.int64)
    has = np.zeros(n, bool)
    kept: pa.Table | None = None  # feature values of the best row per label (if within ttl), + "__pit_label__"
    for batch in batches:
        if batch.num_rows == 0:
            continue
        row_order = batch.column(order_column).cast(pa.int64()).to_numpy()
        if len(row_order) > 1 and not (np.diff(row_order) > 0).all():  # ties break on input position
            perm = np.argsort(row_order, kind="stable")
            batch, row_order = batch.take(perm), row_order[perm]
        match, t = _match(label_keys, lab_t, lab_valid, _column(batch, key, "feature rows"), batch, feature_ts)
        found = np.flatnonzero(match >= 0)
        o = row_order[match[found]]
        prev_t = best_t[found]
        better = found[~has[found] | (t[found] > prev_t) | ((t[found] == prev_t) & (o > best_order[found]))]
        if not len(better):
            continue
        best_t[better], best_order[better], has[better] = t[better], row_order[match[better]], True
        if feature_columns:
            fresh = better if ttl_us is None else better[(lab_t[better] - t[better]) <= int(ttl_us)]
            if kept is not None:  # a label's older row is superseded even when its new one is expired
                replaced = np.zeros(n, bool)
                replaced[better] = True
                kept = kept.filter(pa.array(~replaced[kept.column("__pit_label__").to_numpy()]))
            piece = batch.select(feature_columns).take(pa.array(match[fresh])) \
                .append_column("__pit_label__", pa.array(fresh, pa.int64()))
            kept = piece if kept is None else pa.concat_tables([kept, piece])
    ok = _within_ttl(has, lab_t, best_t, ttl_us)
    gathered = None
    if feature_columns:
        if kept is None or kept.num_rows == 0:
            gathered = pa.table({f.name: pa.nulls(n, f.type) for f in fields})
        else:
            where = np.zeros(n, np.int64)
            where[kept.column("__pit_label__").to_numpy()] = np.arange(kept.num_rows)
            gathered = kept.select(feature_columns).take(pa.array(where, pa.int64(), mask=~ok))
    return _assemble(labels, feature_columns, list(fields), gathered, best_t, has, ok, prefix_status)


def _scan_bucket(path: str, columns: list[str], cond: str, batch_rows: int) -> Iterator[pa.Table]:
    """Rows of some buckets (found through the ``_bucket`` index) in tables of about
    ``batch_rows`` rows, each with its Lance row address (``_rowaddr``: a later fragment, or a
    later row of one fragment, is a later write)."""
    import lance

    # Lance's defaults read ahead up to a large I/O buffer, which on a big bucket is most of it:
    # bound the readahead too, or batching bounds nothing. This runs in a Ray task: the options
    # (an object store's endpoint) come from the path and the worker's inherited environment.
    dataset = lance.dataset(path, storage_options=storage_options(path))
    scanner = dataset.scanner(columns=columns, filter=cond, with_row_address=True,
                              batch_size=min(batch_rows, 65_536), batch_readahead=4,
                              fragment_readahead=2, io_buffer_size=64 * 2**20)
    pending: list[pa.RecordBatch] = []
    rows = 0
    for rb in scanner.to_batches():
        pending.append(rb)
        rows += rb.num_rows
        if rows >= batch_rows:
            yield pa.Table.from_batches(pending)
            pending, rows = [], 0
    if pending:
        yield pa.Table.from_batches(pending)


def _join_bucket(group: pa.Table, *, plan: list[tuple], key: str, label_ts: str, batch_rows: int) -> pa.Table:
    """One bucket of labels against the same bucket of each view's Lance table, read here, by
    this task, with a filter, ``batch_rows`` rows at a time: memory is bounded by the batch and
    the labels, not by the table."""
    buckets = np.unique(group.column(BUCKET_COLUMN).to_numpy())
    out = group.drop_columns([BUCKET_COLUMN])
    cond = (f"{BUCKET_COLUMN} = {int(buckets[0])}" if len(buckets) == 1
            else f"{BUCKET_COLUMN} IN ({', '.join(str(int(b)) for b in buckets)})")
    for path, view_key, ttl_us, columns, fields, prefix in plan:
        batches = _scan_bucket(path, [view_key, TIMESTAMP_COLUMN, *columns], cond, batch_rows)
        if view_key != key:
            batches = (b.rename_columns([key if c == view_key else c for c in b.column_names]) for b in batches)
        out = asof_join_batches(out, batches, key=key, label_ts=label_ts, ttl_us=ttl_us, feature_columns=columns,
                                fields=fields, prefix_status=prefix)
    return out


def _batch_rows(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UserInputError(f"batch_rows must be a positive int (feature rows read at a time per bucket), "
                             f"got {value!r}; the default is {BUCKET_BATCH_ROWS}")
    return int(value)


def _plan(layout: Layout, views: Sequence[tuple[FeatureView, list[str]]]) -> list[tuple]:
    import lance

    plan, seen = [], set()
    for view, names in views:
        path = layout.feature_table(view.table_name)
        try:
            schema = lance.dataset(path, storage_options=storage_options(path)).schema
        except (ValueError, OSError) as exc:
            raise UserInputError(f"feature view {view.name!r} (version {view.version}) has no offline table at "
                                 f"{path}; run the feature pipeline for it first") from exc
        unknown = [n for n in names if n not in schema.names]
        if unknown:
            raise UserInputError(f"feature view {view.name!r} has no feature(s) {unknown}; "
                                 f"choose from {view.features}")
        dup = [n for n in names if n in seen]
        if dup:
            raise UserInputError(f"feature(s) {dup} appear in more than one view; select each name once")
        seen.update(names)
        plan.append((path, view.entity.join_key, _ttl_us(view), list(names), [schema.field(n) for n in names],
                     view.name))
    return plan


def _check_columns(names: Sequence[str], key: str, label_ts: str) -> None:
    if key not in names:
        raise UserInputError(f"labels have no column {key!r} (the entity join key); columns are {list(names)}. "
                             f"Add a {key!r} column with the entity id of each label row")
    if label_ts not in names:
        raise UserInputError(f"labels have no column {label_ts!r} (the label time); columns are {list(names)}. "
                             f"Add it, or pass label_ts='<your time column>'")
    if BUCKET_COLUMN in names:
        raise UserInputError(f"labels have a column {BUCKET_COLUMN!r}, which the join uses internally; drop it")


def _join_views(labels: "ray.data.Dataset", layout: Layout, views: Sequence[tuple[FeatureView, list[str]]],
                label_ts: str, batch_rows: int = BUCKET_BATCH_ROWS) -> "ray.data.Dataset":
    """One shuffle of the labels by bucket, then every view joined inside the same group."""
    import ray

    keys = {v.entity.join_key for v, _ in views}
    if len(keys) != 1:
        raise UserInputError(f"views {[v.name for v, _ in views]} have different join keys {sorted(keys)}; "
                             "join views of one entity at a time")
    key = keys.pop()
    _check_columns(labels.schema().names, key, label_ts)
    plan = _plan(layout, views)
    cpus = int(ray.cluster_resources().get("CPU", 2)) if ray.is_initialized() else 2
    partitions = max(2, min(NUM_BUCKETS, cpus * 2))
    # Task-based sort shuffle for this job only: Ray 2.60's default hash shuffle starts aggregator
    # actors per job (15-20 s here); a few large bucket groups need no more than tasks.
    from ray.data.context import DataContext, ShuffleStrategy

    context = DataContext.get_current().copy()
    context.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    bucketed = labels.map_batches(_add_bucket, fn_kwargs={"key": key}, batch_format="pyarrow")
    bucketed._context = context  # this job's copy; the caller's dataset and the global context are untouched
    return (bucketed
            .groupby(BUCKET_COLUMN, num_partitions=partitions)
            .map_groups(_join_bucket, fn_kwargs={"plan": plan, "key": key, "label_ts": label_ts,
                                                 "batch_rows": batch_rows},
                        batch_format="pyarrow"))


def point_in_time_join(labels: "ray.data.Dataset", layout: Layout, view: FeatureView,
                       features: list[str] | None = None, *, label_ts: str = "event_timestamp",
                       batch_rows: int = BUCKET_BATCH_ROWS) -> "ray.data.Dataset":
    """Labels + ``view``'s features as of each label's time (see :func:`asof_join`), on Ray Data.

    ``labels`` need the view's join key and ``label_ts``; every label row comes back once (row
    order across the dataset may change) with the features, ``<view>__event_timestamp`` and
    ``<view>__status``. ``batch_rows``: feature rows of a bucket held at a time by a task (see
    :data:`BUCKET_BATCH_ROWS`); it bounds memory, never changes the result.
    """
    return _join_views(labels, layout, [(view, list(view.features if features is None else features))], label_ts,
                       _batch_rows(batch_rows))


class _LazyColumns(Mapping):
    """Numpy views of a batch's columns, converted only when an on-demand fn asks for them
    (list columns would otherwise become per-row Python objects for nothing)."""

    def __init__(self, batch: pa.Table, names: Sequence[str]):
        self._batch, self._names, self._cache = batch, list(names), {}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._cache:
            self._cache[name] = self._batch.column(name).to_numpy(zero_copy_only=False)
        return self._cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _on_demand(batch: pa.Table, *, odfvs: list[OnDemandFeatureView], drop: list[str]) -> pa.Table:
    for odfv in odfvs:
        names = [*odfv.request_fields, *(f for v in odfv.inputs for f in v.features)]
        result = odfv.fn(_LazyColumns(batch, names))
        for name, dtype in odfv.outputs.items():
            if name not in result:
                raise UserInputError(f"on-demand view {odfv.name!r} returned no {name!r}; its fn must return "
                                     f"every name in outputs {list(odfv.outputs)}")
            batch = batch.append_column(pa.field(name, arrow_type(dtype)),
                                        pa.array(np.asarray(result[name]), arrow_type(dtype)))
    return batch.drop_columns([c for c in drop if c in batch.column_names])


def _to_dataset(labels: Any) -> "ray.data.Dataset":
    import ray.data

    if isinstance(labels, ray.data.Dataset):
        return labels
    if isinstance(labels, pd.DataFrame):
        return ray.data.from_pandas([labels])  # a list: override_num_blocks crashes with pandas 3
    if isinstance(labels, pa.Table):
        return ray.data.from_arrow(labels)
    raise UserInputError(f"labels must be a Ray Dataset, a pandas DataFrame or a pyarrow Table, "
                         f"not {type(labels).__name__}")


def get_training_frame(labels: "ray.data.Dataset | pd.DataFrame | pa.Table", service: FeatureService,
                       layout: Layout, *, label_ts: str = "event_timestamp",
                       batch_rows: int = BUCKET_BATCH_ROWS) -> "ray.data.Dataset":
    """The training frame of ``service``: labels + its views' selected features as of each
    label's time + its on-demand features (computed by the same fns serving runs).

    ``labels`` carry the service's entity join key, ``label_ts`` and the request fields of its
    on-demand views. Features an on-demand view reads but the service does not select are
    joined too, then dropped, so the frame holds exactly the service's features.
    """
    ds = _to_dataset(labels)
    names = ds.schema().names
    key = service.entity.join_key
    _check_columns(names, key, label_ts)
    missing = [f for f in service.request_fields if f not in names]
    if missing:
        raise UserInputError(f"labels lack request field(s) {missing} needed by the on-demand features of "
                             f"service {service.name!r}; add them as columns of the labels")
    wanted = {v: service.selected(v) for v in service.views}
    for odfv in service.on_demand:
        for v in odfv.inputs:
            wanted.setdefault(v, [])
    extra: list[str] = []
    for odfv in service.on_demand:
        for v in odfv.inputs:
            for f in v.features:
                if f not in wanted[v]:
                    wanted[v].append(f)
                    extra.append(f)
    out = _join_views(ds, layout, list(wanted.items()), label_ts, _batch_rows(batch_rows))
    if service.on_demand:
        out = out.map_batches(_on_demand, fn_kwargs={"odfvs": service.on_demand, "drop": extra},
                              batch_format="pyarrow")
    return out


__all__ = ["BUCKET_BATCH_ROWS", "EXPIRED", "MISSING", "OK", "asof_join", "asof_join_batches", "get_training_frame",
           "point_in_time_join"]
