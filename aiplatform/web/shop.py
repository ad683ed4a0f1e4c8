"""The storefront (``/shop``): pick a user or browse as a guest, see what the served model
recommends, open an item and its similar items, add it to the cart or buy it.

A page is one call of the replica's own handlers (``recommend``, ``similar``, ``events``), so
what the page shows is what the API answers: the variant, the model version, whether a
fallback was used and how long the request took. A purchase goes through ``POST /v1/events``'s
handler, which updates the buyer's online row synchronously and drops their cached answer, and
the page then redirects back to the list (post/redirect/get): the next list is computed after
the purchase, so it shows the change at once. No JavaScript is needed.

Who the storefront acts as, since a browser must never hold a key above reader/writer:

- auth off (the quickstart on 127.0.0.1): nobody, like the API;
- auth on: the key named ``shop`` (``aiplatform keys create shop --role writer``; a reader key
  shows recommendations without the buttons). The key's plaintext is not needed anywhere: the
  page runs in the replica and acts under the key's name, and revoking the key closes the shop
  within seconds. An admin signed in to the console may use the shop too. Without either, the
  page says how to open it (403).
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from datetime import datetime, timezone
from urllib.parse import urlencode

from fastapi import APIRouter, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import ValidationError

from aiplatform.core.errors import NotFoundError
from aiplatform.security.guard import ANONYMOUS
from aiplatform.security.keys import ApiKey, Role
from aiplatform.serving.schemas import EventsRequest, RecommendationRequest
from aiplatform.web.base import field_errors, form, guard, installed, key_label, render, session_of
from aiplatform.web.session import CONSOLE_COOKIE, SHOP_COOKIE, Session, current_key

router = APIRouter(include_in_schema=False)
SHOP_KEY_NAME = "shop"
"""The API key the storefront acts as when auth is on (its role: reader or writer)."""
LIST_SIZE = 12
SIMILAR_SIZE = 8
ACTIONS = {"add_to_cart": "Added to cart", "purchase": "Bought"}


def shop_actor(request: Request) -> tuple[ApiKey | None, str]:
    """The key the storefront acts as for this browser, or None and why not."""
    keys = guard()
    if keys.open:
        return ANONYMOUS, ""
    admin = current_key(session_of(request, CONSOLE_COOKIE), keys.keys())
    if admin is not None and admin.role >= Role.admin:
        return admin, ""
    shop = next((k for k in keys.keys() if k.name == SHOP_KEY_NAME), None)
    if shop is None:
        return None, (f"The storefront is closed: API keys are on and there is no key named '{SHOP_KEY_NAME}'. "
                      f"Create one for it: aiplatform keys create {SHOP_KEY_NAME} --role writer (its value is "
                      "never needed by the page), or sign in to the console as an admin.")
    if shop.role > Role.writer:
        return None, (f"The storefront is closed: the key '{SHOP_KEY_NAME}' has role {shop.role.name}, and a page "
                      f"that anyone may open must not act as an admin. Revoke it and create it again with "
                      "--role writer (or reader, to show recommendations without buying).")
    return shop, ""


def _base(request: Request) -> str:
    return request.scope.get("root_path", "").rstrip("/")


def _shopper(request: Request) -> Session:
    """This browser's storefront session (a guest id for browsing without picking a user)."""
    session = session_of(request, SHOP_COOKIE)
    if session is None or not session.visitor:
        session = Session(visitor=f"guest-{secrets.token_hex(4)}")
    return session


def _closed(request: Request, why: str, shopper: Session) -> HTMLResponse:
    return render(request, "message.html", {"base": _base(request), "title": "Storefront closed", "message": why},
                  status=403, session=shopper, cookie=SHOP_COOKIE)


async def _enter(request: Request) -> tuple[Session, ApiKey | None, HTMLResponse | None]:
    """This browser's session and the key the storefront acts as, with the catalogue refreshed
    off the replica's loop; or, when the shop is closed to it, the page to answer instead."""
    shopper = _shopper(request)
    actor, why = shop_actor(request)
    if actor is None:
        return shopper, None, _closed(request, why, shopper)
    await asyncio.to_thread(installed().catalogue.refresh)
    return shopper, actor, None


def _bad_input(request: Request, message: str, shopper: Session, status: int = 422) -> HTMLResponse:
    return render(request, "message.html", {"base": _base(request), "title": "That did not work", "message": message,
                                            "back": f"{_base(request)}/shop"},
                  status=status, session=shopper, cookie=SHOP_COOKIE)


