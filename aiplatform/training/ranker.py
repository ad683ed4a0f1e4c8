"""Training, batch scoring and offline evaluation of the ranker (models/ranker.py).

Each training example (an event and the user's context just before it, from the feature
layer) becomes one *list*: the event's item (gain from ``LABEL_GAINS``) followed by sampled
negatives (gain 0). What makes the ranker help rather than hurt is that its lists look like
what it will rank at serving time (measured on the shop data, see the task report):

- only examples whose item the retrieval model puts in its top ``hard_pool`` make a list
  (``retrieved_positives_only``). Serving only ranks retrieved items; a list whose positive
  retrieval missed, next to hard negatives retrieval ranked high, teaches "a high two-tower
  score means negative", and the ranker then re-orders good candidates worse than retrieval;
- hard negatives: items of that top ``hard_pool`` the user did not interact with, i.e. not the
  target and not touched within ``negative_horizon_days`` after it (the synthetic shopper views
  many items of a category over a few days: without the horizon, tomorrow's click is today's
  "negative");
- random negatives: uniform over the catalogue, so the ranker still knows that an item of an
  unrelated category is a bad answer.

Lists are built once on Ray Data (one ``map_batches`` that also computes the two-tower score
of every (user, candidate) pair) and trained with a Ray Train V2 ``TorchTrainer`` that reads
its shard with ``iter_torch_batches``, as ``training/train.py`` does.

Evaluation (``evaluate_ranker``) compares, for the same users, the retrieval order of the top
``n_candidates`` with the ranker's order of those same candidates: the question it answers is
"does adding the ranker after retrieval improve what the user sees?".
"""

import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from aiplatform.core import storage
from aiplatform.core.errors import DataValidationError, UserInputError
from aiplatform.core.schemas import EVENT_TYPES
from aiplatform.models.inputs import UserInputSpec, as_item_list, encode_dense
from aiplatform.models.ranker import (
    LABEL_GAINS,
    RANKER_SUBDIR,
    RankerModel,
    is_ranker_artifact,
    listwise_loss,
    load_ranker,
    read_ranker_extra,
    rerank,
    save_ranker,
)
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel
from aiplatform.training.config import RankerConfig
from aiplatform.training.evaluate import ndcg_at_k, recall_at_k
from aiplatform.training.reliability import RunStorage

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

ENCODE_BATCH_SIZE = 2048
LABEL_COLUMNS: tuple[str, ...] = ("item_id", "event_type")


def example_columns(inputs: UserInputSpec) -> list[str]:
    """Columns of the ranker's training examples: the label and the model inputs."""
    return [*LABEL_COLUMNS, *inputs.columns]


@dataclass
class RankerResult:
    model: RankerModel
    path: str
    """The ranker artifact (a Ray Train checkpoint directory that ``load_ranker`` reads): a local
    path, or a URI when the runs are in the object store."""
    metrics: dict
    duration_s: float


# ---- helpers shared by training and evaluation ------------------------------------------------
def item_feature_names(item_features: pd.DataFrame | None, key: str = "item_id") -> list[str]:
    """The numeric columns of an item feature frame (everything but the key and timestamps)."""
    if item_features is None:
        return []
    return [c for c in item_features.columns
            if c != key and pd.api.types.is_numeric_dtype(item_features[c]) and not c.startswith("_")]


def item_count_matrix(vocab: ItemVocab, item_features: pd.DataFrame | None,
                      names: list[str] | None = None) -> np.ndarray | None:
    """[n_items + 1, len(names)] raw item feature values by item index from a frame with
    ``item_id`` and ``names`` (default: its numeric columns), e.g. the item popularity view's
    latest row per item at the training cutoff (``features.pipeline.latest_item_rows``); None
    when no frame is given. Items without a row get zeros."""
    if item_features is None:
        return None
    names = item_feature_names(item_features) if names is None else list(names)
    missing = [c for c in ("item_id", *names) if c not in item_features.columns]
    if missing:
        raise DataValidationError("item features", f"missing column(s) {', '.join(missing)}",
                                  expected="item_id and " + ", ".join(names))
    out = np.zeros((vocab.n_items + 1, len(names)), dtype=np.float32)
    idx = vocab.indices(item_features["item_id"].astype(str).tolist())
    known = idx > 0
    values = item_features.loc[known, names].astype("float64").to_numpy(dtype=np.float32, na_value=np.nan)
    out[idx[known]] = np.nan_to_num(values, nan=0.0)
    return out


