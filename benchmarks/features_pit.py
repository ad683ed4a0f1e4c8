"""Point-in-time join: aiplatform (Ray Data + Lance, bucketed) vs DuckDB ASOF JOIN vs pandas merge_asof.

Same data for every contender, generated once (numpy, seeded): ``--rows`` feature rows of
``--entities`` entities over a year with ``--features`` float64 features, and ``--labels`` label
rows (entity, time) over the same year plus a month, so some labels find nothing (missing) and
some only rows older than the ttl (expired). The feature table is written in our offline layout
(Lance, ``_bucket`` column) for us and kept as Arrow / pandas in memory for the peers.

Timed: the join alone, result materialized (ours: ``point_in_time_join(...).materialize()``,
Ray startup and the Lance write excluded; DuckDB: ``fetch_arrow_table``; pandas: stable sort of
both sides + ``merge_asof(by=, tolerance=)``). Memory: peak RSS above the level just before the
run, sampled every 50 ms by a psutil thread over the whole process tree (Ray's raylet and workers
are children of this process; shared object-store pages are counted in each process that maps
them, so ours is an upper bound). Exactness: per label, the matched row's time when it is within
the ttl (else null) and the first feature must equal pandas' on every row.

    python benchmarks/features_pit.py                         # 1M labels x 10M rows (several GB)
    python benchmarks/features_pit.py --labels 100_000 --rows 1_000_000 --entities 10_000
    python benchmarks/features_pit.py --scaling 1M:10M,3M:10M,1M:30M   # memory as the data grows

Scaling mode: one Lance table grown by chunked appends between points (the generator holds one
chunk), ours and DuckDB (scanning that same Lance table, under ``--duckdb-memory``) per point;
exactness is ours == DuckDB and ours == pandas ``merge_asof`` on every label of 3 buckets.
"""

import argparse
import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, print_table, save  # noqa: E402

DAY_US = 86_400_000_000
T0_US = pd.Timestamp("2025-01-01", tz="UTC").value // 1000
UTC_US = pa.timestamp("us", tz="UTC")


