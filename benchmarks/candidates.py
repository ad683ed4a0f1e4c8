"""Multi-source candidates + a LambdaRank ranker against every baseline, on the job's split.

What it measures, on the shop (default scale 1, seed 42) with the evaluation split the training
job uses (``training.split.adaptive_split``: the last 7 days held out; 1,437 validation users at
scale 1; truth = items clicked, carted or bought after the cutoff; each user's purchases are
never recommended):

- the baselines: popularity, item-to-item co-occurrence, EASE (lambda chosen on the training
  side only; scored from a user's whole training history and from the 20 recent items the
  feature service keeps);
- every candidate source alone (co-occurrence and EASE neighbour lists, popularity, category
  affinity x in-category popularity, the user's own recent items, the two-tower model);
- the merged and re-ranked list (``training.candidates.CandidateRanker``), and ablations: each
  source left out, feature groups left out, one training window, graded labels;
- per-user paired differences (ranked minus each baseline) with their standard errors.

Targets (issue 10): recall@10 >= 0.32, NDCG@10 >= 1.10 x co-occurrence's, above EASE on both.

The two-tower source needs a trained model: ``--model-home DIR`` reads the latest ``two_tower``
version of that storage root (e.g. one ``aiplatform quickstart --no-wait --home DIR`` made on the
same shop); without it the study runs the quickstart itself (a few minutes), or skips the source
with ``--no-model``. The model saw all training events, the inner windows' included, so its
scores are slightly optimistic when the ranker is fitted (the report says so).

Usage: python benchmarks/candidates.py [--quick] [--scale 1] [--seed 42] [--model-home DIR | --no-model]
       [--no-ablations]
``--quick``: scale 0.2, no model, no ablations (a minute; at that size the per-user split is used).
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from common import free_port, print_table, save  # noqa: E402

from aiplatform.training.baselines import Ease, EaseTooLarge, paired_difference, per_user_metrics  # noqa: E402
from aiplatform.models.candidates import CandidateConfig, CandidateRanker, Cands, History, ItemTables, dense_source  # noqa: E402
from aiplatform.training.candidates import fit_ranker, purchases  # noqa: E402
from aiplatform.training.evaluate import CooccurrenceBaseline, popularity_ranking  # noqa: E402
from aiplatform.training.split import adaptive_split  # noqa: E402

K, K_LARGE = 10, 50


# ---- the two-tower source ------------------------------------------------------------------------
def _two_tower_encoder(artifact: str, m: int):
    import torch

    from aiplatform.models.two_tower import load_artifact

    model, vocab = load_artifact(artifact)
    cfg = model.config()
    hist_len, n_dense = int(cfg["history_len"]), int(cfg["n_dense"])
    if n_dense not in (12, 13):
        raise SystemExit(f"{artifact}: the study encodes 12 count features (+ purchase_share_7d); "
                         f"this model reads {n_dense}")
    with torch.no_grad():
        item_vecs = model.all_item_embeddings().numpy()

    def source(history: History, tables: ItemTables) -> Cands:
        lists = history.item_lists(tables.item_ids, hist_len, 30.0)
        hist = np.zeros((len(lists), hist_len), np.int64)
        for r, items in enumerate(lists):
            idx = vocab.indices(items)
            idx = idx[idx > 0][:hist_len]
            hist[r, :len(idx)] = idx
        counts = history.counts((1, 7, 30))
        if n_dense == 13:  # the feature service's on-demand purchase share of the last 7 days
            total = counts[:, [1, 4, 7, 10]].sum(axis=1)
            counts = np.c_[counts, np.divide(counts[:, 10], total, out=np.zeros(len(total)), where=total > 0)]
        with torch.no_grad():
            users = model.user_embedding(torch.from_numpy(hist), torch.from_numpy(np.log1p(counts).astype("float32")))
        known = vocab.indices(list(tables.item_ids))
        codes = np.flatnonzero(known > 0)
        rows, items, scores = dense_source(users.numpy(), item_vecs[known[codes]], m)
        return rows, codes[items], scores

    return source


def two_tower_source(models: list[tuple[str, pd.Timestamp]], m: int, used: dict):
    """An ``ExternalSource`` from two-tower artifacts, each with the cutoff of its training data.

    At an inner cutoff ``as_of`` the model trained on the most data up to ``as_of`` answers; if
    every model saw data after ``as_of`` the earliest does, and ``used`` records the leak. The
    user vector is built from the 20 most recent distinct items and the 12 windowed counts (the
    inputs of the model the quickstart trains; pinned here, not read through the feature service);
    exhaustive dot product over the catalogue."""
    encoders = sorted(((cut, _two_tower_encoder(a, m)) for a, cut in models), key=lambda x: x[0])

    def source(history: History, tables: ItemTables, at) -> dict[str, Cands]:
        as_of = at.max() if isinstance(at, pd.Series) else at
        fitting = [(cut, enc) for cut, enc in encoders if cut <= as_of]
        cut, enc = fitting[-1] if fitting else encoders[0]
        used[str(as_of)] = {"model_cutoff": str(cut), "leaks": bool(cut > as_of)}
        return {"two_tower": enc(history, tables)}

    return source


def model_artifacts(args: argparse.Namespace) -> list[tuple[str, pd.Timestamp]]:
    """(artifact uri, training cutoff) of the latest two_tower version in each ``--model-home``
    (or of one quickstart run here)."""
    if args.no_model:
        return []
    from aiplatform.core.storage import Layout
    from aiplatform.registry.registry import ModelRegistry

    homes = list(args.model_home or [])
    if not homes:
        if args.seed != 42:
            raise SystemExit("the quickstart generates the shop with seed 42: use --no-model or --model-home")
        home = tempfile.mkdtemp(prefix="aiplatform-candidates-")
        cmd = [sys.executable, "-m", "aiplatform.cli", "quickstart", "--no-wait", "--scale", str(args.scale),
               "--home", home, "--port", str(free_port())]
        print("training the two-tower model: aiplatform quickstart --no-wait (a few minutes) ...", flush=True)
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"quickstart failed with exit code {proc.returncode}")
        homes = [home]
    out = []
    for home in homes:
        v = ModelRegistry(Layout.at(home)).latest("two_tower")
        out.append((v.artifact_uri, pd.Timestamp(v.lineage["cutoff"])))
    return out


# ---- the study -------------------------------------------------------------------------------------
def metrics_of(recs: list[list[str]], relevant: list[set[str]]) -> dict[str, np.ndarray]:
    out = per_user_metrics(recs, relevant, K)
    out[f"recall@{K_LARGE}"] = per_user_metrics(recs, relevant, K_LARGE)[f"recall@{K_LARGE}"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--quick", action="store_true", help="scale 0.2, no two-tower model, no ablations")
    ap.add_argument("--model-home", action="append",
                    help="storage root holding a trained two_tower model of the same shop; give it twice (a model "
                         "trained up to the evaluation cutoff and one up to the ranker's inner cutoff) to keep the "
                         "ranker's training windows free of the model's knowledge of them")
    ap.add_argument("--no-model", action="store_true", help="leave the two-tower source out")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--min-users", type=int, default=500)
    ap.add_argument("--windows", type=int, help="the ranker's training windows (default: CandidateConfig's)")
    ap.add_argument("--history-events", type=int, help="a user's most recent events the ranker reads")
    ap.add_argument("--history-days", type=float, help="... within this many days")
    args = ap.parse_args()
    if args.quick:
        args.scale, args.no_model, args.no_ablations = 0.2, True, True

    from apps.shop.generate import ShopSize, generate

    frames = generate(ShopSize().scaled(args.scale), seed=args.seed)
    events, items = frames["events"], frames["items"]
    split = adaptive_split(events, 7, min_users=args.min_users)
    print(f"split: {split.name}, {split.n_users} validation users ({split.reason})", flush=True)
    users = sorted(split.truth)
    relevant = [split.truth[u] for u in users]
    config = CandidateConfig()
    if args.windows:
        config.n_windows = args.windows
    if args.history_events:
        config.history_events = args.history_events
    if args.history_days:
        config.history_days = args.history_days
    catalogue = pd.Index(sorted(set(items["item_id"].astype(str))))
    at = split.user_cutoffs if split.kind == "per_user" else split.cutoff
    history = History.from_events(split.train, catalogue, at, users, config.history_events, config.history_days)
    last_items = history.item_lists(np.asarray(catalogue, dtype=object), config.history_len,
                                    config.history_window_days)
    p_rows, p_items = purchases(split.train, catalogue, at, users)
    exclude = [set() for _ in users]
    for r, i in zip(p_rows, p_items, strict=True):
        exclude[r].add(catalogue[i])

    recs: dict[str, list[list[str]]] = {}
    kinds: dict[str, str] = {}
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    popular = popularity_ranking(split.train)
    recs["popularity"] = [[i for i in popular if i not in ex][:K_LARGE] for ex in exclude]
    kinds["popularity"] = "baseline"
    cooc = CooccurrenceBaseline.fit(split.train, popular)
    recs["co-occurrence"] = cooc.recommend(last_items, exclude, K_LARGE)
    kinds["co-occurrence"] = "baseline"
    seconds["baselines (popularity, co-occurrence)"] = time.perf_counter() - t0
    ease_note = ""
    try:
        t0 = time.perf_counter()
        ease = Ease.fit_select(split.train, 7, item_ids=catalogue)
        seconds["EASE (lambda grid on the training side + refit)"] = time.perf_counter() - t0
        recs["EASE (20 recent items)"] = ease.recommend(last_items, exclude, K_LARGE)
        recs["EASE (whole history)"] = ease.recommend_rows(ease.user_rows(split.train, users), exclude, K_LARGE)
        kinds["EASE (20 recent items)"] = kinds["EASE (whole history)"] = "baseline"
        ease_note = f"lambda {ease.lam:g} chosen on the training side ({ease.selection['inner_users']} inner users)"
        config.ease_lambda = ease.lam
    except EaseTooLarge as e:
        ease_note = str(e)
    print(f"EASE: {ease_note}", flush=True)

    models = model_artifacts(args)
    tt_used: dict = {}
    external = two_tower_source(models, config.per_source, tt_used) if models else None

    def fit_and_rank(cfg: CandidateConfig, ext, tag: str) -> tuple[list[list[str]], CandidateRanker]:
        t = time.perf_counter()
        ranker = fit_ranker(split.train, items, cfg, external=ext, log=lambda s: print(f"  [{tag}] {s}"))
        fitted = time.perf_counter() - t
        t = time.perf_counter()
        ext_c = ext(history, ranker.tables, split.cutoff) if ext else None
        out = ranker.recommend(history, K_LARGE, external=ext_c, exclude=(p_rows, p_items))
        seconds[f"{tag}: fit"] = fitted
        seconds[f"{tag}: rank {len(users)} users"] = time.perf_counter() - t
        return out, ranker

    ranked, ranker = fit_and_rank(config, external, "ranked")
    name = "merged + ranked (LambdaRank)" + ("" if external else ", no two-tower")
    recs[name] = ranked
    kinds[name] = "served pipeline"
    ext_c = external(history, ranker.tables, split.cutoff) if external else None
    for source in (*config.sources, *(["two_tower"] if external else [])):
        recs[f"source: {source}"] = ranker.source_ranking(history, source, K_LARGE, external=ext_c,
                                                          exclude=(p_rows, p_items))
        kinds[f"source: {source}"] = "single source"

    # what serving loses if it only has the feature service's 20 recent items (no types, no times)
    thin = History.from_lists(users, last_items, catalogue)
    thin_ext = external(thin, ranker.tables, split.cutoff) if external else None
    recs["merged + ranked, user known only by last_items"] = ranker.recommend(thin, K_LARGE, external=thin_ext,
                                                                               exclude=(p_rows, p_items))
    kinds["merged + ranked, user known only by last_items"] = "serving variant"

    per_user = {n: metrics_of(r, relevant) for n, r in recs.items()}
    ablations: dict[str, dict] = {}
    if not args.no_ablations:
        variants: dict[str, tuple[CandidateConfig, object]] = {}
        if external:
            variants["without the two-tower source"] = (CandidateConfig(**{**config.__dict__}), None)
        for s in config.sources:
            variants[f"without source {s}"] = (CandidateConfig(**{**config.__dict__, "sources": tuple(
                x for x in config.sources if x != s)}), external)
        names = ranker.feature_names
        groups = {
            "source scores and ranks only": [f for f in names if f.endswith(("_score", "_rank")) or f == "n_sources"],
            "without category-affinity features": [f for f in names if not f.startswith(("aff", "log_catpop",
                                                                                       "cat_rank", "same_cat"))],
            "without the user's own-item features": [f for f in names if not f.startswith("own_")],
        }
        for label, feats in groups.items():
            variants[label] = (CandidateConfig(**{**config.__dict__, "features": tuple(feats)}), external)
        variants["heuristic category affinity (no category model)"] = (
            CandidateConfig(**{**config.__dict__, "category_model": False}), external)
        variants["one training window"] = (CandidateConfig(**{**config.__dict__, "n_windows": 1}), external)
        variants["four training windows"] = (CandidateConfig(**{**config.__dict__, "n_windows": 4}), external)
        variants["graded labels (click 1, cart 2, purchase 3)"] = (
            CandidateConfig(**{**config.__dict__, "label": "graded"}), external)
        for label, (cfg, ext) in variants.items():
            out, _ = fit_and_rank(cfg, ext, label)
            m = metrics_of(out, relevant)
            ablations[label] = {k: float(v.mean()) for k, v in m.items()}
            per_user[f"ablation: {label}"] = m
            print(f"  {label}: recall@{K} {ablations[label][f'recall@{K}']:.4f}, NDCG@{K} "
                  f"{ablations[label][f'ndcg@{K}']:.4f}", flush=True)

    means = {n: {k: float(v.mean()) for k, v in m.items()} for n, m in per_user.items()}
    rows = [[n, kinds.get(n, "ablation"), m[f"recall@{K}"], m[f"recall@{K_LARGE}"], m[f"ndcg@{K}"]]
            for n, m in means.items() if not n.startswith("ablation: ")]
    rows.sort(key=lambda r: r[2])
    print_table(f"shop scale {args.scale:g}, seed {args.seed}: {split.name}, {split.n_users} validation users",
                ["ranker", "kind", f"recall@{K}", f"recall@{K_LARGE}", f"NDCG@{K}"], rows)
    if ablations:
        print_table("ablations of the merged + ranked list (each refitted)",
                    ["variant", f"recall@{K}", f"recall@{K_LARGE}", f"NDCG@{K}"],
                    [[name, *[means[name][k] for k in (f"recall@{K}", f"recall@{K_LARGE}", f"ndcg@{K}")]]] +
                    [[n, a[f"recall@{K}"], a[f"recall@{K_LARGE}"], a[f"ndcg@{K}"]] for n, a in ablations.items()])
    paired = {}
    for base in [n for n, kind in kinds.items() if kind == "baseline"]:
        paired[base] = {}
        for metric in (f"recall@{K}", f"ndcg@{K}"):
            mean, se = paired_difference(per_user[name][metric], per_user[base][metric])
            paired[base][metric] = {"difference": mean, "se": se, "z": mean / se if se > 0 else float("nan"),
                                    "beats_by_2se": bool(mean > 2 * se)}
    print_table(f"{name} minus each baseline: per-user paired difference (standard error)",
                ["baseline", f"recall@{K} diff", "se", "z", f"NDCG@{K} diff", "se", "z", "> 2 se on both"],
                [[b, p[f"recall@{K}"]["difference"], p[f"recall@{K}"]["se"], f"{p[f'recall@{K}']['z']:.1f}",
                  p[f"ndcg@{K}"]["difference"], p[f"ndcg@{K}"]["se"], f"{p[f'ndcg@{K}']['z']:.1f}",
                  "yes" if p[f"recall@{K}"]["beats_by_2se"] and p[f"ndcg@{K}"]["beats_by_2se"] else "NO"]
                 for b, p in paired.items()])
    served, co = means[name], means["co-occurrence"]
    ease_best = max((means[n] for n in means if n.startswith("EASE")), key=lambda m: m[f"recall@{K}"], default=None)
    targets = {
        f"recall@{K} >= 0.32": served[f"recall@{K}"] >= 0.32,
        f"NDCG@{K} >= 1.10 x co-occurrence ({1.1 * co[f'ndcg@{K}']:.4f})": served[f"ndcg@{K}"] >= 1.1 * co[f"ndcg@{K}"],
    }
    if ease_best is not None:
        targets["above EASE on recall@10 and NDCG@10"] = (served[f"recall@{K}"] > ease_best[f"recall@{K}"]
                                                          and served[f"ndcg@{K}"] > ease_best[f"ndcg@{K}"])
    print_table("targets (issue 10)", ["target", "met"], [[t, "yes" if ok else "NO"] for t, ok in targets.items()])
    print_table("seconds (this machine, shared)", ["step", "seconds"], [[k, v] for k, v in seconds.items()])
    importance = dict(zip(ranker.feature_names, ranker.booster.feature_importance("gain").tolist(), strict=True))
    path = save("candidates" + ("_quick" if args.quick else ""), {
        "scale": args.scale, "seed": args.seed, "split": split.summary(), "ease": ease_note,
        "two_tower_models": [(a, str(c)) for a, c in models], "two_tower_per_cutoff": tt_used, "config": {k: v for k, v in config.__dict__.items()},
        "results": means, "ablations": ablations, "paired": paired, "targets": targets, "seconds": seconds,
        "ranker": ranker.report, "feature_importance_gain": dict(sorted(importance.items(), key=lambda kv: -kv[1]))})
    print(f"saved {path}")


if __name__ == "__main__":
    main()
