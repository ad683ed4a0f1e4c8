"""Compaction and quarantine of the event log (the reader's side is ``data.eventlog``).

Compaction merges live files into one segment sorted by (user_id, timestamp), size-tiered:
``AIPLATFORM_EVENTLOG_COMPACT_FILES`` leaves (default 32) become a level-1 segment, ``FAN_IN``
segments of one level a segment of the next, so a reader opens at most about
``files + FAN_IN x levels`` files however long the log, and each event is rewritten once per
level (log-many times), never once per push.

When it runs, and why there:

- after a push that saw too many leaves (``features.push`` starts it in a background thread of
  the pushing process, so no request waits for it);
- at the start of the batch feature run (``features.pipeline``), with ``all_leaves`` and
  ``check_all``: the run then reads a few sorted files, and every event it reads has passed the
  current checks (see quarantine below);
- by hand: ``aiplatform events compact``.

Crash and reader safety: a segment is written in one atomic write, and it names the files it
replaces in its own footer, so it is either there with its covers or not there at all. Replaced
files are deleted only ``AIPLATFORM_EVENTLOG_GRACE_S`` (default 60 s) after the segment was
written, a segment only once every file it replaced is gone (otherwise those would come back to
life). A compactor that dies at any point leaves files that readers resolve the same way; the
next run deletes what is due. Compactors exclude each other with a lease in the online store
(``Lease``: SQLite row or Redis key with a TTL); before writing, a compactor checks that its
inputs are still live, and readers ignore the younger of two segments claiming one file.

Quarantine: a row that the batch pipeline cannot encode (a control character in an id, an id over
``MAX_ID_CHARS``, a time beyond now + the allowed skew, an empty required field: rules that are
stricter than when the row was written) or a file that cannot be read as events is never merged:
its rows go to ``<root>/eventlog/quarantine/<file>.parquet`` (with a ``reason`` column; an
unreadable file is copied there as it was) and the file is replaced by a segment of its good
rows, so the batch run goes on for everyone else and reports the count.
"""

import hashlib
import logging
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from aiplatform.core import schemas, storage
from aiplatform.core.errors import ConfigError
from aiplatform.core.settings import seconds_from_env
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, validate
from aiplatform.data.eventlog import CHECKED_KEY, CHECKS_VERSION, COVERS_KEY, LogFile, Snapshot

log = logging.getLogger(__name__)

COMPACT_FILES_ENV = "AIPLATFORM_EVENTLOG_COMPACT_FILES"
DEFAULT_COMPACT_FILES = 32
GRACE_ENV = "AIPLATFORM_EVENTLOG_GRACE_S"
DEFAULT_GRACE_S = 60.0
FAN_IN = 8
"""Segments of one level merged into one of the next."""
MAX_MERGE_ROWS = 4_000_000
"""Segments are not merged past this many rows (memory of one merge); time pruning by name then
keeps a push from opening the old ones."""
SEGMENT_ROW_GROUP = 65_536
MAX_ID_CHARS = 256
"""The HTTP API's limit on ids (``serving.schemas``); a longer id in the log predates it."""
LEASE_TTL_S = 300.0


class Lease(Protocol):
    """Mutual exclusion across processes (the online stores implement it)."""

    def try_lock(self, names: Sequence[str], ttl_s: float) -> str | None: ...
    def unlock(self, names: Sequence[str], token: str) -> None: ...


@dataclass
class CompactionResult:
    skipped: str | None = None
    """Why nothing was done (another compactor holds the lease), else None."""
    merged_files: int = 0
    segments: list[str] = field(default_factory=list)
    quarantined: int = 0
    """Events moved to the quarantine folder by this run."""
    quarantine_files: list[str] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    """Reason ("item_id: control character") -> quarantined events."""
    deleted: int = 0
    live_files: int = 0


