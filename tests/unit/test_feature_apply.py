"""`features apply`: every kind of bad definition is refused with a message naming it, and versions are recorded."""

import json
from datetime import timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aiplatform.core.errors import ConfigError, UserInputError
from aiplatform.core.storage import Layout
from aiplatform.features.apply import apply, load_definitions, read_registry, registry_path, validate
from aiplatform.features.definitions import (
    Aggregation,
    BatchSource,
    Entity,
    FeatureService,
    FeatureView,
    Field,
    OnDemandFeatureView,
)

DAY = timedelta(days=1)
USER, ITEM = Entity("user", "user_id"), Entity("item", "item_id")
EVENTS, ITEMS = BatchSource("events", "timestamp"), BatchSource("items", None)


@pytest.fixture
def layout(tmp_path) -> Layout:
    layout = Layout.at(str(tmp_path / "home"))
    ts = pd.date_range("2026-01-01", periods=3, freq="h", tz="UTC").as_unit("us")
    tables = {
        "events": pa.table({"user_id": ["u1", "u2", "u1"], "item_id": ["a", "b", "a"],
                            "event_type": ["view", "purchase", "view"], "timestamp": ts,
                            "value": [None, 3.0, None], "tags": [["x"], [], ["y"]]}),
        "items": pa.table({"item_id": ["a", "b"], "category": ["c1", "c2"], "price": [1.5, 2.0],
                           "stock": pa.array([3, 4], pa.int32()), "added": ["2026-01-01", "2026-01-02"]}),
        "users": pa.table({"user_id": ["u1", "u2"], "country": ["DE", "FR"]}),
    }
    for name, table in tables.items():
        Path(layout.lake_table(name)).mkdir(parents=True)
        pq.write_table(table, f"{layout.lake_table(name)}/part-00000.parquet")
    return layout


def good_view(**kw) -> FeatureView:
    args = dict(name="user_activity", entity=USER, source=EVENTS,
                aggregations=(Aggregation("count", 7 * DAY, where={"event_type": "view"}, name="views_7d"),
                              Aggregation("sum", 7 * DAY, column="value", name="spend_7d"),
                              Aggregation("last_n", 30 * DAY, column="item_id", n=5, distinct=True, name="last_items")),
                ttl=90 * DAY)
    args.update(kw)
    return FeatureView(**args)


ATTRS = FeatureView("item_attributes", ITEM, ITEMS, fields=(Field("category", "string"), Field("price", "float64"),
                                                           Field("stock", "int64")), ttl=3650 * DAY)


def _refused(layout, views, services=(), on_demand=(), *fragments):
    with pytest.raises(ConfigError) as info:
        validate(layout, views, services, on_demand)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_good_definitions_pass(layout):
    validate(layout, [good_view(), ATTRS])


@pytest.mark.parametrize("kw, fragments", [
    (dict(source=BatchSource("clicks")), ["'user_activity'", "source table 'clicks'", "import it"]),
    (dict(entity=Entity("user", "uid")), ["join key column 'uid'", "fix the column name"]),
    (dict(source=BatchSource("events", "ts")), ["timestamp field column 'ts'"]),
    (dict(source=BatchSource("events", "event_type")), ["timestamp field 'event_type'", "not a timestamp"]),
    (dict(aggregations=(Aggregation("count", DAY, column="price"),)), ["'count_price_1d'", "column 'price'"]),
    (dict(aggregations=(Aggregation("count", DAY, where={"kind": "view"}),)), ["where", "column 'kind'"]),
    (dict(aggregations=(Aggregation("sum", DAY, column="item_id"),)),
     ["'sum_item_id_1d'", "needs a numeric column", "string"]),
    (dict(aggregations=(Aggregation("mean", DAY, column="event_type"),)), ["mean of column 'event_type'"]),
    (dict(aggregations=(Aggregation("max", DAY),)), ["max needs column="]),
    (dict(aggregations=(Aggregation("last_n", DAY, column="item_id"),)), ["last_n needs n >= 1"]),
    (dict(aggregations=(Aggregation("median", DAY, column="value"),)), ["unknown function 'median'"]),
    (dict(aggregations=(Aggregation("count", 100 * DAY, name="c100"),)), ["'c100'", "longer than the view's ttl"]),
    (dict(aggregations=(Aggregation("count", DAY, name="n"), Aggregation("count", 2 * DAY, name="n"))),
     ["feature 'n' is declared twice"]),
    (dict(aggregations=(Aggregation("count", DAY, name="class"),)), ["'class' is not an identifier"]),
    (dict(aggregations=(Aggregation("count", DAY, name="_hidden"),)), ["'_hidden' is not an identifier"]),
    (dict(aggregations=(Aggregation("count", DAY, name="event_timestamp"),)), ["clashes with a column"]),
    (dict(name="user-activity"), ["'user-activity': the name is not an identifier"]),
    (dict(fields=(Field("kind", "string", column="event_kind"),)), ["field column 'event_kind'"]),
])
def test_each_bad_view_definition_is_named(layout, kw, fragments):
    _refused(layout, [good_view(**kw)], (), (), *fragments)


@pytest.mark.parametrize("field, fragments", [
    (Field("category", "int64"), ["feature 'category'", "cannot be stored as int64", "change the Field's dtype"]),
    (Field("price", "int64"), ["'price' is double"]),
    (Field("price", "decimal"), ["unknown dtype 'decimal'"]),
    (Field("added", "bool"), ["column 'added' is string"]),
    (Field("stock", "string"), ["cannot be stored as string"]),
])
def test_field_types_must_fit_the_column(layout, field, fragments):
    view = FeatureView("attrs", ITEM, ITEMS, fields=(field,), ttl=3650 * DAY)
    _refused(layout, [view], (), (), *fragments)


