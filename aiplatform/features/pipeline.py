"""Batch feature pipeline: lake events -> offline store (Lance) -> online store, and the frames
training reads.

Every feature here comes from a declared view of the features module (``apps/shop/features.py``
by default), computed by the one engine (``features.engine``) with one set of window rules
(``(t - w, t]``, see ``features.definitions``):

- ``run_feature_pipeline``: compacts the event log and quarantines the events it cannot encode
  (``data.eventlog_compact``: counted in ``events_quarantined``), brings the offline tables of the served feature service's views and
  of the item popularity view up to date, materializes the service into the online store and
  writes the popular-items list (the fallback for users without history): each item's latest
  ``item_popularity`` row at ``as_of``, scored by its weighted 7-day counts by event type;
- ``update_offline``: the only write to the offline store; callers decide when it runs (the
  feature job, the training job: an explicit, logged step);
- ``service_frame``: a point-in-time join of labels with the service's offline tables, a pure
  read (it never writes: bring the tables up to date with ``update_offline`` first);
- ``frame_from_events``: the same frame from an in-memory events frame (the same engine and the
  same as-of join, no store), for small data in tests, benchmarks and notebooks.
"""

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, lake
from aiplatform.features.definitions import FeatureService, FeatureView
from aiplatform.features.online import OnlineStore

if TYPE_CHECKING:  # Ray is imported where it runs, so importing this module stays cheap
    import ray.data

log = logging.getLogger(__name__)
POPULAR_ITEMS_KEPT = 200
POPULARITY_VIEW = "item_popularity"
"""The declared view (per item, event counts by type) behind the popular-items list and the
ranker's item features."""
POPULARITY_WINDOW = timedelta(days=7)
POPULARITY_WEIGHTS: dict[str, float] = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
"""Weight of each event type's 7-day count in an item's popularity (purchase > cart > click > view)."""


@dataclass
class FeatureRunSummary:
    users: int
    """Users whose feature-service row was written to the online store by this run."""
    items: int
    """Items with a popularity row at ``as_of`` (scored for the popular-items list)."""
    as_of: pd.Timestamp
    offline_versions: dict[str, int]
    """Lance version of each offline table (``<view>__<version>``) after this run."""
    online_rows: int
    duration_s: float
    events_quarantined: int = 0
    """Events of the event log this run could not use: moved to ``<root>/eventlog/quarantine``."""
    quarantine_reasons: dict[str, int] | None = None
    """Reason -> events, for those quarantined by this run."""


def utc(ts) -> pd.Timestamp:
    """A timezone-aware UTC timestamp; naive values (as Ray's aggregates return) are UTC."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _to_us(ts: pd.Timestamp) -> int:
    return int(utc(ts).value) // 1000  # Timestamp.value is always nanoseconds


# ---- which definitions --------------------------------------------------------------------------
def served_service(settings: Settings) -> FeatureService:
    """The feature service the recommender reads (``settings.feature_service`` of
    ``settings.features_module``)."""
    from aiplatform.features.apply import load_definitions

    _, services, _ = load_definitions(settings.features_module)
    for service in services:
        if service.name == settings.feature_service:
            return service
    raise ConfigError(f"feature service {settings.feature_service!r} is not declared in "
                      f"{settings.features_module} (SERVICES: {[s.name for s in services]}); "
                      "set AIPLATFORM_FEATURE_SERVICE to one of them")


def popularity_view(settings: Settings) -> FeatureView:
    """The ``item_popularity`` view of ``settings.features_module`` (``ConfigError`` when the
    module declares none, or one that the popularity score cannot read)."""
    from aiplatform.features.apply import load_definitions

    views, _, _ = load_definitions(settings.features_module)
    for view in views:
        if view.name == POPULARITY_VIEW:
            popularity_weights(view)  # fails now, naming what is missing
            return view
    raise ConfigError(f"{settings.features_module} declares no view {POPULARITY_VIEW!r} in VIEWS: the popular-items "
                      "fallback and the ranker's item features are read from it. Declare one (per item, event "
                      "counts over 7 days by event type, as in apps/shop/features.py)")


def popularity_weights(view: FeatureView) -> dict[str, float]:
    """Feature -> weight of the view's 7-day ``count`` aggregations filtered on one event type."""
    out: dict[str, float] = {}
    for agg in view.aggregations:
        where = dict(agg.where)
        types = where.get("event_type", ())
        if (agg.function == "count" and agg.window == POPULARITY_WINDOW and len(where) == 1
                and len(types) == 1 and types[0] in POPULARITY_WEIGHTS):
            out[agg.name] = POPULARITY_WEIGHTS[types[0]]
    if not out:
        raise ConfigError(f"view {view.name!r} has no count over 7 days filtered on one event type "
                          f"(e.g. Aggregation('count', timedelta(days=7), where={{'event_type': 'purchase'}})); "
                          "the popularity score weighs those counts")
    return out


