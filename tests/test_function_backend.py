"""FunctionBackend: a function (async or sync, returning text, pieces or a Reply) as a chat backend that applies
n, stop and the token bound for it, counts usage, and keeps errors before the first chunk catchable."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import anyio
import pytest
from pydantic import BaseModel

from ozwell_asgi.backends._aggregate import collect_chat
from ozwell_asgi.backends.function import FunctionBackend, Reply, function_backend
from ozwell_asgi.errors import BadGatewayError
from ozwell_asgi.protocols import ChatBackend, CompletesChat, EmbeddingBackend
from ozwell_asgi.tokens import count_chat_prompt, default_tokenizer
from ozwell_asgi.types import Call, ChatChunk, ModelInfo, Principal, Quota, ToolCall
from ozwell_asgi.wire.chat import ChatCompletionRequest, message_text

pytestmark = pytest.mark.anyio

MAIN_THREAD = threading.get_ident()


def make_call(max_tokens: int | None = None) -> Call:
    principal = Principal(key_id="key_1", owner="alice", plan="free", quota=Quota(None, None))
    return Call(request_id="req_1", principal=principal, endpoint="chat.completions", max_tokens=max_tokens)


def make_request(text: str = "hello", **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "fn", "messages": [{"role": "user", "content": text}], **fields}
    )


class CharTokenizer:
    """One token per character: makes bounds easy to state."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, tokens: Sequence[int]) -> str:
        return "".join(map(chr, tokens))

    def token_bytes(self, token: int) -> bytes:
        return chr(token).encode()

    def count(self, text: str) -> int:
        return len(text)

    async def warm(self) -> None:
        return None


async def chunks_of(backend: FunctionBackend, request: ChatCompletionRequest, call: Call | None = None) -> list[Any]:
    return [chunk async for chunk in backend.stream_chat(request, call or make_call())]


def text_of(chunks: Sequence[ChatChunk], index: int = 0) -> str:
    return "".join(c.content or "" for c in chunks if c.index == index and c.usage is None)


def finish_of(chunks: Sequence[ChatChunk], index: int = 0) -> str | None:
    reasons = [c.finish_reason for c in chunks if c.index == index and c.finish_reason is not None]
    assert len(reasons) == 1, reasons
    return reasons[0]


async def test_an_async_function_answers_with_the_stream_shape_and_usage() -> None:
    async def reply(request: ChatCompletionRequest) -> str:
        return message_text(request.messages[-1]).upper()

    backend = FunctionBackend(reply, models=("fn",))
    assert isinstance(backend, ChatBackend)
    assert not isinstance(backend, EmbeddingBackend)  # chat only: no stubbed embed
    assert not isinstance(backend, CompletesChat)  # the app folds the stream
    request = make_request("Hello, world")
    chunks = await chunks_of(backend, request)
    assert chunks[0].role == "assistant"
    assert chunks[0].content == "HELLO, WORLD"
    assert [c.finish_reason for c in chunks[1:-1]] == ["stop"]
    usage = chunks[-1].usage
    tokenizer = default_tokenizer()
    assert usage is not None
    assert (chunks[-1].content, chunks[-1].finish_reason, chunks[-1].role) == (None, None, None)
    assert usage.prompt_tokens == count_chat_prompt(tokenizer, request)
    assert usage.completion_tokens == tokenizer.count("HELLO, WORLD")
    assert [m.id for m in await backend.list_models()] == ["fn"]


async def test_the_fold_of_its_stream_is_the_whole_answer() -> None:
    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        for word in ("one ", "two ", "three"):
            yield word

    backend = FunctionBackend(reply, models=("fn",), tokenizer=CharTokenizer())
    result = await collect_chat(backend.stream_chat(make_request(n=2), make_call()))
    assert [c.message.content for c in result.choices] == ["one two three", "one two three"]
    assert [c.finish_reason for c in result.choices] == ["stop", "stop"]
    assert result.usage is not None and result.usage.completion_tokens == 26


async def test_a_sync_function_runs_in_a_worker_thread_once_per_choice() -> None:
    threads: list[int] = []

    def reply(request: ChatCompletionRequest) -> str:
        threads.append(threading.get_ident())
        return f"answer {len(threads)}"

    chunks = await chunks_of(FunctionBackend(reply, models=("fn",)), make_request(n=3))
    assert len(threads) == 3
    assert MAIN_THREAD not in threads
    assert [text_of(chunks, i) for i in range(3)] == ["answer 1", "answer 2", "answer 3"]
    assert [finish_of(chunks, i) for i in range(3)] == ["stop"] * 3
    assert [c.role for c in chunks if c.role] == ["assistant"] * 3


