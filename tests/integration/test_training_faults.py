"""Training a platform team can trust: worker death, driver death, and best-checkpoint selection.

Faults are real process deaths: a training worker SIGKILLs itself once mid-epoch
(``FaultInjection``), and a driver running in a separate process is SIGKILLed after its
first checkpoint. Both runs must finish from their last checkpoint, and the disturbed run's
model must be as good as an undisturbed one trained on the same examples with the same seed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aiplatform.core.errors import NotFoundError
from aiplatform.features.pipeline import frame_from_events, training_labels
from aiplatform.models.inputs import UserInputSpec
from aiplatform.training.config import TrainConfig
from aiplatform.training.recommender import TwoTowerSource, evaluate_recommender
from aiplatform.training.split import time_split
from aiplatform.training.train import FaultInjection, latest_epoch_of_run, train_two_tower
from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
TARGET_TYPES = ("view", "click", "add_to_cart", "purchase")
INPUTS = UserInputSpec.from_service(recommender_user)


@pytest.fixture(scope="module")
def shop() -> dict:
    """A small generated shop, split in time: examples before the cutoff, truth after it."""
    frames = generate(ShopSize(users=250, items=120, categories=8, days=30), seed=11)
    split = time_split(frames["events"], holdout_days=7)
    cutoff, train_events = split.cutoff, split.train
    boundary = cutoff + pd.Timedelta(microseconds=1)  # events at the cutoff are training data
    # the shop's feature service joined point-in-time in memory (the feature engine, no store)
    examples = frame_from_events(recommender_user, train_events, training_labels(train_events, boundary, TARGET_TYPES))
    assert 3000 <= len(examples) <= 15000, len(examples)
    users = sorted(train_events["user_id"].unique())
    at_cutoff = pd.DataFrame({"user_id": users, "event_timestamp": cutoff})
    context = frame_from_events(recommender_user, train_events, at_cutoff)
    return {"items": frames["items"], "examples": examples, "split": split, "context": context}


def _dataset(ray, examples: pd.DataFrame):
    # a list of frames: from_pandas(override_num_blocks=...) does not work with pandas 3
    return ray.data.from_pandas([examples.iloc[i::4].reset_index(drop=True) for i in range(4)])


def _recall(result, shop) -> float:
    split = shop["split"]
    source = TwoTowerSource(result.model, result.vocab, depth=50, contexts=shop["context"])
    report = evaluate_recommender(None, source, split, ease=None, k=10)
    assert report["users"] >= 50
    return report["model"]["recall@10"]


def test_killed_worker_is_replaced_and_the_run_ends_as_good_as_undisturbed(ray_session, shop, tmp_path):
    ray = ray_session
    ds = _dataset(ray, shop["examples"])
    config = TrainConfig(num_workers=2, use_gpu=False, batch_size=64, epochs=3, lr=1e-2, dim=16,
                         temperature=0.1, seed=0, shuffle_buffer=256, max_failures=1, checkpoints_to_keep=1)
    undisturbed = train_two_tower(ds, shop["items"], config, str(tmp_path / "runs"), "undisturbed", inputs=INPUTS)
    assert undisturbed.restarts == 0 and undisturbed.steps_redone == 0
    steps_per_epoch = undisturbed.history[1]["steps_per_worker"]
    kill_at = steps_per_epoch // 2
    assert kill_at >= 2

    marker = tmp_path / "killed.marker"
    fault = FaultInjection(rank=1, epoch=2, step=kill_at, marker=str(marker))
    disturbed = train_two_tower(ds, shop["items"], config, str(tmp_path / "runs"), "disturbed", fault=fault,
                                 inputs=INPUTS)

    # the worker really died once, the group was restarted from the epoch-1 checkpoint
    assert "killed rank 1 at epoch 2" in marker.read_text()
    assert disturbed.restarts == 1
    # what the death cost: the steps rank 1 had done in epoch 2, less than one epoch
    assert disturbed.steps_redone == kill_at
    assert 0 < disturbed.steps_redone < steps_per_epoch
    # each epoch is in the history once; epoch 2 was trained in full after the restart
    assert [h["epoch"] for h in disturbed.history] == [1, 2, 3]
    assert all(h["samples"] > 0.9 * undisturbed.history[0]["samples"] for h in disturbed.history)
    assert disturbed.history[-1]["global_step"] == sum(h["steps_per_worker"] for h in disturbed.history)

    # as good as the undisturbed run: same examples, same seed (only row order may differ)
    assert disturbed.history[-1]["val_loss"] == pytest.approx(undisturbed.history[-1]["val_loss"], rel=0.05)
    assert disturbed.history[-1]["loss"] < disturbed.history[0]["loss"]
    r_undisturbed, r_disturbed = _recall(undisturbed, shop), _recall(disturbed, shop)
    assert abs(r_disturbed - r_undisturbed) <= 0.05, (r_disturbed, r_undisturbed)
    assert r_disturbed > 3 * 10 / len(shop["items"])  # far above a random ranking


def test_worker_death_without_failure_budget_fails_the_run(ray_session, shop, tmp_path):
    import ray.train

    ds = _dataset(ray_session, shop["examples"].head(1500))
    config = TrainConfig(num_workers=1, use_gpu=False, batch_size=64, epochs=1, dim=8, max_failures=0)
    fault = FaultInjection(rank=0, epoch=1, step=2, marker=str(tmp_path / "killed.marker"))
    with pytest.raises(ray.train.TrainingFailedError):
        train_two_tower(ds, shop["items"], config, str(tmp_path), "no_budget", fault=fault, inputs=INPUTS)
    assert (tmp_path / "killed.marker").exists()


def test_best_checkpoint_is_returned_and_kept(ray_session, shop, tmp_path):
    """Checkpoints are ranked by the validation metric: the best one is kept and returned unless
    the latest is within one standard error of it; the latest is always kept (to resume)."""
    ds = _dataset(ray_session, shop["examples"])
    # a learning rate high enough that later epochs need not be the best ones
    config = TrainConfig(num_workers=1, use_gpu=False, batch_size=32, epochs=4, lr=0.05, dim=16,
                         temperature=0.05, seed=3, checkpoints_to_keep=1, checkpoint_metric="val_recall",
                         validation_fraction=0.1)
    result = train_two_tower(ds, shop["items"], config, str(tmp_path), "best", inputs=INPUTS)
    hist = result.history
    assert all(h["val_rows"] >= 0.09 * len(shop["examples"]) for h in hist)
    assert all(0 < h["val_recall_se"] < 0.1 for h in hist)
    recalls = [h["val_recall"] for h in hist]
    raw_best = 1 + max(range(len(recalls)), key=lambda i: (recalls[i], -i))  # first best on ties
    latest_is_close = recalls[raw_best - 1] - recalls[-1] <= hist[-1]["val_recall_se"]
    expected = 4 if latest_is_close else raw_best
    assert result.best_epoch == expected
    assert Path(result.checkpoint_path).name == f"epoch_{expected:04d}"
    assert Path(result.latest_checkpoint_path).name == "epoch_0004"
    kept = sorted(p.name for p in (tmp_path / "best").glob("epoch_*"))
    assert kept == sorted({f"epoch_{raw_best:04d}", "epoch_0004"})
    assert result.params["best_epoch"] == expected


_DRIVER = """
import os, sys, pandas as pd, ray
from aiplatform.models.inputs import UserInputSpec
from aiplatform.training.config import TrainConfig
from aiplatform.training.train import train_two_tower
from apps.shop.features import recommender_user
ray.init(address=sys.argv[1], log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
examples = pd.read_pickle(sys.argv[2])
items = pd.read_pickle(sys.argv[3])
ds = ray.data.from_pandas([examples.iloc[i::4].reset_index(drop=True) for i in range(4)])
config = TrainConfig(num_workers=1, use_gpu=False, batch_size=64, epochs=50, dim=16, seed=2)
train_two_tower(ds, items, config, sys.argv[4], "driver_dies", inputs=UserInputSpec.from_service(recommender_user))
"""


def test_run_whose_driver_died_resumes_from_its_latest_checkpoint(ray_session, shop, tmp_path):
    ray = ray_session
    runs = tmp_path / "runs"
    shop["examples"].to_pickle(tmp_path / "examples.pkl")
    shop["items"].to_pickle(tmp_path / "items.pkl")
    env = {**os.environ, "RAY_TRAIN_V2_ENABLED": "1", "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    with open(tmp_path / "driver.log", "wb") as out:
        driver = subprocess.Popen(
            [sys.executable, "-c", _DRIVER, ray.get_runtime_context().gcs_address,
             str(tmp_path / "examples.pkl"), str(tmp_path / "items.pkl"), str(runs)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while (latest_epoch_of_run(str(runs), "driver_dies") or 0) < 1:
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "driver.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        os.kill(driver.pid, signal.SIGKILL)  # the driver dies: no clean shutdown of the run
        driver.wait(timeout=60)
    done = latest_epoch_of_run(str(runs), "driver_dies")
    assert done is not None and 1 <= done < 50
    saved = json.loads((runs / "driver_dies" / f"epoch_{done:04d}" / "extra.json").read_text())

    config = TrainConfig(num_workers=1, use_gpu=False, batch_size=64, epochs=done + 1, dim=16, seed=2)
    resumed = train_two_tower(_dataset(ray, shop["examples"]), shop["items"], config, str(runs), "driver_dies",
                              inputs=INPUTS, require_existing=True)
    # the epochs the dead driver finished are carried over as they were, not trained again
    assert [h["epoch"] for h in resumed.history] == list(range(1, done + 2))
    assert resumed.history[:done] == saved["history"]
    assert resumed.history[-1]["global_step"] == saved["global_step"] + resumed.history[-1]["steps_per_worker"]
    assert Path(resumed.latest_checkpoint_path).name == f"epoch_{done + 1:04d}"
    assert resumed.restarts == 0 and resumed.steps_redone == 0

    with pytest.raises(NotFoundError, match="no training run 'nope'"):
        train_two_tower(_dataset(ray, shop["examples"]), shop["items"], config, str(runs), "nope",
                        inputs=INPUTS, require_existing=True)
    assert latest_epoch_of_run(str(runs), "nope") is None
    assert np.isfinite(resumed.history[-1]["val_loss"])