# ---- the offline store: the one write -----------------------------------------------------------
def _lake_replaced_since(layout: Layout, view, state: dict | None) -> bool:
    """True when the view's source table was re-imported after the view's last run: an import
    replaces the data wholesale, so an incremental run (new events only) would be wrong.

    The lake's pointer names the generation readers see; the view's state names the one its
    last run read (no clocks compared). States written before generations were recorded
    compare the pointer's ``imported_at`` with the run's time instead."""
    if state is None or not state.get("updated_at"):
        return True
    generation = lake.table_generation(layout, view.source.table)
    if generation is None:  # a lake without a pointer (written before generations): its folder's time
        changed = storage.mtime(layout.lake_table(view.source.table))
        return changed is not None and changed > pd.Timestamp(state["updated_at"]).timestamp()
    if state.get("lake_generation"):
        return state["lake_generation"] != generation
    imported = lake.imported_at(layout)
    return imported is not None and imported > pd.Timestamp(state["updated_at"])


def update_offline(layout: Layout, views: "FeatureService | Iterable[FeatureView]", *, full: bool = False) -> list:
    """Bring the offline tables of ``views`` (or of a service's views) up to date: incremental
    unless the lake was re-imported since, or ``full``; returns the runs' summaries. The only
    function of this module that writes to the offline store."""
    from aiplatform.features.offline import read_state, run_view

    views = views.views if isinstance(views, FeatureService) else list(dict.fromkeys(views))
    return [run_view(layout, v, full=full or _lake_replaced_since(layout, v, read_state(layout, v)))
            for v in views]


def run_service_pipeline(layout: Layout, settings: Settings, *, full: bool = False,
                         store: OnlineStore | None = None) -> int:
    """Bring the served service's views up to date (Ray Data -> Lance) and materialize them
    into ``store`` (default: the configured online store); returns the entities written online."""
    from aiplatform.features.server import open_store

    service = served_service(settings)
    store = store if store is not None else open_store(settings, layout)  # a bad setting fails first
    runs = update_offline(layout, service, full=full)
    return _materialize(layout, service, store, full or any(r.mode == "full" for r in runs))


def _materialize(layout: Layout, service: FeatureService, store: OnlineStore, full: bool) -> int:
    from aiplatform.features.materialize import materialize

    return materialize(layout, service, store, full=full).entities_written


