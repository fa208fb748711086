"""OpenAICompatibleBackend against real upstreams over loopback: the fault-injecting one (tests/upstream_fault.py)
and another ozwell-asgi, both under uvicorn. The backend's methods are called directly."""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import httpx
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from ozwell_asgi.backends.openai_compatible import OpenAICompatibleBackend, SSEDecoder
from ozwell_asgi.context import Settings
from ozwell_asgi.errors import BadGatewayError, GatewayTimeoutError, InvalidRequestError, OzwellError
from ozwell_asgi.types import Call, ChatChunk, Principal, Quota, ToolCallDelta, Usage
from ozwell_asgi.wire.chat import ChatCompletionRequest, parse_chat_request
from ozwell_asgi.wire.embeddings import EmbeddingRequest, parse_embedding_request
from tests.harness import async_openai, free_port, uvicorn_server
from tests.upstream_fault import ANSWER, FINGERPRINT, TOOL_ARGS, FaultUpstream

pytestmark = pytest.mark.anyio

KEY = "sk-upstream-secret-0123456789"
PRINCIPAL = Principal(key_id="key_1", owner="alice", plan="pro", quota=Quota(None, None))
FAST = httpx.Timeout(5.0, connect=2.0)


def call(max_tokens: int | None = 64, deadline: float | None = None) -> Call:
    return Call(
        request_id="req_test_1", principal=PRINCIPAL, endpoint="chat.completions", deadline=deadline,
        max_tokens=max_tokens,
    )  # fmt: skip


def chat(model: str, stream: bool = True, **fields: Any) -> ChatCompletionRequest:
    body = {"model": model, "messages": [{"role": "user", "content": "Hi there"}], **fields}
    if stream:
        body["stream"] = True
    return parse_chat_request(json.dumps(body))


def embedding(model: str, **fields: Any) -> EmbeddingRequest:
    return parse_embedding_request(json.dumps({"model": model, **fields}))


async def collect(
    backend: OpenAICompatibleBackend, request: ChatCompletionRequest, into: list[ChatChunk] | None = None, **kw: Any
) -> list[ChatChunk]:
    chunks = [] if into is None else into
    async for chunk in backend.stream_chat(request, call(**kw)):
        chunks.append(chunk)
    return chunks


async def ask(backend: OpenAICompatibleBackend, model: str, stream: bool, **kw: Any) -> object:
    """The whole answer, streamed or not."""
    if stream:
        return await collect(backend, chat(model), **kw)
    return await backend.complete_chat(chat(model, stream=False), call(**kw))


def text(chunks: list[ChatChunk], index: int = 0) -> str:
    return "".join(c.content or "" for c in chunks if c.index == index and c.usage is None)


@pytest.fixture(scope="module")
def fault_server() -> Iterator[tuple[FaultUpstream, str]]:
    app = FaultUpstream()
    with uvicorn_server(app) as url:
        yield app, url


@pytest.fixture
def fault(fault_server: tuple[FaultUpstream, str]) -> FaultUpstream:
    fault_server[0].reset()
    return fault_server[0]


@pytest.fixture
async def backend(fault_server: tuple[FaultUpstream, str]) -> AsyncIterator[OpenAICompatibleBackend]:
    upstream = OpenAICompatibleBackend(fault_server[1] + "/v1", KEY, timeout=FAST, backoff=0.0)
    yield upstream
    await upstream.aclose()


def assert_no_leak(error: OzwellError, base: str) -> None:
    host = base.removeprefix("http://")
    assert KEY not in error.message and base not in error.message and host not in error.message, error.message


# ------------------------------------------------------------------------------------------------- streaming


async def test_stream_yields_each_chunk_with_what_the_upstream_sent(
    backend: OpenAICompatibleBackend, fault: FaultUpstream
) -> None:
    chunks = await collect(backend, chat("ok", top_k=5, metadata={"a": "b"}), max_tokens=40)
    assert chunks[0] == ChatChunk(role="assistant", content="", model="fault-model-v2", system_fingerprint=FINGERPRINT)
    assert text(chunks) == "".join(ANSWER)
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["stop"]
    assert chunks[-1] == ChatChunk(usage=Usage(7, 3))
    sent = fault.last()
    assert sent.body == {
        "model": "ok",
        "messages": [{"role": "user", "content": "Hi there"}],
        "metadata": {"a": "b"},
        "top_k": 5,  # a field we do not model, passed as the client sent it
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_completion_tokens": 40,  # the call's bound, as the client set none
    }
    assert sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.headers["x-request-id"] == "req_test_1"
    assert sent.headers["accept"] == "text/event-stream"


@pytest.mark.parametrize("size", [10, 70_000, 1_000_000])
async def test_a_request_body_of_any_size_goes_upstream_whole(
    backend: OpenAICompatibleBackend, fault: FaultUpstream, size: int
) -> None:
    # The head waits for the body to leave in one send when both are small; a large body goes on its own.
    content = "x" * size
    await collect(backend, chat("ok", messages=[{"role": "user", "content": content}]))
    assert fault.last().body["messages"][0]["content"] == content


async def test_the_bound_goes_upstream_under_one_name(backend: OpenAICompatibleBackend, fault: FaultUpstream) -> None:
    await collect(backend, chat("ok", max_tokens=10), max_tokens=64)
    assert fault.last().body["max_completion_tokens"] == 10
    assert "max_tokens" not in fault.last().body
    await collect(backend, chat("ok", max_completion_tokens=500), max_tokens=64)  # never more than the call's bound
    assert fault.last().body["max_completion_tokens"] == 64
    await collect(backend, chat("ok", stream_options={"include_usage": False}), max_tokens=None)
    assert "max_completion_tokens" not in fault.last().body
    assert fault.last().body["stream_options"] == {"include_usage": True}  # we always need the usage


