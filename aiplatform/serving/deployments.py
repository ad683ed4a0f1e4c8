"""The Serve deployments behind the HTTP API, one per resource they hold.

Splitting features, the user tower and the vector search into separate deployments lets each
scale on its own load (the tower batches requests; the retriever is I/O on Lance files) and
keeps the ingress free of heavy state. The app wires them with ``.bind()`` and calls them
through DeploymentHandles.

Every path arrives as a constructor argument resolved by the driver: replicas never read
environment variables or the registry, so a replica always serves exactly the version the
driver resolved.

When the served model version carries a ranker (``<artifact>/ranker/``), a ``Ranker``
deployment re-orders the retrieved candidates (retrieve-then-rank); without one, the retrieval
order is served as before.

What a user's feature row means to the model is the artifact's ``UserInputSpec``
(``models.inputs``): ``UserFeatureReader`` turns the row into ``{'history', 'exclude', 'dense'}``
with it, and every replica that holds a model checks at start that the artifact's spec is the
served feature service's: a model served against another service fails to start with a message
naming both, instead of reading zeros. Serving imports no training code.

Resources are small fractions of a CPU so that the whole app (four or five deployments, up to a
few replicas each) fits on a two-core laptop next to the Ray Data and Train workloads.
"""

from typing import TYPE_CHECKING, Any

import numpy as np
from ray import serve

from aiplatform.retrieval.index import ItemIndex

if TYPE_CHECKING:
    from aiplatform.features.definitions import FeatureService
    from aiplatform.models.inputs import UserInputSpec


def _autoscaling(max_replicas: int, target: float) -> dict[str, Any]:
    return {
        "min_replicas": 1,
        "max_replicas": max_replicas,
        "target_ongoing_requests": target,
    }


def served_service(features_module: str, service_name: str) -> "FeatureService":
    """The declared feature service ``service_name`` of ``features_module``."""
    from aiplatform.features.apply import load_definitions

    _, services, _ = load_definitions(features_module)
    matches = [s for s in services if s.name == service_name]
    if not matches:
        raise ValueError(f"feature service {service_name!r} is not declared in {features_module} "
                         f"(SERVICES: {[s.name for s in services]})")
    return matches[0]


def check_served_inputs(artifact_dir: str, features_module: str, service_name: str) -> "UserInputSpec":
    """The artifact's ``UserInputSpec``, after checking that it is the served service's
    (``ConfigError`` naming both otherwise): what ``build_app`` and every replica run first."""
    from aiplatform.models.two_tower import load_input_spec

    spec = load_input_spec(artifact_dir)
    spec.check_service(served_service(features_module, service_name),
                       where=f"serving {artifact_dir} with {features_module}")
    return spec


@serve.deployment(
    autoscaling_config=_autoscaling(max_replicas=2, target=16),
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.1},
)
class UserFeatureReader:
    """A user's online features through the feature store's API (``features.server``), read
    through the served model's input spec, the popular-items fallback, and real-time events
    (``push``), which rewrite the touched users' rows at once."""

    def __init__(self, home: str, online_store: str, features_module: str, service_name: str,
                 artifact_dir: str) -> None:
        from aiplatform.core.storage import Layout
        from aiplatform.features.online import open_online_store
        from aiplatform.features.server import FeatureServer

        self.layout = Layout.at(home)
        self.service = served_service(features_module, service_name)
        self.inputs = check_served_inputs(artifact_dir, features_module, service_name)
        self.store = open_online_store(online_store)
        self.server = FeatureServer(self.store, self.service)

    def get(self, user_id: str) -> dict[str, Any] | None:
        """The model inputs of a user, ``{'history': [...], 'exclude': [...], 'dense': float32
        array}`` (raw values in the spec's order), or None if the user has no feature row."""
        feats = self.server.get([user_id])
        if feats.status[0] != "ok":
            return None
        row = feats.to_dict(0)
        spec = self.inputs
        return {
            "history": [str(x) for x in row.get(spec.history) or []],
            "exclude": [str(x) for x in row.get(spec.exclude) or []] if spec.exclude else [],
            "dense": spec.dense_row(row),
        }

    def popular(self, k: int, exclude: list[str] | None = None) -> list[tuple[str, float]]:
        """The ``k`` most popular items, leaving out ``exclude``."""
        skip = set(exclude or ())
        return [p for p in self.store.get_popular_items(k + len(skip)) if p[0] not in skip][:k]

    def push(self, events: list[dict[str, Any]]) -> dict[str, Any]:
        """Append ``events`` to the event log and update the touched users' online rows.
        Returns {'accepted', 'entities_updated'} or {'error': message} for invalid events."""
        from aiplatform.core.errors import UserInputError
        from aiplatform.features.push import push

        try:
            result = push(self.layout, events, [self.service], self.store)
        except UserInputError as exc:
            return {"error": str(exc)}
        return {"accepted": result.events, "entities_updated": result.entities_updated}


