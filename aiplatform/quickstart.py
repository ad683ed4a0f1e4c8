"""The quickstart: every stage of the platform, once, on the local Ray instance.

data -> features -> training (+ evaluation, registry) -> index -> serving -> a demo request.
Each stage is the same function a production job runs; this module only strings them
together and reports progress and durations.
"""

import json
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout, join, write_json


@dataclass
class QuickstartOptions:
    events: str | None = None
    items: str | None = None
    users: str | None = None
    scale: float = 1.0
    seed: int = 42
    epochs: int | None = None
    num_workers: int | None = None
    wait: bool = True
    serve: bool = True


@dataclass
class QuickstartResult:
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    model_version: int | None = None
    url: str | None = None
    demo: dict[str, Any] | None = None


class _Stages:
    """Runs named stages with a spinner and records how long each took."""

    def __init__(self, console: Console, result: QuickstartResult) -> None:
        self.console, self.result = console, result

    def run(self, name: str, description: str, fn: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        with self.console.status(f"[bold]{name}[/]: {description}…", spinner="dots"):
            value = fn()
        took = time.perf_counter() - started
        self.result.timings[name] = round(took, 2)
        self.console.print(f"[green]✓[/] [bold]{name:<9}[/] {description} [dim]({took:.1f}s)[/]")
        return value


def _prepare_data(layout: Layout, opts: QuickstartOptions) -> Any:
    from aiplatform.data.lake import import_files

    if opts.events or opts.items:
        return import_files(layout, opts.events, opts.items, opts.users)
    from apps.shop.generate import ShopSize, generate, write

    with tempfile.TemporaryDirectory(prefix="aiplatform-shop-") as tmp:
        paths = write(generate(ShopSize().scaled(opts.scale), seed=opts.seed), tmp)
        return import_files(layout, paths["events"], paths["items"], paths["users"])


def run_quickstart(settings: Settings, opts: QuickstartOptions, console: Console | None = None) -> QuickstartResult:
    """Run every stage; raises UserInputError on bad input before anything is overwritten."""
    console = console or Console()
    layout = Layout.open(settings.home)  # a bad root (bucket, endpoint, credentials) stops here
    from aiplatform.features.server import online_store_uri

    online_store_uri(settings, layout)  # and so does an online store a remote root cannot use
    result = QuickstartResult()
    stages = _Stages(console, result)
    total_started = time.perf_counter()

    if bool(opts.events) != bool(opts.items):
        from aiplatform.core.errors import UserInputError

        raise UserInputError("--events and --items go together: give both (and optionally --users)")
    what = "importing your files" if opts.events else f"generating the shop's data (scale {opts.scale:g})"
    summary = stages.run("data", what, lambda: _prepare_data(layout, opts))
    console.print(f"  {summary.events:,} events, {summary.items:,} items, {summary.users:,} users, "
                  f"{summary.start:%Y-%m-%d} to {summary.end:%Y-%m-%d}")

    from aiplatform.core.runtime import ensure_ray

    stages.run("ray", "starting Ray" if not settings.ray_address else f"joining {settings.ray_address}",
               lambda: ensure_ray(settings))
    _quiet_ray_logs()

    from aiplatform.jobs.features import run_features

    feats = stages.run("features", "computing features with Ray Data", lambda: run_features(layout, settings))
    console.print(f"  feature service '{settings.feature_service}': {feats.users:,} user rows online; "
                  f"popularity of {feats.items:,} items as of {feats.as_of:%Y-%m-%d %H:%M}")

    from aiplatform.core.errors import ConflictError
    from aiplatform.jobs.train import run_training
    from aiplatform.jobs.train_report import format_metrics
    from aiplatform.registry.registry import ModelRegistry
    from aiplatform.training.config import TrainConfig

    overrides = {k: v for k, v in {"epochs": opts.epochs, "num_workers": opts.num_workers}.items() if v}
    config = TrainConfig(**overrides)
    registry = ModelRegistry(layout)
    champion = registry.aliases(settings.model_name).get("champion")
    has_champion = champion is not None
    report = stages.run(
        "train", f"training the two-tower model with Ray Train ({config.num_workers} workers) and the candidate ranker",
        # A first model is always served; a later one takes over when it passes the quality gates
        # (which it cannot with too few validation users: the gates do not decide then).
        lambda: run_training(layout, config, settings.model_name, always_promote=not has_champion,
                             settings=settings))
    if report.gates_passed and not report.promoted:
        try:  # only over the champion read before training: a move made meanwhile is kept
            registry.set_alias(settings.model_name, "champion", report.version, reason="passed the gates (quickstart)",
                               expected=champion)
            report.aliases.append("champion")
            report.promoted = True
        except ConflictError as exc:
            console.print(f"  [yellow]champion not moved:[/] {exc}", highlight=False)
    result.metrics, result.model_version = report.metrics, report.version
    console.print("  " + format_metrics(report.metrics).replace("\n", "\n  "))
    # format_metrics said, per baseline, whether the model beats it (two paired standard errors)
    won = [b for b, ok in report.beats_baselines().items() if ok]
    lost = [b for b, ok in report.beats_baselines().items() if not ok]
    console.print(f"  {settings.model_name} v{report.version}: "
                  + (f"[green]beats {', '.join(won)}[/]" if won else "")
                  + ("; " if won and lost else "") + (f"[red]does NOT beat {', '.join(lost)}[/]" if lost else "")
                  + f"; {'champion' if report.promoted else 'registered, champion unchanged'}")

    from aiplatform.jobs.index import run_index

    table = stages.run("index", "embedding the catalogue into LanceDB (Ray Data actor pool)",
                       lambda: run_index(layout, settings.model_name, "champion"))
    console.print(f"  LanceDB table {table} under {layout.vectors}")

    if opts.serve:
        from aiplatform.serving import app as serving

        # On loopback the quickstart runs open (only this machine can call it) and says so; on any
        # other address the API needs keys, like `aiplatform serve`.
        auth = "off" if is_loopback(settings.http_host) else "keys"
        url = stages.run("serve", f"starting Ray Serve on {settings.http_host}:{settings.http_port}",
                         lambda: serving.start(serving.build_app(layout, settings.model_name, settings=settings,
                                                                 auth=auth),
                                               settings.http_host, settings.http_port))
        result.url = url
        if auth == "off":
            console.print(f"  [yellow]API open[/] (no API keys) because it listens on {settings.http_host} only; "
                          "`aiplatform serve` requires keys: aiplatform keys create NAME --role reader",
                          highlight=False)
        result.demo = stages.run("demo", "sending a recommendation request", lambda: _demo(layout, url, console))
    result.timings["total"] = round(time.perf_counter() - total_started, 2)
    write_json(join(layout.root, "quickstart_timings.json"), result.timings)
    _print_timings(console, result.timings)
    return result


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach ``host`` (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _quiet_ray_logs() -> None:
    import logging

    import ray.data

    for name in ("ray", "ray.data", "ray.train", "ray.serve"):
        logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def _demo(layout: Layout, url: str, console: Console) -> dict[str, Any]:
    from aiplatform.data import lake

    users = lake.read_events(layout, columns=["user_id"])["user_id"]
    user_id = str(users.value_counts().idxmax()) if len(users) else "anonymous"  # the most active user
    body = {"user_id": user_id, "k": 5}
    resp = httpx.post(f"{url}/v1/recommendations", json=body, timeout=60)
    resp.raise_for_status()
    payload = resp.json()
    console.print_json(json.dumps(payload))
    console.print("\nTry it yourself:")
    console.print(f"  curl -s -X POST {url}/v1/recommendations -H 'Content-Type: application/json' "
                  f"-d '{json.dumps(body)}'", soft_wrap=True, highlight=False)
    if payload.get("items"):
        console.print(f"  curl -s '{url}/v1/items/{payload['items'][0]['item_id']}/similar?k=5'",
                      soft_wrap=True, highlight=False)
    console.print(f"  open {url}/docs for the OpenAPI page", highlight=False)
    console.print(f"  open {url}/shop for the storefront and {url}/console for the platform console",
                  highlight=False)
    return payload


def _print_timings(console: Console, timings: dict[str, float]) -> None:
    table = Table(title="quickstart stage timings", show_edge=False)
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, secs in timings.items():
        table.add_row(name, f"{secs:.1f}")
    console.print(table)


def wait_until_interrupted(console: Console) -> None:
    """Serve until Ctrl-C or SIGTERM."""
    def _raise(*_: Any) -> None:
        raise KeyboardInterrupt

    # Ray Train's fit() leaves its own SIGINT handler installed: take Ctrl-C back, and TERM too.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise)
    console.print("\n[bold]Serving.[/] Press Ctrl-C to stop.")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        console.print("stopping…")


def shutdown(joined: bool = False, app_name: str = "aiplatform") -> None:
    """Remove what this process started. On a cluster it joined (``RAY_ADDRESS``) that is this
    Serve application alone, never ``serve.shutdown()``: other applications keep serving. A
    private local instance is torn down whole."""
    import ray

    if not ray.is_initialized():
        return
    try:
        from aiplatform.serving.app import stop

        stop(app_name)
        if not joined:
            from ray import serve

            serve.shutdown()
    finally:
        ray.shutdown()
