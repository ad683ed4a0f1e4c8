"""Who may call which route: the FastAPI dependency every route of the API declares.

``require(Role.reader)`` on a route lets a key of that role or higher through and answers 401
(no key, an unknown or revoked key; with ``WWW-Authenticate: Bearer``) or 403 (a key whose role
is too low) otherwise. The replica's ``KeyGuard`` is installed once, when the replica starts
(``install``): one serving replica is one process, so a module-level holder is that replica's.
"""

from fastapi import Depends, HTTPException, Request

from aiplatform.security.guard import Denied, KeyGuard
from aiplatform.security.keys import ApiKey, Role
from aiplatform.serving.schemas import ErrorResponse

_guard: KeyGuard | None = None

AUTH_RESPONSES = {
    401: {"model": ErrorResponse, "description": "No API key, or an unknown or revoked one "
                                                 "(`Authorization: Bearer <key>`)."},
    403: {"model": ErrorResponse, "description": "The key's role may not call this route."},
}


def install(guard: KeyGuard) -> None:
    global _guard
    if _guard is not None and _guard is not guard:
        _guard.close()
    _guard = guard


def installed() -> KeyGuard | None:
    return _guard


def require(role: Role):  # noqa: ANN201 (a FastAPI dependency marker)
    """A dependency that admits keys of ``role`` or higher; the key lands in ``request.state.api_key``."""

    async def check(request: Request) -> ApiKey:
        # through the module function: the ingress app (and this closure with it) is pickled by
        # value into the replica, with a copy of this module's globals; ``installed`` is not
        guard = installed()
        if guard is None:  # a route served before the replica finished starting: never open
            raise HTTPException(503, detail="the application is starting; retry shortly",
                                headers={"Retry-After": "1"})
        try:
            key = guard.check(request.headers.get("authorization"), role)
        except Denied as denied:
            headers = {"WWW-Authenticate": 'Bearer realm="aiplatform"'} if denied.status == 401 else None
            raise HTTPException(denied.status, detail=denied.message, headers=headers) from None
        request.state.api_key = key
        return key

    return Depends(check)
