"""Real-time updates: ``push(events)`` makes new events visible in the online store at once.

Why recompute instead of patching counters: windowed aggregations slide (an event leaves the
7-day count a week later) and ``last_n`` needs order, so a counter patched in place drifts from
what the batch pipeline computes. Instead the affected entities' rows are recomputed with the
*same* ``engine.compute_view_rows`` over their recent events (the lake plus the event log,
reading only ``max_window`` of history for just those entities), so the online row after a push
is exactly the row a batch run over the same events would give. The events are first appended to
the event log (atomically), which the batch pipeline also reads.

Cost: one filtered Parquet scan per push plus a vectorised compute over a few entities'
histories; batch several events per call when you can.

What is refused before anything is written (``DataValidationError``, naming the column): the
events contract's errors, times later than now + ``AIPLATFORM_MAX_EVENT_SKEW_S`` (default 300 s)
and ids with control characters (``data.validate.check_pushed_events``).

Retries are idempotent by ``event_id``: an id already accepted into this event log within
``AIPLATFORM_EVENT_DEDUP_WINDOW_S`` (default 24 h; 0 turns the check off) is skipped and counted
in ``duplicates``. The ids are *claimed* in the online store (``claim_event_ids``: Redis
``SET NX EX``, a SQLite table) before the log is appended, so two concurrent retries of one
event cannot both write it; when the append fails the claims are released so that a retry is
accepted. When the claim itself fails (the store is down) the events are appended unchecked:
recorded once more rather than lost. Events without an ``event_id`` are never deduplicated.

Two replicas pushing for one user: each appends its events first, then recomputes the user's row
from the log and writes it. Unguarded, replica A could read the log before B's append landed and
write after B, replacing B's complete row with its own that lacks B's event. So the recompute and
the write run under a lock on the pushed entities in the online store (``try_lock``: a SQLite row
or a Redis key, all of a push's entities or none, expiring after ``LOCK_TTL_S``): whoever holds it
second reads a log that holds both appends, and its row, written last, has every event. A push
that cannot get the lock within ``LOCK_WAIT_S`` goes on without it (logged): its events are in the
log either way, and the next push or batch run for those users repairs the row.

The log is read through a snapshot (``data.eventlog``); when it holds many small files a push
starts their compaction in a background thread (``data.eventlog_compact``), so the number of
files a push opens stays bounded however long the log grows.

After its rows are written, a push publishes the entities it rewrote on the online store's change
feed (``publish_changes``), whoever called it (``POST /v1/events``, a script, a test): every
serving replica reads that feed and drops those users' cached rows and answers
(``serving.freshness``). A failed publish is logged and does not fail the push: the rows are
written, and the replicas' caches expire within their TTL.
"""

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from aiplatform.core.settings import seconds_from_env
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, eventlog_compact, validate
from aiplatform.features.definitions import FeatureService, FeatureView, arrow_type
from aiplatform.features.engine import compute_view_rows
from aiplatform.features.materialize import latest_per_entity
from aiplatform.features.online import OnlineStore
from aiplatform.features.partition import TIMESTAMP_COLUMN

_TS = pa.timestamp("us", tz="UTC")
log = logging.getLogger(__name__)

DEFAULT_DEDUP_WINDOW_S = 24 * 3600.0
"""How long an accepted event_id refuses its repeats: longer than any client's retries."""
DEDUP_WINDOW_ENV = "AIPLATFORM_EVENT_DEDUP_WINDOW_S"
LOCK_TTL_S = 30.0
"""A push's entity lock expires after this long (a replica that died holding it)."""
LOCK_WAIT_S = 10.0
"""How long a push waits for the lock of entities another push is recomputing."""


@dataclass
class PushResult:
    events: int
    entities_updated: dict[str, int]
    """Service name -> entities whose online row was rewritten."""
    eventlog_file: str | None
    duration_ms: float
    duplicates: int = 0
    """Events skipped: a repeated event_id within the batch, or one accepted within the window."""
    duplicate_event_ids: tuple[str, ...] = ()
    """The ids skipped because an earlier push accepted them (within the window)."""


@lru_cache(maxsize=1)
def event_dedup_window_s() -> float:
    """The window, read once per process from ``AIPLATFORM_EVENT_DEDUP_WINDOW_S`` (seconds,
    default 24 h, 0: off). In a Serve replica that is the replica's environment."""
    return seconds_from_env(DEDUP_WINDOW_ENV, DEFAULT_DEDUP_WINDOW_S, "; 0 turns deduplication off")


def _claim_scope(layout: Layout) -> str:
    """An event_id is unique within one event log: the claims name the log's root, so two
    storage roots sharing an online store (tests, staging next to production) never collide."""
    return hashlib.sha256(layout.root.encode()).hexdigest()[:16] + ":"