async def test_token_param_for_servers_that_predate_max_completion_tokens(
    fault_server: tuple[FaultUpstream, str], fault: FaultUpstream
) -> None:
    old = OpenAICompatibleBackend(fault_server[1] + "/v1", token_param="max_tokens", timeout=FAST)
    try:
        await collect(old, chat("ok", max_completion_tokens=12), max_tokens=64)
    finally:
        await old.aclose()
    assert fault.last().body["max_tokens"] == 12
    assert "max_completion_tokens" not in fault.last().body
    assert "authorization" not in fault.last().headers


async def test_stream_tool_calls_keep_index_id_type_name_and_argument_deltas(backend: OpenAICompatibleBackend) -> None:
    chunks = await collect(backend, chat("tools"))
    calls = [d for c in chunks for d in c.tool_calls]
    assert calls[0] == ToolCallDelta(index=0, id="call_a", name="weather", arguments=None, type="function")
    assert calls[1] == ToolCallDelta(index=0, arguments=TOOL_ARGS[0])
    assert calls[3] == ToolCallDelta(index=1, id="call_b", name="weather", arguments=TOOL_ARGS[2], type="function")
    for index, expected in ((0, {"city": "Paris"}), (1, {"city": "Rome"})):
        assert json.loads("".join(d.arguments or "" for d in calls if d.index == index)) == expected
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["tool_calls"]


async def test_stream_custom_tool_call(backend: OpenAICompatibleBackend) -> None:
    chunks = await collect(backend, chat("custom-tool"))
    delta = ToolCallDelta(index=0, id="call_c", name="sql", arguments="SELECT 1", type="custom")
    assert chunks[0].tool_calls == (delta,)


@pytest.mark.parametrize("model", ["reasoning", "reasoning-field"])
async def test_stream_reasoning(backend: OpenAICompatibleBackend, model: str) -> None:
    chunks = await collect(backend, chat(model))
    assert "".join(c.reasoning_content or "" for c in chunks) == "Let me think. Done."
    assert text(chunks) == "42"
    assert all(c.extra is None for c in chunks)


async def test_stream_usage_details_and_usage_on_every_chunk(backend: OpenAICompatibleBackend) -> None:
    chunks = await collect(backend, chat("details"))
    assert chunks[-1].usage == Usage(
        7, 3, {"cached_tokens": 5, "audio_tokens": 0}, {"reasoning_tokens": 2, "accepted_prediction_tokens": 0}
    )
    chunks = await collect(backend, chat("usage-each"))
    assert [c.usage for c in chunks if c.usage is not None] == [Usage(7, 3)]  # the last count, once, at the end
    assert text(chunks) == "".join(ANSWER)


async def test_stream_splits_choices_and_keeps_unknown_fields(backend: OpenAICompatibleBackend) -> None:
    chunks = await collect(backend, chat("extra", n=2, logprobs=True))
    assert [(c.index, c.role) for c in chunks[:2]] == [(0, "assistant"), (1, "assistant")]
    first, second = chunks[2], chunks[3]
    assert (first.index, first.content, first.extra) == (0, "A", {"x_vendor": {"score": 1}})
    assert first.logprobs is not None and first.logprobs["content"][0]["token"] == "A"
    assert (second.index, second.content, second.extra) == (1, "B", {"audio": {"id": "audio_1"}})
    assert [(c.index, c.finish_reason) for c in chunks if c.finish_reason] == [(0, "stop"), (1, "length")]


@pytest.mark.parametrize("model", ["crlf", "cr"])
async def test_stream_parsed_incrementally_whatever_the_line_endings(
    backend: OpenAICompatibleBackend, model: str
) -> None:
    chunks = await collect(backend, chat(model))  # written five bytes at a time, with comments, ids and retry
    assert text(chunks) == "".join(ANSWER)
    assert chunks[-1].usage == Usage(7, 3)


async def test_stream_ended_after_every_choice_finished_is_complete(backend: OpenAICompatibleBackend) -> None:
    chunks = await collect(backend, chat("finished-no-done"))
    assert text(chunks) == "".join(ANSWER)
    assert chunks[-1].usage == Usage(7, 3)


async def test_each_chunk_is_yielded_as_it_arrives(backend: OpenAICompatibleBackend, fault: FaultUpstream) -> None:
    # The upstream sends one chunk and waits: the chunk must reach us while the upstream is still waiting.
    stream = backend.stream_chat(chat("hang"), call())
    with anyio.fail_after(3):
        first = await anext(stream)
    assert first.role == "assistant"
    assert not fault.last().disconnected.is_set()
    await stream.aclose()  # type: ignore[attr-defined]


async def test_closing_the_stream_cancels_the_upstream_request(
    backend: OpenAICompatibleBackend, fault: FaultUpstream
) -> None:
    stream = backend.stream_chat(chat("hang"), call())
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    seen = await anyio.to_thread.run_sync(fault.last().disconnected.wait, 1.0)
    assert seen, "the upstream did not see its client go away within 1 s"


# ------------------------------------------------------------------------------------------------- failures mid-stream


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ("drop", "broke off"),
        ("malformed", "malformed stream"),
        ("no-done", "broke off"),
        ("error-frame", "overloaded mid-way at [upstream]"),
        ("event-error", "overloaded mid-way at [upstream]"),
    ],
)
async def test_a_broken_stream_is_a_502(
    backend: OpenAICompatibleBackend, fault_server: tuple[FaultUpstream, str], model: str, message: str
) -> None:
    chunks: list[ChatChunk] = []
    with pytest.raises(BadGatewayError) as info:
        await collect(backend, chat(model), into=chunks)
    assert info.value.status == 502 and info.value.code == "upstream_error"
    assert message in info.value.message
    assert_no_leak(info.value, fault_server[1])
    assert fault_server[0].attempts[model] == 1  # never retried once the answer began
    if model != "malformed":
        assert chunks and chunks[0].role == "assistant"  # what came before the failure was passed on


