"""What the console's tabs show, read from the same stores the CLI reads (the registry, the
experiment store, the feature registry and states, the online store, Serve and Ray's Jobs
API), as plain dicts for the templates. Every function is blocking I/O: the routes run them
in a worker thread.
"""

from __future__ import annotations

import logging
import math
import sqlite3
from contextlib import closing
from datetime import datetime, timezone
from typing import Any

import pandas as pd

from aiplatform.core.errors import AIPlatformError, NotFoundError
from aiplatform.core.storage import Layout

log = logging.getLogger(__name__)

SUMMARY_METRICS = ("recall@10", "ndcg@10")
"""The columns of the versions table (the model card has every metric)."""
MAX_REDIS_COUNT = 1_000_000
MAX_JOBS = 30


def _age(seconds: float | None) -> str:
    if seconds is None or math.isnan(seconds):
        return "unknown"
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def _when(value: Any) -> str:
    if value is None or value == "":
        return "never"
    stamp = pd.Timestamp(value)
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    return f"{stamp:%Y-%m-%d %H:%M:%S} UTC ({_age((pd.Timestamp.now(tz='UTC') - stamp).total_seconds())} ago)"


# ---- models ----------------------------------------------------------------------------------
def models(layout: Layout, name: str | None) -> dict[str, Any]:
    """The versions of ``name`` (default: the first model), its aliases and their history."""
    from aiplatform.registry import ModelRegistry
    from aiplatform.serving.admin import _has_index

    registry = ModelRegistry(layout)
    names = registry.list_models()
    name = name or ("two_tower" if "two_tower" in names else (names[0] if names else ""))
    if not name:
        return {"names": [], "name": "", "versions": [], "aliases": {}, "history": {}}
    versions = registry.list_versions(name)
    if not versions:
        raise NotFoundError(f"model {name!r} is not registered (registered models: {', '.join(names) or 'none'})")
    aliases = registry.aliases(name)
    rows = []
    for mv in reversed(versions):
        model = mv.metrics.get("model") if isinstance(mv.metrics.get("model"), dict) else {}
        popularity = mv.metrics.get("popularity") if isinstance(mv.metrics.get("popularity"), dict) else {}
        rows.append({"version": mv.version, "created": f"{mv.created_at:%Y-%m-%d %H:%M}",
                     "metrics": {m: model.get(m) for m in SUMMARY_METRICS},
                     "popularity": popularity.get("recall@10"),
                     "aliases": sorted(a for a, v in aliases.items() if v == mv.version),
                     "indexed": _has_index(name, mv.version)})
    history = {a: list(reversed(registry.alias_history(name, a))) for a in sorted(aliases)}
    return {"names": names, "name": name, "versions": rows, "aliases": aliases, "history": history,
            "metric_names": SUMMARY_METRICS}


def model_card(layout: Layout, name: str, version: int) -> dict[str, Any]:
    """One version's card: every evaluation against the baselines, gates, alias moves, lineage."""
    from aiplatform.registry import ModelRegistry

    registry = ModelRegistry(layout)
    mv = registry.get(name, version)
    aliases = registry.aliases(name)
    tables = {k: v for k, v in mv.metrics.items() if isinstance(v, dict) and any("@" in c for c in v)}
    columns = sorted({c for v in tables.values() for c in v if isinstance(v.get(c), (int, float))},
                     key=lambda c: (c.split("@")[0], int(c.split("@")[1]) if c.split("@")[-1].isdigit() else 0))
    moves = [dict(m, alias=a) for a in aliases for m in registry.alias_history(name, a) if m["version"] == version]
    lineage = mv.lineage or {}
    code = lineage.get("code") or {}
    git = code.get("git") or {}
    service = lineage.get("feature_service") or {}
    rows = [("code", (f"git {git['sha'][:12]}{' (uncommitted changes)' if git.get('dirty') else ''}, " if git else "")
             + f"package {code.get('package', '?')}, source {code.get('source_digest', '?')}"),
            ("config hash", str(lineage.get("config_hash", "?"))),
            ("feature service", f"{service.get('name', '?')} (version {service.get('version', '?')})")]
    rows += [(f"view {v['name']}", f"version {v['version']}, Lance version {v['lance_version']} of {v['table']}")
             for v in service.get("views", [])]
    data = lineage.get("data") or {}
    if data:
        rows.append(("data", f"lake generation {data.get('lake_generation')} (imported {data.get('imported_at')})"))
    rows += [(k, str(lineage[k])) for k in ("events", "items", "examples", "run") if k in lineage]
    rows += [("checkpoint", mv.checkpoint_uri or "-"), ("artifact", mv.artifact_uri or "-")]
    scalars = {k: v for k, v in mv.metrics.items() if isinstance(v, (int, float, str, bool))}
    return {"name": name, "version": version, "created": f"{mv.created_at:%Y-%m-%d %H:%M} UTC",
            "aliases": sorted(a for a, v in aliases.items() if v == version), "tables": tables, "columns": columns,
            "scalars": scalars, "gates": [g.get("message", g) if isinstance(g, dict) else g
                                          for g in mv.metrics.get("gates") or []],
            "verdicts": mv.metrics.get("beats_baselines") or {}, "evaluation": lineage.get("evaluation") or {},
            "moves": sorted(moves, key=lambda m: m["set_at"]), "lineage": rows, "params": mv.params}


