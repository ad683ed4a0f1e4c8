"""Model registry: version numbering, artifact copies, aliases and their history, errors;
concurrent registrations from separate processes, on a folder and on an S3-compatible server;
compare-and-set alias moves (who/when/why, conflicts, concurrent promotions, rollback) and the
alias table of older releases."""

import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest

from aiplatform.core import storage
from aiplatform.core.errors import ConflictError, NotFoundError, UserInputError
from aiplatform.core.storage import Layout
from aiplatform.registry import ModelRegistry
from aiplatform.registry.registry import (
    _ALIASES_SCHEMA,
    _VERSIONS_SCHEMA,
    ALIASES_TABLE,
    VERSIONS_TABLE,
    default_actor,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def layout(tmp_path) -> Layout:
    return Layout.at(str(tmp_path / "home"))


@pytest.fixture()
def artifact(tmp_path) -> Path:
    d = tmp_path / "artifact"
    d.mkdir()
    (d / "model.pt").write_bytes(b"weights-1")
    (d / "vocab.json").write_text('{"item_ids": []}')
    return d


def test_versions_increment_and_artifacts_are_copied(layout, artifact):
    reg = ModelRegistry(layout)
    v1 = reg.register("two_tower", str(artifact), {"recall@10": 0.1}, {"lr": 0.01}, "runs/ck1",
                      lineage={"features": "user_activity@3"})
    (artifact / "model.pt").write_bytes(b"weights-2")
    v2 = reg.register("two_tower", str(artifact), {"recall@10": 0.2}, {"lr": 0.02}, "runs/ck2")
    other = reg.register("ranker", str(artifact), {}, {}, "")

    assert (v1.version, v2.version, other.version) == (1, 2, 1)
    assert v1.artifact_uri == layout.model_dir("two_tower", 1)
    # each version keeps its own copy: changing the source later does not change version 1
    assert (Path(v1.artifact_uri) / "model.pt").read_bytes() == b"weights-1"
    assert (Path(v2.artifact_uri) / "model.pt").read_bytes() == b"weights-2"
    # no temporary directories are left next to the versions
    assert sorted(p.name for p in Path(v1.artifact_uri).parent.iterdir()) == ["1", "2"]


def test_reads_round_trip_from_a_fresh_registry(layout, artifact):
    ModelRegistry(layout).register("two_tower", str(artifact), {"recall@10": 0.25}, {"dim": 64},
                                   "runs/ck", lineage={"data": "lake/events@v7"})
    reg = ModelRegistry(layout)  # a second process would open it like this
    got = reg.get("two_tower", 1)
    assert got.metrics == {"recall@10": 0.25}
    assert got.params == {"dim": 64}
    assert got.checkpoint_uri == "runs/ck"
    assert got.lineage == {"data": "lake/events@v7"}
    assert got.created_at.tzinfo is not None
    assert reg.latest("two_tower").version == 1
    assert [v.version for v in reg.list_versions("two_tower")] == [1]
    assert reg.list_versions("unknown") == []


def test_alias_set_moved_and_history(layout, artifact):
    reg = ModelRegistry(layout)
    for _ in range(3):
        reg.register("two_tower", str(artifact), {}, {}, "")
    reg.set_alias("two_tower", "champion", 1, reason="first model")
    assert reg.get_by_alias("two_tower", "champion").version == 1
    reg.set_alias("two_tower", "champion", 3, reason="better recall")
    reg.set_alias("two_tower", "challenger", 2)
    assert reg.get_by_alias("two_tower", "champion").version == 3
    assert reg.get_by_alias("two_tower", "challenger").version == 2
    reg.set_alias("two_tower", "champion", 1, reason="rollback")

    history = reg.alias_history("two_tower", "champion")
    assert [(h["version"], h["reason"]) for h in history] == [
        (1, "first model"), (3, "better recall"), (1, "rollback")
    ]
    assert history[0]["set_at"] <= history[1]["set_at"] <= history[2]["set_at"]
    assert ModelRegistry(layout).get_by_alias("two_tower", "champion").version == 1
    assert reg.alias_history("two_tower", "never-set") == []


def test_not_found_errors_name_what_exists(layout, artifact):
    reg = ModelRegistry(layout)
    with pytest.raises(NotFoundError, match="none registered yet"):
        reg.latest("two_tower")
    reg.register("two_tower", str(artifact), {}, {}, "")
    reg.register("two_tower", str(artifact), {}, {}, "")

    with pytest.raises(NotFoundError, match=r"no version 7 \(versions: 1, 2\)"):
        reg.get("two_tower", 7)
    with pytest.raises(NotFoundError, match=r"'ranker' is not registered \(registered models: two_tower\)"):
        reg.get("ranker", 1)
    with pytest.raises(NotFoundError, match=r"no alias 'champion' \(aliases: none set\)"):
        reg.get_by_alias("two_tower", "champion")
    reg.set_alias("two_tower", "staging", 2)
    with pytest.raises(NotFoundError, match=r"aliases: staging"):
        reg.get_by_alias("two_tower", "champion")
    # an alias may only point at a version that exists, and a failed set changes nothing
    with pytest.raises(NotFoundError, match="no version 9"):
        reg.set_alias("two_tower", "staging", 9)
    assert reg.get_by_alias("two_tower", "staging").version == 2


def test_bad_input_is_refused_without_side_effects(layout, artifact, tmp_path):
    reg = ModelRegistry(layout)
    with pytest.raises(UserInputError, match="does not exist or is empty"):
        reg.register("two_tower", str(tmp_path / "missing"), {}, {}, "")
    with pytest.raises(UserInputError, match="invalid model name"):
        reg.register("../escape", str(artifact), {}, {}, "")
    with pytest.raises(UserInputError, match="JSON"):
        reg.register("two_tower", str(artifact), {"m": object()}, {}, "")
    assert reg.list_models() == []
    assert not Path(layout.model_dir("two_tower", 1)).exists()


# ---- concurrent registrations ------------------------------------------------------------------
# Each child opens the registry, says it is ready, waits for the go file (so all of them register
# at the same moment) and registers its own artifact; it prints its version and tag.
_REGISTER_CHILD = """
import json, logging, os, sys, time
from pathlib import Path
logging.basicConfig(level=logging.WARNING)
logging.getLogger("aiplatform.registry").setLevel(logging.DEBUG)
from aiplatform.core.storage import Layout
from aiplatform.registry import ModelRegistry
root, src, tag, sync = sys.argv[1:5]
reg = ModelRegistry(Layout.at(root))
Path(sync, "ready-" + tag).touch()
deadline = time.monotonic() + 120
while not Path(sync, "go").exists() and time.monotonic() < deadline:
    time.sleep(0.005)
mv = reg.register("two_tower", src, {"tag": tag}, {}, "runs/" + tag)
print(json.dumps({"tag": tag, "version": mv.version, "artifact_uri": mv.artifact_uri}))
"""


def _register_at_once(root: str, tmp_path: Path, n: int) -> list[dict]:
    sync = tmp_path / "sync"
    sync.mkdir()
    procs = []
    for i in range(n):
        src = tmp_path / f"artifact-{i}"
        src.mkdir()
        (src / "model.pt").write_bytes(f"weights-of-{i}".encode())
        (src / "vocab.json").write_text(json.dumps({"tag": str(i)}))
        procs.append(subprocess.Popen(
            [sys.executable, "-c", _REGISTER_CHILD, root, str(src), str(i), str(sync)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline = time.monotonic() + 120
    while len(list(sync.glob("ready-*"))) < n and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.02)
    (sync / "go").touch()
    results, logs = [], []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
        logs.append(err)
    versions = sorted(r["version"] for r in results)
    assert versions == list(range(1, n + 1)), "\n".join(logs)
    return results


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_registrations_get_distinct_versions_and_none_is_lost(where, tmp_path, request):
    """N processes register a version of one model at the same moment: N versions 1..N, each
    with the files of the process that got it. On S3 there is no exclusive folder create, so
    only the Lance commit protocol (conditional PUT) can make this hold."""
    n = 6
    root = request.getfixturevalue("s3_root") if where == "s3" else str(tmp_path / "home")
    results = _register_at_once(root, tmp_path, n)

    assert sorted(r["version"] for r in results) == list(range(1, n + 1))
    reg = ModelRegistry(Layout.at(root))
    versions = reg.list_versions("two_tower")
    assert [v.version for v in versions] == list(range(1, n + 1))
    by_tag = {r["tag"]: r["version"] for r in results}
    layout = Layout.at(root)
    for v in versions:
        tag = v.metrics["tag"]
        assert by_tag[tag] == v.version and v.checkpoint_uri == f"runs/{tag}"
        assert v.artifact_uri == layout.model_dir("two_tower", v.version)
        # the version's folder holds exactly the files of the process that registered it
        assert storage.read_bytes(f"{v.artifact_uri}/model.pt") == f"weights-of-{tag}".encode()
        assert storage.read_json(f"{v.artifact_uri}/vocab.json") == {"tag": tag}
        assert storage.list_files(v.artifact_uri) == [f"{v.artifact_uri}/model.pt", f"{v.artifact_uri}/vocab.json"]
    # a later registration continues after them
    extra = tmp_path / "artifact-late"
    extra.mkdir()
    (extra / "model.pt").write_bytes(b"late")
    assert reg.register("two_tower", str(extra), {}, {}, "").version == n + 1


def test_registry_of_an_older_release_keeps_its_versions(layout, artifact):
    """Versions written before numbers were claimed (rows, no claims) are skipped, not reused."""
    db = lancedb.connect(layout.registry)
    now = datetime.now(timezone.utc)
    old = [{"name": "two_tower", "version": v, "created_at": now, "metrics": "{}", "params": "{}",
            "checkpoint_uri": "", "artifact_uri": layout.model_dir("two_tower", v), "lineage": "{}"}
           for v in (1, 2, 3)]
    db.create_table(VERSIONS_TABLE, pa.Table.from_pylist(old, schema=_VERSIONS_SCHEMA))
    reg = ModelRegistry(layout)
    assert reg.register("two_tower", str(artifact), {}, {}, "").version == 4
    assert reg.register("two_tower", str(artifact), {}, {}, "").version == 5
    assert reg.register("ranker", str(artifact), {}, {}, "").version == 1
    assert [v.version for v in reg.list_versions("two_tower")] == [1, 2, 3, 4, 5]


def test_register_from_an_object_store_folder(s3_root, artifact, tmp_path):
    """A checkpoint in the bucket registers as it is, into a bucket or a folder root."""
    src = f"{s3_root}/runs/run-1/epoch_0001"
    storage.upload_dir(str(artifact), src)
    remote = ModelRegistry(Layout.at(f"{s3_root}/home"))
    mv = remote.register("two_tower", src, {"m": 1}, {}, src)
    assert mv.artifact_uri == f"{s3_root}/home/models/two_tower/1"
    assert storage.read_bytes(f"{mv.artifact_uri}/model.pt") == b"weights-1"
    assert ModelRegistry(Layout.at(f"{s3_root}/home")).get("two_tower", 1).checkpoint_uri == src

    local = ModelRegistry(Layout.at(str(tmp_path / "home")))
    mv = local.register("two_tower", src, {}, {}, src)
    assert (Path(mv.artifact_uri) / "model.pt").read_bytes() == b"weights-1"
    with pytest.raises(UserInputError, match="does not exist or is empty"):
        local.register("two_tower", f"{s3_root}/runs/missing", {}, {}, "")


# ---- alias moves: compare-and-set, who/when/why, rollback ------------------------------------------
def _registry_with(layout: Layout, artifact: Path, n: int, name: str = "two_tower") -> ModelRegistry:
    reg = ModelRegistry(layout)
    for _ in range(n):
        reg.register(name, str(artifact), {}, {}, "")
    return reg


def test_alias_history_records_who_and_why(layout, artifact, monkeypatch):
    reg = _registry_with(layout, artifact, 3)
    monkeypatch.delenv("AIPLATFORM_ACTOR", raising=False)
    first = reg.set_alias("two_tower", "champion", 1, reason="first model")
    assert first["actor"].count("@") == 1 and first["previous"] is None  # user@host by default
    reg.set_alias("two_tower", "champion", 2, reason="better recall", actor="alice")
    monkeypatch.setenv("AIPLATFORM_ACTOR", "ci-nightly")
    move = reg.promote("two_tower", 3, reason="passed the A/B test")
    assert (move["previous"], move["version"], move["actor"], move["changed"]) == (2, 3, "ci-nightly", True)

    history = ModelRegistry(layout).alias_history("two_tower", "champion")
    assert [(h["previous"], h["version"], h["actor"], h["reason"]) for h in history] == [
        (None, 1, first["actor"], "first model"), (1, 2, "alice", "better recall"),
        (2, 3, "ci-nightly", "passed the A/B test")]
    assert all(h["set_at"].tzinfo is not None for h in history)
    # promoting the current target is not an error and writes nothing
    again = reg.promote("two_tower", 3, reason="again")
    assert again["changed"] is False and again["version"] == 3
    assert len(reg.alias_history("two_tower", "champion")) == 3


def test_a_stale_expected_target_conflicts_and_changes_nothing(layout, artifact):
    reg = _registry_with(layout, artifact, 3)
    reg.set_alias("two_tower", "champion", 1, reason="first", actor="alice")
    seen = reg.aliases("two_tower")["champion"]  # bob reads v1 ...
    reg.set_alias("two_tower", "champion", 2, reason="better recall", actor="alice", expected=seen)  # alice moves it
    with pytest.raises(ConflictError) as caught:  # ... and bob's move from v1 loses
        reg.set_alias("two_tower", "champion", 3, reason="bob's pick", actor="bob", expected=seen)
    msg = str(caught.value)
    assert "expected it to be at v1" in msg and "moved to v2 by alice" in msg and "(better recall)" in msg
    assert "aiplatform models list" in msg and "retry" in msg
    assert reg.get_by_alias("two_tower", "champion").version == 2
    # the rejected row is not history
    assert [h["version"] for h in reg.alias_history("two_tower", "champion")] == [1, 2]
    # "must not be set yet" is a value too
    with pytest.raises(ConflictError, match="expected it to be unset, but it was moved to v2 by alice"):
        reg.set_alias("two_tower", "champion", 3, expected=None)
    assert reg.set_alias("two_tower", "staging", 3, expected=None)["version"] == 3
    with pytest.raises(UserInputError, match="expected='2'"):
        reg.set_alias("two_tower", "champion", 3, expected="2")
    assert ModelRegistry(layout).aliases("two_tower") == {"champion": 2, "staging": 3}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_concurrent_promotions_from_one_target_exactly_one_wins(where, tmp_path, artifact, request):
    """Four movers read champion at v1 and move it to v2..v5 at the same moment: the commit order
    decides, one move applies, the others get ConflictError naming it, and the alias is the winner's."""
    root = request.getfixturevalue("s3_root") if where == "s3" else str(tmp_path / "home")
    reg = _registry_with(Layout.at(root), artifact, 5)
    reg.set_alias("two_tower", "champion", 1, reason="first")
    start = threading.Barrier(4)
    results: dict[int, object] = {}

    def move(version: int) -> None:
        mine = ModelRegistry(Layout.at(root))  # each mover has its own registry, as separate pods would
        start.wait()
        try:
            results[version] = mine.set_alias("two_tower", "champion", version, reason=f"pick {version}",
                                              actor=f"mover-{version}", expected=1)
        except ConflictError as exc:
            results[version] = exc

    threads = [threading.Thread(target=move, args=(v,)) for v in (2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4
    winners = [v for v, r in results.items() if isinstance(r, dict)]
    assert len(winners) == 1, results
    winner = winners[0]
    for v, r in results.items():
        if v != winner:
            assert isinstance(r, ConflictError) and f"moved to v{winner} by mover-{winner}" in str(r)
    fresh = ModelRegistry(Layout.at(root))
    assert fresh.aliases("two_tower") == {"champion": winner}
    assert [(h["version"], h["actor"]) for h in fresh.alias_history("two_tower", "champion")] == [
        (1, default_actor()), (winner, f"mover-{winner}")]


def test_promotions_that_read_the_same_target_do_not_both_apply(layout, artifact):
    """promote() reads the target and then writes: two promotions whose reads both happen before
    either write (forced by a barrier after the read) cannot both win."""
    _registry_with(layout, artifact, 3).set_alias("two_tower", "champion", 1)
    both_read = threading.Barrier(2)

    class ReadThenWait(ModelRegistry):
        def _alias_states(self, name):
            states = super()._alias_states(name)
            both_read.wait(timeout=60)
            return states

    results: dict[int, object] = {}

    def promote(version: int) -> None:
        try:
            results[version] = ReadThenWait(layout).promote("two_tower", version, reason=f"v{version}")
        except ConflictError as exc:
            results[version] = exc

    threads = [threading.Thread(target=promote, args=(v,)) for v in (2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [v for v, r in results.items() if isinstance(r, dict)]
    assert len(winners) == 1 and isinstance(results[5 - winners[0]], ConflictError), results
    assert ModelRegistry(layout).aliases("two_tower") == {"champion": winners[0]}


def test_rollback_walks_back_along_the_alias_line(layout, artifact):
    """rollback = the version before the current one on the alias's line: v1 -> v2 -> v3, then
    rollback gives v2, again v1, and a third has nothing to go back to. Moving to a version
    that is not the previous one starts a new step (v1 -> v4: rollback gives v1)."""
    reg = _registry_with(layout, artifact, 4)
    with pytest.raises(UserInputError, match="'champion' of model 'two_tower' is not set"):
        reg.rollback("two_tower")
    with pytest.raises(NotFoundError, match="'ranker' is not registered"):
        reg.rollback("ranker")
    for v in (1, 2, 3):
        reg.promote("two_tower", v, actor="alice")
    back = reg.rollback("two_tower", reason="v3 hurts conversion", actor="bob")
    assert (back["previous"], back["version"], back["reason"], back["actor"]) == (3, 2, "v3 hurts conversion", "bob")
    back = reg.rollback("two_tower", actor="bob")
    assert (back["previous"], back["version"], back["reason"]) == (2, 1, "rollback from v2")
    with pytest.raises(UserInputError, match="points at v1, the first version in its history: there is nothing"):
        reg.rollback("two_tower")
    assert reg.get_by_alias("two_tower", "champion").version == 1
    reg.promote("two_tower", 4)
    assert reg.rollback("two_tower")["version"] == 1
    assert [h["version"] for h in reg.alias_history("two_tower", "champion")] == [1, 2, 3, 2, 1, 4, 1]


def test_rollback_is_compare_and_set(layout, artifact):
    """A rollback decided on a target that someone moves before it commits does not apply."""
    reg = _registry_with(layout, artifact, 3)
    reg.promote("two_tower", 1)
    reg.promote("two_tower", 2)

    class MovedMeanwhile(ModelRegistry):
        def _alias_states(self, name):
            states = super()._alias_states(name)
            ModelRegistry(self.layout).promote(name, 3, reason="hotfix", actor="carol")
            return states

    with pytest.raises(ConflictError, match="moved to v3 by carol"):
        MovedMeanwhile(layout).rollback("two_tower")
    assert reg.aliases("two_tower") == {"champion": 3}


def test_alias_moves_of_an_older_release_are_still_read(layout, artifact):
    """The old ``aliases`` table (no actor, no compare-and-set) comes before every new move, and
    nothing is written to it any more."""
    reg = _registry_with(layout, artifact, 3)
    t0 = datetime(2024, 1, 1, tzinfo=timezone.utc)
    old = [{"name": "two_tower", "alias": "champion", "version": 1, "set_at": t0, "reason": "first model"},
           {"name": "two_tower", "alias": "staging", "version": 2, "set_at": t0, "reason": ""},
           {"name": "two_tower", "alias": "champion", "version": 2, "set_at": t0.replace(day=2), "reason": "better"}]
    legacy = lancedb.connect(layout.registry).create_table(
        ALIASES_TABLE, pa.Table.from_pylist(old, schema=_ALIASES_SCHEMA))

    assert reg.aliases("two_tower") == {"champion": 2, "staging": 2}
    assert reg.get_by_alias("two_tower", "champion").version == 2
    history = reg.alias_history("two_tower", "champion")
    assert [(h["previous"], h["version"], h["actor"], h["reason"]) for h in history] == [
        (None, 1, "", "first model"), (1, 2, "", "better")]
    with pytest.raises(ConflictError, match="moved to v2 by an older release"):
        reg.set_alias("two_tower", "champion", 3, expected=1)
    assert reg.promote("two_tower", 3, actor="alice")["previous"] == 2
    assert reg.rollback("two_tower")["version"] == 2  # the line runs through the old moves
    assert reg.rollback("two_tower")["version"] == 1
    assert legacy.count_rows() == 3
    assert ModelRegistry(layout).aliases("two_tower") == {"champion": 1, "staging": 2}


def test_two_first_training_jobs_do_not_both_become_champion(layout, artifact):
    """apply_aliases makes a passing version champion when there is none yet: two jobs that both
    read "no champion" before either writes get one champion; the other job stays challenger."""
    from aiplatform.jobs.publish import apply_aliases

    _registry_with(layout, artifact, 2)
    both_read = threading.Barrier(2)

    class ReadThenWait(ModelRegistry):
        def aliases(self, name):
            current = super().aliases(name)
            both_read.wait(timeout=60)
            return current

    results: dict[int, list[str]] = {}
    threads = [threading.Thread(target=lambda v=v: results.__setitem__(
        v, apply_aliases(ReadThenWait(layout), "two_tower", v, gates_passed=True))) for v in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(map(len, results.values())) == [1, 2], results  # both challenger, one champion too
    champion = next(v for v, got in results.items() if "champion" in got)
    assert ModelRegistry(layout).aliases("two_tower")["champion"] == champion


def test_alias_revision_changes_when_an_alias_moves_and_only_then(layout, artifact):
    """What serving replicas poll instead of replaying the moves: another process's move is seen
    by an open registry, a registration or a lost compare-and-set is not a move."""
    watcher, writer = ModelRegistry(layout), ModelRegistry(layout)
    before = watcher.alias_revision()
    v1 = writer.register("two_tower", str(artifact), {}, {}, "")
    assert watcher.alias_revision() == before  # a new version moves no alias
    writer.set_alias("two_tower", "champion", v1.version)
    moved = watcher.alias_revision()
    assert moved != before
    v2 = writer.register("two_tower", str(artifact), {}, {}, "")
    assert watcher.alias_revision() == moved
    writer.set_alias("two_tower", "champion", v2.version)
    assert watcher.alias_revision() != moved
    assert watcher.get_by_alias("two_tower", "champion").version == v2.version