async def test_event_and_line_sizes_are_capped(fault_server: tuple[FaultUpstream, str]) -> None:
    small = OpenAICompatibleBackend(fault_server[1] + "/v1", max_event_size=1024, timeout=FAST)
    try:
        with pytest.raises(BadGatewayError, match="over-long"):
            await collect(small, chat("long-line"))
    finally:
        await small.aclose()


async def test_a_stream_request_answered_without_streaming_is_a_502(backend: OpenAICompatibleBackend) -> None:
    with pytest.raises(BadGatewayError, match="did not stream"):
        await collect(backend, chat("json"))


# ------------------------------------------------------------------------------------------------- non-stream


async def test_complete_chat_goes_upstream_non_streamed(backend: OpenAICompatibleBackend, fault: FaultUpstream) -> None:
    result = await backend.complete_chat(chat("ok", stream=False, seed=3), call(max_tokens=30))
    assert result.choices[0].message.content == "".join(ANSWER)
    assert result.choices[0].finish_reason == "stop"
    assert result.choices[0].message.extra is None  # null and empty fields dropped
    assert (result.model, result.system_fingerprint, result.usage) == ("fault-model-v2", FINGERPRINT, Usage(7, 3))
    body = fault.last().body
    assert body["stream"] is False and "stream_options" not in body
    assert (body["seed"], body["max_completion_tokens"]) == (3, 30)


async def test_complete_chat_tools_reasoning_details_and_extra(backend: OpenAICompatibleBackend) -> None:
    tools = await backend.complete_chat(chat("tools", stream=False), call())
    calls = tools.choices[0].message.tool_calls
    assert [(c.id, c.name, c.type, json.loads(c.arguments)) for c in calls] == [
        ("call_a", "weather", "function", {"city": "Paris"}),
        ("call_b", "weather", "function", {"city": "Rome"}),
    ]
    assert tools.choices[0].finish_reason == "tool_calls"
    custom = await backend.complete_chat(chat("custom-tool", stream=False), call())
    assert custom.choices[0].message.tool_calls[0].type == "custom"
    assert custom.choices[0].message.tool_calls[0].arguments == "SELECT 1"
    for model in ("reasoning", "reasoning-field"):
        answer = await backend.complete_chat(chat(model, stream=False), call())
        assert answer.choices[0].message.reasoning_content == "Let me think. Done."
    details = await backend.complete_chat(chat("details", stream=False), call())
    assert details.usage is not None and details.usage.prompt_tokens_details == {"cached_tokens": 5, "audio_tokens": 0}
    extra = await backend.complete_chat(chat("extra", stream=False), call())
    assert extra.choices[0].message.extra == {
        "annotations": [{"type": "url_citation", "url_citation": {"url": "https://example.com"}}],
        "x_vendor": {"score": 1},
    }


# ------------------------------------------------------------------------------------------------- errors and retries


