"""FeatureServer: stored features plus on-demand ones computed by the same fn as training frames."""

import numpy as np
import pytest

from apps.shop.features import purchase_share, recommender_user, user_activity
from apps.shop.generate import ShopSize, generate
from aiplatform.core.errors import UserInputError
from aiplatform.features.definitions import FeatureService, OnDemandFeatureView
from aiplatform.features.engine import compute_view_rows
from aiplatform.features.materialize import latest_per_entity, latest_service_rows
from aiplatform.features.online import open_online_store
from aiplatform.features.server import FeatureServer


@pytest.fixture()
def store(tmp_path):
    frames = generate(ShopSize(users=40, items=30, days=10), seed=5)
    rows = latest_service_rows(recommender_user, frames["events"])
    st = open_online_store(str(tmp_path / "online.sqlite"))
    st.write_features(recommender_user, rows)
    return st, rows.to_pandas().set_index("user_id")


def test_on_demand_values_match_the_fn_over_stored_rows(store):
    st, rows = store
    users = list(rows.index[:7]) + ["nobody"]
    got = FeatureServer(st, recommender_user).get(users)
    want = purchase_share.fn({c: rows.loc[users[:7], c].to_numpy() for c in user_activity.features})
    np.testing.assert_allclose(got.columns["purchase_share_7d"][:7], want["purchase_share_7d"])
    assert got.status.tolist() == ["ok"] * 7 + ["missing"]
    assert got.to_dict(7)["purchase_share_7d"] is None
    assert got.to_arrow().column("purchase_share_7d").null_count == 1


def test_missing_request_field_names_it(store):
    st, rows = store
    boost = OnDemandFeatureView("boost", (user_activity,), {"device": "string"}, {"mobile_views": "float64"},
                                lambda x: {"mobile_views": np.where(x["device"] == "mobile", x["view_7d"], 0.0)})
    service = FeatureService("with_request", (user_activity, boost))
    st.write_features(service, latest_per_entity(
        compute_view_rows(user_activity, generate(ShopSize(users=40, items=30, days=10), seed=5)["events"]),
        "user_id"))
    server = FeatureServer(st, service)
    with pytest.raises(UserInputError, match="device"):
        server.get([rows.index[0]])
    got = server.get([rows.index[0]], {"device": "mobile"})
    assert got.columns["mobile_views"][0] == rows.loc[rows.index[0], "view_7d"]


def test_sqlite_online_store_under_an_object_store_root_is_refused_with_the_fix(tmp_path):
    from aiplatform.core.errors import ConfigError
    from aiplatform.core.settings import Settings
    from aiplatform.core.storage import Layout
    from aiplatform.features.server import online_store_uri

    remote = Layout.at("s3://shop-data/aiplatform")
    with pytest.raises(ConfigError) as info:
        online_store_uri(Settings(online_store="sqlite"), remote)
    message = str(info.value)
    assert "s3://shop-data/aiplatform" in message
    assert "AIPLATFORM_ONLINE_STORE=redis://host:6379/0" in message and "sqlite:////" in message
    # a named store is used as it is; a local root keeps its file under the root
    node_local = f"sqlite:///{tmp_path / 'online.sqlite'}"
    assert online_store_uri(Settings(online_store=node_local), remote) == node_local
    assert online_store_uri(Settings(online_store="redis://cache:6379/0"), remote) == "redis://cache:6379/0"
    local = Layout.at(str(tmp_path / "home"))
    assert online_store_uri(Settings(online_store="sqlite"), local) == local.online_sqlite