@serve.deployment(
    autoscaling_config=_autoscaling(max_replicas=2, target=32),
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.25},
)
class UserTower:
    """Turns user features into a query vector; concurrent requests are batched so the
    tower runs once per batch instead of once per request."""

    def __init__(self, artifact_dir: str) -> None:
        import torch

        from aiplatform.models.two_tower import load_artifact

        torch.set_num_threads(1)
        self._torch = torch
        self.model, self.vocab = load_artifact(artifact_dir)
        self.model.eval()

    def n_dense(self) -> int:
        """The width of the dense input the served tower reads (its input spec's)."""
        return int(self.model.config()["n_dense"])

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def embed(self, users: list[dict[str, Any]]) -> list[np.ndarray]:
        """One vector per ``{'history': [...], 'dense': array}`` (``UserFeatureReader.get``);
        called one user at a time through the handle, run here as a batch."""
        histories = [list(u["history"]) for u in users]
        dense = np.stack([np.asarray(u["dense"], dtype=np.float32).reshape(-1) for u in users])
        hist, dense = self.vocab.encode_users(histories, dense, self.model.history_len)
        with self._torch.inference_mode():
            vectors = self.model.user_embedding(hist, dense).cpu().numpy().astype(np.float32)
        return list(vectors)


@serve.deployment(
    autoscaling_config=_autoscaling(max_replicas=4, target=16),
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.25},
)
class Retriever:
    """Nearest-item search in the model version's LanceDB table."""

    def __init__(self, vectors_dir: str, table_name: str) -> None:
        self.index = ItemIndex(vectors_dir, table_name)

    def search(self, vector: np.ndarray, k: int, exclude: list[str] | None = None) -> list[tuple[str, float]]:
        return self.index.search(vector, k, exclude=frozenset(exclude or ()))

    def similar(self, item_id: str, k: int) -> list[tuple[str, float]] | None:
        return self.index.similar(item_id, k)

    def count(self) -> int:
        return len(self.index)


@serve.deployment(
    autoscaling_config=_autoscaling(max_replicas=2, target=32),
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.25},
)
class Ranker:
    """Re-orders one user's retrieved candidates with the ranker of the served model version.

    Concurrent requests are batched (``@serve.batch``): their candidate lists are padded to one
    tensor and scored in a single forward pass.

    The application always has this deployment, so that a Serve config can name it (a config
    may not name a deployment the application lacks). When the version carries no ranker the
    replica loads nothing and the ingress never calls it.
    """

    def __init__(self, artifact_dir: str) -> None:
        import torch

        from aiplatform.core.errors import ConfigError
        from aiplatform.models.ranker import load_ranker, ranker_dir_of
        from aiplatform.models.two_tower import load_input_spec, load_vocab

        torch.set_num_threads(1)
        ranker_dir = ranker_dir_of(artifact_dir)
        self.model = load_ranker(ranker_dir) if ranker_dir is not None else None
        self.vocab = load_vocab(artifact_dir) if ranker_dir is not None else None
        if self.model is not None and self.model.inputs not in (None, load_input_spec(artifact_dir)):
            raise ConfigError(f"{ranker_dir}: the ranker reads {self.model.inputs.describe()}, but its model "
                              f"{load_input_spec(artifact_dir).describe()}: attach a ranker trained with this model")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def rank(self, requests: list[dict[str, Any]]) -> list[list[tuple[str, float]]]:
        """Per request ``{'history', 'dense', 'candidates': [(item_id, retrieval score)], 'k'}``:
        the top ``k`` candidates by ranker score, as (item_id, score), best first."""
        from aiplatform.models.ranker import rerank

        dense = np.stack([np.asarray(r["dense"], dtype=np.float32).reshape(-1) for r in requests])
        ids = [[c[0] for c in r["candidates"]] for r in requests]
        scores = rerank(self.model, self.vocab, [list(r["history"]) for r in requests], dense, ids,
                        [[float(c[1]) for c in r["candidates"]] for r in requests])
        out = []
        for r, cand, sc in zip(requests, ids, scores, strict=True):
            order = [j for j in np.argsort(-sc, kind="stable") if np.isfinite(sc[j])][: int(r["k"])]
            out.append([(cand[j], float(sc[j])) for j in order])
        return out
