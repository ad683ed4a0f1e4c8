"""Feature job: lake events -> offline store (Lance) -> online store.

    python -m aiplatform.jobs.features --home H
    python -m aiplatform.jobs.features --home H --views apps.shop.features [--full]

Without ``--views`` it runs the served feature service's views (incremental), materializes them
online and refreshes the popular-items list. With ``--views`` it runs the declared views of
that module into their versioned offline tables (incremental unless ``--full``), nothing else.
"""

import argparse
import sys

import pandas as pd

from aiplatform.core.errors import AIPlatformError, UserInputError
from aiplatform.core.runtime import ensure_ray
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.features.pipeline import FeatureRunSummary, run_feature_pipeline


def run_features(layout: Layout, settings: Settings | None = None) -> FeatureRunSummary:
    if not lake.has_data(layout):
        raise UserInputError(f"no data in the lake at {layout.lake}: run `aiplatform data import` first")
    return run_feature_pipeline(layout, settings=settings)


def _run_declared(layout: Layout, module: str, full: bool, settings: Settings) -> int:
    from aiplatform.features.apply import load_definitions, validate
    from aiplatform.features.offline import run_view

    if not lake.has_data(layout):
        raise UserInputError(f"no data in the lake at {layout.lake}: run `aiplatform data import` first")
    views, services, on_demand = load_definitions(module)
    validate(layout, views, services, on_demand)
    ensure_ray(settings, quiet=False)
    print(f"{'view':<20} {'version':<13} {'mode':<12} {'rows':>10} {'watermark':<27} {'lance':>5} {'secs':>6}")
    for view in views:
        s = run_view(layout, view, full=full)
        mark = "-" if s.watermark_after is None else str(pd.Timestamp(s.watermark_after, unit="us", tz="UTC"))
        print(f"{s.view:<20} {s.version:<13} {s.mode:<12} {s.rows_written:>10,} {mark:<27} "
              f"{s.lance_version if s.lance_version is not None else '-':>5} {s.duration_s:>6.1f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiplatform.jobs.features", description=__doc__)
    parser.add_argument("--home")
    parser.add_argument("--views", help="module declaring VIEWS (e.g. apps.shop.features): run those views")
    parser.add_argument("--full", action="store_true", help="with --views: recompute every row")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(home=args.home)
        if args.views:
            return _run_declared(Layout.open(settings.home), args.views, args.full, settings)
        ensure_ray(settings, quiet=False)
        summary = run_features(Layout.open(settings.home), settings)
    except AIPlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    if summary.events_quarantined or summary.quarantine_reasons:
        from aiplatform.data import eventlog

        reasons = ", ".join(f"{n} {r}" for r, n in sorted((summary.quarantine_reasons or {}).items()))
        print(f"quarantined {summary.events_quarantined} event(s) of the event log that the features cannot "
              f"encode ({reasons}): see {eventlog.quarantine_dir(Layout.at(settings.home))}; every other user's "
              "features were computed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
