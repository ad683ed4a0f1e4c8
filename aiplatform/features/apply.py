"""`aiplatform features apply`: check declared features against the real lake, then version them.

Every problem is found before anything runs: a definition that names a missing column or sums a
string column would otherwise fail deep inside a Ray job (or, worse, compute something silently
wrong). All problems are reported at once, each naming the view, the feature and the fix.

Applied definitions are recorded in ``<home>/features/registry.json``: per view, on-demand view
and service, the current version and the history of (version, spec, applied_at). Re-applying an
unchanged definition changes nothing (the file is not rewritten); a changed one adds a version.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

import pyarrow as pa

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError, UserInputError
from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.features.definitions import (
    AGG_FUNCTIONS,
    DTYPES,
    FeatureSelection,
    FeatureService,
    FeatureView,
    OnDemandFeatureView,
    is_identifier,
)
from aiplatform.features.partition import BUCKET_COLUMN, TIMESTAMP_COLUMN

Status = Literal["new", "unchanged", "changed"]
NUMERIC = "a numeric column (int or float)"


@dataclass
class ApplyEntry:
    kind: Literal["view", "on_demand", "service"]
    name: str
    version: str
    status: Status
    previous: str | None
    features: list[str]


@dataclass
class ApplyReport:
    entries: list[ApplyEntry] = field(default_factory=list)
    registry_path: str = ""

    @property
    def changed(self) -> list[ApplyEntry]:
        return [e for e in self.entries if e.status != "unchanged"]


def registry_path(layout: Layout) -> str:
    return f"{layout.features}/registry.json"


def read_registry(layout: Layout) -> dict[str, Any]:
    registry = storage.read_json(registry_path(layout))
    return {"views": {}, "on_demand": {}, "services": {}} if registry is None else registry


# --- schema checks ----------------------------------------------------------------------------
def _lake_schema(layout: Layout, table: str, cache: dict[str, pa.Schema | None]) -> pa.Schema | None:
    if table not in cache:
        dataset = lake.table_dataset(layout, table)
        cache[table] = None if dataset is None else dataset.schema
    return cache[table]


def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_decimal(t)


def _compatible(dtype: str, t: pa.DataType) -> bool:
    """Can a column of Arrow type ``t`` be stored as ``dtype`` without changing its meaning?"""
    if pa.types.is_dictionary(t):
        t = t.value_type
    if dtype.startswith("list<"):
        return (pa.types.is_list(t) or pa.types.is_large_list(t)) and _compatible(dtype[5:-1], t.value_type)
    return {"int64": pa.types.is_integer(t),
            "float64": _is_numeric(t),
            "string": pa.types.is_string(t) or pa.types.is_large_string(t),
            "bool": pa.types.is_boolean(t)}.get(dtype, False)


def _check_view(view: FeatureView, layout: Layout, cache: dict, problems: list[str]) -> None:
    where = f"view {view.name!r}"
    if not is_identifier(view.name):
        problems.append(f"{where}: the name is not an identifier; use letters, digits and '_' (not first)")
    schema = _lake_schema(layout, view.source.table, cache)
    if schema is None:
        problems.append(f"{where}: source table {view.source.table!r} is not in the lake "
                        f"({layout.lake_table(view.source.table)}); import it, or fix BatchSource(table=...)")
    cols = {} if schema is None else {f.name: f.type for f in schema}

    def column(col: str | None, what: str, owner: str = where) -> pa.DataType | None:
        if schema is None or col is None:
            return None
        if col not in cols:
            problems.append(f"{owner}: {what} column {col!r} is not in lake table {view.source.table!r} "
                            f"(columns: {', '.join(cols)}); fix the column name")
            return None
        return cols[col]

    column(view.entity.join_key, f"entity {view.entity.name!r} join key")
    ts_field = view.source.timestamp_field
    ts_type = column(ts_field, "timestamp field")
    if ts_type is not None and not pa.types.is_timestamp(ts_type):
        problems.append(f"{where}: timestamp field {ts_field!r} is {ts_type}, not a timestamp; "
                        "import the table with a timestamp column or set BatchSource(timestamp_field=...)")
    if view.ttl <= timedelta(0):
        problems.append(f"{where}: ttl must be positive (got {view.ttl})")
    seen: set[str] = set()
    for name in view.features:
        if name in seen:
            problems.append(f"{where}: feature {name!r} is declared twice; give one of them another name=")
        seen.add(name)
        if not is_identifier(name):
            problems.append(f"{where}: feature {name!r} is not an identifier; pass name='...' with letters, "
                            "digits and '_' (not first, not a Python keyword)")
        if name in (view.entity.join_key, TIMESTAMP_COLUMN, BUCKET_COLUMN):
            problems.append(f"{where}: feature {name!r} clashes with a column of every offline table; rename it")
    for agg in view.aggregations:
        feat = f"{where}, feature {agg.name!r}"
        if agg.function not in AGG_FUNCTIONS:
            problems.append(f"{feat}: unknown function {agg.function!r}; use one of {', '.join(AGG_FUNCTIONS)}")
            continue
        if ts_field is None:
            problems.append(f"{feat}: aggregations need a timestamped source, but {view.source.table!r} "
                            "is static (timestamp_field=None); use a Field, or set timestamp_field")
        if agg.window <= timedelta(0):
            problems.append(f"{feat}: window must be positive (got {agg.window})")
        if agg.window > view.ttl:
            problems.append(f"{feat}: window {agg.window} is longer than the view's ttl {view.ttl}, so "
                            "rows would expire before their window is full; raise ttl or shorten the window")
        if agg.function != "count" and not agg.column:
            problems.append(f"{feat}: {agg.function} needs column=...")
        col_type = column(agg.column, "aggregation", feat)
        if agg.function in ("sum", "mean", "min", "max") and col_type is not None and not _is_numeric(col_type):
            problems.append(f"{feat}: {agg.function} of column {agg.column!r} needs {NUMERIC}, "
                            f"but it is {col_type}; aggregate a numeric column or use count/last_n")
        if agg.function == "last_n" and agg.n < 1:
            problems.append(f"{feat}: last_n needs n >= 1 (got {agg.n}); pass n=...")
        for wcol, values in agg.where:
            column(wcol, "where", feat)
            if not values:
                problems.append(f"{feat}: where on {wcol!r} lists no values")
    for f in view.fields:
        feat = f"{where}, feature {f.name!r}"
        if f.dtype not in DTYPES:
            problems.append(f"{feat}: unknown dtype {f.dtype!r}; use one of {', '.join(DTYPES)}")
            continue
        col_type = column(f.column, "field", feat)
        if col_type is not None and not _compatible(f.dtype, col_type):
            problems.append(f"{feat}: column {f.column!r} is {col_type}, which cannot be stored as {f.dtype}; "
                            "change the Field's dtype")


def _check_on_demand(odfv: OnDemandFeatureView, problems: list[str]) -> None:
    where = f"on-demand view {odfv.name!r}"
    if not is_identifier(odfv.name):
        problems.append(f"{where}: the name is not an identifier")
    stored = {name: v.name for v in odfv.inputs for name in v.features}
    for name, dtype in {**odfv.outputs, **odfv.request_fields}.items():
        if not is_identifier(name):
            problems.append(f"{where}: {name!r} is not an identifier; rename it")
        if dtype not in DTYPES:
            problems.append(f"{where}, feature {name!r}: unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    for name in odfv.outputs:
        if name in stored:
            problems.append(f"{where}, feature {name!r}: output clashes with a stored feature of view "
                            f"{stored[name]!r}; rename the output")
        if name in odfv.request_fields:
            problems.append(f"{where}, feature {name!r}: output has the name of a request field; rename it")


def _check_service(service: FeatureService, problems: list[str]) -> None:
    where = f"feature service {service.name!r}"
    if not is_identifier(service.name):
        problems.append(f"{where}: the name is not an identifier")
    try:
        service.entity
    except ValueError as exc:
        problems.append(str(exc))
    owner: dict[str, str] = {}
    for item in service.features:
        if isinstance(item, FeatureSelection):
            missing = [n for n in item.names if n not in item.view.features]
            for n in missing:
                problems.append(f"{where}: view {item.view.name!r} has no feature {n!r} "
                                f"(it has {', '.join(item.view.features)}); fix the selection")
            names, src = [n for n in item.names if n not in missing], item.view.name
        elif isinstance(item, FeatureView):
            names, src = item.features, item.name
        else:
            names, src = list(item.outputs), item.name
        for n in dict.fromkeys(names):
            if n in owner and owner[n] != src:
                problems.append(f"{where}: feature {n!r} comes from both {owner[n]!r} and {src!r}; "
                                "rename one (name=...) or select only one of them")
            owner.setdefault(n, src)


def validate(layout: Layout, views: Sequence[FeatureView], services: Sequence[FeatureService] = (),
             on_demand: Sequence[OnDemandFeatureView] = ()) -> None:
    """Raise ConfigError listing every problem of the definitions against the lake's schemas."""
    problems: list[str] = []
    cache: dict[str, pa.Schema | None] = {}
    all_views = _unique([*views, *(v for s in services for v in s.views),
                         *(v for o in on_demand for v in o.inputs)])
    names = [v.name for v in all_views]
    for dup in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"view {dup!r}: two different views have this name; rename one")
    for view in all_views:
        _check_view(view, layout, cache, problems)
    for odfv in _unique([*on_demand, *(o for s in services for o in s.on_demand)]):
        _check_on_demand(odfv, problems)
    for service in services:
        _check_service(service, problems)
    if problems:
        raise ConfigError(f"{len(problems)} problem{'s' if len(problems) > 1 else ''} in the feature "
                          "definitions:\n- " + "\n- ".join(dict.fromkeys(problems)))


