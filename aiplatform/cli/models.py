"""`aiplatform models`: the registry's versions and aliases: list them, show a version's model
card, and move an alias (promote, rollback) the way serving follows it."""

from typing import Optional

import typer

from aiplatform.cli.common import HomeOpt, console, err, fail, fail_named
from aiplatform.core.errors import AIPlatformError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout

models_app = typer.Typer(help="Model versions and aliases in the registry.", no_args_is_help=True)


@models_app.command("list")
def models_list(name: str = typer.Option("two_tower"), home: Optional[str] = HomeOpt) -> None:
    """List versions with their metrics and aliases."""
    from rich.table import Table

    from aiplatform.registry.registry import ModelRegistry

    try:
        registry = ModelRegistry(Layout.open(Settings.load(home=home).home))
        versions = registry.list_versions(name)
        aliases = registry.aliases(name)
    except AIPlatformError as exc:
        raise fail(exc)
    by_version: dict[int, list[str]] = {}
    for alias, v in aliases.items():
        by_version.setdefault(v, []).append(alias)
    table = Table(title=f"model {name}")
    for col in ("version", "created", "recall@10", "ndcg@10", "popularity recall@10", "aliases"):
        table.add_column(col)
    for mv in versions:
        m, p = mv.metrics.get("model", {}), mv.metrics.get("popularity", {})
        table.add_row(str(mv.version), f"{mv.created_at:%Y-%m-%d %H:%M}", f"{m.get('recall@10', 0):.4f}",
                      f"{m.get('ndcg@10', 0):.4f}", f"{p.get('recall@10', 0):.4f}",
                      ", ".join(by_version.get(mv.version, [])))
    console.print(table)


@models_app.command("show")
def models_show(name: str = typer.Argument(..., help="Model name, e.g. two_tower."),
                version: int = typer.Argument(..., min=1, help="Version number."),
                home: Optional[str] = HomeOpt) -> None:
    """The model card of one version: its evaluation, gates, aliases and lineage.

    Metrics against every baseline, the evaluation split and its users, the alias moves to it,
    and lineage: code version, config hash, feature service and view versions with the Lance
    versions trained on, the lake generation, checkpoint and artifact.
    """
    from aiplatform.registry.registry import ModelRegistry

    try:
        registry = ModelRegistry(Layout.open(Settings.load(home=home).home))
        mv = registry.get(name, version)
        aliases = registry.aliases(name)
        history = {a: registry.alias_history(name, a) for a in aliases}
    except AIPlatformError as exc:
        raise fail(exc)
    for renderable in _model_card(mv, aliases, history):
        console.print(renderable)


def print_move(name: str, move: dict) -> None:
    """Say what an alias move did: who moved it from where, or that it already pointed there
    (promote and canary are compare-and-set, so "nothing to do" is a normal outcome)."""
    who = move["actor"] or "unknown"
    if not move["changed"]:
        console.print(f"{move['alias']} of {name} already points at v{move['version']} (set by {who} at "
                      f"{move['set_at']:%Y-%m-%d %H:%M UTC}): nothing to do", highlight=False)
        return
    before = f"v{move['previous']}" if move["previous"] is not None else "unset"
    console.print(f"[bold]{move['alias']}[/] of {name}: {before} -> [bold]v{move['version']}[/] by {who} "
                  f"({move['reason'] or 'no reason given'})", highlight=False)
    console.print(f"running applications that follow '{move['alias']}' switch to v{move['version']} "
                  "within a few seconds", highlight=False)


def _ensure_vector_index(settings: Settings, layout: Layout, name: str, version: int, build: bool) -> None:
    """A version must have its vector index before an alias that serving follows points at it.

    Missing, it is built here (with Ray, started or joined for this step only) unless ``build``
    is false; then the move goes ahead with a warning."""
    from aiplatform.core.errors import NotFoundError
    from aiplatform.retrieval.index import ItemIndex, vector_table_name

    table = vector_table_name(name, version)
    try:
        ItemIndex(layout.vectors, table)
        return
    except NotFoundError:
        pass
    if not build:
        err.print(f"[yellow]warning:[/] {name} v{version} has no vector index ({table}); serving it fails until "
                  f"it is built: python -m aiplatform.jobs.index --model-name {name} --version {version}",
                  highlight=False)
        return
    import ray

    from aiplatform.core.runtime import ensure_ray
    from aiplatform.jobs.index import run_index

    console.print(f"{name} v{version} has no vector index yet: building {table} with Ray first", highlight=False)
    try:
        ensure_ray(settings, quiet=False)
        run_index(layout, name, version=version)
    finally:
        ray.shutdown()
    ItemIndex(layout.vectors, table)  # what serving will open: fail here, before the alias moves


