"""The event log: events received in real time (``POST /v1/events``, ``features.push``).

Each accepted batch is validated exactly like an imported events file (same schema, same
errors) and written as one small Parquet file (a *leaf*) under ``<root>/eventlog`` with
``storage.write_bytes`` (one PUT on an object store, a temp-file rename on a local disk), so a
batch is either wholly there or not at all, and a refused batch leaves nothing behind.

Why leaves are merged into *segments* (``data.eventlog_compact``): one file per request means a
reader opens thousands of files after a day of traffic, so a push (which re-reads its users'
recent events) would get slower with every event. A segment is one sorted Parquet file that
states, in its own footer (``COVERS_KEY``), the files it replaces. Readers take a *snapshot*:

- they list the folder once, read the footers of the segments they have not seen before
  (segments never change: their covers are cached per process) and drop every file that an
  accepted segment covers; a file that no listed segment covers is read as it is;
- so a reader that lists before a segment is written reads the small files, one that lists
  after reads the segment, and none reads an event twice or misses one. The replaced files are
  deleted only after the segment has been durable for a grace period
  (``AIPLATFORM_EVENTLOG_GRACE_S``), and a reader that still finds one gone lists again;
- names carry the earliest and latest event time of the file (``-t<min>_<max>``, microseconds),
  so a push that needs events after T never opens a file that ends before T.

Should two compactors ever write segments over the same file (compaction takes a lease in the
online store, so only a lease that expired mid-compaction allows it), the older segment by name
wins and the other is ignored, its remaining files staying live on their own.

The lake's events plus the event log are "all events": the batch feature pipeline reads both,
so a value pushed online is the value a later batch run computes from the same events.
A new ``aiplatform data import`` replaces the lake and clears the log (it belonged to the old data).
"""

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass, field

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aiplatform.core import schemas, storage
from aiplatform.core.storage import Layout
from aiplatform.data import lake, validate

COVERS_KEY = b"aiplatform.eventlog.covers"
"""Footer metadata of a segment: the JSON list of the file names it replaces."""
CHECKED_KEY = b"aiplatform.eventlog.checked"
"""Footer metadata: the version of the event checks (``CHECKS_VERSION``) its rows passed."""
CHECKS_VERSION = "1"
"""Bumped when the checks an event must pass get stricter: older files are checked again."""
QUARANTINE_DIR = "quarantine"

_LEAF = re.compile(r"^events-(\d{20})-([0-9a-f]{8})(?:-t(-?\d+)_(-?\d+))?\.parquet$")
_SEGMENT = re.compile(r"^segment-L(\d+)-(\d{20})-([0-9a-f]{8})(?:-t(-?\d+)_(-?\d+)|-(empty))\.parquet$")
_READ_ATTEMPTS = 4


@dataclass(frozen=True)
class LogFile:
    """One file of the log, as its name describes it."""
    path: str
    name: str
    level: int
    """0 for a leaf (one accepted batch), n for a segment that merged files of level n-1."""
    min_us: int | None
    max_us: int | None
    """Earliest and latest event time (None: unknown, a file written before names carried them)."""
    mtime: float | None = None
    empty: bool = False

    @property
    def is_segment(self) -> bool:
        return self.level > 0 or self.name.startswith("segment-")


@dataclass
class Snapshot:
    """What a reader sees at one listing: every listed file, and the live ones to read."""
    listed: list[LogFile]
    live: list[LogFile]
    covers: dict[str, frozenset[str]] = field(default_factory=dict)
    """Segment name -> the names it replaces (accepted and ignored segments alike)."""
    coverer: dict[str, str] = field(default_factory=dict)
    """Covered file name -> the accepted segment that replaces it."""
    ignored: list[LogFile] = field(default_factory=list)
    """Segments that lost to an older one over a shared file (a race): never read."""

    @property
    def leaves(self) -> list[LogFile]:
        return [f for f in self.live if not f.is_segment]


