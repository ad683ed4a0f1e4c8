"""Feature job: lake events -> offline store (Lance) -> online store.

    python -m aiplatform.jobs.features --home H
"""

import argparse
import sys

from aiplatform.core.errors import AIPlatformError, UserInputError
from aiplatform.core.runtime import ensure_ray
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.features.pipeline import FeatureRunSummary, run_feature_pipeline


def run_features(layout: Layout) -> FeatureRunSummary:
    if not lake.has_data(layout):
        raise UserInputError(f"no data in the lake at {layout.lake}: run `aiplatform data import` first")
    return run_feature_pipeline(layout)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiplatform.jobs.features", description=__doc__)
    parser.add_argument("--home")
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(home=args.home)
        ensure_ray(settings, quiet=False)
        summary = run_features(Layout.at(settings.home))
    except AIPlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
