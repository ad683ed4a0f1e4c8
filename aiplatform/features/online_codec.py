"""The binary row of the online store and its decoder: one value per (service version, entity).

Why this format: a request reads the features of 1..100 entities, so the cost that matters is
per entity and per call, not per value. Each entity of a feature service is ONE precomputed
value, read with one SQLite SELECT or one Redis ``MGET``, and all rows of a request are decoded
together with numpy. No Python object is made per numeric value.

Row layout (little-endian), format 1:
  int64 event_timestamp (us, UTC) | uint32 format | uint32 number of features |
  uint8 valid flag per feature (padded to 8 bytes) | int64 per int64/bool feature |
  float64 per float64 feature | (uint32 byte length, uint32 item count) per string/list feature |
  raw int64/float64 values of the numeric lists | the text features as UTF-8, joined by U+001E
  (a string as is, a list<string> as its items joined by U+001F).
Text is last and separated so that a read decodes the text of all its rows with ONE
``bytes.decode`` and ONE ``str.split``; the price is that strings and list items may not contain
U+001E/U+001F (refused on write with the column named).
The timestamp comes first so Redis' compare-and-set script can read it with ``struct.unpack``.

Fixed-width services (only int64 / float64 / bool features: no strings, no lists) have rows of
one size, so a read of n entities is ONE ``b"".join`` + ONE ``np.frombuffer`` into an
[entity, word] int64 matrix, and a missing entity is decoded from a precomputed placeholder row
(``RowCodec.missing_row``: timestamp -1, format 0, nothing valid, 0 / NaN values) instead of a
second code path. The per-call Python work is then a constant plus one array view per feature.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from aiplatform.core.errors import ConfigError, DataValidationError, UserInputError
from aiplatform.features.definitions import FeatureService, arrow_type
from aiplatform.features.partition import TIMESTAMP_COLUMN

ROW_FORMAT = 1
LIST_SEPARATOR = "\x1f"
"""Joins the items of a list<string> feature inside a row."""
TEXT_SEPARATOR = "\x1e"
"""Joins the text features of a row (and the rows of a read, to decode them in one call).
Strings and list items may contain neither separator (checked on write)."""
_NUMERIC_LISTS = {"list<int64>": np.dtype("<i8"), "list<float64>": np.dtype("<f8")}
_STATUS = np.array(["ok", "missing"])
_EMPTY_BIN = pa.scalar(b"", pa.binary())


class RowCodec:
    """Encodes a service's stored features into one binary row per entity, and decodes many rows
    at once. One codec per (service name, version); it only depends on ``stored_dtypes``."""

    def __init__(self, service: FeatureService) -> None:
        self.service = service
        self.join_key = service.entity.join_key
        self.dtypes = dict(service.stored_dtypes)
        self.names = list(self.dtypes)
        self.ints = [n for n, d in self.dtypes.items() if d in ("int64", "bool")]
        self.floats = [n for n, d in self.dtypes.items() if d == "float64"]
        # storage order of the variable part: numeric lists (binary), then the text features
        self.numlists = [n for n, d in self.dtypes.items() if d in _NUMERIC_LISTS]
        self.texts = [n for n, d in self.dtypes.items() if d in ("string", "list<string>")]
        self.vars = self.numlists + self.texts
        unknown = set(self.names) - set(self.ints) - set(self.floats) - set(self.vars)
        if unknown:
            raise ConfigError(f"feature service {service.name!r}: unsupported dtypes for {sorted(unknown)}")
        padded = -(-len(self.names) // 8) * 8
        fields: list[tuple] = [("ts", "<i8"), ("fmt", "<u4"), ("nf", "<u4")]
        if padded:
            fields.append(("valid", "u1", (padded,)))
        if self.ints:
            fields.append(("ints", "<i8", (len(self.ints),)))
        if self.floats:
            fields.append(("floats", "<f8", (len(self.floats),)))
        if self.vars:
            fields.append(("var", "<u4", (len(self.vars), 2)))
        self.struct = np.dtype(fields)
        self.fixed = self.struct.itemsize
        self._valid_pos = {n: i for i, n in enumerate(self.names)}
        self._bools = [n for n in self.ints if self.dtypes[n] == "bool"]
        self._in_order = self.names == self.ints + self.floats + self.vars
        self._text_lists = any(self.dtypes[t] == "list<string>" for t in self.texts)
        # (name, is a list, slot in the var block) per text feature: no dict lookups per read
        self._text_plan = [(t, self.dtypes[t] == "list<string>", len(self.numlists) + j)
                           for j, t in enumerate(self.texts)]
        v0 = 2
        i0 = v0 + padded // 8
        f0 = i0 + len(self.ints)
        r0 = f0 + len(self.floats)
        self._blocks = (v0, i0, f0, r0, r0 + len(self.vars))
        assert self.fixed == 8 * self._blocks[-1]
        # The fixed-width fast path (no strings or lists): the header word after the timestamp
        # (format | feature count << 32) of a stored row and of the missing-entity placeholder.
        self.fixed_width = not self.vars
        self._word1 = ROW_FORMAT | (len(self.names) << 32)
        self._head_ok = self._word1.to_bytes(8, "little")
        self.missing_row = b""
        if self.fixed_width:
            rec = np.zeros(1, self.struct)
            rec["ts"] = -1
            rec["nf"] = len(self.names)
            if self.floats:
                rec["floats"] = np.nan
            self.missing_row = rec.tobytes()
        self._missing_word1 = len(self.names) << 32

    # ---- encode ---------------------------------------------------------------------------
    def _column(self, table: pa.Table, name: str, dtype: pa.DataType | None = None) -> pa.Array:
        if name not in table.column_names:
            raise UserInputError(
                f"feature service {self.service.name!r}: the table has no column {name!r}; "
                f"write_features needs {self.join_key!r}, {TIMESTAMP_COLUMN!r} and {self.names}")
        col = table.column(name).combine_chunks() if table.num_rows else pa.array([], table.schema.field(name).type)
        if dtype is not None and col.type != dtype:
            try:
                col = col.cast(dtype)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                raise DataValidationError("online write", f"cannot convert {col.type} to {dtype}", column=name,
                                          hint=f"give {name!r} the service's dtype ({e})") from e
        return col

    def encode(self, table: pa.Table) -> tuple[list[str], np.ndarray, list[bytes]]:
        """(entity ids, event timestamps in us, rows) of a table with the join key, the event
        timestamp and the stored features; vectorised with Arrow, no per-value Python work."""
        n = table.num_rows
        keys_arr = self._column(table, self.join_key, pa.string())
        if keys_arr.null_count:
            raise DataValidationError("online write", "null entity ids", column=self.join_key,
                                      failed_rows=keys_arr.null_count, expected="a string id per row")
        ts_arr = self._column(table, TIMESTAMP_COLUMN)
        if pa.types.is_timestamp(ts_arr.type):
            ts_arr = ts_arr.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
        elif pa.types.is_integer(ts_arr.type):
            ts_arr = ts_arr.cast(pa.int64())
        else:
            raise DataValidationError("online write", f"type {ts_arr.type}", column=TIMESTAMP_COLUMN,
                                      expected="timestamp[us, UTC] (or int64 microseconds)")
        if ts_arr.null_count:
            raise DataValidationError("online write", "null event timestamps", column=TIMESTAMP_COLUMN,
                                      failed_rows=ts_arr.null_count, expected="a timestamp per row")
        rec = np.zeros(n, self.struct)
        rec["ts"] = ts = ts_arr.to_numpy()
        rec["fmt"] = ROW_FORMAT
        rec["nf"] = len(self.names)
        cols = {name: self._column(table, name, arrow_type(self.dtypes[name])) for name in self.names}
        for name, col in cols.items():
            if col.null_count != len(col):
                rec["valid"][:, self._valid_pos[name]] = col.is_valid().to_numpy(zero_copy_only=False)
        for j, name in enumerate(self.ints):
            rec["ints"][:, j] = cols[name].cast(pa.int64()).fill_null(0).to_numpy()
        for j, name in enumerate(self.floats):
            rec["floats"][:, j] = cols[name].fill_null(np.nan).to_numpy()
        payloads = []
        for j, name in enumerate(self.vars):
            payload, counts = self._payload(name, cols[name])
            rec["var"][:, j, 0] = pc.binary_length(payload).to_numpy()
            rec["var"][:, j, 1] = counts
            payloads.append(payload)
        raw = rec.tobytes()
        f = self.fixed
        if not payloads:
            blobs = [raw[i * f:(i + 1) * f] for i in range(n)]
        else:
            fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(f), n, [None, pa.py_buffer(raw)]).cast(pa.binary())
            parts = payloads[:len(self.numlists)]
            if self.texts:
                parts.append(pc.binary_join_element_wise(*payloads[len(self.numlists):],
                                                         pa.scalar(TEXT_SEPARATOR.encode(), pa.binary())))
            blobs = pc.binary_join_element_wise(fixed, *parts, _EMPTY_BIN).to_pylist()
        return keys_arr.to_pylist(), ts, blobs

    @staticmethod
    def _check_text(name: str, values: pa.Array) -> None:
        if len(values) and pc.any(pc.match_substring_regex(values.fill_null(""), "[\x1e\x1f]")).as_py():
            raise DataValidationError("online write", "values contain the control character U+001E or U+001F",
                                      column=name, hint="the online store separates text values with them; "
                                                        "remove them from the values")

    def _payload(self, name: str, col: pa.Array) -> tuple[pa.Array, np.ndarray]:
        dtype = self.dtypes[name]
        if dtype == "string":
            self._check_text(name, col)
            return col.cast(pa.binary()).fill_null(_EMPTY_BIN), np.zeros(len(col), np.uint32)
        counts = pc.list_value_length(col).fill_null(0).to_numpy().astype(np.uint32)
        values = pc.list_flatten(col)
        if dtype == "list<string>":
            self._check_text(name, values)
            if values.null_count:
                col = pa.ListArray.from_arrays(col.offsets, col.values.fill_null(""), mask=col.is_null())
            joined = pc.binary_join(col, LIST_SEPARATOR).cast(pa.binary()).fill_null(_EMPTY_BIN)
            return joined, counts
        np_type = _NUMERIC_LISTS[dtype]
        fill = np.nan if np_type.kind == "f" else 0
        data = values.fill_null(fill).to_numpy().astype(np_type)
        offsets = np.zeros(len(col) + 1, np.int64)
        np.cumsum(counts.astype(np.int64) * np_type.itemsize, out=offsets[1:])
        if offsets[-1] >= 2**31:
            raise DataValidationError("online write", "more than 2 GiB of list values in one write",
                                      column=name, hint="write fewer rows per call")
        offsets = offsets.astype(np.int32)
        arr = pa.Array.from_buffers(pa.binary(), len(col), [None, pa.py_buffer(offsets), pa.py_buffer(data.tobytes())])
        return arr, counts

    # ---- decode ---------------------------------------------------------------------------
    def decode(self, blobs: list[bytes]) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray]:
        """(timestamps, columns, valid matrix [entity, feature slot]) of ``blobs`` (all present).

        The fixed-width parts of all rows become one int64 matrix (one ``np.frombuffer``); each
        numeric block is transposed once and iterated in C, far cheaper than a numpy indexing
        call per feature. The text of all rows is decoded and split in one call each; lists
        still need one ``str.split`` per entity (they are Python lists)."""
        n = len(blobs)
        f = self.fixed
        if n and blobs[0][8] != ROW_FORMAT:
            raise DataValidationError("online store", f"row format {blobs[0][8]} is not {ROW_FORMAT}",
                                      hint="re-materialize the service with this version of aiplatform")
        if n == 1:
            words = np.frombuffer(blobs[0], "<i8", f // 8).reshape(1, -1)
        elif self.vars:
            words = np.frombuffer(b"".join([b[:f] for b in blobs]), "<i8").reshape(n, f // 8)
        else:
            words = np.frombuffer(b"".join(blobs), "<i8").reshape(n, f // 8)
        # Every block of the fixed part is 8-byte aligned, so the rows are one int64 matrix and
        # each block is a column range of it: a handful of numpy calls whatever the feature count.
        v0, i0, f0, r0, r1 = self._blocks
        valid = words[:, v0:i0].view(np.bool_)  # [entity, feature slot]; slots past the features are 0
        columns = self._numeric_columns(words)
        if self.vars:
            var = words[:, r0:r1].view("<u4").reshape(n, len(self.vars), 2)
            k = len(self.numlists)
            if k:
                sizes = var[:, :k, 0].astype(np.int64)
                ends = f + np.cumsum(sizes, axis=1)
                counts = var[:, :k, 1].tolist()
                for j, name in enumerate(self.numlists):
                    np_type = _NUMERIC_LISTS[self.dtypes[name]]
                    vals = [np.frombuffer(blob, np_type, c[j], e - s) for blob, c, e, s in
                            zip(blobs, counts, ends[:, j].tolist(), sizes[:, j].tolist())]
                    columns[name] = np.fromiter(vals, object, n)
            if self.texts:
                # All rows' text in one decode and one split; then column j is a strided slice.
                if k:
                    texts = [blob[e:] for blob, e in zip(blobs, ends[:, -1].tolist())]
                    text = TEXT_SEPARATOR.encode().join(texts)
                elif n == 1:
                    text = blobs[0][f:]
                else:
                    text = TEXT_SEPARATOR.encode().join([blob[f:] for blob in blobs])
                parts = text.decode().split(TEXT_SEPARATOR)
                sep = LIST_SEPARATOR
                # "" is both [] and [""] in a list feature: the item count tells them apart
                if n == 1:  # one entity: no per-column slicing or iterator arrays
                    cnt = var[0, :, 1].tolist() if self._text_lists else None
                    for (name, is_list, kj), p in zip(self._text_plan, parts):
                        col = np.empty(1, object)
                        col[0] = (p.split(sep) if p else [""] * cnt[kj]) if is_list else p  # type: ignore[index]
                        columns[name] = col
                else:
                    step = len(self.texts)
                    counts_all = var[:, :, 1].tolist() if self._text_lists else None
                    for j, (name, is_list, kj) in enumerate(self._text_plan):
                        vals = parts[j::step]
                        if is_list:
                            vals = [p.split(sep) if p else [""] * c[kj] for p, c in zip(vals, counts_all)]
                        columns[name] = np.fromiter(vals, object, n)
        if not self._in_order:  # keep the service's feature order
            columns = {name: columns[name] for name in self.names}
        return words[:, 0].copy(), columns, valid

    def missing_column(self, name: str, n: int) -> np.ndarray:
        dtype = self.dtypes[name]
        if dtype == "int64":
            return np.zeros(n, np.int64)
        if dtype == "bool":
            return np.zeros(n, np.bool_)
        if dtype == "float64":
            return np.full(n, np.nan)
        return np.full(n, None, object)

    def _numeric_columns(self, words: np.ndarray) -> dict[str, np.ndarray]:
        """The int64/bool/float64 columns of an [entity, word] matrix: ONE transposing copy of
        the numeric block, whose rows are the columns (one view each, contiguous, writable)."""
        _, i0, f0, r0, _ = self._blocks
        if r0 == i0:
            return {}
        block = words[:, i0:r0].T.copy()  # [feature, entity]
        k = f0 - i0
        columns = dict(zip(self.ints, block[:k])) if k else {}
        for name in self._bools:
            columns[name] = columns[name].astype(np.bool_)
        if r0 > f0:
            columns.update(zip(self.floats, block[k:].view("<f8")))
        return columns

    def fixed_features(self, entity_ids: Sequence[str], data: bytes, n: int) -> "OnlineFeatures":
        """``OnlineFeatures`` of a fixed-width service from its ``n`` rows concatenated in
        ``entity_ids`` order (``missing_row`` where an entity is absent).

        One ``np.frombuffer`` makes the [entity, word] matrix; the numeric block is transposed
        with ONE copy into a [feature, entity] matrix whose rows are the columns (contiguous,
        writable, one view each); the valid flags and timestamps are views/copies of their
        words. Nothing here loops over entities in Python."""
        f = self.fixed
        if len(data) != n * f:
            raise DataValidationError("online store", f"{n} stored rows of {len(data)} bytes, expected {f} bytes each",
                                      hint="the rows were written by another aiplatform version; "
                                           "re-materialize the service")
        words = np.frombuffer(data, "<i8").reshape(n, f // 8)
        if n == 1 and data[8:16] == self._head_ok:  # the common single-entity read: no array ops
            status = _STATUS[:1].copy()
        else:
            head = words[:, 1]
            missing = head != self._word1
            if missing.any():
                if (head[missing] != self._missing_word1).any():
                    fmt = int(head[missing & (head != self._missing_word1)][0]) & 0xFFFFFFFF
                    raise DataValidationError("online store", f"row format {fmt} is not {ROW_FORMAT}",
                                              hint="re-materialize the service with this version of aiplatform")
                status = _STATUS[missing.view(np.uint8)]
            else:
                status = _STATUS[:1].repeat(n)
        columns = self._numeric_columns(words)
        if not self._in_order:
            columns = {name: columns[name] for name in self.names}
        v0, i0 = self._blocks[:2]
        return OnlineFeatures(list(entity_ids), columns, words[:, 0].copy(), status, self.join_key, self.dtypes,
                              words[:, v0:i0].view(np.bool_))

    def features(self, entity_ids: Sequence[str], blobs: list[bytes | None]) -> "OnlineFeatures":
        """``OnlineFeatures`` of ``entity_ids`` from their rows (None where the entity is missing)."""
        if self.fixed_width:
            if None in blobs:
                miss = self.missing_row
                blobs = [miss if b is None else b for b in blobs]
            return self.fixed_features(entity_ids, b"".join(blobs), len(blobs))  # type: ignore[arg-type]
        n = len(blobs)
        if None not in blobs:
            ts, columns, valid = self.decode(blobs)  # type: ignore[arg-type]
            return OnlineFeatures(list(entity_ids), columns, ts, _STATUS[:1].repeat(n),
                                  self.join_key, self.dtypes, valid)
        mask = np.fromiter((b is not None for b in blobs), np.bool_, n)
        idx = np.flatnonzero(mask)
        ts = np.full(n, -1, np.int64)
        columns = {name: self.missing_column(name, n) for name in self.names}
        valid = np.zeros((n, 8 * (self._blocks[1] - self._blocks[0])), np.bool_)
        if len(idx):
            got_ts, got_cols, got_valid = self.decode([blobs[i] for i in idx])  # type: ignore[misc]
            ts[idx] = got_ts
            valid[idx] = got_valid
            for name in self.names:
                columns[name][idx] = got_cols[name]
        return OnlineFeatures(list(entity_ids), columns, ts, _STATUS[(~mask).astype(np.intp)],
                              self.join_key, self.dtypes, valid)


@dataclass
class OnlineFeatures:
    """Features of a batch of entities, column by column (what a model consumes).

    ``columns``: int64 / float64 / bool numpy arrays for scalar features (0 / NaN / False where
    ``valid`` is False); strings as numpy object arrays of ``str``; ``list<string>`` features as
    numpy object arrays of Python lists (what serving code indexes with; cheaper than building
    an Arrow ListArray per request); numeric lists as object arrays of numpy arrays. Missing
    entities and null features hold None there. ``valid[name]`` (bool, built on first use from
    ``valid_matrix``) says which values are present. ``event_timestamp`` is int64 microseconds
    (-1 if missing); ``status`` is "ok" or "missing" per entity. No Python object is made per
    numeric value; columns are contiguous and writable (rows of one [feature, entity] block per read).
    """

    entity_ids: list[str]
    columns: dict[str, np.ndarray]
    event_timestamp: np.ndarray
    status: np.ndarray
    join_key: str = "entity_id"
    dtypes: dict[str, str] = field(default_factory=dict)
    valid_matrix: np.ndarray | None = None
    """bool [entity, feature slot] (slots in the service's stored order, ``columns``' order; there
    may be padding slots past the last feature): True where the value is present."""

    def __len__(self) -> int:
        return len(self.entity_ids)

    @property
    def valid(self) -> dict[str, np.ndarray]:
        """Feature name -> bool array, True where the value is present (built on first use)."""
        cached = self.__dict__.get("_valid")
        if cached is None:
            if self.valid_matrix is None:
                cached = {name: np.ones(len(self), np.bool_) for name in self.columns}
            else:
                cached = dict(zip(self.columns, self.valid_matrix.T))
            self.__dict__["_valid"] = cached
        return cached

    def to_arrow(self) -> pa.Table:
        """One row per entity: the join key, event_timestamp (null if missing), status, features
        (null where not valid), typed as the service declares them."""
        found = self.event_timestamp >= 0
        arrays: dict[str, pa.Array] = {
            self.join_key: pa.array(self.entity_ids, pa.string()),
            TIMESTAMP_COLUMN: pa.array(self.event_timestamp, pa.int64(), mask=~found).cast(
                pa.timestamp("us", tz="UTC")),
            "status": pa.array(self.status.tolist(), pa.string()),
        }
        for name, values in self.columns.items():
            dtype = self.dtypes.get(name)
            typ = arrow_type(dtype) if dtype else None
            mask = ~np.asarray(self.valid[name], dtype=bool)
            if values.dtype == object:
                vals = [None if m else (v.tolist() if isinstance(v, np.ndarray) else v)
                        for v, m in zip(values, mask)]
                arrays[name] = pa.array(vals, typ)
            else:
                arrays[name] = pa.array(np.ascontiguousarray(values), typ, mask=mask)
        return pa.table(arrays)

    def to_dict(self, row: int | str) -> dict[str, Any]:
        """One entity (by position or id) as a dict; None for features that are not valid."""
        i = self.entity_ids.index(row) if isinstance(row, str) else int(row)
        out: dict[str, Any] = {self.join_key: self.entity_ids[i], "status": str(self.status[i]),
                               TIMESTAMP_COLUMN: int(self.event_timestamp[i])}
        for name, values in self.columns.items():
            v = values[i]
            if not self.valid[name][i]:
                out[name] = None
            elif isinstance(v, np.ndarray):
                out[name] = v.tolist()
            elif isinstance(v, np.generic):
                out[name] = v.item()
            else:
                out[name] = v
        return out


class CodecCache:
    """Codec per service object: ``service.version`` hashes the definition (tens of us), too slow
    to recompute per request; services are frozen, so the object identity is a safe key."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[FeatureService, RowCodec, str]] = {}

    def get(self, service: FeatureService) -> tuple[RowCodec, str]:
        hit = self._by_id.get(id(service))
        if hit is not None and hit[0] is service:
            return hit[1], hit[2]
        if not all(ch.isalnum() or ch in "_-" for ch in service.name):
            raise UserInputError(f"feature service name {service.name!r}: use letters, digits, '_' or '-'")
        codec = RowCodec(service)
        ns = f"{service.name}__{service.version}"
        if len(self._by_id) >= 1024:  # services built per call: keep the cache bounded
            self._by_id.clear()
        self._by_id[id(service)] = (service, codec, ns)
        return codec, ns


