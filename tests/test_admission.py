"""Refused requests cost next to nothing, and the reservation bounds what an admitted request may use (issue 11,
items 3 and 4): a spent key is answered before its body is read; a body that stops arriving is dropped with a 408;
the settings' caps on messages, content parts and ``n``; a request without max tokens is generated to what was
reserved for it; the prompt estimate counts every field the model receives; large bodies are parsed off the loop.

Windows use an injected clock (a fixed instant mid-window), so nothing here waits for a real minute.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends.echo import EchoBackend
from ozwell_asgi.context import Settings
from ozwell_asgi.ratelimit import LimitsRateLimiter
from ozwell_asgi.tokens import default_tokenizer
from ozwell_asgi.types import Call, ChatChunk, ChatResult, Message
from ozwell_asgi.wire.chat import ChatCompletionRequest
from tests.harness import async_openai, raw_client, uvicorn_server

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
NOW = 1_800_000_030.0  # 30 s into a 60 s window


def fixed_clock() -> float:
    return NOW


def make_api(**kwargs: Any) -> OzwellAPI:
    kwargs.setdefault("rate_limiter", LimitsRateLimiter("memory://", clock=fixed_clock))
    return OzwellAPI(secret=SECRET, **kwargs)


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class RecordingEcho(EchoBackend):
    """The echo backend, recording each request it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[ChatCompletionRequest] = []

    async def complete_chat(self, request: ChatCompletionRequest, ctx: Call) -> ChatResult:
        self.requests.append(request)
        return await super().complete_chat(request, ctx)

    async def stream_chat(self, request: ChatCompletionRequest, ctx: Call) -> AsyncIterator[ChatChunk]:
        self.requests.append(request)
        async for chunk in super().stream_chat(request, ctx):
            yield chunk


def body_receiver(body: bytes) -> tuple[Any, list[str]]:
    """An ASGI ``receive`` that records every call: the body in one message, then nothing more."""
    calls: list[str] = []

    async def receive() -> Message:
        calls.append("receive")
        if len(calls) == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    return receive, calls


async def call_raw(app: Any, key: str, receive: Any, content_length: int | bytes) -> tuple[int, dict[str, str], bytes]:
    """POST /v1/chat/completions straight into the ASGI app with our own ``receive``."""
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "root_path": "/v1",
        "query_string": b"",
        "headers": [
            (b"authorization", f"Bearer {key}".encode()),
            (b"content-type", b"application/json"),
            (b"content-length", content_length if isinstance(content_length, bytes) else b"%d" % content_length),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 80),
    }
    with anyio.fail_after(5):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    return start["status"], headers, body


# ------------------------------------------------------------------------- refused before the body is read


async def test_a_spent_request_budget_is_refused_without_reading_the_body() -> None:
    api = make_api()
    _, key = await api.keys.create(name="t", owner="o", plan="free", rpm=1)
    small = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode()
    receive, calls = body_receiver(small)
    status, _, _ = await call_raw(api, key, receive, len(small))
    assert status == 200
    assert calls == ["receive"]

    big = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "x" * 1000}] * 30_000}).encode()
    receive, calls = body_receiver(big)
    began = time.perf_counter()
    status, headers, body = await call_raw(api, key, receive, len(big))
    assert status == 429
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert calls == []  # the body was never asked for
    assert time.perf_counter() - began < 0.05


async def test_a_spent_token_budget_is_refused_without_reading_the_body() -> None:
    api = make_api()
    _, key = await api.keys.create(name="t", owner="o", plan="free", tpm=100)
    # Spend the whole token budget (a settlement charges what was really used, here all 100 tokens).
    principal = await api.services.authenticator.authenticate(f"Bearer {key}")
    spent = await api.rate_limiter.reserve(principal.key_id, principal.quota, 0)
    await api.rate_limiter.settle(spent, 100)
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}]}).encode()
    receive, calls = body_receiver(body)
    status, headers, answer = await call_raw(api, key, receive, len(body))
    assert status == 429
    assert json.loads(answer)["error"]["code"] == "rate_limit_exceeded"
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-remaining-requests"] == "19"  # refused whole: not even the request was taken
    assert calls == []
    # GET /models needs no tokens: still served.
    async with raw_client(api) as http:
        assert (await http.get("/models", headers=auth(key))).status_code == 200


async def test_request_too_large_counts_one_request_and_no_tokens() -> None:
    api = make_api()
    _, key = await api.keys.create(name="t", owner="o", plan="free", tpm=1000)
    async with raw_client(api) as http:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}
        refused = await http.post("/chat/completions", json=body, headers=auth(key))
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "request_too_large"
        assert refused.headers["x-should-retry"] == "false"
        probe = await http.get("/models", headers=auth(key))
    assert probe.headers["x-ratelimit-remaining-requests"] == "18"  # the refusal and the probe
    assert probe.headers["x-ratelimit-remaining-tokens"] == "1000"