def rollback_target(layout: Layout, name: str, alias: str) -> tuple[int | None, int | None]:
    """(current, previous) versions of ``alias``: what a rollback would move it from and to."""
    from aiplatform.registry import ModelRegistry

    history = ModelRegistry(layout).alias_history(name, alias)
    if not history:
        return None, None
    return history[-1]["version"], history[-1].get("previous")


# ---- experiments -------------------------------------------------------------------------------
def experiments(layout: Layout, alpha: float = 0.05) -> list[dict[str, Any]]:
    """Every experiment, active ones first: variants and weights, the report with intervals,
    the shadow's overlap, and for a canary its current share and health per side."""
    from aiplatform.experiments.canary import CANARY, CONTROL
    from aiplatform.experiments.stats import latency_and_errors, variant_report
    from aiplatform.experiments.store import ExperimentStore

    store = ExperimentStore(layout)
    out = []
    for name in store.names():
        experiment = store.get(name)
        if experiment is None:
            continue
        history = store.history(name)
        exposures = store.exposures(name)
        outcomes = store.outcomes(set(exposures["request_id"])) if len(exposures) else store.outcomes(set())
        report = variant_report(exposures, outcomes, experiment.control_variant.name, alpha=alpha,
                                variants=[v.name for v in experiment.variants])
        shadow = store.shadow(name)
        shares = experiment.shares()
        canary = None
        if {v.name for v in experiment.variants} == {CONTROL, CANARY}:
            canary = {"share": shares.get(CANARY, 0.0), "health": latency_and_errors(exposures)}
        out.append({
            "name": name, "model": experiment.model_name, "active": store.is_active(name),
            "revision": history[-1]["revision"] if history else None,
            "variants": [{"name": v.name, "target": v.target, "weight": v.weight, "share": shares[v.name],
                          "control": v.name == experiment.control_variant.name} for v in experiment.variants],
            "exposures": len(exposures), "report": report, "alpha": alpha,
            "shadow": None if experiment.shadow is None else {
                "name": experiment.shadow.name, "target": experiment.shadow.target, "share": experiment.shadow.share,
                "mirrored": len(shadow), "overlap": float(shadow["overlap"].mean()) if len(shadow) else None,
                "latency_ms": float(shadow["latency_ms"].mean()) if len(shadow) else None},
            "canary": canary,
            "history": list(reversed(history))[:10],
        })
    out.sort(key=lambda e: (not e["active"], e["name"]))
    return out


