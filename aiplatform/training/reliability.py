"""Reliability pieces of training: validation scoring, precision, progress marks for restart
accounting, fault injection for tests, and the choice of the checkpoint to return.

Kept apart from the training loop (``train.py``) so each can be read and tested alone; all of
it is torch + pyarrow, no Ray, except ``best_checkpoint`` which reads a ``ray.train.Result``.
``RunStorage`` says where Ray Train keeps runs (a local folder or the object store).
"""

import contextlib
import json
import math
import os
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from aiplatform.core.storage import filesystem_for, is_uri
from aiplatform.models.two_tower import TwoTowerModel

if TYPE_CHECKING:
    import logging

    import pyarrow.fs
    import ray.train

PROGRESS_DIR = "progress"
PROGRESS_EVERY_S = 1.0
METRIC_ORDER: dict[str, str] = {"val_loss": "min", "val_recall": "max"}
"""How each ``checkpoint_metric`` ranks checkpoints (Ray's ``checkpoint_score_order``)."""
VAL_LOGITS_BUDGET = 1 << 24
"""Max floats in one validation logits block ([rows, n_items]): bounds memory on big catalogues."""


@dataclass(frozen=True)
class RunStorage:
    """Where Ray Train keeps the runs of ``runs_dir`` (a local folder or an object-store URI).

    For a URI, Ray gets the path inside the bucket and the storage root's own pyarrow
    filesystem (``RunConfig(storage_path=path, storage_filesystem=filesystem)``), so it uses
    the same endpoint, region and credentials as every other layer (an S3-compatible server
    included) instead of building its own client from the URI. Ray then reports checkpoint
    paths inside that filesystem (``bucket/prefix/runs/run/epoch_0003``); ``uri_of`` turns them
    back into URIs, which is what the registry and every reader expect.
    """

    uri: str
    """``runs_dir`` as an absolute local path or a URI."""
    path: str
    """``storage_path`` for Ray: the same local path, or the path inside ``filesystem``."""
    filesystem: "pyarrow.fs.FileSystem | None" = None
    """None for a local folder (Ray's default local filesystem)."""

    @classmethod
    def of(cls, runs_dir: str) -> "RunStorage":
        if not is_uri(runs_dir):
            path = str(Path(runs_dir).expanduser().resolve())
            return cls(uri=path, path=path)
        fs, inside = filesystem_for(runs_dir)
        return cls(uri=str(runs_dir).rstrip("/"), path=inside, filesystem=fs)

    def run_uri(self, run_name: str) -> str:
        return f"{self.uri.rstrip('/')}/{run_name}"

    def run_path(self, run_name: str) -> str:
        """The run's folder as Ray names it (inside ``filesystem``)."""
        return f"{self.path.rstrip('/')}/{run_name}"

    def uri_of(self, path: str) -> str:
        """A path Ray reported (inside ``filesystem``) as a path or URI under ``uri``."""
        path = str(path)
        if self.filesystem is None or is_uri(path):
            return path
        inside = self.path.rstrip("/")
        if path == inside or path.startswith(inside + "/"):
            return self.uri.rstrip("/") + path[len(inside):]
        raise ValueError(f"{path} is not under the runs folder {self.uri}")


