"""`make audit`: pip-audit over the locks, and never a silent pass.

pip-audit asks a vulnerability service about each pinned package. Where none answers (on the
project's machines api.osv.dev does not resolve, and PyPI's per-release JSON answers 404, which
pip-audit reports as "Dependency not found" yet still prints "No known vulnerabilities found" and
exits 0), this script says so and names what was not audited. It then asks PyPI's project JSON,
which does answer there: its `vulnerabilities` list is about the newest release only, so it
audits exactly the packages that the locks pin at their newest release.

Exit status: 1 for a known vulnerability not justified in IGNORED (and the README's "Supply
chain" section); 0 otherwise, including when packages could not be audited (it prints which),
unless AUDIT_STRICT=1, which turns an incomplete audit into exit 2.
"""
from __future__ import annotations

import json
import os
import re
import subprocess  # nosec B404  # runs pip-audit, a fixed argument list
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor

# Vulnerability id -> why it does not apply here (keep the README's "Supply chain" list in step).
IGNORED: dict[str, str] = {}

SERVICES = ("osv", "pypi")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)", re.M)


def pins(locks: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for lock in locks:
        with open(lock) as f:
            out.update((name.lower().replace("_", "-"), ver) for name, ver in PIN.findall(f.read()))
    return out


def pip_audit(locks: list[str], service: str) -> tuple[list[tuple[str, str, str]], list[str], str]:
    """(vulnerabilities as (package, version, id), packages not audited, error or "")."""
    with tempfile.TemporaryDirectory() as tmp:
        report = os.path.join(tmp, "report.json")
        cmd = [sys.executable, "-m", "pip_audit", "--disable-pip", "--require-hashes",
               "--progress-spinner", "off", "--format", "json", "--output", report,
               "--vulnerability-service", service]
        for lock in locks:
            cmd += ["-r", lock]
        for vid in IGNORED:
            cmd += ["--ignore-vuln", vid]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # nosec B603
        if not os.path.exists(report):
            lines = (proc.stderr or proc.stdout).strip().splitlines() or [f"exit {proc.returncode}"]
            return [], [], lines[-1][:300]
        with open(report) as f:
            deps = json.load(f)["dependencies"]
    vulns = [(d["name"], d["version"], v["id"]) for d in deps for v in d.get("vulns", [])]
    skipped = [d["name"] for d in deps if "skip_reason" in d]
    return vulns, skipped, ""


def newest_release_check(packages: dict[str, str]) -> tuple[list[tuple[str, str, str]], list[str]]:
    """PyPI project JSON: (vulnerabilities of pins at the newest release, pins not checked)."""
    def one(item: tuple[str, str]) -> tuple[str, str, list[str] | None]:
        name, version = item
        try:
            with urllib.request.urlopen(f"https://pypi.org/pypi/{name}/json", timeout=60) as r:  # nosec B310  # fixed https URL
                doc = json.load(r)
        except (OSError, ValueError):
            return name, version, None
        if doc["info"]["version"] != version:
            return name, version, None
        return name, version, [v["id"] for v in doc.get("vulnerabilities") or []
                               if v["id"] not in IGNORED and not (set(v.get("aliases") or []) & set(IGNORED))]
    vulns, unchecked = [], []
    with ThreadPoolExecutor(8) as pool:
        for name, version, ids in pool.map(one, sorted(packages.items())):
            if ids is None:
                unchecked.append(f"{name}=={version}")
            else:
                vulns += [(name, version, vid) for vid in ids]
    return vulns, unchecked


def main(locks: list[str]) -> int:
    packages = pins(locks)
    print(f"pip-audit: {len(packages)} locked packages in {', '.join(locks)}")
    for service in SERVICES:
        vulns, skipped, error = pip_audit(locks, service)
        if vulns:
            for name, version, vid in vulns:
                print(f"  VULNERABLE {name}=={version}: {vid}")
            print("Upgrade (edit pyproject.toml, `make lock`) or justify each id in .ci/audit.py's "
                  "IGNORED and the README's 'Supply chain' section.")
            return 1
        if error:
            print(f"  service {service}: could not be reached ({error})")
        elif skipped:
            print(f"  service {service}: answered for {len(packages) - len(skipped)} of "
                  f"{len(packages)}; {len(skipped)} could not be audited (pip-audit still prints "
                  "'No known vulnerabilities found')")
        else:
            print(f"  service {service}: no known vulnerability in any locked package")
            return 0
    print("pip-audit could not reach a vulnerability service: its audit is INCOMPLETE.")
    vulns, unchecked = newest_release_check(packages)
    for name, version, vid in vulns:
        print(f"  VULNERABLE {name}=={version}: {vid} (PyPI's advisories for its newest release)")
    if vulns:
        return 1
    print(f"  PyPI's advisories for the newest release: {len(packages) - len(unchecked)} of "
          f"{len(packages)} packages are pinned at it, none with a known vulnerability.")
    print(f"  NOT audited ({len(unchecked)}: older than the newest release, or no answer): "
          + ", ".join(unchecked))
    return 2 if os.environ.get("AUDIT_STRICT") == "1" else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or ["requirements/dev.lock", "requirements/torch-cpu.lock"]))