@torch.no_grad()
def retrieve(
    model: TwoTowerModel, vocab: ItemVocab, histories: list[list[str]], dense: np.ndarray, n: int,
    exclude: list[list[str]] | None = None, batch_size: int = 1024,
) -> tuple[np.ndarray, np.ndarray]:
    """Exhaustive two-tower top-``n``: (item indices [B, n], cosine scores [B, n]); excluded
    items and padding get index 0 and score -inf (so they sort last). ``dense``: raw values."""
    model.eval()
    item_vecs = model.all_item_embeddings()
    n_eff = min(n, item_vecs.shape[0] - 1)
    idx_out, score_out = [], []
    for s in range(0, len(histories), batch_size):
        hist, dense_t = vocab.encode_users(histories[s:s + batch_size], dense[s:s + batch_size], model.history_len)
        scores = model.user_embedding(hist, dense_t) @ item_vecs.T
        scores[:, 0] = float("-inf")
        for row, ex in enumerate((exclude or [[]] * len(histories))[s:s + batch_size]):
            ix = vocab.indices(list(ex)) if ex else np.zeros(0, np.int64)
            ix = ix[ix > 0]
            if len(ix):
                scores[row, torch.from_numpy(ix)] = float("-inf")
        top = torch.topk(scores, n_eff, dim=1)
        idx = top.indices.numpy().copy()
        val = top.values.numpy().copy()
        idx[~np.isfinite(val)] = 0
        idx_out.append(idx)
        score_out.append(val)
    if not idx_out:
        return np.zeros((0, n_eff), np.int64), np.zeros((0, n_eff), np.float32)
    return np.concatenate(idx_out), np.concatenate(score_out).astype(np.float32)


@torch.no_grad()
def retrieval_scores(model: TwoTowerModel, vocab: ItemVocab, hist: np.ndarray, dense: np.ndarray,
                     cands: np.ndarray) -> np.ndarray:
    """[B, N] two-tower cosine of each (user, candidate index) pair (``dense``: encoded values)."""
    model.eval()
    u = model.user_embedding(torch.as_tensor(hist), torch.as_tensor(dense))  # [B, D]
    v = model.item_embedding(torch.as_tensor(cands).reshape(-1)).reshape(*cands.shape, -1)
    return torch.einsum("bd,bnd->bn", u, v).numpy().astype(np.float32)


