"""`aiplatform report`: what the platform costs to run.

``report cost`` prices serving per 1,000 requests and each registered training run, from the
reserved CPU- and GPU-seconds Ray accounts for (aiplatform/observability/cost.py).
"""

from typing import Optional

import typer
from rich.table import Table

from aiplatform.cli.common import HomeOpt, console, fail
from aiplatform.core.errors import AIPlatformError, UserInputError
from aiplatform.core.settings import Settings
from aiplatform.core.storage import Layout

report_app = typer.Typer(help="Reports on the running platform: what it costs.", no_args_is_help=True)


def _n(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


@report_app.command("cost")
def cost(
    home: Optional[str] = HomeOpt,
    prices: Optional[str] = typer.Option(None, "--prices", help="YAML price table: cpu_hour, gpu_hour, currency "
                                                                "(default 0.05 and 2.50 USD)."),
    model: str = typer.Option("two_tower", help="Registered model whose training runs to price."),
    application: Optional[str] = typer.Option("aiplatform", help="Serve application to price ('' for all)."),
    prometheus: Optional[str] = typer.Option(None, help="Prometheus URL (scraping with cluster/observability/"
                                                        "prometheus-scrape.yml): price the last --window instead "
                                                        "of the totals since the replicas started."),
    window: str = typer.Option("1h", help="With --prometheus: a PromQL duration, e.g. 15m, 1h, 7d."),
    serving: bool = typer.Option(True, help="Price serving (needs a running app: Ray at $RAY_ADDRESS, or "
                                            "--prometheus)."),
) -> None:
    """CPU- and GPU-seconds per 1,000 requests and per training run, times a price table.

    The seconds are the ones Ray reserved (logical CPUs/GPUs held by serving replicas and training
    workers, times how long they held them): what a cluster pays for. Serving also shows the CPU
    its replicas used, so an over-sized reservation shows."""
    from aiplatform.observability import cost as costs
    from aiplatform.registry import ModelRegistry

    try:
        table_prices = costs.Prices.load(prices)
        settings = Settings.load(home=home)
        layout = Layout.open(settings.home)
        runs = [costs.training_cost(model, v.version, v.params or {}, v.lineage or {})
                for v in ModelRegistry(layout).list_versions(model)]
        usage = _serving_usage(settings, application or None, prometheus, window) if serving else None
    except AIPlatformError as exc:
        raise fail(exc)
    currency = table_prices.currency
    console.print(f"prices: CPU {table_prices.cpu_hour:g} {currency}/hour, GPU {table_prices.gpu_hour:g} "
                  f"{currency}/hour" + (f" ({prices})" if prices else " (defaults; --prices FILE to set yours)"),
                  highlight=False)
    if usage is not None:
        _print_serving(usage, table_prices)
    _print_training(model, runs, table_prices)


def _serving_usage(settings: Settings, application: str | None, prometheus: str | None, window: str):
    from aiplatform.observability import cost as costs

    if prometheus:
        return costs.serving_usage_from_prometheus(prometheus, window, application)
    if not settings.ray_address:
        raise UserInputError("serving costs are read from a running cluster: set RAY_ADDRESS (or pass "
                             "--prometheus URL), or --no-serving for training runs only")
    import ray

    from aiplatform.core.runtime import ensure_ray

    ensure_ray(settings)
    try:
        return costs.serving_usage_from_ray(costs.ray_metrics_urls(), application)
    finally:
        ray.shutdown()


def _print_serving(usage, prices) -> None:
    table = Table(title=f"Serving ({usage.source})", title_justify="left")
    for col in ("requests", "reserved CPU-s", "used CPU-s", "reserved CPU-s / 1k req", "used CPU-s / 1k req",
                f"{prices.currency} / 1k req"):
        table.add_column(col, justify="right")
    per_k = usage.per_1000(usage.reserved_cpu_s)
    table.add_row(_n(usage.requests, 0), _n(usage.reserved_cpu_s), _n(usage.used_cpu_s), _n(per_k, 2),
                  _n(usage.per_1000(usage.used_cpu_s), 2), _n(None if per_k is None else prices.of(per_k), 5))
    console.print(table)
    if not usage.requests:
        console.print("no requests counted yet: serve some traffic, or widen --window", highlight=False)


def _print_training(model: str, runs, prices) -> None:
    if not runs:
        console.print(f"no registered versions of {model}: nothing trained to price", highlight=False)
        return
    table = Table(title=f"Training runs of {model} (reserved by Ray Train's worker group)", title_justify="left")
    for col, justify in (("version", "right"), ("run", "left"), ("seconds", "right"), ("workers", "right"),
                         ("CPU-s", "right"), ("GPU-s", "right"), (prices.currency, "right"), ("note", "left")):
        table.add_column(col, justify=justify)
    for run in runs:
        price = None if run.cpu_s is None else prices.of(run.cpu_s, run.gpu_s or 0.0)
        table.add_row(str(run.version), run.run, _n(run.seconds), str(run.workers), _n(run.cpu_s), _n(run.gpu_s),
                      _n(price, 4), "; ".join(run.notes))
    console.print(table)