def parse_name(path: str, mtime: float | None = None) -> LogFile | None:
    """The ``LogFile`` a path names, or None for anything that is not a committed log file."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    m = _LEAF.match(name)
    if m:
        lo, hi = m.group(3), m.group(4)
        return LogFile(path, name, 0, int(lo) if lo else None, int(hi) if hi else None, mtime)
    m = _SEGMENT.match(name)
    if m:
        lo, hi = m.group(4), m.group(5)
        return LogFile(path, name, int(m.group(1)), int(lo) if lo else None, int(hi) if hi else None,
                       mtime, empty=bool(m.group(6)))
    return None


def validate_pushed(events: "pa.Table | pd.DataFrame | list[dict]") -> pa.Table:
    """Events in the lake's schema, or a ``DataValidationError`` naming the field and the fix."""
    if isinstance(events, pa.Table):
        table = events
    elif isinstance(events, pd.DataFrame):
        table = pa.Table.from_pandas(events, preserve_index=False)
    else:
        table = pa.Table.from_pylist(list(events))
    # Optional fields that are None in every event arrive untyped: give them the contract's type.
    for i, name in enumerate(table.column_names):
        if pa.types.is_null(table.schema.field(name).type) and name in schemas.EVENTS.names:
            table = table.set_column(i, name, pa.nulls(table.num_rows, schemas.EVENTS.field(name).type))
    return validate.validate_events(table, "pushed events")


def _time_range(table: pa.Table) -> tuple[int, int] | None:
    if table.num_rows == 0:
        return None
    ts = table.column("timestamp").cast(pa.int64())
    bounds = pc.min_max(ts)
    return int(bounds["min"].as_py()), int(bounds["max"].as_py())


def _range_suffix(table: pa.Table) -> str:
    bounds = _time_range(table)
    return "-empty" if bounds is None else f"-t{bounds[0]}_{bounds[1]}"


def parquet_bytes(table: pa.Table, metadata: dict[bytes, bytes] | None = None,
                  row_group_size: int | None = None) -> bytes:
    """``table`` in the events contract as Parquet, with footer ``metadata``."""
    table = table.cast(schemas.EVENTS)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buffer = pa.BufferOutputStream()
    pq.write_table(table, buffer, row_group_size=row_group_size)
    return buffer.getvalue().to_pybytes()


def append(layout: Layout, events: pa.Table, *, checked: bool = True) -> str:
    """Write one validated batch atomically as a leaf; returns its path (or URI). ``checked``:
    the events passed the push checks of ``CHECKS_VERSION`` (the batch run then skips them)."""
    bounds = _time_range(events)
    suffix = "" if bounds is None else f"-t{bounds[0]}_{bounds[1]}"
    name = f"events-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{suffix}.parquet"
    path = storage.join(layout.eventlog, name)
    storage.write_bytes(path, parquet_bytes(events, {CHECKED_KEY: CHECKS_VERSION.encode()} if checked else None))
    return path


def segment_name(level: int, table: pa.Table) -> str:
    return f"segment-L{level}-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}{_range_suffix(table)}.parquet"


# ---- snapshots --------------------------------------------------------------------------------
_covers_cache: dict[str, frozenset[str]] = {}
_cache_lock = threading.Lock()


def _list(layout: Layout) -> list[LogFile]:
    fs, inside = storage.filesystem_for(layout.eventlog)
    infos = fs.get_file_info(pafs.FileSelector(inside, allow_not_found=True, recursive=False))
    base = layout.eventlog.rstrip("/") if storage.is_uri(layout.eventlog) else inside
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        parsed = parse_name(f"{base}/{info.base_name}", info.mtime.timestamp() if info.mtime else None)
        if parsed is not None:
            out.append(parsed)
    return sorted(out, key=lambda f: f.name)


def footer_metadata(path: str) -> dict[bytes, bytes]:
    """The key-value metadata of a Parquet file's footer (one small read)."""
    fs, inside = storage.filesystem_for(path)
    return dict(pq.read_schema(inside, filesystem=fs).metadata or {})


def segment_covers(path: str) -> frozenset[str]:
    """The names a segment replaces (cached: a segment never changes once written)."""
    with _cache_lock:
        hit = _covers_cache.get(path)
    if hit is not None:
        return hit
    try:
        raw = footer_metadata(path).get(COVERS_KEY)
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError):  # not Parquet: it covers nothing (the batch
        return frozenset()  # run quarantines it as an unreadable file)
    covers = frozenset(json.loads(raw)) if raw else frozenset()
    with _cache_lock:
        if len(_covers_cache) > 20_000:
            _covers_cache.clear()
        _covers_cache[path] = covers
    return covers


