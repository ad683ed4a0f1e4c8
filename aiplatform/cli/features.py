"""`aiplatform features`: validate and version the declared feature views, and compute them."""

from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, console, fail, run_job
from aiplatform.core.errors import AIPlatformError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout

features_app = typer.Typer(help="Declared feature views: validate and version them (apply), compute them (run).")
DefsOpt = typer.Option("apps.shop.features", "--module", help="Python module declaring VIEWS, SERVICES, ON_DEMAND.")


@features_app.callback(invoke_without_command=True)
def features(ctx: typer.Context, home: Optional[str] = HomeOpt) -> None:
    """Compute features with Ray Data into the offline store and materialize them online.

    Without a subcommand: the quickstart pipeline (user_activity, item_popularity, online store).
    """
    if ctx.invoked_subcommand is not None:
        return
    from aiplatform.jobs.features import main

    run_job(main, home, [])


@features_app.command("apply")
def features_apply(module: str = DefsOpt, home: Optional[str] = HomeOpt) -> None:
    """Check the declared views against the lake's schemas and record their versions."""
    from rich.table import Table

    from aiplatform.features.apply import apply, load_definitions

    try:
        layout = Layout.open(Settings.load(home=home).home)
        report = apply(layout, *load_definitions(module))
    except AIPlatformError as exc:
        raise fail(exc)
    table = Table(title=f"feature definitions ({module})")
    for col in ("kind", "name", "version", "status", "features"):
        table.add_column(col)
    colours = {"new": "green", "changed": "yellow", "unchanged": "dim"}
    for e in report.entries:
        status = f"changed {e.previous} -> {e.version}" if e.status == "changed" else e.status
        feats = ", ".join(e.features[:6]) + (f", ... ({len(e.features)} in all)" if len(e.features) > 6 else "")
        table.add_row(e.kind, e.name, e.version, f"[{colours[e.status]}]{status}[/]", feats)
    console.print(table)
    console.print(f"registry: {report.registry_path}" if report.changed else "nothing changed")


@features_app.command("run")
def features_run(full: bool = typer.Option(False, "--full", help="Recompute every row (fixes late events)."),
                 module: str = DefsOpt, home: Optional[str] = HomeOpt) -> None:
    """Bring the offline table of every declared view up to date (incremental unless --full)."""
    from aiplatform.jobs.features import main

    run_job(main, home, ["--views", module] + (["--full"] if full else []))
