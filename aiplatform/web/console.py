"""The platform console (``/console``, admin role): models, experiments, features, serving, jobs.

Signing in takes an admin API key once and answers with a session cookie (``web.session``):
the key itself is not kept, in the cookie or anywhere else. A reader or writer key is refused
(403) and gets no session. With auth off (the quickstart on 127.0.0.1) the console is open, as
the admin API is, and says so on every page.

Every action (promote, rollback, sign out) is a form with the session's CSRF token, and the
two that move an alias go through a confirmation page that asks for a reason; they call the
admin API's own handlers (``serving.admin``), so the registry's compare-and-set, the vector
index check and the actor (``api-key:<name>``) are the same as over HTTP.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from pydantic import ValidationError

from aiplatform.core.errors import AIPlatformError, NotFoundError, UserInputError
from aiplatform.security.guard import ANONYMOUS, Denied
from aiplatform.security.keys import ApiKey, Role
from aiplatform.serving import admin
from aiplatform.web import status
from aiplatform.web.base import field_errors, form, guard, installed, key_label, render, session_of, set_session
from aiplatform.web.session import CONSOLE_COOKIE, Session, current_key, signed_in

router = APIRouter(include_in_schema=False)
TABS = ("models", "experiments", "features", "serving", "jobs")


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _admin(request: Request) -> tuple[ApiKey, Session] | Response:
    """The signed-in admin and their session, or the response to give instead: the sign-in
    page for no (or an ended) session, 403 for a key that is no longer admin."""
    keys = guard()
    session = session_of(request, CONSOLE_COOKIE)
    if keys.open:
        return ANONYMOUS, session or Session()
    key = current_key(session, keys.keys())
    if key is None:
        return RedirectResponse(f"{_base(request)}/console/signin", status_code=303)
    if key.role < Role.admin:
        return _message(request, "Admins only", f"Key '{key.name}' has role {key.role.name}: the console needs an "
                                                "admin key.", 403, session)
    return key, session


def _message(request: Request, title: str, message: str, status_code: int, session: Session | None,
             back: str = "") -> HTMLResponse:
    return render(request, "message.html", {"base": _base(request), "title": title, "message": message,
                                            "back": back}, status=status_code, session=session)


def _page(request: Request, tab: str, key: ApiKey, session: Session, template: str, context: dict[str, Any],
          status_code: int = 200) -> HTMLResponse:
    return render(request, template, {"base": _base(request), "tab": tab, "tabs": TABS, "who": key_label(key),
                                      "auth_off": key is ANONYMOUS, **context}, status=status_code, session=session)


async def _checked_form(request: Request, session: Session) -> dict[str, str] | None:
    fields = await form(request)
    return fields if installed().codec.csrf_ok(session_of(request, CONSOLE_COOKIE), fields.get("csrf")) else None


def _csrf_refused(request: Request, session: Session) -> HTMLResponse:
    return _message(request, "Form refused", "This form has expired or came from another site (its CSRF token does "
                                             "not match your session): reload the page and try again.", 403, session,
                    back=f"{_base(request)}/console")


# ---- signing in -------------------------------------------------------------------------------
@router.get("/console", response_class=HTMLResponse)
async def console(request: Request) -> Response:
    return RedirectResponse(f"{_base(request)}/console/models", status_code=303)


@router.get("/console/signin", response_class=HTMLResponse)
async def signin_page(request: Request) -> Response:
    if guard().open:
        return RedirectResponse(f"{_base(request)}/console/models", status_code=303)
    session = session_of(request, CONSOLE_COOKIE) or Session()
    return render(request, "signin.html", {"base": _base(request), "error": ""}, session=session)


@router.post("/console/signin", response_class=HTMLResponse)
async def signin(request: Request) -> Response:
    session = session_of(request, CONSOLE_COOKIE) or Session()
    fields = await _checked_form(request, session)
    if fields is None:
        return _csrf_refused(request, session)
    try:
        key = guard().check(f"Bearer {fields.get('key', '').strip()}", Role.admin)
    except Denied as denied:
        message = (f"{denied.message}." if denied.status == 403 else
                   "Unknown or revoked API key: paste an admin key (aiplatform keys create NAME --role admin).")
        return render(request, "signin.html", {"base": _base(request), "error": message}, status=denied.status,
                      session=session)
    fresh = signed_in(key)  # a new session id: nothing from before signing in carries over
    response = RedirectResponse(f"{_base(request)}/console/models", status_code=303)
    set_session(response, request, CONSOLE_COOKIE, fresh)
    return response


@router.post("/console/signout", response_class=HTMLResponse)
async def signout(request: Request) -> Response:
    session = session_of(request, CONSOLE_COOKIE) or Session()
    if await _checked_form(request, session) is None:
        return _csrf_refused(request, session)
    response = RedirectResponse(f"{_base(request)}/console/signin", status_code=303)
    response.delete_cookie(CONSOLE_COOKIE, path="/")
    return response


# ---- models -------------------------------------------------------------------------------------
@router.get("/console/models", response_class=HTMLResponse)
async def models(request: Request, name: str = Query("", max_length=128), done: str = Query("", max_length=500)
                 ) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    try:
        data = await asyncio.to_thread(status.models, installed().layout, name or None)
    except AIPlatformError as exc:
        return _message(request, "No such model", str(exc), 404, who[1], back=f"{_base(request)}/console/models")
    return _page(request, "models", *who, "models.html", {"m": data, "done": done})


# before the card's route: "rollback" would otherwise be read as a version number
@router.get("/console/models/{name}/rollback", response_class=HTMLResponse)
async def rollback_page(request: Request, name: str = Path(..., max_length=128),
                        alias: str = Query("champion", min_length=1, max_length=128)) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    try:
        current, previous = await asyncio.to_thread(status.rollback_target, installed().layout, name, alias)
    except AIPlatformError as exc:
        return _message(request, "Cannot roll back", str(exc), 400, who[1])
    return _page(request, "models", *who, "confirm.html", {
        "action": "rollback", "name": name, "version": previous, "alias": alias, "current": current, "error": ""})


@router.get("/console/models/{name}/{version}", response_class=HTMLResponse)
async def card(request: Request, name: str = Path(..., max_length=128), version: int = Path(..., ge=1)) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    try:
        data = await asyncio.to_thread(status.model_card, installed().layout, name, version)
    except AIPlatformError as exc:
        return _message(request, "No such version", str(exc), 404, who[1], back=f"{_base(request)}/console/models")
    return _page(request, "models", *who, "card.html", {"c": data})


@router.get("/console/models/{name}/{version}/promote", response_class=HTMLResponse)
async def promote_page(request: Request, name: str = Path(..., max_length=128), version: int = Path(..., ge=1),
                       alias: str = Query("champion", min_length=1, max_length=128)) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    try:
        data = await asyncio.to_thread(status.models, installed().layout, name)
    except AIPlatformError as exc:
        return _message(request, "No such model", str(exc), 404, who[1])
    if version not in {v["version"] for v in data["versions"]}:
        return _message(request, "No such version", f"model {name!r} has no version {version}", 404, who[1],
                        back=f"{_base(request)}/console/models?name={name}")
    return _page(request, "models", *who, "confirm.html", {
        "action": "promote", "name": name, "version": version, "alias": alias,
        "current": data["aliases"].get(alias), "error": ""})


async def _move(request: Request, name: str, action: str) -> Response:
    """Promote or roll back through the admin API's handlers, after checking the form."""
    who = _admin(request)
    if isinstance(who, Response):
        return who
    key, session = who
    fields = await _checked_form(request, session)
    if fields is None:
        return _csrf_refused(request, session)
    alias, reason = fields.get("alias", "champion").strip(), fields.get("reason", "").strip()
    version = fields.get("version", "")
    if fields.get("confirm") != "yes":
        return _message(request, "Not confirmed", "Tick the confirmation box to move the alias.", 422, session,
                        back=f"{_base(request)}/console/models?name={name}")
    if not reason:
        return _message(request, "A reason is needed", "reason: say why (it is kept in the alias history).", 422,
                        session, back=f"{_base(request)}/console/models?name={name}")
    request.state.api_key = key  # the actor the admin handlers record
    try:
        if action == "promote":
            body: Any = admin.AliasMove(version=version, alias=alias, reason=reason)
            result = await admin.promote(body, request, name)
        else:
            body = admin.Rollback(alias=alias, reason=reason)
            result = await admin.rollback(body, request, name)
    except ValidationError as exc:
        return _message(request, "That did not work", field_errors(exc), 422, session,
                        back=f"{_base(request)}/console/models?name={name}")
    except (NotFoundError, UserInputError) as exc:
        return _message(request, "That did not work", str(exc), 404 if isinstance(exc, NotFoundError) else 400,
                        session, back=f"{_base(request)}/console/models?name={name}")
    if isinstance(result, JSONResponse):  # 409: the alias moved meanwhile, or no vector index
        return _message(request, "Not moved", json.loads(result.body)["detail"], result.status_code, session,
                        back=f"{_base(request)}/console/models?name={name}")
    done = (f"{result.alias} of {name} now points at v{result.version} (was v{result.previous}); "
            f"recorded by {result.actor}: {result.reason}" if result.changed else
            f"{result.alias} of {name} already pointed at v{result.version}: nothing changed")
    return RedirectResponse(f"{_base(request)}/console/models?{urlencode({'name': name, 'done': done})}",
                            status_code=303)


