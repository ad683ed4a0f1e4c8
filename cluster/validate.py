"""Strict validation of the rendered Kubernetes manifests, with no cluster needed.

    .venv/bin/python cluster/validate.py                       # every overlay
    .venv/bin/python cluster/validate.py cluster/kubernetes/overlays/prod

Each overlay is rendered with ``kubectl kustomize`` and every object is checked the way the API
server would, with unknown fields as errors (like ``kubeconform -strict``):

- ``ray.io/v1`` kinds (RayCluster, RayJob, RayService, RayCronJob) against the openAPIV3Schema
  of KubeRay's CRDs vendored in ``cluster/crds/``, turned into strict JSON Schema: every object
  schema that lists ``properties`` (and does not preserve unknown fields) gets
  ``additionalProperties: false``; ``x-kubernetes-int-or-string`` becomes integer-or-string,
  ``nullable`` adds null, and list types ``set``/``map`` must hold unique items/keys. (The CEL
  rules, ``x-kubernetes-validations``, are not evaluated.)
- core kinds (ConfigMap, Service, Deployment, ServiceAccount, ...) with ``kubernetes-validate``'s
  bundled schemas of Kubernetes ``K8S_VERSION``, strict mode;
- Argo CD ``Application``s (cluster/argocd/): a structural check (their CRD is not vendored).

Ray objects that pass their schema also go through the checks the KubeRay operator makes when
it reconciles them (name lengths, replica bounds, cron schedule, ...): ``operator_errors``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterable

import jsonschema
import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CRD_DIR = HERE / "crds"
OVERLAYS_DIR = HERE / "kubernetes" / "overlays"
ARGOCD_DIR = HERE / "argocd"
K8S_VERSION = "1.32.0"
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


# ---------------------------------------------------------------- OpenAPI v3 -> strict JSON Schema

_SCHEMA_MAPS = ("properties", "patternProperties", "definitions")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf")
_SCHEMA_ONE = ("items", "additionalProperties", "not")


def strict_schema(node: Any) -> Any:
    """An OpenAPI v3 structural schema (a CRD's openAPIV3Schema) as strict JSON Schema."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [strict_schema(sub) for sub in value]
        elif key in _SCHEMA_ONE and isinstance(value, dict):
            out[key] = strict_schema(value)
        else:
            out[key] = value  # data (default, enum, example) or a plain keyword
    if out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _list_type(validator, list_type, instance, schema):
    """``x-kubernetes-list-type``: ``set`` items are unique, ``map`` items unique by their keys."""
    if not validator.is_type(instance, "array"):
        return
    if list_type == "set":
        seen = []
        for item in instance:
            if item in seen:
                yield jsonschema.ValidationError(f"duplicate item {item!r} in a list of type set")
            seen.append(item)
    elif list_type == "map":
        keys = schema.get("x-kubernetes-list-map-keys") or []
        seen_keys = set()
        for item in instance:
            if not isinstance(item, dict):
                continue
            # A key left out takes its default (e.g. a port's protocol: TCP).
            props = (schema.get("items") or {}).get("properties") or {}
            k = tuple(item.get(key, props.get(key, {}).get("default")) for key in keys)
            if k in seen_keys:
                yield jsonschema.ValidationError(
                    f"duplicate entry {dict(zip(keys, k))} in a list keyed by {', '.join(keys)}")
            seen_keys.add(k)


StrictValidator = jsonschema.validators.extend(
    jsonschema.Draft4Validator, {"x-kubernetes-list-type": _list_type})


def _load_crd(path: Path) -> Any:
    """A CRD file, parsed. The 4 MB of YAML take seconds to parse, so the parsed document is
    cached as JSON (keyed by the file's hash) in the user's cache folder."""
    data = path.read_bytes()
    cache_dir = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "aiplatform-crds"
    cached = cache_dir / f"{path.stem}-{hashlib.sha256(data).hexdigest()[:16]}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    doc = yaml.load(data, Loader=_Loader)  # nosec B506  # _Loader is yaml's (C)SafeLoader
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(cached)  # atomic: a concurrent reader sees the old state or the whole file
    except OSError:
        pass  # no writable cache: parse again next time
    return doc


@functools.lru_cache(maxsize=None)
def crd_validators(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], Any]:
    """{(apiVersion, kind): validator} for every served version of every CRD in ``crd_dir``."""
    out = {}
    for path in sorted(crd_dir.glob("*.yaml")):
        crd = _load_crd(path)
        if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
            continue
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if version.get("served", True):
                schema = strict_schema(version["schema"]["openAPIV3Schema"])
                out[(f"{group}/{version['name']}", kind)] = StrictValidator(schema)
    return out


