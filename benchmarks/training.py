"""Ray Train overhead: the two-tower model trained by a plain PyTorch loop vs Ray Train V2.

Same data, same model, same batch size and epochs for every contender, in one run:

1. ``plain``: one process, ``torch.set_num_threads(2)``, the encoded examples as in-memory
   tensors with a new random permutation each epoch;
2. ``train_two_tower`` (the project's own entry point) with 1 worker (CPU=2) and with
   2 workers (CPU=1 each), examples passed as a Ray Dataset, ``global_shuffle=False``;
3. an instrumented copy of the worker loop (same ``get_dataset_shard`` + ``iter_torch_batches``
   + ``prepare_model`` as ``_train_loop_per_worker``, per-epoch checkpoints left out), with
   threads set explicitly, that times ``next(batch_iterator)`` (data wait) against the step
   (forward / backward incl. DDP all-reduce / optimizer).

samples/s "mean" leaves out epoch 1 (warm-up) when there are two epochs or more; "best" is
the best epoch. Overhead vs plain = (plain - ray) / plain on the means. Usage:

    python benchmarks/training.py [--scale 1] [--epochs 2] [--batch-size 512]
"""

import argparse
import contextlib
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
    """Shop events -> training examples (pandas) -> encoded once with the project's encoder."""
    from aiplatform.features.compute import training_examples
    from aiplatform.models.two_tower import ItemVocab
    from aiplatform.training.config import TrainConfig
    from aiplatform.training.train import EXAMPLE_COLUMNS, ExampleEncoder
    from apps.shop.generate import ShopSize, generate

    t0 = time.perf_counter()
    frames = generate(ShopSize().scaled(scale))
    examples = training_examples(frames["events"], 0, 2**62, TARGET_TYPES)
    vocab = ItemVocab.from_items(frames["items"], n_price_buckets=TrainConfig().price_buckets)
    encoded = ExampleEncoder(vocab, "view")({c: examples[c].to_numpy() for c in EXAMPLE_COLUMNS})
    counts = np.bincount(encoded["item"], minlength=vocab.n_items + 1)
    return {"events": len(frames["events"]), "examples": examples, "items": frames["items"], "vocab": vocab,
            "encoded": encoded, "counts": counts, "prep_s": time.perf_counter() - t0}


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
    model = TwoTowerModel(**vocab.model_kwargs(), dim=cfg.dim, temperature=cfg.temperature)
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


# ---- contender 3: instrumented copy of the worker loop ---------------------------------------------
def _instrumented_loop_per_worker(loop_config: dict[str, Any]) -> list[dict]:
    """``_train_loop_per_worker`` minus checkpoints, plus timers around each part of a step."""
    import ray
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from aiplatform.models.two_tower import ItemVocab, TwoTowerModel
    from aiplatform.training.config import TrainConfig
    from aiplatform.training.train import _no_buffer_sync_kwargs, _seed_everything

    threads_found = torch.get_num_threads()
    omp_env = os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(loop_config["threads"])
    cfg = TrainConfig(**loop_config["train_config"])
    vocab = ItemVocab.from_dict(ray.get(loop_config["vocab_ref"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _seed_everything(cfg.seed)
    model = TwoTowerModel(**vocab.model_kwargs(), dim=cfg.dim, temperature=cfg.temperature)
    model.set_item_frequencies(ray.get(loop_config["item_counts_ref"]))
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=_no_buffer_sync_kwargs())
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    shard = ray.train.get_dataset_shard("train")
    history = []
    for epoch in range(cfg.epochs):
        _seed_everything(cfg.seed + 1000 * epoch + rank)
        model.train()
        started = time.perf_counter()
        loss_sum, n_rows, steps = 0.0, 0, 0
        t_wait = t_fwd = t_bwd = t_opt = 0.0
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            dtypes={"hist": torch.long, "dense": torch.float32, "item": torch.long},
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed + 1000 * epoch + rank) if cfg.shuffle_buffer else None,
        )
        it = iter(batches)
        joined = model.join() if isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
        with joined:
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    t_wait += time.perf_counter() - t0
                    break
                t1 = time.perf_counter()
                t_wait += t1 - t0
                size = len(batch["item"])
                if size < 2:
                    continue
                loss = model(batch["hist"], batch["dense"], batch["item"])
                t2 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()  # with DDP: includes the gradient all-reduce
                t3 = time.perf_counter()
                optimizer.step()
                loss_sum += float(loss.detach()) * size
                t4 = time.perf_counter()
                t_fwd, t_bwd, t_opt = t_fwd + t2 - t1, t_bwd + t3 - t2, t_opt + t4 - t3
                n_rows += size
                steps += 1
        elapsed = time.perf_counter() - started
        totals = torch.tensor([loss_sum, n_rows, t_wait, t_fwd, t_bwd, t_opt], dtype=torch.float64)
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        loss_sum, rows, t_wait, t_fwd, t_bwd, t_opt = (float(x) for x in totals)
        metrics = {
            "epoch": epoch + 1, "loss": loss_sum / rows if rows else float("nan"), "samples": int(rows),
            "samples_per_s": rows / elapsed if elapsed > 0 else 0.0, "epoch_s": elapsed, "steps_per_worker": steps,
            # summed over ranks, so shares are averages over the workers
            "data_wait_s": t_wait / world, "forward_s": t_fwd / world, "backward_s": t_bwd / world,
            "optimizer_s": t_opt / world,
            "data_wait_share": t_wait / max(t_wait + t_fwd + t_bwd + t_opt, 1e-9),
            "threads_found": threads_found, "omp_num_threads_env": omp_env, "threads_used": torch.get_num_threads(),
        }
        history.append(metrics)
        ray.train.report(metrics)
    return history


