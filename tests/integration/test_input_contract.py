"""One input contract, end to end: change the shop's feature definitions and the whole platform
follows, with no code change.

A copy of ``apps/shop/features.py`` is written as a new module (14-day counts instead of 7-day
ones, the on-demand purchase share over 14 days, and a new ``sum`` of the value of purchases),
made importable on every Ray worker and named by ``AIPLATFORM_FEATURES_MODULE``. Then the real
pipeline runs on tiny data: the feature job (``run_feature_pipeline``), the training job
(``run_training``, one epoch, the candidate ranker attached), the index job and serving
(``build_app`` + ``start``). The served model must read the new service (its dense width is
the new spec's) and give a known user model recommendations, not the popular fallback; the
same model served with the original definitions is refused at build time.
"""

import socket
from pathlib import Path

import httpx
import pytest
from ray import serve

from aiplatform.core.errors import ConfigError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.features.pipeline import run_feature_pipeline, served_service
from aiplatform.jobs.index import run_index
from aiplatform.jobs.train import run_training
from aiplatform.models.inputs import UserInputSpec
from aiplatform.models.candidates import CandidateRanker, candidates_dir_of
from aiplatform.models.two_tower import load_input_spec
from aiplatform.registry import ModelRegistry
from aiplatform.serving.app import build_app, start, stop
from aiplatform.training.config import QualityGates, TrainConfig
from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
MODULE = "shop_features_14d"
APP = "aiplatform-contract-test"


def _changed_definitions() -> str:
    """apps/shop/features.py with 14-day windows instead of 7-day ones and a new feature."""
    source = (ROOT / "apps" / "shop" / "features.py").read_text()
    edits = [
        ("for t in EVENT_TYPES for w in (1, 7, 30)]", "for t in EVENT_TYPES for w in (1, 14, 30)]"),
        ('inputs[f"{t}_7d"]', 'inputs[f"{t}_14d"]'),
        ('inputs["purchase_7d"]', 'inputs["purchase_14d"]'),
        ('name="purchased_items"),\n', 'name="purchased_items"),\n        Aggregation("sum", 7 * DAY, column="value", '
                                      'where={"event_type": "purchase"}, name="spent_7d"),\n'),
    ]
    for old, new in edits:
        assert source.count(old) == 1, f"the shop's definitions changed: update this test's edit of {old!r}"
        source = source.replace(old, new)
    return source


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture()
def changed_shop(ray_session, importable_dir, tmp_path, monkeypatch):
    (importable_dir / f"{MODULE}.py").write_text(_changed_definitions())
    monkeypatch.syspath_prepend(str(importable_dir))  # Ray's workers have it on their PYTHONPATH
    monkeypatch.setenv("AIPLATFORM_FEATURES_MODULE", MODULE)
    layout = Layout.at(str(tmp_path / "home"))
    paths = write(generate(ShopSize(users=120, items=60, days=30), seed=4), str(tmp_path / "data"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    return layout, Settings.load(home=layout.root)


def test_a_changed_window_and_a_new_feature_flow_from_features_to_serving(changed_shop):
    layout, settings = changed_shop
    assert settings.features_module == MODULE
    service = served_service(settings)
    spec = UserInputSpec.from_service(service)
    original = UserInputSpec.from_service(recommender_user)
    assert "view_14d" in spec.dense and "view_7d" not in spec.dense and "spent_7d" in spec.dense
    assert spec.n_dense == original.n_dense + 1 and spec.service_version != original.service_version

    summary = run_feature_pipeline(layout, settings=settings)
    assert summary.users > 100 and summary.items > 0
    config = TrainConfig(num_workers=1, epochs=1, batch_size=128, dim=16, ranker=True, ranker_min_ndcg_gain=-1.0,
                         gates=QualityGates(min_recall_lift_over_popularity=0, min_recall_lift_over_cooccurrence=0))
    report = run_training(layout, config, "two_tower", always_promote=True, settings=settings)
    assert report.promoted and report.metrics["ranker"]["attached"]
    mv = ModelRegistry(layout).get_by_alias("two_tower", "champion")
    assert load_input_spec(mv.artifact_uri) == spec  # the contract is in the artifact
    # the candidate ranker reads the declared recent-events lists, with their n and window
    ranker = CandidateRanker.load(candidates_dir_of(mv.artifact_uri))
    assert (ranker.config.history_events, ranker.config.history_days) == (100, 60.0)
    run_index(layout, "two_tower", "champion")

    # the original definitions cannot serve this model: refused at build time, naming the change
    with pytest.raises(ConfigError, match=r"trained on feature service 'recommender_user'.*spent_7d"):
        build_app(layout, settings=settings.model_copy(update={"features_module": "apps.shop.features"}), auth="off")

    url = start(build_app(layout, settings=settings, auth="off"), host="127.0.0.1", port=_free_port(), name=APP)
    try:
        recommender = serve.get_deployment_handle("RecommendationAPI", app_name=APP)
        assert recommender.n_dense.remote().result() == spec.n_dense
        events = lake.read_events(layout)
        user = str(events.loc[events["timestamp"].idxmax(), "user_id"])  # active at the end: has a row
        with httpx.Client(base_url=url, timeout=60) as client:
            resp = client.post("/v1/recommendations", json={"user_id": user, "k": 5})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["fallback"] is None and body["ranked"] is True
        assert len(body["items"]) == 5 and body["model"]["version"] == mv.version
    finally:
        stop(APP)
