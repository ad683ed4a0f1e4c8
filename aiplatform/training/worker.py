"""What every Ray Train worker runs: build or restore the model, train one epoch at a time on
its shard, score the validation slice (rank 0), report a checkpoint per epoch.

Kept apart from the driver (``train.py``) because this code runs in other processes: Ray Train
pickles ``train_loop_per_worker`` by reference, so each worker imports this module and gets
everything else from ``loop_config`` (plain values and object refs). Every helper here is a
module-level function or dataclass over that state, never a closure, so nothing unpicklable
travels. The steps, in order: ``_start_point`` (fresh or from the run's checkpoint),
``_prepare_worker`` (device, DDP, optimizer), then per epoch ``_train_epoch``,
``_epoch_metrics`` (summed over ranks) and ``_report_epoch`` (validation, logs, checkpoint).

A checkpoint is itself a loadable model artifact (``save_artifact``) plus ``optimizer.pt``, so
the registry can publish it as it is and a restarted worker group resumes with its optimizer.
"""

import contextlib
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aiplatform.models.two_tower import (
    ItemVocab,
    TwoTowerModel,
    load_artifact,
    read_extra,
    save_artifact,
)
from aiplatform.training.config import TrainConfig
from aiplatform.training.reliability import (
    ProgressMarks,
    autocast,
    maybe_inject_fault,
    use_bf16,
    validate,
)

if TYPE_CHECKING:
    import ray.data

OPTIMIZER_FILE = "optimizer.pt"
BATCH_DTYPES: dict[str, torch.dtype] = {"hist": torch.long, "dense": torch.float32, "item": torch.long}
"""The tensor type of each encoded column (``ExampleEncoder``'s output) on the worker."""


@dataclass
class _StartPoint:
    """Where this worker's training starts: a new model at epoch 0, or a restored checkpoint."""

    model: TwoTowerModel
    vocab: ItemVocab
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    global_step: int = 0
    optimizer_state: dict | None = None


@dataclass
class _Worker:
    """One rank's training state, shared by the per-epoch steps."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    bf16: bool
    model: torch.nn.Module
    """What is trained: the model, wrapped in DDP when there is more than one worker."""
    base: TwoTowerModel
    """The unwrapped model: what validation scores and checkpoints save."""
    vocab: ItemVocab
    optimizer: torch.optim.Optimizer
    progress: ProgressMarks
    fault: dict | None
    log: logging.Logger
    run_uri: str


@dataclass
class _EpochStats:
    """This rank's share of one epoch, before the sum over ranks."""

    loss_sum: float
    rows: int
    steps: int
    wait_s: float
    elapsed_s: float


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch: the same seed on every rank gives identical initial weights."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_loop_per_worker(loop_config: dict[str, Any]) -> list[dict]:
    """Runs on every Ray Train worker. Everything it needs comes in ``loop_config``.

    Returns the run's history (every epoch's metrics, earlier calls' epochs included when the
    run was resumed): rank 0's becomes ``Result.return_value`` on the driver.
    """
    import ray
    import ray.train

    cfg = TrainConfig(**loop_config["train_config"])
    vocab = ItemVocab.from_dict(ray.get(loop_config["vocab_ref"]))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    wlog = _worker_logger()
    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    seed_everything(cfg.seed)
    start = _start_point(cfg, vocab, loop_config["inputs"], rank, wlog)
    worker = _prepare_worker(cfg, start, loop_config, rank, world, wlog)
    shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("validation") if loop_config.get("validate") else None
    history, global_step = start.history, start.global_step
    for epoch in range(start.epoch, cfg.epochs):
        stats = _train_epoch(worker, shard, epoch)
        global_step += stats.steps
        metrics = _epoch_metrics(worker, stats, epoch, global_step)
        _report_epoch(worker, val_shard, epoch, metrics, history, global_step)
        worker.progress.checkpointed(epoch + 2)
    return history


# ---- setup -------------------------------------------------------------------------------------
def _worker_logger() -> logging.Logger:
    """A logger whose INFO lines reach the worker's stdout (and the driver when it forwards logs)."""
    wlog = logging.getLogger("aiplatform.training.worker")
    if not wlog.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(message)s"))
        wlog.addHandler(handler)
        wlog.setLevel(logging.INFO)
        wlog.propagate = False
    return wlog