async def test_an_unauthenticated_request_is_refused_without_reading_the_body() -> None:
    api = make_api()
    receive, calls = body_receiver(b"{}")
    status, _, body = await call_raw(api, "ozw_" + "A" * 43, receive, 2)
    assert status == 401
    assert json.loads(body)["error"]["code"] == "invalid_api_key"
    assert calls == []


@pytest.mark.parametrize("declared", [b"\xb2", b"1\xb9", b"-5", b"12a", b""])
async def test_a_content_length_that_is_not_ascii_digits_is_a_400(declared: bytes) -> None:
    """A latin-1 superscript is a digit to ``str.isdigit`` but not to ``int``: still a 400, never a 500."""
    api = make_api()
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    receive, calls = body_receiver(b'{"model": "echo", "messages": [{"role": "user", "content": "hi"}]}')
    status, _, body = await call_raw(api, key, receive, declared)
    assert status == 400, body
    assert json.loads(body)["error"]["message"] == "Invalid Content-Length header."
    assert calls == []


# --------------------------------------------------------------------------------------- a stalled body


async def test_a_body_that_stops_arriving_is_dropped_with_a_408() -> None:
    api = make_api(settings=Settings(body_idle_timeout=0.05))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    calls: list[str] = []

    async def stalled() -> Message:
        calls.append("receive")
        if len(calls) == 1:
            return {"type": "http.request", "body": b'{"model": "echo", ', "more_body": True}
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    status, headers, body = await call_raw(api, key, stalled, 1000)
    assert status == 408
    assert json.loads(body) == {
        "error": {
            "message": "The request body stopped arriving: nothing was received for 0.05 seconds.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
    assert "x-request-id" in headers
    # The request was admitted (counted) before its body; its token floor was given back.
    async with raw_client(api) as http:
        probe = await http.get("/models", headers=auth(key))
    assert probe.headers["x-ratelimit-remaining-requests"] == "98"
    assert probe.headers["x-ratelimit-remaining-tokens"] == "100000"


async def test_a_stalled_body_over_a_real_socket_is_dropped() -> None:
    api = OzwellAPI(secret=SECRET, settings=Settings(body_idle_timeout=0.2))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    with uvicorn_server(api, root_path="/v1") as base:
        host, port = base.removeprefix("http://").split(":")

        def stall() -> bytes:
            with socket.create_connection((host, int(port)), timeout=5) as sock:
                head = (
                    "POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n"
                )
                sock.sendall(head.encode() + b'{"model": "echo"')
                data = b""
                while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
                    piece = sock.recv(65536)
                    if not piece:
                        break
                    data += piece
                return data

        answer = await anyio.to_thread.run_sync(stall)
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert b'"code":"request_timeout"' in answer


# ------------------------------------------------------------------------------------------------- caps


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [{"role": "user", "content": "a"}] * 6}, "messages", "invalid_value"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 4}] * 2},
            "messages",
            "invalid_value",
        ),
        ({"messages": [{"role": "user", "content": "a"}], "n": 4}, "n", "invalid_value"),
    ],
    ids=["messages", "content-parts", "n"],
)
async def test_caps_on_messages_parts_and_n(body: dict[str, Any], param: str, code: str) -> None:
    api = make_api(settings=Settings(max_messages=5, max_content_parts=7, max_choices=3))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json={"model": "echo", **body}, headers=auth(key))
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")
        # Right at each cap it is admitted.
        ok = {
            "model": "echo",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}] * 7}]
            + [{"role": "user", "content": "b"}] * 4,
            "n": 3,
        }
        assert (await http.post("/chat/completions", json=ok, headers=auth(key))).status_code == 200


# -------------------------------------------------------------------------- the reservation bounds the answer


async def test_a_request_without_max_tokens_is_generated_to_its_reservation() -> None:
    backend = RecordingEcho()
    api = make_api(backend=backend, settings=Settings(default_completion_reserve=64))
    _, key = await api.keys.create(name="t", owner="o", plan="free")
    prompt = " ".join(f"word{i}" for i in range(1500))
    client = async_openai(api, key, max_retries=0)
    completion = await client.chat.completions.create(model="echo", n=4, messages=[{"role": "user", "content": prompt}])
    assert backend.requests[-1].max_completion_tokens == 64  # the bound reaches the backend
    assert all(c.finish_reason == "length" for c in completion.choices)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 4 * 64
    assert completion.usage.total_tokens <= completion.usage.prompt_tokens + 4 * 64

    # The user's own bound is kept.
    await client.chat.completions.create(model="echo", max_tokens=5, messages=[{"role": "user", "content": prompt}])
    assert backend.requests[-1].max_tokens == 5
    assert backend.requests[-1].max_completion_tokens is None
    await client.close()


