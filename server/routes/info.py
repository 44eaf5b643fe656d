"""``/v1/models``, ``/health``, ``/version`` and ``/metrics``."""

from __future__ import annotations

import importlib.metadata
import platform

import torch
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.errors import APIError
from server.protocol import ModelCard, ModelList
from server.routes.common import ERROR_RESPONSES, now
from server.state import ServerState, get_state, require_api_key

router = APIRouter()


def _card(state: ServerState) -> ModelCard:
    info = state.info
    return ModelCard(
        id=info.name,
        created=now(),
        root=info.path,
        max_model_len=info.max_model_len,
        loops=info.loops,
        ranks=info.ranks,
        parameters=info.parameters,
        source_parameters=info.source_parameters,
        fidelity=info.fidelity,
        early_exit={
            "enabled": info.exit_thresholds is not None,
            "thresholds": info.exit_thresholds,
            "measure": info.exit_measure,
            "min_loops": info.min_loops,
        },
    )


@router.get("/v1/models", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES)
async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(get_state(request))])


@router.get(
    "/v1/models/{model}", dependencies=[Depends(require_api_key)], responses=ERROR_RESPONSES
)
async def get_model(model: str, request: Request) -> ModelCard:
    state = get_state(request)
    state.check_model(model)
    return _card(state)


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 only while the engine takes requests (a load balancer's readiness probe): 503
    once it died, and from the first moment of a drain, so traffic moves elsewhere."""
    engine = get_state(request).engine
    if not engine.alive:
        raise APIError(503, "the engine is not running", code="engine_dead")
    if not engine.accepting:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    return JSONResponse({"status": "ok"})


@router.get("/ping", operation_id="ping_get")
@router.post("/ping", operation_id="ping_post")
async def ping(request: Request) -> JSONResponse:
    """vLLM's (and SageMaker's) liveness probe: the same answer as ``/health``."""
    return await health(request)


@router.get("/version")
async def version() -> dict[str, str]:
    return {
        "version": importlib.metadata.version("loopserve"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    body, content_type = get_state(request).metrics.render()
    return Response(body, media_type=content_type)