# ---- data: examples -> lists ------------------------------------------------------------------------
class ListEncoder:
    """Ray Data UDF: example rows -> one list each: ``hist`` [L], ``dense`` [n_dense], ``cands`` [N]
    (positive first), ``gains`` [N], ``rscore`` [N] (two-tower scores, 0 without a model)."""

    def __init__(self, vocab: ItemVocab, config: RankerConfig, retrieval_model: TwoTowerModel | None,
                 inputs: UserInputSpec) -> None:
        self.vocab, self.cfg, self.retrieval, self.inputs = vocab, config, retrieval_model, inputs
        self.min_rank = EVENT_TYPES.index(config.min_event_type)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        cfg, vocab, spec = self.cfg, self.vocab, self.inputs
        columns = example_columns(spec)
        missing = [c for c in columns if c not in batch]
        if missing:
            raise ValueError(f"ranker examples lack column(s) {missing}; expected {columns}")
        etype = pd.Series(batch["event_type"], dtype=object)
        rank = etype.map({t: i for i, t in enumerate(EVENT_TYPES)}).fillna(0).to_numpy()
        pos = vocab.indices(batch["item_id"])
        keep = (rank >= self.min_rank) & (pos > 0)
        pos = pos[keep]
        gain = etype[keep].map(LABEL_GAINS).fillna(LABEL_GAINS["view"]).to_numpy(np.float32)
        kept = {c: np.asarray(batch[c])[keep] for c in spec.columns}
        last = spec.histories(kept)
        raw = spec.dense_values(kept).reshape(len(last), spec.n_dense)
        hist, dense = vocab.encode_history(last, spec.history_len), encode_dense(raw)
        B, n_items = len(pos), vocab.n_items
        # Seeded by the batch's content, so a re-execution draws the same negatives.
        rng = np.random.default_rng([self.cfg.seed, int(pos.sum()) if B else 0, B])
        n_hard = cfg.n_hard if self.retrieval is not None else 0
        n_rand = cfg.n_random + (cfg.n_hard - n_hard)
        negs = []
        filter_retrieved = self.retrieval is not None and cfg.retrieved_positives_only
        if (n_hard or filter_retrieved) and B:
            top, _ = retrieve(self.retrieval, vocab, last, raw, cfg.hard_pool)
            if filter_retrieved:
                # Serving only ever ranks retrieved items: a list whose positive retrieval missed
                # teaches "a high two-tower score means negative", the opposite of the truth.
                hit = (top == pos[:, None]).any(axis=1)
                pos, gain, hist, dense, top = pos[hit], gain[hit], hist[hit], dense[hit], top[hit]
                sel = np.flatnonzero(keep)[hit]
                keep = np.zeros_like(keep)
                keep[sel] = True
                B = len(pos)
        if n_hard and B:
            if top.shape[1] < n_hard:
                top = np.pad(top, ((0, 0), (0, n_hard - top.shape[1])))
            # "retrieved, but not interacted with": not the target and not touched within the
            # horizon after it; without future items, not a recent item either
            bad = (top == 0) | (top == pos[:, None])
            if "future_items" in batch:
                fut = [as_item_list(x) for x, k in zip(batch["future_items"], keep, strict=True) if k]
                future = vocab.encode_history(fut, history_len=max([1, *(len(x) for x in fut)]))
                bad |= (top[:, :, None] == future[:, None, :]).any(-1)
            else:
                bad |= (top[:, :, None] == hist[:, None, :]).any(-1)
            eligible = ~bad & (np.cumsum(~bad, axis=1) <= cfg.hard_pool)
            pick = np.argsort(np.where(eligible, rng.random(top.shape), 2.0), axis=1)[:, :n_hard]
            hard = np.take_along_axis(top, pick, axis=1)
            ok = np.take_along_axis(eligible, pick, axis=1)
            fill = rng.integers(1, n_items + 1, hard.shape)  # a tiny catalogue: top up at random
            fill = np.where(fill == pos[:, None], fill % n_items + 1, fill)
            hard = np.where(ok, hard, fill)
            negs.append(hard)
        if n_rand:
            r = rng.integers(1, n_items + 1, (B, n_rand))
            r = np.where(r == pos[:, None], r % n_items + 1, r)  # never the positive itself
            negs.append(r)
        cands = np.concatenate([pos[:, None], *negs], axis=1).astype(np.int64)
        gains = np.zeros(cands.shape, np.float32)
        gains[:, 0] = gain
        if self.retrieval is not None and cfg.use_retrieval_score and B:
            rscore = retrieval_scores(self.retrieval, vocab, hist, dense, cands)
        else:
            rscore = np.zeros(cands.shape, np.float32)
        return {"hist": hist, "dense": dense, "cands": cands, "gains": gains, "rscore": rscore}


class _FutureItems:
    """Ray Data ``map_groups`` UDF (one user per call): adds ``future_items``, the distinct
    items the user touches in (t, t + horizon] after each example. Without it, a hard negative
    is often an item the user views the next day: the ranker would learn to push down exactly
    the items it should rank first."""

    def __init__(self, horizon_days: float) -> None:
        self.horizon_us = int(horizon_days * 86_400 * 1_000_000)

    def __call__(self, group: pd.DataFrame) -> pd.DataFrame:
        group = group.sort_values("timestamp", kind="stable").reset_index(drop=True)
        t = pd.to_datetime(group["timestamp"], utc=True).dt.as_unit("us").astype("int64").to_numpy()
        items = group["item_id"].astype(str).to_numpy(dtype=object)
        lo = np.searchsorted(t, t, side="right")
        hi = np.searchsorted(t, t + self.horizon_us, side="right")
        group["future_items"] = [sorted(set(items[a:b])) for a, b in zip(lo, hi, strict=True)]
        return group


def _future_items_fn(horizon_days: float):
    """A plain function for ``map_groups`` (it needs a ``__name__``; a callable instance lacks one)."""
    add = _FutureItems(horizon_days)

    def future_items(group: pd.DataFrame) -> pd.DataFrame:
        return add(group)

    return future_items


