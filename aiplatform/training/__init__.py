"""Training: Ray Train loops, data ingest, checkpoints and offline evaluation.

``train`` imports Ray lazily (inside functions), so importing this package stays cheap for
code that only needs the config or the metrics.
"""

from aiplatform.training.config import TrainConfig
from aiplatform.training.evaluate import (
    ndcg_at_k,
    popularity_ranking,
    recall_at_k,
    split_by_time,
)
from aiplatform.training.train import TrainResult, train_two_tower

__all__ = [
    "TrainConfig",
    "TrainResult",
    "ndcg_at_k",
    "popularity_ranking",
    "recall_at_k",
    "split_by_time",
    "train_two_tower",
]
