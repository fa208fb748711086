"""collect_chat: a chunk stream folded into one ChatResult, losing nothing (choices, tool calls by index with their
kind, logprobs, refusal, reasoning, unknown delta fields, usage, model, fingerprint), and closing the stream."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import pytest

from ozwell_asgi.backends._aggregate import collect_chat
from ozwell_asgi.backends.echo import EchoBackend
from ozwell_asgi.errors import BadGatewayError
from ozwell_asgi.types import Call, ChatChunk, Principal, Quota, ToolCallDelta, Usage
from ozwell_asgi.wire.chat import ChatCompletionRequest

pytestmark = pytest.mark.anyio


async def stream_of(chunks: Iterable[ChatChunk]) -> AsyncIterator[ChatChunk]:
    for chunk in chunks:
        yield chunk


def lp(*tokens: str) -> list[dict[str, Any]]:
    return [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens]


async def test_one_choice_of_text() -> None:
    usage = Usage(10, 3, prompt_tokens_details={"cached_tokens": 4}, completion_tokens_details={"reasoning_tokens": 1})
    result = await collect_chat(
        stream_of(
            [
                ChatChunk(role="assistant", content="", model="llama3:8b", system_fingerprint="fp_1"),
                ChatChunk(content="Hello", model="llama3:8b-other", system_fingerprint="fp_2"),
                ChatChunk(content=", world"),
                ChatChunk(finish_reason="stop"),
                ChatChunk(usage=usage),
            ]
        )
    )
    assert len(result.choices) == 1
    choice = result.choices[0]
    assert (choice.index, choice.message.content, choice.finish_reason) == (0, "Hello, world", "stop")
    assert (choice.message.tool_calls, choice.message.refusal, choice.logprobs) == ((), None, None)
    assert result.usage == usage  # details passed through
    assert (result.model, result.system_fingerprint) == ("llama3:8b", "fp_1")


async def test_interleaved_choices_come_back_in_index_order() -> None:
    result = await collect_chat(
        stream_of(
            [
                ChatChunk(index=2, role="assistant", content="c"),
                ChatChunk(index=0, role="assistant", content="a"),
                ChatChunk(index=1, role="assistant", content="b"),
                ChatChunk(index=0, content="a"),
                ChatChunk(index=2, content="cc", finish_reason="length"),
                ChatChunk(index=1, finish_reason="stop"),
                ChatChunk(index=0, finish_reason="content_filter"),
                ChatChunk(usage=Usage(5, 6)),
            ]
        )
    )
    assert [(c.index, c.message.content, c.finish_reason) for c in result.choices] == [
        (0, "aa", "content_filter"),
        (1, "b", "stop"),
        (2, "ccc", "length"),
    ]
    assert result.usage == Usage(5, 6)


async def test_tool_calls_are_assembled_by_index_with_their_kind() -> None:
    result = await collect_chat(
        stream_of(
            [
                ChatChunk(role="assistant", tool_calls=(ToolCallDelta(0, "call_a", "get_weather", "", "function"),)),
                ChatChunk(tool_calls=(ToolCallDelta(0, arguments='{"ci'),)),
                ChatChunk(tool_calls=(ToolCallDelta(1, "call_b", "run_sql", "SEL", "custom"),)),
                ChatChunk(tool_calls=(ToolCallDelta(0, arguments='ty": "Oslo"}'), ToolCallDelta(1, arguments="ECT"))),
                ChatChunk(tool_calls=(ToolCallDelta(1, arguments=" 1"),)),
                ChatChunk(index=1, role="assistant", tool_calls=(ToolCallDelta(0, "call_c", "f", "{}"),)),
                ChatChunk(finish_reason="tool_calls"),
                ChatChunk(index=1, finish_reason="tool_calls"),
            ]
        )
    )
    first, second = result.choices
    assert first.message.content is None
    assert [(c.id, c.name, c.arguments, c.type) for c in first.message.tool_calls] == [
        ("call_a", "get_weather", '{"city": "Oslo"}', "function"),
        ("call_b", "run_sql", "SELECT 1", "custom"),
    ]
    assert json.loads(first.message.tool_calls[0].arguments) == {"city": "Oslo"}
    assert first.finish_reason == "tool_calls"
    assert [(c.id, c.name, c.arguments, c.type) for c in second.message.tool_calls] == [
        ("call_c", "f", "{}", "function")  # no type sent: a function call
    ]


async def test_tool_call_names_sent_again_are_not_doubled() -> None:
    result = await collect_chat(
        stream_of(
            [
                ChatChunk(role="assistant", content="", tool_calls=(ToolCallDelta(0, "id1", "lookup", '{"q"'),)),
                ChatChunk(tool_calls=(ToolCallDelta(0, "id1", "lookup", ': "x"}'),)),
            ]
        )
    )
    (call,) = result.choices[0].message.tool_calls
    assert (call.id, call.name, call.arguments) == ("id1", "lookup", '{"q": "x"}')
    assert result.choices[0].message.content is None  # an empty content beside tool calls is null, as OpenAI sends
    assert result.choices[0].finish_reason == "tool_calls"  # a stream cut short of its finish_reason


async def test_logprobs_refusal_reasoning_and_unknown_fields() -> None:
    result = await collect_chat(
        stream_of(
            [
                ChatChunk(role="assistant", reasoning_content="Think", logprobs={"content": lp("I"), "refusal": None}),
                ChatChunk(reasoning_content="ing.", extra={"audio": {"id": "aud_1", "transcript": "I "}}),
                ChatChunk(content="I", logprobs={"content": lp("I")}, extra={"citations": ["a"], "score": 1}),
                ChatChunk(refusal="I can", logprobs={"content": [], "refusal": lp("I", " can")}),
                ChatChunk(refusal="not.", extra={"audio": {"transcript": "cannot"}, "citations": ["b"], "score": 2}),
                ChatChunk(finish_reason="stop", logprobs={"refusal": lp("not")}),
            ]
        )
    )
    choice = result.choices[0]
    assert choice.message.content == "I"
    assert choice.message.refusal == "I cannot."
    assert choice.message.reasoning_content == "Thinking."
    assert choice.logprobs is not None
    assert [t["token"] for t in choice.logprobs["content"]] == ["I", "I"]
    assert [t["token"] for t in choice.logprobs["refusal"]] == ["I", " can", "not"]
    assert choice.message.extra == {
        "audio": {"id": "aud_1", "transcript": "I cannot"},
        "citations": ["a", "b"],
        "score": 2,
    }


async def test_a_usage_only_stream_has_no_choices() -> None:
    result = await collect_chat(stream_of([ChatChunk(usage=Usage(3, 0))]))
    assert result.choices == ()
    assert result.usage == Usage(3, 0)
    assert (await collect_chat(stream_of([]))).choices == ()


async def test_a_usage_carried_on_a_choice_chunk_counts() -> None:
    result = await collect_chat(stream_of([ChatChunk(role="assistant", content="x", usage=Usage(1, 1))]))
    assert result.usage == Usage(1, 1)
    assert result.choices[0].message.content == "x"


async def test_the_stream_is_closed_on_error_and_on_cancel() -> None:
    closed: list[str] = []

    async def failing() -> AsyncIterator[ChatChunk]:
        try:
            yield ChatChunk(role="assistant", content="a")
            raise BadGatewayError("upstream lost")
        finally:
            closed.append("failing")

    with pytest.raises(BadGatewayError):
        await collect_chat(failing())

    started = anyio.Event()

    async def endless() -> AsyncIterator[ChatChunk]:
        try:
            yield ChatChunk(role="assistant", content="a")
            started.set()
            await anyio.sleep_forever()
            yield ChatChunk(content="never")  # pragma: no cover
        finally:
            closed.append("endless")

    async with anyio.create_task_group() as tg:
        tg.start_soon(collect_chat, endless())
        await started.wait()
        tg.cancel_scope.cancel()
    assert closed == ["failing", "endless"]


def echo_stream(backend: EchoBackend, request: ChatCompletionRequest) -> AsyncIterator[ChatChunk]:
    """Echo's stream, before and after it moves to the stream_chat seam."""
    stream_chat = getattr(backend, "stream_chat", None)
    if stream_chat is not None:
        principal = Principal(key_id="k", owner="o", plan="free", quota=Quota(None, None))
        return stream_chat(request, Call(request_id="r", principal=principal, endpoint="chat.completions"))  # type: ignore[no-any-return]
    return backend.chat_stream(request)


async def test_echo_streams_fold_into_the_answer() -> None:
    echo = EchoBackend()
    messages = [{"role": "user", "content": "The quick brown fox"}]
    request = ChatCompletionRequest.model_validate({"model": "echo", "messages": messages, "n": 3, "logprobs": True})
    result = await collect_chat(echo_stream(echo, request))
    assert [c.message.content for c in result.choices] == ["The quick brown fox"] * 3
    assert [c.finish_reason for c in result.choices] == ["stop"] * 3
    for choice in result.choices:
        assert choice.logprobs is not None
        assert "".join(t["token"] for t in choice.logprobs["content"]) == "The quick brown fox"
    assert result.usage is not None and result.usage.completion_tokens == 3 * echo.tokenizer.count(
        "The quick brown fox"
    )

    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    request = ChatCompletionRequest.model_validate(
        {"model": "echo", "messages": messages, "tools": tools, "tool_choice": "required", "n": 2}
    )
    result = await collect_chat(echo_stream(echo, request))
    for choice in result.choices:
        (call,) = choice.message.tool_calls
        assert (call.name, json.loads(call.arguments), call.type) == ("f", {}, "function")
        assert call.id.startswith("call_")
        assert choice.message.content is None
        assert choice.finish_reason == "tool_calls"