def _start_point(cfg: TrainConfig, vocab: ItemVocab, inputs: dict[str, Any], rank: int,
                 wlog: logging.Logger) -> _StartPoint:
    """A new model, or the run's latest checkpoint when Ray Train hands one over (a restarted
    worker group, or a driver that resumed the run by name).

    A restored run continues the same model: its vocabulary and shape, not ones rebuilt from
    today's catalogue or config (the driver encoded the examples with that vocabulary). The new
    model is built even then, so both paths draw the same numbers from the seeded generators.
    """
    import ray.train

    model = TwoTowerModel(**vocab.model_kwargs(), dim=cfg.dim, temperature=cfg.temperature, inputs=inputs)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return _StartPoint(model, vocab)
    with checkpoint.as_directory() as d:
        model, vocab = load_artifact(d)
        extra = read_extra(d)
        opt_path = Path(d) / OPTIMIZER_FILE
        optimizer_state = (torch.load(opt_path, map_location="cpu", weights_only=True)
                           if opt_path.is_file() else None)
    start = _StartPoint(model, vocab, epoch=int(extra.get("epoch", 0)), history=list(extra.get("history", [])),
                        global_step=int(extra.get("global_step", 0)), optimizer_state=optimizer_state)
    wlog.info("rank %d resuming from epoch %d (step %d)", rank, start.epoch, start.global_step)
    return start


def _prepare_worker(cfg: TrainConfig, start: _StartPoint, loop_config: dict[str, Any], rank: int, world: int,
                    wlog: logging.Logger) -> _Worker:
    """Put the model on this worker's device (in DDP when ``world > 1``), build its optimizer
    (restored state included) and its progress file."""
    import ray
    import ray.train.torch
    from torch.nn.parallel import DistributedDataParallel

    model = start.model
    if loop_config.get("item_counts_ref") is not None:
        # Training-only state, not in the artifact: set after a restore too.
        model.set_item_frequencies(ray.get(loop_config["item_counts_ref"]))
    progress = ProgressMarks(loop_config["run_uri"], loop_config["call_id"], rank, start.epoch)
    device = ray.train.torch.get_device()
    device = device[0] if isinstance(device, list) else device
    # prepare_model moves to the device and wraps in DDP only when world > 1. The lookup
    # buffers never change: broadcasting them every step would be pure overhead.
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=_no_buffer_sync_kwargs())
    base = model.module if isinstance(model, DistributedDataParallel) else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    if start.optimizer_state is not None:
        optimizer.load_state_dict(start.optimizer_state)
    return _Worker(cfg=cfg, rank=rank, world=world, device=device, bf16=use_bf16(cfg.precision, device),
                   model=model, base=base, vocab=start.vocab, optimizer=optimizer, progress=progress,
                   fault=loop_config.get("fault"), log=wlog, run_uri=loop_config["run_uri"])


def _no_buffer_sync_kwargs() -> dict[str, bool]:
    """DDP kwargs that skip the per-forward buffer broadcast (the argument was renamed in torch 2.13)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    params = inspect.signature(DistributedDataParallel.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}


# ---- one epoch ---------------------------------------------------------------------------------
def _train_epoch(w: _Worker, shard: "ray.data.DataIterator", epoch: int) -> _EpochStats:
    """One pass over this rank's shard; times the waits for data apart from the epoch, since
    a data-bound epoch needs a different fix than a compute-bound one."""
    from torch.nn.parallel import DistributedDataParallel

    cfg = w.cfg
    seed_everything(cfg.seed + 1000 * epoch + w.rank)
    w.model.train()
    started = time.perf_counter()
    loss_sum, n_rows, steps, wait = 0.0, 0, 0, 0.0
    batches = iter(shard.iter_torch_batches(
        batch_size=cfg.batch_size, dtypes=BATCH_DTYPES, device=w.device,
        local_shuffle_buffer_size=cfg.shuffle_buffer or None,
        local_shuffle_seed=(cfg.seed + 1000 * epoch + w.rank) if cfg.shuffle_buffer else None,
    ))
    # Join lets ranks with fewer batches finish without hanging the others' all-reduces.
    joined = w.model.join() if isinstance(w.model, DistributedDataParallel) else contextlib.nullcontext()
    with joined:
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - t0
            if batch is None:
                break
            size = len(batch["item"])
            if size < 2:  # a single row has no in-batch negative
                continue
            loss = _optimizer_step(w, batch)
            loss_sum += float(loss.detach()) * size
            n_rows += size
            steps += 1
            w.progress.step()
            maybe_inject_fault(w.fault, w.rank, epoch + 1, steps, w.progress, w.log)
    return _EpochStats(loss_sum, n_rows, steps, wait, time.perf_counter() - started)


def _optimizer_step(w: _Worker, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward and loss (under bf16 autocast when enabled), backward, one Adam step; the loss."""
    with autocast(w.bf16, w.device):
        loss = w.model(batch["hist"], batch["dense"], batch["item"])
    w.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    w.optimizer.step()
    return loss


