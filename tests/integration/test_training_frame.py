"""Point-in-time joins and training frames on Ray Data against the in-memory core.

A Lance table in the offline layout, written in two appended versions (the second repeats some
(user, time) pairs with new values: those must win), is joined to labels through Ray Data; the
result must equal ``asof_join`` on the whole concatenated table, row for row.
"""

from datetime import timedelta

import lance
import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from aiplatform.core.errors import UserInputError
from aiplatform.core.storage import Layout
from aiplatform.features.definitions import FeatureService, OnDemandFeatureView, arrow_type
from aiplatform.features.partition import BUCKET_COLUMN, TIMESTAMP_COLUMN, entity_bucket
from aiplatform.features.pit import BUCKET_BATCH_ROWS, asof_join, get_training_frame, point_in_time_join
from apps.shop.features import recommender_user, user_activity, user_recent_events

pytestmark = pytest.mark.integration

T0 = pd.Timestamp("2025-01-01", tz="UTC")
N_USERS = 120
DAY_US = 86_400_000_000


def _feature_rows(rng: np.random.Generator, n: int, users: np.ndarray) -> pa.Table:
    """Rows shaped as the offline table of ``user_activity`` (key, time, bucket, features)."""
    keys = rng.choice(users, n)
    cols: dict[str, pa.Array] = {
        "user_id": pa.array(keys, pa.string()),
        TIMESTAMP_COLUMN: pa.array(T0.value // 1000 + rng.integers(0, 200 * DAY_US, n), pa.int64())
        .cast(pa.timestamp("us", tz="UTC")),
        BUCKET_COLUMN: pa.array(entity_bucket(keys), pa.int32()),
    }
    for name, dtype in user_activity.dtypes.items():
        if dtype == "int64":
            cols[name] = pa.array(rng.integers(0, 20, n), pa.int64())
        else:
            cols[name] = pa.array([[f"i{v}" for v in rng.integers(0, 50, rng.integers(0, 4))] for _ in range(n)],
                                  arrow_type(dtype))
    return pa.table(cols)


@pytest.fixture(scope="module")
def offline(tmp_path_factory, ray_session):
    rng = np.random.default_rng(5)
    layout = Layout.at(str(tmp_path_factory.mktemp("pit") / "home"))
    users = np.array([f"user_{i}" for i in range(N_USERS)])
    first = _feature_rows(rng, 3_000, users[: N_USERS - 20])  # the last 20 users have no history
    second = _feature_rows(rng, 1_000, users[: N_USERS - 20])
    # 200 rows of the second version repeat a (user, time) of the first with other values
    dup = first.slice(0, 200).select(["user_id", TIMESTAMP_COLUMN, BUCKET_COLUMN])
    second = pa.concat_tables([second.slice(200), pa.table({**{c: dup.column(c) for c in dup.column_names},
                                                             **{c: second.slice(0, 200).column(c)
                                                                for c in user_activity.features}})
                               .select(second.column_names)])
    path = layout.feature_table(user_activity.table_name)
    lance.write_dataset(first, path, mode="create")
    lance.write_dataset(second, path, mode="append")
    assert lance.dataset(path).version == 2
    n = 2_000
    labels = pd.DataFrame({
        "label_id": np.arange(n),
        "user_id": pd.Series(rng.choice(np.append(users, ["stranger"]), n), dtype=object),
        TIMESTAMP_COLUMN: pd.Series(pd.to_datetime(T0.value // 1000 + rng.integers(-5 * DAY_US, 260 * DAY_US, n),
                                                   unit="us", utc=True)),
        "clicked": rng.integers(0, 2, n),
    })
    # labels exactly on the ttl edge of a user's last row (ok), and one microsecond past it (expired)
    ttl_us = int(user_activity.ttl.total_seconds() * 1e6)
    last = (pa.concat_tables([first, second]).select(["user_id", TIMESTAMP_COLUMN]).to_pandas()
            .groupby("user_id")[TIMESTAMP_COLUMN].max().iloc[:20])
    for i, offset in ((0, 0), (20, 1)):
        labels.loc[i:i + 19, "user_id"] = last.index.to_numpy()
        labels.loc[i:i + 19, TIMESTAMP_COLUMN] = (last + pd.Timedelta(microseconds=ttl_us + offset)).to_numpy()
    return layout, pa.concat_tables([first, second]), labels


def _lists(column: pd.Series) -> list:
    return [None if x is None or x is pd.NA else list(x) for x in column]


def _sorted(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.sort_values("label_id", kind="stable").reset_index(drop=True)


# 37 rows a batch: every bucket (~60 rows over two Lance versions) is joined in several batches,
# so the best-so-far merge across batches (and across versions) is exercised on real Lance scans
@pytest.mark.parametrize("batch_rows", [BUCKET_BATCH_ROWS, 37])
def test_point_in_time_join_on_ray_equals_the_core(offline, ray_session, batch_rows):
    layout, table, labels = offline
    wanted = ["view_7d", "purchase_30d", "last_items"]
    ds = ray_session.data.from_pandas([labels.iloc[:1000], labels.iloc[1000:]])
    got = _sorted(point_in_time_join(ds, layout, user_activity, wanted, batch_rows=batch_rows).to_pandas())
    ttl_us = int(user_activity.ttl.total_seconds() * 1e6)
    ref = _sorted(asof_join(labels, table, key="user_id", label_ts=TIMESTAMP_COLUMN, ttl_us=ttl_us,
                            feature_columns=wanted, prefix_status="user_activity").to_pandas())

    assert list(got.columns) == [*labels.columns, *wanted, "user_activity__event_timestamp", "user_activity__status"]
    assert len(got) == len(labels)
    pd.testing.assert_frame_equal(got.drop(columns="last_items"), ref.drop(columns="last_items"), check_dtype=False)
    assert _lists(got["last_items"]) == _lists(ref["last_items"])
    status = got.set_index("label_id")["user_activity__status"]
    assert set(status) == {"ok", "missing", "expired"}
    assert (status.loc[0:19] == "ok").all() and (status.loc[20:39] == "expired").all()  # ttl edge
    assert (got.loc[got["user_id"] == "stranger", "user_activity__status"] == "missing").all()


@pytest.mark.parametrize("batch_rows", [BUCKET_BATCH_ROWS, 7])
def test_later_version_wins_on_duplicate_user_time(offline, ray_session, batch_rows):
    layout, table, _ = offline
    first = table.slice(0, 3_000).to_pandas()
    dup = first.iloc[:200]
    labels = pd.DataFrame({"label_id": np.arange(len(dup)), "user_id": dup["user_id"].to_numpy(),
                           TIMESTAMP_COLUMN: dup[TIMESTAMP_COLUMN].to_numpy()})
    got = _sorted(point_in_time_join(ray_session.data.from_pandas([labels]), layout, user_activity,
                                     ["view_7d"], batch_rows=batch_rows).to_pandas())
    second_values = table.slice(table.num_rows - 200).column("view_7d").to_numpy()
    assert (got["user_activity__status"] == "ok").all()
    assert (got["view_7d"].to_numpy() == second_values).all()


def test_training_frame_has_on_demand_features(offline, ray_session):
    layout, table, labels = offline
    # the shop's service without its recent-events view: the offline rows here are user_activity's
    service = FeatureService("activity", tuple(i for i in recommender_user.features if i is not user_recent_events))
    frame = _sorted(get_training_frame(labels, service, layout).to_pandas())
    assert len(frame) == len(labels)
    assert frame.columns[: len(labels.columns)].tolist() == labels.columns.tolist()
    for name in [*user_activity.features, "user_activity__status", "purchase_share_7d"]:
        assert name in frame.columns
    ok = frame["user_activity__status"] == "ok"
    counts = frame.loc[ok, [f"{t}_7d" for t in ("view", "click", "add_to_cart", "purchase")]].astype(float)
    expected = np.where(counts.sum(axis=1) > 0, counts["purchase_7d"] / counts.sum(axis=1).where(lambda s: s > 0, 1),
                        0.0)
    np.testing.assert_allclose(frame.loc[ok, "purchase_share_7d"].to_numpy(), expected)
    assert ok.sum() > 100 and frame["purchase_share_7d"].notna().all()


def test_service_selection_joins_only_selected_but_feeds_on_demand(offline, ray_session):
    layout, _, labels = offline
    service = FeatureService("small", (user_activity[["last_items"]], recommender_user.on_demand[0]))
    frame = get_training_frame(pa.Table.from_pandas(labels.iloc[:300], preserve_index=False), service, layout)
    cols = frame.schema().names
    assert "last_items" in cols and "purchase_share_7d" in cols
    assert "view_7d" not in cols and "purchase_7d" not in cols  # read for the on-demand fn only


def test_missing_columns_are_named(offline, ray_session):
    layout, _, labels = offline
    with pytest.raises(UserInputError, match="'user_id'.*join key"):
        get_training_frame(labels.drop(columns="user_id"), recommender_user, layout)
    with pytest.raises(UserInputError, match="'event_timestamp'.*label_ts="):
        get_training_frame(labels.rename(columns={TIMESTAMP_COLUMN: "ts"}), recommender_user, layout)
    needs_basket = OnDemandFeatureView(
        name="basket_ratio", inputs=(user_activity,), request_fields={"basket_value": "float64"},
        outputs={"basket_ratio": "float64"}, fn=lambda d: {"basket_ratio": np.asarray(d["basket_value"]) * 2})
    service = FeatureService("with_request", (user_activity, needs_basket))
    with pytest.raises(UserInputError, match="basket_value"):
        get_training_frame(labels, service, layout)
    frame = get_training_frame(labels.assign(basket_value=1.5), service, layout).to_pandas()
    assert (frame["basket_ratio"] == 3.0).all()
    with pytest.raises(UserInputError, match="batch_rows"):
        point_in_time_join(ray_session.data.from_pandas([labels]), layout, user_activity, batch_rows=0)
    with pytest.raises(UserInputError, match="no offline table"):
        point_in_time_join(ray_session.data.from_pandas([labels]), layout,
                           user_activity.__class__(**{**user_activity.__dict__, "ttl": timedelta(days=1)}))
