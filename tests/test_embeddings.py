"""POST /embeddings through the official SDK and raw HTTP: every input shape, float and base64 (little-endian
float32), ``dimensions``, usage, OpenAI's limits, a chat model on this endpoint, metering, and the route's absence
for a backend that does not embed."""

from __future__ import annotations

import base64
import math
import struct
from collections.abc import AsyncIterator, Sequence
from typing import Any

import openai
import pytest

from ozwell_asgi import LimitsRateLimiter, OzwellAPI
from ozwell_asgi.types import Call, ChatChunk, EmbeddingResult, ModelInfo
from ozwell_asgi.wire.embeddings import EmbeddingRequest
from tests.harness import async_openai, raw_client, sync_openai
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

SECRET = "s" * 32


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def make(**kwargs: Any) -> tuple[OzwellAPI, str]:
    api = OzwellAPI(secret=SECRET, rate_limiter=LimitsRateLimiter("memory://", clock=lambda: 1_800_000_030.0), **kwargs)
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    return api, key


@pytest.mark.parametrize(
    ("given", "count"),
    [("hello", 1), (["a", "b", "c"], 3), ([1, 2, 3], 1), ([[1, 2], [3], [4, 5, 6]], 3)],
    ids=["string", "strings", "tokens", "token-lists"],
)
async def test_every_input_shape_float_and_base64(given: Any, count: int) -> None:
    api, key = await make()
    async with raw_client(api) as http:
        floats = await http.post(
            "/embeddings",
            json={"model": "echo-embedding", "input": given, "encoding_format": "float"},
            headers=auth(key),
        )
        packed = await http.post(
            "/embeddings",
            json={"model": "echo-embedding", "input": given, "encoding_format": "base64"},
            headers=auth(key),
        )
    assert floats.status_code == packed.status_code == 200, floats.text
    body = floats.json()
    validate("CreateEmbeddingResponse", body)
    # (OpenAI's schema types every embedding as an array of numbers; the base64 form is a string it does not list.)
    assert [d["index"] for d in body["data"]] == list(range(count))
    assert body["model"] == "echo-embedding"
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    for as_floats, as_b64 in zip(body["data"], packed.json()["data"], strict=True):
        vector = as_floats["embedding"]
        assert len(vector) == 1536
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-6)
        raw = base64.b64decode(as_b64["embedding"])
        decoded = struct.unpack(f"<{len(raw) // 4}f", raw)  # little-endian float32
        assert len(decoded) == 1536
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-7) for a, b in zip(decoded, vector, strict=True))
    assert "x-ratelimit-remaining-tokens" in floats.headers


async def test_official_sdk_sync_and_async_with_dimensions() -> None:
    api, key = await make()
    client = async_openai(api, key)
    result = await client.embeddings.create(model="echo-embedding", input=["one", "two"], dimensions=16)  # base64
    assert [len(d.embedding) for d in result.data] == [16, 16]
    again = await client.embeddings.create(model="echo-embedding", input="one", dimensions=16, encoding_format="float")
    assert again.data[0].embedding == pytest.approx(result.data[0].embedding, rel=1e-6)  # deterministic
    assert result.data[0].embedding != result.data[1].embedding
    await client.close()
    with sync_openai(api, key) as sync_client:
        sync_result = sync_client.embeddings.create(model="echo-embedding", input="one", dimensions=16)
    assert sync_result.data[0].embedding == pytest.approx(again.data[0].embedding, rel=1e-6)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": ""}, "input", "invalid_value"),
        ({"input": ["a", ""]}, "input[1]", "invalid_value"),
        ({"input": []}, "input", "invalid_value"),
        ({"input": ["a"] * 2049}, "input", None),
        ({"input": "word " * 9000}, "input", "context_length_exceeded"),
        ({"input": [[1] * 8193]}, "input", "context_length_exceeded"),
        ({"input": ["word " * 8000] * 40}, "input", "max_tokens_per_request"),
        ({"input": "a", "dimensions": 0}, "dimensions", None),
        ({"input": "a", "encoding_format": "hex"}, "encoding_format", None),
        ({"input": "a", "extra": 1}, "extra", "unknown_parameter"),
        ({}, "input", "missing_required_parameter"),
    ],
    ids=[
        "empty-string",
        "empty-string-in-list",
        "empty-list",
        "too-many-inputs",
        "input-too-long",
        "token-input-too-long",
        "request-too-long",
        "dimensions-zero",
        "bad-encoding",
        "unknown-field",
        "no-input",
    ],
)
async def test_bad_inputs_are_400_with_param(body: dict[str, Any], param: str, code: str | None) -> None:
    api, key = await make()
    async with raw_client(api) as http:
        response = await http.post("/embeddings", json={"model": "echo-embedding", **body}, headers=auth(key))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    if code is not None:
        assert error["code"] == code


