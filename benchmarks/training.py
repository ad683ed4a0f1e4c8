"""Ray Train overhead: the two-tower model trained by a plain PyTorch loop vs Ray Train V2.

Same data, same model, same batch size and epochs for every contender, in one run:

1. ``plain``: one process, ``torch.set_num_threads(2)``, the encoded examples as in-memory
   tensors with a new random permutation each epoch;
2. ``train_two_tower`` (the project's own entry point, per-epoch checkpoints included) with
   1 worker (CPU=2) and with 2 workers (CPU=1 each): equal total threads. The project loop
   itself times ``next(batch_iterator)``, so "data wait %" is the share of each epoch a worker
   spent waiting for its next batch (rank 0; plain: time to index the permuted tensors);
3. diagnostics for the 1-worker case: the same run with the local shuffle buffer off, and an
   ingest-only pass (``iter_torch_batches`` over the same materialized dataset, no model) that
   prices one batch of ingest in milliseconds, next to the plain loop's step time.

samples/s "mean" leaves out epoch 1 (warm-up) when there are two epochs or more; "best" is
the best epoch. Overhead vs plain = (plain - ray) / plain on the means. ``validation_fraction``
is 0 here so every contender trains on the same rows. Usage:

    python benchmarks/training.py [--scale 1] [--epochs 3] [--batch-size 512]
"""

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import print_table, save  # noqa: E402

TARGET_TYPES = ("view", "click", "add_to_cart", "purchase")
TARGET_OVERHEAD_PCT = 10.0


# ---- data -----------------------------------------------------------------------------------
def build_data(scale: float) -> dict[str, Any]:
    """Shop events -> training examples (the shop's feature service joined point-in-time with every
    target event, in memory: ``features.pipeline.frame_from_events``) -> encoded once with the
    project's encoder."""
    import pandas as pd

    from aiplatform.features.pipeline import frame_from_events, training_labels
    from aiplatform.models.inputs import UserInputSpec
    from aiplatform.models.two_tower import ItemVocab
    from aiplatform.training.config import TrainConfig
    from aiplatform.training.train import ExampleEncoder, example_columns
    from apps.shop.features import recommender_user
    from apps.shop.generate import ShopSize, generate

    t0 = time.perf_counter()
    frames = generate(ShopSize().scaled(scale))
    events = frames["events"]
    end = pd.to_datetime(events["timestamp"], utc=True).max() + pd.Timedelta(seconds=1)
    examples = frame_from_events(recommender_user, events, training_labels(events, end, TARGET_TYPES))
    inputs = UserInputSpec.from_service(recommender_user)
    vocab = ItemVocab.from_items(frames["items"], n_price_buckets=TrainConfig().price_buckets)
    encoded = ExampleEncoder(vocab, inputs, "view")({c: examples[c].to_numpy() for c in example_columns(inputs)})
    counts = np.bincount(encoded["item"], minlength=vocab.n_items + 1)
    return {"events": len(events), "examples": examples, "items": frames["items"], "vocab": vocab,
            "inputs": inputs, "encoded": encoded, "counts": counts, "prep_s": time.perf_counter() - t0}


