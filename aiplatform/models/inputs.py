"""The model's user inputs, derived once from the declared feature service.

Why this module exists: the recommender reads a user through a feature service
(``features.definitions.FeatureService``, e.g. ``recommender_user`` in ``apps/shop/features.py``).
What the model sees of that row must be decided in one place, from the declaration, so that a
changed window or a new feature reaches training, evaluation and serving together, and a model
served against a service it was not trained on fails loudly instead of reading zeros.

``UserInputSpec.from_service`` reads the service and fixes:

- ``dense``: every numeric feature of the service (int64, float64, bool; stored features in the
  service's order, then on-demand outputs), in that order: the user tower's dense vector;
- ``history``: the list feature that holds the user's recent items (a ``last_n`` aggregation;
  its ``n`` is the model's history length), by default ``last_items``;
- ``exclude``: the list feature of items never to recommend again (default ``purchased_items``;
  ``None``: exclude nothing).

The spec travels inside the model's config (``TwoTowerModel(inputs=...)``, saved in
``model_config.json``), so every consumer of an artifact reads the same contract, and
``check_service`` compares it with the service a deployment is about to read.

Dense values are scaled by a signed ``log1p`` (counts are heavy-tailed; the log keeps one very
active user from dominating the MLP's scale); NaN and infinities become 0.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from aiplatform.core.errors import ConfigError

DEFAULT_HISTORY = "last_items"
DEFAULT_EXCLUDE = "purchased_items"
NUMERIC_DTYPES: tuple[str, ...] = ("int64", "float64", "bool")
FORMAT = 1
BARE_N_DENSE = 12
BARE_HISTORY_LEN = 20
"""Input sizes of a model built without an input spec (hand-made models in tests and
benchmarks); a trained model always carries its ``UserInputSpec`` and takes both from it."""


def as_item_list(value: Any) -> list[str]:
    """A list feature's value as a list of str: None/NaN (a missing row) is the empty list."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    return [str(v) for v in value]


def encode_dense(values: Any) -> np.ndarray:
    """[B, n] float32 model inputs from raw dense values: ``sign(x) * log1p(|x|)``, NaN/inf -> 0.

    For counts (never negative) this is ``log1p``; a signed log keeps the order of negative
    values (a sum of refunds) instead of clipping them away."""
    arr = np.asarray(values, dtype="float32")
    if arr.ndim != 2:
        raise ValueError(f"dense values: expected a [rows, features] matrix, got shape {arr.shape}")
    arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
    return (np.sign(arr) * np.log1p(np.abs(arr))).astype("float32")


