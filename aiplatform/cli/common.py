"""What every command group of the CLI shares: the consoles, the --home option and how errors
end a command.

One place decides the exit codes (2: bad input, 1: anything else), so every group reports
failures the same way and a script can tell a typo from a broken cluster.
"""

from collections.abc import Callable
from typing import Optional

import typer
from rich.console import Console

from aiplatform.core.errors import NotFoundError, UserInputError

console = Console()
err = Console(stderr=True)

HomeOpt = typer.Option(None, "--home", help="Storage root (default: $AIPLATFORM_HOME or ./.aiplatform).")


def fail(exc: Exception) -> typer.Exit:
    """Print the error for a person, and exit 2 for bad input, 1 for anything else."""
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    return typer.Exit(2 if isinstance(exc, UserInputError) else 1)


def fail_named(exc: Exception) -> typer.Exit:
    """A model, version or alias named on the command line that does not exist is bad input (2)."""
    return fail(UserInputError(str(exc)) if isinstance(exc, NotFoundError) else exc)


def run_job(module_main: Callable[[list[str]], int], home: Optional[str], extra: list[str]) -> None:
    """Run a `python -m aiplatform.jobs.X` entry point in-process: the CLI and `ray job submit`
    then run the same code, and its exit code becomes the command's."""
    args = (["--home", home] if home else []) + extra
    code = module_main(args)
    if code:
        raise typer.Exit(code)