def _as_dataset(examples: "ray.data.Dataset | pd.DataFrame", inputs: UserInputSpec,
                horizon_days: float = 0.0) -> "ray.data.Dataset":
    import ray.data

    columns = example_columns(inputs)
    expected = f"the label and the inputs of feature service {inputs.service!r}: " + ", ".join(columns)
    if isinstance(examples, pd.DataFrame):
        missing = [c for c in columns if c not in examples.columns]
        if missing:
            raise DataValidationError("ranker examples", f"missing column(s) {', '.join(missing)}", expected=expected)
        if examples.empty:
            raise DataValidationError("ranker examples", "no rows", expected="at least one training example")
        cols = list(columns) + [c for c in ("user_id", "timestamp") if c in examples.columns]
        frame = examples[cols].reset_index(drop=True)
        chunk = max(1, -(-len(frame) // 8))
        # Arrow tables, so list columns stay Arrow lists (from_pandas turns a column of numpy
        # arrays into a tensor extension that the per-user grouping cannot convert back)
        ds = ray.data.from_arrow([pa.Table.from_pandas(frame.iloc[s:s + chunk], preserve_index=False)
                                  for s in range(0, len(frame), chunk)])
    else:
        ds = examples
    schema = ds.schema()
    names = set(schema.names) if schema is not None else set()
    missing = [c for c in columns if c not in names]
    if schema is not None and missing:
        raise DataValidationError("ranker examples", f"missing column(s) {', '.join(missing)}", expected=expected)
    if horizon_days > 0 and {"user_id", "timestamp"} <= names:
        return ds.select_columns([*columns, "user_id", "timestamp"]).groupby("user_id").map_groups(
            _future_items_fn(horizon_days), batch_format="pandas")
    return ds.select_columns(list(columns))


# ---- the per-worker loop -------------------------------------------------------------------------
def _no_buffer_sync_kwargs() -> dict[str, bool]:
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


def _ranker_loop_per_worker(loop_config: dict[str, Any]) -> list[dict]:
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cfg = RankerConfig(**loop_config["config"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    random.seed(cfg.seed), np.random.seed(cfg.seed), torch.manual_seed(cfg.seed)
    model = RankerModel(**loop_config["model_config"])
    if loop_config.get("item_counts_ref") is not None:
        model.set_item_counts(ray.get(loop_config["item_counts_ref"]))
    history: list[dict] = []
    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            model = load_ranker(d)
            extra = read_ranker_extra(d)
            start_epoch, history = int(extra.get("epoch", 0)), list(extra.get("history", []))
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=_no_buffer_sync_kwargs())
    base = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    device = ray.train.torch.get_device()
    device = device[0] if isinstance(device, list) else device
    shard = ray.train.get_dataset_shard("train")
    for epoch in range(start_epoch, cfg.epochs):
        torch.manual_seed(cfg.seed + 1000 * epoch + rank)
        model.train()
        started = time.perf_counter()
        loss_sum, n_rows = 0.0, 0
        batches = shard.iter_torch_batches(
            batch_size=cfg.batch_size,
            dtypes={"hist": torch.long, "dense": torch.float32, "cands": torch.long,
                    "gains": torch.float32, "rscore": torch.float32},
            local_shuffle_buffer_size=cfg.shuffle_buffer or None,
            local_shuffle_seed=(cfg.seed + 1000 * epoch + rank) if cfg.shuffle_buffer else None,
        )
        joined = model.join() if isinstance(model, DistributedDataParallel) else _null()
        with joined:
            for b in batches:
                scores = model(b["hist"], b["dense"], b["cands"], b["rscore"])
                loss = listwise_loss(scores, b["gains"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_sum += float(loss.detach()) * len(b["cands"])
                n_rows += len(b["cands"])
        totals = torch.tensor([loss_sum, float(n_rows)], dtype=torch.float64, device=device)
        if world > 1 and dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        elapsed = time.perf_counter() - started
        metrics = {"epoch": epoch + 1, "loss": float(totals[0] / totals[1]) if totals[1] else float("nan"),
                   "lists": int(totals[1]), "lists_per_s": float(totals[1]) / elapsed if elapsed > 0 else 0.0}
        history.append(metrics)
        name = f"epoch_{epoch + 1:04d}"
        if rank == 0:
            with tempfile.TemporaryDirectory() as tmp:
                save_ranker(base, tmp, extra={"epoch": epoch + 1, "history": history})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                                 checkpoint_dir_name=name)
        else:
            ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
    return history


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


# ---- the driver ------------------------------------------------------------------------------------
def train_ranker(
    examples: "ray.data.Dataset | pd.DataFrame",
    items: pd.DataFrame,
    vocab: ItemVocab,
    config: RankerConfig,
    runs_dir: str,
    run_name: str,
    retrieval_model: TwoTowerModel | None = None,
    item_counts: pd.DataFrame | None = None,
    inputs: UserInputSpec | None = None,
) -> RankerResult:
    """Train the ranker on the feature layer's training examples with Ray Train V2.

    ``vocab`` must be the two-tower model's vocabulary (the ranker is served with it).
    ``retrieval_model`` enables hard negatives and the two-tower-score feature; without it
    every negative is random. ``item_counts`` (``item_id`` + numeric item features, e.g. the
    item popularity view's latest row per item at the training cutoff,
    ``features.pipeline.latest_item_rows``) become item features frozen into the artifact;
    ``items`` is used to check the catalogue. ``inputs``: the examples' model inputs (default:
    the retrieval model's). Re-using ``run_name`` resumes that run (Ray Train V2).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    started = time.perf_counter()
    if vocab.n_items < 2:
        raise DataValidationError("items", f"{vocab.n_items} item(s) in the vocabulary", column="item_id",
                                  expected="at least 2 distinct item ids")
    if "item_id" not in items.columns:
        raise DataValidationError("items", "column missing", column="item_id", expected="string item ids")
    inputs = inputs if inputs is not None else getattr(retrieval_model, "inputs", None)
    if inputs is None:
        raise UserInputError("train_ranker: pass inputs= (the examples' UserInputSpec) or a retrieval model "
                             "trained with one")
    if retrieval_model is not None and retrieval_model.inputs not in (None, inputs):
        raise UserInputError(f"train_ranker: the retrieval model reads {retrieval_model.inputs.describe()}, "
                             f"not the examples' {inputs.describe()}")
    names = item_feature_names(item_counts)
    counts = item_count_matrix(vocab, item_counts, names)
    use_rs = bool(config.use_retrieval_score and retrieval_model is not None)
    model_config = RankerModel.from_vocab(vocab, dim=config.dim, hidden=config.hidden, use_retrieval_score=use_rs,
                                          dropout=config.dropout, inputs=inputs, item_features=names).config()
    ds = _as_dataset(examples, inputs, config.negative_horizon_days).map_batches(
        ListEncoder(vocab, config, retrieval_model, inputs), batch_format="numpy",
        batch_size=ENCODE_BATCH_SIZE, compute=ray.data.TaskPoolStrategy(),
    ).random_shuffle(seed=config.seed).materialize()
    n_lists = ds.count()
    if n_lists == 0:
        raise DataValidationError("ranker examples", f"no example has an item in the catalogue and an event "
                                  f"of at least '{config.min_event_type}'", column="item_id",
                                  hint="Check that the items cover the events' item ids, or lower min_event_type")
    runs = RunStorage.of(runs_dir)
    trainer = TorchTrainer(
        _ranker_loop_per_worker,
        train_loop_config={
            "config": config.model_dump(),
            "model_config": model_config,
            "item_counts_ref": ray.put(counts) if counts is not None else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.num_workers, use_gpu=config.use_gpu,
            resources_per_worker={"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            storage_path=runs.path, storage_filesystem=runs.filesystem, name=run_name,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures),
        ),
        datasets={"train": ds},
    )
    log.info("training ranker %s: %d lists of %d candidates, %d workers, hard negatives=%s",
             run_name, n_lists, 1 + config.n_hard + config.n_random, config.num_workers,
             retrieval_model is not None)
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"ranker run {run_name} finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        model = load_ranker(d)
    history = result.return_value or []
    metrics = {"history": list(history), "loss": history[-1]["loss"] if history else None,
               "lists": int(n_lists), "use_retrieval_score": use_rs, "item_features": names,
               "hard_negatives": retrieval_model is not None and config.n_hard > 0}
    return RankerResult(model=model, path=runs.uri_of(result.checkpoint.path), metrics=metrics,
                        duration_s=time.perf_counter() - started)


def attach_ranker(ranker_path: str, artifact_dir: str) -> str:
    """Copy a ranker artifact into ``<artifact_dir>/ranker`` (what serving looks for), so one
    registry version carries both models. The copy is renamed into place: a reader sees the
    old ranker or the new one.

    ``ranker_path`` may be a local folder or a URI (a ranker run in the object store);
    ``artifact_dir`` must be a local folder: an artifact in the object store is never written to
    (registered ones are immutable and cached by URI on every node), so attach the ranker to a
    local copy and register that (``jobs.train`` does)."""
    if storage.is_uri(artifact_dir):
        raise UserInputError("attach_ranker: the artifact must be a local folder; attach the ranker to a "
                             "local copy of it and register that")
    dest = Path(artifact_dir) / RANKER_SUBDIR
    if not is_ranker_artifact(str(ranker_path)):
        raise FileNotFoundError(f"{ranker_path}: not a ranker artifact (ranker.pt and ranker_config.json expected)")
    staged = Path(tempfile.mkdtemp(prefix=".ranker-", dir=artifact_dir))
    try:
        for f in ("ranker.pt", "ranker_config.json"):
            data = storage.read_bytes(storage.join(str(ranker_path), f))
            if data is None:
                raise FileNotFoundError(f"{ranker_path}: {f} is missing")
            (staged / f).write_bytes(data)
        load_ranker(str(staged))  # refuse to attach something serving cannot load
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=".ranker-old-", dir=artifact_dir))
            os.replace(dest, old / "r")
            os.replace(staged, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staged, dest)
    finally:
        shutil.rmtree(staged, ignore_errors=True)
    return str(dest)


# ---- evaluation ----------------------------------------------------------------------------------
def evaluate_ranker(
    ranker: RankerModel,
    retrieval_model: TwoTowerModel,
    vocab: ItemVocab,
    context: pd.DataFrame,
    truth: dict[str, set[str]],
    k: int = 10,
    n_candidates: int = 100,
) -> dict:
    """recall@k and NDCG@k of retrieval alone and of retrieve(top ``n_candidates``) -> rank, on
    the same users (those in both ``context`` and ``truth``), each user's excluded items (the
    input spec's ``exclude`` feature) left out of both. ``context`` is read through the
    retrieval model's ``UserInputSpec``."""
    spec = _spec_of(retrieval_model)
    ctx = context.copy()
    ctx["user_id"] = ctx["user_id"].astype(str)
    ctx = ctx[ctx["user_id"].isin(truth.keys())].drop_duplicates("user_id", keep="last").reset_index(drop=True)
    names = (f"recall@{k}", f"ndcg@{k}")
    if ctx.empty:
        zero = {names[0]: 0.0, names[1]: 0.0}
        return {"retrieval": dict(zero), "ranked": dict(zero), "users": 0, "candidates": n_candidates}
    last = spec.histories(ctx)
    dense = spec.dense_values(ctx).reshape(len(ctx), spec.n_dense)
    bought = spec.exclusions(ctx)
    idx, scores = retrieve(retrieval_model, vocab, last, dense, n_candidates, exclude=bought)
    ids = np.asarray([""] + vocab.item_ids, dtype=object)
    cand_ids = [[ids[i] for i in row if i > 0] for row in idx]
    cand_rs = [[float(s) for i, s in zip(r_i, r_s, strict=True) if i > 0] for r_i, r_s in zip(idx, scores, strict=True)]
    ranked: list[list[str]] = []
    for s in range(0, len(ctx), 512):
        sub = rerank(ranker, vocab, last[s:s + 512], dense[s:s + 512], cand_ids[s:s + 512], cand_rs[s:s + 512])
        for c, sc in zip(cand_ids[s:s + 512], sub, strict=True):
            ranked.append([c[j] for j in np.argsort(-sc, kind="stable")])
    out = {"retrieval": {}, "ranked": {}, "users": len(ctx), "candidates": n_candidates}
    for key, lists in (("retrieval", cand_ids), ("ranked", ranked)):
        rel = [truth[u] for u in ctx["user_id"]]
        out[key] = {names[0]: float(np.mean([recall_at_k(r, t, k) for r, t in zip(lists, rel, strict=True)])),
                    names[1]: float(np.mean([ndcg_at_k(r, t, k) for r, t in zip(lists, rel, strict=True)]))}
    out[f"recall@{n_candidates}"] = float(np.mean(
        [recall_at_k(r, truth[u], n_candidates) for r, u in zip(cand_ids, ctx["user_id"], strict=True)]))
    return out


def _spec_of(model: TwoTowerModel) -> UserInputSpec:
    if model.inputs is None:
        raise UserInputError("the retrieval model records no input spec (models.inputs.UserInputSpec): "
                             "build it with inputs=UserInputSpec.from_service(...) or retrain it")
    return model.inputs


__all__ = [
    "ListEncoder",
    "RankerConfig",
    "RankerResult",
    "attach_ranker",
    "evaluate_ranker",
    "item_count_matrix",
    "item_feature_names",
    "rerank",
    "retrieve",
    "train_ranker",
]
