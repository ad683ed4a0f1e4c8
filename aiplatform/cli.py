"""aiplatform: features, training, a model registry, vector retrieval and serving on one Ray cluster.

Start with [bold]aiplatform quickstart[/]: it runs every stage on this machine and leaves a recommendation API running at http://127.0.0.1:8000 (OpenAPI page at /docs).

The other commands run one stage each, against the storage root in $AIPLATFORM_HOME (default ./.aiplatform) or --home.
"""

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from aiplatform.core.errors import AIPlatformError, UserInputError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout
from aiplatform.cli_report import report_app

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode="rich")
data_app = typer.Typer(help="Bring data into the lake, or generate the shop's synthetic data.",
                       no_args_is_help=True)
models_app = typer.Typer(help="Model versions and aliases in the registry.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
console = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="Storage root (default: $AIPLATFORM_HOME or ./.aiplatform).")


def _fail(exc: Exception) -> "typer.Exit":
    """Print the error for a person, and exit 2 for bad input, 1 for anything else."""
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(2 if isinstance(exc, UserInputError) else 1)


@app.command()
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
        raise _fail(exc)
    finally:
        qs.shutdown(joined=bool(settings and settings.ray_address))


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
        raise _fail(exc)
    console.print(f"imported {s.events:,} events, {s.items:,} items, {s.users:,} users into {layout.lake}")


def _run_job(module_main, home: Optional[str], extra: list[str]) -> None:
    args = (["--home", home] if home else []) + extra
    code = module_main(args)
    if code:
        raise typer.Exit(code)


features_app = typer.Typer(help="Declared feature views: validate and version them (apply), compute them (run).")
app.add_typer(features_app, name="features")
DefsOpt = typer.Option("apps.shop.features", "--module", help="Python module declaring VIEWS, SERVICES, ON_DEMAND.")


@features_app.callback(invoke_without_command=True)
def features(ctx: typer.Context, home: Optional[str] = HomeOpt) -> None:
    """Compute features with Ray Data into the offline store and materialize them online.

    Without a subcommand: the quickstart pipeline (user_activity, item_popularity, online store).
    """
    if ctx.invoked_subcommand is not None:
        return
    from aiplatform.jobs.features import main

    _run_job(main, home, [])


@features_app.command("apply")
def features_apply(module: str = DefsOpt, home: Optional[str] = HomeOpt) -> None:
    """Check the declared views against the lake's schemas and record their versions."""
    from rich.table import Table

    from aiplatform.features.apply import apply, load_definitions

    try:
        layout = Layout.open(Settings.load(home=home).home)
        report = apply(layout, *load_definitions(module))
    except AIPlatformError as exc:
        raise _fail(exc)
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

    _run_job(main, home, ["--views", module] + (["--full"] if full else []))


@app.command()
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
    _run_job(main, home, extra)


@app.command()
def index(home: Optional[str] = HomeOpt, alias: str = typer.Option("champion")) -> None:
    """Embed the catalogue with a registered model into LanceDB."""
    from aiplatform.jobs.index import main

    _run_job(main, home, ["--alias", alias])


serve_app = typer.Typer(help="Serve the recommendation API with Ray Serve, or write its Serve config.")
app.add_typer(serve_app, name="serve")


