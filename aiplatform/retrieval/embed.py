"""Embedding the catalogue with a model version: Ray Data, an actor pool, one model per actor."""

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa

from aiplatform.core.errors import UserInputError

VECTOR_COLUMN = "vector"


def prepare_items(items: pd.DataFrame) -> pd.DataFrame:
    """The catalogue as (item_id, category, price): ids as strings, one row per id (the last
    wins), a missing category as null and a missing or unparsable price as NaN."""
    if "item_id" not in items.columns:
        raise UserInputError("items: column 'item_id' is missing; expected string item ids")
    frame = items.copy()
    frame["item_id"] = frame["item_id"].astype(str)
    frame = frame.drop_duplicates("item_id", keep="last").reset_index(drop=True)
    for col, default in (("category", None), ("price", np.nan)):
        if col not in frame.columns:
            frame[col] = default
    frame = frame[["item_id", "category", "price"]]
    frame["category"] = frame["category"].astype(object).where(frame["category"].notna(), None)
    frame["price"] = pd.to_numeric(frame["price"], errors="coerce").astype("float64")
    if frame.empty:
        raise UserInputError("items: no rows to index; expected at least one item")
    return frame


class ItemEmbedder:
    """Ray Data UDF: loads the model artifact once per actor and embeds batches of items.

    Items the model's vocabulary does not know (added to the catalogue after training) are
    dropped: their embedding would be the shared 'unknown' vector, which ranks them at random.
    """

    def __init__(self, artifact_dir: str) -> None:
        """``artifact_dir``: a local folder or an object-store URI (downloaded once per node)."""
        import torch

        from aiplatform.models.two_tower import load_artifact

        torch.set_num_threads(1)  # one actor per CPU; intra-op threads would oversubscribe
        self._torch = torch
        self.model, self.vocab = load_artifact(artifact_dir)
        self.model.eval()
        with torch.inference_mode():
            self.dim = int(self.model.item_embedding(torch.zeros(1, dtype=torch.long)).shape[1])

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        torch = self._torch
        ids = batch["item_id"].astype(str).tolist()
        idx = np.asarray(self.vocab.indices(ids), dtype=np.int64)
        known = idx > 0
        if known.any():
            with torch.inference_mode():
                vec = self.model.item_embedding(torch.as_tensor(idx[known])).cpu().numpy()
            vec = np.ascontiguousarray(vec, dtype=np.float32)
        else:
            vec = np.zeros((0, self.dim), dtype=np.float32)
        sub = batch.loc[known]
        category = sub["category"] if "category" in sub else pd.Series([None] * len(sub))
        price = sub["price"] if "price" in sub else pd.Series([np.nan] * len(sub))
        return pa.table(
            {
                "item_id": pa.array([i for i, k in zip(ids, known) if k], pa.string()),
                "category": pa.array(
                    [None if pd.isna(c) else str(c) for c in category], pa.string()
                ),
                "price": pa.array(pd.to_numeric(price, errors="coerce").to_numpy(np.float64)),
                VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(
                    pa.array(vec.reshape(-1), pa.float32()), self.dim
                ),
            }
        )


def embed_items(frame: pd.DataFrame, artifact_dir: str, batch_size: int = 1024) -> Iterator[pa.Table]:
    """Non-empty Arrow batches of (item_id, category, price, vector), streamed to the driver."""
    import ray

    ds = ray.data.from_pandas(frame).map_batches(
        ItemEmbedder,
        fn_constructor_kwargs={"artifact_dir": artifact_dir},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        batch_size=batch_size,
        batch_format="pandas",
        num_cpus=1,
    )
    return (b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows)
