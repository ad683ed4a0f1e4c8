"""The feature engine: one declared ``FeatureView`` + its source rows -> feature rows, vectorised.

This is the single implementation of the semantics in ``features.definitions`` that the offline
store (and, through it, the point-in-time join and materialization) relies on, so it is pure:
a frame in, an Arrow table out, no I/O and no Ray. It runs on one bucket of entities at a time
(whole entities per call), vectorised with numpy over all entities and rows of the call.

How it works (N source rows, Q output rows):
- rows are stable-sorted by (key, timestamp) and factorised; one output row per distinct
  (key, timestamp) sits at the *last* source row of that group, so every row at exactly ``t``
  is in the window ``(t - window, t]``;
- the window start of every output row is one ``searchsorted`` over a (key, timestamp-rank)
  composite, cached per distinct window length;
- count/sum/mean are differences of cumulative sums; min/max a sparse-table range query;
- ``last_n`` (not distinct) slices the filtered rows backwards; ``last_n`` distinct keeps the
  n most recent distinct values of each entity's prefix with a loop over *position within the
  entity* vectorised across all entities (work O(rows * n), iterations = longest entity
  history in the call), then keeps the prefix of that list whose last occurrence is inside
  the window (a prefix, because the list is ordered by last occurrence).

Deterministic ties: rows with equal (key, timestamp) are ordered by a hash of the values of
the columns the view reads (``tie_columns``), not by input order. Counts do not depend on that
order; ``last_n`` and plain fields do (among equal timestamps, the row later in that order is
"more recent"). Ray Data's shuffle does not keep input order, so this is what makes a full run,
an incremental run and a re-run give the same lists: the same rows give the same output in
whatever order they arrive. Rows equal in every read column are interchangeable.

Nulls: rows with a null key or timestamp are dropped; a null value never counts for an
aggregation with a ``column`` (``count`` with a column counts non-null values, like SQL).
``last_n`` values are stored as strings.

Static views (``source.timestamp_field is None``, plain fields only): one row per entity, the
entity's last row in input order wins, ``event_timestamp`` is the Unix epoch (valid from
the beginning of time).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from aiplatform.core.errors import ConfigError
from aiplatform.features.definitions import Aggregation, FeatureView, arrow_type
from aiplatform.features.partition import BUCKET_COLUMN, TIMESTAMP_COLUMN, entity_bucket

STATIC_TIMESTAMP_US = 0
"""``event_timestamp`` of the rows of a static view: the epoch, so a lookup at any time finds them."""


def output_schema(view: FeatureView) -> pa.Schema:
    """Schema of a view's offline rows: key, event_timestamp, _bucket, then the features in order."""
    fields = [pa.field(view.entity.join_key, pa.string()),
              pa.field(TIMESTAMP_COLUMN, pa.timestamp("us", tz="UTC")),
              pa.field(BUCKET_COLUMN, pa.int32())]
    fields += [pa.field(name, arrow_type(dtype)) for name, dtype in view.dtypes.items()]
    return pa.schema(fields)


def timestamps_us(values: Any) -> np.ndarray:
    """Microseconds since the epoch (int64) of timestamps; naive values are taken as UTC, nulls give NaT's int."""
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        values = values.to_pandas()
    ts = pd.to_datetime(pd.Series(values), utc=True).dt.as_unit("us")
    return ts.array.asi8


def compute_view_rows(view: FeatureView, source: pd.DataFrame | pa.Table,
                      emit_after_us: int | None = None) -> pa.Table:
    """Feature rows of ``view`` from its source rows (see the module docstring for the semantics).

    ``emit_after_us`` keeps only rows with ``event_timestamp > emit_after_us``: the source may
    hold older context rows (an incremental run re-reads ``max_window`` of history) that feed
    the windows without being emitted again.
    """
    frame = source.to_pandas() if isinstance(source, pa.Table) else source
    key = view.entity.join_key
    if key not in frame.columns:
        raise ConfigError(f"view {view.name!r}: join key column {key!r} is not in the source "
                          f"(columns: {', '.join(map(str, frame.columns))})")
    if view.source.timestamp_field is None:
        if view.aggregations:
            raise ConfigError(f"view {view.name!r}: aggregations need a timestamped source; "
                              f"set timestamp_field on BatchSource({view.source.table!r})")
        return _static_rows(view, frame)
    return _windowed_rows(view, frame, emit_after_us)