def compact_files() -> int:
    """Leaves that make a push start a compaction (``AIPLATFORM_EVENTLOG_COMPACT_FILES``, 0: never)."""
    raw = os.environ.get(COMPACT_FILES_ENV, "").strip()
    if not raw:
        return DEFAULT_COMPACT_FILES
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ConfigError(f"{COMPACT_FILES_ENV}={raw!r}: expected a whole number of files >= 0 "
                          f"(default {DEFAULT_COMPACT_FILES}; 0 turns automatic compaction off)")
    return value


def grace_s() -> float:
    return seconds_from_env(GRACE_ENV, DEFAULT_GRACE_S, ": how long replaced event log files stay for readers")


def lock_name(layout: Layout, what: str) -> str:
    """A lease name of this storage root (two roots sharing an online store never collide)."""
    return hashlib.sha256(layout.root.encode()).hexdigest()[:16] + ":" + what


# ---- checks -----------------------------------------------------------------------------------
def bad_rows(table: pa.Table, now: float | None = None) -> tuple[np.ndarray, list[str | None]]:
    """Which rows the batch pipeline must not read, and why (None for a good row)."""
    n = table.num_rows
    bad = np.zeros(n, dtype=bool)
    reasons: list[str | None] = [None] * n

    def mark(mask: np.ndarray, reason) -> None:
        for i in np.flatnonzero(mask & ~bad):
            reasons[i] = reason(i) if callable(reason) else reason
        bad[:] |= mask

    for col in ("user_id", "item_id", "event_type"):
        values = table.column(col)
        empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(values), ""), True).to_numpy(zero_copy_only=False)
        mark(np.asarray(empty, dtype=bool), f"{col}: empty")
    mark(np.asarray(pc.is_null(table.column("timestamp")).to_numpy(zero_copy_only=False), bool), "timestamp: missing")
    for col in validate.ID_COLUMNS:
        values = table.column(col)
        long = pc.fill_null(pc.greater(pc.utf8_length(values), MAX_ID_CHARS), False)
        mark(np.asarray(long.to_numpy(zero_copy_only=False), bool), f"{col}: longer than {MAX_ID_CHARS} characters")
        unique = [v for v in pc.unique(values.drop_null()).to_pylist() if validate.control_character(v) is not None]
        if unique:
            hit = pc.fill_null(pc.is_in(values, value_set=pa.array(unique, pa.string())), False)
            texts = values.to_pylist()
            mark(np.asarray(hit.to_numpy(zero_copy_only=False), bool),
                 lambda i, c=col, t=texts: f"{c}: control character {validate.describe_control_character(t[i])}")
    bound = validate.latest_event_time(None if now is None else _utc(now))
    ts = table.column("timestamp")
    late = pc.fill_null(pc.greater(ts, pa.scalar(bound, ts.type)), False)
    mark(np.asarray(late.to_numpy(zero_copy_only=False), bool),
         f"timestamp: later than now + {validate.max_event_skew_s():g}s")
    return bad, reasons


def _utc(now: float):
    from datetime import datetime, timezone

    return datetime.fromtimestamp(now, timezone.utc)


def _category(reason: str) -> str:
    """'item_id: control character U+001E at position 4' -> 'item_id: control character'."""
    return reason.split(" U+", 1)[0]


# ---- reading one file -------------------------------------------------------------------------
def _read(f: LogFile) -> tuple[pa.Table | None, dict[bytes, bytes], str | None]:
    """(rows in the events contract, footer metadata, None) or (None, {}, why it cannot be read)."""
    fs, inside = storage.filesystem_for(f.path)
    try:
        table = pq.read_table(inside, filesystem=fs)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError) as exc:
        return None, {}, f"unreadable file: {exc}"
    meta = dict(table.schema.metadata or {})
    try:
        cols = {}
        for fld in schemas.EVENTS:
            if fld.name in table.column_names:
                cols[fld.name] = table.column(fld.name).cast(fld.type)
            elif fld.nullable:
                cols[fld.name] = pa.nulls(table.num_rows, fld.type)
            else:
                return None, {}, f"not events: no column {fld.name}"
        nullable = pa.schema([fld.with_nullable(True) for fld in schemas.EVENTS])
        return pa.table(cols, schema=nullable), meta, None
    except (pa.ArrowException, ValueError) as exc:
        return None, {}, f"not events: {exc}"


