"""`aiplatform quickstart`: every stage on this machine, ending in a running recommendation API."""

from pathlib import Path
from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, console, fail
from aiplatform.core.errors import AIPlatformError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout


def quickstart(
    events: Optional[Path] = typer.Option(None, help="Your events file (Parquet or CSV). Needs --items."),
    items: Optional[Path] = typer.Option(None, help="Your items file (Parquet or CSV)."),
    users: Optional[Path] = typer.Option(None, help="Your users file (optional)."),
    scale: float = typer.Option(1.0, min=0.01, help="Size of the generated shop (1 = 2k users, 1k items, ~230k events)."),
    epochs: Optional[int] = typer.Option(None, min=1, help="Training epochs (default from the training config)."),
    workers: Optional[int] = typer.Option(None, min=1, help="Ray Train workers (default 2)."),
    port: Optional[int] = typer.Option(None, help="HTTP port for Ray Serve (default 8000)."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Stop after the demo request instead of serving until Ctrl-C."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Run data -> features -> training -> registry -> index -> serving, then a demo request.

    Exit code 0 on success, 2 on bad input (nothing from an earlier run is overwritten).
    """
    from aiplatform import quickstart as qs

    settings = None
    try:
        settings = Settings.load(home=home, http_port=port)
        opts = qs.QuickstartOptions(
            events=str(events) if events else None, items=str(items) if items else None,
            users=str(users) if users else None, scale=scale, epochs=epochs, num_workers=workers,
            wait=not no_wait)
        console.print(f"[bold]aiplatform quickstart[/] — storage root {Layout.at(settings.home).root}")
        qs.run_quickstart(settings, opts, console)
        if opts.wait:
            qs.wait_until_interrupted(console)
    except AIPlatformError as exc:
        raise fail(exc)
    finally:
        qs.shutdown(joined=bool(settings and settings.ray_address))
