"""`aiplatform train` and `aiplatform index`: the training and index jobs, run in-process.

They hand their options to the same entry points that `ray job submit -- python -m
aiplatform.jobs.train` (and `.index`) runs, so a cluster job and a laptop run cannot drift apart.
"""

from pathlib import Path
from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, run_job


def train(
    config: Optional[Path] = typer.Option(None, help="Training config YAML."),
    epochs: Optional[int] = typer.Option(None, min=1),
    workers: Optional[int] = typer.Option(None, min=1),
    promote: bool = typer.Option(False, "--promote", help="Make it champion if it passes the gates."),
    fail_on_gate: bool = typer.Option(False, "--fail-on-gate", help="Exit 3 when a quality gate fails."),
    resume: Optional[str] = typer.Option(None, help="Continue this run (name under <home>/runs)."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Train the two-tower model and the candidate ranker, evaluate the pipeline against
    popularity, co-occurrence and EASE, apply the quality gates and register a model
    (the same code `ray job submit` runs)."""
    from aiplatform.jobs.train import main

    extra = (["--config", str(config)] if config else []) + (["--epochs", str(epochs)] if epochs else []) \
        + (["--num-workers", str(workers)] if workers else []) + (["--promote"] if promote else []) \
        + (["--fail-on-gate"] if fail_on_gate else []) + (["--resume", resume] if resume else [])
    run_job(main, home, extra)


def index(home: Optional[str] = HomeOpt, alias: str = typer.Option("champion")) -> None:
    """Embed the catalogue with a registered model into LanceDB."""
    from aiplatform.jobs.index import main

    run_job(main, home, ["--alias", alias])
