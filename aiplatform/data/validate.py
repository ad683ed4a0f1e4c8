"""Turn a user's Parquet/CSV file into a table of the contract's exact types, or refuse it.

Every refusal names the file, the column, how many rows failed and what was expected, so the
person who brought the data can fix it without reading code.
"""

import csv
import io
import unicodedata
from datetime import datetime, timedelta, timezone
from functools import lru_cache
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from aiplatform.core import schemas
from aiplatform.core.errors import DataValidationError
from aiplatform.core.settings import seconds_from_env
from aiplatform.core.storage import filesystem_for


def read_file(path: str) -> pa.Table:
    """Read Parquet or CSV (by extension) with no type guessing we cannot control.

    ``path`` is a local path or an object-store URI (``s3://bucket/events.parquet``): the data
    may be imported from where it already lives."""
    fs, inside = filesystem_for(path)
    info = fs.get_file_info(inside)
    if info.type == pafs.FileType.NotFound:
        raise DataValidationError(path, "file not found", hint="Check the path and try again")
    is_dir = info.type == pafs.FileType.Directory
    if not is_dir and info.size == 0:
        raise DataValidationError(path, "file is empty", expected="a Parquet or CSV file with a header row")
    suffix = PurePosixPath(inside).suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            delimiter = "\t" if suffix == ".tsv" else ","
            with fs.open_input_stream(inside) as raw:
                header = next(csv.reader(io.TextIOWrapper(raw, encoding="utf-8", newline=""),
                                         delimiter=delimiter), None)
            if not header:
                raise DataValidationError(path, "has no header row", expected="a CSV header naming the columns")
            opts = pacsv.ParseOptions(delimiter=delimiter)
            # Read every column as text: we convert ourselves, so failures can be counted per column.
            conv = pacsv.ConvertOptions(column_types={c: pa.string() for c in header},
                                        strings_can_be_null=True)
            with fs.open_input_stream(inside) as raw:
                table = pacsv.read_csv(raw, parse_options=opts, convert_options=conv)
        elif suffix in (".parquet", ".pq") or is_dir:
            table = pq.read_table(inside, filesystem=fs)
        else:
            raise DataValidationError(path, f"unsupported file type '{suffix}'",
                                      expected="a .parquet or .csv file")
    except DataValidationError:
        raise
    except (pa.ArrowInvalid, OSError, UnicodeDecodeError) as exc:
        raise DataValidationError(path, f"cannot be read: {exc}", expected="a valid Parquet or CSV file") from exc
    if table.num_rows == 0:
        raise DataValidationError(path, "has no rows", expected="at least one data row")
    return table


def _require(table: pa.Table, path: str, required: tuple[str, ...]) -> None:
    for col in required:
        if col not in table.column_names:
            raise DataValidationError(
                path, "missing required column", column=col, failed_rows=table.num_rows,
                expected=f"columns {', '.join(required)} (found: {', '.join(table.column_names)})",
            )


def _to_string(table: pa.Table, path: str, col: str, required: bool) -> pa.Array:
    arr = table.column(col).combine_chunks()
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    elif pa.types.is_integer(arr.type):
        arr = arr.cast(pa.string())
    else:
        raise DataValidationError(path, f"has type {arr.type}", column=col,
                                  failed_rows=table.num_rows, expected="string")
    if required:
        empty = pc.or_kleene(pc.is_null(arr), pc.equal(pc.utf8_trim_whitespace(arr), ""))
        bad = int(pc.sum(empty).as_py() or 0)
        if bad:
            raise DataValidationError(path, "is empty or null", column=col, failed_rows=bad,
                                      expected="a non-empty string in every row")
    return arr


def _to_float(table: pa.Table, path: str, col: str) -> pa.Array:
    arr = table.column(col).combine_chunks()
    if pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type) or pa.types.is_null(arr.type):
        return arr.cast(pa.float64())
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        values = arr.to_pylist()
        out, bad = [], 0
        for v in values:
            if v is None or v.strip() == "":
                out.append(None)
                continue
            try:
                out.append(float(v))
            except ValueError:
                bad += 1
                out.append(None)
        if bad:
            raise DataValidationError(path, "has values that are not numbers", column=col,
                                      failed_rows=bad, expected="a float (e.g. 19.99) or empty")
        return pa.array(out, pa.float64())
    raise DataValidationError(path, f"has type {arr.type}", column=col,
                              failed_rows=table.num_rows, expected="float")


