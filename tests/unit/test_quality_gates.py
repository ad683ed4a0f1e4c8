"""Quality gates: the verdicts on evaluation metrics, the config that sets them, and the
aliases a new version earns (on a real LanceDB registry)."""

from dataclasses import asdict
from pathlib import Path

import pandas as pd
import pytest
import torch

from aiplatform.core.errors import ConfigError
from aiplatform.core.storage import Layout
from aiplatform.jobs.publish import apply_aliases
from aiplatform.jobs.train_report import baseline_sentence, format_metrics
from aiplatform.models.two_tower import ItemVocab, TwoTowerModel, save_artifact
from aiplatform.registry.registry import ModelRegistry
from aiplatform.training.config import QualityGates, TrainConfig
from aiplatform.training.evaluate import check_gates


def _metrics(model: float, pop: float, cooc: float | None = None, cov: float = 0.2) -> dict:
    def row(r: float, c: float) -> dict:
        return {"recall@10": r, "recall@50": min(1.0, 2 * r), "ndcg@10": r / 2, "coverage@10": c}

    out = {"model": row(model, cov), "popularity": row(pop, 0.01), "users": 10}
    if cooc is not None:
        out["cooccurrence"] = row(cooc, 0.1)
    return out


def test_gates_pass_and_fail_with_the_numbers():
    gates = QualityGates(min_recall_lift_over_popularity=3.0, min_recall_lift_over_cooccurrence=1.0,
                         min_coverage=0.1)
    passed = check_gates(_metrics(0.33, 0.1, 0.30, cov=0.25), gates)
    assert [g.gate for g in passed] == ["min_recall_lift_over_popularity",
                                       "min_recall_lift_over_cooccurrence", "min_coverage"]
    assert all(g.passed for g in passed)
    assert passed[0].value == pytest.approx(3.3) and passed[0].threshold == 3.0

    failed = {g.gate: g for g in check_gates(_metrics(0.25, 0.1, 0.30, cov=0.05), gates)}
    assert not failed["min_recall_lift_over_popularity"].passed  # 2.5x < 3x
    assert not failed["min_recall_lift_over_cooccurrence"].passed  # 0.83x < 1x
    assert not failed["min_coverage"].passed
    msg = failed["min_recall_lift_over_cooccurrence"].message
    assert "FAILED" in msg and "0.2500" in msg and "0.3000" in msg and "0.83x" in msg
    assert asdict(failed["min_coverage"])["value"] == pytest.approx(0.05)


def test_lift_exactly_at_threshold_passes_and_zero_turns_a_gate_off():
    gates = QualityGates(min_recall_lift_over_popularity=2.0, min_recall_lift_over_cooccurrence=0.0,
                         min_coverage=0.0)
    res = check_gates(_metrics(0.2, 0.1, 0.9), gates)
    assert [(g.gate, g.passed) for g in res] == [("min_recall_lift_over_popularity", True)]


def test_zero_baseline_recall_needs_a_positive_model_recall():
    gates = QualityGates(min_recall_lift_over_popularity=1.0, min_recall_lift_over_cooccurrence=0.0)
    assert check_gates(_metrics(0.1, 0.0), gates)[0].passed
    zero = check_gates(_metrics(0.0, 0.0), gates)[0]
    assert not zero.passed and zero.value is None


def test_missing_cooccurrence_baseline_fails_its_gate():
    res = check_gates(_metrics(0.5, 0.1), QualityGates(min_recall_lift_over_cooccurrence=1.0))
    cooc = [g for g in res if g.gate == "min_recall_lift_over_cooccurrence"][0]
    assert not cooc.passed and "not evaluated" in cooc.message


def test_gate_config_is_validated_and_named(tmp_path):
    cfg = TrainConfig(gates={"min_coverage": 0.2})
    assert cfg.gates.min_coverage == 0.2 and cfg.gates.min_recall_lift_over_popularity == 1.0
    with pytest.raises(ConfigError, match=r"gates\.min_recall_lift_over_popularity"):
        TrainConfig(gates={"min_recall_lift_over_popularity": -1})
    with pytest.raises(ConfigError, match=r"gates\.min_covrage.*min_coverage"):
        TrainConfig(gates={"min_covrage": 0.2})
    y = tmp_path / "t.yaml"
    y.write_text("train:\n  eval_k_large: 20\n  gates:\n    min_recall_lift_over_cooccurrence: 1.1\n")
    loaded = TrainConfig.from_yaml(y)
    assert loaded.eval_k_large == 20 and loaded.gates.min_recall_lift_over_cooccurrence == 1.1


def test_shipped_shop_config_loads():
    cfg = TrainConfig.from_yaml(Path(__file__).resolve().parents[2] / "apps" / "shop" / "train.yaml")
    assert cfg.gates.min_recall_lift_over_popularity >= 1.0


def _paired(m: dict, verdicts: dict[str, bool]) -> dict:
    m["paired"] = {b: {"recall@10": {"difference": 0.01 if ok else 0.001, "se": 0.002, "beats_by_2se": ok},
                       "ndcg@10": {"difference": 0.01 if ok else 0.001, "se": 0.002, "beats_by_2se": ok}}
                   for b, ok in verdicts.items()}
    m["beats_baselines"] = dict(verdicts)
    return m


