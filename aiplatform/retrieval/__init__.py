"""Vector retrieval: item embeddings in LanceDB, one table per model version."""

from aiplatform.retrieval.index import ItemIndex, build_item_index, vector_table_name

__all__ = ["ItemIndex", "build_item_index", "vector_table_name"]
