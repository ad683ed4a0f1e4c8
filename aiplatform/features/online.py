"""The online store: the latest feature values per entity, for serving.

Two backends with one interface (``OnlineStore``): SQLite in-process (the embedded default) and
Redis (production, ``redis://host:port/db``); ``open_online_store`` picks one from a path or URI.

Why one precomputed row per entity (``online_codec.RowCodec``, the layout is described there): a
request reads the features of 1..100 entities, so the cost that matters is per entity, not per
value. A read is one SQLite SELECT (the ids as a ``VALUES`` list LEFT JOINed to the table, so the
rows come back in request order with NULL for a missing entity: no Python dict per call) or one
Redis ``MGET``, and all rows of a request are decoded together with numpy. SQLite connections
memory-map the database (``PRAGMA mmap_size``): a row read is then a page lookup in the OS cache
instead of a ``pread`` into SQLite's small private cache, which halves the cost of a 100-entity
read on a table of 100k entities.

Keys are namespaced by service name AND ``service.version``: a changed definition is another
table (SQLite) or key prefix (Redis) and never reads rows of the old one.

Writes keep the newer ``event_timestamp`` per entity (ties: the later write wins, so a corrected
offline row at the same time replaces the old one; writing the same rows twice changes nothing)
and are atomic per call: one SQLite transaction, one Redis Lua script.

The store also holds the event ids ``features.push`` accepted lately (``claim_event_ids``) and
short-lived locks (``try_lock``: a push's entities while it recomputes their rows, the event log's
compaction lease): it is the one place every serving replica shares, so a retried event is
refused by whichever replica it reaches, and two replicas never recompute one user at once.

For the same reason it carries the *change feed* (``publish_changes`` / ``read_changes``): the
entity ids each push rewrote, in order, so that every serving replica drops those users' cached
rows and answers within a poll interval (``serving.freshness``) instead of serving them until
its cache TTL runs out. Each publish is one entry with a sequence number (1, 2, 3, ... with no
holes: a SQLite ``AUTOINCREMENT`` row, or a Redis stream entry whose id is ``<n>-0``); only the
last ``CHANGE_FEED_KEEP`` entries are kept. A reader keeps the number it read up to: when entries
after it were pruned, or the feed restarted (a new store), it cannot know which users it missed,
and ``read_changes`` says so (``ChangeBatch.reset``) so that it drops everything it cached.
"""

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

from aiplatform.core.errors import ConfigError, UserInputError
from aiplatform.features.definitions import FeatureService
from aiplatform.features.online_codec import (  # noqa: F401  (re-exported: the store's public API)
    LIST_SEPARATOR,
    ROW_FORMAT,
    TEXT_SEPARATOR,
    CodecCache,
    OnlineFeatures,
    RowCodec,
)

if TYPE_CHECKING:
    from aiplatform.features.online_redis import RedisOnlineStore


class OnlineStore(Protocol):
    """What every online store offers (SQLite and Redis)."""

    def write_features(self, service: FeatureService, table: pa.Table) -> int: ...
    def get_online_features(self, service: FeatureService, entity_ids: Sequence[str]) -> OnlineFeatures: ...
    def delete_service(self, service: FeatureService) -> None: ...
    def set_meta(self, key: str, value: str) -> None: ...
    def get_meta(self, key: str) -> str | None: ...
    def write_popular_items(self, items: Iterable[tuple[str, float]]) -> None:
        """Replace the popular-items list (the fallback for unknown users) in one atomic write."""
    def get_popular_items(self, k: int) -> list[tuple[str, float]]:
        """The first ``k`` (item_id, score) pairs, in the order they were written."""
    def claim_event_ids(self, ids: Sequence[str], ttl_s: float) -> list[bool]:
        """Claim each id for ``ttl_s`` seconds: True where this call claimed it, False where a
        live claim exists (an event already accepted). Atomic per id across processes."""
    def release_event_ids(self, ids: Sequence[str]) -> None:
        """Drop claims (the events they guarded were not written after all)."""
    def try_lock(self, names: Sequence[str], ttl_s: float) -> str | None:
        """Take every lock in ``names`` for ``ttl_s`` seconds, all or none: a token (for
        ``unlock``) or None when one is held. Across processes; an expired lock is free."""
    def unlock(self, names: Sequence[str], token: str) -> None:
        """Release the locks ``token`` holds (a lock taken over after it expired is left alone)."""
    def publish_changes(self, service_name: str, entity_ids: Sequence[str]) -> int:
        """Append one change-feed entry: these entities' rows of ``service_name`` were rewritten.
        Returns its sequence number; older entries beyond ``CHANGE_FEED_KEEP`` are pruned."""
    def read_changes(self, service_name: str, cursor: int | None,
                     limit: int = ...) -> "ChangeBatch":
        """The entity ids of ``service_name`` published after ``cursor`` (None: none, just the
        feed's current end), and the cursor to read from next time."""