def test_compatible_fields_pass(layout):
    view = FeatureView("attrs", ITEM, ITEMS, fields=(Field("stock", "int64"), Field("stock_f", "float64", "stock")),
                       ttl=3650 * DAY)
    validate(layout, [view])
    tags = FeatureView("tags", USER, EVENTS, fields=(Field("tags", "list<string>"),))
    validate(layout, [tags])


def test_aggregations_on_a_static_source_are_refused(layout):
    view = FeatureView("item_counts", ITEM, ITEMS, aggregations=(Aggregation("count", DAY),))
    _refused(layout, [view], (), (), "timestamped source", "static")


def test_all_problems_are_reported_together(layout):
    view = good_view(aggregations=(Aggregation("sum", DAY, column="item_id"), Aggregation("count", DAY, column="nope")))
    msg = _refused(layout, [view], (), ())
    assert msg.startswith("2 problems") and "item_id" in msg and "nope" in msg


def test_duplicate_features_across_a_services_views(layout):
    other = FeatureView("user_extra", USER, EVENTS, aggregations=(Aggregation("count", 7 * DAY, name="views_7d"),))
    service = FeatureService("svc", (good_view(), other))
    _refused(layout, [good_view(), other], [service], (), "feature service 'svc'", "'views_7d'",
             "'user_activity' and 'user_extra'")
    # selecting only one of them resolves it
    ok = FeatureService("svc", (good_view()[["spend_7d"]], other))
    validate(layout, [good_view(), other], [ok])


def test_service_selection_of_a_missing_feature(layout):
    service = FeatureService("svc", (good_view()[["views_7d", "clicks_7d"]],))
    _refused(layout, [good_view()], [service], (), "no feature 'clicks_7d'")


def test_service_mixing_entities(layout):
    service = FeatureService("svc", (good_view(), ATTRS))
    _refused(layout, [good_view(), ATTRS], [service], (), "mixes entities")


def _share(inputs):
    return {"share": np.asarray(inputs["views_7d"], dtype=float)}


def test_on_demand_outputs_must_not_clash_with_stored_features(layout):
    clash = OnDemandFeatureView("odfv", (good_view(),), {}, {"spend_7d": "float64"}, _share)
    _refused(layout, [good_view()], (), [clash], "on-demand view 'odfv', feature 'spend_7d'", "rename the output")
    bad_type = OnDemandFeatureView("odfv", (good_view(),), {}, {"share": "float32"}, _share)
    _refused(layout, [good_view()], (), [bad_type], "unknown dtype 'float32'")
    ok = OnDemandFeatureView("odfv", (good_view(),), {"basket": "float64"}, {"share": "float64"}, _share)
    validate(layout, [good_view()], [FeatureService("svc", (good_view(), ok))], [ok])


def test_apply_records_versions_and_reapply_changes_nothing(layout):
    odfv = OnDemandFeatureView("odfv", (good_view(),), {}, {"share": "float64"}, _share)
    service = FeatureService("svc", (good_view(), odfv))
    first = apply(layout, [good_view(), ATTRS], [service], [odfv])
    assert {(e.kind, e.name, e.status) for e in first.entries} == {
        ("view", "user_activity", "new"), ("view", "item_attributes", "new"),
        ("on_demand", "odfv", "new"), ("service", "svc", "new")}
    svc = next(e for e in first.entries if e.kind == "service")
    assert svc.features == ["views_7d", "spend_7d", "last_items", "share"]
    path = Path(registry_path(layout))
    content, mtime = path.read_text(), path.stat().st_mtime_ns
    registry = json.loads(content)
    assert registry["views"]["user_activity"]["current"] == good_view().version
    assert registry["views"]["user_activity"]["history"][0]["spec"] == json.loads(json.dumps(good_view().spec()))

    again = apply(layout, [good_view(), ATTRS], [service], [odfv])
    assert all(e.status == "unchanged" for e in again.entries)
    assert path.read_text() == content and path.stat().st_mtime_ns == mtime

    changed_view = good_view(ttl=60 * DAY)
    changed = apply(layout, [changed_view, ATTRS])
    entry = next(e for e in changed.entries if e.name == "user_activity")
    assert entry.status == "changed" and entry.previous == good_view().version and entry.version == changed_view.version
    assert next(e for e in changed.entries if e.name == "item_attributes").status == "unchanged"
    history = read_registry(layout)["views"]["user_activity"]["history"]
    assert [h["version"] for h in history] == [good_view().version, changed_view.version]
    assert read_registry(layout)["services"]["svc"]["current"] == service.version  # untouched


def test_a_refused_apply_records_nothing(layout):
    with pytest.raises(ConfigError):
        apply(layout, [good_view(aggregations=(Aggregation("sum", DAY, column="item_id"),))])
    assert not Path(registry_path(layout)).exists()


def test_the_shop_definitions_apply_cleanly_to_the_shop_schema(tmp_path):
    from apps.shop.generate import ShopSize, generate, write
    from aiplatform.data import lake

    paths = write(generate(ShopSize(users=20, items=30, days=5), seed=1), str(tmp_path / "data"))
    layout = Layout.at(str(tmp_path / "home"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    views, services, on_demand = load_definitions("apps.shop.features")
    report = apply(layout, views, services, on_demand)
    assert {e.name for e in report.entries} >= {"user_activity", "item_popularity", "item_attributes",
                                                "purchase_share", "recommender_user"}


def test_load_definitions_errors_name_the_module():
    with pytest.raises(UserInputError, match="no_such_module"):
        load_definitions("no_such_module")
    with pytest.raises(UserInputError, match="has no VIEWS"):
        load_definitions("aiplatform.core.errors")