@dataclass(frozen=True)
class UserInputSpec:
    """What the model reads of a user's feature-service row (see the module docstring)."""

    service: str
    service_version: str
    entity_key: str
    dense: tuple[str, ...]
    dense_dtypes: tuple[str, ...]
    history: str
    history_len: int
    exclude: str | None = None
    ignored: tuple[str, ...] = field(default=())
    """Features of the service the model does not read (strings, other lists): listed, so a
    reader of the artifact sees they were left out on purpose."""

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_service(cls, service: Any, history: str = DEFAULT_HISTORY,
                     exclude: str | None = DEFAULT_EXCLUDE) -> "UserInputSpec":
        """The spec of ``service`` (a ``features.definitions.FeatureService``).

        Raises ``ConfigError`` naming the service and the feature when ``history`` is not a
        ``last_n`` aggregation of the service, or ``exclude`` is not one of its list features."""
        dtypes: dict[str, str] = dict(service.stored_dtypes)
        for odfv in service.on_demand:
            dtypes.update(odfv.dtypes)
        lists = [n for n, t in dtypes.items() if t.startswith("list")]
        history_len = _last_n_length(service, history)
        if history_len is None:
            found = f"its list features are {lists}" if lists else "it has no list feature"
            kind = f"a {dtypes[history]} feature" if history in dtypes else "not one of its features"
            raise ConfigError(
                f"feature service {service.name!r}: history feature {history!r} is {kind}, but the model's "
                f"history must be a last_n aggregation of item ids ({found}); set history_feature in the "
                "training config to one of them, or declare it in the service")
        if exclude is not None and exclude not in lists:
            found = f"its list features are {lists}" if lists else "it has no list feature"
            raise ConfigError(
                f"feature service {service.name!r}: exclusion feature {exclude!r} is not one of its list "
                f"features ({found}); set exclude_feature in the training config to one of them "
                "(or to null to exclude nothing)")
        dense = [n for n, t in dtypes.items() if t in NUMERIC_DTYPES]
        used = {*dense, history, *([exclude] if exclude else [])}
        return cls(service=service.name, service_version=service.version, entity_key=service.entity.join_key,
                   dense=tuple(dense), dense_dtypes=tuple(dtypes[n] for n in dense), history=history,
                   history_len=int(history_len), exclude=exclude,
                   ignored=tuple(n for n in dtypes if n not in used))

    @property
    def n_dense(self) -> int:
        return len(self.dense)

    @property
    def columns(self) -> list[str]:
        """The columns a frame needs for the model: the dense features, the history, the exclusion."""
        return [*self.dense, self.history, *([self.exclude] if self.exclude else [])]

    def describe(self) -> str:
        return (f"service {self.service!r} v{self.service_version}: {self.n_dense} dense "
                f"({', '.join(self.dense)}), history {self.history!r} (n={self.history_len}), "
                f"exclude {self.exclude!r}")

    # ---- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "service": self.service, "service_version": self.service_version,
                "entity_key": self.entity_key, "dense": list(self.dense), "dense_dtypes": list(self.dense_dtypes),
                "history": self.history, "history_len": self.history_len, "exclude": self.exclude,
                "ignored": list(self.ignored)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "UserInputSpec":
        if int(d.get("format", 0)) != FORMAT:
            raise ConfigError(f"model input spec format {d.get('format')!r} is not supported (expected {FORMAT}); "
                              "retrain the model with this version of aiplatform")
        return cls(service=str(d["service"]), service_version=str(d["service_version"]),
                   entity_key=str(d["entity_key"]), dense=tuple(d["dense"]), dense_dtypes=tuple(d["dense_dtypes"]),
                   history=str(d["history"]), history_len=int(d["history_len"]), exclude=d.get("exclude"),
                   ignored=tuple(d.get("ignored", ())))

    # ---- the check a deployment runs ----------------------------------------------------------
    def check_service(self, service: Any, where: str = "serving") -> None:
        """Raise ``ConfigError`` unless ``service`` is the one this model was trained on.

        Same name and version (a version hashes every definition it reads: windows, filters,
        on-demand code), so the features mean what they meant in training. The message names
        the features that differ, when any do, and how to fix it."""
        if service.name == self.service and service.version == self.service_version:
            return
        try:
            other = UserInputSpec.from_service(service, self.history, self.exclude)
            diff = _differences(self, other)
        except ConfigError as exc:
            diff = str(exc)
        raise ConfigError(
            f"{where}: the model was trained on feature service {self.service!r} version {self.service_version}, "
            f"but {where} reads {service.name!r} version {service.version}"
            + (f" ({diff})" if diff else " (same feature names, changed definitions)")
            + ": retrain the model on this service (python -m aiplatform.jobs.train), or serve the service it "
            "was trained on (AIPLATFORM_FEATURES_MODULE / AIPLATFORM_FEATURE_SERVICE)")

    def check_columns(self, names: Sequence[str], what: str = "frame") -> None:
        """A ``ValueError`` naming the model inputs missing from ``names``."""
        missing = [c for c in self.columns if c not in set(names)]
        if missing:
            raise ValueError(f"{what} lacks the model input column(s) {missing} of feature service "
                             f"{self.service!r}; expected {self.columns}")

    # ---- reading a batch ----------------------------------------------------------------------
    def histories(self, batch: Mapping[str, Any]) -> list[list[str]]:
        """The history list of every row of ``batch`` (a DataFrame or a dict of columns)."""
        return [as_item_list(x) for x in _column(batch, self.history)]

    def exclusions(self, batch: Mapping[str, Any]) -> list[list[str]]:
        """Items never to recommend, per row (empty lists when the spec excludes nothing)."""
        if self.exclude is None:
            return [[] for _ in range(_rows(batch, self.history))]
        return [as_item_list(x) for x in _column(batch, self.exclude)]

    def dense_values(self, batch: Mapping[str, Any]) -> np.ndarray:
        """[rows, n_dense] float32 raw dense values, in spec order (nulls are NaN)."""
        cols = [_as_float(_column(batch, name)) for name in self.dense]
        if not cols:
            return np.zeros((_rows(batch, self.history), 0), dtype="float32")
        return np.stack(cols, axis=1)

    def dense_row(self, row: Mapping[str, Any]) -> np.ndarray:
        """[n_dense] float32 raw values of one row given as a dict (``None`` is NaN)."""
        return np.asarray([np.nan if row.get(n) is None else row[n] for n in self.dense], dtype="float32")


