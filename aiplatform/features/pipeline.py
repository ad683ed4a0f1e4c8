"""Batch feature pipeline on Ray Data: lake events -> offline store (Lance) -> online store.

User features come from the declared views of the served feature service
(``apps/shop/features.py``): ``run_service_pipeline`` brings their offline tables up to date
and materializes them, and serving reads them back through ``get_online_features``. The one
thing left to this module's own code is the catalogue-wide popular-items list (the fallback
for users without history), computed from the item counts at ``as_of`` and written to the
configured online store (SQLite or Redis), where serving reads it.
"""

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from aiplatform.core import storage
from aiplatform.core.errors import ConfigError, NotFoundError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout, storage_options
from aiplatform.data import lake
from aiplatform.features import compute
from aiplatform.features.online import OnlineStore

if TYPE_CHECKING:  # Ray is imported where it runs, so importing this module stays cheap
    import ray.data

    from aiplatform.features.definitions import FeatureService

POPULAR_ITEMS_KEPT = 200
ITEM_VIEW = "popular_items"
"""Lance table of the item counts behind the popular-items list (one version per run)."""


@dataclass
class FeatureRunSummary:
    users: int
    """Users whose feature-service row was written to the online store by this run."""
    items: int
    as_of: pd.Timestamp
    offline_versions: dict[str, int]
    """Lance version per offline table written by this run."""
    online_rows: int
    duration_s: float


def read_events(layout: Layout) -> "ray.data.Dataset":
    """The lake's events (the current import) as a Ray Dataset."""
    import ray.data

    fs, paths = lake.on_filesystem(lake.table_files(layout, "events"))
    if not paths:
        raise NotFoundError(f"no events in the lake at {layout.lake}: import data with `aiplatform data import`")
    return ray.data.read_parquet(paths, filesystem=fs)


def utc(ts) -> pd.Timestamp:
    """A timezone-aware UTC timestamp; naive values (as Ray's aggregates return) are UTC."""
    ts = pd.Timestamp(ts)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _to_us(ts: pd.Timestamp) -> int:
    return int(utc(ts).value) // 1000  # Timestamp.value is always nanoseconds


