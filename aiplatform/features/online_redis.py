"""The Redis online store: the same rows and interface as SQLite, for many serving replicas.

One key per entity, ``<prefix>:<service>__<version>:<entity id>``, holding the binary row of
``online_codec.RowCodec`` (its first 8 bytes are the event timestamp). A read is ONE ``MGET``; a write
is ONE Lua script that compares each row's timestamp with the stored one and keeps the newer
(ties: the new row), so a call is atomic and idempotent and replicas never see half a batch.
Meta values (materialization watermarks) live in the hash ``<prefix>:meta``; claimed event ids
(``features.push``'s deduplication) are keys ``<prefix>:event_id:<id>`` that Redis expires. The popular-items
list (the fallback for unknown users) is the Redis list ``<prefix>:popular_items``, one JSON
``[item_id, score]`` per entry in rank order, replaced in one MULTI/EXEC transaction. Locks
(``try_lock``) are keys ``<prefix>:lock:<name>`` holding their owner's token, taken all-or-none
by one Lua script with a TTL and released by another only by their owner. The change feed
(``publish_changes``/``read_changes``, described in ``features.online``) is the stream
``<prefix>:changes``: a Lua script numbers each entry after the last one (ids ``1-0``, ``2-0``, ...,
so readers can tell a pruned gap from a quiet feed) and trims the stream to the last
``CHANGE_FEED_KEEP`` entries (``MAXLEN ~``: in whole nodes, cheaper than exact trimming).
"""

import json
import uuid
from collections.abc import Iterable, Sequence

import pyarrow as pa

from aiplatform.core.errors import ConfigError, UserInputError
from aiplatform.features.definitions import FeatureService
from aiplatform.features.online import CHANGE_FEED_KEEP, CHANGE_READ_LIMIT, ChangeBatch, change_batch, meta_prefix
from aiplatform.features.online_codec import CodecCache, OnlineFeatures

_UPSERT_NEWER = """
local applied = 0
for i = 1, #KEYS do
  local new = ARGV[i]
  local cur = redis.call('GET', KEYS[i])
  if (not cur) or struct.unpack('<i8', new) >= struct.unpack('<i8', cur) then
    redis.call('SET', KEYS[i], new)
    applied = applied + 1
  end
end
return applied
"""
_LOCK_ALL = """
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then return 0 end
end
for i = 1, #KEYS do
  redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2])
end
return 1
"""
_UNLOCK_MINE = """
local n = 0
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then n = n + redis.call('DEL', KEYS[i]) end
end
return n
"""
_PUBLISH_CHANGE = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local n = 1
if #last > 0 then n = tonumber(string.match(last[1][1], '^(%d+)')) + 1 end
if ARGV[2] == '1' then
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], n .. '-0', 's', ARGV[3], 'k', ARGV[4])
else
  redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[1], n .. '-0', 's', ARGV[3], 'k', ARGV[4])