# ---- features ----------------------------------------------------------------------------------
def online_rows(store: Any, service: Any) -> int | None:
    """Rows of ``service``'s current version in the online store (None when it cannot tell)."""
    from aiplatform.features.online import SQLiteOnlineStore

    ns = f"{service.name}__{service.version}"
    if isinstance(store, SQLiteOnlineStore):
        try:
            with closing(sqlite3.connect(f"file:{store.path}?mode=ro", uri=True, timeout=5)) as conn:
                return int(conn.execute(f'SELECT COUNT(*) FROM "fs_{ns}"').fetchone()[0])  # nosec B608  # a read-only connection; ns: a code-defined service
        except sqlite3.OperationalError:  # never materialized: no table yet
            return 0
    client, prefix = getattr(store, "client", None), getattr(store, "prefix", None)
    if client is None or prefix is None:
        return None
    from aiplatform.features.online_redis import _glob_escape

    count = 0
    for _ in client.scan_iter(match=_glob_escape(f"{prefix}:{ns}:") + "*", count=1000):
        count += 1
        if count >= MAX_REDIS_COUNT:
            break
    return count


def features(layout: Layout, features_module: str, served_service: str, online_store: str) -> dict[str, Any]:
    """Declared services and views with their versions (and what was applied), online row
    counts, freshness (the materialized watermark's age) and each view's last batch run."""
    from aiplatform.features.apply import load_definitions, read_registry
    from aiplatform.features.materialize import watermark_key
    from aiplatform.features.offline import read_state
    from aiplatform.features.online import open_online_store

    views, services, _ = load_definitions(features_module)
    applied = read_registry(layout)
    now = datetime.now(timezone.utc)
    store = open_online_store(online_store)
    service_rows = []
    for service in services:
        mark = store.get_meta(watermark_key(service))
        mark_ts = pd.Timestamp(int(mark), unit="us", tz="UTC") if mark else None
        service_rows.append({
            "name": service.name, "version": service.version, "served": service.name == served_service,
            "applied": (applied.get("services", {}).get(service.name) or {}).get("current"),
            "views": [v.name for v in service.views], "online_rows": online_rows(store, service),
            "watermark": _when(mark_ts) if mark_ts is not None else "never materialized",
            "freshness_s": (now - mark_ts.to_pydatetime()).total_seconds() if mark_ts is not None else None,
            "freshness": _age((now - mark_ts.to_pydatetime()).total_seconds()) if mark_ts is not None else "unknown",
        })
    view_rows = []
    for view in dict.fromkeys([*views, *(v for s in services for v in s.views)]):
        state = read_state(layout, view) or {}
        mark = state.get("watermark_us")
        view_rows.append({
            "name": view.name, "version": view.version, "entity": view.entity.name, "features": len(view.features),
            "applied": (applied.get("views", {}).get(view.name) or {}).get("current"),
            "last_run": _when(state.get("updated_at")) if state else "never run",
            "last_mode": state.get("last_mode", "-"), "lance_version": state.get("lance_version", "-"),
            "watermark": _when(pd.Timestamp(int(mark), unit="us", tz="UTC")) if mark else "-",
        })
    return {"module": features_module, "services": service_rows, "views": view_rows, "online_store": online_store}


# ---- serving -----------------------------------------------------------------------------------
def _application_name() -> str | None:
    try:
        from ray import serve

        return serve.get_replica_context().app_name
    except Exception:  # not inside a Serve replica (a unit test)
        return None


def cluster_traffic(application: str | None) -> dict[str, Any] | None:
    """Every replica's numbers (``web.serving_metrics``), or None when no node's metrics endpoint
    answered (a Ray without a metrics agent, a firewalled port): the tab then shows this replica's."""
    from aiplatform.observability.scrape import ray_metrics_urls, scrape
    from aiplatform.web.serving_metrics import cluster_traffic as summed

    if not application:
        return None
    try:
        urls = ray_metrics_urls()
    except Exception as exc:  # GCS unreachable
        log.debug("metrics endpoints: %s", exc)
        return None
    scraped = scrape(urls, timeout_s=3.0)
    if not urls or len(scraped.failed) == len(urls):
        log.info("no metrics endpoint answered (%s): the Serving tab shows this replica only", scraped.failed)
        return None
    return summed(application, scraped.samples, len(urls), scraped.failed)


