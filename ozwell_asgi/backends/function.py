"""A function becomes a chat backend: ``backend = function_backend(reply, models=("my-model",))``.

``reply(request)`` gets the validated :class:`~ozwell_asgi.wire.chat.ChatCompletionRequest` and returns the answer:
a ``str``, an (async) iterable of ``str`` pieces streamed as they come, or a :class:`Reply` (tool calls, structured
output). It may be ``async def``, an async generator, a plain function or a plain generator: a sync function runs
in a worker thread (``anyio.to_thread``), once per call, and a sync generator is advanced in worker threads too, so
nothing of it blocks the event loop.

The backend applies, for the function, what a hand-written backend must otherwise remember:

- ``n``: the function is called once per choice, choice after choice;
- ``stop``: the answer is cut before the first stop sequence, even one split across streamed pieces (text that may
  begin a stop sequence is held back until it is known not to; at most the longest stop sequence's length);
- the token bound: ``call.max_tokens``, else the request's ``max_completion_tokens``/``max_tokens``; the answer is
  cut at that many tokens (tool call arguments included) with ``finish_reason: "length"``, and the function is not
  asked for more;
- usage: the prompt as :func:`~ozwell_asgi.tokens.count_chat_prompt` counts it, the completion as the tokens of the
  pieces sent (each piece counted alone, the way the app counts a stream).

Counting uses the process-wide ``o200k_base`` tokenizer unless one is passed in.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeAlias, overload

import anyio
import anyio.to_thread
from pydantic_core import to_json

from ..tokens import Tokenizer, count_chat_prompt, default_tokenizer
from ..types import Call, ChatChunk, ModelInfo, ToolCall, ToolCallDelta, Usage
from ..wire.chat import ChatCompletionRequest

__all__ = ["FunctionBackend", "Reply", "ReplyFunction", "ReplyValue", "function_backend"]


class _Unset:
    def __repr__(self) -> str:
        return "<unset>"


_UNSET: Any = _Unset()
_END: Any = object()


@dataclass(frozen=True, slots=True)
class Reply:
    """A whole answer beyond plain text.

    ``content``: the text. ``json``: structured output, any value pydantic can serialise (dicts, lists, dataclasses,
    pydantic models), sent as its JSON text in ``content``; give one of the two, or neither. ``tool_calls``: calls
    the client should run, after the text; the choice then ends with ``finish_reason: "tool_calls"``. A
    :class:`~ozwell_asgi.types.ToolCall` with an empty ``id`` is given a fresh ``call_…`` id.
    """

    content: str | None = None
    tool_calls: Sequence[ToolCall] = ()
    json: Any = field(default=_UNSET)

    def __post_init__(self) -> None:
        if self.content is not None and self.json is not _UNSET:
            raise ValueError("Reply takes content or json, not both")
        if self.content is not None and not isinstance(self.content, str):
            raise TypeError(f"Reply.content must be a str, not {type(self.content).__name__}")
        calls = tuple(self.tool_calls)
        for call in calls:
            if not isinstance(call, ToolCall):
                raise TypeError(f"Reply.tool_calls holds ozwell_asgi.ToolCall objects, not {type(call).__name__}")
        object.__setattr__(self, "tool_calls", calls)

    @property
    def text(self) -> str | None:
        """The text sent as ``content``: ``content``, or ``json`` as JSON text."""
        if self.json is not _UNSET:
            return to_json(self.json).decode()
        return self.content


ReplyValue: TypeAlias = "str | Reply | AsyncIterable[str] | Iterable[str]"
ReplyFunction: TypeAlias = Callable[[ChatCompletionRequest], "ReplyValue | Awaitable[ReplyValue]"]
FinishReason: TypeAlias = Literal["stop", "length", "tool_calls"]


def _is_async(function: object) -> bool:
    if inspect.iscoroutinefunction(function) or inspect.isasyncgenfunction(function):
        return True
    call = getattr(function, "__call__", None)  # noqa: B004 - a callable object's own method
    return inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)


def _first_stop(text: str, stops: Sequence[str]) -> int:
    """Where the earliest stop sequence begins in ``text``, or -1."""
    cut = -1
    for stop in stops:
        at = text.find(stop)
        if at >= 0 and (cut < 0 or at < cut):
            cut = at
    return cut


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that begins some stop sequence (and so may become one)."""
    best = 0
    if not text:
        return 0
    last = text[-1]
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), best, -1):
            if stop[k - 1] == last and text.endswith(stop[:k]):
                best = k
                break
    return best


