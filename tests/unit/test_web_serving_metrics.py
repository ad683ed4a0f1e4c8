"""The Serving tab's cluster-wide numbers: counters and histogram buckets summed over every
replica of one application, quantiles from the summed buckets, and a rate from two scrapes."""

import math

import pytest

from aiplatform.observability.scrape import parse_samples
from aiplatform.web.serving_metrics import ScrapeHistory, cluster_traffic, increase, quantile, snapshot, summarize

BOUNDS = ("0.005", "0.01", "0.025", "0.05", "0.1", "+Inf")


def replica_page(replica: str, ok: int, failed: int, buckets: tuple[int, ...], fallbacks: int,
                 application: str = "shop", events: int = 0) -> str:
    """One replica's series as Ray's metrics endpoint prints them (``ray_`` prefix, Ray's tags)."""
    tags = f'application="{application}",deployment="RecommendationAPI",replica="{replica}"'
    arm = 'variant="champion",model_version="3"'
    lines = ["# HELP ray_aiplatform_requests_total HTTP requests answered",
             "# TYPE ray_aiplatform_requests_total counter",
             f'ray_aiplatform_requests_total{{{tags},route="/v1/recommendations",method="POST",status="200",{arm}}} {ok}',
             f'ray_aiplatform_requests_total{{{tags},route="/v1/recommendations",method="POST",status="503",{arm}}} {failed}']
    if events:
        lines.append(f'ray_aiplatform_requests_total{{{tags},route="/v1/events",method="POST",status="202",'
                     f'variant="",model_version=""}} {events}')
    lines += ["# TYPE ray_aiplatform_request_latency_seconds histogram"]
    lines += [f'ray_aiplatform_request_latency_seconds_bucket{{{tags},route="/v1/recommendations",{arm},le="{b}"}} {n}'
              for b, n in zip(BOUNDS, buckets)]
    lines += [f'ray_aiplatform_request_latency_seconds_count{{{tags},route="/v1/recommendations",{arm}}} {buckets[-1]}',
              "# TYPE ray_aiplatform_fallbacks_total counter",
              f'ray_aiplatform_fallbacks_total{{{tags},kind="popular",{arm}}} {fallbacks}',
              "# TYPE ray_aiplatform_replica_cpu_seconds_total counter",
              f'ray_aiplatform_replica_cpu_seconds_total{{{tags},kind="reserved"}} 12.0',
              "# TYPE ray_serve_num_http_requests_total counter",  # Ray's own series: not read
              f'ray_serve_num_http_requests_total{{{tags},route="/"}} 999']
    return "\n".join(lines) + "\n"


def samples(*pages: str):
    return [s for page in pages for s in parse_samples(page)]


def test_counters_and_buckets_are_summed_over_every_replica_of_the_application():
    one = replica_page("r1", ok=90, failed=10, buckets=(10, 40, 80, 95, 100, 100), fallbacks=20)
    two = replica_page("r2", ok=300, failed=0, buckets=(0, 0, 100, 250, 300, 300), fallbacks=30, events=7)
    other = replica_page("x1", ok=5000, failed=0, buckets=(5000,) * 6, fallbacks=0, application="other-app")
    snap = snapshot(samples(one, two, other), "shop")
    assert snap.replicas == 2  # other-app's replica is not counted
    rows = summarize(increase(snap, None))
    routes = {r.name: r for r in rows["routes"]}
    rec = routes["/v1/recommendations"]
    assert (rec.requests, rec.errors, rec.rate_per_s) == (400, 10, None)  # no rate from one scrape
    # summed buckets: 10, 40, 180, 345, 400 -> the median (rank 200) lies in (0.025, 0.05]
    assert rec.p50_ms == pytest.approx((0.025 + 0.025 * (200 - 180) / (345 - 180)) * 1000)
    assert rec.p99_ms == pytest.approx((0.05 + 0.05 * (396 - 345) / (400 - 345)) * 1000)
    assert routes["/v1/events"].requests == 7 and routes["all"].requests == 407
    [arm] = rows["variants"]  # the events route carries no variant
    assert arm.name == "champion (v3)" and arm.requests == 400
    assert arm.fallbacks == 50 and arm.fallback_rate == pytest.approx(50 / 400)


def test_quantiles_follow_prometheus_histogram_quantile():
    buckets = {0.1: 50.0, 0.2: 100.0, math.inf: 100.0}
    assert quantile(0.5, buckets) == pytest.approx(0.1)
    assert quantile(0.75, buckets) == pytest.approx(0.15)
    assert quantile(0.25, buckets) == pytest.approx(0.05)  # the lowest bucket starts at 0
    # a quantile in the +Inf bucket is the highest finite bound
    assert quantile(0.99, {0.1: 10.0, 0.5: 20.0, math.inf: 100.0}) == pytest.approx(0.5)
    assert quantile(0.5, {0.1: 0.0, math.inf: 0.0}) is None and quantile(0.5, {}) is None


