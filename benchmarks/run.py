"""Run every benchmark at its defaults (`make bench`). Each prints its table and saves JSON in
results/; run a script directly to pass its own flags (each has --help)."""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["quickstart_stages.py", "training.py", "features.py", "features_pit.py", "features_online.py",
              "retrieval.py", "candidates.py", "served_quality.py", "quality_ceiling.py"]

if __name__ == "__main__":
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        subprocess.run([sys.executable, str(HERE / name)], check=True)
