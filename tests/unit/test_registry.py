"""Model registry: version numbering, artifact copies, aliases and their history, errors."""

from pathlib import Path

import pytest

from aiplatform.core.errors import NotFoundError, UserInputError
from aiplatform.core.storage import Layout
from aiplatform.registry import ModelRegistry


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
