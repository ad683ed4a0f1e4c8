"""The shadow variant's own deployment: mirrored requests are answered here, off the live replicas.

A shadow (``experiments.config.Shadow``) receives a copy of a share of the live traffic; its
answers are discarded, only their latency and overlap with the live answer are kept. Running it
inside the live replicas would make every live replica load a second model version and spend
its CPU on answers nobody reads. Here it is a deployment of its own that scales to zero: while
no experiment mirrors traffic it holds no replica (no memory, no CPU); the first mirrored
request starts one (a cold start of a few seconds, which no client waits for), and it goes back
to zero ``downscale_to_zero_delay_s`` after the mirroring stops.

The ingress sends ``score(version, user_id, k)`` through a ``DeploymentHandle`` after the live
answer went out, never awaiting it on the request's path, and drops mirrors beyond
``MAX_MIRRORS_IN_FLIGHT`` (counted) so that a cold or slow shadow cannot pile up work in the
live replicas. Concurrent mirrors are batched per version, like live requests.
"""

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from ray import serve

from aiplatform.serving.gc_tuning import tune_gc
from aiplatform.serving.pipeline import RecommendPipeline
from aiplatform.serving.resilience import ResilienceConfig
from aiplatform.serving.versions import ServedVersion

log = logging.getLogger(__name__)

MAX_MIRRORS_IN_FLIGHT = 64
"""Mirrored requests an ingress replica has sent and not yet heard back from; more are dropped."""
KEEP_VERSIONS = 2
"""Pipelines a shadow replica keeps loaded (an experiment's shadow, and the next one's)."""
SHADOW_AUTOSCALING = {
    "min_replicas": 0, "initial_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 16,
    "upscale_delay_s": 0, "downscale_delay_s": 60, "downscale_to_zero_delay_s": 300,
}
"""Zero replicas until a mirror arrives; back to zero five minutes after the last one."""


@serve.deployment(
    autoscaling_config=SHADOW_AUTOSCALING,
    max_ongoing_requests=64,
    max_queued_requests=2 * MAX_MIRRORS_IN_FLIGHT,
    ray_actor_options={"num_cpus": 0.25},
)
class ShadowScorer:
    """Answers mirrored requests with the shadow's version, loaded on first use (and kept for
    ``KEEP_VERSIONS`` versions), with the same stores and settings as the live replicas."""

    def __init__(self, home: str, online_store: str, features_module: str, service_name: str,
                 resilience: ResilienceConfig | None = None, service_version: str = "") -> None:
        self.home, self.online_store = home, online_store
        self.features_module, self.service_name = features_module, service_name
        self.resilience, self.service_version = resilience, service_version
        self._pipelines: OrderedDict[int, RecommendPipeline] = OrderedDict()
        self._lock = threading.Lock()
        tune_gc()  # like the live replicas: its latencies are compared with theirs

    def _pipeline(self, version: ServedVersion) -> RecommendPipeline:
        with self._lock:
            pipeline = self._pipelines.get(version.version)
            if pipeline is None:
                log.info("shadow: loading %s v%d", version.name, version.version)
                pipeline = RecommendPipeline(self.home, self.online_store, self.features_module, self.service_name,
                                             version.artifact_dir, version.vectors_dir, version.table,
                                             config=self.resilience, service_version=self.service_version or None)
                self._pipelines[version.version] = pipeline
                while len(self._pipelines) > KEEP_VERSIONS:
                    self._pipelines.popitem(last=False)[1].close()  # its change-feed thread
            self._pipelines.move_to_end(version.version)
            return pipeline

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.0)
    async def _score(self, batch: list[tuple[ServedVersion, str, int]]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{}] * len(batch)
        groups: dict[int, list[int]] = {}
        for i, (version, _, _) in enumerate(batch):
            groups.setdefault(version.version, []).append(i)
        for rows in groups.values():
            pipeline = await asyncio.to_thread(self._pipeline, batch[rows[0]][0])  # a first load is slow
            started = time.perf_counter()
            answers = pipeline.recommend([(batch[i][1], batch[i][2]) for i in rows])
            latency_ms = (time.perf_counter() - started) * 1000
            for i, answer in zip(rows, answers, strict=True):
                out[i] = {"items": [item for item, _ in answer["items"]], "fallback": answer["fallback"],
                          "latency_ms": latency_ms}
        return out

    async def score(self, version: ServedVersion, user_id: str, k: int) -> dict[str, Any]:
        """The shadow's answer for one mirrored request: its item ids, its fallback, and the
        time its pipeline took (the batch's, like a live request's latency)."""
        return await self._score((version, user_id, int(k)))

    def check_health(self) -> None:
        """Nothing to check before a mirror arrives: a version that cannot load fails its calls
        (logged by the ingress), which a restart would not fix."""


__all__ = ["KEEP_VERSIONS", "MAX_MIRRORS_IN_FLIGHT", "SHADOW_AUTOSCALING", "ShadowScorer"]
