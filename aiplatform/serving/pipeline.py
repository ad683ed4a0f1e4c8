"""One model version's whole recommendation path, as plain Python: online features -> user
tower -> item index -> candidate ranker, for a batch of users at once.

Why one object instead of one Serve deployment per step: on a small catalogue every step costs
microseconds to a few milliseconds, while each hop between Serve deployments costs several
milliseconds of serialisation, scheduling and an extra process competing for the same cores
(benchmarks/serving.py measured the four-hop pipeline at 16 req/s at one request in flight, a
sixth of one plain process). Held together, a batch of users costs one online-store read, one
tower forward pass, one index search per user (in memory) and one LightGBM prediction; and the
user tower, the index and the ranker of a version are always the same version's, never mixed.

The ingress deployment (``serving.app.RecommendationAPI``) holds this object and calls it with
``@serve.batch``; benchmarks/serving_plain.py runs the very same object inside one plain
uvicorn process, the peer the Serve app is measured against.

The checks below (``check_served_inputs``, ``check_events_features``) run where the application
is built and again when the object is made: a model served against another feature service
fails with a message naming both, instead of reading zeros.
"""

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from aiplatform.features.definitions import FeatureService
    from aiplatform.models.candidates import CandidateConfig, CandidateRanker
    from aiplatform.models.inputs import UserInputSpec

POPULAR_FALLBACK = "popular"
Scored = list[tuple[str, float]]


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


def rank_requests(ranker: "CandidateRanker", requests: list[dict[str, Any]], *,
                  catalogue: "pd.Index | None" = None, as_of: "pd.Timestamp | None" = None,
                  ) -> list[Scored]:
    """The candidate pipeline on a batch of requests ``{'user_id', 'events': the feature row's
    recent-event lists, 'exclude': item ids never to recommend, 'candidates': [(item_id,
    retrieval score)], 'k'}``: ``history_from_rows`` -> ``ranker.candidates`` with the
    two-tower's candidates as the external source and the request's exclusions -> top ``k`` per
    request, in ``CandidateRanker.recommend``'s order (score, then catalogue order)."""
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
    out: list[Scored] = [[] for _ in requests]
    for r, i, s in zip(row[keep], item[keep], score[keep], strict=True):
        out[r].append((str(ranker.tables.item_ids[i]), float(s)))
    return out


