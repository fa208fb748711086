"""The backend seam: backends checked when the app is built, a stream-only backend serving both kinds of chat
request, the call context, and everything an upstream sends reaching the client (model, fingerprint, reasoning,
usage details, unknown delta fields, the tool call's kind), in bodies that validate against OpenAI's schemas."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import httpx2
import openai
import pytest

from ozwell_asgi import OzwellAPI, Settings
from ozwell_asgi.errors import BadGatewayError
from ozwell_asgi.types import Call, ChatChunk, ChatResult, EmbeddingResult, ModelInfo, ToolCallDelta, Usage
from tests.harness import async_openai, raw_client, uvicorn_server
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

SECRET = "s" * 32


class Models:
    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="m"),)


class SyncModels:
    def list_models(self) -> Sequence[ModelInfo]:
        return ()

    async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[ChatChunk]:
        yield ChatChunk()


class CoroutineStream(Models):
    async def stream_chat(self, request: Any, call: Call) -> list[ChatChunk]:
        return []


class OldStyle(Models):
    async def chat(self, request: Any) -> ChatResult:
        raise NotImplementedError

    async def chat_stream(self, request: Any) -> AsyncIterator[ChatChunk]:
        yield ChatChunk()


class SyncEmbed(Models):
    def embed(self, request: Any, call: Call) -> EmbeddingResult:
        raise NotImplementedError


class OldStyleWithEmbed(OldStyle):
    async def embed(self, model: str, inputs: Any, dimensions: int | None) -> EmbeddingResult:
        raise NotImplementedError


class OldEmbedSignature(Models):
    async def embed(self, model: str, inputs: Any, dimensions: int | None) -> EmbeddingResult:
        raise NotImplementedError


class NoCallParameter(Models):
    async def stream_chat(self, request: Any) -> AsyncIterator[ChatChunk]:
        yield ChatChunk()


class CompleteOnly(Models):
    async def complete_chat(self, request: Any, call: Call) -> ChatResult:
        raise NotImplementedError


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        (object(), "has no `async def list_models(self)`"),
        (SyncModels(), "list_models must be an `async def` method"),
        (CoroutineStream(), "must return an async iterator"),
        (OldStyle(), "rename chat_stream(request) to stream_chat(request, call)"),
        (OldStyleWithEmbed(), "the methods of ozwell-asgi 0.1"),
        (OldEmbedSignature(), "embed must take (request, call)"),
        (NoCallParameter(), "stream_chat must take (request, call)"),
        (SyncEmbed(), "embed must be an `async def` method"),
        (CompleteOnly(), "has complete_chat but no stream_chat"),
        (Models(), "serves nothing"),
    ],
    ids=[
        "no-list-models",
        "sync-list-models",
        "coroutine-stream",
        "old-style",
        "old-style-with-embed",
        "old-embed-signature",
        "no-call-parameter",
        "sync-embed",
        "complete-only",
        "nothing",
    ],
)
def test_an_unservable_backend_is_a_type_error_when_the_app_is_built(backend: object, message: str) -> None:
    with pytest.raises(TypeError, match=message.replace("(", r"\(").replace(")", r"\)").replace("`", ".")):
        OzwellAPI(secret=SECRET, backend=backend)  # type: ignore[arg-type]


class Upstreamish(Models):
    """Streams what a real upstream sends: two choices, reasoning, a function call and a custom tool call, unknown
    delta fields, another model and fingerprint, and usage with details. Records each call."""

    def __init__(self) -> None:
        self.calls: list[Call] = []

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="alias"),)

    async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[ChatChunk]:
        self.calls.append(call)
        meta: dict[str, Any] = {"model": "llama3:8b", "system_fingerprint": "fp_up"}
        yield ChatChunk(index=0, role="assistant", content="", **meta)
        yield ChatChunk(index=1, role="assistant", content="", **meta)
        yield ChatChunk(index=0, reasoning_content="thinking...", extra={"provider_note": "x"}, **meta)
        yield ChatChunk(index=0, content="Hello", **meta)
        yield ChatChunk(
            index=1,
            tool_calls=(ToolCallDelta(index=0, id="call_1", type="function", name="lookup", arguments='{"q": '),),
            **meta,
        )
        yield ChatChunk(index=1, tool_calls=(ToolCallDelta(index=0, arguments='"x"}'),), **meta)
        yield ChatChunk(
            index=1,
            tool_calls=(ToolCallDelta(index=1, id="call_2", type="custom", name="shell", arguments="ls -la"),),
            **meta,
        )
        yield ChatChunk(index=0, content=" there", **meta)
        yield ChatChunk(index=0, finish_reason="stop", **meta)
        yield ChatChunk(index=1, finish_reason="tool_calls", **meta)
        yield ChatChunk(
            usage=Usage(
                11,
                7,
                prompt_tokens_details={"cached_tokens": 4, "audio_tokens": 0},
                completion_tokens_details={"reasoning_tokens": 3, "audio_tokens": 0},
            )
        )


async def test_a_stream_only_backend_serves_non_stream_requests_losing_nothing() -> None:
    backend = Upstreamish()
    api = OzwellAPI(secret=SECRET, backend=backend)
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={"model": "alias", "messages": [{"role": "user", "content": "hi"}], "n": 2},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    validate("CreateChatCompletionResponse", body)
    assert body["model"] == "llama3:8b"
    assert body["system_fingerprint"] == "fp_up"
    first, second = body["choices"]
    assert first["message"]["content"] == "Hello there"
    assert first["message"]["reasoning_content"] == "thinking..."
    assert first["message"]["provider_note"] == "x"
    assert first["finish_reason"] == "stop"
    assert second["finish_reason"] == "tool_calls"
    assert second["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "x"}'}},
        {"id": "call_2", "type": "custom", "custom": {"name": "shell", "input": "ls -la"}},
    ]
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 4, "audio_tokens": 0}
    assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3, "audio_tokens": 0}
    call = backend.calls[0]
    assert call.endpoint == "chat.completions"
    assert call.max_tokens == 1024  # the default reserve per choice: the bound the backend may generate
    assert call.request_id == response.headers["x-request-id"]
    assert call.deadline is not None


async def test_the_stream_keeps_what_the_backend_sends() -> None:
    api = OzwellAPI(secret=SECRET, backend=Upstreamish())
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={
                "model": "alias",
                "messages": [{"role": "user", "content": "hi"}],
                "n": 2,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
            headers={"authorization": f"Bearer {key}"},
        )
    events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    for chunk in events:
        custom = any(c.get("type") == "custom" for x in chunk["choices"] for c in x["delta"].get("tool_calls", ()))
        if not custom:  # OpenAI's spec lists only function calls in stream chunks, though its API streams both
            validate("CreateChatCompletionStreamResponse", chunk)
        assert chunk["model"] == "llama3:8b"
        assert chunk["system_fingerprint"] == "fp_up"
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    assert {"reasoning_content": "thinking...", "provider_note": "x"} in deltas
    custom = next(d for d in deltas if d.get("tool_calls") and d["tool_calls"][0].get("type") == "custom")
    assert custom["tool_calls"][0] == {
        "index": 1,
        "id": "call_2",
        "type": "custom",
        "custom": {"name": "shell", "input": "ls -la"},
    }
    assert events[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 3


async def test_the_official_sdk_reads_folded_tool_calls() -> None:
    api = OzwellAPI(secret=SECRET, backend=Upstreamish())
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    client = async_openai(api, key)
    completion = await client.chat.completions.create(model="alias", n=2, messages=[{"role": "user", "content": "hi"}])
    calls = completion.choices[1].message.tool_calls
    assert calls is not None
    assert calls[0].type == "function" and calls[0].function.arguments == '{"q": "x"}'  # type: ignore[union-attr]
    assert calls[1].type == "custom" and calls[1].custom.input == "ls -la"  # type: ignore[union-attr]
    await client.close()


class SlowFirst(Models):
    """Sleeps before its first chunk (an upstream slow to send its first token), then answers or fails."""

    def __init__(self, delay: float, fail: bool = False) -> None:
        self.delay = delay
        self.fail = fail
        self.closed = threading.Event()

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="slow"),)

    async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[ChatChunk]:
        try:
            await anyio.sleep(self.delay)
            if self.fail:
                raise BadGatewayError("The upstream model server failed.")
            yield ChatChunk(role="assistant", content="")
            yield ChatChunk(content="late")
            yield ChatChunk(finish_reason="stop")
        finally:
            self.closed.set()


STREAM_BODY = {"model": "slow", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def test_keepalive_pings_while_the_first_chunk_is_slow() -> None:
    api = OzwellAPI(secret=SECRET, backend=SlowFirst(0.35), settings=Settings(stream_keepalive=0.1))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json=STREAM_BODY, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200
    lines = [line for line in response.text.split("\n\n") if line]
    pings = [line for line in lines if line == ": ping"]
    assert 2 <= len(pings) <= 4
    assert lines[: len(pings)] == pings  # all before the first chunk
    assert lines[-1] == "data: [DONE]"
    client = async_openai(api, key)
    stream = await client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "late"
    await client.close()


async def test_a_fast_first_chunk_sends_no_ping_and_a_failure_keeps_its_status() -> None:
    api = OzwellAPI(secret=SECRET, backend=SlowFirst(0.0, fail=True), settings=Settings(stream_keepalive=5))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json=STREAM_BODY, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_error"


async def test_a_failure_after_the_pings_is_an_sse_error_frame() -> None:
    backend = SlowFirst(0.25, fail=True)
    api = OzwellAPI(secret=SECRET, backend=backend, settings=Settings(stream_keepalive=0.1))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    client = async_openai(api, key, max_retries=0)
    stream = await client.chat.completions.create(
        model="slow", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="The upstream model server failed"):
        async for _ in stream:
            pass
    assert backend.closed.is_set()
    await client.close()


async def test_a_client_gone_during_the_pings_closes_the_backend() -> None:
    backend = SlowFirst(30)
    api = OzwellAPI(secret=SECRET, backend=backend, settings=Settings(stream_keepalive=0.05))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    with uvicorn_server(api, root_path="/v1") as base:
        async with httpx2.AsyncClient(base_url=base) as http:
            headers = {"authorization": f"Bearer {key}"}
            async with http.stream("POST", "/chat/completions", json=STREAM_BODY, headers=headers) as response:
                async for text in response.aiter_text():
                    assert text.startswith(": ping")
                    break
        assert await anyio.to_thread.run_sync(backend.closed.wait, 2)