def _quarantine_rows(layout: Layout, source: LogFile, rows: pa.Table, reasons: list[str]) -> str:
    out = rows.append_column("reason", pa.array(reasons, pa.string()))
    out = out.append_column("source_file", pa.array([source.name] * rows.num_rows, pa.string()))
    buffer = pa.BufferOutputStream()
    pq.write_table(out, buffer)
    path = storage.join(eventlog.quarantine_dir(layout), source.name)  # a rerun overwrites it: idempotent
    storage.write_bytes(path, buffer.getvalue().to_pybytes())
    return path


def _quarantine_file(layout: Layout, source: LogFile, why: str) -> str:
    fs, inside = storage.filesystem_for(source.path)
    with fs.open_input_stream(inside) as stream:
        data = stream.read()
    path = storage.join(eventlog.quarantine_dir(layout), source.name)
    storage.write_bytes(path, data)
    storage.write_json(path + ".reason.json", {"source_file": source.name, "reason": why})
    return path


# ---- merging ----------------------------------------------------------------------------------
def _merge(layout: Layout, inputs: list[LogFile], level: int, result: CompactionResult, *,
           check: bool, now: float) -> str | None:
    """Write one segment of ``level`` replacing ``inputs`` (their good rows, sorted); bad rows go
    to the quarantine. Returns the segment's path, or None when an input is no longer live."""
    good: list[pa.Table] = []
    moved: list[tuple[LogFile, pa.Table, list[str]]] = []
    unreadable: list[tuple[LogFile, str]] = []
    for f in inputs:
        table, meta, why = _read(f)
        if table is None:
            unreadable.append((f, why or "unreadable"))
            continue
        if check or meta.get(CHECKED_KEY) != CHECKS_VERSION.encode():
            mask, reasons = bad_rows(table, now)
            if mask.any():
                moved.append((f, table.filter(pa.array(mask)), [r for r in reasons if r is not None]))
                table = table.filter(pa.array(~mask))
        good.append(table)
    merged = pa.concat_tables(good) if good else schemas.EVENTS.empty_table()
    merged = merged.cast(schemas.EVENTS).sort_by([("user_id", "ascending"), ("timestamp", "ascending")])
    name = eventlog.segment_name(level, merged)
    meta = {COVERS_KEY: _json([f.name for f in inputs]), CHECKED_KEY: CHECKS_VERSION.encode()}
    data = eventlog.parquet_bytes(merged, meta, row_group_size=SEGMENT_ROW_GROUP)
    live = {f.name for f in eventlog.snapshot(layout).live}
    if not all(f.name in live for f in inputs):  # another compactor replaced one meanwhile
        log.warning("event log compaction: an input was replaced by another compactor; nothing written")
        return None
    # The quarantine first: once the segment exists its inputs are no longer read.
    for f, rows, reasons in moved:
        result.quarantine_files.append(_quarantine_rows(layout, f, rows, reasons))
        result.quarantined += rows.num_rows
        for reason, count in Counter(_category(r) for r in reasons).items():
            result.reasons[reason] = result.reasons.get(reason, 0) + count
    for f, why in unreadable:
        result.quarantine_files.append(_quarantine_file(layout, f, why))
        result.reasons["unreadable file"] = result.reasons.get("unreadable file", 0) + 1
    path = storage.join(layout.eventlog, name)
    storage.write_bytes(path, data)
    for f, rows, reasons in moved:
        log.warning("event log: %d event(s) of %s quarantined to %s (%s)", rows.num_rows, f.name,
                    eventlog.quarantine_dir(layout), "; ".join(sorted(set(reasons))[:3]))
    result.merged_files += len(inputs)
    result.segments.append(path)
    return path


def _json(names: list[str]) -> bytes:
    import json

    return json.dumps(sorted(names)).encode()


