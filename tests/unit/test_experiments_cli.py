"""`aiplatform experiments start / show / stop / report / canary` against a real registry and a
real experiment store in a temporary storage root: what they print, what they write, their exit
codes, and a canary whose traffic comes from a thread writing exposures as serving would."""

import threading

import numpy as np
import pytest
from typer.testing import CliRunner

from aiplatform.cli import app
from aiplatform.core.storage import Layout
from aiplatform.experiments import ExperimentStore
from aiplatform.registry import ModelRegistry

MODEL = "two_tower"
ENV = {"COLUMNS": "200", "AIPLATFORM_ACTOR": "ci-bot"}
AB = """name: ab-test
model_name: two_tower
variants:
  - {name: control, alias: champion, weight: 50}
  - {name: treatment, version: 2, weight: 50}
shadow: {version: 3, share: 0.5}
"""


@pytest.fixture()
def home(tmp_path) -> str:
    """A root with versions 1..3 of two_tower and champion at v1."""
    root = str(tmp_path / "home")
    artifact = tmp_path / "artifact"
    artifact.mkdir()
    (artifact / "model.pt").write_bytes(b"w")
    registry = ModelRegistry(Layout.at(root))
    for _ in range(3):
        registry.register(MODEL, str(artifact), {}, {}, "")
    registry.set_alias(MODEL, "champion", 1, reason="first", actor="alice")
    return root


def _cli(home: str, *args: str):
    result = CliRunner().invoke(app, ["experiments", *args, "--home", home], env=ENV)
    return result, " ".join(result.output.replace("│", " ").split())  # rich wraps long lines and draws columns


def _store(home: str) -> ExperimentStore:
    return ExperimentStore(Layout.at(home))


def test_start_show_stop(home, tmp_path):
    path = tmp_path / "ab.yaml"
    path.write_text(AB)
    result, text = _cli(home, "start", str(path), "--reason", "new ranker")
    assert result.exit_code == 0, result.output
    assert "started ab-test (revision 1)" in text and "treatment v2 50 50.0%" in text
    assert "shadow shadow: v3 gets a copy of 50% of requests" in text
    exp, revision = _store(home).active(MODEL)
    assert (exp.name, revision) == ("ab-test", 1)

    path.write_text(AB.replace("weight: 50}\n  - {name: treatment, version: 2, weight: 50}",
                               "weight: 90}\n  - {name: treatment, version: 2, weight: 10}"))
    result, text = _cli(home, "start", str(path))
    assert result.exit_code == 0 and "revision 2" in text

    result, text = _cli(home, "show", "ab-test")
    assert result.exit_code == 0, result.output
    assert "ab-test on model two_tower: running, revision 2" in text
    assert "control (control) alias champion 90 90.0%" in text
    assert "revision 1 at" in text and "by ci-bot: active (control 50, treatment 50) new ranker" in text

    result, text = _cli(home, "stop", "ab-test", "--reason", "enough data")
    assert result.exit_code == 0 and "stopped ab-test (revision 3)" in text
    assert _store(home).active(MODEL) is None and _store(home).history("ab-test")[-1]["reason"] == "enough data"
    result, text = _cli(home, "stop", "ab-test")
    assert result.exit_code == 0 and "already stopped" in text


