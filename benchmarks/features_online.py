"""Online feature reads vs the raw key-value floor, and materialization throughput.

One run, same data for every contender, for two row shapes of 30 features each:
``numeric`` (the issue's case: 15 int64 + 15 float64) and ``shop`` (13 int64, 13 float64,
2 strings and 2 ``list<string>`` of 0-20 item ids, like the recommender's history):

1. an offline Lance table per shape (default 1M rows over 100k entities, several appended
   versions, bucketed as the offline store writes it);
2. ``materialize(..., full=True)`` into SQLite and into Redis (a redis-server started here on
   127.0.0.1, stopped by its pid): offline rows read per second, entities written per second;
3. reads of 1 and 100 random entities (a few thousand timed calls each, ``perf_counter_ns``):
   ``get_online_features`` (typed columns decoded) vs the raw floor on the same stored values:
   one SQLite ``SELECT k, v ... WHERE k IN (...)`` with a cached statement (no decoding) on a
   plain ``sqlite3.connect`` (the issue's floor), and one redis-py ``MGET`` of prebuilt keys.
   The store memory-maps its SQLite file, so the same floor on a connection with the store's
   pragmas is timed too ("mmap floor"): the store's own decode overhead is store - mmap floor.
   Each timed floor call is interleaved with the store call on the same ids, so all see the
   same machine load. The calling thread's CPU time is reported too: on a shared, loaded
   machine wall-clock p99 measures the scheduler, not us (for Redis, CPU time leaves out the
   server's work, so only the wall clock compares).

The absolute p99 targets of the issue apply to the numeric shape; the 3x-of-floor target to both.

Usage: python benchmarks/features_online.py [--shape numeric|shop|both] [--entities 100000]
       [--offline-rows 1000000] [--calls 10000] [--out benchmarks/results/features_online.json]
"""

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import machine, print_table  # noqa: E402

TARGETS_P99_MS = {("sqlite", 1): 0.07, ("sqlite", 100): 1.1, ("redis", 1): 0.4, ("redis", 100): 1.3}
MAX_RATIO = 3.0


SHAPES = {"numeric": "15 int64 + 15 float64",
          "shop": "13 int64 + 13 float64 + 2 string + 2 list<string> (0-20 ids)"}


def build_service(shape: str):
    from aiplatform.features.definitions import BatchSource, Entity, FeatureService, FeatureView, Field

    if shape == "numeric":
        fields = [Field(f"n{i}", "int64") for i in range(15)] + [Field(f"x{i}", "float64") for i in range(15)]
    else:
        fields = ([Field(f"n{i}", "int64") for i in range(13)] + [Field(f"x{i}", "float64") for i in range(13)]
                  + [Field("city", "string"), Field("segment", "string"),
                     Field("last_items", "list<string>"), Field("purchased_items", "list<string>")])
    view = FeatureView(f"bench_{shape}", Entity("user", "user_id"), BatchSource("users"), fields=tuple(fields))
    return view, FeatureService(f"bench_{shape}_service", (view,))


def write_offline(layout, view, entities: int, rows: int, seed: int = 0, chunk: int = 200_000) -> float:
    """Append ``rows`` random feature rows (in chunks: several Lance versions) and return seconds."""
    import lance
    import pyarrow as pa

    from aiplatform.features.partition import entity_bucket

    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    names = np.array([f"u{i}" for i in range(entities)], dtype=object)
    buckets = entity_bucket(names)
    pool = pa.array([[f"item{rng.integers(50_000)}" for _ in range(rng.integers(0, 21))] for _ in range(2000)],
                    pa.list_(pa.string()))
    cities = pa.array([f"city-{i}" for i in range(500)])
    path = layout.feature_table(view.table_name)
    written = 0
    while written < rows:
        n = min(chunk, rows - written)
        who = rng.integers(0, entities, n) if written else np.arange(n) % entities  # every entity once
        data: dict[str, Any] = {
            "user_id": pa.array(names[who], pa.string()),
            "event_timestamp": pa.array(rng.integers(1_700_000_000_000_000, 1_800_000_000_000_000, n)).cast(
                pa.timestamp("us", tz="UTC")),
            "_bucket": pa.array(buckets[who], pa.int32())}
        for f in view.fields:
            if f.dtype == "int64":
                data[f.name] = pa.array(rng.integers(0, 1000, n))
            elif f.dtype == "float64":
                data[f.name] = pa.array(rng.random(n))
            elif f.dtype == "string":
                data[f.name] = cities.take(pa.array(rng.integers(0, len(cities) if f.name == "city" else 10, n)))
            else:
                data[f.name] = pool.take(pa.array(rng.integers(0, len(pool), n)))
        lance.write_dataset(pa.table(data), path, mode="append" if written else "create")
        written += n
    return time.perf_counter() - t0