def instrumented_run(data: dict[str, Any], workers: int, cpus: float, threads: int, epochs: int,
                     batch_size: int, runs_dir: str, floor: bool = False) -> dict[str, Any]:
    """``floor``: a diagnostic ingest floor: the encoded dataset materialized in the object store
    before training (no encode tasks during epochs) and no local shuffle buffer."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from aiplatform.training.config import TrainConfig
    from aiplatform.training.train import encode_examples

    cfg = TrainConfig(num_workers=workers, cpus_per_worker=cpus, epochs=epochs, batch_size=batch_size,
                      global_shuffle=False, **({"shuffle_buffer": 0} if floor else {}))
    started = time.perf_counter()
    ds = encode_examples(examples_dataset(data), data["vocab"], cfg)  # the same pipeline train_two_tower builds
    if floor:
        ds = ds.materialize()
    trainer = TorchTrainer(
        _instrumented_loop_per_worker,
        train_loop_config={"train_config": cfg.model_dump(), "threads": threads,
                           "vocab_ref": ray.put(data["vocab"].to_dict()),
                           "item_counts_ref": ray.put(data["counts"])},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False,
                                               resources_per_worker={"CPU": cpus}),
        run_config=ray.train.RunConfig(storage_path=runs_dir,
                                       name=f"instrumented_{workers}w" + ("_floor" if floor else "")),
        datasets={"train": ds},
    )
    result = trainer.fit()
    return {"history": list(result.return_value or []), "duration_s": time.perf_counter() - started}


# ---- contender 2: the project's train_two_tower ------------------------------------------------------
def examples_dataset(data: dict[str, Any], n_blocks: int = 8):
    import ray.data

    ex = data["examples"]
    # A list of frames: with pandas 3, from_pandas(frame, override_num_blocks=...) crashes.
    bounds = np.linspace(0, len(ex), n_blocks + 1).astype(int)
    return ray.data.from_pandas([ex.iloc[a:b].reset_index(drop=True) for a, b in zip(bounds, bounds[1:]) if b > a])


def project_run(data: dict[str, Any], workers: int, cpus: float, epochs: int, batch_size: int,
                runs_dir: str) -> dict[str, Any]:
    from aiplatform.training.config import TrainConfig
    from aiplatform.training.train import train_two_tower

    cfg = TrainConfig(num_workers=workers, cpus_per_worker=cpus, epochs=epochs, batch_size=batch_size,
                      global_shuffle=False)
    result = train_two_tower(examples_dataset(data), data["items"], cfg, runs_dir, f"project_{workers}w")
    return {"history": result.history, "duration_s": result.duration_s}


# ---- report -------------------------------------------------------------------------------------------
def summarise(history: list[dict]) -> dict[str, float]:
    rates = [h["samples_per_s"] for h in history]
    steady = rates[1:] if len(rates) >= 2 else rates
    out = {"mean": float(np.mean(steady)), "best": float(max(rates))}
    steady_h = history[1:] if len(history) >= 2 else history
    if all("data_wait_s" in h for h in steady_h):
        if all("data_wait_share" in h for h in steady_h):
            out["data_wait_pct"] = 100.0 * float(np.mean([h["data_wait_share"] for h in steady_h]))
        else:
            out["data_wait_pct"] = 100.0 * sum(h["data_wait_s"] for h in steady_h) / sum(h["epoch_s"] for h in steady_h)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="shop size multiplier (1 = ShopSize())")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the diagnostic runs (materialized dataset, no local shuffle buffer)")
    args = parser.parse_args()
    if args.epochs < 1 or args.batch_size < 2:
        parser.error("--epochs must be >= 1 and --batch-size >= 2")
    os.environ.pop("RAY_ADDRESS", None)
    wall0 = time.perf_counter()

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
    try:
        with tempfile.TemporaryDirectory(prefix="aiplatform-bench-train-") as runs_dir:
            for workers, cpus, threads in ((1, 2.0, 2), (2, 1.0, 1)):
                print(f"train_two_tower, {workers} worker(s) ...", flush=True)
                runs[f"project_{workers}w"] = project_run(data, workers, cpus, args.epochs, args.batch_size, runs_dir)
                print(f"instrumented worker loop, {workers} worker(s) ...", flush=True)
                runs[f"instrumented_{workers}w"] = instrumented_run(data, workers, cpus, threads, args.epochs,
                                                                    args.batch_size, runs_dir)
                if not args.no_floor:
                    print(f"instrumented worker loop, {workers} worker(s), materialized data, no local shuffle ...",
                          flush=True)
                    runs[f"floor_{workers}w"] = instrumented_run(data, workers, cpus, threads, args.epochs,
                                                                 args.batch_size, runs_dir, floor=True)
    finally:
        ray.shutdown()

    for name, run in runs.items():
        run["summary"] = summarise(run["history"])
    plain = runs["plain"]["summary"]["mean"]

    def found(workers: int) -> str:
        h = runs[f"instrumented_{workers}w"]["history"]
        return str(h[0].get("threads_found", "?")) if h else "?"

    labels = {
        "plain": ("plain torch", "1 x 2"),
        "project_1w": ("train_two_tower", f"1 x {found(1)}*"),
        "instrumented_1w": ("instrumented", "1 x 2"),
        "project_2w": ("train_two_tower", f"2 x {found(2)}*"),
        "instrumented_2w": ("instrumented", "2 x 1"),
        "floor_1w": ("instr. floor**", "1 x 2"),
        "floor_2w": ("instr. floor**", "2 x 1"),
    }
    columns = ["contender", "workers x threads", "samples/s mean", "samples/s best", "overhead vs plain %",
               "data wait %"]
    # "instrumented" = the copy of the Ray Train worker loop above (same ingest, timers, no checkpoints)
    rows = []
    order = ("plain", "project_1w", "instrumented_1w", "floor_1w", "project_2w", "instrumented_2w", "floor_2w")
    for name in (n for n in order if n in runs):
        s = runs[name]["summary"]
        overhead = 100.0 * (plain - s["mean"]) / plain
        wait = s.get("data_wait_pct")
        rows.append([labels[name][0], labels[name][1], round(s["mean"], 1), round(s["best"], 1),
                     "-" if name == "plain" else round(overhead, 1), "n/a" if wait is None else round(wait, 1)])
    title = (f"two-tower training, {n_train:,} rows, {args.epochs} epoch(s), batch {args.batch_size} "
             f"(target: Ray Train overhead < {TARGET_OVERHEAD_PCT:g}%)")
    print_table(title, columns, rows)

    step_split = {}
    for name in (n for n in order if n.startswith(("instrumented", "floor")) and n in runs):
        steady = runs[name]["history"][1:] or runs[name]["history"]
        step_split[name] = {k: float(np.mean([h[k] for h in steady]))
                            for k in ("epoch_s", "data_wait_s", "forward_s", "backward_s", "optimizer_s")}
        print(f"{name}: per-worker seconds/epoch " + ", ".join(f"{k}={v:.2f}" for k, v in step_split[name].items()))
    notes = [
        "mean excludes epoch 1 (warm-up) when epochs >= 2; best is the best epoch; "
        "overhead = (plain mean - contender mean) / plain mean.",
        "* train_two_tower never calls torch.set_num_threads; its workers run with the thread count Ray "
        f"gives them (OMP_NUM_THREADS = CPUs per worker; measured in the same worker setup: "
        f"1 worker -> {found(1)}, 2 workers -> {found(2)}). Package code was not edited.",
        "train_two_tower rows: data wait not measurable without editing package code (n/a); the "
        "instrumented loop runs the same dataset pipeline (encode_examples, global_shuffle=False, "
        "iter_torch_batches with the 4096-row local shuffle buffer), with checkpoints left out.",
        "plain data wait = time to index the permuted in-memory tensors. Ray samples/s = all ranks' rows / "
        "rank 0's epoch time.",
        "** instr. floor (diagnostic): the instrumented loop on the encoded dataset materialized in the object "
        "store before training and shuffle_buffer=0 (no per-epoch encode tasks, no local shuffle, data in "
        "the same fixed order every epoch): what Ray Train costs with the least ingest work.",
        "ray.init(num_cpus=4) on a 2-core machine: Ray Data's encode tasks run on the 2 logical CPUs left "
        "over, i.e. on the same cores as the training threads.",
    ]
    for n in notes:
        print("note:", n)
    total = time.perf_counter() - wall0
    print(f"total benchmark time {total:.0f}s")
    path = save("training", {
        "config": {"scale": args.scale, "epochs": args.epochs, "batch_size": args.batch_size, "dim": 64,
                   "temperature": 0.05, "logq_correction": True, "global_shuffle": False,
                   "events": data["events"], "examples": len(data["examples"]), "encoded_rows": n_train,
                   "ray_init": {"num_cpus": 4, "object_store_memory": 1 << 30}},
        "columns": columns, "rows": rows, "notes": notes, "step_split_s": step_split,
        "runs": {k: {"history": v["history"], "duration_s": v["duration_s"], "summary": v["summary"]}
                 for k, v in runs.items()},
        "target_overhead_pct": TARGET_OVERHEAD_PCT, "total_s": total,
    })
    print(f"saved {path}")


if __name__ == "__main__":
    main()