def _unique(items: Iterable) -> list:
    out: list = []
    for item in items:
        if item not in out:
            out.append(item)
    return out


# --- versioning ---------------------------------------------------------------------------------
def apply(layout: Layout, views: Sequence[FeatureView], services: Sequence[FeatureService] = (),
          on_demand: Sequence[OnDemandFeatureView] = ()) -> ApplyReport:
    """Validate, then record the current version of every view, on-demand view and service."""
    validate(layout, views, services, on_demand)
    registry = read_registry(layout)
    now = datetime.now(timezone.utc).isoformat()
    report = ApplyReport(registry_path=registry_path(layout))
    all_views = _unique([*views, *(v for s in services for v in s.views)])
    all_odfv = _unique([*on_demand, *(o for s in services for o in s.on_demand)])
    groups: list[tuple[str, str, list[Any]]] = [("view", "views", all_views), ("on_demand", "on_demand", all_odfv),
                                                 ("service", "services", list(services))]
    for kind, section, objects in groups:
        for obj in objects:
            record = registry.setdefault(section, {}).get(obj.name)
            previous = None if record is None else record["current"]
            status: Status = "new" if record is None else ("unchanged" if previous == obj.version else "changed")
            if status != "unchanged":
                record = record or {"history": []}
                record["current"] = obj.version
                record["history"].append({"version": obj.version, "spec": obj.spec(), "applied_at": now})
                registry[section][obj.name] = record
            feats = list(obj.stored_dtypes) + [n for o in obj.on_demand for n in o.outputs] \
                if isinstance(obj, FeatureService) else list(obj.features)
            report.entries.append(ApplyEntry(kind, obj.name, obj.version, status, previous, feats))
    if report.changed:
        storage.write_json(registry_path(layout), registry)
    return report


def load_definitions(module: str) -> tuple[tuple, tuple, tuple]:
    """VIEWS, SERVICES and ON_DEMAND of a Python module (e.g. ``apps.shop.features``)."""
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise UserInputError(f"cannot import feature definitions module {module!r} ({exc}); "
                             "pass --module as a dotted module path importable from here") from exc
    if not hasattr(mod, "VIEWS"):
        raise UserInputError(f"module {module!r} has no VIEWS; declare VIEWS = (view, ...) "
                             "(and optionally SERVICES, ON_DEMAND)")
    return tuple(mod.VIEWS), tuple(getattr(mod, "SERVICES", ())), tuple(getattr(mod, "ON_DEMAND", ()))


__all__ = ["ApplyEntry", "ApplyReport", "apply", "load_definitions", "read_registry", "registry_path", "validate"]