@pytest.mark.parametrize("stream", [True, False])
async def test_upstream_4xx_comes_back_with_its_fields(
    backend: OpenAICompatibleBackend, fault_server: tuple[FaultUpstream, str], stream: bool
) -> None:
    with pytest.raises(OzwellError) as info:
        await ask(backend, "error-400", stream)
    error = info.value
    assert error.to_dict() == {
        "error": {
            "message": "upstream refused it: bad temperature (seen at [upstream])",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }
    assert error.status == 400
    assert_no_leak(error, fault_server[1])


async def test_unknown_model_is_the_upstreams_404(backend: OpenAICompatibleBackend) -> None:
    with pytest.raises(OzwellError) as info:
        await collect(backend, chat("unknown"))
    assert (info.value.status, info.value.code, info.value.param) == (404, "model_not_found", "model")
    assert "`unknown` does not exist" in info.value.message


async def test_a_non_openai_error_body_gets_a_generic_message(
    backend: OpenAICompatibleBackend, fault: FaultUpstream, fault_server: tuple[FaultUpstream, str]
) -> None:
    with pytest.raises(OzwellError) as info:
        await collect(backend, chat("html-400"))
    assert info.value.to_dict()["error"] == {
        "message": "The upstream model server rejected the request (HTTP 400).",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert info.value.status == 400
    with pytest.raises(BadGatewayError) as bad:
        await backend.complete_chat(chat("html-502#a", stream=False), call())
    assert bad.value.message == "The upstream model server failed (HTTP 502)."
    assert fault.attempts["html-502#a"] == 3  # 502 before any answer: retried twice
    assert_no_leak(bad.value, fault_server[1])


async def test_upstream_500_is_a_502_and_is_not_retried(backend: OpenAICompatibleBackend, fault: FaultUpstream) -> None:
    with pytest.raises(BadGatewayError) as info:
        await collect(backend, chat("error-500"))
    assert (info.value.status, info.value.code, info.value.message) == (
        502,
        "upstream_error",
        "The upstream model server failed (HTTP 500).",  # its message may hold internals: not passed on
    )
    assert fault.attempts["error-500"] == 1


@pytest.mark.parametrize("status", [401, 403])
async def test_refused_credentials_are_the_operators_502(backend: OpenAICompatibleBackend, status: int) -> None:
    with pytest.raises(BadGatewayError) as info:
        await backend.complete_chat(chat(f"error-{status}", stream=False), call())
    assert info.value.status == 502
    assert f"refused this server's credentials (HTTP {status})" in info.value.message


async def test_upstream_rate_limit_is_a_429_with_its_retry_hint(backend: OpenAICompatibleBackend) -> None:
    with pytest.raises(OzwellError) as info:
        await collect(backend, chat("error-429"))
    assert (info.value.status, info.value.type) == (429, "rate_limit_error")
    assert dict(info.value.headers) == {"retry-after": "7"}
    assert "bad temperature" not in info.value.message  # about this server's upstream account: not passed on


@pytest.mark.parametrize("stream", [True, False])
async def test_503_before_the_first_byte_is_retried(
    backend: OpenAICompatibleBackend, fault: FaultUpstream, stream: bool
) -> None:
    model = f"flaky-2#{stream}"
    if stream:
        assert text(await collect(backend, chat(model))) == "".join(ANSWER)
    else:
        assert (await backend.complete_chat(chat(model, stream=False), call())).choices[0].message.content
    assert fault.attempts[model] == 3


async def test_retries_stop_at_connect_retries_and_at_the_deadline(
    fault_server: tuple[FaultUpstream, str], fault: FaultUpstream
) -> None:
    upstream = OpenAICompatibleBackend(fault_server[1] + "/v1", connect_retries=1, backoff=0.0, timeout=FAST)
    try:
        with pytest.raises(BadGatewayError, match="HTTP 503"):
            await collect(upstream, chat("flaky-5#a"))
        assert fault.attempts["flaky-5#a"] == 2
    finally:
        await upstream.aclose()
    patient = OpenAICompatibleBackend(fault_server[1] + "/v1", backoff=30.0, timeout=FAST)
    try:
        # The first backoff (30 s, capped at 8 s) would pass the deadline: no retry, the 503's error at once.
        with anyio.fail_after(3), pytest.raises(BadGatewayError, match="HTTP 503"):
            await collect(patient, chat("flaky-5#b"), deadline=anyio.current_time() + 5)
        assert fault.attempts["flaky-5#b"] == 1
    finally:
        await patient.aclose()


async def test_a_refused_connection_is_a_502() -> None:
    upstream = OpenAICompatibleBackend(f"http://127.0.0.1:{free_port()}/v1", KEY, backoff=0.0, timeout=FAST)
    try:
        with pytest.raises(BadGatewayError) as info:
            await collect(upstream, chat("ok"))
        assert info.value.message == "Could not reach the upstream model server."
        with pytest.raises(BadGatewayError):
            await upstream.list_models()
    finally:
        await upstream.aclose()


async def test_a_slow_first_byte_times_out_as_504_and_the_upstream_sees_us_go(
    fault_server: tuple[FaultUpstream, str], fault: FaultUpstream
) -> None:
    upstream = OpenAICompatibleBackend(fault_server[1] + "/v1", timeout=httpx.Timeout(0.3, connect=2.0))
    try:
        with pytest.raises(GatewayTimeoutError) as info:
            await collect(upstream, chat("slow#a"))
        assert (info.value.status, info.value.code) == (504, "upstream_timeout")
        assert fault.attempts["slow#a"] == 1  # a timeout is never retried
        assert await anyio.to_thread.run_sync(fault.last().disconnected.wait, 1.0)
    finally:
        await upstream.aclose()


@pytest.mark.parametrize("stream", [True, False])
async def test_the_calls_deadline_bounds_the_wait(backend: OpenAICompatibleBackend, stream: bool) -> None:
    deadline = anyio.current_time() + 0.3
    with anyio.fail_after(3), pytest.raises(GatewayTimeoutError):
        await ask(backend, "slow", stream, deadline=deadline)


# ------------------------------------------------------------------------------------------------- models


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_models_are_listed_typed_and_cached(
    fault_server: tuple[FaultUpstream, str], fault: FaultUpstream
) -> None:
    clock = Clock()
    upstream = OpenAICompatibleBackend(fault_server[1] + "/v1", models_ttl=60, clock=clock, timeout=FAST)
    try:
        models = await upstream.list_models()
        assert [(m.id, m.kind, m.owned_by, m.created) for m in models if m.id in ("ok", "nomic-embed-text")] == [
            ("ok", "chat", "fault", 100),
            ("nomic-embed-text", "embedding", "fault", 106),
        ]
        kinds = {m.id: m.kind for m in models}
        assert kinds["text-embedding-3-small"] == "embedding"
        assert kinds["bge-m3"] == "chat"  # the default patterns cannot know it: say so with embedding_models=
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(upstream.list_models)
        clock.now += 59
        await upstream.list_models()
        assert fault.count("/models") == 1
        clock.now += 2
        await upstream.list_models()
        assert fault.count("/models") == 2
        # A failed refresh serves the list already known.
        fault.models_status = 500
        clock.now += 61
        assert [m.id for m in await upstream.list_models()][:1] == ["ok"]
    finally:
        await upstream.aclose()
    explicit = OpenAICompatibleBackend(fault_server[1] + "/v1", embedding_models=["bge-*"], timeout=FAST)
    try:
        with pytest.raises(BadGatewayError, match="HTTP 500"):  # nothing cached yet: the failure shows
            await explicit.list_models()
        fault.models_status = None
        kinds = {m.id: m.kind for m in await explicit.list_models()}
        assert kinds["bge-m3"] == "embedding" and kinds["nomic-embed-text"] == "chat"
    finally:
        await explicit.aclose()


# ------------------------------------------------------------------------------------------------- embeddings


async def test_embeddings_in_input_order(backend: OpenAICompatibleBackend, fault: FaultUpstream) -> None:
    result = await backend.embed(embedding("emb", input=["a", "b", "c"], encoding_format="base64"), call())
    assert [v[0] for v in result.vectors] == [1.0, 2.0, 3.0]
    assert (result.prompt_tokens, result.model) == (11, "fault-embed-v1")
    assert fault.last("/embeddings").body == {"model": "emb", "input": ["a", "b", "c"], "encoding_format": "float"}
    result = await backend.embed(embedding("emb-base64", input=[[1, 2], [3]], dimensions=4), call())
    assert [list(v) for v in result.vectors] == [[1.0, 0.5, 0.5, 0.5], [2.0, 0.5, 0.5, 0.5]]
    assert fault.last("/embeddings").body["dimensions"] == 4


async def test_embeddings_failures(backend: OpenAICompatibleBackend) -> None:
    with pytest.raises(BadGatewayError, match="wrong number"):
        await backend.embed(embedding("emb-short", input=["a", "b"]), call())
    with pytest.raises(InvalidRequestError) as info:
        await backend.embed(embedding("emb-nodims", input="a", dimensions=8), call())
    assert info.value.param == "dimensions"
    with pytest.raises(OzwellError) as status:
        await backend.embed(embedding("unknown", input="a"), call())
    assert (status.value.status, status.value.code) == (404, "model_not_found")
    counted = await backend.embed(embedding("emb-nousage", input=["hello world", "again"]), call())
    assert counted.prompt_tokens == 2 + 1  # no usage upstream: counted here
    counted = await backend.embed(embedding("emb-nousage", input=[[5, 6, 7], [8]]), call())
    assert counted.prompt_tokens == 4


# ------------------------------------------------------------------------------------------------- lifecycle, SSE


async def test_one_pooled_client_closed_by_aclose(backend: OpenAICompatibleBackend, fault: FaultUpstream) -> None:
    await backend.list_models()  # its answer sets a cookie, which no later request may carry
    await collect(backend, chat("ok"))
    sender = backend._sender
    await collect(backend, chat("ok"))
    await backend.complete_chat(chat("ok", stream=False), call())
    assert backend._sender is sender is not None
    ports = {r.client_port for r in fault.received}
    assert len(ports) == 1, "a finished stream must leave its connection to the next request"
    assert not any("cookie" in r.headers for r in fault.received)
    await backend.aclose()
    assert backend._sender is None
    assert text(await collect(backend, chat("ok"))) == "".join(ANSWER)  # usable again, on a new connection
    assert len({r.client_port for r in fault.received}) == 2


async def test_the_pool_bounds_connections_and_waits_for_a_free_one(
    fault_server: tuple[FaultUpstream, str], fault: FaultUpstream
) -> None:
    limits = httpx.Limits(max_connections=2, max_keepalive_connections=2, keepalive_expiry=60)
    upstream = OpenAICompatibleBackend(
        fault_server[1] + "/v1", timeout=httpx.Timeout(5.0, connect=2.0, pool=0.3), limits=limits
    )
    try:
        answers: list[str] = []

        async def ask_one() -> None:
            answers.append(text(await collect(upstream, chat("ok"))))

        async with anyio.create_task_group() as tg:
            for _ in range(8):
                tg.start_soon(ask_one)
        assert answers == ["".join(ANSWER)] * 8
        assert len({r.client_port for r in fault.received}) <= 2  # 8 requests, 2 connections
        first, second = upstream.stream_chat(chat("hang"), call()), upstream.stream_chat(chat("hang"), call())
        await anext(first)
        await anext(second)
        with pytest.raises(GatewayTimeoutError):  # both connections busy: no free one within the pool timeout
            await collect(upstream, chat("ok"))
        await first.aclose()  # type: ignore[attr-defined]
        assert text(await collect(upstream, chat("ok"))) == "".join(ANSWER)
        await second.aclose()  # type: ignore[attr-defined]
    finally:
        await upstream.aclose()
    fault.reset()
    no_idle = OpenAICompatibleBackend(
        fault_server[1] + "/v1", timeout=FAST, limits=httpx.Limits(max_keepalive_connections=0)
    )
    try:
        for _ in range(3):
            await collect(no_idle, chat("ok"))
    finally:
        await no_idle.aclose()
    assert len({r.client_port for r in fault.received}) == 3  # none kept idle: a new connection each time


async def test_a_client_passed_in_is_left_open(fault_server: tuple[FaultUpstream, str]) -> None:
    async with httpx.AsyncClient(timeout=FAST) as client:
        upstream = OpenAICompatibleBackend(fault_server[1] + "/v1", client=client)
        assert text(await collect(upstream, chat("ok"))) == "".join(ANSWER)
        await upstream.aclose()
        assert not client.is_closed


async def test_a_proxy_named_by_the_environment_is_used(
    fault_server: tuple[FaultUpstream, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    upstream = OpenAICompatibleBackend(fault_server[1] + "/v1", KEY, backoff=0.0, timeout=FAST)
    try:
        with pytest.raises(BadGatewayError, match="Could not reach"):
            await collect(upstream, chat("ok"))
    finally:
        await upstream.aclose()


async def test_credentials_in_the_url_are_sent(fault_server: tuple[FaultUpstream, str], fault: FaultUpstream) -> None:
    upstream = OpenAICompatibleBackend(fault_server[1].replace("http://", "http://user:pw@") + "/v1", timeout=FAST)
    try:
        await collect(upstream, chat("ok"))
    finally:
        await upstream.aclose()
    assert fault.last().headers["authorization"] == "Basic dXNlcjpwdw=="


class Compressing:
    """An upstream that compresses its answers, as OpenAI does: model ``gzip``, ``deflate``, ``zeros`` (a megabyte
    of zeros, gzipped to 1 KiB) or ``broken`` (a body that is not gzip). Keeps the last accept-encoding it got."""

    accept: bytes | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        data = b""
        while True:
            message = await receive()
            data += message.get("body", b"")
            if not message.get("more_body"):
                break
        self.accept = dict(scope["headers"]).get(b"accept-encoding")
        model = json.loads(data)["model"]
        answer = json.dumps({
            "id": "c", "object": "chat.completion", "created": 1, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "squeezed"}, "finish_reason": "stop"}],
        }).encode()  # fmt: skip
        encoded = {
            "gzip": (b"gzip", gzip.compress(answer)),
            "deflate": (b"deflate", zlib.compress(answer)),
            "zeros": (b"gzip", gzip.compress(b"0" * 1024 * 1024)),
            "broken": (b"gzip", b"\x1f\x8b not gzip at all"),
        }
        encoding, body = encoded[model]
        headers = [(b"content-type", b"application/json"), (b"content-encoding", encoding)]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


async def test_compressed_answers_are_decompressed_within_the_cap() -> None:
    app = Compressing()
    with uvicorn_server(app, lifespan="off") as url:
        upstream = OpenAICompatibleBackend(url + "/v1", timeout=FAST, max_response_size=64 * 1024)
        try:
            for model in ("gzip", "deflate"):
                result = await upstream.complete_chat(chat(model, stream=False), call())
                assert result.choices[0].message.content == "squeezed"
            assert app.accept == b"gzip, deflate"
            with pytest.raises(BadGatewayError, match="too large"):  # the cap counts what it decompresses to
                await upstream.complete_chat(chat("zeros", stream=False), call())
            with pytest.raises(BadGatewayError, match="malformed answer"):
                await upstream.complete_chat(chat("broken", stream=False), call())
        finally:
            await upstream.aclose()


def test_sse_decoder_byte_by_byte() -> None:
    stream = b": hi\r\nevent: x\r\ndata: a\r\ndata:b\r\n\r\nid: 1\rdata: c\r\rdata: d\n\ndata: tail"
    decoder = SSEDecoder()
    events = [e for i in range(len(stream)) for e in decoder.feed(stream[i : i + 1])]
    assert events == [(b"x", b"a\nb"), (b"", b"c"), (b"", b"d")]
    assert decoder.close() == [(b"", b"tail")]


def test_sse_decoder_splits_anywhere() -> None:
    stream = (
        b"data: a\r\n\r\n: ping\rdata: b\rdata: c\r\revent: e\ndata:d\n\ndata: \xe2\x82\xac\r\n\r\ndata: [DONE]\n\n"
    )
    want = [(b"", b"a"), (b"", b"b\nc"), (b"e", b"d"), (b"", "\u20ac".encode()), (b"", b"[DONE]")]
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            decoder = SSEDecoder()
            pieces = (stream[:first], stream[first:second], stream[second:])
            assert [e for p in pieces if p for e in decoder.feed(p)] + decoder.close() == want, (first, second)


def test_sse_decoder_caps() -> None:
    with pytest.raises(BadGatewayError, match="over-long stream line"):
        SSEDecoder(max_size=10).feed(b"data: 0123456789")
    decoder = SSEDecoder(max_size=10)
    decoder.feed(b"data: 0123\ndata: 4567\n")
    with pytest.raises(BadGatewayError, match="over-long stream event"):
        decoder.feed(b"data: 89\n")


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="base_url"):
        OpenAICompatibleBackend("127.0.0.1:8000/v1")
    with pytest.raises(ValueError, match="api_key"):
        OpenAICompatibleBackend("http://127.0.0.1:8000/v1", "sk-abc\nx-injected: 1")
    with pytest.raises(ValueError, match="negative"):
        OpenAICompatibleBackend("http://127.0.0.1:8000/v1", connect_retries=-1)


