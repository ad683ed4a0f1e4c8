"""Stable entity buckets: the one partitioning that the offline store, the point-in-time join
and materialization agree on.

An entity's rows always land in the same bucket, on every node and in every run (pandas'
``hash_array`` uses a fixed SipHash key), so a join or a "latest row per entity" needs only the
rows of one bucket at a time: memory stays bounded as the data grows, and nothing is broadcast.
"""

import numpy as np
import pandas as pd
import pyarrow as pa

NUM_BUCKETS = 64
"""Buckets of the offline store. Fixed per table (it is part of the stored layout); 64 keeps a
bucket of a 10M-row table near 160k rows and still gives every core work on a big cluster."""

BUCKET_COLUMN = "_bucket"
TIMESTAMP_COLUMN = "event_timestamp"
"""Name of the event-time column of every offline feature table."""


def entity_bucket(keys, num_buckets: int = NUM_BUCKETS) -> np.ndarray:
    """Bucket (int32 in ``[0, num_buckets)``) of each entity key; keys are compared as strings."""
    if isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = keys.to_numpy(zero_copy_only=False)
    values = np.asarray(keys, dtype=object)
    if len(values) == 0:
        return np.zeros(0, np.int32)
    return (pd.util.hash_array(values.astype(str).astype(object)) % np.uint64(num_buckets)).astype(np.int32)
