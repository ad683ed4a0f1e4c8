"""Item vectors of one model version: LanceDB is the store of record, an in-memory index serves.

One table per model version (``two_tower_v3``), so a new model's index is built beside the one
being served and the switch is a change of which table the serving layer opens. A build writes
the table in one LanceDB commit (mode overwrite): a reader sees the old table or the complete
new one, never a half-written one. The vectors folder may be local or in the object store
(``s3://…/vectors``): LanceDB gets the same endpoint and region as every other layer.

Serving does not query LanceDB (2-4 ms a query whatever the size). ``ItemIndex`` reads the
table once and searches in memory (``ann.VectorIndex``): exactly up to ``EXACT_MAX_ROWS`` items,
through a faiss HNSW graph above. The graph is built and saved by ``build_item_index`` (see
``persist``), its recall@10 against exact search measured and recorded in the registry; a
replica loads it, and refuses one measured below ``min_recall`` (``LowRecallError``) unless
``allow_low_recall=True``. Refusing rather than silently falling back to exact search: at the
sizes that have a graph, exact search is 100x slower, which is an outage of its own; the
operator decides (rebuild with larger ``HnswParams``, or accept the recall).

Scores are cosine similarities (LanceDB's ``1 - cosine distance``); exact, HNSW and LanceDB
agree because vectors and queries are L2-normalised before an inner product.

Updates: ``ItemIndex.upsert`` (vectors already computed) or ``build_item_index(mode="upsert")``
(embedded with the version's model) merge rows into the table on ``item_id`` and into the
in-memory index: the next search sees them. Other replicas see them after ``refresh()`` (or
when they next open the table); ``build_item_index`` saves the updated graph.
"""

import hashlib
import logging
import threading
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from aiplatform.core import storage
from aiplatform.core.errors import NotFoundError, UserInputError
from aiplatform.retrieval import persist
from aiplatform.retrieval.ann import (EXACT_MAX_ROWS, MIN_RECALL, HnswParams, LowRecallError, VectorIndex,
                                      check_price_range)
from aiplatform.retrieval.embed import VECTOR_COLUMN, embed_items, prepare_items

log = logging.getLogger(__name__)

METRIC = "cosine"
ANN_MIN_ROWS = EXACT_MAX_ROWS + 1
"""From this many rows up the serving index is an HNSW graph; below, search is exact."""
MODES = ("overwrite", "upsert")

__all__ = ["ANN_MIN_ROWS", "HnswParams", "ItemIndex", "LowRecallError", "build_item_index", "require_table",
           "vector_table_name", "write_item_vectors"]


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


def _connect(vectors_dir: str):
    import lancedb

    return lancedb.connect(vectors_dir, storage_options=storage.storage_options(vectors_dir),
                           read_consistency_interval=timedelta(0))


def _table_names(db: Any, vectors_dir: str) -> list[str]:
    """A missing local folder has no tables; on an object store a missing prefix simply lists
    none, so it is always asked."""
    if not (storage.is_uri(vectors_dir) or storage.is_dir(vectors_dir)):
        return []
    return list(db.list_tables().tables)


def require_table(vectors_dir: str, table_name: str, nonempty: bool = False) -> None:
    """Raise ``NotFoundError`` naming the tables that exist unless ``table_name`` is one (and,
    with ``nonempty``, holds rows): the check before a version is served, without loading its
    index."""
    db = _connect(vectors_dir)
    tables = _table_names(db, vectors_dir)
    fix = "build it with build_item_index() (or `aiplatform models promote`, which builds it first)"
    if table_name not in tables:
        raise NotFoundError(
            f"vector table {table_name!r} not found in {vectors_dir} (tables: {', '.join(tables) or 'none'}); {fix}")
    if nonempty and db.open_table(table_name).count_rows() == 0:
        raise NotFoundError(f"vector table {table_name!r} in {vectors_dir} is empty: no item can be served; {fix}")


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise UserInputError(f"mode {mode!r} is unknown; use one of {', '.join(MODES)}")