@router.get("/shop", response_class=HTMLResponse)
async def shop(request: Request,
               user: str = Query("", max_length=256, description="Shop as this user; empty: as a guest."),
               done: str = Query("", max_length=300)) -> Response:
    shopper, actor, closed = await _enter(request)
    if closed is not None:
        return closed
    state = installed()
    user_id = user.strip() or shopper.visitor
    try:
        body = RecommendationRequest(user_id=user_id, k=LIST_SIZE)
    except ValidationError as exc:
        return _bad_input(request, field_errors(exc) + ": pick a user id of 1-256 characters",
                          shopper)
    started = time.perf_counter()
    answer = await state.replica.recommend(body)
    latency_ms = (time.perf_counter() - started) * 1000
    items = [(state.catalogue.item(i.item_id), i.score) for i in answer.items]
    return render(request, "shop.html", {
        "base": _base(request), "user": user.strip(), "user_id": user_id, "guest": not user.strip(),
        "sample_users": state.catalogue.sample_users(), "items": items, "answer": answer,
        "latency_ms": latency_ms, "can_write": actor.role >= Role.writer, "actor": key_label(actor), "done": done,
    }, session=shopper, cookie=SHOP_COOKIE)


@router.get("/shop/items/{item_id}", response_class=HTMLResponse)
async def item(request: Request, item_id: str = Path(..., min_length=1, max_length=256),
               user: str = Query("", max_length=256), rid: str = Query("", max_length=128)) -> Response:
    shopper, actor, closed = await _enter(request)
    if closed is not None:
        return closed
    state = installed()
    try:
        similar = await state.replica.similar(item_id=item_id, k=SIMILAR_SIZE)
        neighbours = [(state.catalogue.item(i.item_id), i.score) for i in similar.items]
        missing = ""
    except NotFoundError as exc:
        neighbours, missing = [], str(exc)
    return render(request, "item.html", {
        "base": _base(request), "item": state.catalogue.item(item_id), "similar": neighbours, "missing": missing,
        "user": user.strip(), "user_id": user.strip() or shopper.visitor, "rid": rid,
        "can_write": actor.role >= Role.writer, "actor": key_label(actor),
    }, status=404 if missing and state.catalogue.item(item_id).title is None else 200,
        session=shopper, cookie=SHOP_COOKIE)


@router.post("/shop/events", response_class=HTMLResponse)
async def event(request: Request) -> Response:
    """Add to cart or buy (a form): the event goes through the events handler, then back to the
    list, which now reflects it."""
    shopper, actor, closed = await _enter(request)
    if closed is not None:
        return closed
    fields = await form(request)
    state = installed()
    if not state.codec.csrf_ok(session_of(request, SHOP_COOKIE), fields.get("csrf")):
        return _bad_input(request, "This form has expired or came from another site (its CSRF token does not "
                                   "match this browser's session): reload the page and try again.", shopper, 403)
    if actor.role < Role.writer:
        return _bad_input(request, f"The storefront's key '{actor.name}' is a reader: it shows recommendations but "
                                   "cannot record events. Create the shop key with --role writer.", shopper, 403)
    kind = fields.get("event_type", "")
    if kind not in ACTIONS:
        return _bad_input(request, f"event_type {kind!r}: expected one of {', '.join(ACTIONS)}", shopper)
    user = fields.get("user", "").strip()
    user_id = user or shopper.visitor
    event = {"user_id": user_id, "item_id": fields.get("item_id", ""), "event_type": kind,
             "timestamp": datetime.now(timezone.utc), "event_id": f"shop-{uuid.uuid4().hex}"}
    price = state.catalogue.item(event["item_id"]).price if event["item_id"] else None
    if price is not None:
        event["value"] = price
    if fields.get("rid"):
        event["request_id"] = fields["rid"]
    try:
        body = EventsRequest(events=[event])
    except ValidationError as exc:
        return _bad_input(request, field_errors(exc), shopper)
    result = await state.replica.events(body)
    if isinstance(result, JSONResponse):  # 422 (the data contract) or 503 (the online store is down)
        import json

        detail = json.loads(result.body).get("message", "the event was not recorded")
        return _bad_input(request, detail, shopper, result.status_code)
    done = f"{ACTIONS[kind]}: {state.catalogue.item(event['item_id']).name}"
    query = urlencode({k: v for k, v in (("user", user), ("done", done)) if v})
    return RedirectResponse(f"{_base(request)}/shop?{query}", status_code=303)
