"""Vector retrieval: item embeddings in LanceDB (one table per model version), served from an
in-memory exact or HNSW index (see ``index`` and ``ann``)."""

from aiplatform.retrieval.ann import HnswParams, LowRecallError
from aiplatform.retrieval.index import ItemIndex, build_item_index, vector_table_name, write_item_vectors

__all__ = ["HnswParams", "ItemIndex", "LowRecallError", "build_item_index", "vector_table_name",
           "write_item_vectors"]