# ---- item rows: the popular-items list and the ranker's item features ------------------------
def latest_item_rows(layout: Layout, view: FeatureView, as_of: pd.Timestamp,
                     features: list[str] | None = None) -> pd.DataFrame:
    """Per entity of ``view``, its latest offline row at ``as_of`` (``event_timestamp <= as_of``
    and no older than the view's ttl: what a point-in-time lookup at ``as_of`` returns), as
    key + ``features`` (default: all of the view's). A read: nothing is written."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from aiplatform.features.materialize import latest_per_entity
    from aiplatform.features.offline import read_view
    from aiplatform.features.partition import TIMESTAMP_COLUMN

    features = list(view.features if features is None else features)
    key = view.entity.join_key
    as_of_us = _to_us(as_of)
    ts = pa.timestamp("us", tz="UTC")
    flt = pc.field(TIMESTAMP_COLUMN) <= pa.scalar(as_of_us, ts)
    if view.ttl is not None:
        flt = flt & (pc.field(TIMESTAMP_COLUMN) >= pa.scalar(as_of_us - int(view.ttl.total_seconds() * 1e6), ts))
    table = read_view(layout, view).to_table(columns=[key, TIMESTAMP_COLUMN, *features], filter=flt)
    out = latest_per_entity(table, key).to_pandas()
    return out.sort_values(key, kind="stable").reset_index(drop=True)


def popular_items(layout: Layout, view: FeatureView, as_of: pd.Timestamp) -> pd.DataFrame:
    """(item key, score) best first: each item's latest popularity row at ``as_of``, scored by
    its weighted 7-day counts (``popularity_weights``); ties by id."""
    weights = popularity_weights(view)
    key = view.entity.join_key
    rows = latest_item_rows(layout, view, as_of, list(weights))
    score = np.zeros(len(rows))
    for name, w in weights.items():
        score += w * rows[name].fillna(0).to_numpy(dtype=np.float64)
    out = pd.DataFrame({key: rows[key].astype(str), "score": score})
    return out.sort_values(["score", key], ascending=[False, True], kind="stable").reset_index(drop=True)


def materialize_popular_items(layout: Layout, store: OnlineStore, view: FeatureView,
                              as_of: pd.Timestamp) -> int:
    """Write the ``POPULAR_ITEMS_KEPT`` most popular items at ``as_of`` to ``store`` (the
    configured online store; one atomic replace); returns how many items had a row."""
    scores = popular_items(layout, view, as_of)
    top = scores.head(POPULAR_ITEMS_KEPT)
    store.write_popular_items(zip(top[view.entity.join_key], top["score"]))
    store.set_meta("as_of", str(utc(as_of)))
    return len(scores)


# ---- training frames: reads only ----------------------------------------------------------------
def _service_dtypes(service: FeatureService) -> dict[str, str]:
    out = dict(service.stored_dtypes)
    for odfv in service.on_demand:
        out.update(odfv.dtypes)
    return out


def _fill_missing(batch, *, numbers: list[str], lists: list[str]):
    """Labels without a feature row at their time (status missing/expired): zeros and empty
    lists, exactly what serving sends the model for a user with no recent activity."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in numbers:
        i = batch.schema.get_field_index(name)
        col = batch.column(name)
        batch = batch.set_column(i, name, pc.fill_null(col, pa.scalar(0, col.type) if not pa.types.is_boolean(col.type)
                                                      else pa.scalar(False)))
    for name in lists:
        i = batch.schema.get_field_index(name)
        col = batch.column(name)
        empty = pa.scalar([], col.type)
        batch = batch.set_column(i, name, pc.if_else(pc.is_null(col), empty, col))
    return batch


def _fill_kwargs(service: FeatureService) -> dict[str, list[str]]:
    dtypes = _service_dtypes(service)
    return {"numbers": [n for n, t in dtypes.items() if t in ("int64", "float64", "bool")],
            "lists": [n for n, t in dtypes.items() if t.startswith("list")]}


def service_frame(layout: Layout, service: FeatureService, labels) -> "ray.data.Dataset":
    """``labels`` (the entity key, ``event_timestamp``, anything else) joined point-in-time with
    ``service`` (``features.pit.get_training_frame``): each row gets the entity's feature row as
    of its timestamp, exactly as serving would have read it then; missing rows are zeros and
    empty lists. A pure read of the offline tables: run ``update_offline`` first when they
    may be behind (this never writes)."""
    from aiplatform.features.pit import get_training_frame

    frame = get_training_frame(labels, service, layout, label_ts="event_timestamp")
    return frame.map_batches(_fill_missing, fn_kwargs=_fill_kwargs(service), batch_format="pyarrow",
                             batch_size=None)


def frame_from_events(service: FeatureService, events: pd.DataFrame, labels: pd.DataFrame,
                      *, label_ts: str = "event_timestamp") -> pd.DataFrame:
    """``service_frame`` computed in memory from ``events`` (the source of every view the
    service reads): the same engine (``engine.compute_view_rows``), the same as-of join
    (``pit.asof_join``) and the same on-demand fns, without the offline store or Ray. For data
    that fits in memory: tests, benchmarks, notebooks."""
    import pyarrow as pa

    from aiplatform.features.engine import compute_view_rows
    from aiplatform.features.pit import _on_demand, _ttl_us, asof_join

    key = service.entity.join_key
    wanted = {v: list(service.selected(v)) for v in service.views}
    extra: list[str] = []
    for odfv in service.on_demand:
        for v in odfv.inputs:
            for f in v.features:
                if f not in wanted.setdefault(v, []):
                    wanted[v].append(f)
                    extra.append(f)
    table = pa.Table.from_pandas(labels.reset_index(drop=True), preserve_index=False)
    for view, names in wanted.items():
        if view.source.table != "events":
            raise ConfigError(f"frame_from_events: view {view.name!r} reads {view.source.table!r}, not events; "
                              "use service_frame on the offline store")
        rows = compute_view_rows(view, events)
        if view.entity.join_key != key:
            rows = rows.rename_columns([key if c == view.entity.join_key else c for c in rows.column_names])
        table = asof_join(table, rows, key=key, label_ts=label_ts, ttl_us=_ttl_us(view), feature_columns=names,
                          prefix_status=view.name)
    if service.on_demand:
        table = _on_demand(table, odfvs=service.on_demand, drop=extra)
    return _fill_missing(table, **_fill_kwargs(service)).to_pandas()