# ------------------------------------------------------------------------------------------------- another ozwell-asgi


@pytest.fixture(scope="module")
def ozwell_upstream() -> Iterator[tuple[str, str]]:
    api = OzwellAPI(secret="u" * 32, settings=Settings(max_choices=2))
    key = anyio.run(lambda: api.keys.create(name="proxy", owner="operator", plan="enterprise"))[1]
    with uvicorn_server(PrefixedApp(api)) as url:
        yield url + "/v1", key


@pytest.fixture
async def ozwell(ozwell_upstream: tuple[str, str]) -> AsyncIterator[OpenAICompatibleBackend]:
    upstream = OpenAICompatibleBackend(ozwell_upstream[0], ozwell_upstream[1], timeout=FAST, backoff=0.0)
    yield upstream
    await upstream.aclose()


async def test_ozwell_upstream_models_chat_and_stream(ozwell: OpenAICompatibleBackend) -> None:
    kinds = {m.id: m.kind for m in await ozwell.list_models()}
    assert kinds == {"echo": "chat", "echo-embedding": "embedding"}
    message = "Hello, Ozwell! How are you today?"
    messages = [{"role": "user", "content": message}]
    result = await ozwell.complete_chat(chat("echo", stream=False, messages=messages), call())
    assert result.choices[0].message.content == message
    assert result.usage is not None and result.usage.completion_tokens > 0
    assert result.system_fingerprint == "fp_ozwell_echo"
    chunks = await collect(ozwell, chat("echo", messages=messages))
    assert text(chunks) == message
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens > 0
    assert all(c.model == "echo" for c in chunks if c.usage is None)


