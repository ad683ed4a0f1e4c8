"""The parts of a small storage root that the serving integration tests build by hand: a catalog
of items, two-tower artifacts with random (seeded) weights, and online feature rows for
``u0``, ``u1``, … with a few recent items each.

Random weights are enough for these tests: answers are deterministic for a seed, and what they
check (rollouts, degraded answers, replica freshness) does not depend on the model being good.
Each test still registers the versions and aliases it needs itself: that is what differs.
"""

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from aiplatform.core.storage import Layout
from aiplatform.features.definitions import arrow_type
from aiplatform.features.partition import TIMESTAMP_COLUMN
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel, save_artifact
from apps.shop.features import recommender_user

INPUTS = UserInputSpec.from_service(recommender_user)
COUNTS = [n for n, t in recommender_user.stored_dtypes.items() if t == "int64"]
"""The recommender's count features (the int64 columns of its online row)."""
AS_OF = datetime(2024, 1, 1, tzinfo=timezone.utc)


def new_layout(base: Path) -> Layout:
    """An empty storage root at ``base/home``."""
    layout = Layout.at(str(base / "home"))
    layout.ensure()
    return layout


def catalog(n_items: int) -> pd.DataFrame:
    """``item_000``, ``item_001``, … in five categories, priced 5 to 120."""
    return pd.DataFrame({"item_id": [f"item_{i:03d}" for i in range(n_items)],
                         "category": [f"cat_{i % 5}" for i in range(n_items)],
                         "price": np.linspace(5.0, 120.0, n_items)})


def save_random_two_tower(items: pd.DataFrame, path: Path, seed: int = 0) -> str:
    """A two-tower artifact over ``items`` (dim 16) whose weights come from ``torch.manual_seed(seed)``;
    returns its path, ready for ``ModelRegistry.register``."""
    vocab = ItemVocab.from_items(items)
    torch.manual_seed(seed)
    save_artifact(TwoTowerModel(**vocab.model_kwargs(), dim=16, inputs=INPUTS), vocab, str(path))
    return str(path)


def user_rows(n_users: int, n_items: int, count: int | None = None) -> pd.DataFrame:
    """Online rows for ``u0`` … ``u{n_users-1}`` as of 2024-01-01: five recent items each (seeded),
    nothing purchased, and each count feature set to ``count``, or, when None, to its position
    among the count features (0, 1, 2, …)."""
    rng = np.random.default_rng(0)
    values = (np.full((n_users, len(COUNTS)), count, dtype=np.int64) if count is not None
              else np.tile(np.arange(len(COUNTS), dtype=np.int64), (n_users, 1)))
    frame = pd.DataFrame(values, columns=COUNTS)
    frame.insert(0, "user_id", [f"u{i}" for i in range(n_users)])
    frame["last_items"] = [[f"item_{j:03d}" for j in rng.choice(n_items, 5, replace=False)] for _ in range(n_users)]
    frame["purchased_items"] = [[] for _ in range(n_users)]
    frame["as_of"] = AS_OF
    return frame


def write_user_rows_to(store, frame: pd.DataFrame) -> int:
    """``tests.feature_rows.write_user_rows`` for any online store (that one writes the root's
    SQLite file): ``frame`` as ``user_rows`` makes it, missing features 0 or empty."""
    columns = {"user_id": pa.array(frame["user_id"].astype(str), pa.string()),
               TIMESTAMP_COLUMN: pa.array(pd.to_datetime(frame["as_of"], utc=True), pa.timestamp("us", tz="UTC"))}
    for name, dtype in recommender_user.stored_dtypes.items():
        values = frame[name] if name in frame else [[] if dtype.startswith("list") else 0] * len(frame)
        if dtype == "int64":
            values = pd.Series(values).astype("int64")
        columns[name] = pa.array(list(values), arrow_type(dtype))
    return store.write_features(recommender_user, pa.table(columns))


__all__ = ["AS_OF", "COUNTS", "INPUTS", "catalog", "new_layout", "save_random_two_tower", "user_rows",
           "write_user_rows_to"]
