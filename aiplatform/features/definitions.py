"""Feature definitions as plain Python objects, separate from the engines that compute and serve them.

The vocabulary is Feast's (Entity, a batch source, FeatureView, on-demand features,
FeatureService), so users who know Feast can read a definition file at a glance. What differs is
that a view's features are *aggregations over time windows* of an event source (Tecton-style),
computed by our Ray Data pipeline, and that every view and service carries a ``version``: a hash
of its definition. A changed definition is a new version with its own offline table and online
rows, so old and new values never mix.

Semantics every engine follows (offline pipeline, point-in-time join, online push):
- a view has one feature row per (entity, event timestamp) of its source; the row at time ``t``
  aggregates the entity's source rows with timestamp in ``(t - window, t]``;
- ``last_n`` lists the column's values of those rows, most recent first (``distinct``: each value
  once, at its most recent position), at most ``n``;
- a row is valid for ``ttl`` after its timestamp: a lookup at time ``T`` takes the latest row with
  ``t <= T`` and ``T - t <= ttl``; otherwise the features are null and the status says why.

The shop's definitions live in ``apps/shop/features.py``.
"""

import hashlib
import inspect
import json
import keyword
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, Union

import pyarrow as pa


# --- the definition objects ----------------------------------------------------------------------
DType = Literal["int64", "float64", "string", "bool", "list<string>", "list<int64>", "list<float64>"]
DTYPES: tuple[str, ...] = ("int64", "float64", "string", "bool", "list<string>", "list<int64>", "list<float64>")
AggFunction = Literal["count", "sum", "mean", "min", "max", "last_n"]
AGG_FUNCTIONS: tuple[str, ...] = ("count", "sum", "mean", "min", "max", "last_n")


def arrow_type(dtype: str) -> pa.DataType:
    """The Arrow type of one of ``DTYPES``."""
    scalar = {"int64": pa.int64(), "float64": pa.float64(), "string": pa.string(), "bool": pa.bool_()}
    if dtype in scalar:
        return scalar[dtype]
    if dtype.startswith("list<") and dtype[5:-1] in scalar:
        return pa.list_(scalar[dtype[5:-1]])
    raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _fingerprint(obj: Any) -> str:
    """12 hex digits of SHA-256 over a canonical JSON form: stable across runs and machines."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _window_label(window: timedelta) -> str:
    seconds = int(window.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Entity:
    """What features describe (a user, an item); ``join_key`` is the column that identifies it."""

    name: str
    join_key: str
    description: str = ""


@dataclass(frozen=True)
class BatchSource:
    """A lake table (``events``, ``items``, ``users`` or one of your own) with an event-time column.

    ``timestamp_field=None`` marks a table of static attributes (every row valid forever)."""

    table: str
    timestamp_field: str | None = "timestamp"


@dataclass(frozen=True)
class Field:
    """A plain column of the source, taken as-is from the entity's latest source row."""

    name: str
    dtype: str
    column: str = ""

    def __post_init__(self) -> None:
        if not self.column:
            object.__setattr__(self, "column", self.name)


@dataclass(frozen=True)
class Aggregation:
    """One aggregation of a source column over a trailing time window.

    ``where`` keeps only the rows whose column is in the given values, e.g.
    ``where={"event_type": "purchase"}``; ``count`` needs no ``column``; ``last_n`` needs ``n``.
    """

    function: str
    window: timedelta
    column: str | None = None
    where: Mapping[str, Any] | tuple = ()
    n: int = 0
    distinct: bool = False
    name: str = ""

    def __post_init__(self) -> None:
        # Normalise ``where`` to a sorted tuple of (column, values) so the object hashes and prints stably.
        items = self.where.items() if isinstance(self.where, Mapping) else self.where
        norm = []
        for col, values in items:
            vals = (values,) if isinstance(values, (str, int, float, bool)) else tuple(values)
            norm.append((col, tuple(sorted(vals, key=str))))
        object.__setattr__(self, "where", tuple(sorted(norm)))
        if not self.name:
            parts = [self.function]
            if self.column:
                parts.append(self.column)
            for _, vals in self.where:
                parts.append("_".join(map(str, vals)))
            parts.append(_window_label(self.window))
            object.__setattr__(self, "name", "_".join(parts))

    @property
    def dtype(self) -> str:
        """The output type; ``sum/mean/min/max`` are float64 whatever the input's numeric type."""
        if self.function == "count":
            return "int64"
        if self.function == "last_n":
            return "list<string>"
        return "float64"

    def spec(self) -> dict[str, Any]:
        return {"function": self.function, "column": self.column, "window_s": self.window.total_seconds(),
                "where": [[c, list(v)] for c, v in self.where], "n": self.n, "distinct": self.distinct,
                "name": self.name}