def serving(replica: Any) -> dict[str, Any]:
    """Replicas per deployment (``serve.status()``), the application's traffic summed over all
    its replicas (or this replica's own window when the metrics endpoints do not answer), and
    what this replica serves."""
    from aiplatform.web.traffic import window

    apps: list[dict[str, Any]] = []
    error = ""
    try:
        from ray import serve

        status = serve.status()
        for app_name, app in status.applications.items():
            for dep_name, dep in app.deployments.items():
                replicas = {str(getattr(state, "value", state)): n for state, n in dep.replica_states.items()}
                apps.append({"application": app_name, "app_status": str(getattr(app.status, "value", app.status)),
                             "deployment": dep_name, "status": str(getattr(dep.status, "value", dep.status)),
                             "replicas": replicas, "running": replicas.get("RUNNING", 0)})
    except Exception as exc:  # Serve's controller unreachable: say so, show the rest
        error = f"serve.status() failed: {exc}"
    served = replica.versions.current
    local = window()  # registered with the middleware on first use: kept even when the cluster's numbers show
    cluster = cluster_traffic(_application_name())
    return {"apps": apps, "error": error, "cluster": cluster,
            "traffic": local.stats() if cluster is None else [], "window_s": local.window_s,
            "model": f"{served.version.name} v{served.version.version}", "variant": served.variant,
            "following": replica.versions.status().get("following"),
            "switch_error": replica.versions.status().get("switch_error"),
            "health": served.pipeline.serving_status()}


# ---- jobs --------------------------------------------------------------------------------------
def dashboard_url() -> str | None:
    """Ray's dashboard (where the Jobs API lives), from the cluster's own record of it; None
    when this Ray runs without one (``include_dashboard=False``, a minimal install)."""
    import os

    explicit = os.environ.get("RAY_DASHBOARD_ADDRESS") or ""
    if explicit:
        return explicit if "://" in explicit else f"http://{explicit}"
    try:
        from ray._private.services import get_webui_url_from_internal_kv

        url = get_webui_url_from_internal_kv()
    except Exception as exc:  # not connected, or Ray moved the helper
        log.debug("dashboard address: %s", exc)
        return None
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def job_kind(entrypoint: str) -> str:
    for kind in ("train", "features", "index"):
        if f"aiplatform.jobs.{kind}" in entrypoint or f"aiplatform {kind}" in entrypoint:
            return {"train": "training", "features": "features", "index": "index"}[kind]
    return "other"


def jobs() -> dict[str, Any]:
    """Recent jobs from Ray's Jobs API (newest first), or why there are none to show."""
    url = dashboard_url()
    if url is None:
        return {"available": False, "why": "this Ray cluster runs without its dashboard, which serves the Jobs API "
                                           "(a local Ray started with include_dashboard=False, or ray without the "
                                           "default extra); start Ray with the dashboard, or set "
                                           "RAY_DASHBOARD_ADDRESS where the application runs", "jobs": []}
    try:
        from ray.job_submission import JobSubmissionClient

        listed = JobSubmissionClient(url).list_jobs()
    except Exception as exc:
        return {"available": False, "why": f"the Jobs API at {url} did not answer: {exc}", "jobs": [], "url": url}
    rows = []
    for job in listed:
        started = job.start_time / 1000 if job.start_time else None
        ended = job.end_time / 1000 if job.end_time else None
        rows.append({"id": job.submission_id or job.job_id, "submission_id": job.submission_id,
                     "status": str(getattr(job.status, "value", job.status)), "kind": job_kind(job.entrypoint or ""),
                     "entrypoint": job.entrypoint or "", "message": job.message or "",
                     "started": _when(pd.Timestamp(started, unit="s", tz="UTC")) if started else "-",
                     "duration": _age((ended or datetime.now(timezone.utc).timestamp()) - started) if started else "-",
                     "sort": started or 0})
    rows.sort(key=lambda r: -r["sort"])
    return {"available": True, "url": url, "jobs": rows[:MAX_JOBS]}


def job_logs(submission_id: str) -> str:
    url = dashboard_url()
    if url is None:
        raise AIPlatformError("no Ray dashboard: the Jobs API is not available here")
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(url).get_job_logs(submission_id)
