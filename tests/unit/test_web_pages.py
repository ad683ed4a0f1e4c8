"""Pieces of the pages that need no Ray: the catalogue (titles where the data has them, ids
otherwise), the replica's traffic window and the jobs tab's classification."""

import pyarrow as pa
import pytest

from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.web.catalogue import Catalogue
from aiplatform.web.status import job_kind
from aiplatform.web.traffic import RequestWindow


@pytest.fixture()
def layout(tmp_path) -> Layout:
    layout = Layout.at(str(tmp_path / "home"))
    layout.ensure()
    return layout


def test_the_catalogue_shows_titles_where_present_and_ids_otherwise(layout):
    lake.write_tables(layout, {
        "items": pa.table({"item_id": ["a", "b"], "title": ["Red shoe", None], "category": ["shoes", "books"],
                           "price": [12.5, None]}),
        "events": pa.table({"user_id": ["u9", "u1", "u9"], "item_id": ["a", "b", "b"]})})
    catalogue = Catalogue(layout)
    catalogue.refresh()  # what the pages do off the event loop before their lookups
    assert catalogue.item("a").name == "Red shoe" and catalogue.item("a").price == 12.5
    assert catalogue.item("b").name == "b" and catalogue.item("b").category == "books"
    assert catalogue.item("b").price is None
    assert catalogue.item("new-item").name == "new-item"  # not in the catalogue (yet)
    assert catalogue.sample_users() == ["u9", "u1"]


def test_bring_your_own_items_with_ids_only(layout):
    lake.write_tables(layout, {"items": pa.table({"item_id": ["x1", "x2"]})})
    catalogue = Catalogue(layout)
    catalogue.refresh()  # what the pages do off the event loop before their lookups
    assert catalogue.item("x1").name == "x1" and catalogue.item("x1").category is None
    assert catalogue.sample_users() == []


def test_an_empty_lake_gives_ids_and_no_sample_users(layout):
    catalogue = Catalogue(layout)
    catalogue.refresh()  # what the pages do off the event loop before their lookups
    assert catalogue.item("i").name == "i" and catalogue.sample_users() == []


def test_the_window_reports_rate_percentiles_errors_and_fallbacks():
    window = RequestWindow(window_s=60)
    for i in range(100):
        window.observe("/v1/recommendations", 200, (i + 1) / 1000, {"fallback": "popular"} if i < 25 else {})
    window.observe("/v1/events", 503, 0.5, {})
    stats = {s.route: s for s in window.stats()}
    rec = stats["/v1/recommendations"]
    assert rec.requests == 100 and rec.errors == 0 and rec.fallback_rate == 0.25
    assert rec.p50_ms == pytest.approx(50.5) and rec.p99_ms == pytest.approx(99.01)
    assert stats["/v1/events"].errors == 1
    assert stats["all"].requests == 101
    assert rec.rate_per_s == pytest.approx(100.0)  # all within the first second: counted over 1 s at least


def test_the_window_forgets_old_requests_and_stays_bounded():
    window = RequestWindow(window_s=10, max_kept=5)
    for _ in range(8):
        window.observe("/shop", 200, 0.01, {})
    assert window.stats()[0].requests == 5
    assert window.stats(now=window.started + 1e6) == []


def test_jobs_are_told_apart_by_their_entrypoint():
    assert job_kind("python -m aiplatform.jobs.train --home s3://b/r") == "training"
    assert job_kind("python -m aiplatform.jobs.features --home h") == "features"
    assert job_kind("python -m aiplatform.jobs.index") == "index"
    assert job_kind("python my_script.py") == "other"
