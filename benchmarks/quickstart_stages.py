"""How long each quickstart stage takes, at the default size and at 10x.

Runs the real CLI (`aiplatform quickstart --no-wait`) in a fresh storage root per scale and
reads the stage timings it records. Usage:

    python benchmarks/quickstart_stages.py [--scales 1 10] [--epochs N]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import free_port, print_table, save  # noqa: E402

STAGES = ["data", "ray", "features", "train", "index", "serve", "demo", "total"]


def run_scale(scale: float, epochs: int | None) -> dict:
    with tempfile.TemporaryDirectory(prefix="aiplatform-bench-") as home:
        cmd = [sys.executable, "-m", "aiplatform.cli", "quickstart", "--no-wait", "--scale", str(scale),
               "--home", home, "--port", str(free_port())]
        if epochs:
            cmd += ["--epochs", str(epochs)]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"quickstart at scale {scale} failed with exit code {proc.returncode}")
        timings = json.loads((Path(home) / "quickstart_timings.json").read_text())
        from aiplatform.core.storage import Layout
        from aiplatform.registry.registry import ModelRegistry

        mv = ModelRegistry(Layout.at(home)).latest("two_tower")
        return {"scale": scale, "timings": timings, "metrics": mv.metrics, "lineage": mv.lineage}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0])
    parser.add_argument("--epochs", type=int)
    args = parser.parse_args()
    results = [run_scale(s, args.epochs) for s in args.scales]
    cols = ["stage"] + [f"scale {r['scale']:g} (s)" for r in results]
    rows = [[st] + [float(r["timings"].get(st, 0.0)) for r in results] for st in STAGES]
    rows.append(["events"] + [r["lineage"].get("events", 0) for r in results])
    rows.append(["recall@10 model"] + [round(r["metrics"]["model"]["recall@10"], 4) for r in results])
    rows.append(["recall@10 popularity"] + [round(r["metrics"]["popularity"]["recall@10"], 4) for r in results])
    print_table("quickstart stage timings (aiplatform quickstart --no-wait)", cols, rows)
    path = save("quickstart_stages", {"results": results})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