def test_bad_input_exits_2_and_names_the_problem(home, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(AB.replace("weight: 50}\n  - {name: treatment", "weight: -5}\n  - {name: treatment"))
    result, text = _cli(home, "start", str(bad))
    assert result.exit_code == 2 and "bad.yaml: experiment field 'variants.0.weight'" in text
    missing_version = tmp_path / "v9.yaml"
    missing_version.write_text(AB.replace("version: 2", "version: 9"))
    result, text = _cli(home, "start", str(missing_version))
    assert result.exit_code == 2 and "no version 9 (versions: 1, 2, 3)" in text
    unset_alias = tmp_path / "alias.yaml"
    unset_alias.write_text(AB.replace("alias: champion", "alias: staging"))
    result, text = _cli(home, "start", str(unset_alias))
    assert result.exit_code == 2 and "uses alias 'staging' of two_tower, which is not set (aliases: champion (v1))" in text
    assert _store(home).names() == []

    good = tmp_path / "ab.yaml"
    good.write_text(AB)
    assert _cli(home, "start", str(good))[0].exit_code == 0
    other = tmp_path / "other.yaml"
    other.write_text(AB.replace("name: ab-test", "name: other-test"))
    result, text = _cli(home, "start", str(other))
    assert result.exit_code == 2 and "already has an active experiment, 'ab-test'" in text
    for command in ("show", "stop", "report"):
        result, text = _cli(home, command, "nope")
        assert result.exit_code == 2 and "no experiment 'nope' (experiments: ab-test)" in text, command


def test_report_shows_rates_verdicts_and_shadow(home, tmp_path):
    path = tmp_path / "ab.yaml"
    path.write_text(AB)
    assert _cli(home, "start", str(path))[0].exit_code == 0
    store, rng = _store(home), np.random.default_rng(0)
    exposures, outcomes, shadow = [], [], []
    for i in range(6000):
        variant = "treatment" if i % 2 else "control"
        exposures.append({"request_id": f"r{i}", "experiment": "ab-test", "revision": 1, "variant": variant,
                          "model_version": 2 if variant == "treatment" else 1, "user_id": f"u{i % 1500}", "k": 10,
                          "status": "ok", "latency_ms": 10.0})
        if rng.random() < (0.16 if variant == "treatment" else 0.10):
            outcomes.append({"request_id": f"r{i}", "user_id": f"u{i % 1500}", "event_type": "click"})
        if i < 100:
            shadow.append({"request_id": f"r{i}", "experiment": "ab-test", "shadow_version": 3, "live_version": 1,
                           "latency_ms": 30.0, "overlap": 0.5, "k": 10})
    store.record_exposures(exposures)
    store.record_outcomes(outcomes)
    store.record_shadow(shadow)
    result, text = _cli(home, "report", "ab-test", "--alpha", "0.05")
    assert result.exit_code == 0, result.output
    assert "ab-test on model two_tower (running): 6,000 exposures; intervals at 95%" in text
    assert "control (control): 3,000 exposures, 750 users" in text
    assert "treatment: 3,000 exposures, 750 users" in text
    click = next(line for line in result.output.splitlines() if line.strip().startswith("click") and "+" in line)
    assert "better" in click
    purchase = next(line for line in result.output.splitlines() if line.strip().startswith("purchase") and "+" in line)
    assert "no difference yet" in purchase and "1.000" in purchase
    assert "shadow: 100 mirrored requests, mean latency 30.0 ms, mean overlap@k with the live answer 0.50" in text


class _Serving(threading.Thread):
    """Writes exposures every 20 ms split by the active experiment's weights, as replicas would."""

    def __init__(self, home: str, canary_status: str = "ok"):
        super().__init__(daemon=True)
        self.store, self.canary_status, self.done = _store(home), canary_status, threading.Event()
        self.n = 0

    def run(self) -> None:
        while not self.done.wait(0.02):
            active = self.store.active(MODEL)
            if active is None:
                continue
            exp, revision = active
            rows = []
            for _ in range(20):
                self.n += 1
                variant = exp.assign(f"u{self.n}")
                rows.append({"request_id": f"r{self.n}", "experiment": exp.name, "revision": revision,
                             "variant": variant.name, "model_version": variant.version or 1,
                             "user_id": f"u{self.n}", "k": 10, "latency_ms": 5.0,
                             "status": self.canary_status if variant.name == "canary" else "ok"})
            self.store.record_exposures(rows)

    def __enter__(self) -> "_Serving":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.join()


def test_canary_passes_and_promotes(home):
    with _Serving(home):
        result, text = _cli(home, "canary", MODEL, "3", "--steps", "20,100", "--step-seconds", "0.4",
                            "--min-requests", "5", "--reason", "canary ok")
    assert result.exit_code == 0, result.output
    assert "canary of two_tower v3 against champion (v1): steps 20%, 100%" in text
    assert "step 1/2 (20%): healthy" in text and "step 2/2 (100%): healthy" in text
    assert "champion of two_tower: v1 -> v3 by ci-bot (canary ok)" in text
    registry = ModelRegistry(Layout.at(home))
    assert registry.aliases(MODEL) == {"champion": 3}
    assert _store(home).active(MODEL) is None
    assert [h["active"] for h in _store(home).history("canary-two_tower-v3")] == [True, True, False]


def test_canary_rolls_back_and_leaves_the_alias(home):
    with _Serving(home, canary_status="error"):
        result, text = _cli(home, "canary", MODEL, "2", "--steps", "50,100", "--step-seconds", "8",
                            "--min-requests", "5")
    assert result.exit_code == 1, result.output
    assert "canary rolled back at 50%: error rate 100.0% on canary" in text and "champion of two_tower stays at v1" in text
    assert ModelRegistry(Layout.at(home)).aliases(MODEL) == {"champion": 1}
    history = _store(home).history("canary-two_tower-v2")
    assert [(h["config"]["variants"][1]["weight"], h["active"]) for h in history] == [(50, True), (0, True), (0, False)]


def test_canary_input_errors_exit_2(home, tmp_path):
    for args, message in ((["9"], "no version 9"), (["1"], "already points at v1"),
                          (["2", "--steps", "5,x"], "--steps '5,x'"),
                          (["2", "--steps", "50,25"], "must increase"),
                          (["2", "--step-seconds", "0"], "canary field 'step_s'"),
                          (["2", "--alias", "staging"], "no alias 'staging'")):
        result, text = _cli(home, "canary", MODEL, *args)
        assert result.exit_code == 2 and message in text, (args, text)
    assert _store(home).names() == []
    path = tmp_path / "ab.yaml"
    path.write_text(AB)
    assert _cli(home, "start", str(path))[0].exit_code == 0
    result, text = _cli(home, "canary", MODEL, "2")
    assert result.exit_code == 2 and "already has an active experiment, 'ab-test' (revision 1)" in text
    assert "canary of" not in text and _store(home).names() == ["ab-test"]