async def test_a_sync_generator_is_advanced_in_worker_threads_and_closed() -> None:
    threads: list[int] = []
    closed = threading.Event()

    def reply(request: ChatCompletionRequest) -> Iterator[str]:
        try:
            for piece in ("alpha ", "beta ", "STOP", "never"):
                threads.append(threading.get_ident())
                yield piece
        finally:
            closed.set()

    chunks = await chunks_of(FunctionBackend(reply, models=("fn",)), make_request(stop="STOP"))
    assert text_of(chunks) == "alpha beta "
    assert finish_of(chunks) == "stop"
    assert len(threads) == 3  # not asked for the piece after the stop sequence
    assert MAIN_THREAD not in threads
    assert closed.is_set()


async def test_pieces_stream_as_they_come() -> None:
    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        for piece in ("Hel", "", "lo", " there"):
            yield piece

    chunks = await chunks_of(FunctionBackend(reply, models=("fn",)), make_request())
    assert [c.content for c in chunks[:-2]] == ["Hel", "lo", " there"]  # empty pieces send nothing
    assert chunks[0].role == "assistant" and all(c.role is None for c in chunks[1:])


@pytest.mark.parametrize(
    ("pieces", "stop", "expected", "finish"),
    [
        (["Hello world. EN", "D and more"], "END", "Hello world. ", "stop"),  # split across pieces
        (["a", "E", "N"], "END", "aEN", "stop"),  # a held-back prefix that never completes is sent at the end
        (["xxEN", "Dyy"], ["zzz", "END"], "xx", "stop"),
        (["one two", " three"], ["three", "two"], "one ", "stop"),  # the earliest stop sequence wins
        (["ab", "cab", "cd"], "abcd", "abc", "stop"),  # overlapping prefixes
        (["STOP at once"], "STOP", "", "stop"),
    ],
)
async def test_stop_sequences_cut_across_pieces(
    pieces: list[str], stop: str | list[str], expected: str, finish: str
) -> None:
    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        for piece in pieces:
            yield piece

    backend = FunctionBackend(reply, models=("fn",), tokenizer=CharTokenizer())
    chunks = await chunks_of(backend, make_request(stop=stop))
    assert text_of(chunks) == expected
    assert finish_of(chunks) == finish
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == len(expected)
    assert chunks[0].role == "assistant"


