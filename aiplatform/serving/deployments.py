"""The Serve deployments behind the HTTP API, one per resource they hold.

Splitting features, the user tower, the vector search and the ranker into separate deployments
lets each scale on its own load (the tower and the ranker batch requests; the retriever is I/O
on Lance files) and keeps the ingress free of heavy state. The app wires them with ``.bind()``
and calls them through DeploymentHandles.

Every path arrives as a constructor argument resolved by the driver: replicas never read
environment variables or the registry, so a replica always serves exactly the version the
driver resolved.

A served model version is the two-tower model, its vector index and, when its artifact carries
``candidates/`` (``models.candidates``), the candidate pipeline: the two-tower's retrieved
items are one source among co-occurrence, EASE, popularity, category x popularity and the
user's own items, and a LightGBM LambdaRank ranker orders their union (``Ranker``). The ranker
reads the user's recent events from the feature service's ``recent_*`` lists
(``CandidateConfig.events_features``), turned into the same ``History`` training built from
the event log (``history_from_rows``). A version without ``candidates/`` is served in
retrieval order.

What a user's feature row means to the two-tower model is the artifact's ``UserInputSpec``
(``models.inputs``): ``UserFeatureReader`` turns the row into ``{'history', 'exclude', 'dense'}``
with it (plus ``'events'`` for the ranker), and every replica that holds a model checks at
start that the artifact's spec is the served feature service's, and the ranker that the
service declares its events features: a model served against another service fails to start
with a message naming both, instead of reading zeros. Serving imports no training code.

Resources are small fractions of a CPU so that the whole app (five deployments, up to a few
replicas each) fits on a two-core laptop next to the Ray Data and Train workloads.
"""

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from ray import serve

from aiplatform.retrieval.index import ItemIndex

if TYPE_CHECKING:
    from aiplatform.features.definitions import FeatureService
    from aiplatform.models.candidates import CandidateConfig, CandidateRanker
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


def check_events_features(config: "CandidateConfig", service: "FeatureService", where: str = "serving") -> None:
    """Raise ``ConfigError`` unless ``service`` serves the recent-event lists the candidate
    ranker reads (``config.events_features``), each keeping at least the events it was trained on
    (``history_events`` within ``history_days``): fewer would feed the ranker thinner histories
    than it learnt from, without any error."""
    from aiplatform.core.errors import ConfigError

    names = list(config.events_features)
    aggs = {a.name: a for view in service.views for a in view.aggregations if a.name in service.selected(view)}
    fix = ("declare them in the service as last_n aggregations over the same events (item_id, event_type, "
           "timestamp), like user_recent_events in apps/shop/features.py, then run the feature job "
           "(python -m aiplatform.jobs.features); or serve a model version without candidates/")
    missing = [n for n in names if n not in aggs or aggs[n].function != "last_n"]
    if missing:
        raise ConfigError(f"{where}: the candidate ranker reads the user's recent events from the list "
                          f"features {names}, but feature service {service.name!r} does not serve "
                          f"{missing} as last_n lists: {fix}")
    shapes = {(aggs[n].n, aggs[n].window, aggs[n].where) for n in names}
    if len(shapes) != 1:
        raise ConfigError(f"{where}: features {names} of service {service.name!r} must be aligned lists (one n, "
                          f"one window, one filter), got {[(n, aggs[n].n, str(aggs[n].window)) for n in names]}: "
                          f"{fix}")
    n, window, _ = shapes.pop()
    days = window.total_seconds() / 86_400
    if n < config.history_events or (config.history_days is None or days < config.history_days):
        trained = f"{config.history_events} events" + (f" within {config.history_days:g} days"
                                                       if config.history_days is not None else " of any age")
        raise ConfigError(f"{where}: the candidate ranker was trained on a user's last {trained}, but service "
                          f"{service.name!r} keeps only {n} within {days:g} days in {names}: retrain it on this "
                          "service (the training job takes history_events/history_days from these features), "
                          "or serve the service it was trained on")


