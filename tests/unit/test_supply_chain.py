"""Supply chain: bandit over the code, and the locks in step with pyproject.toml.

The locks (requirements/*.lock, written by `make lock`) are what `make setup`, CI and the Docker
image install, so a dependency added to pyproject.toml but not re-locked would silently be
missing (or, with --require-hashes, fail the install): these tests say so first, and name the fix.
"""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
REQS = ROOT / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)(?:\s*\\)?$")
FIX = "run `make lock` (after any change to pyproject.toml's dependencies) and commit requirements/"


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _lock(name: str) -> dict[str, tuple[Version, list[str]]]:
    """name -> (pinned version, its sha256 hashes) of one lock file."""
    pins: dict[str, tuple[Version, list[str]]] = {}
    current = None
    for line in (REQS / name).read_text().splitlines():
        m = PIN.match(line.strip())
        if m:
            current = canonicalize_name(m.group(1))
            pins[current] = (Version(m.group(2)), [])
        elif line.strip().startswith("--hash=sha256:") and current:
            pins[current][1].append(line.strip().removeprefix("--hash=sha256:").rstrip(" \\"))
        elif line and not line.startswith((" ", "#")):
            pytest.fail(f"requirements/{name}: unexpected line {line!r}: every entry is name==version")
    return pins


def _missing(requirements: list[str], pins: dict[str, tuple[Version, list[str]]]) -> list[str]:
    problems = []
    for text in requirements:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"python_version": "3.11"}):
            continue
        got = pins.get(canonicalize_name(req.name))
        if got is None:
            problems.append(f"{text}: not in the lock")
        elif not req.specifier.contains(got[0], prereleases=True):
            problems.append(f"{text}: the lock pins {got[0]}")
    return problems


# ------------------------------------------------------------------------------------ bandit


