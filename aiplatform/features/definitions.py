"""Feature definitions as plain objects, separate from the engines that compute and serve them.

Kept deliberately small here (Entity, FeatureView, FeatureService); the feature-store issue
deepens them. The shop's views are declared in ``apps/shop/features.py``; the engines in
``features.pipeline`` and ``features.online`` only read these objects.
"""

from dataclasses import dataclass, field

from aiplatform.core.schemas import EVENT_TYPES

WINDOWS_DAYS: tuple[int, ...] = (1, 7, 30)
HISTORY_LEN = 20
"""How many recent items a user's context keeps (most recent first)."""
PURCHASED_LEN = 50
"""How many past purchases are kept to filter them out of recommendations."""


def count_columns(windows: tuple[int, ...] = WINDOWS_DAYS) -> list[str]:
    """Names of the windowed event counts, type-major: view_1d, view_7d, ..., purchase_30d."""
    return [f"{t}_{w}d" for t in EVENT_TYPES for w in windows]


COUNT_COLUMNS: list[str] = count_columns()


@dataclass(frozen=True)
class Entity:
    name: str
    join_key: str


@dataclass(frozen=True)
class FeatureView:
    """A set of features of one entity, computed from the event log over time windows."""

    name: str
    entity: Entity
    windows_days: tuple[int, ...] = WINDOWS_DAYS
    history_len: int = 0
    ttl_days: int = 90
    features: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.features:
            cols = count_columns(self.windows_days)
            if self.history_len:
                cols += ["last_items", "purchased_items"]
            object.__setattr__(self, "features", tuple(cols))


@dataclass(frozen=True)
class FeatureService:
    """The named set of views a model reads."""

    name: str
    views: tuple[FeatureView, ...]


user = Entity("user", "user_id")
item = Entity("item", "item_id")
user_activity = FeatureView("user_activity", user, history_len=HISTORY_LEN)
item_popularity = FeatureView("item_popularity", item)
recommender_v1 = FeatureService("recommender_v1", (user_activity, item_popularity))
