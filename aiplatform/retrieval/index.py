"""Item embeddings in LanceDB: build the table for one model version, then search it.

One table per model version (``two_tower_v3``), so a new model's index is built beside the one
being served and the switch is a change of which table the serving layer opens. The table is
written in one LanceDB commit (mode overwrite): a reader sees the old table or the complete
new one, never a half-written one.

The vectors folder may be local or in the object store (``s3://…/vectors``): LanceDB gets the
same endpoint and region as every other layer (``storage.storage_options``), and the embedding
actors load the model artifact from its URI (a node-local copy, see ``load_artifact``).

Scores are cosine similarities (``1 - cosine distance``). Small catalogues are searched exactly
(brute force is correct and, below a few thousand rows, as fast as an index); an IVF-PQ index
is built only from ``ANN_MIN_ROWS`` rows up.
"""

import logging
import math
from collections.abc import Iterator
from datetime import timedelta

import numpy as np
import pandas as pd
import pyarrow as pa

from aiplatform.core import storage
from aiplatform.core.errors import NotFoundError, UserInputError

log = logging.getLogger(__name__)

METRIC = "cosine"
ANN_MIN_ROWS = 5000
"""Below this many rows an index is slower to build than exact search saves; search is exact."""
VECTOR_COLUMN = "vector"


def vector_table_name(model_name: str, version: int) -> str:
    """The LanceDB table that holds the item vectors of one model version, e.g. two_tower_v3."""
    return f"{model_name}_v{int(version)}"


def _schema(dim: int, model_name: str = "", version: int = 0) -> pa.Schema:
    return pa.schema(
        [
            pa.field("item_id", pa.string(), nullable=False),
            pa.field("category", pa.string()),
            pa.field("price", pa.float64()),
            pa.field(VECTOR_COLUMN, pa.list_(pa.float32(), dim)),
        ],
        metadata={"model_name": model_name, "version": str(version), "metric": METRIC},
    )


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


def _num_sub_vectors(dim: int) -> int:
    """About four dimensions per PQ sub-vector (the default of dim/16 loses too much recall
    for the small dimensions used here); must divide ``dim``."""
    for per in (4, 8, 2, 16):
        if dim % per == 0:
            return dim // per
    return 1


def build_item_index(
    vectors_dir: str,
    model_name: str,
    version: int,
    artifact_dir: str,
    items: pd.DataFrame,
    batch_size: int = 1024,
) -> str:
    """Embed every item with the model artifact (Ray Data, an actor pool) and write the
    vectors as one LanceDB table. Returns the table name.

    The embedded batches stream to the driver and into a single ``create_table`` call, so the
    table appears in one commit and replaces any earlier build of the same version.
    """
    import lancedb
    import ray

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

    ds = ray.data.from_pandas(frame).map_batches(
        ItemEmbedder,
        fn_constructor_kwargs={"artifact_dir": artifact_dir},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2),
        batch_size=batch_size,
        batch_format="pandas",
        num_cpus=1,
    )

    batches = (b for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) if b.num_rows)
    first = next(batches, None)
    if first is None:
        raise UserInputError(
            f"items: none of the {len(frame)} item ids is known to model {model_name} "
            f"v{version}; index items from the catalogue the model was trained on"
        )
    dim = first.schema.field(VECTOR_COLUMN).type.list_size
    schema = _schema(dim, model_name, version)

    def record_batches() -> Iterator[pa.RecordBatch]:
        for tbl in (first, *batches):
            yield from tbl.select(schema.names).cast(schema).to_batches()

    name = vector_table_name(model_name, version)
    storage.make_dirs(vectors_dir)
    db = lancedb.connect(vectors_dir, storage_options=storage.storage_options(vectors_dir))
    reader = pa.RecordBatchReader.from_batches(schema, record_batches())
    table = db.create_table(name, reader, schema=schema, mode="overwrite")
    rows = table.count_rows()
    skipped = len(frame) - rows
    if skipped:
        log.warning("%d items unknown to %s v%s were not indexed", skipped, model_name, version)

    if rows >= ANN_MIN_ROWS:
        from lancedb.index import IvfPq

        table.create_index(
            VECTOR_COLUMN,
            config=IvfPq(
                distance_type=METRIC,
                num_partitions=max(1, int(math.sqrt(rows))),
                num_sub_vectors=_num_sub_vectors(dim),
            ),
        )
    log.info("indexed %d items of %s v%s into %s/%s", rows, model_name, version, vectors_dir, name)
    return name


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class ItemIndex:
    """Read side of one vector table: nearest items to a vector, and items similar to an item."""

    def __init__(self, vectors_dir: str, table_name: str) -> None:
        import lancedb

        self.vectors_dir = vectors_dir
        self.table_name = table_name
        db = lancedb.connect(vectors_dir, storage_options=storage.storage_options(vectors_dir),
                             read_consistency_interval=timedelta(0))
        tables = list(db.list_tables().tables) if _db_exists(vectors_dir) else []
        if table_name not in tables:
            have = ", ".join(tables) or "none"
            raise NotFoundError(
                f"vector table {table_name!r} not found in {vectors_dir} (tables: {have}); "
                "build it with build_item_index()"
            )
        self._table = db.open_table(table_name)
        vec_type = self._table.schema.field(VECTOR_COLUMN).type
        self.dim = int(vec_type.list_size)
        self._indexed = bool(self._table.list_indices())
        self._nprobes = max(20, int(math.sqrt(max(1, len(self)))) // 4)

    def __len__(self) -> int:
        return int(self._table.count_rows())

    def search(
        self, vector: np.ndarray, k: int, exclude: set[str] | frozenset[str] = frozenset()
    ) -> list[tuple[str, float]]:
        """The ``k`` items nearest to ``vector`` as (item_id, cosine similarity), best first,
        leaving out ``exclude`` (over-fetching by its size so ``k`` are still returned)."""
        if k <= 0:
            return []
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise UserInputError(f"query vector has {vec.shape[0]} dimensions; expected {self.dim}")
        query = (
            self._table.search(vec, vector_column_name=VECTOR_COLUMN)
            .distance_type(METRIC)
            .select(["item_id", "_distance"])
            .limit(k + len(exclude))
        )
        if self._indexed:
            query = query.nprobes(self._nprobes).refine_factor(4)
        result = query.to_arrow()
        out: list[tuple[str, float]] = []
        for item_id, dist in zip(
            result.column("item_id").to_pylist(), result.column("_distance").to_pylist()
        ):
            if item_id in exclude:
                continue
            out.append((item_id, 1.0 - float(dist)))
            if len(out) == k:
                break
        return out

    def vector_of(self, item_id: str) -> np.ndarray | None:
        """The stored vector of ``item_id``, or None if the item is not in the table."""
        rows = (
            self._table.search()
            .where(f"item_id = {_quote(str(item_id))}")
            .select([VECTOR_COLUMN])
            .limit(1)
            .to_arrow()
        )
        if rows.num_rows == 0:
            return None
        return np.asarray(rows.column(VECTOR_COLUMN)[0].values.to_numpy(), dtype=np.float32)

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]] | None:
        """Items nearest to ``item_id`` (never the item itself); None if it is unknown."""
        vec = self.vector_of(item_id)
        if vec is None:
            return None
        return self.search(vec, k, exclude={str(item_id)})


def _db_exists(vectors_dir: str) -> bool:
    """A missing local folder has no tables; on an object store a missing prefix simply lists
    none, so it is always asked."""
    return storage.is_uri(vectors_dir) or storage.is_dir(vectors_dir)