@router.post("/console/models/{name}/promote", response_class=HTMLResponse)
async def promote(request: Request, name: str = Path(..., max_length=128)) -> Response:
    return await _move(request, name, "promote")


@router.post("/console/models/{name}/rollback", response_class=HTMLResponse)
async def rollback(request: Request, name: str = Path(..., max_length=128)) -> Response:
    return await _move(request, name, "rollback")


# ---- the other tabs -----------------------------------------------------------------------------
@router.get("/console/experiments", response_class=HTMLResponse)
async def experiments(request: Request) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    data = await asyncio.to_thread(status.experiments, installed().layout)
    return _page(request, "experiments", *who, "experiments.html", {"experiments": data})


@router.get("/console/features", response_class=HTMLResponse)
async def features(request: Request) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    replica = installed().replica
    try:
        data = await asyncio.to_thread(status.features, installed().layout, replica.versions.features_module,
                                       replica.service_name, replica.versions.online_store)
    except AIPlatformError as exc:
        return _message(request, "Features unavailable", str(exc), 503, who[1])
    return _page(request, "features", *who, "features.html", {"f": data})


@router.get("/console/serving", response_class=HTMLResponse)
async def serving(request: Request) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    data = await asyncio.to_thread(status.serving, installed().replica)
    return _page(request, "serving", *who, "serving.html", {"s": data})


@router.get("/console/jobs", response_class=HTMLResponse)
async def jobs(request: Request) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    data = await asyncio.to_thread(status.jobs)
    return _page(request, "jobs", *who, "jobs.html", {"j": data})


@router.get("/console/jobs/{submission_id}/logs", response_class=PlainTextResponse)
async def job_logs(request: Request, submission_id: str = Path(..., min_length=1, max_length=256)) -> Response:
    who = _admin(request)
    if isinstance(who, Response):
        return who
    try:
        logs = await asyncio.to_thread(status.job_logs, submission_id)
    except Exception as exc:  # no dashboard, unknown job: the page says which
        return _message(request, "No logs", str(exc), 404, who[1], back=f"{_base(request)}/console/jobs")
    return PlainTextResponse(logs, headers={"Cache-Control": "no-store"})