async def test_ozwell_upstream_honours_the_bound(ozwell: OpenAICompatibleBackend) -> None:
    request = chat("echo", messages=[{"role": "user", "content": "one two three four"}])
    chunks = await collect(ozwell, request, max_tokens=2)
    assert [c.finish_reason for c in chunks if c.finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


async def test_ozwell_upstream_tools(ozwell: OpenAICompatibleBackend) -> None:
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]  # fmt: skip
    forced = {"type": "function", "function": {"name": "lookup"}}
    chunks = await collect(ozwell, chat("echo", tools=tools, tool_choice=forced))
    deltas = [d for c in chunks for d in c.tool_calls]
    assert deltas[0].id and deltas[0].name == "lookup" and deltas[0].type == "function"
    assert json.loads("".join(d.arguments or "" for d in deltas)) == {"query": "Hi there"}
    result = await ozwell.complete_chat(chat("echo", stream=False, tools=tools, tool_choice=forced), call())
    assert json.loads(result.choices[0].message.tool_calls[0].arguments) == {"query": "Hi there"}


async def test_ozwell_upstream_errors(ozwell: OpenAICompatibleBackend, ozwell_upstream: tuple[str, str]) -> None:
    with pytest.raises(OzwellError) as info:
        await collect(ozwell, chat("echo", n=3))  # over the upstream's cap on choices
    assert (info.value.status, info.value.param, info.value.code) == (400, "n", "invalid_value")
    with pytest.raises(OzwellError) as missing:
        await ozwell.complete_chat(chat("nope", stream=False), call())
    assert (missing.value.status, missing.value.code, missing.value.param) == (404, "model_not_found", "model")
    bad_key = OpenAICompatibleBackend(ozwell_upstream[0], "ozw_not_a_real_key_at_all", timeout=FAST)
    try:
        with pytest.raises(BadGatewayError) as refused:
            await collect(bad_key, chat("echo"))
        assert "refused this server's credentials (HTTP 401)" in refused.value.message
        with pytest.raises(BadGatewayError, match="HTTP 401"):
            await bad_key.list_models()
    finally:
        await bad_key.aclose()
    wrong_path = OpenAICompatibleBackend(ozwell_upstream[0] + "/v2", ozwell_upstream[1], timeout=FAST)
    try:
        with pytest.raises(BadGatewayError, match="no such endpoint"):
            await collect(wrong_path, chat("echo"))
    finally:
        await wrong_path.aclose()


