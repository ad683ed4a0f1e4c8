"""The app's Prometheus metrics, scraped by a real Prometheus (Debian's package) from Ray's
metrics endpoint, as a cluster's Prometheus would: requests by route, status, variant and model
version, latency, fallbacks, cache lookups, circuit breakers, feature freshness, pushes."""

import re
import time
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from aiplatform.observability.metrics import EXPORTED_SERIES
from aiplatform.serving.app import build_app, start, stop
from tests.integration.test_rollout import _free_port, make_root
from tests.prometheus_server import prometheus_server, series

pytestmark = pytest.mark.integration

APP = "aiplatform-metrics"

# metric -> labels one of its series must carry (values checked where they are known)
EXPECTED = {
    "aiplatform_requests_total": {"route": "/v1/recommendations", "method": "POST", "status": "200",
                                  "variant": "champion", "model_version": "1", "application": APP},
    "aiplatform_request_latency_seconds_bucket": {"route": "/v1/items/{item_id}/similar", "variant": "champion",
                                                  "model_version": "1"},
    "aiplatform_fallbacks_total": {"kind": "popular", "variant": "champion", "model_version": "1"},
    "aiplatform_cache_lookups_total": {"cache": "features", "result": "miss"},
    "aiplatform_circuit_breaker_state": {"component": "online_store"},
    "aiplatform_feature_age_seconds_bucket": {"feature_service": "recommender_user"},
    "aiplatform_push_latency_seconds_bucket": {"outcome": "accepted"},
    "aiplatform_events_accepted_total": {},
    "aiplatform_replica_cpu_seconds_total": {"kind": "reserved", "application": APP},
}


@pytest.fixture(scope="module")
def base_url(ray_session, tmp_path_factory):
    home = make_root(tmp_path_factory.mktemp("metrics"))
    # two replicas: the console's Serving tab must count what both served (test below)
    url = start(build_app(home.root, experiments=False, auth="off",
                          options={"autoscaling_config": {"min_replicas": 2, "max_replicas": 2}}),
                host="127.0.0.1", port=_free_port(), name=APP, route_prefix="/metrics")
    yield url
    stop(APP)


def _console_total(client: httpx.Client) -> tuple[float, str]:
    """The Serving tab's total of /v1/recommendations since the replicas started, and the page."""
    page = client.get("/console/serving")
    assert page.status_code == 200, page.text[:2000]
    table = re.search(r'<table id="totals-routes">.*?</table>', page.text, re.S)
    row = table and re.search(r'data-route="/v1/recommendations">.*?<td class="num requests">([\d.]+)<', table.group(0))
    return (float(row.group(1)) if row else 0.0), page.text


# First in the module: the recommendations counted are this test's alone.
def test_the_console_serving_tab_sums_every_replica(base_url):
    """With two replicas behind the app, the tab's totals (read from Ray's metrics endpoints)
    count every request, whichever replica served it and whichever answers the page."""
    sent, fallbacks = 24, 0
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for i in range(sent):
            resp = client.post("/v1/recommendations", json={"user_id": "someone-new" if i % 6 == 0 else
                                                            f"u{i % 3 + 1}", "k": 3})
            assert resp.status_code == 200
            fallbacks += bool(resp.json()["fallback"])
        deadline = time.monotonic() + 90  # Ray exports a replica's counters every few seconds
        while True:
            total, html = _console_total(client)
            if total >= sent or time.monotonic() > deadline:
                break
            time.sleep(2)
    assert total == sent, html  # both replicas' requests, each counted once
    assert 'data-source="cluster"' in html and 'id="replicas-reporting">2<' in html, html
    arm = re.search(r'<table id="totals-variants">.*?data-variant="champion \(v1\)">(.*?)</tr>', html, re.S)
    assert arm, html
    cells = re.findall(r'<td class="num[^"]*">([^<]*)</td>', arm.group(1))
    assert cells[0] == str(sent) and cells[-1] == f"{100 * fallbacks / sent:.1f}%", cells
    assert cells[2].endswith(" ms") and cells[3].endswith(" ms")  # p50, p99 from the summed buckets


def _traffic(base_url: str) -> None:
    event = {"user_id": "u1", "item_id": "item_002", "event_type": "click",
             "timestamp": (datetime.now(timezone.utc) - timedelta(minutes=1)).isoformat()}
    with httpx.Client(base_url=base_url, timeout=30) as client:
        for user in ("u1", "u2", "u3", "someone-new"):
            assert client.post("/v1/recommendations", json={"user_id": user, "k": 3}).status_code == 200
        assert client.get("/v1/items/item_001/similar?k=3").status_code == 200
        assert client.post("/v1/events", json={"events": [event]}).status_code == 202
        assert client.post("/v1/recommendations", json={"user_id": "u1", "k": 0}).status_code == 422