@dataclass(frozen=True)
class FeatureView:
    """Features of one entity, computed from one source: aggregations over windows and/or plain fields."""

    name: str
    entity: Entity
    source: BatchSource
    aggregations: tuple[Aggregation, ...] = ()
    fields: tuple[Field, ...] = ()
    ttl: timedelta = timedelta(days=90)
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "aggregations", tuple(self.aggregations))
        object.__setattr__(self, "fields", tuple(self.fields))

    @property
    def features(self) -> list[str]:
        """Output feature names, in storage order."""
        return [a.name for a in self.aggregations] + [f.name for f in self.fields]

    @property
    def dtypes(self) -> dict[str, str]:
        out = {a.name: a.dtype for a in self.aggregations}
        out.update({f.name: f.dtype for f in self.fields})
        return out

    @property
    def max_window(self) -> timedelta:
        """How far back one row looks: the history an incremental run must re-read."""
        return max((a.window for a in self.aggregations), default=timedelta(0))

    def spec(self) -> dict[str, Any]:
        return {
            "name": self.name, "entity": self.entity.name, "join_key": self.entity.join_key,
            "source": {"table": self.source.table, "timestamp_field": self.source.timestamp_field},
            "aggregations": [a.spec() for a in self.aggregations],
            "fields": [[f.name, f.dtype, f.column] for f in self.fields],
            "ttl_s": self.ttl.total_seconds(),
        }

    @property
    def version(self) -> str:
        """Hash of the definition (not of the description): a new one whenever values could change."""
        return _fingerprint(self.spec())

    @property
    def table_name(self) -> str:
        """Offline table of this version: ``<name>__<version>``."""
        return f"{self.name}__{self.version}"

    def __getitem__(self, names: Sequence[str]) -> "FeatureSelection":
        """``view[["a", "b"]]`` selects some of a view's features for a service (as in Feast)."""
        return FeatureSelection(self, tuple(names))


@dataclass(frozen=True)
class FeatureSelection:
    view: FeatureView
    names: tuple[str, ...]


@dataclass(frozen=True)
class OnDemandFeatureView:
    """Features computed at request time from request fields and other views' features.

    ``fn`` takes a dict of numpy arrays (one per input name: request fields and the features of
    ``inputs``) and returns a dict of numpy arrays named as ``outputs``; it runs vectorised over
    many rows, both when building training frames and when serving.
    """

    name: str
    inputs: tuple[FeatureView, ...]
    request_fields: Mapping[str, str]
    outputs: Mapping[str, str]
    fn: Callable[[dict[str, Any]], dict[str, Any]]
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "inputs", tuple(self.inputs))

    @property
    def features(self) -> list[str]:
        return list(self.outputs)

    @property
    def dtypes(self) -> dict[str, str]:
        return dict(self.outputs)

    def spec(self) -> dict[str, Any]:
        try:
            code = inspect.getsource(self.fn)
        except (OSError, TypeError):
            code = getattr(self.fn, "__qualname__", repr(self.fn))
        return {"name": self.name, "inputs": [v.version for v in self.inputs],
                "request_fields": dict(self.request_fields), "outputs": dict(self.outputs), "code": code}

    @property
    def version(self) -> str:
        return _fingerprint(self.spec())


ServiceItem = Union[FeatureView, FeatureSelection, OnDemandFeatureView]


@dataclass(frozen=True)
class FeatureService:
    """The named set of features a model reads: views (or selections of them) and on-demand views."""

    name: str
    features: tuple[ServiceItem, ...]
    description: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "features", tuple(self.features))

    @property
    def views(self) -> list[FeatureView]:
        """The stored views this service reads (each once, in order)."""
        out: list[FeatureView] = []
        for item in self.features:
            view = item.view if isinstance(item, FeatureSelection) else item
            if isinstance(view, FeatureView) and view not in out:
                out.append(view)
        return out

    @property
    def on_demand(self) -> list[OnDemandFeatureView]:
        return [i for i in self.features if isinstance(i, OnDemandFeatureView)]

    def selected(self, view: FeatureView) -> list[str]:
        """The features of ``view`` this service uses."""
        names: list[str] = []
        for item in self.features:
            if item is view or item == view:
                names += view.features
            elif isinstance(item, FeatureSelection) and item.view == view:
                names += list(item.names)
        return list(dict.fromkeys(names))

    @property
    def entity(self) -> Entity:
        """The one entity of the stored views (an online row is one entity's values)."""
        entities = {v.entity for v in self.views}
        if len(entities) != 1:
            raise ValueError(f"feature service {self.name!r} mixes entities {sorted(e.name for e in entities)}; "
                             "a service serves one entity: split it into one service per entity")
        return entities.pop()

    @property
    def stored_dtypes(self) -> dict[str, str]:
        """Name -> dtype of the precomputed (stored online) features, in order."""
        out: dict[str, str] = {}
        for view in self.views:
            for name in self.selected(view):
                out[name] = view.dtypes[name]
        return out

    @property
    def request_fields(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for odfv in self.on_demand:
            out.update(odfv.request_fields)
        return out

    def spec(self) -> dict[str, Any]:
        parts = []
        for item in self.features:
            if isinstance(item, FeatureSelection):
                parts.append([item.view.version, list(item.names)])
            else:
                parts.append([item.version])
        return {"name": self.name, "features": parts}

    @property
    def version(self) -> str:
        return _fingerprint(self.spec())


def is_identifier(name: str) -> bool:
    """Feature names become column names in Arrow, SQL and Python: keep them identifiers."""
    return name.isidentifier() and not keyword.iskeyword(name) and not name.startswith("_")