def _input_rows(events: "pa.Table | pd.DataFrame | list[dict]") -> int:
    if isinstance(events, pa.Table):
        return events.num_rows
    try:
        return len(events)
    except TypeError:  # an iterator: already consumed by validation, its length unknown
        return 0


def _claim_new(layout: Layout, store: OnlineStore, table: pa.Table) -> tuple[pa.Table, list[str], list[str]]:
    """``table`` without the events whose event_id an earlier push accepted within the window;
    the claim keys now held (released if the append fails) and the skipped ids."""
    window = event_dedup_window_s()
    ids = table.column("event_id")
    if window <= 0 or ids.null_count == table.num_rows:
        return table, [], []
    present = pc.is_valid(ids).to_numpy(zero_copy_only=False)
    wanted = [v for v in ids.to_pylist() if v is not None]
    scope = _claim_scope(layout)
    keys = [scope + v for v in wanted]
    try:
        won = store.claim_event_ids(keys, window)
    except Exception as exc:  # the store is down: record (maybe twice) rather than lose the events
        log.warning("event_id deduplication unavailable (%s: %s); appending %d events unchecked",
                    type(exc).__name__, exc, table.num_rows)
        return table, [], []
    keep = present.copy()
    keep[np.flatnonzero(present)] = np.asarray(won, dtype=bool)
    keep |= ~present
    claimed = [k for k, w in zip(keys, won, strict=True) if w]
    skipped = [v for v, w in zip(wanted, won, strict=True) if not w]
    return (table if keep.all() else table.filter(pa.array(keep))), claimed, skipped


def _release(store: OnlineStore, keys: list[str]) -> None:
    if not keys:
        return
    try:
        store.release_event_ids(keys)
    except Exception as exc:  # best effort: the claims expire with the window anyway
        log.warning("could not release %d event_id claims after a failed append (%s: %s); their retries "
                    "are skipped as duplicates until the window ends", len(keys), type(exc).__name__, exc)


def _event_views(service: FeatureService) -> list[FeatureView]:
    return [v for v in service.views if v.source.table == "events" and v.source.timestamp_field]


def _recomputed_rows(view: FeatureView, history: pa.Table, since_us: int) -> pa.Table:
    """The latest row of each entity in ``history`` (its events), from its events after ``since_us``."""
    key = view.entity.join_key
    history = history.filter(pc.field("timestamp") > pa.scalar(since_us, _TS))
    if view.source.timestamp_field != "timestamp":
        history = history.rename_columns(
            [view.source.timestamp_field if c == "timestamp" else c for c in history.column_names])
    return latest_per_entity(compute_view_rows(view, history), key)


def _current_values(store: OnlineStore, service: FeatureService, keys: list[str]) -> pa.Table:
    return store.get_online_features(service, keys).to_arrow()


def _service_rows(layout: Layout, service: FeatureService, store: OnlineStore,
                  events: pa.Table, snap: "eventlog.Snapshot | None" = None) -> pa.Table | None:
    key = service.entity.join_key
    views = _event_views(service)
    if not views or key not in events.column_names:
        return None
    keys = pc.unique(events.column(key)).to_numpy(zero_copy_only=False)
    oldest_new = int(pc.min(events.column("timestamp")).cast(pa.int64()).as_py())
    columns: dict[str, pa.Array] = {key: pa.array(keys, pa.string())}
    ts = pa.array(np.full(len(keys), np.iinfo(np.int64).min), pa.int64())
    others = [v for v in service.views if v not in views]
    current = _current_values(store, service, list(keys)) if others else None
    # Every row at or after the oldest pushed event depends only on events after
    # (oldest_new - max_window): reading from there gives the entity's latest row exactly. One
    # read for all views (from the longest window), each view then keeps its own window.
    since = {v: oldest_new - int(v.max_window.total_seconds() * 1_000_000) - 1 for v in views}
    history = eventlog.read_events(layout, key=key, keys=keys, since_us=min(since.values()), snap=snap)
    bad, _ = eventlog_compact.bad_rows(history)
    if bad.any():  # logged before today's checks; the next batch run quarantines them
        history = history.filter(pa.array(~bad))
    for view in service.views:
        if view in views:
            rows = _recomputed_rows(view, history, since[view])
            idx = pc.index_in(columns[key], value_set=rows.column(key))
            taken = rows.take(idx)
            view_ts = taken.column(TIMESTAMP_COLUMN).cast(_TS).cast(pa.int64())
        else:
            taken = current
            view_ts = pa.array(np.full(len(keys), np.iinfo(np.int64).min), pa.int64())
        ts = pc.max_element_wise(ts, view_ts, skip_nulls=True)
        for name in service.selected(view):
            columns[name] = taken.column(name).cast(arrow_type(view.dtypes[name]))
    ordered = [key, TIMESTAMP_COLUMN] + list(service.stored_dtypes)
    columns[TIMESTAMP_COLUMN] = ts.cast(_TS)
    return pa.table({n: columns[n] for n in ordered})


