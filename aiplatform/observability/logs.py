"""Structured (JSON) log lines of the serving replicas, each naming its request and trace.

Why through Ray Serve's replica logger rather than a handler of our own: Serve already writes one
log file per replica (``<ray logs>/serve/replica_<app>_<deployment>_<id>.log``), which the Ray
dashboard shows, ``ray logs`` fetches and a cluster's log shipper tails, and its deployment
option ``logging_config`` (``LoggingConfig(encoding="JSON" | "TEXT", log_level=...)``) is the
knob operators know. In JSON encoding Serve's formatter writes every attribute of a record, and
its filters add the replica, deployment, application, route and Serve's ``request_id``.

Serve only writes the ``ray.serve`` logger there; ``aiplatform.*`` lines would otherwise go to
the root logger (dropped below WARNING, and unstructured). ``install_replica_logging`` hands
them to Serve's logger, at its level, and adds to every line, ours and Serve's:

- ``request_id``: the request being handled (``REQUEST_ID``: the client's ``X-Request-ID`` when
  valid, else the id this app made). Serve's own request id is the same value under both Serve
  ingresses (HAProxy sets ``x-request-id`` when the client did not, the Python proxy likewise),
  except that an invalid client id is kept by Serve and replaced here; and inside a
  ``@serve.batch`` task Serve's context is the batch loop's, not the requests': the batch sets
  ``REQUEST_ID`` to the ids of its requests, comma-separated.
- ``trace_id`` / ``span_id``: the current OpenTelemetry span (``observability.tracing``), when
  one is recording, so that a log line leads to its trace and back.
- ``logger``: the Python logger's name (Serve's JSON has the file name only).

Outside a Serve replica (a plain process, a unit test) nothing is changed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

REQUEST_ID: ContextVar[str | None] = ContextVar("aiplatform_request_id", default=None)
"""The id of the request being handled in this context (set by the app's request-id middleware)."""

SERVE_LOGGER = "ray.serve"
OUR_LOGGER = "aiplatform"
LOG_FORMATS = ("json", "text")


@contextmanager
def request_id_context(request_id: str | None) -> Iterator[None]:
    """``REQUEST_ID`` set to ``request_id`` within the block (a function, not the variable: a
    Serve deployment's methods are pickled with their globals, and a ContextVar cannot be)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


def serve_logging_config(log_format: str, log_level: str = "INFO") -> dict[str, str]:
    """The deployment option ``logging_config`` for ``log_format`` (json or text)."""
    if log_format not in LOG_FORMATS:
        from aiplatform.core.errors import ConfigError

        raise ConfigError(f"log format {log_format!r}: expected one of {', '.join(LOG_FORMATS)} "
                          "(AIPLATFORM_LOG_FORMAT)")
    return {"encoding": log_format.upper(), "log_level": log_level.upper()}


class ContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id``, ``span_id`` and ``logger`` to a record (never drops
    one). Put on Serve's handlers after Serve's own filters, so that this app's request id wins
    over Serve's batch-loop context."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id:
            record.request_id = request_id
        record.__dict__.pop("_request_id_prefixed", None)  # serving.app's marker: not a field
        if record.name.startswith(OUR_LOGGER):
            record.logger = record.name
        ids = _current_trace_ids()
        if ids is not None:
            record.trace_id, record.span_id = ids
        return True


def _current_trace_ids() -> tuple[str, str] | None:
    try:
        from opentelemetry import trace
    except ImportError:  # tracing is an optional extra at runtime
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


class _ToServeLogger(logging.Handler):
    """Hands ``aiplatform.*`` records to Serve's replica logger (its file, format and filters),
    putting ``ContextFilter`` back on Serve's handlers if Serve replaced them (a new
    ``logging_config`` is applied in place).

    Then flushes Serve's buffer: Ray's throughput-optimized mode (``RAY_SERVE_THROUGHPUT_
    OPTIMIZED``, on with the HAProxy ingress) holds replica log lines until 1,000 are buffered
    (``RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE``) or an ERROR comes, so a WARNING about a failing
    online store could wait for hours on a quiet replica. Our lines are few (warnings, failures;
    one per request only at DEBUG), so writing them at once costs little."""

    def __init__(self) -> None:
        super().__init__()
        self.serve = logging.getLogger(SERVE_LOGGER)

    def emit(self, record: logging.LogRecord) -> None:
        attach_context_filter(self.serve)
        self.serve.handle(record)
        for handler in self.serve.handlers:
            handler.flush()


def attach_context_filter(logger: logging.Logger) -> None:
    for handler in logger.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())


def install_replica_logging() -> bool:
    """In a Serve replica: ``aiplatform.*`` lines go to the replica's log file at the level of
    the deployment's ``logging_config``, with the fields above. Returns whether it did (False
    outside a replica, where Serve's logger has no handler). Idempotent."""
    serve = logging.getLogger(SERVE_LOGGER)
    if not serve.handlers:
        return False
    ours = logging.getLogger(OUR_LOGGER)
    attach_context_filter(serve)
    if not any(isinstance(h, _ToServeLogger) for h in ours.handlers):
        ours.addHandler(_ToServeLogger())
    ours.setLevel(serve.level or logging.INFO)
    ours.propagate = False  # else a second, unstructured copy reaches the root logger
    return True


__all__ = ["LOG_FORMATS", "REQUEST_ID", "ContextFilter", "install_replica_logging", "request_id_context",
           "serve_logging_config"]
