"""What serving calls: a service's online features for a batch of entities, on-demand included.

Why a thin layer over the store: on-demand features are computed at request time by the same
``fn`` the training frame ran (``pit.get_training_frame``), from the stored features of the same
row and the request's fields, so a model sees identical inputs offline and online.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aiplatform.core.errors import ConfigError, UserInputError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.features.definitions import FeatureService
from aiplatform.features.online import OnlineFeatures, OnlineStore, open_online_store


def online_store_uri(settings: Settings, layout: Layout) -> str:
    """``settings.online_store``: 'sqlite' means the file under a local storage root.

    SQLite needs a file on a local disk (locking, memory-mapped reads), so with an object-store
    root the online store must be named: Redis, or a SQLite file at a node-local path."""
    if settings.online_store != "sqlite":
        return settings.online_store
    if layout.is_remote:
        raise ConfigError(f"online store 'sqlite' keeps its file under the storage root, but the root "
                          f"{layout.root} is an object store, where SQLite cannot live: set "
                          "AIPLATFORM_ONLINE_STORE=redis://host:6379/0, or sqlite:////a/node-local/file.sqlite")
    return layout.online_sqlite


def open_store(settings: Settings, layout: Layout) -> OnlineStore:
    """The configured online store (features, watermarks and the popular-items list)."""
    return open_online_store(online_store_uri(settings, layout))


class FeatureServer:
    """``get(entity_ids, request)`` -> the service's stored and on-demand features, columnar."""

    def __init__(self, store: OnlineStore, service: FeatureService) -> None:
        self.store, self.service = store, service
        self._request_fields = service.request_fields

    def get(self, entity_ids: Sequence[str], request: Mapping[str, Any] | None = None) -> OnlineFeatures:
        features = self.store.get_online_features(self.service, list(entity_ids))
        if not self.service.on_demand:
            return features
        request = dict(request or {})
        missing = [f for f in self._request_fields if f not in request]
        if missing:
            raise UserInputError(f"request lacks field(s) {missing} needed by the on-demand features of "
                                 f"service {self.service.name!r}; send them with the request")
        n = len(features)
        valid = dict(features.valid)
        found = features.status == "ok"
        for odfv in self.service.on_demand:
            inputs: dict[str, Any] = {f: np.broadcast_to(np.asarray(request[f]), (n,)) for f in odfv.request_fields}
            for view in odfv.inputs:
                for name in view.features:
                    if name in features.columns:
                        inputs[name] = features.columns[name]
            result = odfv.fn(inputs)
            for name in odfv.outputs:
                features.columns[name] = np.asarray(result[name])
                features.dtypes[name] = odfv.outputs[name]
                valid[name] = found
        features.__dict__["_valid"] = valid
        return features