def _lock_names(layout: Layout, services: Sequence[FeatureService], events: pa.Table) -> list[str]:
    names: list[str] = []
    for service in services:
        key = service.entity.join_key
        if _event_views(service) and key in events.column_names:
            prefix = f"{_claim_scope(layout)}push:{service.name}:"
            names += [prefix + str(k) for k in pc.unique(events.column(key)).to_pylist()]
    return names


def _lock(store: OnlineStore, names: list[str]) -> str | None:
    """The entities' lock (a token), waiting up to ``LOCK_WAIT_S``; None without one (a store
    without locks, or a lock that stayed busy: logged, the push goes on unguarded)."""
    try_lock = getattr(store, "try_lock", None)
    if not names or try_lock is None:
        return None
    deadline = time.monotonic() + LOCK_WAIT_S
    pause = 0.002
    while True:
        token = try_lock(names, LOCK_TTL_S)
        if token is not None:
            return token
        if time.monotonic() >= deadline:
            log.warning("push: %d entities stayed locked by another push for %.0fs; recomputing them unguarded",
                        len(names), LOCK_WAIT_S)
            return None
        time.sleep(pause * (0.5 + np.random.random()))
        pause = min(pause * 2, 0.05)


def _unlock(store: OnlineStore, names: list[str], token: str) -> None:
    try:
        store.unlock(names, token)
    except Exception as exc:  # the lock expires by itself; an error here must not hide the push's own
        log.warning("push: could not release %d entity locks (%s: %s); they expire in %.0fs",
                    len(names), type(exc).__name__, exc, LOCK_TTL_S)


def _publish(store: OnlineStore, written: dict[str, list[str]]) -> None:
    """Announce the rewritten entities on the store's change feed (best effort, see the module)."""
    publish = getattr(store, "publish_changes", None)
    if publish is None:
        return
    for service_name, ids in written.items():
        try:
            publish(service_name, ids)
        except Exception as exc:
            log.warning("push: could not publish %d changed %s rows to the change feed (%s: %s); other "
                        "replicas see them when their caches expire", len(ids), service_name,
                        type(exc).__name__, exc)


def push(layout: Layout, events: "pa.Table | pd.DataFrame | list[dict]", services: Sequence[FeatureService],
         store: OnlineStore, *, compact: bool = True) -> PushResult:
    """Validate ``events``, append the new ones to the event log, and rewrite the online rows of
    every entity they touch in each of ``services``. Invalid events (the contract, a time in
    the future, an id with control characters) raise ``DataValidationError`` naming the field
    before anything is written; events whose event_id was accepted within the dedup window are
    skipped (``PushResult.duplicates``). ``compact``: start a background compaction of the
    event log when it holds many small files (False: the log grows one file per push)."""
    started = time.perf_counter()
    table = eventlog.validate_pushed(events)
    validate.check_pushed_events(table, "pushed events")
    in_batch = max(_input_rows(events) - table.num_rows, 0)  # repeated event_ids the contract dropped
    claimed: list[str] = []
    skipped: list[str] = []
    if table.num_rows:
        table, claimed, skipped = _claim_new(layout, store, table)
    if table.num_rows == 0:
        return PushResult(0, {s.name: 0 for s in services}, None, (time.perf_counter() - started) * 1000,
                          in_batch + len(skipped), tuple(skipped))
    try:
        path = eventlog.append(layout, table)
    except BaseException:
        _release(store, claimed)
        raise
    updated: dict[str, int] = {}
    written: dict[str, list[str]] = {}
    names = _lock_names(layout, services, table)
    token = _lock(store, names)
    try:
        snap = eventlog.snapshot(layout)  # listed after the lock: every earlier append is in it
        for service in services:
            rows = _service_rows(layout, service, store, table, snap)
            updated[service.name] = store.write_features(service, rows) if rows is not None and rows.num_rows else 0
            if rows is not None and rows.num_rows:
                written[service.name] = rows.column(service.entity.join_key).to_pylist()
    finally:
        if token is not None:
            _unlock(store, names, token)
        _publish(store, written)  # also the services written before one failed
    if compact:
        eventlog_compact.compact_in_background(layout, store, snap)
    return PushResult(table.num_rows, updated, path, (time.perf_counter() - started) * 1000,
                      in_batch + len(skipped), tuple(skipped))
