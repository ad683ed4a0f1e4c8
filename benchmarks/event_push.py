"""Push latency as the event log grows: compacted log vs one file per push (the peer).

One run, the same shop and the same pushes for both contenders, each on its own storage root and
SQLite online store (local disk):

- **compacted** (``features.push`` as it is): 10,000 pushes of one event each, every one timed.
  A push reads its user's recent events through a snapshot of the log; when the log holds
  ``AIPLATFORM_EVENTLOG_COMPACT_FILES`` (32) small files, the push starts their compaction in a
  background thread (size-tiered segments), so the files a push opens stay bounded;
- **one file per push** (the log before compaction, the named peer): the same 10,000 pushes
  append one file each and no file is ever merged (``push(..., compact=False)``), so every push
  lists and scans every file. Scanning N files costs N footers, so timing all 10,000 would take
  hours: in each window of 1,000 pushes the last ``--peer-samples`` (default 10) run the whole
  push and are timed, the others are appended to the log only (``eventlog.append``), so the log
  grows exactly as under the old code. Its p99 is thus the largest of few samples.

The users are the generated shop's (scale 0.05 by default: 100 users, 50 items, ~11k lake
events), each push one event of a random user at an increasing time after the lake's last event.
The table shows p50 / p99 per window of 1,000 pushes for both, so (non-)flatness is visible, and
the number of files in the log at the window's end.

The full run took 25 minutes on a shared, loaded 2-core machine, most of it the peer's scans:
``--pushes 3000`` gives a first look in a few minutes.

Usage: python benchmarks/event_push.py [--pushes 10000] [--window 1000] [--peer-samples 10] [--scale 0.05]
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import print_table, save  # noqa: E402

from aiplatform.core.storage import Layout  # noqa: E402
from aiplatform.data import eventlog, eventlog_compact, lake  # noqa: E402
from aiplatform.features.online import open_online_store  # noqa: E402
from aiplatform.features.push import push  # noqa: E402
from apps.shop.features import recommender_user  # noqa: E402
from apps.shop.generate import ShopSize, generate, write  # noqa: E402


def _root(base: Path, name: str, paths: dict[str, str]) -> Layout:
    layout = Layout.at(str(base / name))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    return layout


def _events(frames, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    users = frames["users"]["user_id"].to_numpy()
    items = frames["items"]["item_id"].to_numpy()
    types = np.array(["view", "view", "view", "click", "add_to_cart", "purchase"])
    start = pd.Timestamp(frames["events"]["timestamp"].max()) + pd.Timedelta(minutes=1)
    return [{"user_id": str(rng.choice(users)), "item_id": str(rng.choice(items)), "event_type": str(rng.choice(types)),
             "timestamp": (start + pd.Timedelta(seconds=i)).to_pydatetime(), "value": 10.0} for i in range(n)]


def _live_files(layout: Layout) -> int:
    return len(eventlog.snapshot(layout).live)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pushes", type=int, default=10_000)
    parser.add_argument("--window", type=int, default=1_000)
    parser.add_argument("--peer-samples", type=int, default=10)
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    os.environ.setdefault("AIPLATFORM_EVENT_DEDUP_WINDOW_S", "0")  # no event_ids here: nothing to claim

    with tempfile.TemporaryDirectory(prefix="event-push-") as tmp:
        base = Path(tmp)
        frames = generate(ShopSize().scaled(args.scale), seed=args.seed)
        paths = write(frames, str(base / "data"))
        compacted, peer = _root(base, "compacted", paths), _root(base, "peer", paths)
        stores = {"compacted": open_online_store(str(base / "compacted.sqlite")),
                  "peer": open_online_store(str(base / "peer.sqlite"))}
        events = _events(frames, args.pushes, args.seed)
        timings: dict[str, list[list[float]]] = {"compacted": [], "peer": []}
        files: dict[str, list[int]] = {"compacted": [], "peer": []}
        started = time.perf_counter()
        for w0 in range(0, args.pushes, args.window):
            window = events[w0:w0 + args.window]
            mine: list[float] = []
            theirs: list[float] = []
            timed_from = len(window) - args.peer_samples
            for i, event in enumerate(window):
                t = time.perf_counter()
                push(compacted, [event], [recommender_user], stores["compacted"])
                mine.append((time.perf_counter() - t) * 1000)
                if i >= timed_from:
                    t = time.perf_counter()
                    push(peer, [event], [recommender_user], stores["peer"], compact=False)
                    theirs.append((time.perf_counter() - t) * 1000)
                else:
                    eventlog.append(peer, eventlog.validate_pushed([event]))
            timings["compacted"].append(mine)
            timings["peer"].append(theirs)
            files["compacted"].append(_live_files(compacted))
            files["peer"].append(_live_files(peer))
            print(f"  {w0 + len(window):>6,} pushes: compacted p50 {np.percentile(mine, 50):6.1f} ms, "
                  f"one-file-per-push p50 {np.percentile(theirs, 50):8.1f} ms ({files['peer'][-1]:,} files) "
                  f"[{time.perf_counter() - started:5.0f} s]", flush=True)
        eventlog_compact.wait_for_background()
        all_compacted = eventlog.read_events(compacted, key="user_id", keys=frames["users"]["user_id"].tolist())
        all_peer = eventlog.read_events(peer, key="user_id", keys=frames["users"]["user_id"].tolist())
        assert all_compacted.num_rows == all_peer.num_rows, "the compacted log lost or duplicated events"

    rows = []
    for w, (mine, theirs) in enumerate(zip(timings["compacted"], timings["peer"])):
        rows.append([f"{w * args.window + 1:,}-{(w + 1) * args.window:,}",
                     float(np.percentile(mine, 50)), float(np.percentile(mine, 99)), files["compacted"][w],
                     float(np.percentile(theirs, 50)), float(np.percentile(theirs, 99)), files["peer"][w]])
    print_table(f"push latency (ms) per window of {args.window:,} single-event pushes, SQLite online store, local root",
                ["pushes", "compacted p50", "compacted p99", "files", "1 file/push p50", "1 file/push p99", "files"],
                rows)
    path = save("event_push", {"pushes": args.pushes, "window": args.window, "peer_samples": args.peer_samples,
                               "scale": args.scale, "compact_files": eventlog_compact.compact_files(),
                               "rows": rows, "lake_events": len(frames["events"])})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