def training_labels(events: pd.DataFrame, end: pd.Timestamp, target_types: tuple[str, ...]) -> pd.DataFrame:
    """One label per target event before ``end``: (user, item, type, time) and the lookup time
    ``event_timestamp`` one microsecond earlier, so the features exclude the event itself.
    An event on the item the same user touched just before is skipped: the model should learn
    what comes next, not to repeat the item on screen."""
    ev = events.sort_values(["user_id", "timestamp"], kind="stable").reset_index(drop=True)
    users = ev["user_id"].to_numpy(dtype=object)
    items = ev["item_id"].to_numpy(dtype=object)
    same_prev = np.zeros(len(ev), bool)
    same_prev[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1])
    ts = pd.to_datetime(ev["timestamp"], utc=True)
    sel = (ts < utc(end)).to_numpy() & ev["event_type"].isin(target_types).to_numpy() & ~same_prev
    out = ev.loc[sel, ["user_id", "item_id", "event_type", "timestamp"]].reset_index(drop=True)
    out["event_timestamp"] = pd.to_datetime(out["timestamp"], utc=True) - pd.Timedelta(microseconds=1)
    return out


# ---- the feature job ----------------------------------------------------------------------------
def run_feature_pipeline(layout: Layout, as_of: pd.Timestamp | None = None,
                         settings: Settings | None = None) -> FeatureRunSummary:
    """Bring the served feature service's views and the popularity view up to date, materialize
    the service (what serving reads through ``get_online_features``), then write the
    popular-items list at ``as_of`` (default: just after the last event), all into the
    configured online store (``settings.online_store``)."""
    from aiplatform.features.offline import read_state
    from aiplatform.features.server import open_store

    from aiplatform.data import eventlog_compact

    started = time.perf_counter()
    settings = settings or Settings.load()
    store = open_store(settings, layout)  # before any work: an unusable store setting fails at once
    service = served_service(settings)
    popularity = popularity_view(settings)
    storage.make_dirs(layout.features)
    # The event log first: its small files merged, and events this run could not encode (rules
    # stricter than when they were written, an unreadable file) quarantined and counted, so one
    # bad event never stops the run for everyone. The lease is held while Ray Data reads the log.
    with eventlog_compact.exclusive(layout, store):
        log_run = eventlog_compact.compact(layout, all_leaves=True, check_all=True)
        if log_run.quarantined or log_run.reasons:
            log.warning("feature run: %d event(s) quarantined to %s: %s", log_run.quarantined,
                        eventlog.quarantine_dir(layout), log_run.reasons)
        runs = dict(zip([*service.views, popularity], update_offline(layout, [*service.views, popularity])))
    users = _materialize(layout, service, store, any(runs[v].mode == "full" for v in service.views))
    if as_of is None:
        watermark = runs[popularity].watermark_after
        as_of = (pd.Timestamp(watermark, unit="us", tz="UTC") + pd.Timedelta(microseconds=1)
                 if watermark is not None else pd.Timestamp.now(tz="UTC"))
    items = materialize_popular_items(layout, store, popularity, utc(as_of))
    versions = {v.table_name: int((read_state(layout, v) or {}).get("lance_version") or 0) for v in runs}
    return FeatureRunSummary(users=users, items=items, as_of=utc(as_of), offline_versions=versions,
                             online_rows=users, duration_s=time.perf_counter() - started,
                             events_quarantined=log_run.quarantined, quarantine_reasons=dict(log_run.reasons))


__all__ = ["FeatureRunSummary", "POPULARITY_VIEW", "frame_from_events", "latest_item_rows", "materialize_popular_items",
           "popular_items", "popularity_view", "popularity_weights", "run_feature_pipeline", "run_service_pipeline",
           "served_service", "service_frame", "training_labels", "update_offline"]