def _epoch_metrics(w: _Worker, stats: _EpochStats, epoch: int, global_step: int) -> dict[str, Any]:
    """The epoch's metrics, loss and sample counts summed over every rank (what Ray Train
    reports and ranks checkpoints by); the timings are this rank's."""
    import torch.distributed as dist

    # On the training device: NCCL (GPU training) cannot all-reduce CPU tensors.
    totals = torch.tensor([stats.loss_sum, float(stats.rows)], dtype=torch.float64, device=w.device)
    if w.world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)
    total_loss, total_rows = float(totals[0].item()), int(totals[1].item())
    elapsed, wait = stats.elapsed_s, stats.wait_s
    return {
        "epoch": epoch + 1,
        "loss": total_loss / total_rows if total_rows else float("nan"),
        "samples": total_rows,
        "samples_per_s": total_rows / elapsed if elapsed > 0 else 0.0,
        "steps_per_worker": stats.steps,
        "global_step": global_step,
        "epoch_s": elapsed,
        "data_wait_s": wait,
        "data_wait_share": wait / elapsed if elapsed > 0 else 0.0,
        "precision": "bf16" if w.bf16 else "fp32",
    }


# ---- end of an epoch: validation, logs, checkpoint ---------------------------------------------
def _report_epoch(w: _Worker, val_shard: "ray.data.DataIterator | None", epoch: int, metrics: dict[str, Any],
                  history: list[dict], global_step: int) -> None:
    """Append the epoch to ``history`` and report it to Ray Train. ``report()`` is a barrier:
    every rank calls it, only rank 0 scores the validation slice and brings a checkpoint."""
    import ray.train

    dir_name = f"epoch_{epoch + 1:04d}"
    if w.rank != 0:
        history.append(metrics)
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=dir_name)
        return
    if val_shard is not None:
        t_val = time.perf_counter()
        metrics.update(validate(w.base, val_shard.iter_torch_batches(
            batch_size=w.cfg.batch_size, dtypes=BATCH_DTYPES, device=w.device), w.cfg.eval_k, w.bf16))
        metrics["val_s"] = time.perf_counter() - t_val
    history.append(metrics)
    _export_epoch(w.run_uri, metrics)
    w.log.info(
        "epoch %d/%d loss=%.4f %s samples=%d samples/s=%.0f data wait=%.0f%%",
        epoch + 1, w.cfg.epochs, metrics["loss"],
        " ".join(f"{k}={metrics[k]:.4f}" for k in ("val_loss", "val_recall") if k in metrics),
        metrics["samples"], metrics["samples_per_s"], 100 * metrics["data_wait_share"],
    )
    _report_checkpoint(w, metrics, history, epoch, global_step, dir_name)


def _report_checkpoint(w: _Worker, metrics: dict[str, Any], history: list[dict], epoch: int, global_step: int,
                       dir_name: str) -> None:
    """Rank 0's report with the epoch's checkpoint: a model artifact whose ``extra`` holds what
    a resume needs (epoch, step, history), plus the optimizer's state."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        save_artifact(w.base, w.vocab, tmp, extra={"epoch": epoch + 1, "global_step": global_step,
                                                   "metrics": metrics, "history": history})
        torch.save(w.optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_FILE))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=dir_name)


def _export_epoch(run_uri: str, metrics: dict[str, Any]) -> None:
    """The epoch's progress as Prometheus gauges (``aiplatform_train_*``); never fails training."""
    try:
        from aiplatform.observability.metrics import TrainingMetrics

        TrainingMetrics.get().record_epoch(run_uri.rstrip("/").rsplit("/", 1)[-1], metrics)
    except Exception as exc:
        logging.getLogger("aiplatform.training.worker").debug("training metrics: %s", exc)