@serve_app.callback(invoke_without_command=True)
def serve(
    ctx: typer.Context,
    home: Optional[str] = HomeOpt,
    port: Optional[int] = typer.Option(None, help="HTTP port (default 8000)."),
    alias: str = typer.Option("champion", help="Serve the version this alias points at."),
    version: Optional[int] = typer.Option(None, min=1, help="Serve this version instead of the alias."),
    name: str = typer.Option("aiplatform", help="Serve application name (one per route prefix)."),
    route_prefix: str = typer.Option("/", help="URL prefix of the application, e.g. /shop."),
    auth: str = typer.Option("keys", help="'keys': every route needs an API key of its role (aiplatform keys "
                                          "create); 'off': open to whoever reaches the port."),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="PEM certificate (chain): serve HTTPS "
                                           "(with --tls-key; or AIPLATFORM_TLS_CERTFILE)."),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert, unencrypted "
                                          "(or AIPLATFORM_TLS_KEYFILE)."),
) -> None:
    """Serve the champion model over HTTP until Ctrl-C (on $RAY_ADDRESS's cluster, or a local Ray).

    With [bold]--tls-cert[/] and [bold]--tls-key[/] it serves HTTPS only (through Serve's Python proxy).

    Routes need an API key ([bold]Authorization: Bearer KEY[/]): create one with [bold]aiplatform keys
    create NAME --role reader[/] (reader: recommendations; writer: events; admin: models and
    experiments). On a shared cluster only this application is removed when it stops.
    """
    if ctx.invoked_subcommand is not None:
        return
    from aiplatform import quickstart as qs
    from aiplatform.core.runtime import ensure_ray
    from aiplatform.core.tls import tls_files
    from aiplatform.serving import app as serving

    settings = None
    try:
        settings = Settings.load(home=home, http_port=port, tls_certfile=tls_cert, tls_keyfile=tls_key)
        tls = tls_files(settings.tls_certfile, settings.tls_keyfile)
        layout = Layout.open(settings.home)
        ensure_ray(settings)
        url = serving.start(serving.build_app(layout, settings.model_name, alias, settings=settings,
                                              version=version, auth=auth),
                            settings.http_host, settings.http_port, name=name, route_prefix=route_prefix, tls=tls)
        console.print(f"serving application '{name}' at {url} (OpenAPI: {url}/docs)")
        if auth == "off":
            err.print(f"[yellow]warning:[/] auth off: anyone who reaches {settings.http_host}:{settings.http_port} "
                      "may read recommendations, write events and move aliases", highlight=False)
        qs.wait_until_interrupted(console)
    except AIPlatformError as exc:
        raise _fail(exc)
    finally:
        qs.shutdown(joined=bool(settings and settings.ray_address), app_name=name)


@serve_app.command("build")
def serve_build(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the YAML here (default: standard output)."),
    home: Optional[str] = typer.Option(None, "--home", help="Storage root to bake in; left out, the "
                                       "cluster's $AIPLATFORM_HOME is used when the app is built."),
    model_name: str = typer.Option("two_tower", help="Registered model to serve."),
    alias: str = typer.Option("champion", help="Alias whose version is served."),
    version: Optional[int] = typer.Option(None, min=1, help="Serve this version instead of the alias."),
    online_store: Optional[str] = typer.Option(None, help="redis://host:port/db or sqlite:///node/local/path; "
                                               "left out, the cluster's $AIPLATFORM_ONLINE_STORE."),
    name: str = typer.Option("aiplatform", help="Serve application name."),
    host: str = typer.Option("0.0.0.0", help="HTTP host of Serve's proxies."),  # nosec B104  # a cluster config: proxies listen on the pod's interfaces, behind API keys
    port: int = typer.Option(8000, help="HTTP port of Serve's proxies."),
    runtime_env_json: Optional[str] = typer.Option(None, help="The application's runtime_env, as JSON."),
    auth: str = typer.Option("keys", help="'keys': API keys with roles (aiplatform keys create, or "
                                          "AIPLATFORM_API_KEYS on the cluster); 'off': open."),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="HTTPS: the certificate's path on the "
                                           "cluster's nodes (with --tls-key; the cluster must run Serve's "
                                           "Python proxy, not RAY_SERVE_ENABLE_HA_PROXY)."),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="HTTPS: the key's path on the cluster's nodes."),
) -> None:
    """Write the Serve config for `serve deploy FILE` or a KubeRay RayService's serveConfigV2.

    It lists the application (import path, arguments, runtime_env) and its deployments with
    their autoscaling and resources, ready to tune per environment.
    """
    import json

    from pydantic import ValidationError

    from aiplatform.core.tls import tls_files
    from aiplatform.serving.config import AppArgs, dump_config, serve_config

    try:
        runtime_env = json.loads(runtime_env_json) if runtime_env_json else {}
        if not isinstance(runtime_env, dict):
            raise UserInputError("--runtime-env-json must be a JSON object, e.g. '{\"env_vars\": {\"A\": \"1\"}}'")
        args = AppArgs(home=Layout.at(home).root if home else None, model_name=model_name, alias=alias,
                       version=version, online_store=online_store, auth=auth)
        tls = tls_files(tls_cert, tls_key, check=False)  # paths on the cluster: not readable here
        text = dump_config(serve_config(args, name=name, host=host, port=port, runtime_env=runtime_env, tls=tls))
    except json.JSONDecodeError as exc:
        raise _fail(UserInputError(f"--runtime-env-json is not valid JSON: {exc}"))
    except ValidationError as exc:
        raise _fail(UserInputError(f"invalid serve config: {exc}"))
    except AIPlatformError as exc:
        raise _fail(exc)
    if out is None:
        sys.stdout.write(text)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        console.print(f"wrote {out}: deploy it with [bold]serve deploy {out}[/]", highlight=False)


