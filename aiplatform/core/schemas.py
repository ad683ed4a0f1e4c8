"""Arrow schemas of the data contracts (docs/architecture.md, 'Data contracts').

These are the canonical in-lake types. Import accepts looser inputs (ISO strings or epoch
seconds for timestamps, ints for floats) and converts them to exactly these.
"""

import pyarrow as pa

EVENT_TYPES: tuple[str, ...] = ("view", "click", "add_to_cart", "purchase")
EVENT_WEIGHTS: dict[str, float] = {"view": 1.0, "click": 2.0, "add_to_cart": 4.0, "purchase": 8.0}
"""How much an event says about interest: the funnel weights of popularity and of the candidate sources."""
RELEVANT_EVENTS: tuple[str, ...] = ("click", "add_to_cart", "purchase")
"""What evaluation counts as a hit after the cutoff (a view is only an impression)."""
"""Known event types; any other value is kept and weighted as ``view``."""

EVENTS = pa.schema(
    [
        pa.field("user_id", pa.string(), nullable=False),
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("event_type", pa.string(), nullable=False),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("value", pa.float64()),
        pa.field("event_id", pa.string()),
    ]
)
EVENTS_REQUIRED = ("user_id", "item_id", "event_type", "timestamp")

ITEMS = pa.schema(
    [
        pa.field("item_id", pa.string(), nullable=False),
        pa.field("title", pa.string()),
        pa.field("category", pa.string()),
        pa.field("price", pa.float64()),
    ]
)
ITEMS_REQUIRED = ("item_id",)

USERS_REQUIRED = ("user_id",)