async def test_the_call_bound_cuts_with_length_and_stops_asking() -> None:
    asked: list[str] = []

    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        for piece in ("abc", "def", "ghi", "jkl"):
            asked.append(piece)
            yield piece

    backend = FunctionBackend(reply, models=("fn",), tokenizer=CharTokenizer())
    chunks = await chunks_of(backend, make_request(max_completion_tokens=100), make_call(max_tokens=5))
    assert text_of(chunks) == "abcde"  # the call's bound wins over the request's
    assert finish_of(chunks) == "length"
    assert asked == ["abc", "def"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5


async def test_the_request_bound_applies_without_a_call_bound() -> None:
    backend = FunctionBackend(lambda request: "abcdefgh", models=("fn",), tokenizer=CharTokenizer())
    chunks = await chunks_of(backend, make_request(max_tokens=3))
    assert (text_of(chunks), finish_of(chunks)) == ("abc", "length")
    chunks = await chunks_of(backend, make_request(max_completion_tokens=8))  # exactly the bound: a natural stop
    assert (text_of(chunks), finish_of(chunks)) == ("abcdefgh", "stop")


async def test_the_bound_counts_real_tokens_and_never_splits_a_character() -> None:
    text = "Crème brûlée 🍮🍮🍮 is a dessert " * 4
    tokenizer = default_tokenizer()
    for bound in range(1, 16):
        backend = FunctionBackend(lambda request: text, models=("fn",))
        chunks = await chunks_of(backend, make_request(), make_call(max_tokens=bound))
        answer = text_of(chunks)
        assert text.startswith(answer), (bound, answer)
        assert "\ufffd" not in answer
        assert tokenizer.count(answer) <= bound
        assert finish_of(chunks) == "length"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens <= bound


async def test_n_stop_and_bound_apply_to_every_choice() -> None:
    calls = 0

    async def reply(request: ChatCompletionRequest) -> str:
        nonlocal calls
        calls += 1
        return "short." if calls == 1 else "a much longer answer. with more"

    backend = FunctionBackend(reply, models=("fn",), tokenizer=CharTokenizer())
    chunks = await chunks_of(backend, make_request(n=2, stop="."), make_call(max_tokens=10))
    assert [text_of(chunks, 0), text_of(chunks, 1)] == ["short", "a much lon"]
    assert [finish_of(chunks, 0), finish_of(chunks, 1)] == ["stop", "length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 15


async def test_tool_calls_end_the_choice_with_tool_calls() -> None:
    async def reply(request: ChatCompletionRequest) -> Reply:
        return Reply(
            content="Let me look.",
            tool_calls=[
                ToolCall(id="", name="get_weather", arguments='{"city": "Paris"}'),
                ToolCall(id="call_mine", name="grep", arguments="pattern", type="custom"),
            ],
        )

    backend = FunctionBackend(reply, models=("fn",))
    chunks = await chunks_of(backend, make_request())
    assert finish_of(chunks) == "tool_calls"
    result = await collect_chat(backend.stream_chat(make_request(), make_call()))
    message = result.choices[0].message
    assert message.content == "Let me look."
    first, second = message.tool_calls
    assert first.id.startswith("call_") and len(first.id) > len("call_")
    assert (first.name, first.arguments, first.type) == ("get_weather", '{"city": "Paris"}', "function")
    assert (second.id, second.name, second.arguments, second.type) == ("call_mine", "grep", "pattern", "custom")
    tokenizer = default_tokenizer()
    expected = tokenizer.count("Let me look.") + sum(
        tokenizer.count(s) for s in ("get_weather", '{"city": "Paris"}', "grep", "pattern")
    )
    assert result.usage is not None and result.usage.completion_tokens == expected
    fresh = await collect_chat(backend.stream_chat(make_request(), make_call()))
    assert fresh.choices[0].message.tool_calls[0].id != first.id  # a fresh id per answer


async def test_tool_calls_alone_start_the_choice() -> None:
    backend = FunctionBackend(
        lambda request: Reply(tool_calls=[ToolCall(id="c1", name="f", arguments="{}")]), models=("fn",)
    )
    chunks = await chunks_of(backend, make_request())
    assert chunks[0].role == "assistant" and chunks[0].content is None
    assert [d.name for d in chunks[0].tool_calls] == ["f"]
    result = await collect_chat(backend.stream_chat(make_request(), make_call()))
    assert result.choices[0].message.content is None
    assert result.choices[0].finish_reason == "tool_calls"


async def test_tool_calls_within_the_bound() -> None:
    calls = [ToolCall(id="a", name="f", arguments="0123456789"), ToolCall(id="b", name="g", arguments="xyz")]
    backend = FunctionBackend(lambda request: Reply(tool_calls=calls), models=("fn",), tokenizer=CharTokenizer())
    result = await collect_chat(backend.stream_chat(make_request(), make_call(max_tokens=6)))
    choice = result.choices[0]
    assert [(c.name, c.arguments) for c in choice.message.tool_calls] == [("f", "01234")]
    assert choice.finish_reason == "length"
    assert result.usage is not None and result.usage.completion_tokens == 6
    # text that uses the whole bound leaves no room for calls
    reply = Reply(content="abcdefgh", tool_calls=calls)
    backend = FunctionBackend(lambda request: reply, models=("fn",), tokenizer=CharTokenizer())
    result = await collect_chat(backend.stream_chat(make_request(), make_call(max_tokens=4)))
    assert (result.choices[0].message.content, result.choices[0].message.tool_calls) == ("abcd", ())
    assert result.choices[0].finish_reason == "length"


class Weather(BaseModel):
    city: str
    celsius: float


@dataclass
class Point:
    x: int
    y: int


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"answer": 42, "list": [1, "two"]}, {"answer": 42, "list": [1, "two"]}),
        (Weather(city="Oslo", celsius=-3.5), {"city": "Oslo", "celsius": -3.5}),
        (Point(1, 2), {"x": 1, "y": 2}),
        (None, None),
    ],
)
async def test_structured_output_is_sent_as_json_text(value: object, expected: object) -> None:
    backend = FunctionBackend(lambda request: Reply(json=value), models=("fn",))
    result = await collect_chat(backend.stream_chat(make_request(), make_call()))
    content = result.choices[0].message.content
    assert content is not None and json.loads(content) == expected
    assert result.choices[0].finish_reason == "stop"