async def test_a_chat_model_on_the_embeddings_endpoint_and_back() -> None:
    api, key = await make()
    client = async_openai(api, key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        await client.embeddings.create(model="echo", input="hi")
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    with pytest.raises(openai.NotFoundError):
        await client.embeddings.create(model="nope", input="hi")
    await client.close()


async def test_embeddings_are_metered_and_refused_when_spent() -> None:
    api = OzwellAPI(secret=SECRET, rate_limiter=LimitsRateLimiter("memory://", clock=lambda: 1_800_000_030.0))
    _, key = await api.keys.create(name="t", owner="o", plan="free", tpm=50)
    async with raw_client(api) as http:
        first = await http.post(
            "/embeddings", json={"model": "echo-embedding", "input": "hello world " * 10}, headers=auth(key)
        )
        assert first.status_code == 200
        used = first.json()["usage"]["prompt_tokens"]
        assert first.headers["x-ratelimit-remaining-tokens"] == str(50 - used)
        too_big = await http.post(
            "/embeddings", json={"model": "echo-embedding", "input": "hello world " * 40}, headers=auth(key)
        )
        assert too_big.status_code == 429
        assert too_big.json()["error"]["code"] == "request_too_large"
        probe = await http.get("/models", headers=auth(key))
    assert probe.headers["x-ratelimit-remaining-tokens"] == str(50 - used)
    assert probe.headers["x-ratelimit-remaining-requests"] == "17"


class ChatOnly:
    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="c"),)

    async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[ChatChunk]:
        yield ChatChunk(role="assistant", content="x")
        yield ChatChunk(finish_reason="stop")


class EmbedOnly:
    def __init__(self) -> None:
        self.calls: list[tuple[EmbeddingRequest, Call]] = []

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="e", kind="embedding"),)

    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        self.calls.append((request, call))
        return EmbeddingResult(vectors=[[0.5, 0.5]] * len(request.inputs()), prompt_tokens=3, model="e-v2")


async def test_routes_follow_the_backends_capabilities() -> None:
    chat_api, chat_key = await make(backend=ChatOnly())
    async with raw_client(chat_api) as http:
        missing = await http.post("/embeddings", json={"model": "c", "input": "x"}, headers=auth(chat_key))
        assert missing.status_code == 404
        assert missing.json()["error"]["message"] == "Invalid URL (POST /embeddings)"
        assert (
            await http.post(
                "/chat/completions",
                json={"model": "c", "messages": [{"role": "user", "content": "x"}]},
                headers=auth(chat_key),
            )
        ).status_code == 200

    backend = EmbedOnly()
    embed_api, embed_key = await make(backend=backend)
    async with raw_client(embed_api) as http:
        missing = await http.post(
            "/chat/completions",
            json={"model": "e", "messages": [{"role": "user", "content": "x"}]},
            headers=auth(embed_key),
        )
        assert missing.status_code == 404
        answer = await http.post(
            "/embeddings", json={"model": "e", "input": ["p", "q"], "encoding_format": "float"}, headers=auth(embed_key)
        )
    assert answer.status_code == 200
    assert answer.json()["model"] == "e-v2"  # the model that answered
    assert answer.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}  # as the backend reports it
    async with raw_client(embed_api) as http:
        probe = await http.get("/models", headers=auth(embed_key))
    assert probe.headers["x-ratelimit-remaining-tokens"] == str(100_000 - 2)  # charged what it reserved, no more
    request, call = backend.calls[0]
    assert request.inputs() == ["p", "q"]
    assert call.endpoint == "embeddings"
    assert call.principal.owner == "o"
    assert call.request_id == answer.headers["x-request-id"]


class WrongCount(EmbedOnly):
    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        return EmbeddingResult(vectors=[[1.0]], prompt_tokens=1)


async def test_a_backend_returning_the_wrong_number_of_vectors_is_a_502() -> None:
    api, key = await make(backend=WrongCount())
    async with raw_client(api) as http:
        response = await http.post("/embeddings", json={"model": "e", "input": ["a", "b"]}, headers=auth(key))
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"