@models_app.command("promote")
def models_promote(
    name: str = typer.Argument(..., help="Model name, e.g. two_tower."),
    version: int = typer.Argument(..., min=1, help="Version to point the alias at."),
    alias: str = typer.Option("champion", help="Alias to move."),
    reason: str = typer.Option("", help="Why (kept in the alias history)."),
    no_build_index: bool = typer.Option(False, "--no-build-index",
                                        help="Do not build a missing vector index (warn instead)."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Point an alias (default champion) at a version, building its vector index first if missing.

    Compare-and-set: if someone moves the alias between this command reading it and writing,
    nothing changes and it exits 1 naming that move. Who ($AIPLATFORM_ACTOR, else user@host),
    when and why go into the alias history (models show).
    """
    from aiplatform.registry.registry import ModelRegistry

    try:
        settings = Settings.load(home=home)
        layout = Layout.open(settings.home)
        registry = ModelRegistry(layout)
        registry.get(name, version)
        if registry.aliases(name).get(alias) != version:
            _ensure_vector_index(settings, layout, name, version, build=not no_build_index)
        move = registry.promote(name, version, alias=alias, reason=reason)
    except AIPlatformError as exc:
        raise fail_named(exc)
    print_move(name, move)


@models_app.command("rollback")
def models_rollback(
    name: str = typer.Argument(..., help="Model name, e.g. two_tower."),
    alias: str = typer.Option("champion", help="Alias to move back."),
    reason: str = typer.Option("", help="Why (kept in the alias history)."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Move an alias back to the version it pointed at before the current one.

    Repeated, it keeps going back (v1 -> v2 -> v3: rollback gives v2, then v1). Compare-and-set
    like promote.
    """
    from aiplatform.registry.registry import ModelRegistry

    try:
        registry = ModelRegistry(Layout.open(Settings.load(home=home).home))
        move = registry.rollback(name, alias=alias, reason=reason)
    except AIPlatformError as exc:
        raise fail_named(exc)
    print_move(name, move)


def _model_card(mv, aliases: dict[str, int], history: dict[str, list[dict]]) -> list:
    """Rich renderables of a version's card (kept here: presentation is the CLI's job)."""
    from rich.table import Table

    out: list = []
    mine = sorted(a for a, v in aliases.items() if v == mv.version)
    out.append(f"[bold]{mv.name} v{mv.version}[/]  registered {mv.created_at:%Y-%m-%d %H:%M UTC}"
               f"  aliases: {', '.join(mine) or 'none'}")
    metrics = {k: v for k, v in mv.metrics.items() if isinstance(v, dict) and "recall@10" in v}
    first = ["model", "two_tower", "popularity", "cooccurrence", "ease"]  # what is served, then the baselines
    metrics = dict(sorted(metrics.items(), key=lambda kv: (first.index(kv[0]) if kv[0] in first else 99, kv[0])))
    if metrics:
        order = ["recall@", "ndcg@", "coverage@"]
        cols = sorted(next(iter(metrics.values())),
                      key=lambda c: (next((i for i, p in enumerate(order) if c.startswith(p)), 9),
                                     int(c.split("@")[1]) if "@" in c and c.split("@")[1].isdigit() else 0))
        table = Table(title="evaluation", show_edge=False)
        table.add_column("ranker")
        for c in cols:
            table.add_column(c, justify="right")
        for ranker, values in metrics.items():
            table.add_row(ranker, *(f"{values.get(c, float('nan')):.4f}" for c in cols))
        out.append(table)
    evaluation = mv.lineage.get("evaluation", {})
    if evaluation:
        out.append(f"split: {evaluation.get('split', '?')}, {evaluation.get('users', '?')} validation users, "
                   f"cutoff {evaluation.get('cutoff', '?')}")
    if "paired" in mv.metrics:
        from aiplatform.training.recommender import verdict_lines

        out += [f"  {line}" for line in verdict_lines(mv.metrics)]
    else:
        for verdict in (mv.metrics.get("beats_baselines") or {}).items():
            out.append(f"  {'beats' if verdict[1] else 'does NOT beat'} {verdict[0]}")
    for gate in mv.metrics.get("gates") or []:
        out.append(f"  {gate.get('message', gate)}")
    moves = [(a, h) for a, hs in history.items() for h in hs if h["version"] == mv.version]
    for alias, move in sorted(moves, key=lambda m: m[1]["set_at"]):
        out.append(f"  alias {alias} -> v{mv.version} at {move['set_at']:%Y-%m-%d %H:%M} "
                   f"by {move.get('actor') or 'unknown'} ({move['reason'] or 'no reason'})")
    lineage = mv.lineage
    code = lineage.get("code", {})
    git = code.get("git") or {}
    table = Table(title="lineage", show_edge=False, show_header=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    table.add_row("code", (f"git {git['sha'][:12]}{' (uncommitted changes)' if git.get('dirty') else ''}, "
                           if git else "") + f"package {code.get('package', '?')}, source {code.get('source_digest', '?')}")
    table.add_row("config hash", str(lineage.get("config_hash", "?")))
    service = lineage.get("feature_service") or {}
    table.add_row("feature service", f"{service.get('name', '?')} (version {service.get('version', '?')})")
    for view in service.get("views", []):
        table.add_row(f"  view {view['name']}", f"version {view['version']}, Lance version {view['lance_version']} "
                                                f"of {view['table']}")
    data = lineage.get("data") or {}
    if data:
        table.add_row("data", f"lake generation {data.get('lake_generation')} (imported {data.get('imported_at')})")
    for key in ("events", "items", "examples", "run"):
        if key in lineage:
            table.add_row(key, f"{lineage[key]:,}" if isinstance(lineage[key], int) else str(lineage[key]))
    table.add_row("checkpoint", mv.checkpoint_uri)
    table.add_row("artifact", mv.artifact_uri)
    out.append(table)
    return out
