"""The ASGI layers every request of the HTTP API passes through before its route: its request id
and the body-size limit, plus the log filter that names the request in the ingress's log lines.

Kept apart from ``serving.app`` so the ingress module reads as the deployment and its routes; all
of these are pure ASGI (no extra task per request, unlike Starlette's ``BaseHTTPMiddleware``),
which matters on the 2-core machine where the ingress runs the whole pipeline.
``install_middleware`` fixes the order of the stack in one place, because the order is part of
the behaviour: a refused body must still be counted and still carry the request id.
"""

import logging
import uuid

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from aiplatform.observability.logs import REQUEST_ID as _REQUEST_ID
from aiplatform.observability.metrics import MetricsMiddleware
from aiplatform.observability.tracing import TracingMiddleware
from aiplatform.serving.schemas import MAX_EVENTS, MAX_REQUEST_ID, ErrorResponse

REQUEST_ID_HEADER = "X-Request-ID"
MAX_BODY_BYTES = 2 * 1024 * 1024
"""Largest request body: 1,000 events with 256-character ids fit; anything bigger is a 413."""

TOO_LARGE = {413: {"model": ErrorResponse, "description": f"The body is over {MAX_BODY_BYTES} bytes."}}
"""The OpenAPI entry of ``BodyLimitMiddleware``'s 413, for the routes that take a body."""


def valid_request_id(value: str | None) -> str | None:
    """``value`` when it can be a request id: 1..128 printable ASCII characters (safe in a
    header, a log line and the experiment tables); otherwise None and a new id is made."""
    if value and len(value) <= MAX_REQUEST_ID and value.isascii() and value.isprintable():
        return value
    return None


def current_request_id() -> str:
    """The id of the request being handled (the client's ``X-Request-ID`` or a new one)."""
    return _REQUEST_ID.get() or uuid.uuid4().hex


def _behind_serve_proxy() -> bool:
    try:
        from ray.serve.context import _get_internal_replica_context

        return _get_internal_replica_context() is not None
    except Exception:  # another Serve: assume it does not echo the header
        return False


class RequestIdMiddleware:
    """Gives each HTTP request its id: the client's ``X-Request-ID`` when valid, else a new one.
    The endpoints put it in the body (``request_id``), the response carries it in
    ``X-Request-ID`` (every response, errors too) and the ingress's log lines carry it.

    Serve's proxy already echoes the incoming header (or one it generated and passed on) in
    every response, 503s and 408s included; in a replica this middleware then adds the header
    only when it chose another id (the client's was invalid): that response has two
    ``X-Request-ID`` values, ours first. Pure ASGI (no extra task per request)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.echoed_by_proxy = _behind_serve_proxy()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"x-request-id"), None)
        request_id = valid_request_id(sent) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        add_header = not (self.echoed_by_proxy and sent == request_id)

        async def send_with_id(message: Message) -> None:
            if add_header and message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        token = _REQUEST_ID.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _REQUEST_ID.reset(token)


class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over ``limit`` bytes: refused from its ``Content-Length`` before it is
    read, or, sent in chunks, as soon as the chunks pass the limit (never buffered whole)."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY_BYTES) -> None:
        self.app, self.limit = app, limit

    async def _refuse(self, send: Send) -> None:
        body = (f'{{"detail": "request body over {self.limit} bytes: send at most '
                f'{MAX_EVENTS} events per call, or import files with `aiplatform data import`"}}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received, started = 0, False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._refuse(send)


class RequestIdLogFilter(logging.Filter):
    """The log lines of the logger it is put on name the request being handled
    (``record.request_id`` and a prefix), so a line in a plain-text log leads to its request."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = _REQUEST_ID.get()
        record.request_id = request_id or ""
        if request_id and not getattr(record, "_request_id_prefixed", False):
            record.msg = f"[request {request_id}] {record.msg}"
            record._request_id_prefixed = True
        return True


def name_requests_in(logger: logging.Logger) -> None:
    """Put a ``RequestIdLogFilter`` on ``logger`` unless it has one. Idempotent, so a module can
    call it at import and again where it runs: Serve unpickles the ingress class by value in a
    replica, which then need not import the class's module, nor run that module's top level."""
    if not any(isinstance(f, RequestIdLogFilter) for f in logger.filters):
        logger.addFilter(RequestIdLogFilter())


def install_middleware(api: FastAPI) -> None:
    """The ingress's middleware stack, outermost last (Starlette wraps each added one around the
    ones before): the request id outermost, so a 413 carries it too; metrics outside the body
    limit, so 413s are counted; tracing inside metrics, whose request labels it reads."""
    api.add_middleware(BodyLimitMiddleware)
    api.add_middleware(TracingMiddleware)
    api.add_middleware(MetricsMiddleware)
    api.add_middleware(RequestIdMiddleware)


__all__ = ["MAX_BODY_BYTES", "REQUEST_ID_HEADER", "TOO_LARGE", "BodyLimitMiddleware", "RequestIdLogFilter",
           "RequestIdMiddleware", "current_request_id", "install_middleware", "name_requests_in", "valid_request_id"]