def _fresh_call_id() -> str:
    return f"call_{random.getrandbits(96):024x}"  # unique, not secret


class _Cutter:
    """Applies the stop sequences and the token bound to one choice, piece by piece. ``finish`` is set once the
    choice must end early (``"stop"``: a stop sequence; ``"length"``: the bound)."""

    __slots__ = ("bound", "finish", "held", "stops", "tokenizer", "used")

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], bound: int | None) -> None:
        self.tokenizer = tokenizer
        self.stops = stops
        self.bound = bound
        self.held = ""
        self.used = 0
        self.finish: FinishReason | None = None

    def feed(self, piece: str) -> str:
        """The text to send now for ``piece``."""
        text = self.held + piece if self.held else piece
        if self.stops:
            cut = _first_stop(text, self.stops)
            if cut >= 0:
                self.held = ""
                out = self._within_bound(text[:cut])
                if self.finish is None:
                    self.finish = "stop"
                return out
            keep = _partial_stop(text, self.stops)
            self.held = text[len(text) - keep :] if keep else ""
            if keep:
                text = text[: len(text) - keep]
        return self._within_bound(text)

    def flush(self) -> str:
        """What was held back, once the pieces have ended."""
        text, self.held = self.held, ""
        return self._within_bound(text)

    def _prefix(self, text: str, tokens: list[int], room: int) -> tuple[str, int]:
        """The longest start of ``text`` made of at most ``room`` of its tokens, and how many that is."""
        while room > 0:
            out = self.tokenizer.decode(tokens[:room])
            if text.startswith(out):  # a cut inside a multi-byte character decodes to something else: back off
                return out, room
            room -= 1
        return "", 0

    def _within_bound(self, text: str) -> str:
        if not text:
            return ""
        tokens = self.tokenizer.encode(text)
        bound = self.bound
        if bound is None or self.used + len(tokens) <= bound:
            self.used += len(tokens)
            return text
        out, taken = self._prefix(text, tokens, bound - self.used)
        self.used += taken
        self.finish = "length"
        return out

    def tool_calls(self, calls: Sequence[ToolCall]) -> tuple[ToolCall, ...]:
        """``calls`` with ids, within the bound: the call that does not fit is cut (``finish`` becomes
        ``"length"``) and the ones after it are dropped."""
        out: list[ToolCall] = []
        for call in calls:
            if not call.id:
                call = replace(call, id=_fresh_call_id())
            name = self.tokenizer.count(call.name) if call.name else 0
            arguments = self.tokenizer.encode(call.arguments) if call.arguments else []
            bound = self.bound
            if bound is None or self.used + name + len(arguments) <= bound:
                self.used += name + len(arguments)
                out.append(call)
                continue
            self.finish = "length"
            room = bound - self.used - name
            if room >= 0:
                text, taken = self._prefix(call.arguments, arguments, room)
                self.used += name + taken
                out.append(replace(call, arguments=text))
            break
        return tuple(out)


async def _sync_pieces(iterator: Iterator[Any]) -> AsyncIterator[Any]:
    """A sync iterator advanced in worker threads; closed (``close()``, in a thread) when this is closed first."""
    ended = False
    try:
        while True:
            piece = await anyio.to_thread.run_sync(next, iterator, _END)
            if piece is _END:
                ended = True
                return
            yield piece
    finally:
        close = None if ended else getattr(iterator, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)


async def _list_pieces(items: Sequence[Any]) -> AsyncIterator[Any]:
    for item in items:
        yield item


async def _aclose(iterator: object) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


