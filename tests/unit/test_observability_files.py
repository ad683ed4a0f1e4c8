"""The alert rules and the Grafana dashboard under cluster/observability: valid for promtool,
their rule unit tests pass, and every query names a series the app exports (or the KubeRay
operator's job status), so a renamed metric cannot leave a panel silently empty."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from aiplatform.observability.metrics import EXPORTED_SERIES

HERE = Path(__file__).resolve().parents[2] / "cluster" / "observability"
KUBERAY_SERIES = {"kuberay_job_deployment_status"}  # the KubeRay operator's (>= 1.4)
SERIES = re.compile(r"\b((?:aiplatform|kuberay)_[a-z0-9_]+)")


def _promtool() -> str:
    found = shutil.which("promtool") or "/usr/bin/promtool"
    if not Path(found).exists():
        pytest.fail("promtool is not installed: `sudo apt-get install -y prometheus` (make test installs it)")
    return found


def _dashboard_queries() -> list[str]:
    dash = json.loads((HERE / "grafana-aiplatform.json").read_text())
    return [t["expr"] for panel in dash["panels"] for t in panel["targets"]]


def _rule_queries() -> list[str]:
    rules = yaml.safe_load((HERE / "alerts.yml").read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


def test_promtool_checks_the_rules_and_runs_their_unit_tests():
    checked = subprocess.run([_promtool(), "check", "rules", "alerts.yml"], cwd=HERE, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([_promtool(), "test", "rules", "alerts_test.yml"], cwd=HERE, capture_output=True,
                            text=True, timeout=60)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


@pytest.mark.parametrize("source", ["dashboard", "alerts"])
def test_every_query_names_an_exported_series(source):
    queries = _dashboard_queries() if source == "dashboard" else _rule_queries()
    named = {m for q in queries for m in SERIES.findall(q)}
    assert named, source
    assert named <= EXPORTED_SERIES | KUBERAY_SERIES, named - EXPORTED_SERIES - KUBERAY_SERIES


def test_the_dashboard_covers_what_operators_watch():
    titles = " ".join(p["title"] for p in json.loads((HERE / "grafana-aiplatform.json").read_text())["panels"])
    for topic in ("variant", "latency", "Fallback", "freshness", "push", "Training"):
        assert topic in titles, topic
    queries = " ".join(_dashboard_queries())
    for quantile in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({quantile}" in queries
    assert {m for m in SERIES.findall(queries)} >= EXPORTED_SERIES  # every exported series is on a panel