# --- static views -------------------------------------------------------------------------------
def _static_rows(view: FeatureView, frame: pd.DataFrame) -> pa.Table:
    key = view.entity.join_key
    frame = frame[frame[key].notna()]
    last = frame.drop_duplicates(subset=[key], keep="last")
    keys = last[key].astype(str).to_numpy(dtype=object)
    order = np.argsort(keys, kind="stable")
    last, keys = last.iloc[order], keys[order]
    columns: dict[str, Any] = {
        key: pa.array(keys, pa.string()),
        TIMESTAMP_COLUMN: pa.array(np.full(len(keys), STATIC_TIMESTAMP_US, np.int64), pa.int64()),
        BUCKET_COLUMN: pa.array(entity_bucket(keys), pa.int32()),
    }
    for f in view.fields:
        columns[f.name] = _field_array(view, f.name, f.dtype, last[f.column])
    return _assemble(view, columns)


def _field_array(view: FeatureView, name: str, dtype: str, values: pd.Series) -> pa.Array:
    try:
        return pa.array(values, from_pandas=True).cast(arrow_type(dtype))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise ConfigError(f"view {view.name!r}: field {name!r} cannot be read as {dtype} ({exc}); "
                          "change the Field's dtype to match the column") from exc


def _assemble(view: FeatureView, columns: dict[str, Any]) -> pa.Table:
    schema = output_schema(view)
    arrays = [columns[f.name].cast(f.type) for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


# --- windowed views -----------------------------------------------------------------------------
class _Sorted:
    """The source rows of one call, stable-sorted by (key, timestamp), and the output rows."""

    def __init__(self, frame: pd.DataFrame, key: str, ts_field: str, emit_after_us: int | None,
                 tie_columns: list[str]):
        ts_all = timestamps_us(frame[ts_field])
        ok = frame[key].notna().to_numpy() & (ts_all != np.iinfo(np.int64).min)
        frame = frame[ok]
        ts_all = ts_all[ok]
        codes, uniques = pd.factorize(frame[key].astype(str), sort=True)
        tie = pd.util.hash_pandas_object(frame[tie_columns], index=False).to_numpy() if tie_columns \
            else np.zeros(len(frame), np.uint64)
        order = np.lexsort((tie, ts_all, codes))
        self.frame = frame.iloc[order].reset_index(drop=True)
        self.ts = ts_all[order]
        self.kc = codes[order].astype(np.int64)
        self.keys = np.asarray(uniques, dtype=object)
        n = len(self.ts)
        # the output rows: last source row of each (key, timestamp) group
        last = np.ones(n, bool)
        if n > 1:
            last[:-1] = (self.kc[1:] != self.kc[:-1]) | (self.ts[1:] != self.ts[:-1])
        if emit_after_us is not None:
            last &= self.ts > emit_after_us
        self.ends = np.flatnonzero(last)  # inclusive end index of each output row's window
        self.t = self.ts[self.ends]
        self.qkey = self.kc[self.ends]
        # composite (key, rank of ts) to find window starts with one searchsorted
        srt = np.sort(self.ts)
        self._uniq_ts = srt[np.concatenate([[True], srt[1:] != srt[:-1]])] if n else srt
        self._stride = len(self._uniq_ts) + 1
        self._composite = self.kc * self._stride + np.searchsorted(self._uniq_ts, self.ts, side="right")
        self._starts: dict[int, np.ndarray] = {}
        self._masks: dict[tuple, np.ndarray] = {}

    def start(self, window_us: int) -> np.ndarray:
        """Index of the first source row of each output row's window ``(t - window, t]``."""
        if window_us not in self._starts:
            rank = np.searchsorted(self._uniq_ts, self.t - window_us, side="right")
            self._starts[window_us] = np.searchsorted(self._composite, self.qkey * self._stride + rank,
                                                      side="right")
        return self._starts[window_us]

    def mask(self, agg: Aggregation) -> np.ndarray:
        """Rows that count for ``agg``: its ``where`` filter and, with a column, a non-null value."""
        cache_key = (agg.where, agg.column)
        if cache_key not in self._masks:
            m = np.ones(len(self.ts), bool)
            for col, values in agg.where:
                m &= self.frame[col].isin(list(values)).to_numpy()
            if agg.column:
                m &= self.frame[agg.column].notna().to_numpy()
            self._masks[cache_key] = m
        return self._masks[cache_key]


def _windowed_rows(view: FeatureView, frame: pd.DataFrame, emit_after_us: int | None) -> pa.Table:
    key = view.entity.join_key
    s = _Sorted(frame, key, view.source.timestamp_field, emit_after_us, tie_columns(view))
    keys = s.keys[s.qkey] if len(s.qkey) else np.zeros(0, dtype=object)
    columns: dict[str, Any] = {
        key: pa.array(keys, pa.string()),
        TIMESTAMP_COLUMN: pa.array(s.t, pa.int64()),
        BUCKET_COLUMN: pa.array(entity_bucket(keys), pa.int32()),
    }
    for agg in view.aggregations:
        columns[agg.name] = _aggregate(s, agg)
    for f in view.fields:  # the entity's latest row at t: the window end row itself
        columns[f.name] = _field_array(view, f.name, f.dtype, s.frame[f.column].iloc[s.ends])
    return _assemble(view, columns)


def source_columns(view: FeatureView) -> list[str]:
    """The source columns a view reads (key, timestamp, aggregated, filtered and plain columns)."""
    cols = [view.entity.join_key]
    if view.source.timestamp_field:
        cols.append(view.source.timestamp_field)
    for a in view.aggregations:
        cols += ([a.column] if a.column else []) + [c for c, _ in a.where]
    cols += [f.column for f in view.fields]
    return list(dict.fromkeys(cols))


def tie_columns(view: FeatureView) -> list[str]:
    """Columns whose values order rows with equal (key, timestamp): those the results depend on."""
    skip = {view.entity.join_key, view.source.timestamp_field}
    return [c for c in source_columns(view) if c not in skip]


def _window_us(agg: Aggregation) -> int:
    return int(round(agg.window.total_seconds() * 1_000_000))


def _aggregate(s: _Sorted, agg: Aggregation) -> pa.Array:
    starts, ends = s.start(_window_us(agg)), s.ends + 1  # rows [starts, ends)
    mask = s.mask(agg)
    if agg.function == "last_n":
        return _last_n(s, agg, mask, starts, ends)
    counts = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    n = counts[ends] - counts[starts]
    if agg.function == "count":
        return pa.array(n, pa.int64())
    values = np.where(mask, s.frame[agg.column].to_numpy(dtype=np.float64, na_value=np.nan), 0.0)
    if agg.function in ("sum", "mean"):
        sums = np.concatenate([[0.0], np.cumsum(values)])
        total = sums[ends] - sums[starts]
        if agg.function == "sum":
            return pa.array(total, pa.float64())
        with np.errstate(invalid="ignore", divide="ignore"):
            return pa.array(total / np.maximum(n, 1), pa.float64(), mask=n == 0)
    if agg.function in ("min", "max"):
        fill = np.inf if agg.function == "min" else -np.inf
        values = np.where(mask, values, fill)
        out = _range_reduce(values, starts, ends, np.minimum if agg.function == "min" else np.maximum)
        return pa.array(out, pa.float64(), mask=n == 0)
    raise ConfigError(f"aggregation {agg.name!r}: unknown function {agg.function!r}")


def _range_reduce(values: np.ndarray, starts: np.ndarray, ends: np.ndarray, op) -> np.ndarray:
    """``op`` over ``values[starts[i]:ends[i]]`` for every i (non-empty ranges), by a sparse table."""
    if len(starts) == 0:
        return np.zeros(0)
    lengths = np.maximum(ends - starts, 1)
    levels = [values]
    while (1 << len(levels)) <= lengths.max():
        prev, half = levels[-1], 1 << (len(levels) - 1)
        levels.append(op(prev[:-half], prev[half:]) if len(prev) > half else prev[:0])
    k = np.floor(np.log2(lengths)).astype(np.int64)
    out = np.empty(len(starts))
    for level in np.unique(k):
        sel = k == level
        table, span = levels[level], 1 << level
        a, b = starts[sel], ends[sel] - span
        out[sel] = op(table[np.minimum(a, len(table) - 1)], table[np.maximum(b, 0)])
    return out


def _last_n(s: _Sorted, agg: Aggregation, mask: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> pa.Array:
    if agg.n < 1:
        raise ConfigError(f"aggregation {agg.name!r}: last_n needs n >= 1 (got {agg.n})")
    idx_f = np.flatnonzero(mask)  # filtered rows, still sorted by (key, ts)
    codes, uniques = pd.factorize(s.frame[agg.column].iloc[idx_f].astype(str))
    uniques = np.asarray(uniques, dtype=object)
    counts = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
    lo, hi = counts[starts], counts[ends]  # window as filtered positions [lo, hi)
    q = len(lo)
    if not agg.distinct:
        length = np.minimum(hi - lo, agg.n)
        offsets = np.concatenate([[0], np.cumsum(length)])
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], length)
        flat = codes[np.repeat(hi - 1, length) - within] if offsets[-1] else np.zeros(0, np.int64)
    else:
        nonempty = hi > lo
        wanted = np.zeros(len(codes), bool)
        wanted[hi[nonempty] - 1] = True
        state_c, state_p, slot = _distinct_prefix_lists(codes, s.kc[idx_f], agg.n, wanted)
        rows = np.maximum(slot[np.maximum(hi - 1, 0)], 0) if len(codes) else np.zeros(q, np.int64)
        # positions along a list decrease, so the values still in the window are a prefix
        # count of entries >= lo per row by one searchsorted: each row, negated, ascends
        stride = len(codes) + 2
        composite = (np.arange(len(state_p))[:, None] * stride + (len(codes) - state_p)).ravel()
        length = np.searchsorted(composite, rows * stride + (len(codes) - lo), side="right") - rows * agg.n
        length = np.where(nonempty, length, 0)
        offsets = np.concatenate([[0], np.cumsum(length)])
        within = np.arange(offsets[-1]) - np.repeat(offsets[:-1], length)
        flat = state_c.ravel()[np.repeat(rows * agg.n, length) + within]
    # Arrow's take on the few distinct values: no Python string object per list element
    values = pa.array(uniques, pa.string()).take(pa.array(flat, pa.int32()))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _distinct_prefix_lists(codes: np.ndarray, keys: np.ndarray, n: int,
                           wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For the filtered rows i with ``wanted[i]``: the n most recent distinct values of its
    entity's rows up to i (codes, and the position of each value's last occurrence; -1 pads),
    most recent first. Returns (codes, positions, slot) where ``slot[i]`` is row i's index in
    the first two (-1 when not wanted); only wanted rows are kept, so memory is O(output).

    The recurrence list_i = [v_i] + (list_{i-1} without v_i)[:n-1] runs for all entities at
    once, one step per position within an entity (entities sorted by history length, so the
    active ones are a prefix)."""
    m = len(codes)
    slot = np.full(m, -1, np.int64)
    slot[wanted] = np.arange(int(wanted.sum()))
    out_c = np.full((max(int(wanted.sum()), 1), n), -1, np.int32)
    out_p = np.full((max(int(wanted.sum()), 1), n), -1, np.int64)
    if m == 0:
        return out_c, out_p, slot
    first = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
    lengths = np.diff(np.concatenate([first, [m]]))
    order = np.argsort(-lengths, kind="stable")
    first, lengths = first[order], lengths[order]
    active_at = np.searchsorted(-lengths, -np.arange(1, lengths[0] + 1), side="right")  # #lengths > i
    state_c = np.full((len(first), n), -1, np.int64)
    state_p = np.full((len(first), n), -1, np.int64)
    shift = np.arange(1, n)[None, :]
    for i in range(int(lengths[0])):
        a = int(active_at[i])
        rows = first[:a] + i
        v = codes[rows]
        sc, sp = state_c[:a], state_p[:a]
        eq = sc == v[:, None]
        hit = np.where(eq.any(axis=1), eq.argmax(axis=1), n - 1)
        src = np.where(shift - 1 < hit[:, None], shift - 1, shift)  # drop the hit (or the last)
        new_c, new_p = np.empty_like(sc), np.empty_like(sp)
        new_c[:, 0], new_p[:, 0] = v, rows
        new_c[:, 1:] = np.take_along_axis(sc, src, axis=1)
        new_p[:, 1:] = np.take_along_axis(sp, src, axis=1)
        state_c[:a], state_p[:a] = new_c, new_p
        keep = slot[rows]
        sel = keep >= 0
        out_c[keep[sel]], out_p[keep[sel]] = new_c[sel], new_p[sel]
    return out_c, out_p, slot


__all__ = ["STATIC_TIMESTAMP_US", "compute_view_rows", "output_schema", "source_columns", "tie_columns",
           "timestamps_us"]
