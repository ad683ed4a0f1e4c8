"""The ingress replica's gauges, exported by a background thread: its CPU use, and the served
pipeline's caches, circuit breakers and feature ages (``ServingMetrics``).

Request metrics are recorded per request (``MetricsMiddleware``); these are states, not events,
so they are sampled every few seconds instead, off the request path. A thread rather than a
task on the replica's loop: the loop runs the CPU-bound pipeline, and a sample must not wait for
a batch to finish.
"""

import logging
import threading
from collections.abc import Callable

from aiplatform.observability.cost import ReplicaCpuClock, assigned_cpus
from aiplatform.observability.metrics import ServingMetrics
from aiplatform.serving.pipeline import RecommendPipeline

log = logging.getLogger(__name__)


def start_metrics_export(current_pipeline: Callable[[], RecommendPipeline], service_name: str,
                         every_s: float = 2.0) -> threading.Event:
    """Start exporting every ``every_s`` seconds what ``current_pipeline()`` (the served version's
    pipeline, as of each sample) reports; set the returned event to stop."""
    stopped = threading.Event()
    threading.Thread(target=_export, args=(current_pipeline, service_name, stopped, every_s), daemon=True,
                     name="aiplatform-metrics").start()
    return stopped


def _export(current_pipeline: Callable[[], RecommendPipeline], service_name: str, stopped: threading.Event,
            every_s: float) -> None:
    metrics, seen = ServingMetrics.get(), None
    cpu = ReplicaCpuClock(assigned_cpus())
    while True:
        try:
            metrics.record_replica_cpu(*cpu.tick())
            pipeline = current_pipeline()
            if pipeline is not seen:  # a new version: its caches count from zero
                metrics.forget_cache_counts()
                pipeline.on_feature_ages = lambda ages: metrics.record_feature_ages(service_name, ages)
                seen = pipeline
            metrics.record_serving_status(pipeline.serving_status())
        except Exception as exc:  # metrics never take a replica down
            log.debug("metrics export: %s", exc)
        if stopped.wait(every_s):
            return


__all__ = ["start_metrics_export"]
