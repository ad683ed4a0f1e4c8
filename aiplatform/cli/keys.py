"""`aiplatform keys`: the API keys of the HTTP API. A key is printed once at creation; only its
SHA-256 is stored, so a leaked storage root leaks no key."""

from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, console, fail
from aiplatform.core.errors import AIPlatformError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout

keys_app = typer.Typer(help="API keys of the HTTP API: each has a role (reader, writer, admin); only its hash "
                            "is stored.", no_args_is_help=True)


@keys_app.command("create")
def keys_create(
    name: str = typer.Argument(..., help="Who or what uses the key, e.g. storefront (unique)."),
    role: str = typer.Option(..., help="reader (recommendations, similar items), writer (events too) or admin "
                                       "(models and experiments too)."),
    print_entry: bool = typer.Option(False, "--print-entry",
                                     help="Also print the name:role:sha256 entry for AIPLATFORM_API_KEYS (a Secret)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print the key alone (for KEY=$(...))."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Create an API key and print it once: it cannot be shown again (only its SHA-256 is stored,
    in the storage root's security/api_keys.json). Running replicas accept it within seconds."""
    from aiplatform.core.settings import default_actor
    from aiplatform.security.keys import KeyStore, Role

    try:
        store = KeyStore(Layout.open(Settings.load(home=home).home).root)
        key, stored = store.create(name, Role.parse(role), created_by=default_actor())
    except AIPlatformError as exc:
        raise fail(exc)
    if quiet:
        print(key)
        return
    console.print(f"created key [bold]{stored.name}[/] (role {stored.role.name}); it is shown once, keep it:",
                  highlight=False)
    print(key)
    if print_entry:
        print(f"AIPLATFORM_API_KEYS entry: {stored.name}:{stored.role.name}:{stored.sha256}")  # unwrapped, to copy
    console.print("use it as: curl -H 'Authorization: Bearer <key>' …", highlight=False)


@keys_app.command("list")
def keys_list(home: Optional[str] = HomeOpt) -> None:
    """The keys that serving accepts: name, role, where it comes from, when it was created."""
    from rich.table import Table

    from aiplatform.security.keys import KeyStore

    try:
        keys = KeyStore(Layout.open(Settings.load(home=home).home).root).all()
    except AIPlatformError as exc:
        raise fail(exc)
    table = Table("name", "role", "source", "created", "by", "sha256")
    for k in keys:
        table.add_row(k.name, k.role.name, k.source, k.created_at, k.created_by, k.sha256[:12] + "…")
    console.print(table if keys else "no API keys: create one with aiplatform keys create NAME --role reader")


@keys_app.command("revoke")
def keys_revoke(name: str = typer.Argument(..., help="The key's name."), home: Optional[str] = HomeOpt) -> None:
    """Remove a key: running replicas refuse it (401) within seconds."""
    from aiplatform.security.keys import KeyStore

    try:
        gone = KeyStore(Layout.open(Settings.load(home=home).home).root).revoke(name)
    except AIPlatformError as exc:
        raise fail(exc)
    console.print(f"revoked key {gone.name} (role {gone.role.name})", highlight=False)