async def test_concurrent_requests_never_use_more_than_the_plan() -> None:
    api = make_api()  # free: 10,000 tokens per minute
    _, key = await api.keys.create(name="t", owner="o", plan="free")
    prompt = " ".join(f"word{i}" for i in range(1500))
    client = async_openai(api, key, max_retries=0)
    used: list[int] = []
    refused: list[int] = []

    async def one() -> None:
        try:
            completion = await client.chat.completions.create(
                model="echo", n=4, messages=[{"role": "user", "content": prompt}]
            )
        except openai.RateLimitError:
            refused.append(1)
            return
        assert completion.usage is not None
        used.append(completion.usage.total_tokens)

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(one)
    assert used and refused
    assert sum(used) <= 10_000
    async with raw_client(api) as http:
        probe = await http.get("/models", headers=auth(key))
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) == 10_000 - sum(used)
    await client.close()


class OverspendingBackend(EchoBackend):
    """A backend that ignores the bound and reports far more usage than was reserved."""

    async def complete_chat(self, request: ChatCompletionRequest, ctx: Call) -> ChatResult:
        result = await super().complete_chat(request, ctx)
        assert result.usage is not None
        return ChatResult(choices=result.choices, usage=type(result.usage)(result.usage.prompt_tokens, 50_000))


async def test_a_call_is_never_charged_more_than_it_reserved() -> None:
    api = make_api(backend=OverspendingBackend())
    _, key = await api.keys.create(name="t", owner="o", plan="free")
    async with raw_client(api) as http:
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
        answer = await http.post("/chat/completions", json=body, headers=auth(key))
        assert answer.status_code == 200
        reserved = 10_000 - int(answer.headers["x-ratelimit-remaining-tokens"])
        probe = await http.get("/models", headers=auth(key))
    assert int(probe.headers["x-ratelimit-remaining-tokens"]) == 10_000 - reserved


# ----------------------------------------------------------------------------- the estimate counts every field

MEGABYTE = 1_000_000
WORDS = "lorem ipsum dolor sit amet " * (MEGABYTE // 27)


@pytest.mark.parametrize(
    "extra",
    [
        {"messages": [{"role": "user", "content": "hi", "name": WORDS}]},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": WORDS, "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": WORDS, "content": "ok"},
            ]
        },
        {"functions": [{"name": "f", "description": WORDS}]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {"description": WORDS}}}},
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "A" * MEGABYTE, "format": "wav"}}],
                }
            ]
        },
        {"messages": [{"role": "user", "content": [{"type": "file", "file": {"file_data": "A" * MEGABYTE}}]}]},
        {"messages": [{"role": "user", "content": "hi"}], "some_new_field": WORDS},
    ],
    ids=["name", "tool-call-ids", "functions", "response-format", "audio", "file", "unknown-field"],
)
async def test_the_prompt_estimate_counts_every_field_the_model_receives(extra: dict[str, Any]) -> None:
    api = make_api()
    _, key = await api.keys.create(name="t", owner="o", plan="enterprise", tpm=10**9)
    body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, **extra}
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json=body, headers=auth(key))
    assert response.status_code == 200, response.text
    reserved = 10**9 - int(response.headers["x-ratelimit-remaining-tokens"])
    assert reserved > 100_000  # a megabyte of anything is charged like a megabyte, not 7 to 11 tokens
    assert response.json()["usage"]["prompt_tokens"] > 100_000


# ------------------------------------------------------------------------------- large bodies off the loop


class ThreadRecordingTokenizer:
    """The default tokenizer, recording which threads count text."""

    def __init__(self) -> None:
        self.inner = default_tokenizer()
        self.threads: set[int] = set()

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.inner.decode(tokens)

    def token_bytes(self, token: int) -> bytes:
        return self.inner.token_bytes(token)

    def count(self, text: str) -> int:
        self.threads.add(threading.get_ident())
        return self.inner.count(text)

    async def warm(self) -> None:
        await self.inner.warm()


async def test_large_bodies_are_parsed_and_counted_off_the_event_loop() -> None:
    tokenizer = ThreadRecordingTokenizer()
    api = make_api(tokenizer=tokenizer, settings=Settings(offload_parse_above=64 * 1024))
    _, key = await api.keys.create(name="t", owner="o", plan="enterprise", tpm=10**9)
    loop_thread = threading.get_ident()
    async with raw_client(api) as http:
        small = {"model": "echo", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        assert (await http.post("/chat/completions", json=small, headers=auth(key))).status_code == 200
        assert tokenizer.threads == {loop_thread}
        tokenizer.threads.clear()
        big = {**small, "messages": [{"role": "user", "content": "word " * 100_000}]}
        response = await http.post("/chat/completions", json=big, headers=auth(key))
        assert response.status_code == 200
    # The prompt was counted in a worker thread once; the backend reused that count (no second count on the loop
    # for the prompt; the loop only counted the one-token answer).
    assert tokenizer.threads - {loop_thread}
    assert response.json()["usage"]["prompt_tokens"] > 100_000
