"""The reliability pieces of training without Ray: validation scores, checkpoint choice,
restart accounting from progress marks, precision selection."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from aiplatform.models.two_tower import TwoTowerModel
from aiplatform.training.config import TrainConfig
from aiplatform.training.reliability import (
    ProgressMarks,
    RunStorage,
    best_checkpoint,
    collect_progress,
    use_bf16,
    validate,
)


def _model(n_items: int = 30) -> TwoTowerModel:
    torch.manual_seed(0)
    return TwoTowerModel(n_items=n_items, n_categories=3, n_price_buckets=2,
                         item_category=[0] + [1 + i % 3 for i in range(n_items)],
                         item_price_bucket=[0] + [1 + i % 2 for i in range(n_items)], dim=8, temperature=0.2)


def _batch(n: int, n_items: int = 30, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"hist": torch.randint(0, n_items + 1, (n, 20), generator=g),
            "dense": torch.rand(n, 12, generator=g), "item": torch.randint(1, n_items + 1, (n,), generator=g)}


def test_validate_scores_the_whole_catalogue():
    model = _model()
    batches = [_batch(40, seed=1), _batch(25, seed=2)]
    out = validate(model, batches, k=5)
    with torch.no_grad():
        items = model.all_item_embeddings()
        losses, hits = [], 0
        for b in batches:
            logits = model.user_embedding(b["hist"], b["dense"]) @ items.T / model.temperature
            logits[:, 0] = -math.inf  # padding is never a candidate
            losses.append(F.cross_entropy(logits, b["item"], reduction="none"))
            hits += int((logits.topk(5, dim=1).indices == b["item"][:, None]).any(1).sum())
    losses = torch.cat(losses)
    assert out["val_rows"] == 65
    assert out["val_loss"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert out["val_loss_se"] == pytest.approx(float(losses.std() / math.sqrt(65)), rel=1e-4)
    assert out["val_recall"] == pytest.approx(hits / 65)
    assert out["val_recall_se"] == pytest.approx(math.sqrt(hits / 65 * (1 - hits / 65) / 65))
    assert model.training  # restored to the mode it was in


def test_validate_bounds_memory_with_row_blocks(monkeypatch):
    import aiplatform.training.reliability as rel

    model, batches = _model(), [_batch(50)]
    full = validate(model, batches, k=3)
    monkeypatch.setattr(rel, "VAL_LOGITS_BUDGET", 31 * 4)  # 4 rows per logits block
    assert validate(model, batches, k=3) == pytest.approx(full, rel=1e-4)
    assert math.isnan(validate(model, [], k=3)["val_loss"])


def _ckpt(path: str) -> SimpleNamespace:
    return SimpleNamespace(path=path)


def test_best_checkpoint_prefers_latest_within_one_standard_error():
    latest = _ckpt("epoch_0004")
    earlier = _ckpt("epoch_0002")
    result = SimpleNamespace(checkpoint=latest, best_checkpoints=[(earlier, {"val_loss": 3.00, "val_loss_se": 0.1})])
    # the latest is 0.05 worse: noise (se 0.1) -> keep the latest
    assert best_checkpoint(result, "val_loss", {"val_loss": 3.05, "val_loss_se": 0.1}) is latest
    # 0.5 worse: a real difference -> the earlier checkpoint
    assert best_checkpoint(result, "val_loss", {"val_loss": 3.5, "val_loss_se": 0.1}) is earlier
    # higher-is-better metric
    result = SimpleNamespace(checkpoint=latest, best_checkpoints=[(earlier, {"val_recall": 0.40, "val_recall_se": 0.01})])
    assert best_checkpoint(result, "val_recall", {"val_recall": 0.30, "val_recall_se": 0.01}) is earlier
    assert best_checkpoint(result, "val_recall", {"val_recall": 0.395, "val_recall_se": 0.01}) is latest
    # no metric, or no finite score: the latest
    assert best_checkpoint(result, None, {}) is latest
    nan_result = SimpleNamespace(checkpoint=latest, best_checkpoints=[(earlier, {"val_recall": float("nan")})])
    assert best_checkpoint(nan_result, "val_recall", {}) is latest


def test_progress_marks_count_steps_lost_to_restarts(tmp_path):
    run = str(tmp_path / "run")
    # attempt 1 of rank 0 and 1: one epoch checkpointed, then 7 steps into epoch 2 when it died
    for rank in (0, 1):
        p = ProgressMarks(run, "call1", rank, start_epoch=0)
        for _ in range(10):
            p.step()
        p.checkpointed(2)
        for _ in range(7 if rank == 1 else 6):  # rank 0's last mark lagged one step
            p.step()
        p.write()
    # attempt 2: resumed at epoch 1, finished cleanly
    for rank in (0, 1):
        p = ProgressMarks(run, "call1", rank, start_epoch=1)
        for _ in range(10):
            p.step()
        p.checkpointed(3)
    ProgressMarks(run, "other-call", 0, start_epoch=0).step()  # another call's marks do not count
    assert collect_progress(run, "call1") == (7, 1)
    assert not (tmp_path / "run" / "progress" / "call1").exists()  # cleaned up
    assert collect_progress(run, "never-ran") == (0, 0)


def test_precision_auto_is_bf16_only_on_cuda():
    assert use_bf16("auto", torch.device("cuda", 0)) is True
    assert use_bf16("auto", torch.device("cpu")) is False
    assert use_bf16("bf16", torch.device("cpu")) is True
    assert use_bf16("fp32", torch.device("cuda", 0)) is False


def test_reliability_config_fields_are_validated():
    from aiplatform.core.errors import ConfigError

    with pytest.raises(ConfigError, match="checkpoint_metric"):
        TrainConfig(checkpoint_metric="accuracy")
    with pytest.raises(ConfigError, match="validation_fraction"):
        TrainConfig(validation_fraction=0.9)
    with pytest.raises(ConfigError, match="checkpoints_to_keep"):
        TrainConfig(checkpoints_to_keep=0)
    with pytest.raises(ConfigError, match="precision"):
        TrainConfig(precision="fp16")


def test_run_storage_gives_ray_the_path_inside_the_bucket_and_maps_results_back(tmp_path, s3_env):
    local = RunStorage.of(str(tmp_path / "runs"))
    assert local.filesystem is None and local.path == local.uri == str((tmp_path / "runs").resolve())
    assert local.uri_of(f"{local.path}/r/epoch_0001") == f"{local.path}/r/epoch_0001"

    remote = RunStorage.of("s3://bucket/home/runs/")
    assert remote.uri == "s3://bucket/home/runs" and remote.path == "bucket/home/runs"
    assert remote.filesystem.type_name == "s3"
    assert remote.run_uri("r") == "s3://bucket/home/runs/r" and remote.run_path("r") == "bucket/home/runs/r"
    assert remote.uri_of("bucket/home/runs/r/epoch_0002") == "s3://bucket/home/runs/r/epoch_0002"
    assert remote.uri_of("s3://bucket/home/runs/r") == "s3://bucket/home/runs/r"
    with pytest.raises(ValueError, match="not under"):
        remote.uri_of("bucket/home/runsX/r")
