"""The HNSW graph of a vector table, saved next to it so a serving replica loads instead of builds.

Why persist: building the graph of 1M items (dim 64, M=32) takes minutes of CPU, far too long
for a replica that autoscaling just started; loading it is a read of ~0.5 GB. An exact index
saves nothing (the vectors are read from LanceDB), except a pointer (``kind: exact``) when its
build was told to serve exactly a table larger than the default exact threshold.

Layout, under the LanceDB folder (local or object store, always through ``core.storage``)::

    vectors/_ann/<table>/<build>.faiss      faiss.serialize_index of the graph
    vectors/_ann/<table>/<build>.ids.arrow  item id of each graph node (null: a dead node)
    vectors/_ann/<table>/current.json       which build is current, and its facts

``current.json`` (the build's facts: kind, rows, recall, ...) is written last, in one atomic write (a rename, or one PUT), so a reader sees
the previous complete build or the new one. The build before the current one is kept for a
reader that read the old pointer a moment ago; older ones are deleted. LanceDB ignores
``_ann`` (it lists only ``*.lance`` folders).

The saved graph records the LanceDB table version it was built from. A reader that finds the
table at a later version (items upserted since) applies the difference itself: the graph is an
accelerator, the table stays the truth.
"""

import logging
import uuid
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

from aiplatform.core import storage
from aiplatform.retrieval.ann import HnswParams, VectorIndex

log = logging.getLogger(__name__)

ANN_DIR = "_ann"
POINTER = "current.json"


def graph_dir(vectors_dir: str, table_name: str) -> str:
    return storage.join(vectors_dir, ANN_DIR, table_name)


def save_graph(vectors_dir: str, table_name: str, index: VectorIndex, table_version: int,
               fingerprint: str = "") -> dict[str, Any]:
    """Save an hnsw ``index`` that reflects ``table_name`` at ``table_version`` (whose content
    ``fingerprint`` identifies); returns the pointer."""
    folder = graph_dir(vectors_dir, table_name)
    storage.make_dirs(folder)
    build = f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    data, node_ids = index.graph_bytes()
    ids = pa.table({"item_id": pa.array(node_ids, pa.string())})
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, ids.schema) as writer:
        writer.write_table(ids)
    storage.write_bytes(storage.join(folder, f"{build}.faiss"), data)
    storage.write_bytes(storage.join(folder, f"{build}.ids.arrow"), sink.getvalue().to_pybytes())
    previous = storage.read_json(storage.join(folder, POINTER), default=None)
    pointer = {"build": build, "table_version": int(table_version), "fingerprint": fingerprint, "saved_at": datetime.now(timezone.utc).isoformat(),
               **index.facts()}
    storage.write_json(storage.join(folder, POINTER), pointer)
    keep = {build, (previous or {}).get("build")}
    for path in storage.list_files(folder):
        name = path.rsplit("/", 1)[-1]
        if name != POINTER and name.split(".", 1)[0] not in keep:
            storage.delete_file(path)
    log.info("saved the hnsw graph of %s (%d rows, table version %d) as %s", table_name, len(index),
             table_version, build)
    return pointer


def load_pointer(vectors_dir: str, table_name: str) -> dict[str, Any] | None:
    """The current saved build's pointer (its facts), or None when no graph is saved."""
    return storage.read_json(storage.join(graph_dir(vectors_dir, table_name), POINTER), default=None) or None


def delete_graph(vectors_dir: str, table_name: str) -> None:
    """Remove whatever was saved for the table (a rebuild that is exact by size needs nothing)."""
    folder = graph_dir(vectors_dir, table_name)
    storage.delete_file(storage.join(folder, POINTER))  # first: readers stop using the files
    storage.delete_dir(folder)
    ann_dir = storage.join(vectors_dir, ANN_DIR)
    if not storage.is_uri(ann_dir) and storage.is_dir(ann_dir) and not storage.list_dirs(ann_dir):
        storage.delete_dir(ann_dir)  # an object store has no empty folders; a disk keeps them


def load_graph(vectors_dir: str, table_name: str) -> tuple[VectorIndex, dict[str, Any]] | None:
    """The saved graph of ``table_name`` and its pointer, or None when there is none (or it
    cannot be read: the caller then builds from the table, which is always correct)."""
    folder = graph_dir(vectors_dir, table_name)
    pointer = load_pointer(vectors_dir, table_name)
    if not pointer or pointer.get("kind") != "hnsw":
        return None
    build = pointer["build"]
    data = storage.read_bytes(storage.join(folder, f"{build}.faiss"))
    ids_raw = storage.read_bytes(storage.join(folder, f"{build}.ids.arrow"))
    if data is None or ids_raw is None:
        log.warning("saved graph %s of %s is incomplete; building from the table instead", build, table_name)
        return None
    node_ids = pa.ipc.open_stream(pa.py_buffer(ids_raw)).read_all().column("item_id").to_pylist()
    hnsw = HnswParams(m=int(pointer.get("m", HnswParams.m)),
                      ef_construction=int(pointer.get("ef_construction", HnswParams.ef_construction)))
    try:
        index = VectorIndex.from_graph(data, node_ids, hnsw, int(pointer["ef_search"]), pointer.get("recall_at_10"))
    except (ValueError, RuntimeError) as exc:  # a corrupt or mismatched file: rebuild, do not fail serving
        log.warning("saved graph %s of %s cannot be loaded (%s); building from the table", build, table_name, exc)
        return None
    index.recall_n = int(pointer.get("recall_queries") or 0)
    index.build_seconds = float(pointer.get("build_seconds") or 0.0)
    return index, pointer


def save_exact(vectors_dir: str, table_name: str, facts: dict[str, Any], table_version: int) -> dict[str, Any]:
    """Record that the table is served exactly although it is larger than the default exact
    threshold (its build was told so), so replicas do not build a graph of it."""
    folder = graph_dir(vectors_dir, table_name)
    storage.make_dirs(folder)
    pointer = {"build": None, "table_version": int(table_version), "saved_at": datetime.now(timezone.utc).isoformat(),
               **facts, "kind": "exact"}
    storage.write_json(storage.join(folder, POINTER), pointer)  # first: readers stop using graph files
    for path in storage.list_files(folder):
        if path.rsplit("/", 1)[-1] != POINTER:
            storage.delete_file(path)
    return pointer
