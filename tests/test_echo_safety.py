"""The echo backend (what ``ozwell-asgi serve`` runs out of the box) against hostile requests.

Each finding of issue 11, item 2, reproduced: a few hundred bytes of ``minItems`` asked for 10^9 elements; malformed
schemas answered 500; a stream went on (and was charged) after its client reset the connection. Echo now builds no
more than its token bound allows (a recording tokenizer sees everything it tokenizes), refuses malformed schemas
with OpenAI's 400, and any stream is closed promptly when its client goes away (over a real uvicorn socket).
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import anyio
import openai
import pytest
from jsonschema import Draft202012Validator

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from ozwell_asgi.backends.echo import (
    CHARS_PER_TOKEN,
    MAX_OUTPUT_TOKENS,
    MAX_SCHEMA_DEPTH,
    MAX_SCHEMA_NODES,
    EchoBackend,
)
from ozwell_asgi.context import Settings
from ozwell_asgi.ratelimit import LimitsRateLimiter
from ozwell_asgi.tokens import BPETokenizer, default_tokenizer
from ozwell_asgi.types import Call, ChatChunk, Principal, Quota, Reservation
from ozwell_asgi.wire.chat import ChatCompletionRequest, parse_chat_request
from tests.harness import async_openai, raw_client, uvicorn_server

pytestmark = pytest.mark.anyio

SECRET = "s" * 32


class RecordingTokenizer:
    """The default tokenizer, remembering the length of every text echo asks it to encode."""

    def __init__(self) -> None:
        self.inner: BPETokenizer = default_tokenizer()
        self.encoded: list[int] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(len(text))
        return self.inner.encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.inner.decode(tokens)

    def token_bytes(self, token: int) -> bytes:
        return self.inner.token_bytes(token)

    def count(self, text: str) -> int:
        return self.inner.count(text)

    async def warm(self) -> None:
        await self.inner.warm()


@pytest.fixture
def echo() -> EchoBackend:
    return EchoBackend(tokenizer=RecordingTokenizer())


@pytest.fixture
def api_and_key(echo: EchoBackend) -> tuple[OzwellAPI, str]:
    api = OzwellAPI(secret=SECRET, backend=echo)

    async def create() -> str:
        return (await api.keys.create(name="t", owner="o", plan="pro"))[1]

    return api, anyio.run(create)


def largest_encoded(backend: EchoBackend) -> int:
    tokenizer = backend.tokenizer
    assert isinstance(tokenizer, RecordingTokenizer)
    return max(tokenizer.encoded, default=0)


def nested_arrays(levels: Sequence[int]) -> dict[str, Any]:
    """``minItems`` at every level: the schema that asked for 10^9 elements in 555 bytes (1000, 1000, 1000)."""
    schema: dict[str, Any] = {"type": "string"}
    for count in reversed(levels):
        schema = {"type": "array", "minItems": count, "items": schema}
    return schema


def nested_text(levels: Sequence[int], leaf: str) -> Iterator[str]:
    """The JSON text of a ``nested_arrays`` instance, lazily (a reference that never builds the whole)."""
    if not levels:
        yield leaf
        return
    yield "["
    for i in range(levels[0]):
        if i:
            yield ", "
        yield from nested_text(levels[1:], leaf)
    yield "]"


def opening(pieces: Iterator[str], size: int) -> str:
    text = ""
    for piece in pieces:
        text += piece
        if len(text) >= size:
            break
    return text[:size]


def response_format(schema: Any, name: str = "bomb") -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


BOMBS = [(60, 60, 60), (1000, 1000, 1000), (10**9, 10**9, 10**9, 10**9)]


@pytest.mark.parametrize("levels", BOMBS, ids=["60^3", "1000^3", "1e9^4"])
async def test_nested_min_items_are_built_only_to_the_token_bound(
    api_and_key: tuple[OzwellAPI, str], echo: EchoBackend, levels: Sequence[int]
) -> None:
    """Before: the whole instance was built (60^3: 1 MB tokenized for a 50-token answer; 1000^3 never returned)."""
    api, key = api_and_key
    client = async_openai(api, key)
    completion = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "x"}],
        response_format=response_format(nested_arrays(levels)),  # type: ignore[arg-type]
        max_tokens=50,
    )
    choice = completion.choices[0]
    content = choice.message.content or ""
    assert choice.finish_reason == "length"
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 50
    assert content == opening(nested_text(levels, '"x"'), len(content))
    assert len(content) > 50  # the bound was used, not some tiny fixed cut
    assert largest_encoded(echo) <= 50 * CHARS_PER_TOKEN
    await client.close()


async def test_without_max_tokens_a_bomb_is_built_to_the_reserved_tokens(
    api_and_key: tuple[OzwellAPI, str], echo: EchoBackend
) -> None:
    api, key = api_and_key
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={
                "model": "echo",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": response_format(nested_arrays((1000, 1000, 1000))),
            },
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 200
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    reserve = Settings().default_completion_reserve  # the route's bound when the request sets none
    assert 0 < body["usage"]["completion_tokens"] <= reserve
    assert largest_encoded(echo) <= reserve * CHARS_PER_TOKEN


NOOP = {"type": "function", "function": {"name": "noop", "parameters": {"type": "object", "properties": {}}}}
PLOT = {"type": "function", "function": {"name": "plot"}}


def plot_tool(parameters: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "plot", "parameters": parameters}}


async def tool_stream(client: openai.AsyncOpenAI, **fields: Any) -> tuple[str, str | None, int]:
    """(the streamed arguments, the finish reason, completion tokens) of a streamed forced tool call."""
    stream = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Paris"}],
        stream=True,
        stream_options={"include_usage": True},
        **fields,
    )
    arguments, finish, tokens = "", None, -1
    async for chunk in stream:
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                arguments += call.function.arguments or ""  # type: ignore[union-attr]
    return arguments, finish, tokens


@pytest.mark.parametrize("levels", BOMBS, ids=["60^3", "1000^3", "1e9^4"])
async def test_forced_tool_arguments_are_built_only_to_the_token_bound(
    api_and_key: tuple[OzwellAPI, str], echo: EchoBackend, levels: Sequence[int]
) -> None:
    """Before: the arguments were built whole from ``parameters``, and never cut."""
    api, key = api_and_key
    client = async_openai(api, key)
    parameters = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "grid": nested_arrays(levels)},
        "required": ["title", "grid"],
    }
    tools = [NOOP, plot_tool(parameters)]
    completion = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Paris"}],
        tools=tools,  # type: ignore[arg-type]
        tool_choice=PLOT,  # type: ignore[arg-type]
        max_completion_tokens=40,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.tool_calls is not None
    arguments = choice.message.tool_calls[0].function.arguments  # type: ignore[union-attr]
    expected = '{"title": "Paris", "grid": ' + opening(nested_text(levels, '"Paris"'), 40 * CHARS_PER_TOKEN)
    assert len(arguments) > 40 and arguments == expected[: len(arguments)]
    assert completion.usage is not None and completion.usage.completion_tokens <= 40
    assert largest_encoded(echo) <= 40 * CHARS_PER_TOKEN

    streamed = await tool_stream(client, tools=tools, tool_choice=PLOT, max_completion_tokens=40)
    assert streamed[:2] == (arguments, "length") and streamed[2] <= 40
    # "required" calls the first tool: whole arguments end as a tool call does
    assert await tool_stream(client, tools=tools, tool_choice="required", max_completion_tokens=40) == (
        "{}",
        "tool_calls",
        default_tokenizer().count("noop") + 1,
    )
    await client.close()


async def test_plain_text_is_tokenized_only_to_the_bound(api_and_key: tuple[OzwellAPI, str], echo: EchoBackend) -> None:
    """Before: the whole message was tokenized again to answer with 5 of its tokens."""
    api, key = api_and_key
    client = async_openai(api, key)
    text = "All work and no play makes Jack a dull boy. " * 5_000
    completion = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": text}], max_tokens=5, logprobs=True
    )
    tokenizer = default_tokenizer()
    choice = completion.choices[0]
    assert choice.message.content == tokenizer.decode(tokenizer.encode(text)[:5])
    assert choice.finish_reason == "length"
    assert choice.logprobs is not None and len(choice.logprobs.content or []) == 5
    assert largest_encoded(echo) <= 5 * CHARS_PER_TOKEN
    await client.close()


def chat_request(**fields: Any) -> ChatCompletionRequest:
    return parse_chat_request(json.dumps({"model": "echo", **fields}))


def direct_call(max_tokens: int | None = None) -> Call:
    """What a host calling the backend itself might pass: possibly no bound at all."""
    principal = Principal(key_id="k", owner="o", plan="enterprise", quota=Quota(rpm=None, tpm=None))
    return Call(request_id="req_1", principal=principal, endpoint="chat.completions", max_tokens=max_tokens)


async def test_a_host_calling_echo_without_a_bound_gets_the_ceiling() -> None:
    """The route always passes a bound; a host calling the backend directly may not. Before: no limit at all."""
    words = "word " * (MAX_OUTPUT_TOKENS + 1_000)
    backend = EchoBackend()
    request = chat_request(messages=[{"role": "user", "content": words}], logprobs=True)
    assert request.effective_max_tokens is None
    result = await backend.complete_chat(request, direct_call())
    assert result.usage is not None and result.usage.completion_tokens == MAX_OUTPUT_TOKENS
    assert result.choices[0].finish_reason == "length"
    assert result.choices[0].logprobs is not None and len(result.choices[0].logprobs["content"]) == MAX_OUTPUT_TOKENS

    small = EchoBackend(max_output_tokens=7)  # and a bound above the ceiling is held to it too
    for fields in ({}, {"max_tokens": 1_000}, {"max_completion_tokens": 10**9}):
        request = chat_request(messages=[{"role": "user", "content": words}], logprobs=True, n=2, **fields)
        result = await small.complete_chat(request, direct_call())
        assert result.usage is not None and result.usage.completion_tokens == 2 * 7
        assert all(c.finish_reason == "length" and len(c.logprobs["content"]) == 7 for c in result.choices)  # type: ignore[index]
        chunks = [chunk async for chunk in small.stream_chat(request, direct_call())]
        for index in (0, 1):
            entries = [e for c in chunks if c.index == index and c.logprobs for e in c.logprobs["content"]]
            assert len(entries) == 7
            assert "".join(c.content or "" for c in chunks if c.index == index) == "word " * 6 + "word"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2 * 7
    request = chat_request(messages=[{"role": "user", "content": words}], max_tokens=1_000)
    result = await backend.complete_chat(request, direct_call(max_tokens=5))  # the call's bound holds too
    assert result.usage is not None and result.usage.completion_tokens == 5
    with pytest.raises(ValueError, match="max_output_tokens"):
        EchoBackend(max_output_tokens=0)


RICH_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b"]}, "minItems": 2},
        "kind": {"const": {"nested": [1, None]}},
        "count": {"type": "integer", "minimum": 2.5},
        "debt": {"type": "integer", "maximum": -3},
        "ratio": {"type": "number", "minimum": 1.5},
        "flag": {"type": "boolean"},
        "nothing": {"type": "null"},
        "maybe": {"type": ["null", "string"]},
        "either": {"anyOf": [{"type": "integer", "minimum": 4}, {"type": "string"}]},
        "one": {"oneOf": [{"type": "object", "properties": {"x": {"type": "number"}}}]},
        "grid": {
            "type": "array",
            "minItems": 2,
            "items": {"type": "array", "minItems": 3, "items": {"type": "integer"}},
        },
        "unread": {"type": "string"},
    },
    "required": ["name", "tags", "kind", "count", "debt", "ratio", "flag", "nothing", "maybe", "either", "one", "grid"],
}


async def test_a_whole_instance_is_valid_for_its_schema(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key)
    completion = await client.chat.completions.create(
        model="echo",
        messages=[{"role": "user", "content": "Ada \u00e9"}],
        response_format=response_format(RICH_SCHEMA, "rich"),  # type: ignore[arg-type]
    )
    content = completion.choices[0].message.content or ""
    assert completion.choices[0].finish_reason == "stop"
    instance = json.loads(content)
    Draft202012Validator(RICH_SCHEMA).validate(instance)
    assert instance == {
        "name": "Ada \u00e9",
        "tags": ["a", "a"],
        "kind": {"nested": [1, None]},
        "count": 3,
        "debt": -3,
        "ratio": 1.5,
        "flag": False,
        "nothing": None,
        "maybe": "Ada \u00e9",
        "either": 4,
        "one": {"x": 0.0},
        "grid": [[0, 0, 0], [0, 0, 0]],
    }
    assert content == json.dumps(instance)  # Python's own JSON spelling, as echo always wrote it
    await client.close()


# (schema, context OpenAI would print, what is wrong). Each answered 500 with a traceback before, or built nonsense.
DEEP: dict[str, Any] = {"type": "string"}
for _ in range(MAX_SCHEMA_DEPTH + 1):
    DEEP = {"type": "array", "items": DEEP}
BAD_TYPE = (
    "'type' must be one of 'array', 'boolean', 'integer', 'null', 'number', 'object', 'string', or an array of them."
)
MALFORMED: list[tuple[Any, tuple[str | int, ...], str]] = [
    ({"type": "integer", "minimum": "abc"}, (), "'minimum' must be a finite number."),
    ({"type": "number", "maximum": math.inf}, (), "'maximum' must be a finite number."),
    ({"type": "integer", "minimum": math.nan}, (), "'minimum' must be a finite number."),
    ({"type": "integer", "minimum": True}, (), "'minimum' must be a finite number."),
    ({"type": "array", "minItems": "x"}, (), "'minItems' must be a non-negative integer."),
    ({"type": "array", "minItems": 1e10}, (), "'minItems' must be a non-negative integer."),
    ({"type": "array", "minItems": -1}, (), "'minItems' must be a non-negative integer."),
    ({"enum": {}}, (), "'enum' must be an array."),
    ({"enum": [math.nan]}, (), "'enum' values must be JSON values."),
    ({"const": math.inf}, (), "'const' must be a JSON value."),
    ({"anyOf": {}}, (), "'anyOf' must be a non-empty array of schemas."),
    ({"oneOf": []}, (), "'oneOf' must be a non-empty array of schemas."),
    ({"anyOf": [{"type": "string"}, 5]}, ("anyOf", 1), "a schema must be an object or a boolean."),
    ({"properties": []}, (), "'properties' must be an object."),
    ({"type": "object", "required": 5}, (), "'required' must be an array of strings."),
    ({"type": "object", "required": ["a", 1]}, (), "'required' must be an array of strings."),
    ({"type": "array", "items": 3}, ("items",), "a schema must be an object or a boolean."),
    (
        {"type": "frob"},
        (),
        BAD_TYPE,
    ),
    (
        {"type": []},
        (),
        BAD_TYPE,
    ),
    (
        {"type": "object", "properties": {"tags": {"type": "array", "items": {"maxItems": 1, "minItems": 1.5}}}},
        ("properties", "tags", "items"),
        "'minItems' must be a non-negative integer.",
    ),
    (DEEP, ("items",) * (MAX_SCHEMA_DEPTH + 1), f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels."),
    (
        {"type": "object", "properties": {f"p{i}": {} for i in range(MAX_SCHEMA_NODES)}},
        (),
        f"the schema holds more than {MAX_SCHEMA_NODES} subschemas and names.",
    ),
]
MALFORMED_IDS = [json.dumps(case[0])[:40] for case in MALFORMED]


async def post(api: OzwellAPI, key: str, body: dict[str, Any]) -> Any:
    async with raw_client(api) as http:
        # json.dumps writes NaN and Infinity as JavaScript does; the wire accepts them, as OpenAI's parser does.
        return await http.post(
            "/chat/completions",
            content=json.dumps(body),
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("schema", "context", "problem"), MALFORMED, ids=MALFORMED_IDS)
async def test_a_malformed_response_format_schema_is_a_400(
    api_and_key: tuple[OzwellAPI, str], schema: Any, context: tuple[str | int, ...], problem: str, stream: bool
) -> None:
    api, key = api_and_key
    body = {
        "model": "echo",
        "messages": [{"role": "user", "content": "x"}],
        "response_format": response_format(schema, "person"),
        "stream": stream,
    }
    response = await post(api, key, body)
    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "message": f"Invalid schema for response_format 'person': In context={context!r}, {problem}",
            "type": "invalid_request_error",
            "param": "response_format",
            "code": "invalid_json_schema",
        }
    }


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize(("schema", "context", "problem"), MALFORMED[:8], ids=MALFORMED_IDS[:8])
async def test_a_malformed_forced_tool_schema_is_a_400(
    api_and_key: tuple[OzwellAPI, str], schema: Any, context: tuple[str | int, ...], problem: str, stream: bool
) -> None:
    api, key = api_and_key
    tools = [NOOP, plot_tool(schema)]
    for choice in (PLOT, "required"):
        if choice == "required":
            tools = tools[::-1]  # "required" calls the first tool
        body = {
            "model": "echo",
            "messages": [{"role": "user", "content": "x"}],
            "tools": tools,
            "tool_choice": choice,
            "stream": stream,
        }
        response = await post(api, key, body)
        assert response.status_code == 400
        assert response.json() == {
            "error": {
                "message": f"Invalid schema for function 'plot': In context={context!r}, {problem}",
                "type": "invalid_request_error",
                "param": f"tools[{0 if choice == 'required' else 1}].function.parameters",
                "code": "invalid_function_parameters",
            }
        }


async def test_the_sdk_sees_a_bad_schema_as_bad_request(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    client = async_openai(api, key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "x"}],
            response_format=response_format({"type": "object", "properties": {"a": {"minimum": "abc"}}}),  # type: ignore[arg-type]
        )
    assert info.value.param == "response_format" and info.value.code == "invalid_json_schema"
    assert "In context=('properties', 'a'), 'minimum' must be a finite number." in info.value.message
    await client.close()


# -- a client that resets a long stream -----------------------------------------------------------------------------


class CountingEcho(EchoBackend):
    """Echo, counting the chunks it makes and noting when its stream is closed. Its generator never awaits, so
    nothing but the SSE response itself can give the event loop a chance to see the client go."""

    def __init__(self) -> None:
        super().__init__(max_output_tokens=1_000_000)
        self.made = 0
        self.closed = threading.Event()
        self.closed_at = 0.0

    async def stream_chat(self, request: ChatCompletionRequest, ctx: Call) -> AsyncIterator[ChatChunk]:
        try:
            async for chunk in super().stream_chat(request, ctx):
                self.made += 1
                yield chunk
        finally:
            self.closed_at = time.monotonic()
            self.closed.set()


class RecordingLimiter(LimitsRateLimiter):
    def __init__(self) -> None:
        super().__init__("memory://")
        self.settled: list[int] = []

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        self.settled.append(used_tokens)
        await super().settle(reservation, used_tokens)


@pytest.mark.slow
def test_a_reset_connection_stops_a_stream_that_never_awaits() -> None:
    """Before: 200,000 words went on being generated for ~1.5 s after the reset, every one of them charged."""
    words = 200_000
    backend = CountingEcho()
    limiter = RecordingLimiter()
    api = OzwellAPI(secret=SECRET, backend=backend, rate_limiter=limiter)
    key = anyio.run(lambda: api.keys.create(name="t", owner="o", plan="enterprise"))[1]
    body = json.dumps(
        {
            "model": "echo",
            "messages": [{"role": "user", "content": "word " * words}],
            "max_tokens": 2 * words,
            "stream": True,
        }
    ).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\nauthorization: Bearer {key}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode()
    with uvicorn_server(PrefixedApp(api)) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head + body)
            received = b""
            while received.count(b"data: ") < 20:
                more = sock.recv(65536)
                assert more, "the server closed the stream early"
                received += more
            assert b" 200 OK" in received.split(b"\r\n", 1)[0]
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        reset = time.monotonic()
        assert backend.closed.wait(10), "the backend stream was never closed"
        assert backend.closed_at - reset < 1.0
    total = words + 3  # role, one chunk per word, finish, usage
    assert backend.made < total // 2, f"{backend.made} of {total} chunks were made after the client left"
    prompt = default_tokenizer().count("word " * words)
    assert limiter.settled and limiter.settled[0] < prompt + words // 2  # charged what was sent, not the whole
