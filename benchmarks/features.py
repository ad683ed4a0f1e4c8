"""The feature-store benchmark (issue 4, point 9), on identical data in one run:

a. point-in-time join, 1M labels x 10M feature rows over 100k entities: aiplatform (Ray Data)
   vs DuckDB's ASOF JOIN vs pandas merge_asof (seconds, peak memory, exactness) —
   ``features_pit.py``;
b. online reads p50/p99 for 1 and 100 entities x 30 features, SQLite and Redis, against the raw
   floor (one SQLite SELECT of a precomputed row per entity; one redis-py MGET), and
c. materialization rows per second — ``features_online.py``.

Each part runs in its own process (so one's memory does not skew the other's peak), prints its
table and saves JSON; this script then saves both under results/features.json.
Flags after ``--pit`` / ``--online`` go to the part (e.g. ``--pit --rows 1000000 --labels 100000``).
"""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, save  # noqa: E402

PARTS = {"pit": "features_pit.py", "online": "features_online.py"}


def _split_args(argv: list[str]) -> dict[str, list[str]]:
    args: dict[str, list[str]] = {name: [] for name in PARTS}
    current = None
    for a in argv:
        if a in ("--pit", "--online"):
            current = a[2:]
        elif current:
            args[current].append(a)
    return args


def main(argv: list[str]) -> int:
    args = _split_args(argv)
    combined = {}
    for name, script in PARTS.items():
        out = RESULTS / f"features_{name}.json"
        print(f"== {script} {' '.join(args[name])}", flush=True)
        subprocess.run([sys.executable, str(HERE / script), *args[name], "--out", str(out)], check=True)
        combined[name] = json.loads(out.read_text())
    path = save("features", combined)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