def _to_timestamp(table: pa.Table, path: str, col: str) -> pa.Array:
    """ISO-8601 strings (naive = UTC), epoch seconds, or Arrow timestamps -> timestamp[us, UTC]."""
    arr = table.column(col).combine_chunks()
    target = pa.timestamp("us", tz="UTC")
    if pa.types.is_timestamp(arr.type):
        if arr.type.tz is None:
            arr = pc.assume_timezone(arr, "UTC")
        # Sub-microsecond digits (pandas' default is ns) are truncated, not refused.
        out = arr.cast(target, safe=False)
    elif pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
        secs = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
        micros = np.round(secs * 1e6)
        out = pa.array(micros.astype("int64"), pa.int64(), mask=np.isnan(secs)).cast(target)
    elif pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        import pandas as pd

        s = pd.Series(arr.to_pylist(), dtype="object")
        numeric = pd.to_numeric(s, errors="coerce")
        parsed = pd.to_datetime(s.where(numeric.isna()), utc=True, errors="coerce", format="mixed")
        from_epoch = pd.to_datetime(numeric, unit="s", utc=True, errors="coerce")
        merged = parsed.where(parsed.notna(), from_epoch)
        bad = int((merged.isna() & s.notna()).sum())
        if bad:
            raise DataValidationError(path, "has unparseable timestamps", column=col, failed_rows=bad,
                                      expected="ISO-8601 (2026-11-01T12:00:00Z) or epoch seconds")
        out = pa.array(merged.dt.as_unit("us"), target)
    else:
        raise DataValidationError(path, f"has type {arr.type}", column=col,
                                  failed_rows=table.num_rows, expected="timestamp")
    nulls = out.null_count
    if nulls:
        raise DataValidationError(path, "has missing timestamps", column=col, failed_rows=nulls,
                                  expected="a timestamp in every row")
    return out


def validate_events(table: pa.Table, path: str) -> pa.Table:
    _require(table, path, schemas.EVENTS_REQUIRED)
    cols = {
        "user_id": _to_string(table, path, "user_id", True),
        "item_id": _to_string(table, path, "item_id", True),
        "event_type": _to_string(table, path, "event_type", True),
        "timestamp": _to_timestamp(table, path, "timestamp"),
        "value": _to_float(table, path, "value") if "value" in table.column_names
        else pa.nulls(table.num_rows, pa.float64()),
        "event_id": _to_string(table, path, "event_id", False) if "event_id" in table.column_names
        else pa.nulls(table.num_rows, pa.string()),
    }
    out = pa.table(cols, schema=schemas.EVENTS)
    # Duplicate event_ids: keep the first occurrence, as promised in docs/architecture.md.
    if out.column("event_id").null_count < out.num_rows:
        import pandas as pd

        ids = pd.Series(out.column("event_id").to_pylist())
        dup = ids.notna() & ids.duplicated(keep="first")
        if dup.any():
            out = out.filter(pa.array(~dup.to_numpy()))
    return out


def validate_items(table: pa.Table, path: str) -> pa.Table:
    _require(table, path, schemas.ITEMS_REQUIRED)
    n = table.num_rows
    cols = {
        "item_id": _to_string(table, path, "item_id", True),
        "title": _to_string(table, path, "title", False) if "title" in table.column_names else pa.nulls(n, pa.string()),
        "category": _to_string(table, path, "category", False) if "category" in table.column_names else pa.nulls(n, pa.string()),
        "price": _to_float(table, path, "price") if "price" in table.column_names else pa.nulls(n, pa.float64()),
    }
    out = pa.table(cols, schema=schemas.ITEMS)
    dup = int(out.num_rows - pc.count_distinct(out.column("item_id")).as_py())
    if dup:
        raise DataValidationError(path, "has duplicate item ids", column="item_id", failed_rows=dup,
                                  expected="each item_id exactly once")
    return out


def validate_users(table: pa.Table, path: str) -> pa.Table:
    _require(table, path, schemas.USERS_REQUIRED)
    ids = _to_string(table, path, "user_id", True)
    return table.set_column(table.column_names.index("user_id"), "user_id", ids)


