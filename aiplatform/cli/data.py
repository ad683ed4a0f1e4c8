"""`aiplatform data`: bring files into the lake, or generate the shop's synthetic data."""

from pathlib import Path
from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, console, fail
from aiplatform.core.errors import AIPlatformError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout

data_app = typer.Typer(help="Bring data into the lake, or generate the shop's synthetic data.",
                       no_args_is_help=True)


@data_app.command("generate")
def data_generate(
    out: Path = typer.Option(..., help="Folder for users.parquet, items.parquet, events.parquet."),
    scale: float = typer.Option(1.0, min=0.01, help="1 = 2k users, 1k items, ~230k events; 10 = ~2.3M events."),
    seed: int = typer.Option(42),
) -> None:
    """Write the shop's synthetic data (deterministic for a seed)."""
    from apps.shop.generate import ShopSize, generate, write

    with console.status("generating…"):
        paths = write(generate(ShopSize().scaled(scale), seed=seed), str(out))
    for name, path in paths.items():
        console.print(f"{name:7s} {path}")


@data_app.command("import")
def data_import(
    events: Path = typer.Option(..., help="Events file (Parquet or CSV)."),
    items: Path = typer.Option(..., help="Items file (Parquet or CSV)."),
    users: Optional[Path] = typer.Option(None, help="Users file (optional)."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Validate your files and make them the lake's tables (all or nothing)."""
    from aiplatform.data.lake import import_files

    try:
        layout = Layout.open(Settings.load(home=home).home)
        s = import_files(layout, str(events), str(items), str(users) if users else None)
    except AIPlatformError as exc:
        raise fail(exc)
    console.print(f"imported {s.events:,} events, {s.items:,} items, {s.users:,} users into {layout.lake}")
