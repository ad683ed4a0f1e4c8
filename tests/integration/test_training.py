"""Ray Train end to end on small structured data: checkpoints, artifacts, and a model that learns.

The synthetic shop has users who stick to one category; a model that learns from history
must beat both a random ranking and the global popularity ranking on the hold-out week.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from aiplatform.core.errors import ConfigError
from aiplatform.core.schemas import EVENT_TYPES
from aiplatform.features.pipeline import frame_from_events, training_labels
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import load_artifact
from aiplatform.training.config import TrainConfig
from aiplatform.training.evaluate import split_by_time
from aiplatform.training.recommender import TwoTowerSource, evaluate_recommender
from aiplatform.training.split import time_split
from aiplatform.training.train import train_two_tower
from apps.shop.features import recommender_user

pytestmark = pytest.mark.integration

N_USERS, N_ITEMS, N_CATS, EVENTS_PER_USER, DAYS = 300, 160, 8, 16, 30
K = 10
INPUTS = UserInputSpec.from_service(recommender_user)


def _shop(seed: int = 7) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(items, events): each user browses one favourite category (90%) or anything (10%)."""
    rng = np.random.default_rng(seed)
    items = pd.DataFrame(
        {
            "item_id": [f"item{i:04d}" for i in range(N_ITEMS)],
            "title": [f"thing {i}" for i in range(N_ITEMS)],
            "category": [f"cat{i % N_CATS}" for i in range(N_ITEMS)],
            "price": rng.lognormal(3, 1, N_ITEMS).round(2),
        }
    )
    items.loc[::17, "price"] = np.nan  # missing attributes must not break anything
    by_cat = [items.item_id[items.category == f"cat{c}"].to_numpy() for c in range(N_CATS)]
    end = pd.Timestamp("2026-03-01", tz="UTC")
    rows = []
    for u in range(N_USERS):
        fav = rng.integers(N_CATS)
        offsets = np.sort(rng.uniform(0, DAYS, EVENTS_PER_USER))
        for off in offsets:
            pool = by_cat[fav] if rng.random() < 0.9 else items.item_id.to_numpy()
            rows.append(
                (
                    f"user{u:04d}",
                    str(rng.choice(pool)),
                    str(rng.choice(EVENT_TYPES, p=[0.55, 0.3, 0.1, 0.05])),
                    (end - pd.Timedelta(days=DAYS) + pd.Timedelta(days=float(off))).floor("s"),
                )
            )
    events = pd.DataFrame(rows, columns=["user_id", "item_id", "event_type", "timestamp"])
    return items, events.sort_values("timestamp", kind="stable").reset_index(drop=True)


def _examples(train_events: pd.DataFrame, end: pd.Timestamp | None = None) -> pd.DataFrame:
    """One training example per event, with the user's feature-service row strictly before it
    (the shop's declared features, joined point-in-time in memory)."""
    end = end if end is not None else train_events["timestamp"].max() + pd.Timedelta(seconds=1)
    return frame_from_events(recommender_user, train_events, training_labels(train_events, end, EVENT_TYPES))


def _context(train_events: pd.DataFrame, cutoff: pd.Timestamp) -> pd.DataFrame:
    """Every user's feature-service row at the cutoff."""
    users = sorted(train_events["user_id"].unique())
    labels = pd.DataFrame({"user_id": users, "event_timestamp": cutoff})
    return frame_from_events(recommender_user, train_events, labels)


