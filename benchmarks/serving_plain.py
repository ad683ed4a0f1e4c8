"""The peer benchmarks/serving.py measures the Serve app against: the same recommendation path
in one plain FastAPI process, no Ray.

``POST /v1/recommendations`` runs the project's own ``serving.pipeline.RecommendPipeline``
(its online-feature reading over the same online store, the same user tower, the same
in-memory item index and the same candidate ranker) in-process, one request at a time, and
answers with the API's own response schema. What is served is resolved as ``build_app``
resolves it: the version ``AIPLATFORM_ALIAS`` (default champion) points at, from the storage
root and settings in the environment (``AIPLATFORM_HOME``, ``AIPLATFORM_ONLINE_STORE``, …).

Run: ``AIPLATFORM_HOME=… uvicorn benchmarks.serving_plain:app --port 8001 [--workers 2]``
(from the repository root; uvicorn imports the module in each worker).
"""

import os
import uuid

from fastapi import FastAPI

from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.features.server import online_store_uri
from aiplatform.registry import ModelRegistry
from aiplatform.retrieval.index import vector_table_name
from aiplatform.serving.pipeline import RecommendPipeline
from aiplatform.serving.resilience import ResilienceConfig
from aiplatform.serving.schemas import (
    ModelRef,
    RecommendationRequest,
    RecommendationResponse,
    ScoredItem,
)


def load_pipeline(settings: Settings | None = None, alias: str = "champion") -> tuple[RecommendPipeline, ModelRef]:
    """The served version's pipeline, resolved through the registry as ``build_app`` does."""
    settings = settings or Settings.load()
    layout = Layout.open(settings.home)
    mv = ModelRegistry(layout).get_by_alias(settings.model_name, alias)
    pipeline = RecommendPipeline(layout.root, online_store_uri(settings, layout), settings.features_module,
                                 settings.feature_service, mv.artifact_uri, layout.vectors,
                                 vector_table_name(mv.name, mv.version), config=ResilienceConfig.from_env())
    return pipeline, ModelRef(name=mv.name, version=mv.version)


ALIAS = os.environ.get("AIPLATFORM_ALIAS", "champion")
PIPELINE, MODEL = load_pipeline(alias=ALIAS)
app = FastAPI(title="plain peer of the recommendation API")


@app.post("/v1/recommendations", response_model=RecommendationResponse)
async def recommend(body: RecommendationRequest) -> RecommendationResponse:
    """Same answer as the Serve app's: the pipeline on a batch of one, run on the event loop
    (CPU-bound: a thread pool would only add hand-offs)."""
    answer = PIPELINE.recommend([(body.user_id, body.k)])[0]
    return RecommendationResponse(
        user_id=body.user_id,
        items=[ScoredItem(item_id=i, score=s) for i, s in answer["items"]],
        model=MODEL, variant=ALIAS, request_id=uuid.uuid4().hex,
        fallback=answer["fallback"], ranked=answer["ranked"],
    )


@app.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok", "model": MODEL.model_dump(), "items": PIPELINE.count()}
