"""`python -m aiplatform.cli`: the `aiplatform` command, for an environment without the console
script on its PATH (tests, benchmarks and cluster/render.py run it this way)."""

import sys

from aiplatform.cli import app

if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