def input_sizes(spec: "UserInputSpec | None", n_dense: int | None = None,
                history_len: int | None = None) -> tuple[int, int]:
    """(n_dense, history_len) of a model: the spec's when there is one (explicit values must
    agree with it), else the explicit values or the bare defaults."""
    if spec is None:
        return (BARE_N_DENSE if n_dense is None else int(n_dense),
                BARE_HISTORY_LEN if history_len is None else int(history_len))
    if n_dense is not None and int(n_dense) != spec.n_dense:
        raise ValueError(f"n_dense={n_dense} disagrees with the input spec's {spec.n_dense} dense features")
    if history_len is not None and int(history_len) != spec.history_len:
        raise ValueError(f"history_len={history_len} disagrees with the input spec's {spec.history_len}")
    return spec.n_dense, spec.history_len


def _column(batch: Mapping[str, Any], name: str) -> Any:
    try:
        return batch[name]
    except KeyError:
        raise ValueError(f"model input column {name!r} is missing (columns: {list(batch.keys())})") from None


def _as_float(values: Any) -> np.ndarray:
    """float32 values of a column; None / pd.NA (a null feature) become NaN."""
    try:
        return np.asarray(values, dtype="float32")
    except (TypeError, ValueError):
        return np.asarray([np.nan if v is None or v is pd.NA else v for v in values], dtype="float32")


def _rows(batch: Mapping[str, Any], name: str) -> int:
    return len(_column(batch, name))


def _last_n_length(service: Any, name: str) -> int | None:
    """``n`` of the ``last_n`` aggregation called ``name`` in the service's selected features."""
    for view in service.views:
        if name not in service.selected(view):
            continue
        for agg in view.aggregations:
            if agg.name == name and agg.function == "last_n":
                return int(agg.n)
    return None


def _differences(trained: UserInputSpec, served: UserInputSpec) -> str:
    parts = []
    gone = [n for n in trained.dense if n not in served.dense]
    new = [n for n in served.dense if n not in trained.dense]
    if gone:
        parts.append(f"dense feature(s) {gone} are no longer served")
    if new:
        parts.append(f"dense feature(s) {new} are new")
    if not gone and not new and trained.dense != served.dense:
        parts.append("the dense features are in another order")
    if trained.history_len != served.history_len:
        parts.append(f"history {trained.history!r} keeps {served.history_len} items, not {trained.history_len}")
    return "; ".join(parts)


__all__ = ["DEFAULT_EXCLUDE", "DEFAULT_HISTORY", "UserInputSpec", "as_item_list", "encode_dense", "input_sizes"]
