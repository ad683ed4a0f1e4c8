"""Admin routes (role ``admin``): the models and experiments the served application follows.

The same operations as ``aiplatform models`` and ``aiplatform experiments show``, over HTTP for
a console or a deploy pipeline that holds an admin key. An alias move is the registry's
compare-and-set: a move made against a target someone else changed meanwhile is a 409 naming
the winning move, and the actor recorded is the key's name. A promotion over HTTP does not
build a missing vector index (that is a Ray job): it is a 409 that says how to build it.
"""

import asyncio
from typing import Any

from fastapi import APIRouter, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from aiplatform.core.errors import ConflictError, NotFoundError
from aiplatform.core.storage import Layout
from aiplatform.security.keys import Role
from aiplatform.serving.access import AUTH_RESPONSES, require
from aiplatform.serving.schemas import ErrorResponse

ADMIN_RESPONSES = {
    **AUTH_RESPONSES,
    400: {"model": ErrorResponse, "description": "A name is not valid, or there is nothing to roll back to."},
    404: {"model": ErrorResponse, "description": "No such model or version."},
}
router = APIRouter(prefix="/v1", tags=["admin"], dependencies=[require(Role.admin)], responses=ADMIN_RESPONSES)
_layout: Layout | None = None

NAME = Path(..., min_length=1, max_length=128, description="Model name, e.g. two_tower.")


def install(layout: Layout) -> None:
    global _layout
    _layout = layout


class VersionInfo(BaseModel):
    version: int
    created_at: str
    metrics: dict[str, Any]
    indexed: bool = Field(description="Whether its vector index exists (needed before serving it).")


class ModelInfo(BaseModel):
    name: str
    aliases: dict[str, int]
    versions: list[VersionInfo]


class AliasMove(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(..., ge=1, description="The version the alias should point at.")
    alias: str = Field("champion", min_length=1, max_length=128)
    reason: str = Field("", max_length=1000, description="Why (kept in the alias history).")


class Rollback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alias: str = Field("champion", min_length=1, max_length=128)
    reason: str = Field("", max_length=1000)


class MoveResult(BaseModel):
    name: str
    alias: str
    version: int
    previous: int | None = None
    changed: bool
    actor: str = ""
    reason: str = ""


def _registry():  # noqa: ANN202
    from aiplatform.registry import ModelRegistry

    if _layout is None:
        raise RuntimeError("admin routes used before the replica installed its storage root")
    return ModelRegistry(_layout)


def _has_index(name: str, version: int) -> bool:
    from aiplatform.retrieval.index import ItemIndex, vector_table_name

    try:
        ItemIndex(_layout.vectors, vector_table_name(name, version))
        return True
    except NotFoundError:
        return False


def _model_info(name: str) -> ModelInfo:
    registry = _registry()
    versions = registry.list_versions(name)
    if not versions:
        raise NotFoundError(f"no model named {name!r}: `aiplatform models list` shows the registered ones")
    return ModelInfo(name=name, aliases=registry.aliases(name),
                     versions=[VersionInfo(version=v.version, created_at=v.created_at.isoformat(),
                                           metrics={k: m for k, m in v.metrics.items()
                                                    if isinstance(m, (int, float, str, bool))},
                                           indexed=_has_index(name, v.version)) for v in versions])


def _move_result(name: str, alias: str, move: dict[str, Any]) -> MoveResult:
    return MoveResult(name=name, alias=alias, version=int(move["version"]),
                      previous=move.get("previous"), changed=bool(move.get("changed", True)),
                      actor=move.get("actor") or "", reason=move.get("reason") or "")


def _conflict(message: str) -> JSONResponse:
    return JSONResponse(status_code=409, content={"detail": message})


_CONFLICT = {409: {"model": ErrorResponse, "description": "The alias moved meanwhile, or the version "
                                                           "has no vector index yet."}}


@router.get("/models/{name}", response_model=ModelInfo)
async def model(name: str = NAME) -> ModelInfo:
    """The model's versions (with their metrics and whether each is indexed) and aliases."""
    return await asyncio.to_thread(_model_info, name)


@router.post("/models/{name}/promote", response_model=MoveResult, responses=_CONFLICT)
async def promote(body: AliasMove, request: Request, name: str = NAME) -> MoveResult:
    """Point ``alias`` at ``version`` (compare-and-set). Serving replicas that follow the
    alias switch to it in place within a few seconds."""
    actor = f"api-key:{request.state.api_key.name}"

    def run() -> MoveResult | JSONResponse:
        registry = _registry()
        registry.get(name, body.version)
        if registry.aliases(name).get(body.alias) != body.version and not _has_index(name, body.version):
            return _conflict(f"{name} v{body.version} has no vector index yet: build it first with "
                             f"`aiplatform models promote {name} {body.version}` (which builds it) or "
                             f"`python -m aiplatform.jobs.index --model-name {name} --version {body.version}`")
        try:
            move = registry.promote(name, body.version, alias=body.alias, reason=body.reason, actor=actor)
        except ConflictError as exc:
            return _conflict(str(exc))
        return _move_result(name, body.alias, move)

    return await asyncio.to_thread(run)


@router.post("/models/{name}/rollback", response_model=MoveResult, responses=_CONFLICT)
async def rollback(body: Rollback, request: Request, name: str = NAME) -> MoveResult:
    """Move ``alias`` back to the version before its current one (compare-and-set)."""
    actor = f"api-key:{request.state.api_key.name}"

    def run() -> MoveResult | JSONResponse:
        try:
            move = _registry().rollback(name, alias=body.alias, reason=body.reason, actor=actor)
        except ConflictError as exc:
            return _conflict(str(exc))
        return _move_result(name, body.alias, move)

    return await asyncio.to_thread(run)


@router.get("/experiments/{name}", response_model=dict[str, Any])
async def experiment(name: str = NAME) -> dict[str, Any]:
    """The model's active experiment (its variants, weights, shadow) and revision, or
    ``{"active": null}``."""
    from aiplatform.experiments.store import ExperimentStore

    def run() -> dict[str, Any]:
        found = ExperimentStore(_layout).active(name)
        if found is None:
            return {"model_name": name, "active": None}
        exp, revision = found
        return {"model_name": name, "active": exp.model_dump(mode="json"), "revision": revision}

    return await asyncio.to_thread(run)
