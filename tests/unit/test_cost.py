"""The cost report's arithmetic: prices, the replicas' counters and the training runs."""

import time

import pytest
from typer.testing import CliRunner

from aiplatform.cli import app
from aiplatform.core.errors import ConfigError
from aiplatform.observability.cost import (
    Prices,
    ReplicaCpuClock,
    training_cost,
    training_resources,
    usage_from_metrics_text,
)

PAGE = """# HELP ray_aiplatform_requests_total HTTP requests answered
# TYPE ray_aiplatform_requests_total counter
ray_aiplatform_requests_total{application="aiplatform",route="/v1/recommendations",status="200"} 1500.0
ray_aiplatform_requests_total{application="aiplatform",route="/v1/events",status="202"} 500.0
ray_aiplatform_requests_total{application="other",route="/v1/recommendations",status="200"} 99.0
# TYPE ray_aiplatform_replica_cpu_seconds_total counter
ray_aiplatform_replica_cpu_seconds_total{application="aiplatform",kind="reserved"} 40.0
ray_aiplatform_replica_cpu_seconds_total{application="aiplatform",kind="used"} 12.5
ray_aiplatform_replica_cpu_seconds_total{application="other",kind="reserved"} 7.0
# TYPE ray_node_cpu_utilization gauge
ray_node_cpu_utilization{ip="127.0.0.1"} 30.0
"""


def test_a_metrics_page_sums_to_one_applications_usage():
    usage = usage_from_metrics_text(PAGE, "aiplatform")
    assert (usage.requests, usage.reserved_cpu_s, usage.used_cpu_s) == (2000.0, 40.0, 12.5)
    assert usage.per_1000(usage.reserved_cpu_s) == pytest.approx(20.0)
    everything = usage_from_metrics_text(PAGE)
    assert (everything.requests, everything.reserved_cpu_s) == (2099.0, 47.0)
    relabelled = usage_from_metrics_text(PAGE.replace("ray_aiplatform", "aiplatform"), "aiplatform")
    assert relabelled.requests == 2000.0
    assert usage_from_metrics_text("", "aiplatform").per_1000(1.0) is None


def test_prices_default_load_and_refuse_bad_tables(tmp_path):
    assert Prices().of(3600, 1800) == pytest.approx(0.05 + 1.25)
    good = tmp_path / "prices.yaml"
    good.write_text("cpu_hour: 0.1\ngpu_hour: 4\ncurrency: EUR\n")
    assert Prices.load(str(good)) == Prices(0.1, 4.0, "EUR")
    for text, words in (("cpu_hours: 1\n", "unknown keys ['cpu_hours']"), ("cpu_hour: cheap\n", "must be numbers"),
                        ("gpu_hour: -1\n", "must be >= 0"), ("- 1\n", "unknown keys")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
            Prices.load(str(bad))
    with pytest.raises(ConfigError, match="cannot read it"):
        Prices.load(str(tmp_path / "missing.yaml"))


def test_the_replica_clock_counts_reserved_wall_time_and_used_cpu():
    before = time.monotonic()
    clock = ReplicaCpuClock(cpus=2.0)
    after_start, cpu_start = time.monotonic(), time.process_time()
    while time.process_time() - cpu_start < 0.1:  # burn 0.1 s of CPU, however long that takes
        sum(range(1000))
    before_tick = time.monotonic()
    reserved, used = clock.tick()
    after_tick = time.monotonic()
    # bounds from the clock's own reading times, not a tolerance on the machine's speed
    assert 2.0 * (before_tick - after_start) <= reserved <= 2.0 * (after_tick - before)
    assert used >= 0.1
    assert clock.tick()[1] < used  # the next tick counts from this one


def test_a_training_run_is_priced_from_what_its_version_recorded():
    params = {"num_workers": 4, "cpus_per_worker": 2.0, "use_gpu": True, "run_name": "r1"}
    lineage = {"run": "r1", "training": training_resources(100.0, params)}
    run = training_cost("two_tower", 3, params, lineage)
    assert (run.cpu_s, run.gpu_s) == (800.0, 400.0)
    assert Prices().of(run.cpu_s, run.gpu_s) == pytest.approx(800 / 3600 * 0.05 + 400 / 3600 * 2.5)
    old = training_cost("two_tower", 1, {"num_workers": 2}, {})
    assert old.cpu_s is None and "before run times were recorded" in old.notes[0]


def test_report_cost_needs_a_cluster_for_serving_and_prices_training_without_one(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runner = CliRunner()
    result = runner.invoke(app, ["report", "cost", "--home", str(tmp_path / "root")])
    assert result.exit_code == 2 and "RAY_ADDRESS" in result.output, result.output
    result = runner.invoke(app, ["report", "cost", "--home", str(tmp_path / "root"), "--no-serving"])
    assert result.exit_code == 0, result.output
    assert "no registered versions of two_tower" in result.output