def _checked(f: LogFile) -> bool:
    try:
        return eventlog.footer_metadata(f.path).get(CHECKED_KEY) == CHECKS_VERSION.encode()
    except (pa.ArrowException, OSError):
        return False


def _rows(f: LogFile) -> int:
    fs, inside = storage.filesystem_for(f.path)
    try:
        return pq.read_metadata(inside, filesystem=fs).num_rows
    except (pa.ArrowException, OSError):
        return 0


def due(snap: Snapshot, files_limit: int | None = None) -> bool:
    """True when the snapshot has enough leaves, or segments of one level, to merge."""
    limit = compact_files() if files_limit is None else files_limit
    if limit <= 0:
        return False
    if len(snap.leaves) >= limit:
        return True
    levels = Counter(f.level for f in snap.live if f.is_segment)
    return any(count >= FAN_IN for count in levels.values())


# ---- garbage ----------------------------------------------------------------------------------
def collect_garbage(layout: Layout, snap: Snapshot, *, grace: float | None = None, now: float | None = None) -> int:
    """Delete what no reader needs any more (see the module docstring); returns how many files."""
    grace = grace_s() if grace is None else grace
    cutoff = (time.time() if now is None else now) - grace
    by_name = {f.name: f for f in snap.listed}

    def settled(name: str) -> bool:
        f = by_name.get(name)
        return f is not None and f.mtime is not None and f.mtime <= cutoff

    deleted = _stale_temp_files(layout, cutoff - 3600)
    if snap.ignored:  # first the losers of a race: they claim files an accepted segment also claims
        for f in snap.ignored:
            if settled(f.name):
                storage.delete_file(f.path)
                deleted += 1
        return deleted
    existing = set(by_name)
    for name, seg in snap.coverer.items():
        f = by_name.get(name)
        if f is not None and not f.is_segment and settled(seg):
            storage.delete_file(f.path)
            existing.discard(name)
            deleted += 1
    for name, seg in snap.coverer.items():
        f = by_name.get(name)
        if f is not None and f.is_segment and settled(seg) and not (snap.covers.get(name, frozenset()) & existing):
            storage.delete_file(f.path)
            existing.discard(name)
            deleted += 1
    return deleted


def _stale_temp_files(layout: Layout, before: float) -> int:
    """Temp files of local writes that died before their rename (a killed process), an hour old.
    An object store has none: its PUT is all or nothing."""
    if storage.is_uri(layout.eventlog) or not os.path.isdir(layout.eventlog):
        return 0
    gone = 0
    for entry in os.scandir(layout.eventlog):
        if entry.name.startswith((".events-", ".segment-")) and entry.is_file() and entry.stat().st_mtime < before:
            try:
                os.unlink(entry.path)
                gone += 1
            except FileNotFoundError:
                pass
    return gone


# ---- the entry point --------------------------------------------------------------------------
def compact(layout: Layout, *, lease: Lease | None = None, files_limit: int | None = None,
            all_leaves: bool = False, check_all: bool = False, gc: bool = True, grace: float | None = None,
            now: float | None = None, lease_ttl_s: float = LEASE_TTL_S) -> CompactionResult:
    """Merge the log's files (size-tiered), quarantine bad rows, delete replaced files.

    ``all_leaves``: merge every leaf even below the threshold (the batch run); ``check_all``:
    also check live segments written under older rules. ``lease``: the online store, so two
    compactors never run at once (busy: returns at once with ``skipped``)."""
    names = [lock_name(layout, "eventlog-compact")]
    token = None
    if lease is not None:
        token = lease.try_lock(names, lease_ttl_s)
        if token is None:
            return CompactionResult(skipped="another compaction holds the lease")
    try:
        return _compact(layout, files_limit=compact_files() if files_limit is None else files_limit,
                        all_leaves=all_leaves, check_all=check_all, gc=gc, grace=grace,
                        now=time.time() if now is None else now)
    finally:
        if token is not None:
            lease.unlock(names, token)  # type: ignore[union-attr]