def _buckets(events: "ray.data.Dataset") -> int:
    """How many entity buckets to group into: about one per 250k events, at least 2 so both
    cores work, at most 4 per CPU. Few large groups keep the per-call overhead of Ray Data
    negligible; the functions in ``compute`` are vectorised over a whole bucket."""
    import ray

    rows = events.count()
    cpus = int(ray.cluster_resources().get("CPU", 2))
    return max(2, min(cpus * 4, rows // 250_000 + 1))


def _with_bucket(batch: pd.DataFrame, key: str, buckets: int) -> pd.DataFrame:
    # A stable hash (same on every node and run), so an entity's rows all land in one bucket.
    batch["_bucket"] = (pd.util.hash_array(batch[key].to_numpy(dtype=object)) % buckets).astype(np.int64)
    return batch


def _group_by_entity(events: "ray.data.Dataset", key: str, fn, **kwargs) -> "ray.data.Dataset":
    """Apply ``fn(frame_of_whole_entities, **kwargs)`` to hash buckets of ``key``: every entity's
    events are in exactly one call, so point-in-time features see the whole history."""
    buckets = _buckets(events)
    return (
        events.map_batches(_with_bucket, fn_kwargs={"key": key, "buckets": buckets}, batch_format="pandas")
        .groupby("_bucket", num_partitions=buckets)
        .map_groups(_drop_bucket_then(fn), fn_kwargs=kwargs, batch_format="pandas")
    )


def _drop_bucket_then(fn):
    def call(frame: pd.DataFrame, **kwargs) -> pd.DataFrame:
        return fn(frame.drop(columns="_bucket"), **kwargs)

    call.__name__ = getattr(fn, "__name__", "features")
    return call


def _item_rows(events: pd.DataFrame, as_of_us: int) -> pd.DataFrame:
    out = compute.item_counts_at(events, pd.Timestamp(as_of_us, unit="us", tz="UTC"))
    out["as_of"] = pd.Timestamp(as_of_us, unit="us", tz="UTC")
    return out


def build_training_examples(events: "ray.data.Dataset", start: pd.Timestamp, end: pd.Timestamp,
                            target_types: tuple[str, ...]) -> "ray.data.Dataset":
    """One example per target event in [start, end), with the user's features just before it.

    Every event before ``end`` is visible as history, none after: no leakage from the
    validation period into training.
    """
    return _group_by_entity(events, "user_id", compute.training_examples,
                            start_us=_to_us(start), end_us=_to_us(end), target_types=tuple(target_types))


def _write_lance(ds: "ray.data.Dataset", path: str) -> int:
    """Write a new version of the Lance table at ``path`` in one commit (old versions stay
    readable). Blocks stream from the cluster through a RecordBatchReader, so memory stays
    bounded. (Ray's own ``write_lance`` does not work with pylance 14 in Ray 2.60.)"""
    import lance
    import pyarrow as pa

    schema = ds.schema().base_schema
    batches = (
        pa.Table.from_pandas(b, preserve_index=False).cast(schema).to_batches()
        for b in ds.iter_batches(batch_format="pandas", batch_size=50_000)
    )
    reader = pa.RecordBatchReader.from_batches(schema, (rb for bs in batches for rb in bs))
    mode = "overwrite" if storage.exists(path) else "create"
    return lance.write_dataset(reader, path, mode=mode, storage_options=storage_options(path)).version


def materialize_popular_items(layout: Layout, store: OnlineStore) -> int:
    """Write the top items of the latest popularity table to ``store`` (the configured online
    store, ``server.open_store``; one atomic replace); returns how many were written."""
    import lance

    path = layout.feature_table(ITEM_VIEW)
    items = lance.dataset(path, storage_options=storage_options(path)).to_table().to_pandas()
    popular = compute.popularity_scores(items).head(POPULAR_ITEMS_KEPT)
    store.write_popular_items(zip(popular["item_id"], popular["score"]))
    store.set_meta("as_of", str(items["as_of"].iloc[0]) if len(items) else "")
    return len(popular)


def served_service(settings: Settings) -> "FeatureService":
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


def update_offline(layout: Layout, service: "FeatureService", *, full: bool = False) -> list:
    """Bring the service's views' offline tables up to date (incremental unless the lake was
    re-imported since, or ``full``); returns the runs' summaries."""
    from aiplatform.features.offline import read_state, run_view

    return [run_view(layout, v, full=full or _lake_replaced_since(layout, v, read_state(layout, v)))
            for v in service.views]


def run_service_pipeline(layout: Layout, settings: Settings, *, full: bool = False,
                         store: OnlineStore | None = None) -> int:
    """Bring the served service's views up to date (Ray Data -> Lance) and materialize them
    into ``store`` (default: the configured online store); returns the entities written online."""
    from aiplatform.features.materialize import materialize as materialize_service
    from aiplatform.features.server import open_store

    service = served_service(settings)
    store = store if store is not None else open_store(settings, layout)  # a bad setting fails first
    runs = update_offline(layout, service, full=full)
    return materialize_service(layout, service, store, full=full or any(r.mode == "full" for r in runs)
                               ).entities_written


def _fill_missing(batch, *, counts: list[str], lists: list[str]):
    """Users without a feature row at the label time (status missing/expired): zero counts and
    empty lists, exactly what serving sends the model for a user with no recent activity."""
    import pyarrow as pa
    import pyarrow.compute as pc

    for name in counts:
        i = batch.schema.get_field_index(name)
        batch = batch.set_column(i, name, pc.fill_null(batch.column(name), 0))
    for name in lists:
        i = batch.schema.get_field_index(name)
        col = batch.column(name)
        empty = pa.scalar([], col.type)
        batch = batch.set_column(i, name, pc.if_else(pc.is_null(col), empty, col))
    return batch


def service_frame(layout: Layout, settings: Settings, labels: pd.DataFrame) -> "ray.data.Dataset":
    """``labels`` (user_id, ``event_timestamp``, anything else) joined point-in-time with the
    served feature service (``features.pit.get_training_frame``): each row gets the user's
    feature row as of its timestamp, exactly as serving would have read it then."""
    from aiplatform.features.definitions import COUNT_COLUMNS
    from aiplatform.features.pit import get_training_frame

    service = served_service(settings)
    update_offline(layout, service)
    frame = get_training_frame(labels, service, layout, label_ts="event_timestamp")
    lists = [n for n, t in service.stored_dtypes.items() if t.startswith("list")]
    counts = [c for c in COUNT_COLUMNS if c in service.stored_dtypes]
    return frame.map_batches(_fill_missing, fn_kwargs={"counts": counts, "lists": lists},
                             batch_format="pyarrow", batch_size=None)


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


def run_feature_pipeline(layout: Layout, as_of: pd.Timestamp | None = None,
                         settings: Settings | None = None) -> FeatureRunSummary:
    """Bring the served feature service's views up to date and materialize them (what serving
    reads through ``get_online_features``), then the popular-items list at ``as_of``
    (default: just after the last event), all into the configured online store
    (``settings.online_store``)."""
    from aiplatform.features.server import open_store

    started = time.perf_counter()
    settings = settings or Settings.load()
    store = open_store(settings, layout)  # before any work: an unusable store setting fails at once
    events = read_events(layout).materialize()
    if as_of is None:
        as_of = utc(events.max("timestamp")) + pd.Timedelta(microseconds=1)
    storage.make_dirs(layout.features)
    users = run_service_pipeline(layout, settings, store=store)
    items = _group_by_entity(events, "item_id", _item_rows, as_of_us=_to_us(as_of)).materialize()
    versions = {ITEM_VIEW: _write_lance(items, layout.feature_table(ITEM_VIEW))}
    materialize_popular_items(layout, store)
    return FeatureRunSummary(users=users, items=items.count(), as_of=utc(as_of), offline_versions=versions,
                             online_rows=users, duration_s=time.perf_counter() - started)


__all__ = ["FeatureRunSummary", "build_training_examples", "materialize_popular_items", "read_events",
           "run_feature_pipeline", "run_service_pipeline", "served_service", "service_frame",
           "training_labels", "update_offline"]
