"""POST /embeddings: auth → admit (before the body) → read and parse → model → count and reserve → backend →
JSON (float lists, or base64 of little-endian float32) → settle."""

from __future__ import annotations

import base64
import sys
from array import array
from collections.abc import Sequence
from typing import Any

import anyio.to_thread
from starlette.requests import Request

from ..context import Services
from ..errors import BadGatewayError, InvalidRequestError
from ..meter import status_of
from ..protocols import EmbeddingBackend
from ..responses import JSONResponse
from ..tokens import Tokenizer
from ..types import SCOPE_API, Call, Usage
from ..wire.embeddings import EmbeddingRequest, parse_embedding_request

__all__ = ["MAX_INPUT_TOKENS", "MAX_REQUEST_TOKENS", "create_embedding", "encode_vector"]

MAX_INPUT_TOKENS = 8192  # OpenAI's limit per input, for every embedding model
MAX_REQUEST_TOKENS = 300_000  # OpenAI's limit summed over the inputs of one request
_LITTLE_ENDIAN = sys.byteorder == "little"


def encode_vector(vector: Sequence[float], encoding: str) -> list[float] | str:
    """A vector as sent: a list of floats, or base64 of its little-endian float32 bytes (what the SDKs decode)."""
    if encoding != "base64":
        return vector if isinstance(vector, list) else list(vector)
    packed = array("f", vector)
    if not _LITTLE_ENDIAN:
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _count_inputs(tokenizer: Tokenizer, inputs: list[str | list[int]]) -> int:
    """Tokens of every input, checking OpenAI's per-input and per-request limits (400 with ``param: "input"``)."""
    total = 0
    for index, item in enumerate(inputs):
        count = tokenizer.count(item) if isinstance(item, str) else len(item)
        if count > MAX_INPUT_TOKENS:
            where = "'input'" if len(inputs) == 1 else f"'input[{index}]'"
            raise InvalidRequestError(
                f"Invalid {where}: this model's maximum context length is {MAX_INPUT_TOKENS} tokens, however you "
                f"requested {count} tokens. Please reduce your input.",
                param="input",
                code="context_length_exceeded",
            )
        total += count
        if total > MAX_REQUEST_TOKENS:
            raise InvalidRequestError(
                f"Invalid 'input': the inputs of one request may have at most {MAX_REQUEST_TOKENS} tokens in all.",
                param="input",
                code="max_tokens_per_request",
            )
    return total


async def _read_request(services: Services, request: Request) -> tuple[EmbeddingRequest, list[str | list[int]], int]:
    body = await services.read_json(request)
    if len(body) > services.settings.offload_parse_above:
        embedding = await anyio.to_thread.run_sync(parse_embedding_request, body)
        inputs = embedding.inputs()
        return embedding, inputs, await anyio.to_thread.run_sync(_count_inputs, services.tokenizer, inputs)
    embedding = parse_embedding_request(body)
    inputs = embedding.inputs()
    return embedding, inputs, _count_inputs(services.tokenizer, inputs)


async def create_embedding(services: Services, request: Request) -> JSONResponse:
    principal = await services.authenticate(request, SCOPE_API)
    meter = await services.meter(principal, request, "embeddings")  # a spent key is refused before its body
    try:
        embedding, inputs, tokens = await _read_request(services, request)
        await services.find_model(principal, embedding.model, "embedding")
        await meter.reserve(tokens)
    except BaseException as exc:
        await meter.settle(0, status=status_of(exc))
        raise
    headers = meter.headers
    backend: EmbeddingBackend = services.embeddings  # type: ignore[assignment]  # the route exists only if it embeds
    call = Call(request_id=services.request_id(request), principal=principal, endpoint="embeddings")
    try:
        result = await backend.embed(embedding, call)
    except BaseException as exc:
        await meter.settle(0, status=status_of(exc), model=embedding.model)
        raise
    await meter.settle(
        result.prompt_tokens,
        shield=False,
        usage=Usage(result.prompt_tokens, 0),
        model=result.model or embedding.model,
    )
    vectors = result.vectors
    if len(vectors) != len(inputs):
        raise BadGatewayError(f"The model returned {len(vectors)} embeddings for {len(inputs)} inputs.")
    encoding = embedding.encoding_format
    data: list[dict[str, Any]] = [
        {"object": "embedding", "index": index, "embedding": encode_vector(vector, encoding)}
        for index, vector in enumerate(vectors)
    ]
    body = {
        "object": "list",
        "data": data,
        "model": result.model or embedding.model,
        "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
    }
    return JSONResponse(body, headers=headers)