def _matching(found: list[dict], labels: dict) -> bool:
    return any(all(s.get(k) == v for k, v in labels.items()) for s in found)


def test_prometheus_scrapes_every_series_with_its_labels(base_url, tmp_path, metrics_port):
    assert set(EXPECTED) == {n for n in EXPORTED_SERIES if not n.startswith("aiplatform_train_")}
    _traffic(base_url)
    with prometheus_server(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"]) as prom:
        deadline = time.monotonic() + 120  # Ray reports a worker's metrics every few seconds
        while True:
            found = {name: series(prom, name) for name in EXPECTED}
            missing = {n: labels for n, labels in EXPECTED.items() if not _matching(found[n], labels)}
            if not missing or time.monotonic() > deadline:
                break
            _traffic(base_url)
            time.sleep(2)
        assert not missing, {n: found[n][:3] for n in missing}
        invalid = series(prom, "aiplatform_requests_total")
        assert _matching(invalid, {"route": "/v1/recommendations", "status": "422"})
        every = httpx.get(f"{prom}/api/v1/label/__name__/values", timeout=10).json()["data"]
        print(sorted(n for n in every if n.startswith("aiplatform_")))


def test_a_training_run_exports_its_progress(ray_session, tmp_path, metrics_port):
    from aiplatform.training.config import TrainConfig
    from aiplatform.training.evaluate import split_by_time
    from aiplatform.training.train import train_two_tower
    from tests.integration.test_training import INPUTS, _examples, _shop

    items, events = _shop()
    _, train_events, _ = split_by_time(events, holdout_days=7)
    ds = ray_session.data.from_pandas(_examples(train_events))
    config = TrainConfig(num_workers=1, use_gpu=False, batch_size=256, epochs=2, dim=16, seed=0)
    with prometheus_server(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"]) as prom:
        train_two_tower(ds, items, config, str(tmp_path / "runs"), "metrics_run", inputs=INPUTS)
        deadline = time.monotonic() + 90
        expected = {"aiplatform_train_epoch": {"run": "metrics_run"},
                    "aiplatform_train_samples_per_second": {"run": "metrics_run"},
                    "aiplatform_train_validation": {"run": "metrics_run", "metric": "val_recall"}}
        assert set(expected) == {n for n in EXPORTED_SERIES if n.startswith("aiplatform_train_")}
        while True:
            found = {name: series(prom, name) for name in expected}
            missing = [n for n, labels in expected.items() if not _matching(found[n], labels)]
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert not missing, found
        epoch = httpx.get(f"{prom}/api/v1/query", params={"query": 'max(aiplatform_train_epoch{run="metrics_run"})'},
                          timeout=10).json()["data"]["result"]
        assert float(epoch[0]["value"][1]) == 2.0


def test_cost_report_reads_what_the_replicas_reserved_and_used(base_url, tmp_path, metrics_port):
    """`aiplatform report cost`'s serving numbers, from Ray's metrics endpoints (totals) and from
    a real Prometheus (a window): requests counted and the replicas' reserved and used CPU."""
    from aiplatform.observability.cost import ray_metrics_urls, serving_usage_from_prometheus, serving_usage_from_ray

    with httpx.Client(base_url=base_url, timeout=30) as client:
        for i in range(20):
            assert client.post("/v1/recommendations", json={"user_id": f"u{i % 3 + 1}", "k": 3}).status_code == 200
    deadline = time.monotonic() + 120  # Ray exports a replica's counters every few seconds
    while True:
        usage = serving_usage_from_ray(ray_metrics_urls(), APP)
        if (usage.requests >= 20 and usage.reserved_cpu_s > 0 and usage.used_cpu_s > 0) or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert usage.requests >= 20 and usage.reserved_cpu_s > 0 and usage.used_cpu_s > 0, usage
    assert serving_usage_from_ray(ray_metrics_urls(), "no-such-app").requests == 0
    with prometheus_server(tmp_path / "prometheus", [f"127.0.0.1:{metrics_port}"]) as prom:
        deadline = time.monotonic() + 120  # increase() needs two scrapes of a counter that moved between them
        while True:
            with httpx.Client(base_url=base_url, timeout=30) as client:
                client.post("/v1/recommendations", json={"user_id": "u1", "k": 3})
            windowed = serving_usage_from_prometheus(prom, "10m", APP)
            if (windowed.requests > 0 and windowed.reserved_cpu_s > 0) or time.monotonic() > deadline:
                break
            time.sleep(2)
        assert windowed.requests > 0 and windowed.reserved_cpu_s > 0, windowed