@dataclass
class FaultInjection:
    """Test-only: the worker of ``rank`` SIGKILLs its own process after ``step`` optimizer steps
    of ``epoch`` (1-based), once: only while the file ``marker`` does not exist (it is created
    just before). A real process death, so Ray Train's failure handling is what gets tested."""

    rank: int
    epoch: int
    step: int
    marker: str


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 on CUDA (tensor cores, half the activation memory), fp32 on CPU (where
    bf16 matmuls are emulated on most cores and slower)."""
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def autocast(bf16: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


class ProgressMarks:
    """One rank's step counter, written to ``<run>/progress/<call>/rank<r>-<attempt>.json``.

    ``partial_steps`` counts steps since the last persisted checkpoint: if this process dies,
    those steps are lost and get trained again, which the driver reports as ``steps_redone``.
    Written at most every ``PROGRESS_EVERY_S`` seconds (a real crash may lose up to that much
    of the count) and exactly before an injected fault.
    """

    def __init__(self, run_uri: str, call_id: str, rank: int, start_epoch: int) -> None:
        self.fs, root = filesystem_for(run_uri)
        self.dir = f"{root}/{PROGRESS_DIR}/{call_id}"
        self.path = f"{self.dir}/rank{rank}-{uuid.uuid4().hex[:12]}.json"
        self.state = {"rank": rank, "start_epoch": start_epoch, "epoch": start_epoch + 1,
                      "partial_steps": 0, "total_steps": 0}
        self._last = 0.0
        self.fs.create_dir(self.dir, recursive=True)
        self.write()

    def step(self) -> None:
        self.state["partial_steps"] += 1
        self.state["total_steps"] += 1
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S:
            self.write()

    def checkpointed(self, next_epoch: int) -> None:
        self.state["partial_steps"], self.state["epoch"] = 0, next_epoch
        self.write()

    def write(self) -> None:
        self._last = time.monotonic()
        with self.fs.open_output_stream(self.path) as out:
            out.write(json.dumps(self.state).encode())


def maybe_inject_fault(fault: dict | None, rank: int, epoch: int, step: int, progress: "ProgressMarks",
                       wlog: "logging.Logger") -> None:
    if not fault or fault["rank"] != rank or fault["epoch"] != epoch or fault["step"] != step:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    marker.write_text(f"killed rank {rank} at epoch {epoch} step {step} (pid {os.getpid()})\n")
    progress.write()
    wlog.warning("fault injection: SIGKILL rank %d at epoch %d step %d", rank, epoch, step)
    os.kill(os.getpid(), signal.SIGKILL)


@torch.no_grad()
def validate(model: TwoTowerModel, batches: Any, k: int, bf16: bool = False) -> dict[str, float]:
    """Full-catalogue validation of encoded rows: ``val_loss`` (softmax cross-entropy over every
    item, no logQ term: the quantity the sampled loss estimates) and ``val_recall`` (target in
    the top ``k``). Cheap enough to run every epoch on a small slice; index 0 (padding) is
    never a candidate."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with autocast(bf16, device):
        items = model.all_item_embeddings().float()
    loss_sum, loss_sq, hits, n = 0.0, 0.0, 0, 0
    k = min(k, items.shape[0] - 1)
    rows_per_block = max(1, VAL_LOGITS_BUDGET // items.shape[0])
    for batch in batches:
        for s in range(0, len(batch["item"]), rows_per_block):
            hist, dense = batch["hist"][s:s + rows_per_block], batch["dense"][s:s + rows_per_block]
            target = batch["item"][s:s + rows_per_block].long()
            with autocast(bf16, device):
                users = model.user_embedding(hist, dense)
            logits = (users.float() @ items.T) / model.temperature
            logits[:, 0] = float("-inf")
            row_loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")
            loss_sum, loss_sq = loss_sum + float(row_loss.sum()), loss_sq + float((row_loss * row_loss).sum())
            top = logits.topk(k, dim=1).indices
            hits += int((top == target.unsqueeze(1)).any(dim=1).sum())
            n += len(target)
    model.train(was_training)
    if n == 0:
        nan = float("nan")
        return {"val_loss": nan, "val_recall": nan, "val_loss_se": nan, "val_recall_se": nan, "val_rows": 0}
    mean, recall = loss_sum / n, hits / n
    # Standard errors of both means: how far apart two checkpoints must be to differ for real.
    loss_se = math.sqrt(max(loss_sq / n - mean * mean, 0.0) / max(n - 1, 1))
    return {"val_loss": mean, "val_recall": recall, "val_loss_se": loss_se,
            "val_recall_se": math.sqrt(recall * (1 - recall) / n), "val_rows": n}


def best_checkpoint(result: "ray.train.Result", metric: str | None, latest_metrics: dict) -> "ray.train.Checkpoint":
    """The checkpoint to return: the best retained one by ``metric``, except that the latest
    wins unless an earlier one beats it by more than one standard error of the latest's
    metric (the noise of the validation slice). Without a metric, the latest.

    Why the margin: on a small validation slice two epochs often differ by noise alone, and
    picking the earlier one would throw away training for nothing.
    """
    latest = result.checkpoint
    if metric is None:
        return latest
    sign = 1.0 if METRIC_ORDER[metric] == "min" else -1.0

    def finite(m: dict, key: str) -> float | None:
        v = m.get(key)
        return float(v) if isinstance(v, int | float) and math.isfinite(float(v)) else None

    scored = [(sign * finite(m, metric), c, m) for c, m in (result.best_checkpoints or [])
              if finite(m, metric) is not None]
    if not scored:
        return latest
    best_score, best, _ = min(scored, key=lambda t: t[0])
    # (best_checkpoints holds only the top checkpoints_to_keep: the latest's metrics come
    # from its own extra.json)
    latest_score = finite(latest_metrics, metric)
    if latest_score is not None:
        margin = finite(latest_metrics, f"{metric}_se") or 0.0
        if sign * latest_score - best_score <= margin:
            return latest
    return best


def collect_progress(run_uri: str, call_id: str) -> tuple[int, int]:
    """(steps_redone, restarts) of this call from the ranks' progress files, which are then
    removed. Steps redone = per rank, the steps of attempts that died before checkpointing
    them (the max over ranks: ranks step in lockstep); restarts = attempts per rank - 1."""
    from pyarrow import fs as pafs

    filesystem, root = filesystem_for(run_uri)
    folder = f"{root}/{PROGRESS_DIR}/{call_id}"
    per_rank: dict[int, list[dict]] = {}
    try:
        infos = filesystem.get_file_info(pafs.FileSelector(folder, allow_not_found=True))
    except OSError:
        return 0, 0
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        try:
            with filesystem.open_input_stream(info.path) as f:
                state = json.loads(f.read().decode())
        except (OSError, ValueError):  # a file cut short by a crash mid-write
            continue
        per_rank.setdefault(int(state["rank"]), []).append(state)
    with contextlib.suppress(OSError):
        filesystem.delete_dir(folder)
    if not per_rank:
        return 0, 0
    redone = max(sum(s["partial_steps"] for s in states) for states in per_rank.values())
    restarts = max(len(states) for states in per_rank.values()) - 1
    return int(redone), int(restarts)