def snapshot(layout: Layout) -> Snapshot:
    """List the log once and resolve which files are live (see the module docstring)."""
    for attempt in range(_READ_ATTEMPTS):
        listed = _list(layout)
        try:
            covers = {f.name: segment_covers(f.path) for f in listed if f.is_segment}
        except FileNotFoundError:  # a segment deleted since the listing (replaced by a newer one)
            if attempt == _READ_ATTEMPTS - 1:
                raise
            continue
        return _resolve(listed, covers)
    raise AssertionError("unreachable")


def _resolve(listed: list[LogFile], covers: dict[str, frozenset[str]]) -> Snapshot:
    """Accept segments oldest first (names start with their creation time); one whose files an
    accepted segment already claimed is ignored. Live: whatever no accepted segment covers."""
    coverer: dict[str, str] = {}
    ignored: list[LogFile] = []
    for f in listed:
        if not f.is_segment:
            continue
        mine = covers[f.name]
        if any(n in coverer for n in mine):
            ignored.append(f)
            continue
        for n in mine:
            coverer[n] = f.name
    ignored_names = {f.name for f in ignored}
    live = [f for f in listed if f.name not in coverer and f.name not in ignored_names]
    return Snapshot(listed, live, covers, coverer, ignored)


def files(layout: Layout) -> list[str]:
    """The log's live files (leaves not yet merged, and segments), oldest first: what a batch
    reader reads. Temp files of a batch in flight and replaced files are skipped."""
    return [f.path for f in snapshot(layout).live]


def event_paths(layout: Layout) -> list[str]:
    """Every Parquet file of all events: the lake's, then the log's."""
    return lake.table_files(layout, "events") + files(layout)


def _filter(key: str | None, keys, since_us: int | None):
    flt = None
    if keys is not None:
        flt = pc.field(key).isin(pa.array(list(keys), pa.string()))
    if since_us is not None:
        cond = pc.field("timestamp") > pa.scalar(since_us, pa.timestamp("us", tz="UTC"))
        flt = cond if flt is None else flt & cond
    return flt


def read_events(layout: Layout, *, key: str | None = None, keys=None, since_us: int | None = None,
                columns: list[str] | None = None, snap: Snapshot | None = None) -> pa.Table:
    """All events (lake + log), optionally only those of some entities and after a time.

    Filters are pushed down into the Parquet scan, and log files whose name says they end at or
    before ``since_us`` are not opened, so reading a few users' recent events does not load the
    whole lake or open the whole log. A file replaced (and deleted) since the listing makes the
    read list again."""
    flt = _filter(key, keys, since_us)
    for attempt in range(_READ_ATTEMPTS):
        snap = snap if snap is not None and attempt == 0 else snapshot(layout)
        log_paths = [f.path for f in snap.live if not f.empty and (
            since_us is None or f.max_us is None or f.max_us > since_us)]
        paths = lake.table_files(layout, "events") + log_paths
        if not paths:
            return schemas.EVENTS.empty_table() if columns is None else schemas.EVENTS.empty_table().select(columns)
        try:
            return _dataset(layout, paths).to_table(filter=flt, columns=columns)
        except FileNotFoundError:
            if attempt == _READ_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def _dataset(layout: Layout, paths: list[str]) -> pads.Dataset:
    """A dataset over files of the root (paths as listed: no per-file resolution, which costs
    more than reading a small file)."""
    fs, inside = storage.filesystem_for(layout.root)
    if storage.is_uri(layout.root):
        prefix = layout.root.rstrip("/") + "/"
        base = inside.rstrip("/") + "/"
        paths = [base + p[len(prefix):] if p.startswith(prefix) else storage.filesystem_for(p)[1] for p in paths]
    return pads.dataset(paths, schema=schemas.EVENTS, format="parquet", filesystem=fs)


def clear(layout: Layout) -> None:
    """Remove the log (a new import replaces the data it belonged to). Quarantined events stay:
    they are a report for whoever sent them."""
    for f in _list(layout):
        storage.delete_file(f.path)


def quarantine_dir(layout: Layout) -> str:
    return storage.join(layout.eventlog, QUARANTINE_DIR)
