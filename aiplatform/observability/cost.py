"""What serving and training cost: CPU- and GPU-seconds from Ray's resource accounting, times
a price table you set (``aiplatform report cost``).

The unit is the *reserved* second: the logical CPUs and GPUs Ray assigned to a serving replica
or a training worker, times how long it held them. That is what a cluster pays for (a node is
paid for whether a reserved CPU is busy or not), and it is Ray's own number: a replica reads its
assignment from ``ray.get_runtime_context().get_assigned_resources()``; a training run's comes
from its ``ScalingConfig`` (workers x resources per worker) over the run's wall time. Serving
also reports the CPU time its processes *used* (``time.process_time``), so an over-sized
reservation shows.

Serving replicas count both into ``aiplatform_replica_cpu_seconds_total`` next to
``aiplatform_requests_total``; the report reads them from Ray's metrics endpoint on every node
(totals since the replicas started) or, given a Prometheus server, over a time window.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from aiplatform.core.errors import ConfigError
from aiplatform.observability.scrape import Sample, parse_samples, ray_metrics_urls, scrape

REQUESTS = "aiplatform_requests_total"
REPLICA_CPU = "aiplatform_replica_cpu_seconds_total"


@dataclass(frozen=True)
class Prices:
    """What one reserved hour costs. The defaults are round on-demand cloud figures (a vCPU of
    a general-purpose VM, one data-centre GPU); put your own in a YAML file."""

    cpu_hour: float = 0.05
    gpu_hour: float = 2.50
    currency: str = "USD"

    @classmethod
    def load(cls, path: str | None) -> "Prices":
        if not path:
            return cls()
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"price table {path}: cannot read it ({exc})") from exc
        unknown = set(raw) - {"cpu_hour", "gpu_hour", "currency"} if isinstance(raw, dict) else {"(not a mapping)"}
        if unknown:
            raise ConfigError(f"price table {path}: unknown keys {sorted(unknown)}; expected cpu_hour, gpu_hour, "
                              "currency (e.g. 'cpu_hour: 0.05')")
        try:
            prices = cls(cpu_hour=float(raw.get("cpu_hour", cls.cpu_hour)),
                         gpu_hour=float(raw.get("gpu_hour", cls.gpu_hour)), currency=str(raw.get("currency", "USD")))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"price table {path}: cpu_hour and gpu_hour must be numbers ({exc})") from exc
        if prices.cpu_hour < 0 or prices.gpu_hour < 0:
            raise ConfigError(f"price table {path}: prices must be >= 0")
        return prices

    def of(self, cpu_s: float, gpu_s: float = 0.0) -> float:
        return cpu_s / 3600 * self.cpu_hour + gpu_s / 3600 * self.gpu_hour


# ---- serving: counted by the replicas -------------------------------------------------------------
def assigned_cpus() -> float:
    """The logical CPUs Ray assigned to this process's actor (0 outside a Ray worker)."""
    try:
        import ray

        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # not in a Ray worker (a plain process, a unit test)
        return 0.0


class ReplicaCpuClock:
    """Reserved and used CPU-seconds since the last ``tick()``: the replica's metrics thread
    ticks every few seconds and adds both to its counter."""

    def __init__(self, cpus: float) -> None:
        self.cpus = cpus
        self._wall, self._cpu = time.monotonic(), time.process_time()

    def tick(self) -> tuple[float, float]:
        wall, cpu = time.monotonic(), time.process_time()
        reserved, used = self.cpus * (wall - self._wall), max(0.0, cpu - self._cpu)
        self._wall, self._cpu = wall, cpu
        return reserved, used


@dataclass
class ServingUsage:
    requests: float = 0.0
    reserved_cpu_s: float = 0.0
    used_cpu_s: float = 0.0
    source: str = ""

    def per_1000(self, seconds: float) -> float | None:
        return seconds / self.requests * 1000 if self.requests else None


def _application_matches(labels: dict[str, str], application: str | None) -> bool:
    return application is None or labels.get("application") == application


def usage_from_samples(samples: list[Sample], application: str | None = None) -> ServingUsage:
    """Sum the request and replica-CPU counters of scraped samples (``observability.scrape``)."""
    usage = ServingUsage()
    for sample in samples:
        if not _application_matches(dict(sample.labels), application):
            continue
        if sample.name == REQUESTS:
            usage.requests += sample.value
        elif sample.name == REPLICA_CPU and sample.label("kind") == "reserved":
            usage.reserved_cpu_s += sample.value
        elif sample.name == REPLICA_CPU and sample.label("kind") == "used":
            usage.used_cpu_s += sample.value
    return usage