# ------------------------------------------------------------------------------------------------- through the proxy
#
# The official SDKs against OzwellAPI(backend=OpenAICompatibleBackend(...)) in front of a real upstream.

MESSAGE = "Hello, Ozwell! How are you today?"
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]  # fmt: skip
FORCED = {"type": "function", "function": {"name": "lookup"}}


class ClosesBackend:
    """Serves ``api`` and closes ``backend`` on lifespan shutdown, in the server's own event loop."""

    def __init__(self, api: OzwellAPI, backend: OpenAICompatibleBackend) -> None:
        self.api = PrefixedApp(api)
        self.backend = backend

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.api(scope, receive, send)
            return

        async def receive_and_close() -> Any:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                await self.backend.aclose()
            return message

        await self.api(scope, receive_and_close, send)


async def proxy_of(base_url: str, upstream_key: str | None) -> tuple[OzwellAPI, OpenAICompatibleBackend, str]:
    backend = OpenAICompatibleBackend(base_url, upstream_key, timeout=FAST, backoff=0.0)
    api = OzwellAPI(backend=backend, secret="p" * 32)
    key = (await api.keys.create(name="client", owner="bob", plan="pro"))[1]
    return api, backend, key


@pytest.fixture
async def proxied(ozwell_upstream: tuple[str, str]) -> AsyncIterator[tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]]:
    """(the SDK through the proxy, the SDK on the upstream directly)."""
    api, backend, key = await proxy_of(*ozwell_upstream)
    through = async_openai(api, key, max_retries=0)
    direct = openai.AsyncOpenAI(api_key=ozwell_upstream[1], base_url=ozwell_upstream[0], max_retries=0)
    yield through, direct
    await through.close()
    await direct.close()
    await backend.aclose()


async def test_sdk_through_the_proxy_chat_and_stream(
    proxied: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
) -> None:
    through, direct = proxied
    messages: Any = [{"role": "user", "content": MESSAGE}]
    reply = await through.chat.completions.create(model="echo", messages=messages, max_completion_tokens=50)
    mirror = await direct.chat.completions.create(model="echo", messages=messages, max_completion_tokens=50)
    assert reply.choices[0].message.content == mirror.choices[0].message.content == MESSAGE
    assert (reply.model, reply.system_fingerprint) == ("echo", "fp_ozwell_echo")
    assert reply.usage == mirror.usage  # the upstream's own count, details included
    pieces, usage = [], None
    stream = await through.chat.completions.create(
        model="echo", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == MESSAGE
    assert usage is not None and usage.completion_tokens == mirror.usage.completion_tokens  # type: ignore[union-attr]
    models = [m.id async for m in through.models.list()]
    assert models == ["echo", "echo-embedding"]


async def test_sdk_through_the_proxy_tools_with_streamed_argument_deltas(
    proxied: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI],
) -> None:
    through, direct = proxied
    messages: Any = [{"role": "user", "content": MESSAGE}]
    runs = []
    for client in (through, direct):
        deltas = []
        stream = await client.chat.completions.create(
            model="echo",
            messages=messages,
            tools=TOOLS,
            tool_choice=FORCED,
            stream=True,  # type: ignore[arg-type]
        )
        async for chunk in stream:
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                deltas.append((call.index, call.id, call.type, call.function and call.function.name,
                               call.function and call.function.arguments))  # fmt: skip
        runs.append(deltas)
    assert runs[0] == runs[1]  # every delta as the upstream streamed it
    assert len(runs[0]) > 2
    assert json.loads("".join(d[4] or "" for d in runs[0])) == {"query": MESSAGE}
    whole = await through.chat.completions.create(
        model="echo",
        messages=messages,
        tools=TOOLS,
        tool_choice=FORCED,  # type: ignore[arg-type]
    )
    call = whole.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.type == "function" and json.loads(call.function.arguments) == {"query": MESSAGE}  # type: ignore[union-attr]