end
return n
"""
_DELETE_BATCH = 1000
_EXACT_TRIM_BELOW = 1000
"""A feed kept shorter than this is trimmed exactly (``MAXLEN ~`` trims whole 100-entry nodes,
so a short feed would not be trimmed at all)."""


class RedisOnlineStore:
    """Online features in Redis. Thread-safe: redis-py's connection pool hands each thread a
    connection."""

    def __init__(self, url: str, prefix: str = "aiplatform") -> None:
        try:
            import redis
        except ImportError as e:  # pragma: no cover - redis is a dependency
            raise ConfigError("the Redis online store needs the redis package: pip install redis") from e
        self.url = url
        self.prefix = prefix
        self.client = redis.Redis.from_url(url, decode_responses=False)
        self._upsert = self.client.register_script(_UPSERT_NEWER)
        self._lock_all = self.client.register_script(_LOCK_ALL)
        self._unlock_mine = self.client.register_script(_UNLOCK_MINE)
        self._publish_change = self.client.register_script(_PUBLISH_CHANGE)
        self._codecs = CodecCache()
        self._meta_key = f"{prefix}:meta"
        self._popular_key = f"{prefix}:popular_items"
        self._event_id_key = f"{prefix}:event_id:"
        self._lock_key = f"{prefix}:lock:"
        self._changes_key = f"{prefix}:changes"
        self.change_feed_keep = CHANGE_FEED_KEEP

    def _ns(self, service: FeatureService) -> tuple[object, str]:
        codec, ns = self._codecs.get(service)
        return codec, f"{self.prefix}:{ns}:"

    def write_features(self, service: FeatureService, table: pa.Table) -> int:
        """Upsert one row per entity, keeping the newer event_timestamp; one Lua script (atomic).
        Returns the rows applied (rows older than the stored one are skipped)."""
        codec, ns = self._ns(service)
        keys, _, blobs = codec.encode(table)  # type: ignore[attr-defined]
        if not keys:
            return 0
        return int(self._upsert(keys=[ns + k for k in keys], args=blobs))

    def raw_rows(self, service: FeatureService, entity_ids: Sequence[str]) -> list[bytes | None]:
        """The stored rows of ``entity_ids`` (None where absent), one MGET."""
        _, ns = self._ns(service)
        return self.client.mget([ns + k for k in entity_ids])

    def get_online_features(self, service: FeatureService, entity_ids: Sequence[str]) -> OnlineFeatures:
        """The stored features of ``entity_ids`` (in that order; status "missing" where absent)."""
        codec, ns = self._ns(service)
        if isinstance(entity_ids, str):
            raise UserInputError("entity_ids: pass a list of ids, not one string")
        blobs = self.client.mget([ns + k for k in entity_ids]) if len(entity_ids) else []
        return codec.features(entity_ids, blobs)  # type: ignore[attr-defined]

    def delete_service(self, service: FeatureService) -> None:
        """Delete this service version's keys and its meta fields (its materialization watermark)."""
        _, ns = self._ns(service)
        batch: list[bytes] = []
        for key in self.client.scan_iter(match=_glob_escape(ns) + "*", count=_DELETE_BATCH):
            batch.append(key)
            if len(batch) >= _DELETE_BATCH:
                self.client.unlink(*batch)
                batch = []
        if batch:
            self.client.unlink(*batch)
        fields = [f for f, _ in self.client.hscan_iter(self._meta_key, match=_glob_escape(meta_prefix(service)) + "*")]
        if fields:
            self.client.hdel(self._meta_key, *fields)

    def write_popular_items(self, items: Iterable[tuple[str, float]]) -> None:
        """Replace the popular-items list, in the given order, atomically (readers see the old
        list or the new one: MULTI/EXEC)."""
        entries = [json.dumps([str(item), float(score)]) for item, score in items]
        pipe = self.client.pipeline(transaction=True)
        pipe.delete(self._popular_key)
        if entries:
            pipe.rpush(self._popular_key, *entries)
        pipe.execute()

    def get_popular_items(self, k: int) -> list[tuple[str, float]]:
        """The first ``k`` (item_id, score) pairs of the list (one LRANGE)."""
        if k <= 0:
            return []
        entries = self.client.lrange(self._popular_key, 0, k - 1)
        return [(item, float(score)) for item, score in map(json.loads, entries)]

    def set_meta(self, key: str, value: str) -> None:
        self.client.hset(self._meta_key, key, value)

    def claim_event_ids(self, ids: Sequence[str], ttl_s: float) -> list[bool]:
        """One ``SET key 1 NX PX ttl`` per id, in one round trip (a pipeline, no transaction:
        each SET is atomic on its own, which is all a claim needs); Redis expires the claims."""
        if not ids:
            return []
        ttl_ms = max(1, int(round(float(ttl_s) * 1000)))
        pipe = self.client.pipeline(transaction=False)
        for event_id in ids:
            pipe.set(self._event_id_key + str(event_id), b"1", nx=True, px=ttl_ms)
        return [bool(r) for r in pipe.execute()]

    def release_event_ids(self, ids: Sequence[str]) -> None:
        if ids:
            self.client.delete(*[self._event_id_key + str(i) for i in ids])

    def try_lock(self, names: Sequence[str], ttl_s: float) -> str | None:
        """All of ``names`` or none, in one Lua script (atomic); Redis expires them after ``ttl_s``."""
        names = sorted(set(map(str, names)))
        if not names:
            return uuid.uuid4().hex
        token = uuid.uuid4().hex
        ttl_ms = max(1, int(round(float(ttl_s) * 1000)))
        won = self._lock_all(keys=[self._lock_key + n for n in names], args=[token, ttl_ms])
        return token if int(won) else None

    def unlock(self, names: Sequence[str], token: str) -> None:
        if names:
            self._unlock_mine(keys=[self._lock_key + str(n) for n in set(names)], args=[token])

    def publish_changes(self, service_name: str, entity_ids: Sequence[str]) -> int:
        """One stream entry numbered after the last, the stream trimmed, in one Lua script."""
        keep = max(1, int(self.change_feed_keep))
        ids = json.dumps(list(dict.fromkeys(map(str, entity_ids))))
        return int(self._publish_change(keys=[self._changes_key],
                                        args=[keep, int(keep >= _EXACT_TRIM_BELOW), service_name, ids]))

    def read_changes(self, service_name: str, cursor: int | None,
                     limit: int = CHANGE_READ_LIMIT) -> ChangeBatch:
        """The stream's last and first entries and up to ``limit + 1`` entries after ``cursor``,
        in one MULTI/EXEC (a consistent view, one round trip)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.xrevrange(self._changes_key, count=1)
        pipe.xrange(self._changes_key, count=1)
        if cursor is not None:
            pipe.xrange(self._changes_key, min=f"{max(0, int(cursor)) + 1}-0", count=limit + 1)
        last, first, *entries = pipe.execute()
        end = _seq(last[0][0]) if last else 0
        head = _seq(first[0][0]) if first else end + 1
        rows = [(_seq(entry_id), fields[b"s"].decode(), fields[b"k"].decode())
                for entry_id, fields in (entries[0] if entries else [])]
        return change_batch(service_name, cursor, head, end, limit, rows)

    def get_meta(self, key: str) -> str | None:
        value = self.client.hget(self._meta_key, key)
        return None if value is None else value.decode()

    def close(self) -> None:
        self.client.close()


def _seq(entry_id: bytes) -> int:
    """The sequence number of a change-feed entry id ``b"<n>-0"``."""
    return int(entry_id.split(b"-", 1)[0])


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)
