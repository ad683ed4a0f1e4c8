"""Index job: embed the catalogue with a registered model version into LanceDB.

    python -m aiplatform.jobs.index --home H [--model-name two_tower] [--alias champion]
"""

import argparse
import sys

from aiplatform.core.errors import AIPlatformError
from aiplatform.core.runtime import ensure_ray
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.data import lake
from aiplatform.registry.registry import ModelRegistry
from aiplatform.retrieval.index import build_item_index


def run_index(layout: Layout, model_name: str = "two_tower", alias: str = "champion",
              version: int | None = None) -> str:
    """Build the vector table for ``alias`` (or an explicit version); returns its name."""
    registry = ModelRegistry(layout)
    mv = registry.get(model_name, version) if version else registry.get_by_alias(model_name, alias)
    # The registry records the index's kind and its recall@10 against exact search (measured now).
    return build_item_index(layout.vectors, mv.name, mv.version, mv.artifact_uri, lake.read_items(layout),
                            registry=registry)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m aiplatform.jobs.index", description=__doc__)
    parser.add_argument("--home")
    parser.add_argument("--model-name", default="two_tower")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--version", type=int)
    args = parser.parse_args(argv)
    try:
        settings = Settings.load(home=args.home)
        layout = Layout.open(settings.home)  # a root that cannot be used fails here, before any work
        ensure_ray(settings, quiet=False)
        table = run_index(layout, args.model_name, args.alias, args.version)
    except AIPlatformError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"indexed into LanceDB table {table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
