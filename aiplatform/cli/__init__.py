"""aiplatform: features, training, a model registry, vector retrieval and serving on one Ray cluster.

Start with [bold]aiplatform quickstart[/]: it runs every stage on this machine and leaves a recommendation API running at http://127.0.0.1:8000 (OpenAPI page at /docs).

The other commands run one stage each, against the storage root in $AIPLATFORM_HOME (default ./.aiplatform) or --home.
"""

# The command's help above is for a person; this note is for whoever changes the command: each
# group lives in its own module, wired up here. The order below is the order `aiplatform --help`
# lists them in (commands first, then groups), so keep it.

import typer

from aiplatform.cli import (
    data,
    events,
    experiments,
    features,
    keys,
    models,
    quickstart,
    report,
    serve,
    training,
)

__all__ = ["app", "main"]

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, rich_markup_mode="rich")

app.command()(quickstart.quickstart)
app.command()(training.train)
app.command()(training.index)
app.add_typer(data.data_app, name="data")
app.add_typer(models.models_app, name="models")
app.add_typer(features.features_app, name="features")
app.add_typer(serve.serve_app, name="serve")
app.add_typer(experiments.experiments_app, name="experiments")
app.add_typer(keys.keys_app, name="keys")
app.add_typer(report.report_app, name="report")
app.add_typer(events.events_app, name="events")


def main() -> None:  # pragma: no cover
    """The `aiplatform` console script's body, for callers that want a plain function."""
    app()