# ---- writing ------------------------------------------------------------------------------
def build_item_index(
    vectors_dir: str,
    model_name: str,
    version: int,
    artifact_dir: str,
    items: pd.DataFrame,
    batch_size: int = 1024,
    *,
    mode: str = "overwrite",
    registry: Any = None,
    hnsw: HnswParams = HnswParams(),
    exact_max_rows: int = EXACT_MAX_ROWS,
) -> str:
    """Embed ``items`` with the model artifact (Ray Data, an actor pool), write them to the
    version's LanceDB table and build its serving index. Returns the table name.

    ``mode="overwrite"`` replaces the table (one commit); ``mode="upsert"`` merges the items into
    it on ``item_id`` (new ones added, known ones replaced) and updates the saved graph. With a
    ``registry`` (``ModelRegistry``) the index facts, measured recall@10 included, are recorded
    for ``model_name`` ``version``.
    """
    _check_mode(mode)
    if registry is not None:
        registry.get(model_name, version)  # an unregistered version fails before any work
    frame = prepare_items(items)
    batches = embed_items(frame, artifact_dir, batch_size)
    first = next(batches, None)
    if first is None:
        raise UserInputError(
            f"items: none of the {len(frame)} item ids is known to model {model_name} "
            f"v{version}; index items from the catalogue the model was trained on"
        )
    schema = _schema(first.schema.field(VECTOR_COLUMN).type.list_size, model_name, version)
    embedded = [0]

    def record_batches() -> Iterator[pa.RecordBatch]:
        for tbl in (first, *batches):
            embedded[0] += tbl.num_rows
            yield from tbl.select(schema.names).cast(schema).to_batches()

    name = vector_table_name(model_name, version)
    _store(vectors_dir, name, pa.RecordBatchReader.from_batches(schema, record_batches()), schema, mode)
    if len(frame) - embedded[0]:
        log.warning("%d items unknown to %s v%s were not indexed", len(frame) - embedded[0], model_name, version)
    facts = _index_table(vectors_dir, name, mode, hnsw, exact_max_rows)
    if registry is not None:
        registry.record_index(model_name, version, {**facts, "mode": mode})
    log.info("indexed %d items of %s v%s into %s/%s (%s)", embedded[0], model_name, version, vectors_dir, name, mode)
    return name


def write_item_vectors(
    vectors_dir: str,
    table_name: str,
    items: pd.DataFrame | pa.Table,
    *,
    mode: str = "overwrite",
    hnsw: HnswParams = HnswParams(),
    exact_max_rows: int = EXACT_MAX_ROWS,
) -> dict[str, Any]:
    """Store vectors computed elsewhere (``item_id``, ``vector``, optional ``category``,
    ``price``) as ``table_name`` and build its serving index; returns the index facts."""
    _check_mode(mode)
    data = _vectors_table(items)
    _store(vectors_dir, table_name, data, _schema(data.schema.field(VECTOR_COLUMN).type.list_size), mode)
    return _index_table(vectors_dir, table_name, mode, hnsw, exact_max_rows)


def _vectors_table(items: pd.DataFrame | pa.Table, dim: int | None = None) -> pa.Table:
    """Rows with vectors as an Arrow table of the vector-table schema (one row per id, the last
    wins); a missing category is null and a missing price NaN."""
    tbl = items if isinstance(items, pa.Table) else None
    if tbl is None:
        if not isinstance(items, pd.DataFrame):
            raise UserInputError(f"items: expected a pandas DataFrame or an Arrow table, got {type(items).__name__}")
        for col in ("item_id", VECTOR_COLUMN):
            if col not in items.columns:
                raise UserInputError(f"items: column {col!r} is missing; expected item_id and vector columns")
        if items.empty:
            raise UserInputError("items: no rows to index; expected at least one item")
        try:
            vecs = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in items[VECTOR_COLUMN]])
        except ValueError as exc:
            raise UserInputError(f"items: column 'vector' must hold vectors of one length: {exc}") from exc
        frame = prepare_items(items)
        keep = ~items["item_id"].astype(str).duplicated(keep="last").to_numpy()
        vecs = vecs[keep]
        tbl = pa.table({"item_id": pa.array(frame["item_id"].tolist(), pa.string()),
                        "category": pa.array(frame["category"].tolist(), pa.string()),
                        "price": pa.array(frame["price"].to_numpy(np.float64)),
                        VECTOR_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), vecs.shape[1])})
    else:
        for col in ("item_id", VECTOR_COLUMN):
            if col not in tbl.column_names:
                raise UserInputError(f"items: column {col!r} is missing; expected item_id and vector columns")
        for col, typ in (("category", pa.string()), ("price", pa.float64())):
            if col not in tbl.column_names:
                tbl = tbl.append_column(col, pa.nulls(tbl.num_rows, typ))
        ids = tbl.column("item_id").to_pandas().astype(str)
        if ids.duplicated().any():
            tbl = tbl.filter(pa.array(~ids.duplicated(keep="last").to_numpy()))
    typ = tbl.schema.field(VECTOR_COLUMN).type
    have = getattr(typ, "list_size", None)
    if have is None or have <= 0:
        raise UserInputError(f"items: column 'vector' has type {typ}; expected fixed-size lists of float32")
    if dim is not None and have != dim:
        raise UserInputError(f"items: column 'vector' has {have} dimensions; this index has {dim}")
    if tbl.num_rows == 0:
        raise UserInputError("items: no rows to index; expected at least one item")
    return tbl.select(["item_id", "category", "price", VECTOR_COLUMN]).cast(_schema(have))