@serve.deployment(
    autoscaling_config=_autoscaling(max_replicas=2, target=16),
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.1},
)
class UserFeatureReader:
    """A user's online features through the feature store's API (``features.server``), read
    through the served model's input spec, the popular-items fallback, and real-time events
    (``push``), which rewrite the touched users' rows at once.

    ``events_features``: the recent-event lists the candidate ranker reads (its config's
    ``events_features``; None when the version has no ranker), returned as ``'events'``."""

    def __init__(self, home: str, online_store: str, features_module: str, service_name: str,
                 artifact_dir: str, events_features: list[str] | None = None) -> None:
        from aiplatform.core.storage import Layout
        from aiplatform.features.online import open_online_store
        from aiplatform.features.server import FeatureServer

        self.layout = Layout.at(home)
        self.service = served_service(features_module, service_name)
        self.inputs = check_served_inputs(artifact_dir, features_module, service_name)
        self.store = open_online_store(online_store)
        self.server = FeatureServer(self.store, self.service)
        self.events_features = [n for n in (events_features or ()) if n in self.service.stored_dtypes]

    def get(self, user_id: str) -> dict[str, Any] | None:
        """The model inputs of a user, ``{'history': [...], 'exclude': [...], 'dense': float32
        array}`` (raw values in the spec's order) and, when the ranker reads them, ``'events'``:
        ``{name: list}`` of its recent-event features (empty lists when the row has none); None
        if the user has no feature row."""
        feats = self.server.get([user_id])
        if feats.status[0] != "ok":
            return None
        row = feats.to_dict(0)
        spec = self.inputs
        out = {
            "history": [str(x) for x in row.get(spec.history) or []],
            "exclude": [str(x) for x in row.get(spec.exclude) or []] if spec.exclude else [],
            "dense": spec.dense_row(row),
        }
        if self.events_features:
            out["events"] = {n: [str(x) for x in row.get(n) or []] for n in self.events_features}
        return out

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
    """The served version's candidate pipeline (``models.candidates.CandidateRanker``): every
    source's candidates for a user (co-occurrence, EASE, popularity, category x popularity, the
    user's own items, and the two-tower's retrieved items), merged, scored by the LightGBM
    ranker, best first.

    Concurrent requests are batched (``@serve.batch``): one ``History`` and one LightGBM
    prediction per batch. The replica holds the artifact's ``candidates/`` folder (item arrays
    and the booster) and nothing else; the two-tower's candidates come with the request, as the
    retriever's answer for the user's vector.

    The application always has this deployment, so that a Serve config can name it (a config
    may not name a deployment the application lacks). When the version carries no
    ``candidates/`` the replica loads nothing and the ingress never calls it.
    """

    def __init__(self, artifact_dir: str, features_module: str | None = None,
                 service_name: str | None = None) -> None:
        from aiplatform.models.candidates import CandidateRanker, candidates_dir_of

        directory = candidates_dir_of(artifact_dir)
        self.ranker = CandidateRanker.load(directory) if directory is not None else None
        if self.ranker is None:
            return
        if features_module and service_name:  # what build_app checked: a replica checks it again
            check_events_features(self.ranker.config, served_service(features_module, service_name),
                                  where=f"serving {directory} with {features_module}")
        self.catalogue = pd.Index(self.ranker.tables.item_ids)
        self.as_of = self.ranker.as_of

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def rank(self, requests: list[dict[str, Any]]) -> list[list[tuple[str, float]]]:
        """Per request ``{'user_id', 'events': the feature row's recent-event lists, 'exclude':
        item ids never to recommend, 'candidates': [(item_id, retrieval score)], 'k'}``: the top
        ``k`` items of the merged candidates by ranker score, as (item_id, score), best first."""
        return rank_requests(self.ranker, requests, catalogue=self.catalogue, as_of=self.as_of)


def rank_requests(ranker: "CandidateRanker", requests: list[dict[str, Any]], *,
                  catalogue: "pd.Index | None" = None, as_of: "pd.Timestamp | None" = None,
                  ) -> list[list[tuple[str, float]]]:
    """What ``Ranker.rank`` runs on a batch (a plain function, so that it can be read and
    called without Serve): ``history_from_rows`` -> ``ranker.candidates`` with the two-tower's
    candidates as the external source and the request's exclusions -> top ``k`` per request, in
    ``CandidateRanker.recommend``'s order (score, then catalogue order)."""
    from aiplatform.models.candidates import history_from_rows

    catalogue = pd.Index(ranker.tables.item_ids) if catalogue is None else catalogue
    as_of = ranker.as_of if as_of is None else as_of
    history = history_from_rows([r["user_id"] for r in requests], [r.get("events") for r in requests],
                                ranker.config, catalogue, as_of)
    external = None
    if "two_tower" in ranker.external_sources:
        external = {"two_tower": ranker.external_candidates(
            [[str(c[0]) for c in r["candidates"]] for r in requests],
            [[float(c[1]) for c in r["candidates"]] for r in requests])}
    excluded = [list(r.get("exclude") or ()) for r in requests]
    ex_codes = catalogue.get_indexer([str(i) for x in excluded for i in x]) if any(excluded) \
        else np.zeros(0, np.int64)
    ex_rows = np.repeat(np.arange(len(requests)), [len(x) for x in excluded])
    known = ex_codes >= 0
    frame = ranker.candidates(history, external, (ex_rows[known], ex_codes[known].astype(np.int64)))
    row, item, score = frame["row"].to_numpy(), frame["item"].to_numpy(), frame["score"].to_numpy()
    order = np.lexsort((item, -score, row))  # recommend's order: score, then catalogue order
    row, item, score = row[order], item[order], score[order]
    ks = np.asarray([int(r["k"]) for r in requests], dtype=np.int64)
    keep = np.arange(len(row)) - np.searchsorted(row, row, side="left") < ks[row]
    out: list[list[tuple[str, float]]] = [[] for _ in requests]
    for r, i, s in zip(row[keep], item[keep], score[keep], strict=True):
        out[r].append((str(ranker.tables.item_ids[i]), float(s)))
    return out
