"""The one input contract (models/inputs.py): the model's user inputs derived from the declared
feature service, checked against the service a deployment reads. No Ray."""

import json
import subprocess
import sys
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from aiplatform.core.errors import ConfigError
from aiplatform.features.definitions import Aggregation, FeatureService, FeatureView, Field
from aiplatform.models.inputs import UserInputSpec, encode_dense
from apps.shop.features import purchase_share, recommender_user, user_activity

DAY = timedelta(days=1)
ROOT = Path(__file__).resolve().parents[2]


def _changed_activity(window_days: int = 14, extra: tuple = ()) -> FeatureView:
    """user_activity with its 7-day counts over ``window_days`` instead (same names) plus ``extra``."""
    aggs = tuple(replace(a, window=window_days * DAY) if a.name.endswith("_7d") else a
                 for a in user_activity.aggregations)
    return replace(user_activity, aggregations=aggs + tuple(extra))


def test_the_shop_service_gives_its_numeric_features_in_order_and_the_two_lists():
    spec = UserInputSpec.from_service(recommender_user)
    counts = [f"{t}_{w}d" for t in ("view", "click", "add_to_cart", "purchase") for w in (1, 7, 30)]
    assert spec.dense == (*counts, "purchase_share_7d")  # stored features in order, then on-demand
    assert spec.dense_dtypes == ("int64",) * 12 + ("float64",)
    assert (spec.history, spec.history_len, spec.exclude) == ("last_items", 20, "purchased_items")
    assert spec.service == "recommender_user" and spec.service_version == recommender_user.version
    # the recent-events lists are the candidate ranker's input, not the two-tower's
    assert spec.entity_key == "user_id" and spec.ignored == ("recent_items", "recent_types", "recent_times")
    assert spec.columns == [*spec.dense, "last_items", "purchased_items"]
    assert UserInputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_a_changed_window_and_a_new_feature_change_the_spec():
    spent = Aggregation("sum", 7 * DAY, column="value", where={"event_type": "purchase"}, name="spent_7d")
    view = _changed_activity(14, (spent,))
    service = FeatureService("recommender_user", (view, replace(purchase_share, inputs=(view,))))
    spec = UserInputSpec.from_service(service)
    assert spec.n_dense == 14 and spec.dense[-2:] == ("spent_7d", "purchase_share_7d")
    assert dict(zip(spec.dense, spec.dense_dtypes))["spent_7d"] == "float64"
    assert spec.service_version != recommender_user.version
    # the history length is the declared last_n's n
    longer = replace(view, aggregations=tuple(replace(a, n=35) if a.name == "last_items" else a
                                              for a in view.aggregations))
    assert UserInputSpec.from_service(FeatureService("s", (longer,))).history_len == 35


def test_serving_another_service_than_the_trained_one_is_a_clear_error():
    trained = UserInputSpec.from_service(recommender_user)
    trained.check_service(recommender_user)  # the same service: fine
    spent = Aggregation("sum", 7 * DAY, column="value", name="spent_7d")
    grown = FeatureService("recommender_user", (_changed_activity(7, (spent,)), purchase_share))
    with pytest.raises(ConfigError, match=r"trained on feature service 'recommender_user'.*\['spent_7d'\] are new"):
        trained.check_service(grown)
    # same names, another window: the version says the values mean something else
    rewindowed = FeatureService("recommender_user", (_changed_activity(14), purchase_share))
    with pytest.raises(ConfigError, match="changed definitions.*retrain"):
        trained.check_service(rewindowed)
    smaller = FeatureService("other", (user_activity[["view_7d", "last_items", "purchased_items"]],))
    with pytest.raises(ConfigError, match=r"no longer served"):
        trained.check_service(smaller)


def test_history_and_exclusion_features_are_validated_by_name():
    with pytest.raises(ConfigError, match=r"'recommender_user'.*'recent'.*not one of its features.*last_items"):
        UserInputSpec.from_service(recommender_user, history="recent")
    with pytest.raises(ConfigError, match=r"'view_7d' is a int64 feature.*last_n"):
        UserInputSpec.from_service(recommender_user, history="view_7d")
    with pytest.raises(ConfigError, match=r"exclusion feature 'view_7d' is not one of its list features"):
        UserInputSpec.from_service(recommender_user, exclude="view_7d")
    # a list that is a plain field (no n) cannot be the history; it can be the exclusion list
    profile = FeatureView("profile", user_activity.entity, user_activity.source,
                          aggregations=user_activity.aggregations, fields=(Field("blocked", "list<string>"),))
    service = FeatureService("with_blocked", (profile,))
    with pytest.raises(ConfigError, match="'blocked' is a list<string> feature"):
        UserInputSpec.from_service(service, history="blocked")
    spec = UserInputSpec.from_service(service, exclude="blocked")
    assert spec.exclude == "blocked" and spec.ignored == ("purchased_items",)
    assert UserInputSpec.from_service(recommender_user, exclude=None).exclude is None


def test_reading_a_batch_through_the_spec():
    spec = UserInputSpec.from_service(recommender_user)
    frame = pd.DataFrame({"last_items": [["a", "b"], None], "purchased_items": [np.array(["c"]), []],
                          **{c: [1, 2] for c in spec.dense}})
    frame["purchase_share_7d"] = pd.array([0.5, None], dtype="Float64")  # a nullable float: NA -> NaN
    assert spec.histories(frame) == [["a", "b"], []]
    assert spec.exclusions(frame) == [["c"], []]
    values = spec.dense_values(frame)
    assert values.shape == (2, spec.n_dense) and values.dtype == np.float32
    assert values[0, -1] == 0.5 and np.isnan(values[1, -1])
    assert spec.dense_row({**{c: 3 for c in spec.dense}, "purchase_share_7d": None})[-1] != 0.0  # NaN
    encoded = encode_dense(values)
    assert encoded[1, -1] == 0.0 and encoded[0, 0] == pytest.approx(np.log(2.0))
    assert encode_dense(np.array([[-3.0, np.inf]]))[0].tolist() == pytest.approx([-np.log(4.0), 0.0])
    with pytest.raises(ValueError, match="view_1d"):
        spec.dense_values(frame.drop(columns=["view_1d"]))
    with pytest.raises(ValueError, match=r"lacks the model input column\(s\) \['purchased_items'\]"):
        spec.check_columns([*spec.dense, "last_items"])
    assert UserInputSpec.from_service(recommender_user, exclude=None).exclusions(frame) == [[], []]


def test_serving_imports_no_training_module():
    """Serving runs the models layer (rerank included), never training code: importing the
    deployments and the app pulls in no module of aiplatform.training."""
    code = ("import sys; import aiplatform.serving.deployments, aiplatform.serving.app; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['aiplatform', 'training']))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
