"""Lineage recorded with a model version, and the model card that prints it (no Ray)."""

import json
import re

from typer.testing import CliRunner

from aiplatform.cli import app
from aiplatform.core.storage import Layout
from aiplatform.registry import ModelRegistry
from aiplatform.registry import lineage


def test_config_hash_is_stable_and_order_free():
    a = lineage.config_hash({"lr": 0.003, "epochs": 3, "gates": {"x": 1}})
    b = lineage.config_hash({"gates": {"x": 1}, "epochs": 3, "lr": 0.003})
    assert a == b and len(a) == 16
    assert lineage.config_hash({"lr": 0.003, "epochs": 4, "gates": {"x": 1}}) != a


def test_source_digest_follows_the_files(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    first = lineage.source_digest(tmp_path)
    assert lineage.source_digest(tmp_path) == first
    (tmp_path / "a.py").write_text("x = 2\n")
    assert lineage.source_digest(tmp_path) != first


def test_code_version_names_the_commit_in_a_checkout():
    code = lineage.code_version()
    assert code["package"] and len(code["source_digest"]) == 16
    # the tests run in a git checkout (CI clones the repository)
    assert code["git"] is None or re.fullmatch(r"[0-9a-f]{40}", code["git"]["sha"])


def test_git_commit_outside_a_checkout_is_none(tmp_path):
    assert lineage.git_commit(tmp_path) is None


def test_lineage_of_a_service_before_its_first_run(tmp_path):
    from apps.shop.features import SERVICES

    service = next(s for s in SERVICES if s.name == "recommender_user")
    out = lineage.collect(Layout.at(str(tmp_path)), service, {"epochs": 1},
                          evaluation={"split": "time: last 7 days", "users": 3}, run="r1")
    json.dumps(out)  # JSON-ready: the registry stores it as is
    assert out["feature_service"]["name"] == "recommender_user"
    assert out["feature_service"]["version"] == service.version
    assert {v["name"] for v in out["feature_service"]["views"]} == {v.name for v in service.views}
    assert all(v["lance_version"] is None for v in out["feature_service"]["views"])  # no table yet
    assert out["evaluation"]["users"] == 3 and out["run"] == "r1"


def test_models_show_prints_the_card(tmp_path):
    home = tmp_path / "home"
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.pt").write_bytes(b"w")
    registry = ModelRegistry(Layout.at(str(home)))
    metrics = {"model": {"recall@10": 0.31, "ndcg@10": 0.26}, "popularity": {"recall@10": 0.11, "ndcg@10": 0.07},
               "beats_baselines": {"popularity": True},
               "gates": [{"gate": "g", "passed": True, "message": "gate g passed: fine"}]}
    lin = {"code": {"package": "0.1.0", "source_digest": "abcd" * 4, "git": {"sha": "f" * 40, "dirty": False}},
           "config_hash": "1234567890abcdef",
           "feature_service": {"name": "recommender_user", "version": "v123",
                               "views": [{"name": "user_activity", "version": "u1", "table": "t.lance",
                                          "lance_version": 7}]},
           "data": {"lake_generation": "G1", "imported_at": "2026-11-30"},
           "evaluation": {"split": "time: last 7 days", "users": 1437, "cutoff": "2026-10-24"}}
    registry.register("two_tower", str(artifact), metrics, {}, "runs/r1", lineage=lin)
    registry.set_alias("two_tower", "champion", 1, reason="first model")
    result = CliRunner().invoke(app, ["models", "show", "two_tower", "1", "--home", str(home)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    text = result.output
    for phrase in ("two_tower v1", "champion", "first model", "0.3100", "beats popularity",
                   "time: last 7 days, 1437 validation users", "git ffffffffffff", "1234567890abcdef",
                   "recommender_user (version v123)", "Lance version 7", "lake generation G1", "runs/r1"):
        assert phrase in text, (phrase, text)
    missing = CliRunner().invoke(app, ["models", "show", "two_tower", "9", "--home", str(home)])
    assert missing.exit_code != 0 and "no version 9" in missing.output
