"""What every page shares: the replica it runs in, templates, sessions, forms.

The pages run in the serving replica itself (the same FastAPI app), so the storefront calls
the replica's own handlers in-process: a recommendation from ``/shop`` takes the same path,
cache, experiment routing and metrics as ``POST /v1/recommendations``, and no key travels over
a loopback hop. ``install`` is called once by the replica, like ``serving.admin.install``: the
routes read this module's state through functions (the ingress app is pickled into the
replica, module functions by reference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fastapi import HTTPException, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError

from aiplatform.core.storage import Layout
from aiplatform.security.guard import KeyGuard
from aiplatform.security.keys import ApiKey
from aiplatform.serving import access
from aiplatform.web.catalogue import Catalogue
from aiplatform.web.session import (
    CONSOLE_COOKIE,
    CONSOLE_MAX_AGE_S,
    SHOP_MAX_AGE_S,
    Session,
    SessionCodec,
    cookie_options,
    load_secret,
)

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=str(HERE / "templates"))
MAX_FORM_BYTES = 16 * 1024
"""A page's form is a few short fields: anything larger is not one of ours."""


@dataclass
class Installed:
    layout: Layout
    replica: Any  # serving.app.RecommendationAPI (not imported: the app imports this package)
    codec: SessionCodec
    catalogue: Catalogue


_installed: Installed | None = None


def install(layout: Layout, replica: Any) -> None:
    """Called by the serving replica once it can answer (see the module doc)."""
    global _installed
    from aiplatform.web.traffic import window

    window()  # count requests from the start
    _installed = Installed(layout, replica, SessionCodec(load_secret(layout.root)), Catalogue(layout))


def installed() -> Installed:
    if _installed is None:
        raise HTTPException(503, detail="the application is starting; retry shortly", headers={"Retry-After": "1"})
    return _installed


def guard() -> KeyGuard:
    found = access.installed()
    if found is None:
        raise HTTPException(503, detail="the application is starting; retry shortly", headers={"Retry-After": "1"})
    return found


def https(request: Request) -> bool:
    """Whether the browser reached us over TLS (directly, or through a proxy that says so)."""
    forwarded = request.headers.get("x-forwarded-proto", "").split(",")[0].strip().lower()
    return request.url.scheme == "https" or forwarded == "https"


def session_of(request: Request, cookie: str) -> Session | None:
    max_age = CONSOLE_MAX_AGE_S if cookie == CONSOLE_COOKIE else SHOP_MAX_AGE_S
    return installed().codec.loads(cookie, request.cookies.get(cookie), max_age)


def set_session(response: Response, request: Request, cookie: str, session: Session) -> None:
    console = cookie == CONSOLE_COOKIE
    response.set_cookie(cookie, installed().codec.dumps(cookie, session),
                        **cookie_options(https(request), CONSOLE_MAX_AGE_S if console else SHOP_MAX_AGE_S,
                                         "strict" if console else "lax"))


async def form(request: Request) -> dict[str, str]:
    """An urlencoded form (first value of each field); a body that is not one is a 400 page."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise HTTPException(413, detail=f"form over {MAX_FORM_BYTES} bytes")
    try:
        parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=50)
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, detail="not a form: send application/x-www-form-urlencoded") from None
    return {k: v[0] for k, v in parsed.items()}


def render(request: Request, name: str, context: dict[str, Any], status: int = 200,
           session: Session | None = None, cookie: str = CONSOLE_COOKIE) -> HTMLResponse:
    """A page, with the CSRF token of ``session`` for its forms (and the cookie when new)."""
    context = {"request": request, "csrf": installed().codec.csrf_token(session) if session else "", **context}
    response = templates.TemplateResponse(request, name, context, status_code=status)
    if session is not None:  # re-signed on every page: the session expires after its idle time
        set_session(response, request, cookie, session)
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Content-Security-Policy"] = ("default-src 'self'; img-src 'self' data:; "
                                                   "frame-ancestors 'none'; form-action 'self'")
    return response


def field_errors(exc: ValidationError) -> str:
    """One clause per bad field, naming it: what a page shows for a 422."""
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ())) or 'form'}: "
                     f"{str(e.get('msg', 'invalid')).removeprefix('Value error, ')}" for e in exc.errors())


def key_label(key: ApiKey) -> str:
    return "auth off" if key.source == "auth off" else f"{key.name} ({key.role.name})"