def test_reply_checks_what_it_is_given() -> None:
    with pytest.raises(ValueError, match="content or json"):
        Reply(content="x", json={"a": 1})
    with pytest.raises(TypeError, match="ToolCall"):
        Reply(tool_calls=[{"name": "f"}])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="content must be a str"):
        Reply(content=3)  # type: ignore[arg-type]


async def test_an_empty_answer_still_has_a_first_chunk() -> None:
    chunks = await chunks_of(FunctionBackend(lambda request: "", models=("fn",)), make_request())
    shapes = [(c.role, c.content, c.finish_reason) for c in chunks[:-1]]
    assert shapes == [("assistant", "", None), (None, None, "stop")]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0


async def test_an_error_before_the_first_piece_comes_before_any_chunk() -> None:
    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        raise BadGatewayError("the model server is down")
        yield ""  # pragma: no cover

    def sync_reply(request: ChatCompletionRequest) -> str:
        raise BadGatewayError("the model server is down")

    for function in (reply, sync_reply):
        stream = FunctionBackend(function, models=("fn",)).stream_chat(make_request(), make_call())
        with pytest.raises(BadGatewayError):
            await anext(stream)


async def test_an_error_after_a_piece_reaches_the_stream() -> None:
    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        yield "partial"
        raise BadGatewayError("lost the model")

    stream = FunctionBackend(reply, models=("fn",)).stream_chat(make_request(), make_call())
    assert (await anext(stream)).content == "partial"
    with pytest.raises(BadGatewayError):
        await anext(stream)


@pytest.mark.parametrize(
    ("value", "message"),
    [(42, "returned int"), ([1, 2], "streamed int"), ({"a": 1}, r"Reply\(json=...\)")],
)
async def test_a_wrong_answer_type_is_a_clear_type_error(value: object, message: str) -> None:
    backend = FunctionBackend(lambda request: value, models=("fn",))  # type: ignore[arg-type,return-value]
    with pytest.raises(TypeError, match=message):
        await chunks_of(backend, make_request())


async def test_closing_the_stream_closes_the_function_generator() -> None:
    closed = anyio.Event()
    sync_closed = threading.Event()

    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        try:
            while True:
                yield "more "
        finally:
            closed.set()

    def sync_reply(request: ChatCompletionRequest) -> Iterator[str]:
        try:
            while True:
                yield "more "
        finally:
            sync_closed.set()

    for function in (reply, sync_reply):
        stream = FunctionBackend(function, models=("fn",)).stream_chat(make_request(), make_call())
        for _ in range(3):
            assert (await anext(stream)).content == "more "
        await stream.aclose()  # type: ignore[attr-defined]
    assert closed.is_set()
    assert sync_closed.is_set()


async def test_an_async_function_may_return_pieces() -> None:
    async def pieces() -> AsyncIterator[str]:
        yield "from "
        yield "an iterator"

    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        return pieces()

    async def many(request: ChatCompletionRequest) -> list[str]:
        return ["a ", "list"]

    class Callable:
        async def __call__(self, request: ChatCompletionRequest) -> str:
            return "an object"

    assert text_of(await chunks_of(FunctionBackend(reply, models=("fn",)), make_request())) == "from an iterator"
    assert text_of(await chunks_of(FunctionBackend(many, models=("fn",)), make_request())) == "a list"
    assert text_of(await chunks_of(FunctionBackend(Callable(), models=("fn",)), make_request())) == "an object"


async def test_the_decorator_and_the_one_liner() -> None:
    @function_backend(models=["shout", ModelInfo(id="shout-2", owned_by="acme")])
    def shout(request: ChatCompletionRequest) -> str:
        return message_text(request.messages[-1]).upper()

    assert isinstance(shout, FunctionBackend)
    assert [(m.id, m.owned_by, m.kind) for m in await shout.list_models()] == [
        ("shout", "ozwell", "chat"),
        ("shout-2", "acme", "chat"),
    ]
    assert text_of(await chunks_of(shout, make_request("hi"))) == "HI"
    backend = function_backend(lambda request: "ok", models="one")
    assert [m.id for m in await backend.list_models()] == ["one"]


def test_bad_construction_is_refused() -> None:
    with pytest.raises(TypeError, match="callable"):
        FunctionBackend("not a function", models=("m",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one model"):
        FunctionBackend(lambda request: "", models=())
    with pytest.raises(ValueError, match="non-empty"):
        FunctionBackend(lambda request: "", models=("",))
    with pytest.raises(ValueError, match="chat models only"):
        FunctionBackend(lambda request: "", models=(ModelInfo(id="e", kind="embedding"),))