def _pct(ns: list[int]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.asarray(ns) / 1e6, [50, 99])
    return float(p50), float(p99)


def time_reads(read, floors: dict[str, Any], id_lists: list[list[str]], warmup: int = 200) -> dict[str, float]:
    """Wall-clock p50/p99 of ``read`` and of each floor on the same ids, interleaved; plus the p50
    of the calling thread's CPU time, which a loaded (shared) machine distorts far less. The
    first floor is "the" floor (ratios); the others are reported as ``<name>_p50_ms``/``_p99_ms``."""
    for ids in id_lists[:warmup]:
        read(ids)
        for floor in floors.values():
            floor(ids)
    main = next(iter(floors))
    wall: dict[str, list[int]] = {name: [] for name in ["store", *floors]}
    cpu_ns: dict[str, list[int]] = {name: [] for name in ["store", *floors]}
    clock, cpu = time.perf_counter_ns, time.thread_time_ns
    for ids in id_lists[warmup:]:
        for name, fn in (*floors.items(), ("store", read)):
            c0, t0 = cpu(), clock()
            fn(ids)
            t1, c1 = clock(), cpu()
            wall[name].append(t1 - t0)
            cpu_ns[name].append(c1 - c0)
    s50, s99 = _pct(wall["store"])
    f50, f99 = _pct(wall[main])
    sc50, fc50 = _pct(cpu_ns["store"])[0], _pct(cpu_ns[main])[0]
    out = {"p50_ms": s50, "p99_ms": s99, "floor_p50_ms": f50, "floor_p99_ms": f99,
           "ratio_p50": s50 / f50, "ratio_p99": s99 / f99,
           "cpu_p50_ms": sc50, "floor_cpu_p50_ms": fc50, "cpu_ratio_p50": sc50 / fc50}
    for name in floors:
        if name != main:
            out[f"{name}_p50_ms"], out[f"{name}_p99_ms"] = _pct(wall[name])
    return out


def sqlite_floor(path: str, table: str, pragmas: tuple[str, ...] = ()):
    conn = sqlite3.connect(path, check_same_thread=False)
    for pragma in pragmas:
        conn.execute(pragma)
    sql: dict[int, str] = {}

    def floor(ids: list[str]):
        q = sql.get(len(ids))
        if q is None:
            q = sql[len(ids)] = f'SELECT k, v FROM "{table}" WHERE k IN ({",".join("?" * len(ids))})'
        return conn.execute(q, ids).fetchall()

    return floor


def redis_floor(url: str):
    import redis

    client = redis.Redis.from_url(url)
    keys: dict[tuple[str, ...], list[str]] = {}

    def floor(ids: list[str]):
        return client.mget(keys[tuple(ids)])

    return floor, keys


