"""How good can a recommender get on the shop data? The model against baselines and ceilings.

The issue asks for the two-tower model's recall@10 to be 3x the popularity baseline's on the
default shop. This benchmark puts that target next to what the data allows, on the training
job's own split (the last 7 days held out, the same truth, the same purchase exclusion):

- popularity and item-to-item co-occurrence: the baselines the training job reports;
- two history-only estimators that know how the shop was generated (a user's sessions are
  about their preferred categories; items within a category follow a fixed popularity):
  session-level category affinity with a 7-day half-life, and a small network trained on the
  same history (earlier cutoffs) to predict next week's categories. They see only what a
  model sees, so they estimate the ceiling of any model on this data;
- two oracles that read the generator's hidden parameters (``apps.shop.generate.Latent``):
  each user's true category preferences at the cutoff, and with the drift that happens
  during the held-out week. No model can reach them; they show where the remaining error is;
- the served recommender of a real ``aiplatform quickstart`` run on the same data (multi-source
  candidates merged by a LambdaRank ranker), the two-tower alone and EASE, from its registry
  metrics; the script checks that its popularity figure equals the one computed here, i.e.
  that both scored the same users against the same truth.

Usage: python benchmarks/quality_ceiling.py [--scale 1] [--seed 42] [--no-model]
       [--model-home DIR (read the model's metrics from an existing storage root)]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import free_port, print_table, save  # noqa: E402

DAY_US = 86_400 * 1_000_000
SESSION_GAP_US = 30 * 60 * 1_000_000


def sessions(events: pd.DataFrame, item_cat: np.ndarray, item_index: pd.Index) -> pd.DataFrame:
    """One row per browsing session (30-minute gap): user, start time (us), main category."""
    ev = events.sort_values(["user_id", "timestamp"], kind="stable")
    t = pd.to_datetime(ev["timestamp"], utc=True).dt.as_unit("us").astype("int64").to_numpy()
    user = ev["user_id"].astype(str).to_numpy(dtype=object)
    new = np.ones(len(ev), bool)
    new[1:] = (user[1:] != user[:-1]) | (t[1:] - t[:-1] > SESSION_GAP_US)
    sid = np.cumsum(new) - 1
    cat = item_cat[item_index.get_indexer(ev["item_id"].astype(str))]
    counts = pd.DataFrame({"sid": sid, "cat": cat}).value_counts().reset_index(name="n")
    main = counts.sort_values(["sid", "n", "cat"], ascending=[True, False, True]).drop_duplicates("sid")
    return pd.DataFrame({"user_id": user[new], "t": t[new], "cat": main.sort_values("sid")["cat"].to_numpy()})


def affinity(sess: pd.DataFrame, users: list[str], n_cat: int, at_us: int, half_life_days: float) -> np.ndarray:
    """[users, categories] session counts before ``at_us``, each weighted 0.5 ** (age / half-life)."""
    s = sess[sess["t"] < at_us]
    row = pd.Index(users).get_indexer(s["user_id"])
    ok = row >= 0
    w = 0.5 ** ((at_us - s["t"].to_numpy()[ok]) / (half_life_days * DAY_US))
    out = np.zeros((len(users), n_cat))
    np.add.at(out, (row[ok], s["cat"].to_numpy()[ok]), w)
    return out


def normalise(x: np.ndarray) -> np.ndarray:
    total = x.sum(axis=1, keepdims=True)
    return np.divide(x, total, out=np.full_like(x, 1.0 / x.shape[1]), where=total > 0)


def learned_estimator(sess: pd.DataFrame, users: list[str], n_cat: int, first_us: int, cutoff_us: int,
                      seed: int = 0) -> np.ndarray:
    """[users, categories] next-week category shares at the cutoff, from a network trained on
    the history alone: at daily cutoffs up to a week before the real one, per-category
    features (affinity at four half-lives, days since the last session in it) -> the sessions
    of the following week. One small MLP shared by all categories, softmax across them."""
    import torch

    half_lives = (2.0, 7.0, 21.0, 1e9)

    def features(at_us: int) -> np.ndarray:
        parts = [normalise(affinity(sess, users, n_cat, at_us, h)) for h in half_lives]
        s = sess[sess["t"] < at_us]
        last = np.full((len(users), n_cat), 60.0)
        row = pd.Index(users).get_indexer(s["user_id"])
        np.minimum.at(last, (row, s["cat"].to_numpy()), (at_us - s["t"].to_numpy()) / DAY_US)
        return np.stack([*parts, np.log1p(last)], axis=-1)

    xs, ys = [], []
    for at in range(first_us + 14 * DAY_US, cutoff_us - 7 * DAY_US + 1, DAY_US):
        x = features(at)
        nxt = sess[(sess["t"] >= at) & (sess["t"] < at + 7 * DAY_US)]
        y = np.zeros((len(users), n_cat))
        np.add.at(y, (pd.Index(users).get_indexer(nxt["user_id"]), nxt["cat"].to_numpy()), 1.0)
        keep = (y.sum(1) > 0) & (x[:, :, 0].sum(1) > 0)
        xs.append(x[keep])
        ys.append(y[keep])
    x = torch.tensor(np.concatenate(xs), dtype=torch.float32)
    y = torch.tensor(np.concatenate(ys), dtype=torch.float32)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[2], 32), torch.nn.ReLU(), torch.nn.Linear(32, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 1))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in range(30):
        for b in torch.randperm(len(x)).split(1024):
            loss = -(torch.log_softmax(net(x[b]).squeeze(-1), -1) * y[b]).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return torch.softmax(net(torch.tensor(features(cutoff_us), dtype=torch.float32)).squeeze(-1), -1).numpy()


def top_k(scores: np.ndarray, item_ids: np.ndarray, exclude: list[set[str]], k: int) -> list[list[str]]:
    index = pd.Index(item_ids)
    out = []
    for row, ex in zip(scores, exclude, strict=True):
        row = row.astype(float).copy()
        idx = index.get_indexer(list(ex))
        row[idx[idx >= 0]] = -np.inf
        order = np.lexsort((np.arange(len(row)), -row))[:k]
        out.append([item_ids[i] for i in order if np.isfinite(row[i])])
    return out


def model_metrics(args: argparse.Namespace) -> dict | None:
    """The two-tower model's metrics from a quickstart run on the same shop (or ``--model-home``)."""
    if args.no_model:
        return None
    from aiplatform.core.storage import Layout
    from aiplatform.registry.registry import ModelRegistry

    if args.model_home:
        return ModelRegistry(Layout.at(args.model_home)).latest("two_tower").metrics
    if args.seed != 42:
        raise SystemExit("the quickstart generates the shop with seed 42: use --no-model or --model-home")
    with tempfile.TemporaryDirectory(prefix="aiplatform-ceiling-") as home:
        cmd = [sys.executable, "-m", "aiplatform.cli", "quickstart", "--no-wait", "--scale", str(args.scale),
               "--home", home, "--port", str(free_port())]
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        print("training the model: aiplatform quickstart --no-wait (a few minutes) ...", flush=True)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"quickstart failed with exit code {proc.returncode}")
        return ModelRegistry(Layout.at(home)).latest("two_tower").metrics


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--holdout-days", type=int, default=7)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--no-model", action="store_true", help="skip training the two-tower model")
    ap.add_argument("--model-home", help="read the model's metrics from this storage root instead")
    args = ap.parse_args()

    from apps.shop.generate import ShopSize, generate_with_latent
    from aiplatform.features.pipeline import frame_from_events
    from apps.shop.features import recommender_user
    from aiplatform.training.evaluate import (CooccurrenceBaseline, ndcg_at_k, popularity_ranking,
                                              recall_at_k, split_by_time)

    frames, latent = generate_with_latent(ShopSize().scaled(args.scale), seed=args.seed)
    events, items = frames["events"], frames["items"]
    cutoff, train, truth = split_by_time(events, args.holdout_days)
    boundary = cutoff + pd.Timedelta(microseconds=1)
    # the validation users' rows of the shop's feature service at the cutoff (in memory: the
    # feature engine + the point-in-time join, as the training job reads them from the store)
    at_cutoff = pd.DataFrame({"user_id": sorted(truth), "event_timestamp": cutoff})
    ctx = frame_from_events(recommender_user, train, at_cutoff)
    users = ctx["user_id"].astype(str).tolist()
    exclude = [set(map(str, x)) for x in ctx["purchased_items"]]
    histories = [list(map(str, x)) for x in ctx["last_items"]]
    relevant = [truth[u] for u in users]

    item_ids = items["item_id"].astype(str).to_numpy(dtype=object)
    index = pd.Index(item_ids)
    n_cat = len(latent.categories)
    item_cat = pd.Index(latent.categories).get_indexer(items["category"])
    # within-category popularity seen in training (what a model can know) and the true one
    counts = np.bincount(index.get_indexer(train["item_id"].astype(str)), minlength=len(item_ids)).astype(float)
    in_cat_seen = counts / np.maximum(np.bincount(item_cat, weights=counts, minlength=n_cat)[item_cat], 1e-9)
    in_cat_true = latent.pop_weight / np.bincount(latent.item_cat, weights=latent.pop_weight)[latent.item_cat]
    latent_rows = np.array([int(u[1:]) for u in users])  # generator user ids are u<index>

    first_us = int(pd.to_datetime(train["timestamp"], utc=True).min().value // 1000)
    cutoff_us = int(boundary.value // 1000)
    sess = sessions(train, item_cat, index)
    cutoff_day = (cutoff - latent.start) / pd.Timedelta(days=1)
    holdout_days = range(int(np.floor(cutoff_day)), int(np.ceil(cutoff_day + args.holdout_days)))

    def mix(pc: np.ndarray) -> np.ndarray:  # 10% of sessions explore a random category
        return 0.9 * pc + 0.1 / n_cat

    rankers: dict[str, tuple[str, list[list[str]]]] = {}
    popular = popularity_ranking(train)
    rankers["popularity (last 7 days, funnel-weighted)"] = ("baseline", [
        [i for i in popular if i not in ex][: args.k] for ex in exclude])
    cooc = CooccurrenceBaseline.fit(train, popular)
    rankers["item-to-item co-occurrence"] = ("baseline", cooc.recommend(histories, exclude, args.k))
    pc = normalise(affinity(sess, users, n_cat, cutoff_us, half_life_days=7.0))
    rankers["category affinity x in-category popularity"] = (
        "history only", top_k(mix(pc)[:, item_cat] * in_cat_seen, item_ids, exclude, args.k))
    pc = learned_estimator(sess, users, n_cat, first_us, cutoff_us)
    rankers["learned next-week category estimator"] = (
        "history only", top_k(pc[:, item_cat] * in_cat_seen, item_ids, exclude, args.k))
    pc = latent.category_probabilities([int(np.floor(cutoff_day))])[latent_rows]
    rankers["oracle: true preferences at the cutoff"] = (
        "hidden parameters", top_k(pc[:, latent.item_cat] * in_cat_true, item_ids, exclude, args.k))
    pc = latent.category_probabilities(holdout_days)[latent_rows]
    rankers["oracle: true preferences incl. drift in the held-out week"] = (
        "hidden parameters", top_k(pc[:, latent.item_cat] * in_cat_true, item_ids, exclude, args.k))

    k = args.k
    results = {name: {"uses": uses,
                      f"recall@{k}": float(np.mean([recall_at_k(r, t, k) for r, t in zip(recs, relevant)])),
                      f"ndcg@{k}": float(np.mean([ndcg_at_k(r, t, k) for r, t in zip(recs, relevant)]))}
               for name, (uses, recs) in rankers.items()}
    pop = results["popularity (last 7 days, funnel-weighted)"][f"recall@{k}"]
    metrics = model_metrics(args)
    if metrics is not None:
        same_split = abs(metrics["popularity"][f"recall@{k}"] - pop) < 1e-9
        uses = "history only" + ("" if same_split else " (DIFFERENT split: not comparable)")
        served = metrics.get("ranker", {}).get("attached", False)
        named = {"model": "served recommender: multi-source candidates + LambdaRank (aiplatform quickstart)"
                 if served else "served recommender: the two-tower alone (aiplatform quickstart)",
                 "two_tower": "two-tower model alone (aiplatform quickstart)",
                 "ease": "EASE (the training job's baseline, lambda chosen on the training side)"}
        for key, name in named.items():
            if isinstance(metrics.get(key), dict) and (key != "two_tower" or served):
                results[name] = {"uses": uses if key != "ease" else "baseline",
                                 f"recall@{k}": metrics[key][f"recall@{k}"], f"ndcg@{k}": metrics[key][f"ndcg@{k}"]}
    rows = [[name, r["uses"], r[f"recall@{k}"], r[f"ndcg@{k}"], f"{r[f'recall@{k}'] / pop:.2f}x"]
            for name, r in sorted(results.items(), key=lambda kv: kv[1][f"recall@{k}"])]
    print_table(f"recall@{k} on the shop (scale {args.scale:g}, seed {args.seed}): {len(users)} validation users, "
                f"cutoff {cutoff}; 3x popularity = {3 * pop:.4f}",
                ["ranker", "uses", f"recall@{k}", f"ndcg@{k}", "x popularity"], rows)
    path = save("quality_ceiling", {"scale": args.scale, "seed": args.seed, "cutoff": str(cutoff),
                                    "validation_users": len(users), "results": results})
    print(f"saved {path}")
    print(json.dumps({n: round(r[f"recall@{k}"] / pop, 3) for n, r in results.items()}))


if __name__ == "__main__":
    main()
