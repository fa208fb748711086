"""POST /chat/completions through the official openai SDK (sync, async, streaming) and raw HTTP, in-process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends.echo import EchoBackend
from ozwell_asgi.errors import BadGatewayError
from ozwell_asgi.types import Call, ChatChunk, ChatResult, ModelInfo
from tests.harness import async_openai, raw_client, sync_openai
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

MESSAGES = [
    {"role": "system", "content": "You are a test."},
    {"role": "user", "content": "first question"},
    {"role": "assistant", "content": "first answer"},
    {"role": "user", "content": "Hello, Ozwell! How are you today?"},
]


@pytest.fixture
def api_and_key() -> tuple[OzwellAPI, str]:
    api = OzwellAPI(secret="s" * 32)

    async def create() -> str:
        return (await api.keys.create(name="test", owner="alice", plan="pro"))[1]

    return api, anyio.run(create)


async def test_non_streaming_answer_validates_and_counts(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={"model": "echo", "messages": MESSAGES},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    validate("CreateChatCompletionResponse", body)
    assert body["object"] == "chat.completion"
    assert body["model"] == "echo"
    assert body["id"].startswith("chatcmpl-")
    choice = body["choices"][0]
    assert choice["message"] == {
        "role": "assistant",
        "content": "Hello, Ozwell! How are you today?",
        "refusal": None,
        "annotations": [],
    }
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"] is None
    usage = body["usage"]
    # 4 messages: 3 + 3*4 priming + text tokens; the answer is 10 o200k tokens.
    assert usage["completion_tokens"] == api.tokenizer.count("Hello, Ozwell! How are you today?")
    text_tokens = sum(api.tokenizer.count(m["content"]) for m in MESSAGES)
    assert usage["prompt_tokens"] == 3 + 3 * len(MESSAGES) + text_tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert response.headers["x-request-id"].startswith("req_")
    assert int(response.headers["openai-processing-ms"]) >= 0
    assert response.headers["x-ratelimit-limit-requests"] == "100"
    assert response.headers["x-ratelimit-remaining-requests"] == "99"


async def test_async_sdk_stream_with_usage(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    stream = await client.chat.completions.create(
        model="echo", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) >= 8  # role, one per word (7), finish, usage
    for chunk in chunks[:-1]:
        assert chunk.usage is None
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello, Ozwell! How are you today?"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == api.tokenizer.count(text)
    await client.close()


async def test_raw_stream_frames_and_done(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={"model": "echo", "messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.headers["content-type"].startswith("text/event-stream")
    assert "x-ratelimit-remaining-tokens" in response.headers
    frames = [f for f in response.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    payloads = [json.loads(f.removeprefix("data: ")) for f in frames[:-1]]
    for payload in payloads[:-1]:
        assert "usage" in payload and payload["usage"] is None
        validate("CreateChatCompletionStreamResponse", payload)
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["total_tokens"] > 0
    validate("CreateChatCompletionStreamResponse", payloads[-1])


async def test_stream_without_include_usage_has_no_usage_field(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={"model": "echo", "messages": MESSAGES, "stream": True},
            headers={"authorization": f"Bearer {key}"},
        )
    payloads = [json.loads(f.removeprefix("data: ")) for f in response.text.split("\n\n") if f and "[DONE]" not in f]
    assert all("usage" not in p for p in payloads)
    assert all(p["choices"] for p in payloads)


def test_sync_sdk_plain_and_stream(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    with sync_openai(api, key) as client:
        completion = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "sync hi"}])
        assert completion.choices[0].message.content == "sync hi"
        pieces = [
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "one two three"}], stream=True
            )
            if c.choices
        ]
        assert pieces[1:4] == ["one", " two", " three"]


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_truncates_with_length(api_and_key: tuple[OzwellAPI, str], field: str) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    text = "The quick brown fox jumps over the lazy dog again and again"
    completion = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}], **{field: 4}
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 4
    assert choice.message.content == api.tokenizer.decode(api.tokenizer.encode(text)[:4])
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}], stream=True, **{field: 4}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length"
    await client.close()


async def test_stop_n_and_seed(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    completion = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "alpha beta STOP gamma"}], stop=["STOP", "zzz"], n=3, seed=7
    )
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.message.content for c in completion.choices} == {"alpha beta "}
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3 * api.tokenizer.count("alpha beta ")
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "a b"}], n=2, stream=True
    )
    by_index: dict[int, str] = {}
    async for chunk in stream:
        for choice in chunk.choices:
            by_index[choice.index] = by_index.get(choice.index, "") + (choice.delta.content or "")
    assert by_index == {0: "a b", 1: "a b"}
    await client.close()


TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer", "minimum": 1}},
                "required": ["city", "days"],
            },
        },
    },
    {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}},
]


async def test_forced_tool_call(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    completion = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Paris"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    validate("CreateChatCompletionResponse", completion.model_dump(exclude_unset=True))
    message = completion.choices[0].message
    assert message.content is None
    assert message.tool_calls is not None and len(message.tool_calls) == 1
    call = message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 1}

    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "Paris"}], tools=TOOLS, tool_choice="required", stream=True
    )
    arguments, name, finish = "", None, None
    async for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            name = name or delta_call.function.name  # type: ignore[union-attr]
            arguments += delta_call.function.arguments or ""  # type: ignore[union-attr]
        finish = chunk.choices[0].finish_reason or finish
    assert name == "get_weather" and json.loads(arguments) == {"city": "Paris", "days": 1}
    assert finish == "tool_calls"
    await client.close()


async def test_unknown_forced_tool_is_400(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "x"}],
            tools=TOOLS,
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert info.value.param == "tool_choice"
    await client.close()


async def test_logprobs_and_json_schema(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    completion = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "hi there"}], logprobs=True, top_logprobs=2
    )
    validate("CreateChatCompletionResponse", completion.model_dump(exclude_unset=True))
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert "".join(t.token for t in logprobs.content) == "hi there"
    assert all(t.logprob == 0.0 and len(t.top_logprobs) == 1 for t in logprobs.content)

    completion = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Ada"}],
        response_format={
            "type": "json_schema",
            "json_schema": {
                "name": "person",
                "schema": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
            },
        },
    )
    assert json.loads(completion.choices[0].message.content or "") == {"name": "Ada"}
    await client.close()


async def test_multimodal_content_parts(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    completion = await client.chat.completions.create(
        model="echo",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is "},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
                    {"type": "text", "text": "in this picture?"},
                ],
            }
        ],
    )
    assert completion.choices[0].message.content == "What is in this picture?"
    assert completion.usage is not None and completion.usage.prompt_tokens > 85
    await client.close()


class RecordingBackend(EchoBackend):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    async def complete_chat(self, request: Any, ctx: Call) -> ChatResult:
        self.seen.append(request)
        return await super().complete_chat(request, ctx)


async def test_unknown_fields_reach_the_backend() -> None:
    backend = RecordingBackend()
    api = OzwellAPI(secret="s" * 32, backend=backend)
    _, key = await api.keys.create(name="t", owner="o")
    client = async_openai(api, key)
    await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "x", "x_custom": 1}],
        extra_body={"guided_json": {"type": "object"}, "top_k": 5},
    )
    request = backend.seen[0]
    assert request.model_extra == {"guided_json": {"type": "object"}, "top_k": 5}
    await client.close()


async def test_unknown_model_is_404(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="echo-embedding", messages=[{"role": "user", "content": "x"}])
    assert info.value.code == "model_not_found"
    await client.close()


class FailingBackend:
    """Fails in the ways a real backend can: an unexpected crash, a typed upstream error, a mid-stream failure."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.closed = anyio.Event()

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="flaky"),)

    async def complete_chat(self, request: Any, call: Call) -> ChatResult:
        if self.mode == "crash":
            raise RuntimeError("secret internal detail: db password hunter2")
        raise BadGatewayError("The upstream model server failed.")

    async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[ChatChunk]:
        try:
            if self.mode == "early":
                raise BadGatewayError("The upstream model server failed.")
            yield ChatChunk(role="assistant", content="")
            yield ChatChunk(content="partial")
            raise RuntimeError("secret internal detail: stack")
        finally:
            self.closed.set()


