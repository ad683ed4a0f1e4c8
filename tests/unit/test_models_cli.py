"""`aiplatform models promote / rollback / show` against a real registry and real vector tables
in a temporary storage root: what they print, what they move, their exit codes, the conflict of
a move made between the command's read and its write, and the vector index a promotion needs."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from aiplatform.cli import app
from aiplatform.core.storage import Layout
from aiplatform.registry import ModelRegistry
from aiplatform.registry.registry import ModelRegistry as RegistryClass
from aiplatform.retrieval.index import ItemIndex, vector_table_name, write_item_vectors

MODEL = "two_tower"
ENV = {"COLUMNS": "200", "AIPLATFORM_ACTOR": "ci-bot"}


@pytest.fixture()
def home(tmp_path) -> str:
    """A root with versions 1..3 of two_tower, each with its vector table (exact, 20 items)."""
    root = str(tmp_path / "home")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.pt").write_bytes(b"w")
    layout = Layout.at(root)
    registry = ModelRegistry(layout)
    for _ in range(3):
        mv = registry.register(MODEL, str(artifact), {}, {}, "")
        _write_index(layout, mv.version)
    return root


def _write_index(layout: Layout, version: int) -> None:
    rng = np.random.default_rng(version)
    items = pd.DataFrame({"item_id": [f"i{i}" for i in range(20)],
                          "vector": list(rng.normal(size=(20, 8)).astype(np.float32))})
    write_item_vectors(layout.vectors, vector_table_name(MODEL, version), items)


def _cli(home: str, *args: str):
    result = CliRunner().invoke(app, ["models", *args, "--home", home], env=ENV)
    return result, " ".join(result.output.split())  # rich wraps long lines


def _registry(home: str) -> ModelRegistry:
    return ModelRegistry(Layout.at(home))


def test_promote_moves_the_alias_and_says_who_and_why(home):
    _registry(home).set_alias(MODEL, "champion", 1, reason="first model", actor="alice")
    result, text = _cli(home, "promote", MODEL, "2", "--reason", "better recall in the A/B test")
    assert result.exit_code == 0, result.output
    assert "champion of two_tower: v1 -> v2 by ci-bot (better recall in the A/B test)" in text
    assert "follow 'champion' switch to v2 within a few seconds" in text
    registry = _registry(home)
    assert registry.aliases(MODEL) == {"champion": 2}
    last = registry.alias_history(MODEL, "champion")[-1]
    assert (last["previous"], last["version"], last["actor"]) == (1, 2, "ci-bot")

    again, text = _cli(home, "promote", MODEL, "2")
    assert again.exit_code == 0 and "champion of two_tower already points at v2" in text and "nothing to do" in text
    assert len(_registry(home).alias_history(MODEL, "champion")) == 2

    other, text = _cli(home, "promote", MODEL, "3", "--alias", "staging")
    assert other.exit_code == 0 and "staging of two_tower: unset -> v3" in text
    assert _registry(home).aliases(MODEL) == {"champion": 2, "staging": 3}


def test_promote_of_a_missing_version_or_model_exits_2_naming_what_exists(home):
    result, text = _cli(home, "promote", MODEL, "9")
    assert result.exit_code == 2 and "no version 9 (versions: 1, 2, 3)" in text
    result, text = _cli(home, "promote", "ranker", "1")
    assert result.exit_code == 2 and "'ranker' is not registered (registered models: two_tower)" in text
    result, text = _cli(home, "promote", MODEL, "1", "--alias", "bad alias")
    assert result.exit_code == 2 and "invalid alias" in text
    assert _registry(home).aliases(MODEL) == {}


def test_rollback_goes_back_one_version_at_a_time(home):
    result, text = _cli(home, "rollback", MODEL)
    assert result.exit_code == 2 and "'champion' of model 'two_tower' is not set" in text and "models promote" in text
    for v in ("1", "2", "3"):
        assert _cli(home, "promote", MODEL, v)[0].exit_code == 0
    result, text = _cli(home, "rollback", MODEL, "--reason", "v3 hurts conversion")
    assert result.exit_code == 0, result.output
    assert "champion of two_tower: v3 -> v2 by ci-bot (v3 hurts conversion)" in text
    result, text = _cli(home, "rollback", MODEL)
    assert result.exit_code == 0 and "v2 -> v1 by ci-bot (rollback from v2)" in text
    result, text = _cli(home, "rollback", MODEL)
    assert result.exit_code == 2 and "nothing earlier to roll back to" in text
    assert _registry(home).aliases(MODEL) == {"champion": 1}


def test_a_move_made_after_the_command_read_the_alias_is_a_conflict(home, monkeypatch):
    """Someone promotes v3 between `promote 2` reading champion at v1 and writing: the command
    fails naming that move, and champion stays where they put it."""
    _registry(home).set_alias(MODEL, "champion", 1, actor="alice")
    original = RegistryClass.set_alias
    raced = []

    def someone_moves_first(self, *args, **kwargs):
        if not raced:
            raced.append(True)
            original(RegistryClass(self.layout), MODEL, "champion", 3, reason="hotfix", actor="carol")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RegistryClass, "set_alias", someone_moves_first)
    result, text = _cli(home, "promote", MODEL, "2")
    assert result.exit_code == 1, result.output
    assert "you expected it to be at v1, but it was moved to v3 by carol" in text and "(hotfix)" in text
    assert "aiplatform models list --name two_tower" in text and "retry" in text
    assert _registry(home).aliases(MODEL) == {"champion": 3}


def test_promote_builds_a_missing_vector_index_first(home, monkeypatch):
    """No vector table for v4: promote builds it (here a stand-in for the Ray job that writes a
    real table) before moving the alias; with --no-build-index it warns and moves."""
    from aiplatform.core import runtime
    from aiplatform.jobs import index as index_job

    layout = Layout.at(home)
    registry = _registry(home)
    registry.set_alias(MODEL, "champion", 1)
    registry.register(MODEL, str(Path(registry.get(MODEL, 1).artifact_uri)), {}, {}, "")  # v4, no index
    built = []
    monkeypatch.setattr(runtime, "ensure_ray", lambda settings=None, quiet=True: built.append("ray"))
    monkeypatch.setattr(index_job, "run_index",
                        lambda layout_, name, alias="champion", version=None: built.append(version)
                        or _write_index(layout_, version))
    result, text = _cli(home, "promote", MODEL, "4")
    assert result.exit_code == 0, result.output
    assert built == ["ray", 4] and "v4 has no vector index yet: building two_tower_v4" in text
    assert len(ItemIndex(layout.vectors, vector_table_name(MODEL, 4))) == 20
    assert _registry(home).aliases(MODEL) == {"champion": 4}

    # a build that leaves no table: the alias does not move
    registry.register(MODEL, str(Path(registry.get(MODEL, 1).artifact_uri)), {}, {}, "")  # v5
    monkeypatch.setattr(index_job, "run_index", lambda *a, **k: None)
    result, text = _cli(home, "promote", MODEL, "5")
    assert result.exit_code == 2 and "vector table 'two_tower_v5' not found" in text
    assert _registry(home).aliases(MODEL) == {"champion": 4}

    # --no-build-index: no build, a warning naming how to build it, and the move
    monkeypatch.setattr(index_job, "run_index", lambda *a, **k: pytest.fail("must not build"))
    result, text = _cli(home, "promote", MODEL, "5", "--no-build-index")
    assert result.exit_code == 0, result.output
    assert "v5 has no vector index" in text and "--version 5" in text and "v4 -> v5" in text
    assert _registry(home).aliases(MODEL) == {"champion": 5}


def test_show_names_who_moved_an_alias(home):
    _registry(home).set_alias(MODEL, "champion", 1, reason="first model", actor="alice")
    _cli(home, "promote", MODEL, "2", "--reason", "better")
    result = CliRunner().invoke(app, ["models", "show", MODEL, "2", "--home", home], env=ENV)
    assert result.exit_code == 0, result.output
    assert "alias champion -> v2" in result.output and "by ci-bot (better)" in result.output
    result = CliRunner().invoke(app, ["models", "show", MODEL, "1", "--home", home], env=ENV)
    assert "by alice (first model)" in result.output