@serve_app.command("delete")
def serve_delete(name: str = typer.Option("aiplatform", help="Serve application to remove.")) -> None:
    """Remove one Serve application from the cluster in $RAY_ADDRESS (others keep running).

    Ray's `serve shutdown` removes every application; this removes just one."""
    import ray

    from aiplatform.core.runtime import ensure_ray
    from aiplatform.serving import app as serving

    settings = Settings.load()
    if not settings.ray_address:
        raise _fail(UserInputError("set RAY_ADDRESS to the cluster whose application to remove "
                                   "(e.g. RAY_ADDRESS=127.0.0.1:6379)"))
    try:
        ensure_ray(settings)
        from ray import serve

        known = set(serve.status().applications)
        if name not in known:
            raise UserInputError(f"no Serve application {name!r} on {settings.ray_address} "
                                 f"(applications: {', '.join(sorted(known)) or 'none'})")
        serving.stop(name)
        console.print(f"removed Serve application '{name}'")
    except AIPlatformError as exc:
        raise _fail(exc)
    finally:
        ray.shutdown()


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
        raise _fail(exc)
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
        raise _fail(exc)
    for renderable in _model_card(mv, aliases, history):
        console.print(renderable)


def _fail_named(exc: Exception) -> "typer.Exit":
    """A model, version or alias named on the command line that does not exist is bad input (2)."""
    from aiplatform.core.errors import NotFoundError

    return _fail(UserInputError(str(exc)) if isinstance(exc, NotFoundError) else exc)


def _print_move(name: str, move: dict) -> None:
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
        raise _fail_named(exc)
    _print_move(name, move)


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
        raise _fail_named(exc)
    _print_move(name, move)


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


experiments_app = typer.Typer(help="Online experiments: A/B tests, shadow traffic and canaries of model versions.",
                               no_args_is_help=True)
app.add_typer(experiments_app, name="experiments")


def _experiment_store(home: Optional[str]):
    from aiplatform.experiments.store import ExperimentStore

    layout = Layout.open(Settings.load(home=home).home)
    return layout, ExperimentStore(layout)


def _no_experiment(store, name: str) -> UserInputError:
    return UserInputError(f"no experiment {name!r} (experiments: {', '.join(store.names()) or 'none yet'}); "
                          "start one with: aiplatform experiments start FILE")


def _check_targets(layout: Layout, experiment) -> None:
    """Every variant (and the shadow) must name a version serving can load: a registered
    version, or an alias that is set. Said now, not by replicas that cannot route."""
    from aiplatform.registry.registry import ModelRegistry

    registry = ModelRegistry(layout)
    name = experiment.model_name
    targets = list(experiment.variants) + ([experiment.shadow] if experiment.shadow else [])
    aliases = registry.aliases(name)
    for target in targets:
        if target.version is not None:
            registry.get(name, target.version)  # NotFoundError names the versions there are
        elif target.alias not in aliases:
            if not registry.list_versions(name):
                raise UserInputError(f"model {name!r} of experiment {experiment.name!r} is not registered")
            have = ", ".join(f"{a} (v{v})" for a, v in sorted(aliases.items())) or "none set"
            raise UserInputError(f"{target.name!r} of experiment {experiment.name!r} uses alias {target.alias!r} "
                                 f"of {name}, which is not set (aliases: {have}); set it with: aiplatform models "
                                 f"promote {name} VERSION --alias {target.alias}")