@dataclass(frozen=True)
class ChangeBatch:
    """What a reader of the change feed gets: the entity ids published after its cursor (each
    once, in no particular order), the cursor to pass next time, and ``reset``: True when the
    reader may have missed entries (pruned, more than ``limit`` of them, or a restarted feed),
    so it must drop everything it cached; ``entity_ids`` is then empty."""

    entity_ids: list[str]
    cursor: int
    reset: bool = False


CHANGE_FEED_KEEP = 10_000
"""Change-feed entries (one per push) a store keeps: at hundreds of pushes a second, many seconds
more than a reader that polls several times a second needs."""
CHANGE_READ_LIMIT = 1_000
"""Most entries one ``read_changes`` returns; a reader further behind is told to reset."""


def change_batch(service_name: str, cursor: int | None, first: int, end: int, limit: int,
                 entries: "Iterable[tuple[int, str, str]]") -> ChangeBatch:
    """The reader's batch from a consistent view of the feed: its ``first`` and ``end`` (last)
    sequence numbers (``end`` 0 and ``first`` 1 when empty) and the entries ``(seq, service,
    JSON list of ids)`` after ``cursor``. Shared by both stores so they decide resets alike."""
    if cursor is None:
        return ChangeBatch([], end)
    cursor = int(cursor)
    if cursor > end or end - cursor > limit or (cursor < end and first > cursor + 1):
        return ChangeBatch([], end, reset=True)
    ids: dict[str, None] = {}
    for seq, service, keys in entries:
        if cursor < seq <= end and service == service_name:
            ids.update(dict.fromkeys(json.loads(keys)))
    return ChangeBatch(list(ids), end)