def test_a_rate_needs_two_scrapes_and_counts_the_increase_between_them():
    history = ScrapeHistory(keep_s=300, min_span_s=5)
    first = samples(replica_page("r1", 100, 0, (0, 50, 100, 100, 100, 100), 10),
                    replica_page("r2", 100, 0, (0, 50, 100, 100, 100, 100), 10))
    shown = cluster_traffic("shop", first, nodes=1, failed={}, history=history, now=1000.0)
    assert shown["window"] is None and shown["totals"]["routes"][0].requests == 200
    # 20 s later: r1 served 40 more (all slow), r2 restarted and has served 10 since
    later = samples(replica_page("r1", 140, 0, (0, 50, 100, 100, 140, 140), 10),
                    replica_page("r2", 10, 0, (0, 10, 10, 10, 10, 10), 5))
    shown = cluster_traffic("shop", later, nodes=1, failed={}, history=history, now=1020.0)
    assert shown["window_s"] == pytest.approx(20.0)
    rec = shown["window"]["routes"][0]
    assert rec.requests == 50 and rec.rate_per_s == pytest.approx(2.5)
    assert rec.p99_ms == pytest.approx((0.05 + 0.05 * (49.5 - 10) / 40) * 1000)  # the window's, not all time
    assert shown["window"]["variants"][0].fallbacks == 5  # r2's 5 since its restart
    assert shown["totals"]["routes"][0].requests == 150  # what the counters hold now
    # a scrape right after another measures against the older one; past keep_s, none is kept
    assert history.add(snapshot(later, "shop", 1022.0)).taken == 1000.0
    assert history.add(snapshot(later, "shop", 2000.0)) is None
    for i in range(1000):  # a page reloaded in a loop: one scrape kept per 5 s, over 300 s
        history.add(snapshot(later, "shop", 3000.0 + i * 0.5))
    assert len(history._kept) <= 61


def test_an_application_with_no_series_yet_shows_no_rows():
    page = replica_page("r1", 10, 0, (10,) * 6, 0, application="other-app")
    shown = cluster_traffic("shop", samples(page), nodes=2, failed={"http://n2:8080/metrics": "ConnectError: refused"},
                            history=ScrapeHistory())
    assert shown["totals"] == {"routes": [], "variants": []} and shown["replicas_reporting"] == 0
    assert shown["failed"] and shown["nodes"] == 2


def _render(cluster, traffic=()) -> str:
    from aiplatform.web.base import templates

    data = {"apps": [], "error": "", "cluster": cluster, "traffic": list(traffic), "window_s": 300.0,
            "model": "two_tower v3", "variant": "champion", "following": "champion", "switch_error": None,
            "health": {"healthy": True, "breakers": {}}}
    return templates.env.get_template("serving.html").render(s=data, base="", tab="serving", tabs=("serving",),
                                                             who="admin", auth_off=False, csrf="0" * 64)


def test_the_page_names_its_source():
    history = ScrapeHistory(min_span_s=5)
    page = samples(replica_page("r1", 90, 10, (10, 40, 80, 95, 100, 100), 20),
                   replica_page("r2", 300, 0, (0, 0, 100, 250, 300, 300), 30))
    html = _render(cluster_traffic("shop", page, nodes=1, failed={}, history=history, now=10.0))
    assert 'data-source="cluster"' in html and 'id="replicas-reporting">2<' in html
    assert 'id="no-rate"' in html and 'id="window-routes"' not in html
    assert '<tr data-route="/v1/recommendations"><th scope="row"><code>/v1/recommendations</code></th>' \
           '<td class="num requests">400</td>' in html
    assert "12.5%" in html  # champion's fallback share, 50 of 400
    html = _render(cluster_traffic("shop", page, nodes=1, failed={}, history=history, now=40.0))
    assert 'id="window-routes"' in html and "Last 30 s" in html and "0.00/s" in html  # nothing new since
    from aiplatform.web.traffic import RequestWindow

    local = RequestWindow()
    local.observe("/v1/recommendations", 200, 0.01, {})
    html = _render(None, local.stats())
    assert 'data-source="replica"' in html and "This replica only" in html and 'data-route="/v1/recommendations"' in html


def test_with_no_metrics_endpoint_answering_the_tab_falls_back_to_this_replica(monkeypatch):
    import socket

    from aiplatform.observability import scrape
    from aiplatform.web import status

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/metrics"
    monkeypatch.setattr(scrape, "ray_metrics_urls", lambda: [closed])
    assert status.cluster_traffic("shop") is None
    assert status.cluster_traffic(None) is None  # not in a Serve replica: no application to sum
    monkeypatch.setattr(scrape, "ray_metrics_urls", lambda: [])
    assert status.cluster_traffic("shop") is None