# ---------------------------------------------------------------- what the operator checks too

# KubeRay v1.7's own limits (ray-operator/controllers/ray/utils/{constant,validation}.go): the
# operator refuses these objects at reconcile time, after the API server has accepted them.
MAX_NAME = {"RayCluster": 53, "RayService": 47, "RayJob": 47, "RayCronJob": 36}
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RAY_START_RESOURCES = ("num-cpus", "num-gpus", "memory", "resources")


def _cluster_spec_errors(spec: dict, where: str) -> list[str]:
    errors = []
    groups = [("head", spec.get("headGroupSpec") or {})]
    groups += [(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs") or []]
    for name, group in groups:
        params = group.get("rayStartParams") or {}
        if group.get("resources") and any(params.get(k) for k in _RAY_START_RESOURCES):
            errors.append(f"{where}{name}: resources set both in rayStartParams and in resources")
        if "labels" in params:
            errors.append(f"{where}{name}: rayStartParams.labels is not supported; use labels")
        lo, hi = group.get("minReplicas"), group.get("maxReplicas")
        if lo is not None and hi is not None and lo > hi:
            errors.append(f"{where}{name}: minReplicas {lo} > maxReplicas {hi}")
    return errors


def operator_errors(obj: dict) -> list[str]:
    """Problems the KubeRay operator would report for a ray.io object the schema accepts."""
    kind, name = obj.get("kind", ""), (obj.get("metadata") or {}).get("name", "")
    spec = obj.get("spec") or {}
    errors = []
    if kind in MAX_NAME and len(name) > MAX_NAME[kind]:
        errors.append(f"metadata.name: a {kind} name has at most {MAX_NAME[kind]} characters")
    if kind in ("RayCluster", "RayService") and not DNS1035_LABEL.match(name):
        errors.append(f"metadata.name: a {kind} name must be a DNS-1035 label")
    if kind == "RayCluster":
        errors += _cluster_spec_errors(spec, "spec: group ")
    elif kind == "RayService":
        errors += _cluster_spec_errors(spec.get("rayClusterConfig") or {}, "spec.rayClusterConfig: group ")
    jobs = [("spec", spec)] if kind == "RayJob" else [("spec.jobTemplate", spec.get("jobTemplate") or {})] \
        if kind == "RayCronJob" else []
    for path, job in jobs:
        if job.get("rayClusterSpec") is None and not job.get("clusterSelector"):
            errors.append(f"{path}: one of rayClusterSpec or clusterSelector must be set")
        for field in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
            if field in job and job[field] <= 0:
                errors.append(f"{path}.{field} must be positive")
        if job.get("ttlSecondsAfterFinished", 0) < 0:
            errors.append(f"{path}.ttlSecondsAfterFinished must not be negative")
        if job.get("submissionMode") == "SidecarMode" and job.get("submitterPodTemplate"):
            errors.append(f"{path}: SidecarMode does not take a submitterPodTemplate")
        if job.get("rayClusterSpec"):
            errors += _cluster_spec_errors(job["rayClusterSpec"], f"{path}.rayClusterSpec: group ")
    if kind == "RayCronJob":
        schedule = spec.get("schedule", "")
        if "TZ" in schedule or len(schedule.split()) != 5:
            errors.append(f"spec.schedule {schedule!r}: five cron fields, time zone in spec.timeZone")
    return errors


# ---------------------------------------------------------------- validation of one object


def _path(error: jsonschema.ValidationError) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path) or "(root)"


def _metadata_errors(obj: dict) -> list[str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return ["metadata.name is missing"]
    name = meta["name"]
    if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        return [f"metadata.name {name!r} is not a valid DNS-1123 name"]
    return []


def validate_object(obj: dict, k8s_version: str = K8S_VERSION) -> list[str]:
    """Every problem found in one manifest, as 'Kind/name: path: message' lines; [] when valid."""
    api, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    name = (obj.get("metadata") or {}).get("name", "?")
    where = f"{kind}/{name}"
    errors = [f"{where}: {e}" for e in _metadata_errors(obj)]
    if api.startswith("ray.io/"):
        validator = crd_validators().get((api, kind))
        if validator is None:
            return errors + [f"{where}: no vendored CRD serves {api} {kind} (cluster/crds/)"]
        schema_errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        errors += [f"{where}: {_path(err)}: {err.message}" for err in schema_errors]
        if not schema_errors:  # the operator's checks assume a well-formed object
            errors += [f"{where}: {e}" for e in operator_errors(obj)]
        return errors
    if api.startswith("argoproj.io/"):
        return errors + [f"{where}: {e}" for e in argocd_application_errors(obj)]
    import kubernetes_validate  # bundles the Kubernetes JSON schemas

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as err:
        errors.append(f"{where}: {_path(err)}: {err.message}")
    except kubernetes_validate.SchemaNotFoundError as err:
        errors.append(f"{where}: {err.message}")
    return errors


# ---------------------------------------------------------------- Argo CD Applications

_APP_SPEC_KEYS = {"project", "source", "sources", "destination", "syncPolicy", "ignoreDifferences",
                  "info", "revisionHistoryLimit", "sourceHydrator"}
_APP_SOURCE_KEYS = {"repoURL", "path", "targetRevision", "kustomize", "helm", "directory", "plugin",
                    "chart", "ref", "name"}
_APP_DEST_KEYS = {"server", "name", "namespace"}
_APP_SYNC_KEYS = {"automated", "syncOptions", "retry", "managedNamespaceMetadata"}


def argocd_application_errors(app: dict, repo: Path = REPO) -> list[str]:
    """Structural check of an Argo CD Application whose source is an overlay of this repo."""
    errors = []
    if app.get("apiVersion") != "argoproj.io/v1alpha1" or app.get("kind") != "Application":
        return [f"expected argoproj.io/v1alpha1 Application, got {app.get('apiVersion')} {app.get('kind')}"]
    spec = app.get("spec") or {}
    for field, allowed in (("spec", _APP_SPEC_KEYS), ("spec.source", _APP_SOURCE_KEYS),
                           ("spec.destination", _APP_DEST_KEYS), ("spec.syncPolicy", _APP_SYNC_KEYS)):
        part = spec if field == "spec" else spec.get(field.split(".")[1]) or {}
        errors += [f"{field}.{k}: unknown field" for k in sorted(set(part) - allowed)]
    for field in ("project", "source", "destination"):
        if not spec.get(field):
            errors.append(f"spec.{field} is missing")
    source, dest = spec.get("source") or {}, spec.get("destination") or {}
    if not source.get("repoURL"):
        errors.append("spec.source.repoURL is missing")
    path = source.get("path")
    if not path or not (repo / path / "kustomization.yaml").is_file():
        errors.append(f"spec.source.path {path!r} is not a kustomization in this repository")
    if not (dest.get("server") or dest.get("name")):
        errors.append("spec.destination needs server or name")
    if not dest.get("namespace"):
        errors.append("spec.destination.namespace is missing")
    return errors


# ---------------------------------------------------------------- rendering


def kubectl() -> str | None:
    return shutil.which("kubectl")


def render_overlay(overlay: Path) -> list[dict]:
    """The objects ``kubectl kustomize overlay`` renders."""
    exe = kubectl()
    if exe is None:
        raise RuntimeError("kubectl not found: it renders the Kustomize overlays (kubectl kustomize)")
    proc = subprocess.run([exe, "kustomize", str(overlay)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"kubectl kustomize {overlay} failed:\n{proc.stderr}")
    return [d for d in yaml.load_all(proc.stdout, Loader=_Loader) if d]


def overlays() -> list[Path]:
    return sorted(p for p in OVERLAYS_DIR.iterdir() if (p / "kustomization.yaml").is_file())


def validate_all(paths: Iterable[Path]) -> list[str]:
    errors = []
    for overlay in paths:
        for obj in render_overlay(overlay):
            errors += [f"{overlay.name}: {e}" for e in validate_object(obj)]
    for app_file in sorted(ARGOCD_DIR.glob("*.yaml")):
        for obj in yaml.load_all(app_file.read_text(), Loader=_Loader):
            if obj:
                errors += [f"{app_file.name}: {e}" for e in validate_object(obj)]
    return errors


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    paths = [Path(a) for a in args] or overlays()
    errors = validate_all(paths)
    for e in errors:
        print(e, file=sys.stderr)
    print(f"{len(errors)} error(s) in {', '.join(p.name for p in paths)} and cluster/argocd/"
          if errors else f"valid: {', '.join(p.name for p in paths)} and cluster/argocd/")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