def bench_shape(shape: str, args, tmp: Path, url: str, rng) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Materialize one shape into both stores and time its reads; (materialize stats, read rows)."""
    from aiplatform.core.storage import Layout
    from aiplatform.features.materialize import materialize
    from aiplatform.features.online import SQLITE_MMAP_BYTES, open_online_store

    view, service = build_service(shape)
    layout = Layout.at(str(tmp / f"home-{shape}"))
    write_s = write_offline(layout, view, args.entities, args.offline_rows)
    print(f"[{shape}] offline table: {args.offline_rows:,} rows over {args.entities:,} entities in {write_s:.1f}s")
    sqlite_path = str(tmp / f"online-{shape}.sqlite")
    stores = {"sqlite": open_online_store(sqlite_path), "redis": open_online_store(url)}
    mat: dict[str, Any] = {}
    for name, store in stores.items():
        summary = materialize(layout, service, store, full=True)
        mat[name] = {"rows_read": summary.rows_read, "entities_written": summary.entities_written,
                     "duration_s": summary.duration_s, "rows_per_s": summary.rows_read / summary.duration_s,
                     "entities_per_s": summary.entities_written / summary.duration_s}
        print(f"[{shape}] materialize -> {name}: {summary.rows_read:,} rows in {summary.duration_s:.1f}s")
    ns = f"{service.name}__{service.version}"
    rfloor, rkeys = redis_floor(url)
    mmap = (f"PRAGMA mmap_size={SQLITE_MMAP_BYTES}",)
    floors = {"sqlite": {"floor": sqlite_floor(sqlite_path, f"fs_{ns}"),
                         "mmap_floor": sqlite_floor(sqlite_path, f"fs_{ns}", mmap)},
              "redis": {"floor": rfloor}}
    reads = []
    for batch in (1, 100):
        id_lists = [[f"u{i}" for i in rng.integers(0, args.entities, batch)] for _ in range(args.calls + 200)]
        for ids in id_lists:
            rkeys[tuple(ids)] = [f"aiplatform:{ns}:{k}" for k in ids]
        for name, store in stores.items():
            got = store.get_online_features(service, id_lists[0])
            assert (got.status == "ok").all(), "benchmark ids must all exist"

            def read(ids, s=store):
                return s.get_online_features(service, ids)

            stats = time_reads(read, floors[name], id_lists)
            target = TARGETS_P99_MS[(name, batch)] if shape == "numeric" else None
            reads.append({"shape": shape, "store": name, "entities": batch, **stats, "target_p99_ms": target,
                          "meets_target": None if target is None else stats["p99_ms"] < target,
                          "within_3x_floor_p50": stats["ratio_p50"] <= MAX_RATIO,
                          "load_avg_1m": os.getloadavg()[0]})
    stores["redis"].delete_service(service)  # keep the redis-server small for the next shape
    for store in stores.values():
        store.close()
    return mat, reads


def print_reads(shape: str, reads: list[dict[str, Any]]) -> None:
    rows = [[r["store"], r["entities"], r["p50_ms"], r["p99_ms"], r["floor_p50_ms"], r["floor_p99_ms"],
             r.get("mmap_floor_p50_ms", "-"), f"{r['ratio_p50']:.2f}x", f"{r['ratio_p99']:.2f}x", r["cpu_p50_ms"],
             r["floor_cpu_p50_ms"], f"{r['cpu_ratio_p50']:.2f}x", "yes" if r["within_3x_floor_p50"] else "NO",
             "-" if r["target_p99_ms"] is None else r["target_p99_ms"],
             "-" if r["meets_target"] is None else ("yes" if r["meets_target"] else "NO")]
            for r in reads]
    cols = ["store", "entities", "p50 ms", "p99 ms", "floor p50 ms", "floor p99 ms", "mmap floor p50 ms",
            "ratio p50", "ratio p99", "cpu p50 ms", "floor cpu p50 ms", "cpu ratio", "<=3x floor (p50)",
            "target p99 ms", "meets"]
    title = (f"[{shape}: {SHAPES[shape]}] get_online_features vs raw floor (SQLite SELECT / redis-py MGET)"
             + ("; absolute p99 targets apply to this shape" if shape == "numeric"
                else "; only the 3x-of-floor target applies to this shape"))
    print_table(title, cols, rows)
    print(f"\n{title}\n\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in r) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=["numeric", "shop", "both"], default="both")
    ap.add_argument("--entities", type=int, default=100_000)
    ap.add_argument("--offline-rows", type=int, default=1_000_000)
    ap.add_argument("--calls", type=int, default=10000, help="timed calls per case")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "features_online.json"))
    args = ap.parse_args()

    from tests.redis_server import redis_server

    shapes = ["numeric", "shop"] if args.shape == "both" else [args.shape]
    rng = np.random.default_rng(1)
    results: dict[str, Any] = {"entities": args.entities, "offline_rows": args.offline_rows, "calls": args.calls,
                               "shapes": {s: SHAPES[s] for s in shapes}, "load_avg_start": os.getloadavg(),
                               "materialize": {}, "reads": []}
    with tempfile.TemporaryDirectory() as tmp, redis_server(Path(tmp) / "redis") as url:
        for shape in shapes:
            mat, reads = bench_shape(shape, args, Path(tmp), url, rng)
            results["materialize"][shape] = mat
            results["reads"] += reads
    results["load_avg_end"] = os.getloadavg()
    for shape in shapes:
        print_reads(shape, [r for r in results["reads"] if r["shape"] == shape])
    print("\n| shape | store | offline rows read | entities written | seconds | rows/s | entities/s |")
    print("|---|---|---|---|---|---|---|")
    for shape, by_store in results["materialize"].items():
        for name, m in by_store.items():
            print(f"| {shape} | {name} | {m['rows_read']:,} | {m['entities_written']:,} | {m['duration_s']:.1f} | "
                  f"{m['rows_per_s']:,.0f} | {m['entities_per_s']:,.0f} |")
    print(f"load average (1, 5, 15 min): start {results['load_avg_start']}, end {results['load_avg_end']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), **results}, indent=2))
    print(f"\nsaved {out}")


if __name__ == "__main__":
    main()