# ---- contender 1: plain PyTorch -----------------------------------------------------------------
def plain_loop(data: dict[str, Any], epochs: int, batch_size: int, seed: int = 0) -> list[dict]:
    import torch

    from aiplatform.models.two_tower import TwoTowerModel
    from aiplatform.training.config import TrainConfig
    from aiplatform.training.train import _seed_everything

    cfg = TrainConfig()
    torch.set_num_threads(2)
    _seed_everything(seed)
    vocab = data["vocab"]
    model = TwoTowerModel(**vocab.model_kwargs(), dim=cfg.dim, temperature=cfg.temperature, inputs=data["inputs"])
    model.set_item_frequencies(data["counts"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    hist, dense, item = (torch.from_numpy(np.ascontiguousarray(data["encoded"][k])) for k in ("hist", "dense", "item"))
    n = len(item)
    history = []
    for epoch in range(epochs):
        _seed_everything(seed + 1000 * epoch)
        model.train()
        started = time.perf_counter()
        perm = torch.randperm(n)
        loss_sum, n_rows, wait = 0.0, 0, 0.0
        for s in range(0, n, batch_size):
            t = time.perf_counter()
            idx = perm[s:s + batch_size]
            h, d, i = hist[idx], dense[idx], item[idx]
            wait += time.perf_counter() - t
            if len(i) < 2:
                continue
            loss = model(h, d, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(i)
            n_rows += len(i)
        elapsed = time.perf_counter() - started
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(n_rows, 1), "samples": n_rows,
                        "samples_per_s": n_rows / elapsed, "epoch_s": elapsed, "data_wait_s": wait})
    return history


# ---- contender 2: the project's train_two_tower ------------------------------------------------------
def examples_dataset(data: dict[str, Any], n_blocks: int = 8):
    import ray.data

    ex = data["examples"]
    # A list of frames: with pandas 3, from_pandas(frame, override_num_blocks=...) crashes.
    bounds = np.linspace(0, len(ex), n_blocks + 1).astype(int)
    return ray.data.from_pandas([ex.iloc[a:b].reset_index(drop=True) for a, b in zip(bounds, bounds[1:]) if b > a])


def project_run(data: dict[str, Any], workers: int, cpus: float, epochs: int, batch_size: int,
                runs_dir: str, name: str, **overrides: Any) -> dict[str, Any]:
    from aiplatform.training.config import TrainConfig
    from aiplatform.training.train import train_two_tower

    cfg = TrainConfig(num_workers=workers, cpus_per_worker=cpus, epochs=epochs, batch_size=batch_size,
                      global_shuffle=False, validation_fraction=0.0, **overrides)
    result = train_two_tower(examples_dataset(data), data["items"], cfg, runs_dir, name, inputs=data["inputs"])
    return {"history": result.history, "duration_s": result.duration_s}


# ---- diagnostic: ingest alone --------------------------------------------------------------------------
def ingest_only(data: dict[str, Any], batch_size: int, shuffle_buffer: int, passes: int = 2) -> dict[str, Any]:
    """Milliseconds per batch of ``iter_torch_batches`` over the materialized encoded dataset
    (what a worker's shard iterates), with no model: the ingest cost each step pays."""
    import torch

    from aiplatform.training.config import TrainConfig
    from aiplatform.training.train import encode_examples

    cfg = TrainConfig(global_shuffle=False, shuffle_buffer=shuffle_buffer)
    ds = encode_examples(examples_dataset(data), data["vocab"], cfg, data["inputs"])
    times = []
    for p in range(passes):
        started, n = time.perf_counter(), 0
        for batch in ds.iter_torch_batches(
                batch_size=batch_size, dtypes={"hist": torch.long, "dense": torch.float32, "item": torch.long},
                local_shuffle_buffer_size=shuffle_buffer or None, local_shuffle_seed=p if shuffle_buffer else None):
            n += 1
        times.append((time.perf_counter() - started) / max(n, 1))
    return {"ms_per_batch": 1000 * min(times), "batches": n}


def _defaults() -> dict[str, Any]:
    from aiplatform.training.config import TrainConfig

    return TrainConfig().model_dump()


# ---- report -------------------------------------------------------------------------------------------
def summarise(history: list[dict]) -> dict[str, float]:
    rates = [h["samples_per_s"] for h in history]
    steady_h = history[1:] if len(history) >= 2 else history
    out = {"mean": float(np.mean([h["samples_per_s"] for h in steady_h])), "best": float(max(rates))}
    if all("data_wait_share" in h for h in steady_h):
        out["data_wait_pct"] = 100.0 * float(np.mean([h["data_wait_share"] for h in steady_h]))
    elif all("data_wait_s" in h for h in steady_h):
        out["data_wait_pct"] = 100.0 * sum(h["data_wait_s"] for h in steady_h) / sum(h["epoch_s"] for h in steady_h)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="shop size multiplier (1 = ShopSize())")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the shuffle-buffer-off run and ingest pass")
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be >= 1 and --batch-size >= 2")
    os.environ.pop("RAY_ADDRESS", None)
    wall0 = time.perf_counter()
    load_before = os.getloadavg()

    data = build_data(args.scale)
    n_train = len(data["encoded"]["item"])
    print(f"{data['events']:,} events -> {len(data['examples']):,} examples -> {n_train:,} encoded rows "
          f"({data['prep_s']:.1f}s)", flush=True)

    runs: dict[str, dict[str, Any]] = {}
    print("plain PyTorch loop ...", flush=True)
    t = time.perf_counter()
    runs["plain"] = {"history": plain_loop(data, args.epochs, args.batch_size), "duration_s": 0.0}
    runs["plain"]["duration_s"] = time.perf_counter() - t

    import ray
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.init(address="local", num_cpus=4, object_store_memory=1 << 30, include_dashboard=False,
             log_to_driver=False)
    ingest: dict[str, dict[str, Any]] = {}
    try:
        with tempfile.TemporaryDirectory(prefix="aiplatform-bench-train-") as runs_dir:
            plans = [("project_1w", 1, 2.0, {}), ("project_2w", 2, 1.0, {})]
            if not args.no_diagnostics:
                plans.insert(1, ("project_1w_noshuf", 1, 2.0, {"shuffle_buffer": 0}))
            for name, workers, cpus, overrides in plans:
                print(f"train_two_tower {name} ...", flush=True)
                runs[name] = project_run(data, workers, cpus, args.epochs, args.batch_size, runs_dir, name,
                                         **overrides)
            if not args.no_diagnostics:
                for buf in (4096, 0):
                    print(f"ingest only, shuffle buffer {buf} ...", flush=True)
                    ingest[f"shuffle_buffer={buf}"] = ingest_only(data, args.batch_size, buf)
    finally:
        ray.shutdown()

    for run in runs.values():
        run["summary"] = summarise(run["history"])
    plain = runs["plain"]["summary"]["mean"]
    labels = {
        "plain": ("plain torch", "1 x 2"),
        "project_1w": ("train_two_tower", "1 x 2"),
        "project_1w_noshuf": ("train_two_tower, shuffle_buffer=0", "1 x 2"),
        "project_2w": ("train_two_tower", "2 x 1"),
    }
    columns = ["contender", "workers x threads", "samples/s mean", "samples/s best", "overhead vs plain %",
               "data wait %"]
    rows = []
    for name in (n for n in labels if n in runs):
        s = runs[name]["summary"]
        overhead = 100.0 * (plain - s["mean"]) / plain
        wait = s.get("data_wait_pct")
        rows.append([labels[name][0], labels[name][1], round(s["mean"], 1), round(s["best"], 1),
                     "-" if name == "plain" else round(overhead, 1), "n/a" if wait is None else round(wait, 1)])
    title = (f"two-tower training, {n_train:,} rows, {args.epochs} epoch(s), batch {args.batch_size} "
             f"(target: Ray Train overhead < {TARGET_OVERHEAD_PCT:g}%)")
    print_table(title, columns, rows)
    plain_step_ms = 1000.0 * args.batch_size / plain
    for name, r in ingest.items():
        print(f"ingest only ({name}): {r['ms_per_batch']:.2f} ms/batch = "
              f"{100 * r['ms_per_batch'] / plain_step_ms:.0f}% of a plain step ({plain_step_ms:.2f} ms)")
    load_after = os.getloadavg()
    notes = [
        "mean excludes epoch 1 (warm-up) when epochs >= 2; best is the best epoch; "
        "overhead = (plain mean - contender mean) / plain mean.",
        "train_two_tower rows run the real worker loop (checkpoint every epoch, not counted in samples/s); "
        "data wait = rank 0's time in next(batch iterator) / epoch time.",
        "ray.init(num_cpus=4) on a 2-core machine: Ray Data and Ray's own processes share the cores "
        "with the training threads.",
        f"load average (1 min) before / after: {load_before[0]:.1f} / {load_after[0]:.1f} on "
        f"{os.cpu_count()} cores: other work on the machine shows up as noise.",
    ]
    for n in notes:
        print("note:", n)
    total = time.perf_counter() - wall0
    print(f"total benchmark time {total:.0f}s")
    path = save("training", {
        "config": {"scale": args.scale, "epochs": args.epochs, "batch_size": args.batch_size,
                   "train_config_defaults": _defaults(), "global_shuffle": False, "validation_fraction": 0.0,
                   "events": data["events"], "examples": len(data["examples"]), "encoded_rows": n_train,
                   "ray_init": {"num_cpus": 4, "object_store_memory": 1 << 30}},
        "columns": columns, "rows": rows, "notes": notes, "ingest_only": ingest,
        "plain_step_ms": plain_step_ms, "load_avg_before": load_before, "load_avg_after": load_after,
        "runs": {k: {"history": v["history"], "duration_s": v["duration_s"], "summary": v["summary"]}
                 for k, v in runs.items()},
        "target_overhead_pct": TARGET_OVERHEAD_PCT, "total_s": total,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