def _compact(layout: Layout, *, files_limit: int, all_leaves: bool, check_all: bool, gc: bool,
             grace: float | None, now: float) -> CompactionResult:
    result = CompactionResult()
    snap = eventlog.snapshot(layout)
    if gc:
        result.deleted += collect_garbage(layout, snap, grace=grace, now=now)
        snap = eventlog.snapshot(layout) if result.deleted else snap
    leaves = snap.leaves
    if leaves and (all_leaves or (files_limit > 0 and len(leaves) >= files_limit)):
        _merge(layout, leaves, 1, result, check=False, now=now)  # checks each leaf not marked checked
        snap = eventlog.snapshot(layout)
    if check_all:
        for f in [f for f in snap.live if f.is_segment and not _checked(f)]:
            _merge(layout, [f], f.level, result, check=True, now=now)
        snap = eventlog.snapshot(layout)
    level = 1
    while files_limit > 0 or all_leaves:
        group = [f for f in snap.live if f.is_segment and f.level == level]
        if not group:
            if not any(f.is_segment and f.level > level for f in snap.live):
                break
        elif len(group) >= FAN_IN:
            group = sorted(group, key=lambda f: f.name)
            if sum(_rows(f) for f in group) <= MAX_MERGE_ROWS:
                _merge(layout, group, level + 1, result, check=False, now=now)
                snap = eventlog.snapshot(layout)
        level += 1
    result.live_files = len(snap.live)
    return result


@contextmanager
def exclusive(layout: Layout, lease: Lease | None, *, ttl_s: float = 3600.0, wait_s: float = 120.0) -> Iterator[bool]:
    """Hold the compaction lease for a while (the batch run: no compactor deletes a file while
    Ray Data reads the log), waiting up to ``wait_s`` for a running compaction; yields whether it
    is held (False: no lease to take, or still busy: logged, the caller goes on)."""
    names = [lock_name(layout, "eventlog-compact")]
    token = None
    if lease is not None and hasattr(lease, "try_lock"):
        deadline = time.monotonic() + wait_s
        while (token := lease.try_lock(names, ttl_s)) is None and time.monotonic() < deadline:
            time.sleep(0.5)
        if token is None:
            log.warning("the event log's compaction lease stayed busy for %.0fs; going on without it", wait_s)
    try:
        yield token is not None
    finally:
        if token is not None:
            try:
                lease.unlock(names, token)  # type: ignore[union-attr]
            except Exception as exc:  # noqa: BLE001 - it expires by itself
                log.warning("could not release the event log's compaction lease (%s: %s)", type(exc).__name__, exc)


# ---- in the background of a push ---------------------------------------------------------------
_running: dict[str, threading.Thread] = {}
_running_lock = threading.Lock()


def compact_in_background(layout: Layout, lease: Lease | None, snap: Snapshot | None = None) -> bool:
    """Start ``compact`` in a daemon thread when ``snap`` says one is due and this process runs
    none for this root; returns whether one was started. A failure is logged, never raised: the
    log stays correct uncompacted, only slower to read."""
    if snap is not None and not due(snap):
        return False
    with _running_lock:
        running = _running.get(layout.root)
        if running is not None and running.is_alive():
            return False

        def work() -> None:
            try:
                compact(layout, lease=lease)
            except Exception as exc:  # noqa: BLE001 - a background helper: report, never crash the caller
                log.warning("event log compaction failed (%s: %s); the log stays readable uncompacted",
                            type(exc).__name__, exc)

        thread = threading.Thread(target=work, name=f"eventlog-compact-{uuid.uuid4().hex[:6]}", daemon=True)
        _running[layout.root] = thread
        thread.start()
    return True


def wait_for_background(timeout_s: float = 60.0) -> None:
    """Join the compactions this process started (tests, benchmarks, a clean exit)."""
    with _running_lock:
        threads = list(_running.values())
    for thread in threads:
        thread.join(timeout_s)


__all__ = ["CompactionResult", "Lease", "bad_rows", "collect_garbage", "compact", "compact_files",
           "compact_in_background", "due", "exclusive", "grace_s", "lock_name", "wait_for_background"]