def _describe_experiment(experiment, revision: int | None, active: bool) -> None:
    from rich.table import Table

    state = "[green]running[/]" if active else "stopped"
    console.print(f"[bold]{experiment.name}[/] on model {experiment.model_name}: {state}"
                  + (f", revision {revision}" if revision is not None else "") + f", salt {experiment.salt!r}",
                  highlight=False)
    table = Table(show_edge=False)
    for col in ("variant", "serves", "weight", "traffic"):
        table.add_column(col, justify="right" if col in ("weight", "traffic") else "left")
    shares = experiment.shares()
    control = experiment.control_variant.name
    for v in experiment.variants:
        table.add_row(v.name + (" (control)" if v.name == control else ""), v.target, f"{v.weight:g}",
                      f"{shares[v.name]:.1%}")
    console.print(table)
    if experiment.shadow is not None:
        sh = experiment.shadow
        console.print(f"shadow {sh.name}: {sh.target} gets a copy of {sh.share:.0%} of requests (not served)",
                      highlight=False)


@experiments_app.command("start")
def experiments_start(
    file: Path = typer.Argument(..., help="The experiment, YAML or JSON: name, model_name, variants, shadow."),
    reason: str = typer.Option("", help="Why (kept in the experiment's history)."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Start an experiment, or change a running one (weights, variants) from its file.

    Serving replicas pick it up within seconds: each user gets one variant, the same on every
    request for as long as the weights stay the same. One experiment per model at a time.
    """
    from aiplatform.experiments.config import load_experiment

    try:
        experiment = load_experiment(file)
        layout, store = _experiment_store(home)
        _check_targets(layout, experiment)
        revision = store.put(experiment, reason=reason)
    except AIPlatformError as exc:
        raise _fail_named(exc)
    _describe_experiment(experiment, revision, True)
    console.print(f"started {experiment.name} (revision {revision}); results: aiplatform experiments report "
                  f"{experiment.name}", highlight=False)


@experiments_app.command("show")
def experiments_show(name: str = typer.Argument(..., help="Experiment name."), home: Optional[str] = HomeOpt) -> None:
    """An experiment's variants, weights and shadow, and the history of its revisions."""
    try:
        _, store = _experiment_store(home)
        history = store.history(name)
        if not history:
            raise _no_experiment(store, name)
        experiment = store.get(name)
    except AIPlatformError as exc:
        raise _fail_named(exc)
    last = history[-1]
    _describe_experiment(experiment, last["revision"], last["active"])
    for rev in history:
        weights = ", ".join(f"{v['name']} {v['weight']:g}" for v in rev["config"]["variants"])
        console.print(f"  revision {rev['revision']} at {rev['set_at']:%Y-%m-%d %H:%M:%S UTC} by {rev['actor'] or 'unknown'}: "
                      f"{'active' if rev['active'] else 'stopped'} ({weights}) {rev['reason'] or ''}".rstrip(),
                      highlight=False)


@experiments_app.command("stop")
def experiments_stop(name: str = typer.Argument(..., help="Experiment name."),
                     reason: str = typer.Option("", help="Why (kept in the experiment's history)."),
                     home: Optional[str] = HomeOpt) -> None:
    """Stop an experiment: every user gets the model's alias again within seconds."""
    try:
        _, store = _experiment_store(home)
        was_active = store.is_active(name)
        revision = store.stop(name, reason=reason)
    except AIPlatformError as exc:
        raise _fail_named(exc)
    if was_active:
        console.print(f"stopped {name} (revision {revision})", highlight=False)
    else:
        console.print(f"{name} is already stopped (revision {revision}): nothing to do", highlight=False)


def _fmt_ci(rate: float, ci: tuple[float, float]) -> str:
    return f"{rate:.2%} [{ci[0]:.2%}, {ci[1]:.2%}]"


@experiments_app.command("report")
def experiments_report(
    name: str = typer.Argument(..., help="Experiment name."),
    alpha: float = typer.Option(0.05, min=0.0001, max=0.5, help="Error level of intervals and verdicts."),
    look_every: int = typer.Option(100, min=1, help="Exposures between the looks of the sequential test."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Per variant: exposures, users, click/cart/purchase rates with intervals and, against
    control, the difference with an always-valid p-value and confidence sequence.

    Always valid: reading this report every hour and stopping when it says "better" keeps
    the error rate at alpha (a plain z-test read that way does not). Verdicts: better, worse,
    or no difference yet.
    """
    from rich.table import Table

    from aiplatform.experiments.stats import variant_report

    try:
        _, store = _experiment_store(home)
        experiment = store.get(name)
        if experiment is None:
            raise _no_experiment(store, name)
        exposures = store.exposures(name)
        outcomes = store.outcomes(set(exposures["request_id"]))
        shadow = store.shadow(name)
        report = variant_report(exposures, outcomes, experiment.control_variant.name, alpha=alpha,
                                look_every=look_every, variants=[v.name for v in experiment.variants])
    except AIPlatformError as exc:
        raise _fail_named(exc)
    active = store.is_active(name)
    console.print(f"[bold]{name}[/] on model {experiment.model_name} ({'running' if active else 'stopped'}): "
                  f"{len(exposures):,} exposures; intervals at {1 - alpha:.0%}", highlight=False)
    for vs in report:
        title = (f"{vs.variant}{' (control)' if vs.is_control else ''}: {vs.exposures:,} exposures, "
                 f"{vs.users:,} users")
        console.print(f"[bold]{title}[/]", highlight=False)
        table = Table(show_edge=False)
        columns = ["metric", "rate [CI]"] + ([] if vs.is_control else
                                             ["vs control", "confidence sequence", "always-valid p", "verdict"])
        for col in columns:
            table.add_column(col, justify="left" if col in ("metric", "verdict") else "right")
        for m in vs.metrics.values():
            row = [m.metric, _fmt_ci(m.rate, m.ci)]
            if not vs.is_control:
                style = {"better": "green", "worse": "red"}.get(m.verdict or "", "")
                row += [f"{m.difference:+.2%}", f"[{m.cs[0]:+.2%}, {m.cs[1]:+.2%}]",
                        f"{m.p_value:.3f}" if m.p_value >= 0.001 else "<0.001",
                        f"[{style}]{m.verdict}[/]" if style else str(m.verdict)]
            table.add_row(*row)
        console.print(table)
    if len(shadow):
        console.print(f"shadow: {len(shadow):,} mirrored requests, mean latency {shadow['latency_ms'].mean():.1f} ms, "
                      f"mean overlap@k with the live answer {shadow['overlap'].mean():.2f}", highlight=False)


@experiments_app.command("canary")
def experiments_canary(
    model: str = typer.Argument(..., help="Model name, e.g. two_tower."),
    version: int = typer.Argument(..., min=1, help="The version to ramp up."),
    steps: str = typer.Option("5,25,50,100", help="Canary traffic per step, percent, increasing."),
    step_seconds: float = typer.Option(60.0, help="How long each step must stay healthy."),
    max_error_rate_delta: float = typer.Option(0.02, help="Roll back when the canary's error rate exceeds "
                                                          "control's by more than this."),
    max_p99_ratio: float = typer.Option(1.5, help="Roll back when the canary's p99 latency exceeds control's "
                                                  "times this..."),
    min_p99_excess_ms: float = typer.Option(25.0, help="...and by more than this many milliseconds (a fast "
                                                       "service's p99 is noisy)."),
    min_requests: int = typer.Option(50, help="Requests each side needs before a step is judged."),
    alias: str = typer.Option("champion", help="The alias that control serves, and that is promoted."),
    reason: str = typer.Option("", help="Why (kept in the histories)."),
    home: Optional[str] = HomeOpt,
) -> None:
    """Ramp VERSION up against the alias step by step; promote it if every step stays healthy.

    Each step gives the canary its share of users and compares error rate and p99 latency
    with control's over the step; a breach rolls back at once (canary weight 0, experiment
    stopped, exit 1) and the alias stays where it was. Passing every step moves the alias to
    VERSION (compare-and-set, like models promote).
    """
    from pydantic import ValidationError

    from aiplatform.experiments.canary import CanaryPlan, run_canary
    from aiplatform.experiments.config import describe_validation_error
    from aiplatform.registry.aliases import default_actor
    from aiplatform.registry.registry import ModelRegistry

    try:
        try:
            parsed = [float(s) for s in steps.split(",") if s.strip()]
        except ValueError:
            raise UserInputError(f"--steps {steps!r}: give increasing percentages separated by commas, "
                                 "e.g. 5,25,50,100") from None
        try:
            plan = CanaryPlan(steps=parsed, step_s=step_seconds, max_error_rate_delta=max_error_rate_delta,
                              max_p99_ratio=max_p99_ratio, min_p99_excess_ms=min_p99_excess_ms,
                              min_requests=min_requests)
        except ValidationError as exc:
            raise UserInputError(describe_validation_error(exc, "canary")) from None
        layout, store = _experiment_store(home)
        registry = ModelRegistry(layout)
        registry.get(model, version)
        before = registry.get_by_alias(model, alias).version
        if before == version:
            raise UserInputError(f"{alias} of {model} already points at v{version}: nothing to canary")
        running = store.active(model)
        canary_name = f"canary-{model}-v{version}"
        if running is not None and running[0].name != canary_name:
            raise UserInputError(f"model {model!r} already has an active experiment, {running[0].name!r} (revision "
                                 f"{running[1]}): stop it first (aiplatform experiments stop {running[0].name})")
    except AIPlatformError as exc:
        raise _fail_named(exc)
    actor = default_actor()
    console.print(f"canary of {model} v{version} against {alias} (v{before}): steps "
                  f"{', '.join(f'{s:g}%' for s in plan.steps)}, {plan.step_s:g} s each", highlight=False)

    def on_step(event: dict) -> None:
        where = f"step {event['index'] + 1}/{len(plan.steps)} ({event['step']:g}%)"
        if event["event"] == "step_started":
            console.print(f"{where}: started (revision {event['revision']})", highlight=False)
        elif event["event"] == "step_passed":
            c, k = event["control"], event["canary"]
            console.print(f"{where}: [green]healthy[/] after {event['elapsed_s']:.1f} s: canary "
                          f"{k['requests']} requests, {k['error_rate']:.1%} errors, p99 {k['p99_ms']:.0f} ms; "
                          f"control {c['requests']} requests, {c['error_rate']:.1%} errors, p99 {c['p99_ms']:.0f} ms",
                          highlight=False)

    try:
        result = run_canary(store, model, version, plan, control_alias=alias, actor=actor, on_step=on_step,
                            stop_when_passed=False)
    except AIPlatformError as exc:
        raise _fail_named(exc)
    if result["outcome"] != "passed":
        err.print(f"[bold red]canary rolled back[/] at {result['step']:g}%: {result['reason']}; {alias} of {model} "
                  f"stays at v{before}", highlight=False)
        raise typer.Exit(1)
    console.print("canary passed every step", highlight=False)
    # The alias moves first and the experiment stops after: users on the canary stay on VERSION
    # throughout (stopped first, they would flip back to the old version until the move).
    try:
        move = registry.promote(model, version, alias, reason=reason or f"canary {result['name']} passed "
                                f"{', '.join(f'{s:g}%' for s in plan.steps)}", actor=actor)
    except AIPlatformError as exc:
        raise _fail_named(exc)
    finally:
        store.stop(result["name"], actor=actor, reason=f"canary of v{version} passed every step")
    _print_move(model, move)


keys_app = typer.Typer(help="API keys of the HTTP API: each has a role (reader, writer, admin); only its hash "
                            "is stored.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


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
        raise _fail(exc)
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
        raise _fail(exc)
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
        raise _fail(exc)
    console.print(f"revoked key {gone.name} (role {gone.role.name})", highlight=False)


app.add_typer(report_app, name="report")

events_app = typer.Typer(help="The event log of real-time events (POST /v1/events).", no_args_is_help=True)
app.add_typer(events_app, name="events")


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
        raise _fail(exc)
    if result.skipped:
        err.print(f"[yellow]not compacted:[/] {result.skipped}; try again in a minute", highlight=False)
        raise typer.Exit(1)
    console.print(f"merged {result.merged_files} files into {len(result.segments)} segment(s); deleted "
                  f"{result.deleted} replaced file(s); {result.live_files} file(s) to read now", highlight=False)
    if result.quarantined or result.reasons:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(result.reasons.items()))
        err.print(f"[yellow]quarantined[/] {result.quarantined} event(s) ({reasons}) to "
                  f"{eventlog.quarantine_dir(layout)}", highlight=False)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
