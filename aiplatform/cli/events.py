"""`aiplatform events`: maintenance of the event log that POST /v1/events writes to."""

from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, console, err, fail
from aiplatform.core.errors import AIPlatformError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout

events_app = typer.Typer(help="The event log of real-time events (POST /v1/events).", no_args_is_help=True)


@events_app.command("compact")
def events_compact(home: Optional[str] = HomeOpt) -> None:
    """Compact the event log now (pushes and the feature run also do it by themselves).

    Merges its small files into sorted segments, quarantines events the features cannot encode
    (to eventlog/quarantine) and deletes replaced files past their grace period."""
    from aiplatform.data import eventlog
    from aiplatform.data.eventlog_compact import compact
    from aiplatform.features.server import open_store

    try:
        settings = Settings.load(home=home)
        layout = Layout.open(settings.home)
        result = compact(layout, lease=open_store(settings, layout), all_leaves=True, check_all=True)
    except AIPlatformError as exc:
        raise fail(exc)
    if result.skipped:
        err.print(f"[yellow]not compacted:[/] {result.skipped}; try again in a minute", highlight=False)
        raise typer.Exit(1)
    console.print(f"merged {result.merged_files} files into {len(result.segments)} segment(s); deleted "
                  f"{result.deleted} replaced file(s); {result.live_files} file(s) to read now", highlight=False)
    if result.quarantined or result.reasons:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(result.reasons.items()))
        err.print(f"[yellow]quarantined[/] {result.quarantined} event(s) ({reasons}) to "
                  f"{eventlog.quarantine_dir(layout)}", highlight=False)