def test_train_two_tower_learns_and_checkpoints(ray_session, tmp_path):
    ray = ray_session
    items, events = _shop()
    cutoff, train_events, truth = split_by_time(events, holdout_days=7)
    examples = _examples(train_events)
    assert 3000 <= len(examples) <= 5000
    # four blocks, so the encoding and the shuffle run as several tasks (split by hand:
    # from_pandas(override_num_blocks=...) does not work with pandas 3)
    ds = ray.data.from_pandas([examples.iloc[i::4].reset_index(drop=True) for i in range(4)])

    runs_dir = tmp_path / "runs"
    config = TrainConfig(num_workers=2, use_gpu=False, batch_size=128, epochs=3, lr=1e-2, dim=32,
                         temperature=0.1, seed=0, shuffle_buffer=512)
    result = train_two_tower(ds, items, config, str(runs_dir), "two_tower_test", inputs=INPUTS)

    # checkpoints: under runs_dir/run_name, at most two kept, each one a loadable artifact
    run_dir = runs_dir / "two_tower_test"
    ckpts = sorted(p.name for p in run_dir.glob("epoch_*"))
    assert ckpts == ["epoch_0002", "epoch_0003"]
    assert Path(result.checkpoint_path).resolve() == (run_dir / "epoch_0003").resolve()
    loaded, loaded_vocab = load_artifact(result.checkpoint_path)
    assert loaded.config() == result.model.config()
    assert loaded_vocab == result.vocab and result.vocab.n_items == N_ITEMS
    assert loaded.inputs == INPUTS and loaded.config()["n_dense"] == INPUTS.n_dense  # the contract is saved

    # history: one entry per epoch, all examples seen, loss going down
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert all(h["samples"] > 0.9 * len(examples) for h in result.history)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert result.params["batch_size"] == 128 and result.params["n_items"] == N_ITEMS

    # quality: the model uses history, so it beats random and popularity on the hold-out week
    context = _context(train_events, cutoff)
    split = time_split(events, holdout_days=7)
    source = TwoTowerSource(result.model, result.vocab, depth=50, contexts=context)
    report = evaluate_recommender(None, source, split, ease=None, k=K)
    assert report["users"] >= 100
    random_recall = K / N_ITEMS
    assert report["model"][f"recall@{K}"] > 3 * random_recall
    assert report["model"][f"recall@{K}"] > report["popularity"][f"recall@{K}"]
    assert report["model"][f"ndcg@{K}"] > report["popularity"][f"ndcg@{K}"]
    assert report["beats_baselines"]["popularity"] is True
    # the co-occurrence baseline also learns the categories, so it too is far above popularity,
    # and a personalised ranking spreads over more of the catalogue than one global top-k
    assert report["cooccurrence"][f"recall@{K}"] > report["popularity"][f"recall@{K}"]
    assert report["model"][f"coverage@{K}"] > report["popularity"][f"coverage@{K}"]
    assert report["model"]["recall@50"] >= report["model"][f"recall@{K}"]



def test_same_run_name_resumes_from_latest_checkpoint(ray_session, tmp_path):
    """A second call with the same run name continues the run instead of starting over."""
    ray = ray_session
    items, events = _shop(seed=3)
    ds = ray.data.from_pandas(_examples(events.head(1200)))
    config = TrainConfig(num_workers=1, use_gpu=False, batch_size=64, epochs=1, dim=8, seed=1)
    first = train_two_tower(ds, items, config, str(tmp_path), "resumable", inputs=INPUTS)
    second = train_two_tower(ds, items, config.model_copy(update={"epochs": 2}), str(tmp_path), "resumable",
                             inputs=INPUTS)

    assert [h["epoch"] for h in first.history] == [1]
    # epoch 1 is carried over from the first call, not retrained
    assert [h["epoch"] for h in second.history] == [1, 2]
    assert second.history[0] == first.history[0]
    assert Path(second.checkpoint_path).name == "epoch_0002"
    assert not torch.equal(
        first.model.item_embedding(torch.arange(3)), second.model.item_embedding(torch.arange(3))
    )
    # a run cannot continue on other inputs than it was trained on
    other = UserInputSpec.from_service(recommender_user, exclude=None)
    with pytest.raises(ConfigError, match="other model inputs"):
        train_two_tower(ds, items, config.model_copy(update={"epochs": 3}), str(tmp_path), "resumable", inputs=other)