def meta_prefix(service: FeatureService) -> str:
    """Meta keys that belong to one service version (``delete_service`` removes them too)."""
    return f"{service.name}:{service.version}:"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS popular_items (
    rank INTEGER PRIMARY KEY,
    item_id TEXT NOT NULL,
    score REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS event_ids (event_id TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS event_ids_expiry ON event_ids (expires_at);
CREATE TABLE IF NOT EXISTS locks (name TEXT PRIMARY KEY, token TEXT NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, service TEXT NOT NULL, ids TEXT NOT NULL);
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
        self.change_feed_keep = CHANGE_FEED_KEEP
        with self._conn() as c:
            c.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}")
            self._local.conn = conn
        return conn

    # ---- writes -------------------------------------------------------------------------
    def write_popular_items(self, items: Iterable[tuple[str, float]]) -> None:
        """Replace the popular-items list, in the given order, in one transaction."""
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

    def claim_event_ids(self, ids: Sequence[str], ttl_s: float) -> list[bool]:
        """Claim ids until now + ``ttl_s``, in one write transaction (so two processes racing
        for one id see one winner); expired claims are pruned first, which keeps the table at
        about one window of ids."""
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("DELETE FROM event_ids WHERE expires_at <= ?", (now,))
            won = [conn.execute("INSERT OR IGNORE INTO event_ids VALUES (?, ?)",
                                (str(i), now + float(ttl_s))).rowcount == 1 for i in ids]
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return won

    def release_event_ids(self, ids: Sequence[str]) -> None:
        self._conn().executemany("DELETE FROM event_ids WHERE event_id = ?", [(str(i),) for i in ids])

    def try_lock(self, names: Sequence[str], ttl_s: float) -> str | None:
        """All of ``names`` or none, in one write transaction (``BEGIN IMMEDIATE``: two
        processes never both see a name free); expired locks count as free."""
        names = sorted(set(map(str, names)))
        token = uuid.uuid4().hex
        now = time.time()
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            held = 0
            for i in range(0, len(names), _MAX_SQL_VARS - 1):
                chunk = names[i:i + _MAX_SQL_VARS - 1]
                marks = ",".join("?" * len(chunk))
                conn.execute(f"DELETE FROM locks WHERE expires_at <= ? AND name IN ({marks})", (now, *chunk))  # nosec B608  # marks: only "?"
                held += conn.execute(f"SELECT count(*) FROM locks WHERE name IN ({marks})", chunk).fetchone()[0]  # nosec B608  # marks: only "?"
            if held:
                conn.execute("ROLLBACK")
                return None
            conn.executemany("INSERT INTO locks VALUES (?, ?, ?)", [(n, token, now + float(ttl_s)) for n in names])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return token

    def unlock(self, names: Sequence[str], token: str) -> None:
        self._conn().executemany("DELETE FROM locks WHERE name = ? AND token = ?",
                                 [(str(n), token) for n in set(names)])

    def publish_changes(self, service_name: str, entity_ids: Sequence[str]) -> int:
        """One ``changes`` row (``AUTOINCREMENT``: numbers are never reused, and write
        transactions are serial, so they have no holes), and the rows beyond the last
        ``change_feed_keep`` deleted, in one transaction."""
        ids = json.dumps(list(dict.fromkeys(map(str, entity_ids))))
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            seq = conn.execute("INSERT INTO changes (service, ids) VALUES (?, ?)", (service_name, ids)).lastrowid
            conn.execute("DELETE FROM changes WHERE seq <= ?", (seq - max(1, int(self.change_feed_keep)),))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return int(seq)

    def read_changes(self, service_name: str, cursor: int | None,
                     limit: int = CHANGE_READ_LIMIT) -> ChangeBatch:
        """The feed's ends and the rows after ``cursor``, in one read transaction (a consistent
        snapshot under WAL); ``sqlite_sequence`` holds the last number even when rows are gone."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
            end = int(row[0]) if row else 0
            first = conn.execute("SELECT min(seq) FROM changes").fetchone()[0]
            first = end + 1 if first is None else int(first)
            entries = []
            if cursor is not None and 0 <= int(cursor) < end and end - int(cursor) <= limit:
                entries = conn.execute("SELECT seq, service, ids FROM changes WHERE seq > ? AND service = ?",
                                       (int(cursor), service_name)).fetchall()
        finally:
            conn.execute("COMMIT")
        return change_batch(service_name, cursor, first, end, limit, entries)

    # ---- reads --------------------------------------------------------------------------
    def get_popular_items(self, k: int) -> list[tuple[str, float]]:
        rows = self._conn().execute(
            "SELECT item_id, score FROM popular_items ORDER BY rank LIMIT ?", (k,)
        ).fetchall()
        return [(r[0], float(r[1])) for r in rows]

    def get_meta(self, key: str) -> str | None:
        row = self._conn().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

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
                f'INSERT INTO "fs_{ns}" (k, ts, v) VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE '  # nosec B608  # ns: checked name + hash
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
            sql = f'SELECT k, v FROM "fs_{ns}" WHERE k IN ({",".join("?" * n)})'  # nosec B608  # ns: checked name + hash
            self._cache_sql((ns, n), sql)
        return sql

    def _cache_sql(self, key: tuple, sql: str) -> None:
        """Keep texts of up to 1,024 ids (a longer one costs far less to build than its read);
        one per (service, batch size), so the cache is bounded too."""
        if key[-1] > 1024:
            return
        if len(self._select_sql) >= 512:
            self._select_sql.clear()
        self._select_sql[key] = sql

    def _ordered_sql(self, codec: RowCodec, ns: str, n: int) -> str:
        """The rows of n ids in request order, NULL where absent (for a fixed-width service the
        missing-entity placeholder row instead, so the result joins into one buffer as is). The
        ids are a ``VALUES`` list with their positions as literals, so one cached text serves
        every call with n ids and the parameters are the ids themselves."""
        key = ("ordered", ns, n)
        sql = self._select_sql.get(key)
        if sql is None:
            if n == 1:
                sql = f'SELECT v FROM "fs_{ns}" WHERE k = ?'  # nosec B608  # ns: checked name + hash
            else:
                value = f"ifnull(t.v, X'{codec.missing_row.hex()}')" if codec.fixed_width else "t.v"
                ids = ",".join(f"({i},?)" for i in range(n))
                sql = (f'WITH ids(i, k) AS (VALUES {ids}) SELECT {value} FROM ids '  # nosec B608  # ns, ids, value: built here
                       f'LEFT JOIN "fs_{ns}" t ON t.k = ids.k ORDER BY ids.i')
            self._cache_sql(key, sql)
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
        """The stored features of ``entity_ids`` (in that order; status "missing" where absent).

        One SELECT per call (per 30,000 ids); its rows come back in request order, so no Python
        work per entity is needed to line them up."""
        codec, ns = self._codecs.get(service)
        if isinstance(entity_ids, str):
            raise UserInputError("entity_ids: pass a list of ids, not one string")
        ids = entity_ids if isinstance(entity_ids, (list, tuple)) else list(entity_ids)
        n = len(ids)
        if not n:
            return codec.features(ids, [])
        conn = self._conn()
        try:
            if n == 1:  # the cheapest read: a primary-key lookup, one row or none (fetchall, not
                # fetchone: the statement runs to its end, so no read transaction stays open)
                rows = conn.execute(self._select_sql.get(("ordered", ns, 1)) or self._ordered_sql(codec, ns, 1),
                                    ids).fetchall()
                return codec.features(ids, [rows[0][0] if rows else None])
            if n <= _MAX_SQL_VARS:
                sql = self._select_sql.get(("ordered", ns, n)) or self._ordered_sql(codec, ns, n)
                rows = conn.execute(sql, ids).fetchall()
            else:
                rows = []
                for i in range(0, n, _MAX_SQL_VARS):
                    chunk = ids[i:i + _MAX_SQL_VARS]
                    rows += conn.execute(self._ordered_sql(codec, ns, len(chunk)), chunk).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" not in str(e):
                raise
            return codec.features(ids, [None] * n)
        if codec.fixed_width:
            return codec.fixed_features(ids, b"".join(map(itemgetter(0), rows)), n)
        return codec.features(ids, list(map(itemgetter(0), rows)))

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


SQLITE_MMAP_BYTES = 1 << 30
"""SQLite memory-maps up to this much of the database file (address space, not memory: the pages
are the OS page cache, shared by every connection and process)."""
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