def test_bandit_finds_nothing_of_medium_or_high_severity():
    """bandit (pyproject's [tool.bandit]) over the package, the example app and cluster/*.py."""
    proc = subprocess.run(
        [sys.executable, "-m", "bandit", "-c", "pyproject.toml", "-r", "aiplatform", "apps", "cluster",
         "-f", "json", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.stdout.strip(), f"bandit did not run (pip install -e '.[test]'): {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    assert not report["errors"], f"bandit could not scan: {report['errors']}"
    assert report["metrics"]["_totals"]["loc"] > 10_000, "bandit scanned far less code than expected"
    findings = [f"{r['filename']}:{r['line_number']}: {r['test_id']} {r['issue_severity']}/"
                f"{r['issue_confidence']} {r['issue_text']}"
                for r in report["results"] if r["issue_severity"] in ("MEDIUM", "HIGH")]
    assert not findings, ("bandit findings of medium or high severity: fix each, or, for a false "
                          "positive, add `# nosec BXXX  # why` on its line:\n" + "\n".join(findings))


# ------------------------------------------------------------------------------------- locks


def test_dev_lock_covers_every_dependency_and_extra():
    project = _pyproject()
    pins = _lock("dev.lock") | _lock("torch-cpu.lock")
    wanted = (project["project"]["dependencies"] + project["project"]["optional-dependencies"]["test"]
              + project["project"]["optional-dependencies"]["bench"] + project["build-system"]["requires"])
    problems = _missing(wanted, pins)
    assert not problems, "pyproject.toml and requirements/dev.lock disagree: " + FIX + "\n" + "\n".join(problems)


def test_runtime_lock_covers_the_package_dependencies():
    """The Docker image installs requirements/runtime.lock, then torch's build for its variant."""
    project = _pyproject()
    wanted = [d for d in project["project"]["dependencies"] + project["build-system"]["requires"]
              if canonicalize_name(Requirement(d).name) != "torch"]
    problems = _missing(wanted, _lock("runtime.lock"))
    assert not problems, "pyproject.toml and requirements/runtime.lock disagree: " + FIX + "\n" + "\n".join(problems)
    assert "torch" not in _lock("runtime.lock"), "torch's build differs per image variant: keep it out"


@pytest.mark.parametrize("name", ["dev.lock", "runtime.lock", "torch-cpu.lock"])
def test_every_pin_carries_sha256_hashes(name):
    """pip's --require-hashes refuses a file whose digest is not in the lock, and a lock line
    without a hash at all: both would fail `make setup`."""
    pins = _lock(name)
    assert pins, f"requirements/{name} is empty: {FIX}"
    bare = [n for n, (_, hashes) in pins.items() if not hashes]
    assert not bare, f"requirements/{name}: pins without a hash: {bare}: {FIX}"
    bad = [h for _, hashes in pins.values() for h in hashes if not re.fullmatch(r"[0-9a-f]{64}", h)]
    assert not bad, f"requirements/{name}: malformed sha256 digests: {bad[:3]}"


def test_locked_torch_is_the_cpu_build_the_dockerfile_and_package_expect():
    (torch_version, _), = _lock("torch-cpu.lock").values()
    assert torch_version.local == "cpu", "the CPU build: PyPI's Linux torch is a multi-GB CUDA build"
    assert f"torch=={torch_version}" in (REQS / "torch-cpu.in").read_text(), "re-run `make lock`"
    dockerfile = (ROOT / "cluster" / "docker" / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={torch_version.public}" in dockerfile, "the image installs the same torch"
    dev = _lock("dev.lock")
    assert "torch" not in dev and not any(n.startswith("nvidia-") for n in dev), \
        "the dev lock must not pull torch's CUDA build or its nvidia-* libraries"


def test_makefile_installs_from_the_locks_and_reinstalls_when_they_change():
    makefile = (ROOT / "Makefile").read_text()
    stamp = re.search(r"^STAMP\s*:=\s*(.+)$", makefile, re.M).group(1)
    locks = re.search(r"^LOCKS\s*:=\s*(.+)$", makefile, re.M).group(1).split()
    assert "$(LOCKS)" in stamp and "pyproject.toml" in stamp, "the stamp must change with the locks"
    assert set(locks) == {f"requirements/{p.name}" for p in REQS.glob("*.lock")}
    assert "--require-hashes -r requirements/dev.lock" in makefile
    assert "--no-deps --no-build-isolation -e ." in makefile


# ------------------------------------------------------------------------------------- audit


@pytest.fixture()
def audit(monkeypatch):
    spec = importlib.util.spec_from_file_location("ci_audit", ROOT / ".ci" / "audit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.delenv("AUDIT_STRICT", raising=False)
    return module


def test_audit_reads_every_pin_of_the_locks(audit):
    pins = audit.pins([str(REQS / "dev.lock"), str(REQS / "torch-cpu.lock")])
    assert pins["ray"] == str(_lock("dev.lock")["ray"][0]) and pins["torch"].endswith("+cpu")
    assert len(pins) == len(_lock("dev.lock")) + 1


def test_audit_never_reports_skipped_packages_as_a_pass(audit, monkeypatch, capsys):
    """pip-audit prints 'No known vulnerabilities found' and exits 0 when its service knows none
    of the packages: the script must call that incomplete, and fail only where asked to."""
    locks = [str(REQS / "torch-cpu.lock")]
    monkeypatch.setattr(audit, "pip_audit", lambda locks, service: ([], ["torch"], ""))
    monkeypatch.setattr(audit, "newest_release_check", lambda packages: ([], ["torch==2.13.0+cpu"]))
    assert audit.main(locks) == 0
    out = capsys.readouterr().out
    assert "INCOMPLETE" in out and "NOT audited (1" in out and "torch==2.13.0+cpu" in out
    monkeypatch.setenv("AUDIT_STRICT", "1")
    assert audit.main(locks) == 2


def test_audit_fails_on_a_known_vulnerability(audit, monkeypatch, capsys):
    locks = [str(REQS / "torch-cpu.lock")]
    monkeypatch.setattr(audit, "pip_audit", lambda locks, service: ([("torch", "2.13.0+cpu", "PYSEC-0")], [], ""))
    assert audit.main(locks) == 1
    assert "VULNERABLE torch==2.13.0+cpu: PYSEC-0" in capsys.readouterr().out
    # A service that cannot be reached, then the newest-release check finding one.
    monkeypatch.setattr(audit, "pip_audit", lambda locks, service: ([], [], "Failed to resolve"))
    monkeypatch.setattr(audit, "newest_release_check", lambda packages: ([("torch", "2.13.0+cpu", "GHSA-x")], []))
    assert audit.main(locks) == 1