def check_references(events: pa.Table, items: pa.Table, events_path: str) -> None:
    """Events may only name items in the catalogue: a model cannot recommend what it cannot show."""
    known = pc.is_in(events.column("item_id"), value_set=items.column("item_id"))
    bad = int(pc.sum(pc.invert(known)).as_py() or 0)
    if bad:
        example = pc.filter(events.column("item_id"), pc.invert(known))[0].as_py()
        raise DataValidationError(
            events_path, f"names items that are not in the items file (e.g. '{example}')",
            column="item_id", failed_rows=bad, expected="every item_id to appear in the items file",
        )


# ---- real-time events: what the batch contract cannot see ------------------------------------

DEFAULT_MAX_EVENT_SKEW_S = 300.0
"""How far past now a pushed event's time may be: clients' clocks drift, but an event from the
future would sit at the top of every window and hide the user's real activity until then."""
MAX_EVENT_SKEW_ENV = "AIPLATFORM_MAX_EVENT_SKEW_S"
ID_COLUMNS = ("user_id", "item_id", "event_type", "event_id")
"""The text fields of the events contract that are ids: refused with control characters."""
CONTROL_CHARACTERS = "printable text without control or format characters (Unicode Cc/Cf: U+0000..U+001F, " \
                     "U+007F..U+009F, zero-width and direction marks)"


@lru_cache(maxsize=1)
def max_event_skew_s() -> float:
    """The allowed skew, read once per process from ``AIPLATFORM_MAX_EVENT_SKEW_S`` (seconds,
    default 300). Read where events are validated: in a Serve replica that is the replica's
    environment (a cluster's ``runtime_env.env_vars``), not the shell that deployed it."""
    return seconds_from_env(MAX_EVENT_SKEW_ENV, DEFAULT_MAX_EVENT_SKEW_S)


def latest_event_time(now: datetime | None = None) -> datetime:
    """The latest time an event may carry now (UTC)."""
    return (now or datetime.now(timezone.utc)) + timedelta(seconds=max_event_skew_s())


def control_character(text: str) -> tuple[int, str] | None:
    """The position and the first control or format character (Unicode Cc/Cf) in ``text``, or
    None. Such characters are the online rows' list separators (U+001E, U+001F) and terminal or
    log escapes: an id carrying one would split into other ids downstream."""
    if text.isprintable():  # no Cc/Cf (the common case, one C loop)
        return None
    for i, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cc", "Cf"):
            return i, ch
    return None


def describe_control_character(text: str) -> str | None:
    """``'U+001E at position 3'`` for the first control character of ``text``, or None."""
    found = control_character(text)
    return None if found is None else f"U+{ord(found[1]):04X} at position {found[0]}"


def check_pushed_events(table: pa.Table, path: str, now: datetime | None = None) -> None:
    """Refuse events (already in the contract's types) that a file import would let through
    but a real-time push must not: times later than now + the allowed skew, and ids with
    control characters. Raises ``DataValidationError`` naming the column, the rows and the bound."""
    for col in ID_COLUMNS:
        if col not in table.column_names:
            continue
        values = pc.unique(table.column(col).drop_null()).to_pylist()
        bad = [v for v in values if control_character(v) is not None]
        if bad:
            rows = int(pc.sum(pc.is_in(table.column(col), value_set=pa.array(bad, pa.string()))).as_py() or 0)
            raise DataValidationError(
                path, f"has control characters (e.g. {bad[0]!r}: {describe_control_character(bad[0])})",
                column=col, failed_rows=rows, expected=CONTROL_CHARACTERS)
    if "timestamp" in table.column_names and table.num_rows:
        bound = latest_event_time(now)
        ts = table.column("timestamp")
        late = pc.greater(ts, pa.scalar(bound, ts.type))
        n = int(pc.sum(late).as_py() or 0)
        if n:
            raise DataValidationError(
                path, f"has times in the future (latest {_timestamp_text(pc.max(ts))})", column="timestamp",
                failed_rows=n, expected=f"times no later than now + {max_event_skew_s():g}s "
                                        f"({bound.isoformat(timespec='seconds')}); {MAX_EVENT_SKEW_ENV} sets the "
                                        "allowed clock skew")


def _timestamp_text(value: pa.Scalar) -> str:
    try:
        return value.as_py().isoformat()
    except (ValueError, OverflowError):  # past year 9999: Python's datetime cannot hold it
        return f"{value.cast(pa.int64()).as_py()} microseconds after 1970"
