"""Where the Serve deployments' helpers were: the served pipeline now runs inside the ingress.

The application used to be five deployments (ingress, features, user tower, retriever, ranker:
four handle hops per request). On the 2-core machine each hop measured several milliseconds of
latency and most of the CPU (benchmarks/serving.py; README, 'The HTTP API'), so the whole path
now runs in one deployment, ``serving.app.RecommendationAPI``, over
``serving.pipeline.RecommendPipeline``. The plain functions callers import from here
(``rank_requests``, ``check_*``, ``served_service``) are re-exported from ``serving.pipeline``.
"""

from aiplatform.serving.pipeline import (
    POPULAR_FALLBACK,
    RecommendPipeline,
    check_events_features,
    check_served_inputs,
    rank_requests,
    served_service,
)

__all__ = ["POPULAR_FALLBACK", "RecommendPipeline", "check_events_features", "check_served_inputs",
           "rank_requests", "served_service"]
