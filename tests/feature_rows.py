"""Write hand-made user feature rows into the online store the way serving reads them
(the recommender's feature service), for serving tests that need exact features."""

import pandas as pd
import pyarrow as pa

from apps.shop.features import recommender_user
from aiplatform.core.storage import Layout
from aiplatform.features.definitions import arrow_type
from aiplatform.features.online import open_online_store
from aiplatform.features.partition import TIMESTAMP_COLUMN


def write_user_rows(layout: Layout, frame: pd.DataFrame) -> int:
    """``frame``: user_id, any of the service's stored features (missing ones are 0 or empty), optional as_of."""
    ts = frame["as_of"] if "as_of" in frame else pd.Timestamp("2024-01-01", tz="UTC")
    columns = {"user_id": pa.array(frame["user_id"].astype(str), pa.string()),
               TIMESTAMP_COLUMN: pa.array(pd.to_datetime(pd.Series(ts, index=frame.index), utc=True),
                                          pa.timestamp("us", tz="UTC"))}
    for name, dtype in recommender_user.stored_dtypes.items():
        values = frame[name] if name in frame else [[] if dtype.startswith("list") else 0] * len(frame)
        if dtype == "int64":
            values = pd.Series(values).astype("int64")
        columns[name] = pa.array(list(values), arrow_type(dtype))
    store = open_online_store(layout.online_sqlite)
    return store.write_features(recommender_user, pa.table(columns))