def test_report_text_names_each_baseline():
    m = _paired(_metrics(0.3, 0.1, 0.31), {"popularity": True, "cooccurrence": False})
    m["split"] = {"name": "time: last 7 days"}
    sentence = baseline_sentence(m)
    assert "beats popularity" in sentence and "does NOT beat cooccurrence" in sentence
    assert "two standard errors" in sentence and "10 validation users" in sentence
    table = format_metrics(m).splitlines()
    assert table[0].split() == ["recall@10", "recall@50", "ndcg@10", "coverage@10"]
    assert [line.split()[0] for line in table[1:4]] == ["model", "popularity", "cooccurrence"]
    text = format_metrics(m)
    assert "beats popularity: recall@10 0.3000 vs 0.1000 (+0.0100 +/- 0.0020)" in text
    assert "does NOT beat cooccurrence" in text and "not ahead by two standard errors" in text
    assert "evaluation: time: last 7 days, 10 validation users" in text


def test_too_few_validation_users_fail_a_gate_that_names_the_numbers():
    from aiplatform.jobs.publish import enough_users_gate
    from aiplatform.training.split import adaptive_split

    t0 = pd.Timestamp("2026-01-01", tz="UTC")
    events = pd.DataFrame({"user_id": [f"u{i % 30}" for i in range(300)], "item_id": [f"i{i % 7}" for i in range(300)],
                           "event_type": "click", "timestamp": [t0 + pd.Timedelta(hours=i) for i in range(300)]})
    split = adaptive_split(events, holdout_days=1, min_users=500)
    gate = enough_users_gate(split, 500, events)
    assert gate.threshold == 30  # min(500, all 30 users)
    assert gate.passed == (split.n_users >= 30)
    few = enough_users_gate(split, 500, pd.concat([events, events.assign(user_id=events["user_id"] + "x")]))
    assert not few.passed and "not enough validation data" in few.message and "--promote" in few.message


@pytest.fixture()
def registry_with_versions(tmp_path):
    items = pd.DataFrame({"item_id": ["a", "b"], "category": ["x", "y"], "price": [1.0, 2.0]})
    vocab = ItemVocab.from_items(items)
    torch.manual_seed(0)
    save_artifact(TwoTowerModel(**vocab.model_kwargs(), dim=8), vocab, str(tmp_path / "art"))
    registry = ModelRegistry(Layout.at(str(tmp_path / "home")))

    def new_version() -> int:
        return registry.register("m", str(tmp_path / "art"), metrics={}, params={},
                                 checkpoint_uri=str(tmp_path / "art")).version

    return registry, new_version


def test_aliases_follow_the_gates(registry_with_versions):
    registry, new_version = registry_with_versions
    # a failing first model: registered, no alias at all
    v1 = new_version()
    assert apply_aliases(registry, "m", v1, gates_passed=False) == []
    assert registry.aliases("m") == {}
    # the first passing model becomes challenger and, as there is no champion, champion
    v2 = new_version()
    assert apply_aliases(registry, "m", v2, gates_passed=True) == ["challenger", "champion"]
    # a later passing model is only challenger; the champion stays
    v3 = new_version()
    assert apply_aliases(registry, "m", v3, gates_passed=True) == ["challenger"]
    assert registry.aliases("m") == {"challenger": v3, "champion": v2}
    # --promote takes a passing model to champion; it does not rescue a failing one
    v4 = new_version()
    assert apply_aliases(registry, "m", v4, gates_passed=False, promote=True) == []
    v5 = new_version()
    assert apply_aliases(registry, "m", v5, gates_passed=True, promote=True) == ["challenger", "champion"]
    # --always-promote forces champion even on a failed gate (challenger stays where it was)
    v6 = new_version()
    assert apply_aliases(registry, "m", v6, gates_passed=False, always_promote=True) == ["champion"]
    assert registry.aliases("m") == {"challenger": v5, "champion": v6}
    # too few validation users: the gates cannot decide, nothing moves, whatever they said ...
    v7 = new_version()
    assert apply_aliases(registry, "m", v7, gates_passed=True, enough_data=False) == []
    assert registry.aliases("m") == {"challenger": v5, "champion": v6}
    # ... unless --promote
    v8 = new_version()
    assert apply_aliases(registry, "m", v8, gates_passed=False, promote=True, enough_data=False) == ["champion"]
    assert registry.aliases("m") == {"challenger": v5, "champion": v8}


def test_a_pipeline_that_worsens_the_two_tower_order_is_not_served():
    from aiplatform.jobs.train import pipeline_verdict

    worse = {"two_tower": {"ndcg@10": 0.25}, "model": {"ndcg@10": 0.22}}
    ok, why = pipeline_verdict(worse, 10, 0.0)
    assert not ok and "NOT served" in why and "0.2500" in why and "0.2200" in why
    assert pipeline_verdict(worse, 10, -1.0)[0]  # -1: always serve it
    better = {"two_tower": {"ndcg@10": 0.20}, "model": {"ndcg@10": 0.21}}
    assert pipeline_verdict(better, 10, 0.0)[0]
    assert not pipeline_verdict(better, 10, 0.10)[0]  # +5% is not the +10% asked for
