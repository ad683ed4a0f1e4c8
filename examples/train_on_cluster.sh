#!/usr/bin/env bash
# Train on a Ray cluster with `ray job submit` (here a local `ray start --head`).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
HOME_DIR=${HOME_DIR:-/tmp/aiplatform-job}
ray start --head --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 --num-cpus 4 --disable-usage-stats
trap 'ray stop' EXIT
aiplatform data generate --out "$HOME_DIR/input" --scale 0.5
aiplatform data import --home "$HOME_DIR" --events "$HOME_DIR/input/events.parquet" \
    --items "$HOME_DIR/input/items.parquet" --users "$HOME_DIR/input/users.parquet"
ray job submit --address http://127.0.0.1:8265 --working-dir . \
    --runtime-env-json '{"excludes": [".venv", ".git", ".aiplatform", "benchmarks/results"]}' \
    -- python -m aiplatform.jobs.train --home "$HOME_DIR" --epochs 2
aiplatform models list --home "$HOME_DIR"
