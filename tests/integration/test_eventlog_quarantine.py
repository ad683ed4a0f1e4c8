"""An event in the log that the batch pipeline cannot encode never stops the feature run.

The issue's case, on the real pipeline (Ray Data -> Lance -> SQLite): an event whose item_id holds
U+001E (the online rows' list separator) and one dated a year ahead are written into the event
log directly, as code from before the push checks (or a hand) would have. ``aiplatform features``
(the job's ``main``) then succeeds, says it quarantined them, counts them in its summary, moves
them to ``<root>/eventlog/quarantine`` and computes every other user's row, and the affected
users' rows from their good events, exactly as the engine does from the good events alone.
"""

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from aiplatform.core import storage
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import eventlog, lake
from aiplatform.features.materialize import latest_service_rows
from aiplatform.features.online import open_online_store
from aiplatform.jobs import features as features_job
from apps.shop.features import recommender_user
from apps.shop.generate import ShopSize, generate, write

pytestmark = pytest.mark.integration


def test_the_feature_run_quarantines_bad_events_reports_them_and_computes_everyone_else(
        ray_session, tmp_path, monkeypatch, capsys):
    frames = generate(ShopSize(users=60, items=40, days=20), seed=4)
    paths = write(frames, str(tmp_path / "in"))
    layout = Layout.at(str(tmp_path / "home"))
    lake.import_files(layout, paths["events"], paths["items"], paths["users"])
    monkeypatch.setenv("AIPLATFORM_HOME", layout.root)
    events = frames["events"]
    end = pd.Timestamp(events["timestamp"].max())
    poisoned, future, clean = (str(u) for u in events["user_id"].drop_duplicates().iloc[:3])
    item = str(frames["items"]["item_id"].iloc[3])
    good = pd.DataFrame([
        {"user_id": poisoned, "item_id": item, "event_type": "purchase", "timestamp": end + pd.Timedelta(minutes=5),
         "value": 4.0, "event_id": "good-1"},
        {"user_id": clean, "item_id": item, "event_type": "click", "timestamp": end + pd.Timedelta(minutes=6),
         "value": None, "event_id": "good-2"},
    ])
    eventlog.append(layout, eventlog.validate_pushed(good))
    bad = pd.DataFrame([
        {"user_id": poisoned, "item_id": "item\x1e003", "event_type": "view", "timestamp": end + pd.Timedelta(minutes=7),
         "value": None, "event_id": "bad-separator"},
        {"user_id": future, "item_id": item, "event_type": "view",
         "timestamp": pd.Timestamp.now(tz="UTC") + pd.Timedelta(days=365), "value": None, "event_id": "bad-2100"},
    ])
    leaf = "events-00000000000000000001-0000dead.parquet"  # as written before the push checks
    pq.write_table(pa.Table.from_pandas(bad, preserve_index=False), storage.join(layout.eventlog, leaf))

    code = features_job.main(["--home", layout.root])

    out = capsys.readouterr().out
    assert code == 0, out
    assert "events_quarantined=2" in out  # the run's summary counts them
    assert "quarantined 2 event(s)" in out and "item_id: control character" in out and "timestamp: later" in out
    moved = pq.read_table(storage.join(eventlog.quarantine_dir(layout), leaf)).to_pandas()
    assert sorted(moved["event_id"]) == ["bad-2100", "bad-separator"]
    logged = eventlog.read_events(layout).to_pandas()
    assert not logged["event_id"].isin(["bad-separator", "bad-2100"]).any()
    assert logged["event_id"].isin(["good-1", "good-2"]).sum() == 2

    want = latest_service_rows(recommender_user, pd.concat([events, good], ignore_index=True))
    want = want.to_pandas().set_index("user_id")
    users = sorted(want.index)
    got = open_online_store(layout.online_sqlite).get_online_features(recommender_user, users).to_arrow()
    got = got.to_pandas().set_index("user_id")
    assert (got["status"] == "ok").all()
    for col in recommender_user.stored_dtypes:  # every user, every feature
        for u in users:
            g, w = got.at[u, col], want.at[u, col]
            if isinstance(w, (list, np.ndarray)):
                assert list(g) == list(w), (u, col)
            else:
                assert g == w, (u, col, g, w)
    assert item in list(got.at[poisoned, "purchased_items"])
    summary = features_job.run_features(layout, Settings.load(home=layout.root))
    assert summary.events_quarantined == 0  # already moved: nothing more this time