class FunctionBackend:
    """A chat backend around one function (see the module docstring for what it applies for the function)."""

    def __init__(
        self,
        reply: ReplyFunction,
        *,
        models: Sequence[str | ModelInfo],
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if not callable(reply):
            raise TypeError(f"FunctionBackend needs a callable reply function, not {type(reply).__name__}")
        if isinstance(models, str):
            models = (models,)
        infos = tuple(m if isinstance(m, ModelInfo) else ModelInfo(id=m) for m in models)
        if not infos:
            raise ValueError("FunctionBackend needs at least one model id")
        for info in infos:
            if not isinstance(info.id, str) or not info.id:
                raise ValueError(f"FunctionBackend model ids are non-empty strings, not {info.id!r}")
            if info.kind != "chat":
                raise ValueError(f"FunctionBackend serves chat models only; {info.id!r} is an {info.kind} model")
        self.reply = reply
        self.tokenizer = tokenizer or default_tokenizer()
        self._models = infos
        self._async = _is_async(reply)

    async def list_models(self) -> Sequence[ModelInfo]:
        return self._models

    async def stream_chat(self, request: ChatCompletionRequest, call: Call) -> AsyncIterator[ChatChunk]:
        """Every choice, one after the other, then the usage. The function is called (and its first piece awaited)
        before a choice's first chunk, so an error it raises then reaches the client with its own status."""
        tokenizer = self.tokenizer
        await tokenizer.warm()
        bound = call.max_tokens if call.max_tokens is not None else request.effective_max_tokens
        stops = [s for s in request.stop_sequences if s]
        completion = 0
        for index in range(request.choice_count):
            cutter = _Cutter(tokenizer, stops, bound)
            async with aclosing(self._choice(request, index, cutter)) as chunks:
                async for chunk in chunks:
                    yield chunk
            completion += cutter.used
        yield ChatChunk(usage=Usage(count_chat_prompt(tokenizer, request), completion))

    async def _call(self, request: ChatCompletionRequest) -> object:
        if self._async:
            value: object = self.reply(request)
        else:
            value = await anyio.to_thread.run_sync(self.reply, request, abandon_on_cancel=True)
        if inspect.isawaitable(value):
            value = await value
        return value

    async def _choice(
        self, request: ChatCompletionRequest, index: int, cutter: _Cutter
    ) -> AsyncGenerator[ChatChunk, None]:
        value = await self._call(request)
        reply: Reply | None = None
        pieces: AsyncIterator[Any]
        if isinstance(value, str):
            pieces = _list_pieces((value,))
        elif isinstance(value, Reply):
            reply = value
            text = value.text
            pieces = _list_pieces((text,) if text is not None else ())
        elif isinstance(value, Mapping):
            raise TypeError("the reply function returned a mapping: return Reply(json=...) for structured output")
        elif isinstance(value, list | tuple):
            pieces = _list_pieces(value)
        elif hasattr(value, "__aiter__"):
            pieces = value.__aiter__()
        elif hasattr(value, "__iter__"):
            pieces = _sync_pieces(iter(value))
        else:
            raise TypeError(
                f"the reply function returned {type(value).__name__}: expected a str, a Reply or an iterable of str"
            )
        role: Literal["assistant"] | None = "assistant"
        ended = False
        try:
            async for piece in pieces:
                if not isinstance(piece, str):
                    raise TypeError(f"the reply function streamed {type(piece).__name__}: expected str pieces")
                text = cutter.feed(piece)
                if text:
                    yield ChatChunk(index=index, role=role, content=text)
                    role = None
                if cutter.finish is not None:
                    break
            else:
                ended = True
                text = cutter.flush()
                if text:
                    yield ChatChunk(index=index, role=role, content=text)
                    role = None
        finally:
            if not ended:  # cut short (a stop sequence, the bound, an error): close the function's pieces
                await _aclose(pieces)
        calls: tuple[ToolCall, ...] = ()
        if reply is not None and reply.tool_calls and cutter.finish is None:
            calls = cutter.tool_calls(reply.tool_calls)
        if calls:
            deltas = tuple(
                ToolCallDelta(index=i, id=c.id, name=c.name, arguments=c.arguments, type=c.type)
                for i, c in enumerate(calls)
            )
            yield ChatChunk(index=index, role=role, tool_calls=deltas)
            role = None
        if role is not None:  # nothing was sent: an empty answer still has its first chunk
            yield ChatChunk(index=index, role=role, content="")
        finish: FinishReason = cutter.finish or ("tool_calls" if calls else "stop")
        yield ChatChunk(index=index, finish_reason=finish)


@overload
def function_backend(
    reply: ReplyFunction, *, models: Sequence[str | ModelInfo], tokenizer: Tokenizer | None = None
) -> FunctionBackend: ...


@overload
def function_backend(
    reply: None = None, *, models: Sequence[str | ModelInfo], tokenizer: Tokenizer | None = None
) -> Callable[[ReplyFunction], FunctionBackend]: ...


def function_backend(
    reply: ReplyFunction | None = None, *, models: Sequence[str | ModelInfo], tokenizer: Tokenizer | None = None
) -> FunctionBackend | Callable[[ReplyFunction], FunctionBackend]:
    """``function_backend(reply, models=...)`` is a :class:`FunctionBackend`; ``@function_backend(models=...)``
    turns the decorated function into one."""
    if reply is not None:
        return FunctionBackend(reply, models=models, tokenizer=tokenizer)

    def decorate(function: ReplyFunction) -> FunctionBackend:
        return FunctionBackend(function, models=models, tokenizer=tokenizer)

    return decorate