class RecommendPipeline:
    """Everything one served version needs to answer ``POST /v1/recommendations`` and its
    companions, loaded once: the online store (through the feature store's API), the user
    tower, the version's item index and, when the artifact carries ``candidates/``, the
    candidate ranker.

    ``recommend`` takes a batch of ``(user_id, k)`` and returns, per request, ``{'items':
    [(item_id, score)], 'fallback': None | 'popular', 'ranked': bool}``: a user with features
    gets the ranker's top ``k`` of the merged candidates (or, without a ranker, the index's
    nearest items in retrieval order); a user without features gets the popular items."""

    def __init__(self, home: str, online_store: str, features_module: str, service_name: str,
                 artifact_dir: str, vectors_dir: str, table_name: str) -> None:
        import torch

        from aiplatform.core.storage import Layout
        from aiplatform.features.online import open_online_store
        from aiplatform.features.server import FeatureServer
        from aiplatform.models.candidates import CandidateRanker, candidates_dir_of
        from aiplatform.models.two_tower import load_artifact
        from aiplatform.retrieval.index import ItemIndex

        self.layout = Layout.at(home)
        self.service = served_service(features_module, service_name)
        self.inputs = check_served_inputs(artifact_dir, features_module, service_name)
        directory = candidates_dir_of(artifact_dir)
        self.ranker = CandidateRanker.load(directory) if directory is not None else None
        if self.ranker is not None:  # what build_app checked: checked again where it is loaded
            check_events_features(self.ranker.config, self.service,
                                  where=f"serving {directory} with {features_module}")
            self.catalogue = pd.Index(self.ranker.tables.item_ids)
            self.n_candidates = int(self.ranker.config.per_source)
            names = self.ranker.config.events_features
            self.events_features = [n for n in names if n in self.service.stored_dtypes]
        else:
            self.catalogue, self.n_candidates, self.events_features = None, 0, []
        self.store = open_online_store(online_store)
        self.server = FeatureServer(self.store, self.service)
        torch.set_num_threads(1)  # request-sized batches: threads cost more than they give
        self._torch = torch
        self.model, self.vocab = load_artifact(artifact_dir)
        self.model.eval()
        self.index = ItemIndex(vectors_dir, table_name)

    @property
    def ranked(self) -> bool:
        """Whether answers come from the candidate ranker (else retrieval order)."""
        return self.ranker is not None

    def n_dense(self) -> int:
        """The width of the dense input the served tower reads (its input spec's)."""
        return int(self.model.config()["n_dense"])

    def features(self, user_ids: list[str]) -> list[dict[str, Any] | None]:
        """Per user, the model inputs ``{'history', 'exclude', 'dense'}`` (raw values in the
        spec's order) plus ``'events'`` (the ranker's recent-event lists) when served; None for a
        user without a feature row. One online-store read for the whole batch."""
        feats = self.server.get(list(user_ids))
        spec = self.inputs
        out: list[dict[str, Any] | None] = []
        for i in range(len(user_ids)):
            if feats.status[i] != "ok":
                out.append(None)
                continue
            row = feats.to_dict(i)
            user = {"history": [str(x) for x in row.get(spec.history) or []],
                    "exclude": [str(x) for x in row.get(spec.exclude) or []] if spec.exclude else [],
                    "dense": spec.dense_row(row)}
            if self.events_features:
                user["events"] = {n: [str(x) for x in row.get(n) or []] for n in self.events_features}
            out.append(user)
        return out

    def embed(self, users: list[dict[str, Any]]) -> np.ndarray:
        """The user tower on a batch of ``features`` rows: one [B, dim] forward pass."""
        histories = [list(u["history"]) for u in users]
        dense = np.stack([np.asarray(u["dense"], dtype=np.float32).reshape(-1) for u in users])
        hist, dense = self.vocab.encode_users(histories, dense, self.model.history_len)
        with self._torch.inference_mode():
            return self.model.user_embedding(hist, dense).cpu().numpy().astype(np.float32)

    def recommend(self, requests: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """The answers to a batch of ``(user_id, k)`` requests, in order (see the class)."""
        users = self.features([u for u, _ in requests])
        answers: list[dict[str, Any] | None] = [None] * len(requests)
        known = [i for i, f in enumerate(users) if f is not None]
        for i, f in enumerate(users):
            if f is None:
                answers[i] = {"items": self.popular(int(requests[i][1])), "fallback": POPULAR_FALLBACK,
                              "ranked": False}
        if known:
            vectors = self.embed([users[i] for i in known])
            if self.ranker is None:
                for i, vec in zip(known, vectors, strict=True):
                    items = self.index.search(vec, int(requests[i][1]), exclude=frozenset(users[i]["exclude"]))
                    answers[i] = {"items": items, "fallback": None, "ranked": False}
            else:
                # the two-tower source as the ranker was trained with it (training.recommender.
                # TwoTowerSource): the nearest items the user has not bought, their ranks features
                batch = []
                for i, vec in zip(known, vectors, strict=True):
                    k = int(requests[i][1])
                    feats = users[i]
                    candidates = self.index.search(vec, max(self.n_candidates, k), exclude=frozenset(feats["exclude"]))
                    batch.append({"user_id": requests[i][0], "events": feats.get("events") or {},
                                  "exclude": feats["exclude"], "candidates": candidates, "k": k})
                ranked = rank_requests(self.ranker, batch, catalogue=self.catalogue, as_of=self.ranker.as_of)
                for i, items in zip(known, ranked, strict=True):
                    answers[i] = {"items": items, "fallback": None, "ranked": True}
        return answers  # type: ignore[return-value]

    def popular(self, k: int, exclude: list[str] | None = None) -> Scored:
        """The ``k`` most popular items, leaving out ``exclude``."""
        skip = set(exclude or ())
        return [p for p in self.store.get_popular_items(k + len(skip)) if p[0] not in skip][:k]

    def similar(self, item_id: str, k: int) -> Scored | None:
        """Items nearest to ``item_id`` in the version's index; None if it is not indexed."""
        return self.index.similar(item_id, k)

    def count(self) -> int:
        """Items in the version's index."""
        return len(self.index)

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


__all__ = ["POPULAR_FALLBACK", "RecommendPipeline", "check_events_features", "check_served_inputs",
           "rank_requests", "served_service"]
