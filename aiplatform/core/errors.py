"""Errors that reach users. Each one says what was wrong and what to do next.

The CLI maps ``UserInputError`` to exit code 2 and the HTTP layer maps it to a 4xx, so the
message is written for the person who supplied the input, never as a stack trace.
"""


class AIPlatformError(Exception):
    """Base class for errors raised by aiplatform."""


class UserInputError(AIPlatformError):
    """Input supplied by the user is invalid; nothing already stored was changed."""


class DataValidationError(UserInputError):
    """A data file does not match its contract.

    Carries the file, the column, how many rows failed and what was expected, so the message
    can name all four.
    """

    def __init__(
        self,
        file: str,
        problem: str,
        *,
        column: str | None = None,
        failed_rows: int | None = None,
        expected: str | None = None,
        hint: str | None = None,
    ) -> None:
        self.file = file
        self.column = column
        self.failed_rows = failed_rows
        self.expected = expected
        parts = [f"{file}:"]
        if column is not None:
            parts.append(f"column '{column}':")
        parts.append(problem)
        if failed_rows is not None:
            parts.append(f"({failed_rows} row{'s' if failed_rows != 1 else ''} failed)")
        msg = " ".join(parts)
        if expected:
            msg += f"; expected {expected}"
        if hint:
            msg += f". {hint}"
        super().__init__(msg)


class NotFoundError(AIPlatformError):
    """Something the caller named (a model, an alias, a table) does not exist."""


class ConfigError(UserInputError):
    """A configuration value is invalid."""


class ConflictError(AIPlatformError):
    """A compare-and-set write lost to a concurrent one: what the caller read is stale.

    The message names the write that won; re-read and retry if the change still makes sense.
    """