def _store(vectors_dir: str, name: str, data: pa.Table | pa.RecordBatchReader, schema: pa.Schema, mode: str) -> None:
    storage.make_dirs(vectors_dir)
    db = _connect(vectors_dir)
    if mode == "upsert" and name in _table_names(db, vectors_dir):
        table = db.open_table(name)
        have = table.schema.field(VECTOR_COLUMN).type.list_size
        data = data.read_all() if isinstance(data, pa.RecordBatchReader) else data
        if data.schema.field(VECTOR_COLUMN).type.list_size != have:
            raise UserInputError(f"items: vectors have {data.schema.field(VECTOR_COLUMN).type.list_size} "
                                 f"dimensions; table {name} holds {have}")
        _merge(table, data)
        return
    db.create_table(name, data, schema=schema, mode="overwrite")


def _merge(table: Any, data: pa.Table) -> Any:
    data = data.cast(pa.schema(list(table.schema)))  # the table's field order, without its metadata
    return (table.merge_insert("item_id").when_matched_update_all().when_not_matched_insert_all()
            .execute(data))


def _index_table(vectors_dir: str, name: str, mode: str, hnsw: HnswParams, exact_max_rows: int) -> dict[str, Any]:
    """Build (overwrite) or update (upsert) the serving index of ``name``, save it (the graph,
    or the decision to serve exactly), and return its facts."""
    pointer = persist.load_pointer(vectors_dir, name)
    if mode == "upsert" and pointer is not None and pointer.get("kind") == "hnsw":
        index = ItemIndex(vectors_dir, name, allow_low_recall=True, hnsw=hnsw, exact_max_rows=exact_max_rows)
        index.measure_recall()
        return index.save()
    ds = _connect(vectors_dir).open_table(name).to_lance()
    ids, vecs, cats, prices = _read(ds)
    index = VectorIndex.build(ids, vecs, cats, prices, exact_max_rows=exact_max_rows, hnsw=hnsw)
    facts = {**index.facts(), "table": name, "table_version": int(ds.version)}
    if index.kind == "hnsw":
        persist.save_graph(vectors_dir, name, index, int(ds.version), _fingerprint(ds))
    elif len(index) > EXACT_MAX_ROWS:  # exact where a replica would build a graph: say so
        persist.save_exact(vectors_dir, name, facts, int(ds.version))
    else:  # the usual small catalogue: nothing beside the table
        persist.delete_graph(vectors_dir, name)
    return facts


def _read(ds: Any, vectors: bool = True) -> tuple[list[str], np.ndarray | None, list[str | None], np.ndarray]:
    """All rows of one table version (a Lance dataset) or of an Arrow table, as
    (ids, vectors, categories, prices)."""
    cols = ["item_id", "category", "price"] + ([VECTOR_COLUMN] if vectors else [])
    tbl = ds.select(cols) if isinstance(ds, pa.Table) else ds.to_table(columns=cols)
    vecs = None
    if vectors:
        col = tbl.column(VECTOR_COLUMN).combine_chunks()
        dim = col.type.list_size
        vecs = col.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dim)
    prices = tbl.column("price").to_numpy(zero_copy_only=False).astype(np.float64)
    return tbl.column("item_id").to_pylist(), vecs, tbl.column("category").to_pylist(), prices


