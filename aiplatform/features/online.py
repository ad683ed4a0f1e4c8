"""The online store: the latest feature values per entity, for serving.

Two backends with one interface (``OnlineStore``): SQLite in-process (the embedded default) and
Redis (production, ``redis://host:port/db``); ``open_online_store`` picks one from a path or URI.

Why the row format below: a request reads a few features of 1..100 entities, so the cost that
matters is per entity, not per value. Each entity of a feature service is ONE precomputed value
(a compact binary row, ``RowCodec``), read with one ``SELECT k, v ... WHERE k IN (...)`` or one
Redis ``MGET``, and all rows of a request are decoded together with numpy (``np.frombuffer`` over
the concatenated fixed-width parts). No Python object is made per numeric value, so a read stays
within a small factor of the raw key-value lookup.

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

Keys are namespaced by service name AND ``service.version``: a changed definition is another
table (SQLite) or key prefix (Redis) and never reads rows of the old one.

Writes keep the newer ``event_timestamp`` per entity (ties: the later write wins, so a corrected
offline row at the same time replaces the old one; writing the same rows twice changes nothing)
and are atomic per call: one SQLite transaction, one Redis Lua script.

The legacy quickstart API of ``SQLiteOnlineStore`` (``write_user_features`` ... ``count_users``)
is kept unchanged until serving moves to ``get_online_features``.
"""

import json
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from aiplatform.core.errors import ConfigError, DataValidationError, UserInputError
from aiplatform.features.definitions import COUNT_COLUMNS, FeatureService, arrow_type
from aiplatform.features.partition import TIMESTAMP_COLUMN

if TYPE_CHECKING:
    from aiplatform.features.online_redis import RedisOnlineStore

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
        v0 = 2
        i0 = v0 + padded // 8
        f0 = i0 + len(self.ints)
        r0 = f0 + len(self.floats)
        self._blocks = (v0, i0, f0, r0, r0 + len(self.vars))
        assert self.fixed == 8 * self._blocks[-1]

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
        columns: dict[str, np.ndarray] = {}
        if self.ints:
            columns.update(zip(self.ints, words[:, i0:f0].T.copy()))
            for name in self._bools:
                columns[name] = columns[name].astype(np.bool_)
        if self.floats:
            columns.update(zip(self.floats, words[:, f0:r0].T.copy().view("<f8")))
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
                step = len(self.texts)
                sep = LIST_SEPARATOR
                counts_all = var[:, :, 1].tolist() if self._text_lists else None
                for j, name in enumerate(self.texts):
                    col = parts[j::step]
                    if self.dtypes[name] == "string":
                        columns[name] = np.fromiter(col, object, n)
                        continue
                    # "" is both [] and [""]: the item count tells them apart
                    kj = k + j
                    columns[name] = np.fromiter([p.split(sep) if p else [""] * c[kj] for p, c in zip(col, counts_all)],
                                                object, n)
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

    def features(self, entity_ids: Sequence[str], blobs: list[bytes | None]) -> "OnlineFeatures":
        """``OnlineFeatures`` of ``entity_ids`` from their rows (None where the entity is missing)."""
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
    numeric value; columns are contiguous and writable (they share one block per dtype).
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


class OnlineStore(Protocol):
    """What every online store offers (SQLite and Redis)."""

    def write_features(self, service: FeatureService, table: pa.Table) -> int: ...
    def get_online_features(self, service: FeatureService, entity_ids: Sequence[str]) -> OnlineFeatures: ...
    def delete_service(self, service: FeatureService) -> None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def get_meta(self, key: str) -> str | None: ...


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


def meta_prefix(service: FeatureService) -> str:
    """Meta keys that belong to one service version (``delete_service`` removes them too)."""
    return f"{service.name}:{service.version}:"


@dataclass
class UserFeatures:
    user_id: str
    last_items: list[str]
    purchased_items: list[str]
    counts: np.ndarray  # float32, len(COUNT_COLUMNS), in COUNT_COLUMNS order
    as_of: datetime