# ---- memory sampling ----------------------------------------------------------------------------
def tree_rss() -> int:
    me = psutil.Process()
    total = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRSS:
    """Peak RSS of the process tree above the level at entry, sampled by a thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = tree_rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            self._stop.wait(self.interval)

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss())

    @property
    def delta_gb(self) -> float:
        return (self.peak - self.base) / 2**30


# ---- data ---------------------------------------------------------------------------------------
def make_data(n_labels: int, n_rows: int, n_entities: int, n_features: int, seed: int = 0
              ) -> tuple[pa.Table, pa.Table]:
    from aiplatform.features.partition import BUCKET_COLUMN, TIMESTAMP_COLUMN, entity_bucket

    rng = np.random.default_rng(seed)
    names = np.array([f"e{i:08d}" for i in range(n_entities)], dtype=object)
    # entities have skewed activity; the last 1% never appear in the feature table
    active = max(1, n_entities - n_entities // 100)
    codes = np.minimum((rng.pareto(1.5, n_rows) * active / 20).astype(np.int64), active - 1)
    keys = names[codes]
    features = {"entity_id": pa.array(keys, pa.string()),
                TIMESTAMP_COLUMN: pa.array(T0_US + rng.integers(0, 365 * DAY_US, n_rows)).cast(UTC_US),
                BUCKET_COLUMN: pa.array(entity_bucket(names)[codes], pa.int32())}
    for i in range(n_features):
        features[f"f{i}"] = pa.array(rng.standard_normal(n_rows))
    labels = pa.table({"label_id": pa.array(np.arange(n_labels)),
                       "entity_id": pa.array(names[rng.integers(0, n_entities, n_labels)], pa.string()),
                       TIMESTAMP_COLUMN: pa.array(T0_US + rng.integers(0, 395 * DAY_US, n_labels)).cast(UTC_US),
                       "target": pa.array(rng.integers(0, 2, n_labels))})
    return labels, pa.table(features)


def write_offline(table: pa.Table, path: str, index: bool) -> None:
    """Our offline layout: one Lance table written in two appended versions, each version's rows
    clustered by ``_bucket`` and a scalar index on ``_bucket``, so one bucket's rows are a few
    contiguous ranges found without a scan (without both, a bucket read costs a full scan or a
    random take of every column)."""
    import lance

    half = table.num_rows // 2
    for i, part in enumerate((table.slice(0, half), table.slice(half))):
        part = part.take(np.argsort(part.column("_bucket").to_numpy(), kind="stable"))
        ds = lance.write_dataset(part, path, mode="append" if i else "create", max_rows_per_file=4_000_000)
    if index:
        ds.create_scalar_index("_bucket", "BTREE")


def read_back(path: str) -> pa.Table:
    import lance

    return lance.dataset(path).to_table().drop_columns(["_bucket"])


def view_for(n_features: int, ttl_days: int):
    from datetime import timedelta

    from aiplatform.features.definitions import BatchSource, Entity, FeatureView, Field

    return FeatureView("bench", Entity("entity", "entity_id"), BatchSource("events"),
                       fields=tuple(Field(f"f{i}", "float64") for i in range(n_features)),
                       ttl=timedelta(days=ttl_days))


# ---- contenders ---------------------------------------------------------------------------------
def run_ours(labels: pa.Table, layout, view) -> tuple[float, float, pa.Table]:
    import ray

    from aiplatform.features.pit import point_in_time_join

    blocks = [labels.slice(i, -(-labels.num_rows // 4)) for i in range(0, labels.num_rows, -(-labels.num_rows // 4))]
    point_in_time_join(ray.data.from_arrow(labels.slice(0, 1000)), layout, view).materialize()  # warm workers
    with PeakRSS() as mem:
        t = time.perf_counter()
        ds = point_in_time_join(ray.data.from_arrow(blocks), layout, view).materialize()
        rows = ds.count()
        seconds = time.perf_counter() - t
    out = pa.concat_tables([ray.get(r) for r in ds.to_arrow_refs()])
    ok = pc_equal(out.column(f"{view.name}__status"), "ok")
    result = pa.table({"label_id": out.column("label_id"),
                       "ts": _where(ok, out.column(f"{view.name}__event_timestamp")), "f0": out.column("f0")})
    assert rows == labels.num_rows
    return seconds, mem.delta_gb, result


def pc_equal(col, value):
    import pyarrow.compute as pc

    return pc.equal(col, value)


def _where(mask, col):
    import pyarrow.compute as pc

    return pc.if_else(mask, col, pa.scalar(None, col.type))


def run_duckdb(labels: pa.Table, features: pa.Table, ttl_us: int, n_features: int, threads: int
               ) -> tuple[float, float, pa.Table]:
    import duckdb

    con = duckdb.connect()
    con.execute(f"SET threads={threads}")
    con.register("labels", labels)
    con.register("features", features)
    return _timed_asof(con, ttl_us, n_features)


def _timed_asof(con, ttl_us: int, n_features: int) -> tuple[float, float, pa.Table]:
    """Run the ASOF JOIN of the registered ``labels`` and ``features`` on ``con`` (then close
    it): (seconds, peak memory GB, the columns compared with ours)."""
    ok = f"epoch_us(l.event_timestamp) - epoch_us(f.event_timestamp) <= {ttl_us}"
    cols = ", ".join(f"CASE WHEN {ok} THEN f.f{i} END AS f{i}" for i in range(n_features))
    sql = (f"SELECT l.*, {cols}, CASE WHEN {ok} THEN f.event_timestamp END AS ts "
           "FROM labels l ASOF LEFT JOIN features f "
           "ON l.entity_id = f.entity_id AND l.event_timestamp >= f.event_timestamp")
    with PeakRSS() as mem:
        t = time.perf_counter()
        out = con.sql(sql).to_arrow_table()
        seconds = time.perf_counter() - t
    result = out.select(["label_id", "ts", "f0"])
    del out
    con.close()
    return seconds, mem.delta_gb, result


def run_pandas(labels: pd.DataFrame, features: pd.DataFrame, ttl_us: int) -> tuple[float, float, pa.Table]:
    with PeakRSS() as mem:
        t = time.perf_counter()
        left = labels.sort_values("event_timestamp", kind="stable")
        right = features.sort_values("event_timestamp", kind="stable")
        right["ts"] = right["event_timestamp"]
        out = pd.merge_asof(left, right, on="event_timestamp", by="entity_id", direction="backward",
                            allow_exact_matches=True, tolerance=pd.Timedelta(np.timedelta64(ttl_us, "us")))
        seconds = time.perf_counter() - t
    result = pa.Table.from_pandas(out[["label_id", "ts", "f0"]], preserve_index=False)
    del left, right, out
    return seconds, mem.delta_gb, result


def same(a: pa.Table, b: pa.Table) -> bool:
    """Equal matched times (null = no valid match) and first feature, label by label."""
    a, b = (t.sort_by("label_id") for t in (a, b))
    if a.column("label_id") != b.column("label_id"):
        return False
    ta = a.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
    tb = b.column("ts").cast(pa.int64()).to_numpy(zero_copy_only=False)
    fa = a.column("f0").to_numpy(zero_copy_only=False)
    fb = b.column("f0").to_numpy(zero_copy_only=False)
    return bool(np.array_equal(ta, tb, equal_nan=True) and np.array_equal(fa, fb, equal_nan=True))


# ---- scaling mode: the same join as the data grows ------------------------------------------------
def parse_count(text: str) -> int:
    """``10M`` / ``500k`` / ``2_000_000`` -> int."""
    t = text.strip().lower().replace("_", "")
    mult = {"k": 1_000, "m": 1_000_000, "g": 1_000_000_000}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def parse_points(spec: str) -> list[tuple[int, int]]:
    """``1M:10M,3M:10M,1M:30M`` -> [(labels, feature rows), ...] sorted by rows then labels."""
    points = []
    for item in filter(None, (p.strip() for p in spec.split(","))):
        if ":" not in item:
            raise SystemExit(f"--scaling point {item!r}: write LABELS:ROWS, e.g. 1M:10M")
        lab, rows = item.split(":", 1)
        points.append((parse_count(lab), parse_count(rows)))
    return sorted(set(points), key=lambda p: (p[1], p[0]))


def append_features(path: str, start: int, stop: int, n_entities: int, n_features: int, *,
                    chunk: int = 2_000_000, seed: int = 0) -> None:
    """Grow the offline table from ``start`` to ``stop`` rows, ``chunk`` rows at a time (each
    chunk generated, clustered by ``_bucket`` and appended as its own Lance version), so the
    generator never holds more than one chunk; the ``_bucket`` index is rebuilt at the end.
    Rows ``[0, n)`` are the same whatever ``stop`` is, so a bigger point is a superset."""
    import lance

    from aiplatform.features.partition import BUCKET_COLUMN, TIMESTAMP_COLUMN, entity_bucket

    names = np.array([f"e{i:08d}" for i in range(n_entities)], dtype=object)
    bucket_of = entity_bucket(names)
    active = max(1, n_entities - n_entities // 100)  # the last 1% never appear in the feature table
    for lo in range(start, stop, chunk):
        n = min(chunk, stop - lo)
        rng = np.random.default_rng([seed, lo])
        codes = np.minimum((rng.pareto(1.5, n) * active / 20).astype(np.int64), active - 1)
        codes = codes[np.argsort(bucket_of[codes], kind="stable")]  # cluster by bucket (times are iid)
        cols = {"entity_id": pa.array(names[codes], pa.string()),
                TIMESTAMP_COLUMN: pa.array(T0_US + rng.integers(0, 365 * DAY_US, n)).cast(UTC_US),
                BUCKET_COLUMN: pa.array(bucket_of[codes], pa.int32())}
        for i in range(n_features):
            cols[f"f{i}"] = pa.array(rng.standard_normal(n))
        ds = lance.write_dataset(pa.table(cols), path, mode="append" if (lo or start) else "create",
                                 max_rows_per_file=4_000_000)
        del cols
    ds.create_scalar_index(BUCKET_COLUMN, "BTREE", replace=True)


def make_labels(n_labels: int, n_entities: int, seed: int = 0) -> pa.Table:
    from aiplatform.features.partition import TIMESTAMP_COLUMN

    rng = np.random.default_rng([seed, 1 << 40])
    names = np.array([f"e{i:08d}" for i in range(n_entities)], dtype=object)
    return pa.table({"label_id": pa.array(np.arange(n_labels)),
                     "entity_id": pa.array(names[rng.integers(0, n_entities, n_labels)], pa.string()),
                     TIMESTAMP_COLUMN: pa.array(T0_US + rng.integers(0, 395 * DAY_US, n_labels)).cast(UTC_US),
                     "target": pa.array(rng.integers(0, 2, n_labels))})


def run_duckdb_lance(labels: pa.Table, path: str, ttl_us: int, n_features: int, threads: int,
                     memory_limit: str, spill_dir: str) -> tuple[float, float, pa.Table]:
    """DuckDB's ASOF JOIN scanning the same Lance table (a pyarrow Dataset: projection pushed
    down) instead of an in-memory copy, so the scan is timed as ours is and its memory counted,
    under ``memory_limit`` (DuckDB spills past it where it can)."""
    import duckdb
    import lance

    con = duckdb.connect()
    con.execute(f"SET threads={threads}")
    con.execute(f"SET memory_limit='{memory_limit}'")
    con.execute(f"SET temp_directory='{spill_dir}'")
    con.register("labels", labels)
    con.register("features", lance.dataset(path))
    return _timed_asof(con, ttl_us, n_features)


def sampled_pandas_check(ours: pa.Table, labels: pa.Table, path: str, ttl_us: int, buckets: list[int]) -> bool:
    """Ours against pandas ``merge_asof`` on every label of a few buckets (the bucket's feature
    rows read in write order, so pandas breaks (key, time) ties as the offline store does)."""
    import lance
    import pyarrow.compute as pc

    from aiplatform.features.partition import entity_bucket

    lab_b = entity_bucket(labels.column("entity_id"))
    sub = labels.filter(pa.array(np.isin(lab_b, buckets)))
    cond = f"_bucket IN ({', '.join(map(str, buckets))})"
    rows = lance.dataset(path).to_table(columns=["entity_id", "event_timestamp", "f0"], filter=cond,
                                        with_row_address=True)
    rows = rows.take(np.argsort(rows.column("_rowaddr").to_numpy(), kind="stable")).drop_columns(["_rowaddr"])
    ref = run_pandas(sub.to_pandas(), rows.to_pandas(), ttl_us)[2]
    mine = ours.filter(pc.is_in(ours.column("label_id"), sub.column("label_id")))
    return mine.num_rows == sub.num_rows and same(mine, ref)


def start_ray(args: argparse.Namespace) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=args.cpus, object_store_memory=2 * 2**30, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray.data.from_items([1]).materialize()


def run_ours_point(args: argparse.Namespace, labels: pa.Table, layout, view, batch_rows: int, warm_layout
                   ) -> dict[str, Any]:
    """Ours on a fresh Ray, warmed by the same job on a tiny table (``warm_layout``): every worker
    is started and has imported Lance, but no worker heap has grown to this table's buckets yet
    (warming on the real table, or reusing workers of an earlier point, hides that growth)."""
    import ray

    from aiplatform.features.pit import point_in_time_join

    start_ray(args)
    step = -(-labels.num_rows // 4)
    blocks = [labels.slice(i, step) for i in range(0, labels.num_rows, step)]
    warm = [b.slice(0, 50_000) for b in blocks]  # same shape of job: starts every worker the join uses
    for _ in range(2):
        point_in_time_join(ray.data.from_arrow(warm), warm_layout, view, batch_rows=batch_rows).materialize()
    with PeakRSS() as mem:
        t = time.perf_counter()
        ds = point_in_time_join(ray.data.from_arrow(blocks), layout, view, batch_rows=batch_rows).materialize()
        seconds = time.perf_counter() - t
    out = pa.concat_tables([ray.get(r) for r in ds.to_arrow_refs()])
    ok = pc_equal(out.column(f"{view.name}__status"), "ok")
    result = pa.table({"label_id": out.column("label_id"),
                       "ts": _where(ok, out.column(f"{view.name}__event_timestamp")), "f0": out.column("f0")})
    del ds, out
    assert result.num_rows == labels.num_rows
    return {"seconds": seconds, "peak_memory_gb": mem.delta_gb, "tree_rss_peak_gb": mem.peak / 2**30,
            "result": result}


def scaling(args: argparse.Namespace) -> None:
    """Ours (and DuckDB, scanning the same Lance table) at each (labels, rows) point, the table
    grown by appending between points; pandas only as a sampled check on a few buckets."""
    import ray

    from aiplatform.core.storage import Layout

    points = parse_points(args.scaling)
    skip = set(filter(None, args.skip.split(",")))
    ttl_us = args.ttl_days * DAY_US
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
    workdir = tempfile.mkdtemp(prefix="features_pit_scaling_", dir=args.workdir)
    layout = Layout.at(workdir)
    view = view_for(args.features, args.ttl_days)
    path = layout.feature_table(view.table_name)
    from aiplatform.features.pit import BUCKET_BATCH_ROWS

    variants = {"ours": BUCKET_BATCH_ROWS}
    if args.whole_bucket:
        variants["ours, whole bucket at once"] = 2**62
    duck_max = parse_count(args.duckdb_max_rows)
    warm_layout = Layout.at(os.path.join(workdir, "warm"))
    append_features(warm_layout.feature_table(view.table_name), 0, 20_000, args.entities, args.features)
    table_rows, rows_out, payload = 0, [], []
    try:
        for n_labels, n_rows in points:
            if n_rows > table_rows:
                t = time.perf_counter()
                append_features(path, table_rows, n_rows, args.entities, args.features, chunk=args.chunk)
                print(f"feature table grown {table_rows:,} -> {n_rows:,} rows in {time.perf_counter() - t:.1f}s",
                      flush=True)
                table_rows = n_rows
            labels = make_labels(n_labels, args.entities)
            point: dict[str, Any] = {"labels": n_labels, "feature_rows": n_rows, "load_before": os.getloadavg()}
            res: dict[str, dict[str, Any]] = {}
            if "ours" not in skip:
                for name, batch_rows in variants.items():
                    res[name] = run_ours_point(args, labels, layout, view, batch_rows, warm_layout)
                ray.shutdown()
            if "duckdb" not in skip and n_rows <= duck_max:
                try:
                    seconds, gb, table = run_duckdb_lance(labels, path, ttl_us, args.features, args.cpus,
                                                          args.duckdb_memory, workdir)
                    res["DuckDB ASOF JOIN"] = {"seconds": seconds, "peak_memory_gb": gb, "result": table}
                except Exception as exc:  # out of memory under the limit: record it, keep going
                    point["duckdb_error"] = f"{type(exc).__name__}: {exc}"[:300]
            elif "duckdb" not in skip:
                point["duckdb_error"] = f"skipped: more than --duckdb-max-rows {args.duckdb_max_rows} rows"
            gc.collect()
            duck = res.get("DuckDB ASOF JOIN")
            for name, r in res.items():
                checks = {}
                if name != "DuckDB ASOF JOIN":
                    checks["equals_pandas_on_3_buckets"] = sampled_pandas_check(r["result"], labels, path,
                                                                                ttl_us, [0, 17, 42])
                    if duck is not None:
                        checks["equals_duckdb"] = same(r["result"], duck["result"])
                point[name] = {**{k: v for k, v in r.items() if k != "result"}, **checks,
                               "labels_per_s": n_labels / r["seconds"], "feature_rows_per_s": n_rows / r["seconds"]}
                p = point[name]
                exact = "reference" if not checks else \
                    " / ".join(f"{'yes' if v else 'NO'} ({k.replace('equals_', 'vs ').replace('_', ' ')})"
                               for k, v in checks.items())
                rows_out.append([name, f"{n_labels:,}", f"{n_rows:,}", f"{p['seconds']:.1f}",
                                 f"{p['peak_memory_gb']:.2f}", f"{p['labels_per_s'] / 1e3:,.0f}k",
                                 f"{p['feature_rows_per_s'] / 1e6:.2f}M", exact, f"{point['load_before'][0]:.1f}"])
            if "duckdb_error" in point:
                rows_out.append(["DuckDB ASOF JOIN", f"{n_labels:,}", f"{n_rows:,}", "-", "-", "-", "-",
                                 point["duckdb_error"][:70], f"{point['load_before'][0]:.1f}"])
            point["load_after"] = os.getloadavg()
            payload.append(point)
            print(f"point {n_labels:,} x {n_rows:,}: {point}", flush=True)
            del res, labels
            gc.collect()
    finally:
        if ray.is_initialized():
            ray.shutdown()
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    cols = ["contender", "labels", "feature rows", "seconds", "peak memory GB", "labels/s", "feature rows/s",
            "exact", "load (1 min)"]
    print(f"\nPoint-in-time join scaling, {args.features} features, {args.entities:,} entities, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
    for r in rows_out:
        print("| " + " | ".join(str(v) for v in r) + " |")
    body = {"params": vars(args), "points": payload}
    if args.out:
        from common import machine
        import json

        path_out = Path(args.out)
        path_out.write_text(json.dumps({"machine": machine(), **body}, indent=2, default=str))
    else:
        path_out = save("features_pit_scaling", body)
    print(f"saved {path_out}")
    checks = [v for p in payload for r in p.values() if isinstance(r, dict)
              for k, v in r.items() if k.startswith("equals_")]
    if not all(checks):
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, default=1_000_000)
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--entities", type=int, default=100_000)
    ap.add_argument("--features", type=int, default=30)
    ap.add_argument("--ttl-days", type=int, default=30)
    ap.add_argument("--cpus", type=int, default=os.cpu_count())
    ap.add_argument("--shuffle", default="sort_shuffle_pull_based",
                    help="Ray Data shuffle strategy for the label groupby ('' = Ray's default, hash_shuffle); "
                         "on one small machine the sort shuffle avoids the hash shuffle's aggregator actors")
    ap.add_argument("--no-index", action="store_true", help="no Lance scalar index on _bucket")
    ap.add_argument("--skip", default="", help="comma list of contenders to skip: ours,duckdb,pandas")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/features_pit[_scaling].json)")
    ap.add_argument("--scaling", default="",
                    help="scaling mode: comma list of LABELS:ROWS points, e.g. 1M:10M,3M:10M,1M:30M; the Lance "
                         "table grows by appending between points; pandas only as a sampled exactness check")
    ap.add_argument("--chunk", type=int, default=2_000_000, help="scaling mode: rows generated per append")
    ap.add_argument("--duckdb-memory", default="8GB", help="scaling mode: DuckDB memory_limit")
    ap.add_argument("--duckdb-max-rows", default="30M", help="scaling mode: skip DuckDB above this many rows")
    ap.add_argument("--whole-bucket", action="store_true",
                    help="scaling mode: also run ours reading each bucket whole (before bounded batches)")
    ap.add_argument("--workdir", default=None, help="where the Lance table goes (default: system temp)")
    args = ap.parse_args()
    if args.scaling:
        scaling(args)
        return
    args.out = args.out or str(RESULTS / "features_pit.json")
    skip = set(filter(None, args.skip.split(",")))
    ttl_us = args.ttl_days * DAY_US

    from aiplatform.core.storage import Layout

    t = time.perf_counter()
    labels, features = make_data(args.labels, args.rows, args.entities, args.features)
    gen_s = time.perf_counter() - t
    workdir = tempfile.mkdtemp(prefix="features_pit_")
    layout = Layout.at(workdir)
    view = view_for(args.features, args.ttl_days)
    t = time.perf_counter()
    write_offline(features, layout.feature_table(view.table_name), index=not args.no_index)
    write_s = time.perf_counter() - t
    print(f"data: {args.labels:,} labels x {args.rows:,} rows ({args.entities:,} entities, {args.features} "
          f"features); generated in {gen_s:.1f}s, Lance written in {write_s:.1f}s under {workdir}")

    # the peers get the same rows back from the Lance table; holding them only when needed
    # keeps the whole run within a few GB at full size
    del features
    gc.collect()
    results: dict[str, tuple[float, float, pa.Table]] = {}
    if "ours" not in skip:
        import ray

        ray.init(num_cpus=args.cpus, object_store_memory=2 * 2**30, include_dashboard=False,
                 log_to_driver=False)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        if args.shuffle:
            from ray.data.context import ShuffleStrategy

            ctx.shuffle_strategy = ShuffleStrategy(args.shuffle)
        ray.data.from_items([1]).materialize()  # warm the Ray Data executor (startup is not timed)
        results["aiplatform point_in_time_join (Ray Data + Lance)"] = run_ours(labels, layout, view)
        ray.shutdown()
    if "duckdb" not in skip:
        features = read_back(layout.feature_table(view.table_name))
        results["DuckDB ASOF JOIN"] = run_duckdb(labels, features, ttl_us, args.features, args.cpus)
        del features
        gc.collect()
    if "pandas" not in skip:
        lab_pd = labels.to_pandas()
        fea_pd = read_back(layout.feature_table(view.table_name)).to_pandas(self_destruct=True, split_blocks=True)
        results["pandas merge_asof"] = run_pandas(lab_pd, fea_pd, ttl_us)
        del lab_pd, fea_pd
        gc.collect()

    ref = results.get("pandas merge_asof", next(iter(results.values())))[2]
    rows, payload = [], []
    for name, (seconds, gb, table) in results.items():
        exact = same(table, ref)
        ok = int(table.column("ts").null_count)
        rows.append([name, seconds, gb, table.num_rows, "yes" if exact else "NO"])
        payload.append({"contender": name, "seconds": seconds, "peak_memory_gb": gb, "rows": table.num_rows,
                        "exact_vs_reference": exact, "labels_without_valid_match": ok})
    duck = results.get("DuckDB ASOF JOIN")
    ours = results.get("aiplatform point_in_time_join (Ray Data + Lance)")
    ratio = ours[0] / duck[0] if ours and duck else None
    title = (f"Point-in-time join, {args.labels:,} labels x {args.rows:,} feature rows, {args.features} features"
             + (f" — ours / DuckDB = {ratio:.2f}x (target <= 2x)" if ratio else ""))
    print_table(title, ["contender", "seconds", "peak memory GB", "rows", "exact vs pandas"], rows)
    print("| contender | seconds | peak memory GB | rows | exact vs pandas |\n| --- | ---: | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:,} | {r[4]} |")
    out = Path(args.out)
    name = out.stem
    path = save(name, {"params": vars(args), "generate_s": gen_s, "lance_write_s": write_s,
                       "ours_over_duckdb": ratio, "results": payload}) if out.parent == RESULTS else None
    if path is None:
        from common import machine
        import json

        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"machine": machine(), "params": vars(args), "results": payload,
                                   "ours_over_duckdb": ratio}, indent=2, default=str))
        path = out
    print(f"saved {path}")
    import shutil

    shutil.rmtree(workdir, ignore_errors=True)
    if not all(p["exact_vs_reference"] for p in payload):
        sys.exit(1)


if __name__ == "__main__":
    main()
