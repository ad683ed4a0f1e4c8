"""The online store: the latest feature values per entity, for serving.

SQLite is the embedded default: one precomputed row per user, so one read serves one request.
Values are written in one transaction per batch, so a reader sees a whole batch or none of it
and a failed materialization leaves the previous values in place. (Redis and a columnar read
API come with the feature-store issue; this class is the seam.)
"""

import json
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from aiplatform.features.definitions import COUNT_COLUMNS


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
    """Thread-safe (one connection per thread); opened read-write, WAL for concurrent readers."""

    def __init__(self, path: str) -> None:
        self.path = path
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
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


def open_online_store(path: str) -> SQLiteOnlineStore:
    """The online store at ``path`` (the storage root's ``online.sqlite``)."""
    return SQLiteOnlineStore(path)
