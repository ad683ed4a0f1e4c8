"""What the storefront shows about items and whom it offers to shop as.

Items come from the lake's ``items`` table (title, category and price are optional in the
data contract: bring-your-own data may have ids only, and the page then shows the id). Read
once and kept for a minute per replica: the page must not scan Parquet on every view, and a
re-import shows up within the minute.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from aiplatform.core.storage import Layout

REFRESH_S = 60.0
SAMPLE_USERS = 8


@dataclass(frozen=True)
class Item:
    item_id: str
    title: str | None = None
    category: str | None = None
    price: float | None = None

    @property
    def name(self) -> str:
        return self.title or self.item_id


class Catalogue:
    """Item details and a few sample users of one storage root (cached, thread-safe)."""

    def __init__(self, layout: Layout, refresh_s: float = REFRESH_S) -> None:
        self.layout, self.refresh_s = layout, refresh_s
        self._items: dict[str, Item] = {}
        self._users: list[str] = []
        self._loaded_at = -1e18
        self._lock = threading.Lock()

    def _load(self) -> None:
        from aiplatform.data import lake

        items: dict[str, Item] = {}
        users: list[str] = []
        try:
            dataset = lake.table_dataset(self.layout, "items")
            if dataset is not None:
                names = set(dataset.schema.names)
                columns = [c for c in ("item_id", "title", "category", "price") if c in names]
                for row in dataset.to_table(columns=columns).to_pylist():
                    price = row.get("price")
                    items[str(row["item_id"])] = Item(str(row["item_id"]), row.get("title") or None,
                                                      row.get("category") or None,
                                                      float(price) if price is not None else None)
            for table in ("users", "events"):  # a few real users to pick from
                dataset = lake.table_dataset(self.layout, table)
                if dataset is not None and "user_id" in dataset.schema.names:
                    head = dataset.head(2000, columns=["user_id"]).column("user_id").to_pylist()
                    users = list(dict.fromkeys(str(u) for u in head))[:SAMPLE_USERS]
                    break
        except (OSError, ValueError) as exc:  # a lake being replaced: keep what we had
            if self._items:
                return
            raise exc
        self._items, self._users = items, users

    def refresh(self) -> None:
        """Re-read the lake when the copy is older than ``refresh_s`` (blocking: call it from a
        worker thread; lookups after it are in memory)."""
        with self._lock:
            if time.monotonic() - self._loaded_at > self.refresh_s:
                self._load()
                self._loaded_at = time.monotonic()

    def item(self, item_id: str) -> Item:
        """In memory only: the pages ``refresh()`` off the event loop first, so a lookup never
        reads the lake on it."""
        return self._items.get(item_id) or Item(item_id)

    def sample_users(self) -> list[str]:
        return list(self._users)