def _fingerprint(ds: Any) -> str:
    """Identifies one table version's content: its version and data files (a table deleted and
    recreated restarts at version 1, but with new file names)."""
    parts = [f"{f.fragment_id}:{[d.path for d in f.data_files()]}:{f.metadata.deletion_file}"
             for f in ds.get_fragments()]
    return f"{ds.version}:" + hashlib.sha1("|".join(parts).encode(), usedforsecurity=False).hexdigest()


# ---- reading ------------------------------------------------------------------------------
class ItemIndex:
    """Read side of one vector table (the serving path): nearest items to a vector, items similar
    to an item, both with optional category / price filters; plus upserts.

    ``min_recall``/``allow_low_recall``: the recall gate (module docstring). ``hnsw`` and
    ``exact_max_rows`` apply only when no saved graph exists and the index is built here.
    """

    def __init__(
        self,
        vectors_dir: str,
        table_name: str,
        *,
        min_recall: float = MIN_RECALL,
        allow_low_recall: bool = False,
        hnsw: HnswParams = HnswParams(),
        exact_max_rows: int = EXACT_MAX_ROWS,
    ) -> None:
        self.vectors_dir, self.table_name = vectors_dir, table_name
        self._lancedb_table: Any = None
        ds = self._dataset()
        self.dim = int(ds.schema.field(VECTOR_COLUMN).type.list_size)
        self._lock = threading.RLock()
        self._index, self._version = self._load(hnsw, exact_max_rows)
        self._check_recall(min_recall, allow_low_recall)

    def _dataset(self) -> Any:
        """The table's latest version as a Lance dataset, opened with ``lance`` alone: importing
        LanceDB costs a serving replica ~1.3 s of its cold start, and loading the index needs
        only the dataset. A missing table is the ``NotFoundError`` that names the tables there."""
        import lance

        uri = storage.join(self.vectors_dir, f"{self.table_name}.lance")
        try:
            return lance.dataset(uri, storage_options=storage.storage_options(uri) or None)
        except (ValueError, OSError, FileNotFoundError):
            require_table(self.vectors_dir, self.table_name)  # raises with the tables that exist
            raise

    @property
    def _table(self) -> Any:
        """The LanceDB table, for filtered queries and upserts: opened on first use."""
        if self._lancedb_table is None:
            self._lancedb_table = _connect(self.vectors_dir).open_table(self.table_name)
        return self._lancedb_table

    def _load(self, hnsw: HnswParams, exact_max_rows: int) -> tuple[VectorIndex, int]:
        """The saved graph (brought up to the table's version) when the build made one; else
        the index built here from the table: exact when the build chose exact, otherwise (a
        table built by an older release) by size."""
        ds = self._dataset()
        pointer = persist.load_pointer(self.vectors_dir, self.table_name)
        saved = persist.load_graph(self.vectors_dir, self.table_name) if pointer else None
        if saved is not None and saved[0].dim == self.dim:
            index, pointer = saved
            if pointer.get("fingerprint") == _fingerprint(ds):
                ids, _, cats, prices = _read(ds, vectors=False)
                index.set_attributes(ids, cats, prices)
            else:  # items changed since the graph was saved: apply the difference
                _sync(index, ds)
            return index, int(ds.version)
        ids, vecs, cats, prices = _read(ds)
        kind = "exact" if (pointer or {}).get("kind") == "exact" else "auto"
        if kind == "auto" and len(ids) > exact_max_rows:
            log.warning("%s has %d rows and no saved graph: building one here (slow for large tables; "
                        "build_item_index() saves it)", self.table_name, len(ids))
        index = VectorIndex.build(ids, vecs, cats, prices, kind=kind, exact_max_rows=exact_max_rows, hnsw=hnsw)
        return index, int(ds.version)

    def _check_recall(self, min_recall: float, allow_low_recall: bool) -> None:
        if self._index.kind != "hnsw":
            return
        recall = self._index.recall if self._index.recall is not None else self._index.measure_recall()
        if recall >= min_recall:
            return
        msg = (f"vector index {self.table_name!r} has measured recall@10 {recall:.3f}, below min_recall "
               f"{min_recall}; rebuild it with larger HnswParams (m, ef_construction, ef_search) through "
               "build_item_index(), or pass allow_low_recall=True to serve it anyway")
        if not allow_low_recall:
            raise LowRecallError(msg)
        log.warning("serving anyway (allow_low_recall): %s", msg)

    # ---- facts ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._index)

    @property
    def kind(self) -> str:
        """'exact' or 'hnsw'."""
        return self._index.kind

    @property
    def recall(self) -> float | None:
        """Measured recall@10 against exact search (1.0 for an exact index)."""
        return self._index.recall

    def facts(self) -> dict[str, Any]:
        return {**self._index.facts(), "table": self.table_name, "table_version": self._version}

    def measure_recall(self) -> float:
        return self._index.measure_recall()

    # ---- search ---------------------------------------------------------------------------
    def search(
        self,
        vector: np.ndarray,
        k: int,
        exclude: set[str] | frozenset[str] = frozenset(),
        *,
        category: str | list[str] | None = None,
        price_min: float | None = None,
        price_max: float | None = None,
    ) -> list[tuple[str, float]]:
        """The ``k`` items nearest to ``vector`` as (item_id, cosine similarity), best first,
        leaving out ``exclude`` and items outside the filters (an unknown category matches
        nothing; a missing price never matches a price filter). ``k`` come back when ``k`` match."""
        vec = np.asarray(vector, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise UserInputError(f"query vector has {vec.shape[0]} dimensions; expected {self.dim}")
        return self._index.search(vec, k, exclude, category=category, price_min=price_min, price_max=price_max)

    def vector_of(self, item_id: str) -> np.ndarray | None:
        """The stored vector of ``item_id`` as the table holds it, or None if it is not there."""
        rows = (self._table.search().where(f"item_id = {_quote(str(item_id))}")
                .select([VECTOR_COLUMN]).limit(1).to_arrow())
        if rows.num_rows == 0:
            return None
        return np.asarray(rows.column(VECTOR_COLUMN)[0].values.to_numpy(), dtype=np.float32)

    def similar(
        self,
        item_id: str,
        k: int,
        *,
        category: str | list[str] | None = None,
        price_min: float | None = None,
        price_max: float | None = None,
    ) -> list[tuple[str, float]] | None:
        """Items nearest to ``item_id`` (never the item itself), filtered like ``search``;
        None if the item is unknown."""
        check_price_range(price_min, price_max)
        vec = self._index.vector_of(str(item_id))
        if vec is None:
            return None
        return self._index.search(vec, k, {str(item_id)}, category=category, price_min=price_min,
                                  price_max=price_max)

    # ---- updates --------------------------------------------------------------------------
    def upsert(self, items: pd.DataFrame | pa.Table) -> dict[str, int]:
        """Merge rows with vectors (``item_id``, ``vector``, ``category``, ``price``) into the
        table on ``item_id`` and into this index; the next search sees them. A row replaces the
        whole item: a category or price left out is stored as missing."""
        data = _vectors_table(items, self.dim)
        with self._lock:
            result = _merge(self._table, data)
            ids, vecs, cats, prices = _read(data)
            counts = self._index.upsert(ids, vecs, cats, prices)
            if int(result.version) == self._version + 1:  # nobody else wrote in between
                self._version = int(result.version)
        log.info("upserted %d items into %s: %s", data.num_rows, self.table_name, counts)
        return counts

    def refresh(self) -> int:
        """Apply what others wrote to the table since this index read it (another replica's or
        a job's upserts); returns the number of rows that changed (0 when none)."""
        with self._lock:
            ds = self._dataset()
            if int(ds.version) == self._version:
                return 0
            changed = _sync(self._index, ds)
            self._version = int(ds.version)
            return changed

    def save(self) -> dict[str, Any]:
        """Save the graph (when the index is one) for the table version it now reflects, so the
        next replica loads it instead of building; returns the index facts."""
        with self._lock:
            ds = self._dataset()
            if int(ds.version) != self._version:
                _sync(self._index, ds)
                self._version = int(ds.version)
            if self._index.kind == "hnsw":
                persist.save_graph(self.vectors_dir, self.table_name, self._index, self._version, _fingerprint(ds))
            return self.facts()


def _sync(index: VectorIndex, ds: Any) -> int:
    """Make ``index`` hold exactly the rows of table version ``ds``; returns rows changed."""
    ids, vecs, cats, prices = _read(ds)
    counts = index.upsert(ids, vecs, cats, prices) if ids else {"inserted": 0, "updated": 0}
    gone = set(index.live_ids()).difference(ids)
    removed = index.remove(gone) if gone else 0
    return counts["inserted"] + counts["updated"] + removed


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"