async def test_backend_crash_is_500_without_internals() -> None:
    api = OzwellAPI(secret="s" * 32, backend=FailingBackend("crash"))
    _, key = await api.keys.create(name="t", owner="o")
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={"model": "flaky", "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 500
    assert "hunter2" not in response.text and "RuntimeError" not in response.text
    assert response.json() == {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    validate("ErrorResponse", response.json())
    assert response.headers["x-request-id"]


async def test_backend_error_before_first_chunk_gets_its_status() -> None:
    api = OzwellAPI(secret="s" * 32, backend=FailingBackend("early"))
    _, key = await api.keys.create(name="t", owner="o")
    client = async_openai(api, key, max_retries=0)
    with pytest.raises(openai.APIStatusError) as info:
        await client.chat.completions.create(model="flaky", messages=[{"role": "user", "content": "x"}], stream=True)
    assert info.value.status_code == 502
    assert info.value.code == "upstream_error"
    await client.close()


async def test_mid_stream_failure_is_an_sse_error_then_close() -> None:
    backend = FailingBackend("mid")
    api = OzwellAPI(secret="s" * 32, backend=backend)
    _, key = await api.keys.create(name="t", owner="o")
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={"model": "flaky", "messages": [{"role": "user", "content": "x"}], "stream": True},
            headers={"authorization": f"Bearer {key}"},
        )
    frames = [f for f in response.text.split("\n\n") if f]
    assert "[DONE]" not in response.text
    assert "secret internal detail" not in response.text
    last = json.loads(frames[-1].removeprefix("data: "))
    assert last["error"]["type"] == "server_error" and last["error"]["param"] is None
    assert backend.closed.is_set()
    client = async_openai(api, key)
    stream = await client.chat.completions.create(
        model="flaky", messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass
    await client.close()
