"""The shop's features, declared once; `aiplatform features apply` validates and versions them.

- ``user_activity``: per user, event counts by type over 1, 7 and 30 days, the last 20 distinct
  items seen (within 30 days) and the last 50 distinct purchases (within 90 days);
- ``user_recent_events``: per user, the last 100 events within 60 days as three aligned lists
  (items, event types, times): what the candidate sources and their ranker read;
- ``item_popularity``: per item, counts by type over 1 and 7 days and the mean price paid;
- ``item_attributes``: static catalogue columns;
- ``recommender_user``: what the recommender reads for a user at request time, plus an
  on-demand feature (share of the user's 7-day activity that was purchases).
"""

from datetime import timedelta

import numpy as np

from aiplatform.core.schemas import EVENT_TYPES
from aiplatform.features.definitions import (
    Aggregation,
    BatchSource,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    OnDemandFeatureView,
)

user = Entity("user", "user_id", description="A shopper")
item = Entity("item", "item_id", description="A catalogue item")

events = BatchSource("events", timestamp_field="timestamp")
items = BatchSource("items", timestamp_field=None)

DAY = timedelta(days=1)

user_activity = FeatureView(
    name="user_activity",
    entity=user,
    source=events,
    aggregations=(
        *[Aggregation("count", w * DAY, where={"event_type": t}, name=f"{t}_{w}d")
          for t in EVENT_TYPES for w in (1, 7, 30)],
        Aggregation("last_n", 30 * DAY, column="item_id", n=20, distinct=True, name="last_items"),
        Aggregation("last_n", 90 * DAY, column="item_id", n=50, distinct=True,
                    where={"event_type": "purchase"}, name="purchased_items"),
    ),
    ttl=timedelta(days=90),
    description="What a user did recently: the user tower's input",
)

# What the candidate sources and their ranker read: the user's recent events themselves, as three
# aligned lists (same rows, same order: most recent first). Kept out of the two-tower's training
# frame (the job joins only what the model reads), so its size costs nothing there.
user_recent_events = FeatureView(
    name="user_recent_events",
    entity=user,
    source=events,
    aggregations=tuple(Aggregation("last_n", 60 * DAY, column=c, n=100, name=f"recent_{n}")
                       for c, n in (("item_id", "items"), ("event_type", "types"), ("timestamp", "times"))),
    ttl=timedelta(days=90),
    description="A user's last 100 events within 60 days (item, type, time): the candidate ranker's input",
)

item_popularity = FeatureView(
    name="item_popularity",
    entity=item,
    source=events,
    aggregations=(
        *[Aggregation("count", w * DAY, where={"event_type": t}, name=f"{t}_{w}d")
          for t in EVENT_TYPES for w in (1, 7)],
        Aggregation("mean", 30 * DAY, column="value", where={"event_type": "purchase"}, name="mean_price_paid_30d"),
    ),
    ttl=timedelta(days=30),
    description="How popular an item is right now",
)

item_attributes = FeatureView(
    name="item_attributes",
    entity=item,
    source=items,
    fields=(Field("category", "string"), Field("price", "float64")),
    ttl=timedelta(days=3650),
    description="Static catalogue attributes",
)


def _purchase_share(inputs: dict) -> dict:
    total = sum(np.asarray(inputs[f"{t}_7d"], dtype=np.float64) for t in EVENT_TYPES)
    buys = np.asarray(inputs["purchase_7d"], dtype=np.float64)
    return {"purchase_share_7d": np.divide(buys, total, out=np.zeros_like(buys), where=total > 0)}


purchase_share = OnDemandFeatureView(
    name="purchase_share",
    inputs=(user_activity,),
    request_fields={},
    outputs={"purchase_share_7d": "float64"},
    fn=_purchase_share,
    description="Share of the last 7 days' events that were purchases",
)

recommender_user = FeatureService(
    name="recommender_user",
    features=(user_activity, purchase_share, user_recent_events),
    description="User features of the recommender: the two-tower's inputs and the candidate ranker's recent events",
)

VIEWS = (user_activity, user_recent_events, item_popularity, item_attributes)
SERVICES = (recommender_user,)
ON_DEMAND = (purchase_share,)