_SCHEMA = """
CREATE TABLE IF NOT EXISTS user_features (
    user_id TEXT PRIMARY KEY,
    last_items TEXT NOT NULL,
    purchased_items TEXT NOT NULL,
    counts TEXT NOT NULL,
    as_of TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS popular_items (
    rank INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL,
    score REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class SQLiteOnlineStore:
    """Thread-safe (one connection per thread); opened read-write, WAL for concurrent readers.

    A service version is one ``WITHOUT ROWID`` table ``fs_<name>__<version>`` (k, ts, v): the
    entity id, the row's event timestamp (for newer-wins upserts) and the binary row."""

    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._codecs = CodecCache()
        self._select_sql: dict[tuple[str, int], str] = {}
        with self._conn() as c:
            c.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    # ---- writes -------------------------------------------------------------------------
    def write_user_features(self, frame: pd.DataFrame) -> int:
        """Upsert one row per user from a frame with user_id, last_items, purchased_items,
        the count columns and as_of. One transaction: all rows or none."""
        counts = frame[COUNT_COLUMNS].to_numpy(dtype=np.float32)
        as_of = pd.to_datetime(frame["as_of"], utc=True)
        rows = [
            (
                str(uid),
                json.dumps([str(x) for x in last]),
                json.dumps([str(x) for x in bought]),
                json.dumps(c.tolist()),
                ts.isoformat(),
            )
            for uid, last, bought, c, ts in zip(
                frame["user_id"], frame["last_items"], frame["purchased_items"], counts, as_of
            )
        ]
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(
                "INSERT OR REPLACE INTO user_features VALUES (?, ?, ?, ?, ?)", rows
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return len(rows)

    def write_popular_items(self, items: Iterable[tuple[str, float]]) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM popular_items")
            conn.executemany(
                "INSERT INTO popular_items VALUES (?, ?, ?)",
                [(i, str(item), float(score)) for i, (item, score) in enumerate(items)],
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def set_meta(self, key: str, value: str) -> None:
        self._conn().execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # ---- reads --------------------------------------------------------------------------
    def get_user_features(self, user_id: str) -> UserFeatures | None:
        row = self._conn().execute(
            "SELECT last_items, purchased_items, counts, as_of FROM user_features WHERE user_id = ?",
            (user_id,),
        ).fetchone()
        if row is None:
            return None
        return UserFeatures(
            user_id=user_id,
            last_items=json.loads(row[0]),
            purchased_items=json.loads(row[1]),
            counts=np.asarray(json.loads(row[2]), dtype=np.float32),
            as_of=datetime.fromisoformat(row[3]).astimezone(timezone.utc),
        )

    def get_popular_items(self, k: int) -> list[tuple[str, float]]:
        rows = self._conn().execute(
            "SELECT item_id, score FROM popular_items ORDER BY rank LIMIT ?", (k,)
        ).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def get_meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def most_active_user(self) -> str | None:
        """A user with a long history: a good first demo request."""
        row = self._conn().execute(
            "SELECT user_id FROM user_features ORDER BY length(last_items) DESC, user_id LIMIT 1").fetchone()
        return row[0] if row else None

    def count_users(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM user_features").fetchone()[0])

    # ---- the service API (same on SQLite and Redis) -------------------------------------------
    def write_features(self, service: FeatureService, table: pa.Table) -> int:
        """Upsert one row per entity of ``table`` (join key, event_timestamp, stored features),
        keeping the newer event_timestamp per entity; one transaction. Returns the rows applied
        (rows older than the stored one are skipped)."""
        codec, ns = self._codecs.get(service)
        keys, ts, blobs = codec.encode(table)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f'CREATE TABLE IF NOT EXISTS "fs_{ns}" '
                         "(k TEXT PRIMARY KEY, ts INTEGER NOT NULL, v BLOB NOT NULL) WITHOUT ROWID")
            before = conn.total_changes
            conn.executemany(
                f'INSERT INTO "fs_{ns}" (k, ts, v) VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE '
                f'SET ts = excluded.ts, v = excluded.v WHERE excluded.ts >= "fs_{ns}".ts',
                zip(keys, ts.tolist(), blobs))
            applied = conn.total_changes - before
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return applied

    def _sql(self, ns: str, n: int) -> str:
        sql = self._select_sql.get((ns, n))
        if sql is None:
            sql = f'SELECT k, v FROM "fs_{ns}" WHERE k IN ({",".join("?" * n)})'
            self._select_sql[(ns, n)] = sql
        return sql

    def raw_rows(self, service: FeatureService, entity_ids: Sequence[str]) -> list[tuple[str, bytes]]:
        """The stored (id, row) pairs of the entities that exist, in no particular order."""
        _, ns = self._codecs.get(service)
        conn = self._conn()
        rows: list[tuple[str, bytes]] = []
        ids = list(entity_ids)
        try:
            for i in range(0, len(ids), _MAX_SQL_VARS):
                chunk = ids[i:i + _MAX_SQL_VARS]
                rows += conn.execute(self._sql(ns, len(chunk)), chunk).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            return []
        return rows

    def get_online_features(self, service: FeatureService, entity_ids: Sequence[str]) -> OnlineFeatures:
        """The stored features of ``entity_ids`` (in that order; status "missing" where absent)."""
        codec, ns = self._codecs.get(service)
        if isinstance(entity_ids, str):
            raise UserInputError("entity_ids: pass a list of ids, not one string")
        n = len(entity_ids)
        if 0 < n <= _MAX_SQL_VARS:  # the hot path: one statement, cached SQL text
            sql = self._select_sql.get((ns, n)) or self._sql(ns, n)
            try:
                rows = self._conn().execute(sql, entity_ids if isinstance(entity_ids, (list, tuple))
                                            else list(entity_ids)).fetchall()
            except sqlite3.OperationalError as e:
                if "no such table" not in str(e):
                    raise
                rows = []
        else:
            rows = self.raw_rows(service, entity_ids) if n else []
        if len(rows) == n == 1:
            blobs: list[bytes | None] = [rows[0][1]]
        else:
            get = dict(rows).get
            blobs = [get(k) for k in entity_ids]
        return codec.features(entity_ids, blobs)

    def delete_service(self, service: FeatureService) -> None:
        """Drop this service version's rows and its meta keys (its materialization watermark)."""
        _, ns = self._codecs.get(service)
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(f'DROP TABLE IF EXISTS "fs_{ns}"')
            conn.execute("DELETE FROM meta WHERE substr(key, 1, ?) = ?",
                         (len(meta_prefix(service)), meta_prefix(service)))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


_MAX_SQL_VARS = 30_000
"""SQLite's bound-parameter limit is 32766 (since 3.32): longer id lists are read in chunks."""


def open_online_store(uri_or_path: str) -> "SQLiteOnlineStore | RedisOnlineStore":
    """The online store at a path (or ``sqlite:///path``: SQLite) or ``redis://host:port/db``
    (Redis; ``rediss://`` for TLS)."""
    uri = str(uri_or_path)
    if uri.startswith(("redis://", "rediss://", "unix://")):
        from aiplatform.features.online_redis import RedisOnlineStore

        return RedisOnlineStore(uri)
    if uri.startswith("sqlite:///"):
        uri = uri[len("sqlite:///"):]
    elif "://" in uri:
        raise ConfigError(f"online store {uri!r}: use a file path, sqlite:///path or redis://host:port/db")
    return SQLiteOnlineStore(uri)
