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
    assert set(choice.logprobs) == {"content", "refusal"}
    assert [t["token"] for t in choice.logprobs["content"]] == ["I", "I"]
    assert [t["token"] for t in choice.logprobs["refusal"]] == ["I", " can", "not"]
    assert choice.message.extra == {
        "audio": {"id": "aud_1", "transcript": "I cannot"},
        "citations": ["a", "b"],
        "score": 2,
    }


async def test_a_stream_without_choices_answers_one_empty_choice() -> None:
    result = await collect_chat(stream_of([ChatChunk(usage=Usage(3, 0))]))
    assert [(c.index, c.message.content, c.finish_reason) for c in result.choices] == [(0, "", "stop")]
    assert result.usage == Usage(3, 0)
    result = await collect_chat(stream_of([]))
    assert [(c.index, c.message.content, c.finish_reason) for c in result.choices] == [(0, "", "stop")]
    assert result.usage is None


async def test_content_is_null_only_beside_tool_calls_or_a_refusal() -> None:
    result = await collect_chat(stream_of([ChatChunk(role="assistant"), ChatChunk(finish_reason="stop")]))
    assert result.choices[0].message.content == ""
    result = await collect_chat(stream_of([ChatChunk(role="assistant", refusal="No.")]))
    assert (result.choices[0].message.content, result.choices[0].message.refusal) == (None, "No.")


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


CALL = Call(
    request_id="r",
    principal=Principal(key_id="k", owner="o", plan="free", quota=Quota(None, None)),
    endpoint="chat.completions",
)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"n": 3, "logprobs": True, "top_logprobs": 2},
        {"stop": "brown", "n": 2},
        {"max_completion_tokens": 2},
        {"tools": TOOLS, "tool_choice": "required", "n": 2},
        {"response_format": {"type": "json_object"}},
    ],
    ids=["plain", "n-logprobs", "stop", "length", "tool-calls", "json"],
)
async def test_echo_streams_fold_into_echos_own_answer(fields: dict[str, Any]) -> None:
    echo = EchoBackend()
    messages = [{"role": "user", "content": "The quick brown fox"}]
    request = ChatCompletionRequest.model_validate({"model": "echo", "messages": messages, **fields})
    folded = await collect_chat(echo.stream_chat(request, CALL))
    whole = await echo.complete_chat(request, CALL)
    assert folded.choices == whole.choices
    assert folded.usage == whole.usage
    assert len(folded.choices) == request.choice_count