async def test_sdk_through_the_proxy_embeddings(proxied: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI]) -> None:
    through, direct = proxied
    # The SDK asks for base64: the proxy asks the upstream for floats and encodes them itself.
    got = await through.embeddings.create(model="echo-embedding", input=["first", "second"], dimensions=8)
    want = await direct.embeddings.create(
        model="echo-embedding", input=["first", "second"], dimensions=8, encoding_format="float"
    )
    assert [d.index for d in got.data] == [0, 1]
    for mine, theirs in zip(got.data, want.data, strict=True):
        assert mine.embedding == pytest.approx(theirs.embedding, rel=1e-6)
    assert got.usage.prompt_tokens == want.usage.prompt_tokens


async def test_sdk_through_the_proxy_errors(
    proxied: tuple[openai.AsyncOpenAI, openai.AsyncOpenAI], ozwell_upstream: tuple[str, str]
) -> None:
    through, _ = proxied
    messages: Any = [{"role": "user", "content": MESSAGE}]
    with pytest.raises(openai.BadRequestError) as info:  # the upstream's cap on n (2), under ours (128)
        await through.chat.completions.create(model="echo", messages=messages, n=3)
    assert (info.value.status_code, info.value.param, info.value.code) == (400, "n", "invalid_value")
    with pytest.raises(openai.NotFoundError) as missing:
        await through.chat.completions.create(model="nope", messages=messages)
    assert missing.value.code == "model_not_found"
    api, backend, key = await proxy_of(ozwell_upstream[0], "ozw_not_a_real_key_at_all")
    refused = async_openai(api, key, max_retries=0)
    try:
        with pytest.raises(openai.InternalServerError) as bad:
            await refused.chat.completions.create(model="echo", messages=messages)
    finally:
        await refused.close()
        await backend.aclose()
    assert (bad.value.status_code, bad.value.code) == (502, "upstream_error")
    assert "credentials (HTTP 401)" in bad.value.message
    assert ozwell_upstream[0] not in bad.value.message


async def test_sdk_through_the_proxy_fault_upstream(
    fault_server: tuple[FaultUpstream, str], fault: FaultUpstream
) -> None:
    api, backend, key = await proxy_of(fault_server[1] + "/v1", KEY)
    client = async_openai(api, key, max_retries=0)
    messages: Any = [{"role": "user", "content": "Hi"}]
    try:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(model="error-400", messages=messages, stream=True)
        assert (info.value.param, info.value.code) == ("temperature", "invalid_value")
        assert fault_server[1].removeprefix("http://") not in info.value.message
        stream = await client.chat.completions.create(model="drop", messages=messages, stream=True)
        seen: list[Any] = []

        async def drain() -> None:
            async for chunk in stream:
                seen.append(chunk)

        with pytest.raises(openai.APIError, match="broke off"):  # the SSE error frame, after what came first
            await drain()
        assert seen and seen[0].choices[0].delta.role == "assistant"
        sent = fault.last().body
        assert sent["max_completion_tokens"] == 1024  # the proxy's default reserve is the bound
    finally:
        await client.close()
        await backend.aclose()


async def test_a_client_gone_from_the_proxy_cancels_the_upstream_request(
    fault_server: tuple[FaultUpstream, str], fault: FaultUpstream
) -> None:
    api, backend, key = await proxy_of(fault_server[1] + "/v1", KEY)
    body = {"model": "hang", "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    with uvicorn_server(ClosesBackend(api, backend)) as url:
        async with httpx.AsyncClient(timeout=FAST) as http:
            headers = {"authorization": f"Bearer {key}"}
            async with http.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break  # the first chunk came through; now the client goes away
        gone = await anyio.to_thread.run_sync(fault.last().disconnected.wait, 1.0)
    assert gone, "the upstream did not see the proxy's request end within 1 s of the client leaving"


@pytest.mark.slow
def test_node_sdk_through_the_proxy(ozwell_upstream: tuple[str, str]) -> None:
    from tests.test_node_sdk import EXPECTED_CHECKS, NODE_DIR, _node_with_sdk

    node = _node_with_sdk()
    api, backend, key = anyio.run(proxy_of, *ozwell_upstream)
    with uvicorn_server(ClosesBackend(api, backend)) as url:
        env = {**os.environ, "OZWELL_BASE_URL": url + "/v1", "OZWELL_API_KEY": key, "NO_COLOR": "1"}
        for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID", "OPENAI_LOG"):
            env.pop(name, None)
        done = subprocess.run(
            [node, "sdk_check.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=60, check=False
        )
    assert done.returncode == 0, f"stderr:\n{done.stderr}\nstdout:\n{done.stdout}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    checks = {check["name"]: check["detail"] for check in summary["checks"]}
    assert list(checks) == EXPECTED_CHECKS and all(check["ok"] for check in summary["checks"])
    assert checks["chat.completions.create stream"]["content"] == "streamed through the node sdk"
    assert checks["forced tool call"]["arguments"]["city"] == "Paris"


def test_the_docs_section_runs(tmp_path: Path) -> None:
    page = (Path(__file__).resolve().parent.parent / "docs" / "backends.md").read_text()
    match = re.search(r"^## An OpenAI-compatible upstream .*?\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    assert match, "docs/backends.md has no section on the OpenAI-compatible upstream"
    code = re.findall(r"^```python\n(.*?)^```$", match.group(1), re.S | re.M)
    assert code, "the section opens with a Python example"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    for block in code:
        out = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
        )
        assert out.returncode == 0, out.stderr[-3000:]
