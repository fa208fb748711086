"""GET /models and GET /models/{model}: only the models the calling key may use. Cost: one request, no tokens."""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from ..auth import model_allowed
from ..context import Services
from ..errors import NotFoundError
from ..responses import JSONResponse
from ..types import SCOPE_API, ModelInfo

__all__ = ["list_models", "retrieve_model"]


def _model_dict(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.id, "object": "model", "created": info.created, "owned_by": info.owned_by}


async def list_models(services: Services, request: Request) -> JSONResponse:
    principal = await services.authenticate(request, SCOPE_API)
    headers = await services.charge_request(principal)
    models = [_model_dict(m) for m in await services.backend.list_models() if model_allowed(principal.models, m.id)]
    return JSONResponse({"object": "list", "data": models}, headers=headers)


async def retrieve_model(services: Services, request: Request) -> JSONResponse:
    principal = await services.authenticate(request, SCOPE_API)
    model_id: str = request.path_params["model"]
    headers = await services.charge_request(principal)
    if model_allowed(principal.models, model_id):
        for info in await services.backend.list_models():
            if info.id == model_id:
                return JSONResponse(_model_dict(info), headers=headers)
    raise NotFoundError(
        f"The model '{model_id}' does not exist or you do not have access to it.", param="model", code="model_not_found"
    )
