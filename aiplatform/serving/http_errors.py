"""How the HTTP API answers a request it cannot serve: every error is a 4xx whose body names the
field or the thing at fault and what would be accepted, never a 500 with a stack trace.

FastAPI's defaults are close but not enough for a client to fix its request: a 422 lists pydantic
locations without saying what a field accepts, and a body that is not UTF-8 is a bare 400. The
handlers here keep FastAPI's ``detail`` (which clients and the OpenAPI docs already understand)
and add a ``message``; the domain errors of ``core.errors`` map to their status codes.
"""

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from aiplatform.core.errors import NotFoundError, UserInputError
from aiplatform.serving.schemas import MAX_K

_FIELD_HINTS = {
    "k": f"allowed range 1..{MAX_K}",
    "user_id": "a non-empty string",
}


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 whose ``message`` names each bad field and what it accepts, next to FastAPI's
    usual ``detail`` list (which clients and the OpenAPI docs already understand)."""
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            pos = err.get("loc", ("body", "?"))[-1]
            reason = (err.get("ctx") or {}).get("error", "")
            parts.append(f"body: invalid JSON at character {pos}: {reason}".rstrip(": "))
            continue
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or "body"
        hint = _FIELD_HINTS.get(loc[-1]) if loc else None
        parts.append(f"{field}: {err.get('msg', 'invalid')}" + (f" ({hint})" if hint else ""))
    return JSONResponse(
        status_code=422,
        content={"detail": jsonable_encoder(exc.errors()), "message": "; ".join(parts)},
    )


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 400 for a body it cannot decode (not UTF-8) becomes the 422 every other
    unreadable body gets; anything else is answered as FastAPI would."""
    if exc.status_code == 400 and str(exc.detail).startswith("There was an error parsing the body"):
        message = "not JSON text (send UTF-8 encoded JSON)"
        return JSONResponse(status_code=422, content={
            "message": f"body: {message}", "detail": [{"loc": ["body"], "msg": message, "type": "json_invalid"}]})
    return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=exc.headers)


async def _user_error(request: Request, exc: UserInputError) -> JSONResponse:
    """A ``UserInputError`` raised anywhere below a route is the client's to fix: a 400 with its
    message, not a 500."""
    return JSONResponse(status_code=400, content={"detail": str(exc)})


async def _not_found(request: Request, exc: NotFoundError) -> JSONResponse:
    """A ``NotFoundError`` (an unknown item, model or version) is a 404 with its message."""
    return JSONResponse(status_code=404, content={"detail": str(exc)})


def install_error_handlers(api: FastAPI) -> None:
    """Register this module's handlers on ``api`` (the ingress's FastAPI app)."""
    api.add_exception_handler(RequestValidationError, _validation_error)
    api.add_exception_handler(StarletteHTTPException, _http_error)
    api.add_exception_handler(UserInputError, _user_error)
    api.add_exception_handler(NotFoundError, _not_found)


__all__ = ["install_error_handlers"]
