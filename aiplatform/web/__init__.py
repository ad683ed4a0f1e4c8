"""Pages for people, served by the same FastAPI app as the API: the storefront (``/shop``) and
the platform console (``/console``).

Server-rendered Jinja2 templates and one small stylesheet: no JavaScript build, nothing to
install beyond the package. The pages run inside the serving replica and call its handlers
in-process (``web.base``); sessions and CSRF are in ``web.session``. The serving app includes
``router`` and calls ``install`` once its replica can answer.
"""

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from aiplatform.web import console, shop
from aiplatform.web.base import HERE, install

router = APIRouter(include_in_schema=False)
router.include_router(shop.router)
router.include_router(console.router)

STATIC = {"style.css": "text/css"}
"""The only files served from ``static/`` (a fixed list: no path from the URL reaches the disk)."""


@router.get("/web/static/{name}")
async def static(name: str) -> FileResponse:
    if name not in STATIC:
        raise HTTPException(404, detail=f"no static file {name!r}")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "public, max-age=300"})


__all__ = ["install", "router"]
