"""Reading the app's own Prometheus series straight from Ray's metrics endpoints.

Every node's metrics agent serves what the replicas on that node recorded (``ServingMetrics``)
at ``http://NODE:MetricsExportPort/metrics``, next to Ray's own series. The cost report and the
console's Serving tab read them here, without a Prometheus server: one GET per node, parsed
with prometheus_client's parser. Ray exports a replica's values every few seconds (its metrics
report interval), so a scrape lags the requests by that much.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

PREFIX = "aiplatform_"


@dataclass(frozen=True)
class Sample:
    """One series' value: the name without Ray's ``ray_`` prefix, and all its labels."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def label(self, key: str, default: str = "") -> str:
        return dict(self.labels).get(key, default)


@dataclass
class Scrape:
    """What every reachable node's endpoint held, and which endpoints did not answer."""

    samples: list[Sample] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    urls: list[str] = field(default_factory=list)


def ray_metrics_urls() -> list[str]:
    """Every alive node's metrics endpoint (the Ray this process is connected to)."""
    import ray

    return [f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
            for n in ray.nodes() if n.get("Alive") and n.get("MetricsExportPort")]


def parse_samples(text: str, prefix: str = PREFIX) -> list[Sample]:
    """The samples of ``prefix``'d series in one page (Prometheus text format). Ray prefixes
    application metrics with ``ray_``; both spellings are read the same. Lines of other series
    (most of a Ray page) are dropped before parsing."""
    kept = "\n".join(line for line in text.splitlines() if prefix in line)
    out = []
    for family in text_string_to_metric_families(kept + "\n" if kept else ""):
        for sample in family.samples:
            name = sample.name.removeprefix("ray_")
            if name.startswith(prefix):
                out.append(Sample(name, tuple(sorted(sample.labels.items())), float(sample.value)))
    return out


def fetch_page(url: str, timeout_s: float = 10.0) -> str:
    """One endpoint's page; ``httpx.HTTPError`` when it does not answer 200."""
    page = httpx.get(url, timeout=timeout_s)
    page.raise_for_status()
    return page.text


def scrape(urls: list[str], timeout_s: float = 5.0, prefix: str = PREFIX) -> Scrape:
    """Every endpoint at once (a thread each, at most 16): the samples of those that answered,
    and why the others did not."""
    result = Scrape(urls=list(urls))
    if not urls:
        return result

    def one(url: str) -> tuple[str, list[Sample] | str]:
        try:
            return url, parse_samples(fetch_page(url, timeout_s), prefix)
        except (httpx.HTTPError, ValueError) as exc:  # down, refused, or not a metrics page
            return url, f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
        for url, got in pool.map(one, urls):
            if isinstance(got, str):
                result.failed[url] = got
            else:
                result.samples.extend(got)
    return result


__all__ = ["Sample", "Scrape", "fetch_page", "parse_samples", "ray_metrics_urls", "scrape"]