def usage_from_metrics_text(text: str, application: str | None = None) -> ServingUsage:
    """The same sums over one metrics page (Prometheus text format; Ray's ``ray_`` prefix or not)."""
    return usage_from_samples(parse_samples(text), application)


def serving_usage_from_ray(urls: list[str], application: str | None = None,
                           timeout_s: float = 10.0) -> ServingUsage:
    """Totals since each replica started, read from every node's metrics endpoint."""
    scraped = scrape(urls, timeout_s)
    if scraped.failed:
        url, why = next(iter(scraped.failed.items()))
        raise ConfigError(f"cannot read Ray's metrics at {url}: {why}; is the node up, and its metrics "
                          "port reachable from here?")
    total = usage_from_samples(scraped.samples, application)
    total.source = f"Ray's metrics endpoints ({len(urls)} node(s)), since the replicas started"
    return total


def serving_usage_from_prometheus(url: str, window: str, application: str | None = None,
                                  timeout_s: float = 30.0) -> ServingUsage:
    """Increase over ``window`` (a PromQL duration such as ``1h``) of the same counters, from a
    Prometheus that scrapes them with cluster/observability/prometheus-scrape.yml."""
    selector = f'application="{application}"' if application else ""

    def query(expr: str) -> float:
        try:
            reply = httpx.get(f"{url.rstrip('/')}/api/v1/query", params={"query": expr}, timeout=timeout_s)
            reply.raise_for_status()
            body = reply.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise ConfigError(f"cannot query Prometheus at {url}: {exc}") from exc
        if body.get("status") != "success":
            raise ConfigError(f"Prometheus at {url} refused {expr!r}: {body.get('error')}")
        result = body["data"]["result"]
        return float(result[0]["value"][1]) if result else 0.0

    def increase(name: str, extra: str = "") -> float:
        labels = ",".join(x for x in (selector, extra) if x)
        return query(f"sum(increase({name}{{{labels}}}[{window}]))")

    return ServingUsage(requests=increase(REQUESTS), reserved_cpu_s=increase(REPLICA_CPU, 'kind="reserved"'),
                        used_cpu_s=increase(REPLICA_CPU, 'kind="used"'), source=f"Prometheus {url}, last {window}")


# ---- training: recorded with each registered version ----------------------------------------------
@dataclass
class TrainingCost:
    model: str
    version: int
    run: str
    seconds: float | None
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    notes: list[str] = field(default_factory=list)

    @property
    def cpu_s(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.workers * self.cpus_per_worker

    @property
    def gpu_s(self) -> float | None:
        return None if self.seconds is None else self.seconds * self.workers * self.gpus_per_worker


def training_resources(seconds: float, params: dict[str, Any]) -> dict[str, Any]:
    """What a run reserved, for its version's lineage: Ray Train's worker group (workers x
    resources per worker) for the wall time of ``fit()``."""
    return {"seconds": round(float(seconds), 3), "workers": int(params.get("num_workers") or 1),
            "cpus_per_worker": float(params.get("cpus_per_worker") or 1.0),
            "gpus_per_worker": 1.0 if params.get("use_gpu") else 0.0}


def training_cost(model: str, version: int, params: dict[str, Any], lineage: dict[str, Any]) -> TrainingCost:
    recorded = lineage.get("training") or {}
    cost = TrainingCost(
        model=model, version=version, run=str(lineage.get("run") or params.get("run_name") or ""),
        seconds=float(recorded["seconds"]) if "seconds" in recorded else None,
        workers=int(recorded.get("workers") or params.get("num_workers") or 1),
        cpus_per_worker=float(recorded.get("cpus_per_worker") or params.get("cpus_per_worker") or 1.0),
        gpus_per_worker=float(recorded.get("gpus_per_worker", 1.0 if params.get("use_gpu") else 0.0)))
    if cost.seconds is None:
        cost.notes.append("trained before run times were recorded")
    return cost


__all__ = ["Prices", "ReplicaCpuClock", "ServingUsage", "TrainingCost", "assigned_cpus", "ray_metrics_urls",
           "serving_usage_from_prometheus", "serving_usage_from_ray", "training_cost", "training_resources",
           "usage_from_metrics_text", "usage_from_samples"]
