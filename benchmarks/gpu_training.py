"""GPU check and speed: ``train_two_tower`` on one CUDA worker with bf16 autocast.

Run on a machine with a CUDA device (about 2-4 minutes)::

    python benchmarks/gpu_training.py            # exits 2 when there is no CUDA device

It generates a small shop, trains with ``use_gpu=True`` (1 worker, ``precision="bf16"``),
prints the GPU samples/s and checks that the GPU path trains correctly:

1. the training loss goes down and the run used bf16;
2. recall@10 on the held-out days beats the popularity baseline;
3. the saved artifact loads on CPU and scores users x items like the model on the training
   device does (bf16 on the GPU vs fp32 on the CPU, within a bf16 tolerance).

Any failed check exits 1. ``--dry-run-cpu`` runs the very same path on the CPU at tiny sizes
(bf16 autocast on CPU) so the script itself is tested where there is no GPU; its results go
to ``gpu_training_dry_run_cpu.json``, never over a GPU run's.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import print_table, save  # noqa: E402

TARGET_TYPES = ("view", "click", "add_to_cart", "purchase")
SCORE_TOLERANCE = 0.05
"""Max |user x item score difference| between the training device in bf16 and the CPU in fp32.
Scores are cosines in [-1, 1]; bf16 keeps about 3 significant digits, so 0.05 is generous for
rounding and far below what a wrong device/dtype path (garbage scores) would give."""


def _scores(model, vocab, context, device: str, bf16: bool):
    import torch

    model = model.to(device).eval()
    hist, dense = (torch.from_numpy(a) for a in vocab.encode_batch(model.inputs, context))
    ctx = torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16) if bf16 else _null()
    with torch.no_grad(), ctx:
        users = model.user_embedding(hist.to(device), dense.to(device))
        items = model.all_item_embeddings()
    return (users.float() @ items.float().T).cpu().numpy()


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run-cpu", action="store_true", help="same path on the CPU, tiny sizes (no GPU needed)")
    parser.add_argument("--users", type=int, default=4000)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2048)
    args = parser.parse_args()

    import torch

    if args.dry_run_cpu:
        args.users, args.items, args.epochs, args.batch_size = 300, 120, 3, 128
        device = "cpu"
    elif not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); use --dry-run-cpu to test the "
              "script on a CPU", file=sys.stderr)
        return 2
    else:
        device = "cuda:0"
    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    wall0 = time.perf_counter()

    import pandas as pd
    import ray

    from aiplatform.features.pipeline import frame_from_events, training_labels
    from aiplatform.models.inputs import UserInputSpec
    from aiplatform.models.two_tower import load_artifact
    from aiplatform.training.config import TrainConfig
    from aiplatform.training.evaluate import popularity_ranking, recall_at_k, score_users, split_by_time
    from aiplatform.training.train import train_two_tower
    from apps.shop.features import recommender_user
    from apps.shop.generate import ShopSize, generate

    frames = generate(ShopSize(users=args.users, items=args.items, days=30), seed=5)
    cutoff, train_events, truth = split_by_time(frames["events"], holdout_days=7)
    boundary = cutoff + pd.Timedelta(microseconds=1)
    # the shop's feature service, joined point-in-time in memory (the feature engine, no store)
    inputs = UserInputSpec.from_service(recommender_user)
    examples = frame_from_events(recommender_user, train_events, training_labels(train_events, boundary, TARGET_TYPES))
    context = frame_from_events(recommender_user, train_events,
                                pd.DataFrame({"user_id": sorted(truth), "event_timestamp": cutoff}))
    popular = popularity_ranking(train_events)
    print(f"{len(frames['events']):,} events -> {len(examples):,} examples, {len(truth):,} held-out users "
          f"({time.perf_counter() - wall0:.1f}s)", flush=True)

    cpus = max(2, min(8, os.cpu_count() or 2))
    ray.init(address="local", num_cpus=cpus, num_gpus=0 if args.dry_run_cpu else 1,
             object_store_memory=1 << 30, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    checks: list[tuple[str, bool, str]] = []
    try:
        bounds = np.linspace(0, len(examples), 9).astype(int)
        ds = ray.data.from_pandas([examples.iloc[a:b].reset_index(drop=True)
                                   for a, b in zip(bounds, bounds[1:]) if b > a])
        config = TrainConfig(num_workers=1, use_gpu=not args.dry_run_cpu, cpus_per_worker=min(4, cpus - 1),
                             precision="bf16", epochs=args.epochs, batch_size=args.batch_size,
                             lr=3e-3, dim=64, seed=0)
        with tempfile.TemporaryDirectory(prefix="aiplatform-gpu-train-") as runs_dir:
            result = train_two_tower(ds, frames["items"], config, runs_dir, "gpu_check", inputs=inputs)
            hist = result.history
            checks.append(("loss goes down", hist[-1]["loss"] < hist[0]["loss"],
                           f"{hist[0]['loss']:.4f} -> {hist[-1]['loss']:.4f}"))
            checks.append(("trained in bf16", all(h.get("precision") == "bf16" for h in hist),
                           ", ".join(str(h.get("precision")) for h in hist)))
            relevant = [truth[str(u)] for u in context["user_id"]]
            recs = score_users(result.model, result.vocab, context, 10)
            pop = [[i for i in popular if i not in set(ex)][:10] for ex in inputs.exclusions(context)]
            m = float(np.mean([recall_at_k(r, t, 10) for r, t in zip(recs, relevant)]))
            p = float(np.mean([recall_at_k(r, t, 10) for r, t in zip(pop, relevant)]))
            checks.append(("recall@10 beats popularity", m > p, f"{m:.4f} vs {p:.4f} ({len(relevant)} users)"))
            # the artifact on disk, loaded on CPU (fp32), vs the same weights on the device in bf16
            cpu_model, cpu_vocab = load_artifact(result.checkpoint_path)
            sample = context.head(256)
            on_cpu = _scores(cpu_model, cpu_vocab, sample, "cpu", bf16=False)
            dev_model, _ = load_artifact(result.checkpoint_path)
            on_dev = _scores(dev_model, cpu_vocab, sample, device, bf16=True)
            diff = float(np.abs(on_cpu - on_dev).max())
            checks.append((f"artifact scores on CPU = {device} bf16 (±{SCORE_TOLERANCE})", diff <= SCORE_TOLERANCE,
                           f"max |diff| {diff:.4f}"))
    finally:
        ray.shutdown()

    steady = hist[1:] if len(hist) >= 2 else hist
    rate = float(np.mean([h["samples_per_s"] for h in steady]))
    name = torch.cuda.get_device_name(0) if not args.dry_run_cpu else "CPU (dry run)"
    print_table(f"train_two_tower on {name}: 1 worker, bf16, batch {args.batch_size}, {len(examples):,} examples",
                ["epoch", "loss", "val_loss", "val_recall", "samples/s", "data wait %"],
                [[h["epoch"], round(h["loss"], 4), round(h.get("val_loss", float("nan")), 4),
                  round(h.get("val_recall", float("nan")), 4), round(h["samples_per_s"], 1),
                  round(100 * h.get("data_wait_share", float("nan")), 1)] for h in hist])
    print(f"samples/s (mean of epochs 2+): {rate:,.0f}")
    print_table("GPU path checks", ["check", "ok", "detail"], [[c, "yes" if ok else "NO", d] for c, ok, d in checks])
    path = save("gpu_training_dry_run_cpu" if args.dry_run_cpu else "gpu_training", {
        "device": name, "examples": len(examples), "batch_size": args.batch_size, "epochs": args.epochs,
        "samples_per_s_mean": rate, "history": hist, "checks": [list(c) for c in checks],
        "best_epoch": result.best_epoch, "total_s": time.perf_counter() - wall0,
    })
    print(f"saved {path}; total {time.perf_counter() - wall0:.0f}s")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
