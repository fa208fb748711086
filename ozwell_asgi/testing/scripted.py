"""A chat backend a test scripts: it answers each request with the next answer queued, and records every request.

::

    backend = ScriptedBackend()
    backend.reply("Hello!")                                  # text, streamed word by word
    backend.tool_call("get_weather", {"city": "Paris"})      # a tool call: finish_reason "tool_calls"
    backend.error(429, "Slow down")                          # the SDK raises openai.RateLimitError
    backend.reply("Hello", wait=gate)                        # held until the test calls gate.open()

It answers through a :class:`~ozwell_asgi.FunctionBackend`, so what that backend applies for its function holds
for the answers: ``stop`` sequences cut them, the token bound cuts them (``finish_reason: "length"``), usage is counted,
and ``n`` choices take ``n`` answers from the queue, one per choice. Answers are taken in the order they were
queued, whatever the request; :attr:`ScriptedBackend.requests` holds the parsed requests in the order they came.

A request that finds the queue empty gets a 500 (``code: "ozwell_script_empty"``, with ``x-should-retry: false``
so the SDK does not retry it) whose message says which request it was; :meth:`ScriptedBackend.check` (run by the
pytest plugin when the test ends) then fails the test, as it does when queued answers were never used.

Embeddings are served for :attr:`ScriptedBackend.embedding_models`, with the deterministic vectors of
:class:`~ozwell_asgi.EchoBackend` (the same input gives the same unit vector), and recorded in
:attr:`ScriptedBackend.embedding_requests`.

The queue, the records and the gates may be used from any thread (a sync test, the thread of an in-process sync
client, a server thread). The records are bounded by :data:`MAX_RECORDED` requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as jsonlib
import re
import threading
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias, cast

import anyio

from ..backends.echo import EchoBackend
from ..backends.function import FunctionBackend, Reply
from ..errors import (
    AuthenticationError,
    BadGatewayError,
    GatewayTimeoutError,
    InternalServerError,
    InvalidRequestError,
    NotFoundError,
    OzwellError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from ..tokens import Tokenizer
from ..types import Call, ChatChunk, EmbeddingResult, ModelInfo, ToolCall
from ..wire.chat import ChatCompletionRequest

if TYPE_CHECKING:
    from ..wire.embeddings import EmbeddingRequest

__all__ = [
    "DEFAULT_CHAT_MODELS",
    "DEFAULT_EMBEDDING_MODELS",
    "MAX_DELAY",
    "MAX_RECORDED",
    "Gate",
    "ScriptedBackend",
    "Step",
]

DEFAULT_CHAT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "gpt-5", "gpt-5-mini")
DEFAULT_EMBEDDING_MODELS = ("text-embedding-3-small", "text-embedding-3-large")
MAX_RECORDED = 10_000  # requests kept in .requests (and as many in .embedding_requests); later ones are counted only
MAX_DELAY = 60.0  # seconds: the longest real delay an answer may hold

_ERRORS: dict[int, type[OzwellError]] = {
    400: InvalidRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    408: RequestTimeoutError,
    429: RateLimitError,
    500: InternalServerError,
    502: BadGatewayError,
    503: ServiceUnavailableError,
    504: GatewayTimeoutError,
}
_WORDS = re.compile(r"\s*\S+")


class Gate:
    """A pause the test controls: an answer that reaches a closed gate waits there until :meth:`open` is called
    (from any thread, or the event loop), without sleeping and without holding a thread. Once open it stays open.
    A request waiting at a gate is cancelled as usual if its client goes away."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open = False
        self._reached = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # one per answer waiting here

    def open(self) -> None:
        """Let every answer waiting here, and every later one, go on."""
        with self._lock:
            self._open = True
            waiters, self._waiters = self._waiters, []
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop has closed: nothing waits on it any more
                loop.call_soon_threadsafe(event.set)

    @property
    def is_open(self) -> bool:
        return self._open

    @property
    def reached(self) -> bool:
        """Whether an answer has come to this gate (waiting now, or gone through)."""
        return self._reached.is_set()

    def wait_reached(self, timeout: float = 5.0) -> bool:
        """Block until an answer comes to this gate (``True``) or ``timeout`` seconds pass (``False``). From an async
        test: ``await anyio.to_thread.run_sync(gate.wait_reached)``."""
        return self._reached.wait(timeout)

    async def _pass(self) -> None:
        self._reached.set()
        with self._lock:
            if self._open:
                return
            waiter = (asyncio.get_running_loop(), asyncio.Event())
            self._waiters.append(waiter)
        try:
            await waiter[1].wait()
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    def __repr__(self) -> str:
        return f"<Gate {'open' if self.is_open else 'closed'}{', reached' if self.reached else ''}>"


Step: TypeAlias = "str | Gate | float"
"""One step of a streamed answer: a piece of text, a gate to wait at, or a real delay in seconds."""


@dataclass(frozen=True, slots=True)
class _Answer:
    """What one choice answers: ``steps`` in order, then ``end`` (a whole Reply sent after a leading wait, or an
    error raised after the steps)."""

    kind: str
    steps: tuple[Step, ...] = ()
    end: Reply | OzwellError | None = None

    def describe(self) -> str:
        text = "".join(s for s in self.steps if isinstance(s, str))
        if isinstance(self.end, Reply):
            calls = ", ".join(c.name for c in self.end.tool_calls)
            detail = f"tool calls {calls}" if calls else repr(self.end.text)
        elif isinstance(self.end, OzwellError):
            detail = f"{self.end.status} {self.end.message!r}" + (f" after {text!r}" if text else "")
        else:
            detail = repr(text)
        return f"{self.kind}: {detail}"


def _check_step(step: object) -> Step:
    if isinstance(step, str | Gate):
        return step
    if isinstance(step, int | float) and not isinstance(step, bool):
        if not 0 <= step <= MAX_DELAY:
            raise ValueError(f"a delay is between 0 and {MAX_DELAY:g} seconds, not {step!r}")
        return float(step)
    raise TypeError(f"an answer's steps are str pieces, Gates and delays in seconds, not {type(step).__name__}")


def _steps(text: str | Sequence[Step], wait: Gate | float | None) -> tuple[Step, ...]:
    """The steps of ``text``: a str is split into words (each with the whitespace before it), a sequence is taken as
    it is; ``wait`` comes first."""
    if isinstance(text, str):
        pieces: list[Step] = list(_WORDS.findall(text))
        rest = text[sum(len(p) for p in pieces if isinstance(p, str)) :]
        if rest:
            pieces.append(rest)
    else:
        pieces = [_check_step(s) for s in text]
    if wait is not None:
        pieces.insert(0, _check_step(wait))
    return tuple(pieces)


async def _pause(step: Gate | float) -> None:
    if isinstance(step, Gate):
        await step._pass()
    else:
        await anyio.sleep(step)


_KEEP: Any = object()  # "the status's own code"


def _make_error(
    status: int, message: str | None, type: str | None, code: Any, param: str | None, headers: Sequence[tuple[str, str]]
) -> OzwellError:
    if not 400 <= status <= 599:
        raise ValueError(f"an error status is between 400 and 599, not {status}")
    text = message or f"Scripted error {status}."
    cls = _ERRORS.get(status)
    if cls is None:
        kind = type or ("invalid_request_error" if status < 500 else "server_error")
        error = OzwellError(text, param=param, type=kind, status=status, code=None, headers=headers)
    else:
        error = cls(text, param=param, type=type, headers=headers)
    if code is not _KEEP:
        error.code = code
    return error


class ScriptedBackend:
    """A chat (and embeddings) backend that answers from a queue the test fills (see the module docstring).

    ``models``: the chat model ids served (:data:`DEFAULT_CHAT_MODELS`, some of OpenAI's, unless given; the list
    :attr:`models` may be changed at any time). ``embedding_models`` likewise (:data:`DEFAULT_EMBEDDING_MODELS`).
    ``check_at_teardown``: whether the pytest plugin runs :meth:`check` when the test ends (set it to ``False`` in a
    test that leaves answers unused on purpose).
    """

    def __init__(
        self,
        *,
        models: Sequence[str] = DEFAULT_CHAT_MODELS,
        embedding_models: Sequence[str] = DEFAULT_EMBEDDING_MODELS,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self._function = FunctionBackend(self._next_answer, models=["scripted"], tokenizer=tokenizer)
        self.tokenizer: Tokenizer = self._function.tokenizer
        self.models: list[str] = list(models)
        self.embedding_models: list[str] = list(embedding_models)
        self.requests: list[ChatCompletionRequest] = []
        self.embedding_requests: list[EmbeddingRequest] = []
        self.check_at_teardown = True
        self._queue: deque[_Answer] = deque()
        self._lock = threading.Lock()
        self._count = 0  # chat requests seen, recorded or not
        self._unscripted: list[str] = []  # what each request that found the queue empty was (bounded like requests)
        self._gates: list[Gate] = []
        self._embedder = EchoBackend(tokenizer=self.tokenizer, chat_models=(), embedding_models=())

    # -- scripting ------------------------------------------------------------------------------------------------

    def reply(self, text: str | Sequence[Step] | Reply = "", *, wait: Gate | float | None = None) -> None:
        """Queue a text answer. A ``str`` is streamed word by word (a piece per word with the whitespace before
        it); a sequence is streamed piece by piece as given, and may hold :class:`Gate` objects and delays (seconds)
        between the pieces. A :class:`~ozwell_asgi.Reply` (structured output, several tool calls) is sent whole.
        ``wait``: a :class:`Gate` (or a delay) before the answer begins."""
        if isinstance(text, Reply):
            self._put(_Answer("reply", _steps((), wait), text))
        else:
            self._put(_Answer("reply", _steps(text, wait)))

    def tool_call(
        self,
        name: str,
        arguments: Any = None,
        *,
        content: str | None = None,
        id: str = "",
        wait: Gate | float | None = None,
    ) -> None:
        """Queue an answer that calls the function ``name``: ``finish_reason: "tool_calls"``. ``arguments``: a
        ``str`` is sent as it is (it should be JSON text), anything else as its JSON (``None``: ``{}``). ``id``:
        the call's id (a fresh ``call_…`` if empty). ``content``: text sent before the call."""
        if not isinstance(name, str) or not name:
            raise ValueError("a tool call needs a function name")
        if not isinstance(arguments, str):
            arguments = jsonlib.dumps({} if arguments is None else arguments)
        reply = Reply(content=content, tool_calls=(ToolCall(id=id, name=name, arguments=arguments),))
        self._put(_Answer("tool_call", _steps((), wait), reply))

    def error(
        self,
        error: int | OzwellError = 500,
        message: str | None = None,
        *,
        type: str | None = None,
        code: str | None = _KEEP,
        param: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
        after: str | Sequence[Step] = (),
        wait: Gate | float | None = None,
    ) -> None:
        """Queue an error: an :class:`~ozwell_asgi.OzwellError`, or one made from a status (400-599; ``type``,
        ``code`` and the message default to those of the status: 429 is ``rate_limit_error``, 5xx ``server_error``).
        The SDK raises the matching ``openai.APIStatusError`` subclass (``openai.RateLimitError``...).

        ``after``: text (or steps) streamed first. A streaming request then gets the text and the error as an SSE
        event mid-stream (the SDK raises ``openai.APIError`` while iterating); a non-streaming one gets the status.
        """
        if isinstance(error, OzwellError):
            if message is not None or type is not None or code is not _KEEP or param is not None or headers:
                raise TypeError("give an OzwellError, or a status with message, type, code, param and headers")
            made = error
        elif isinstance(error, int) and not isinstance(error, bool):
            made = _make_error(error, message, type, code, param, headers)
        else:
            raise TypeError(f"error takes an HTTP status or an OzwellError, not {error!r}")
        self._put(_Answer("error", _steps(after, wait), made))

    def gate(self) -> Gate:
        """A new closed :class:`Gate`, which :meth:`open_gates` (and the plugin, when the test ends) opens."""
        gate = Gate()
        with self._lock:
            self._gates.append(gate)
        return gate

    def open_gates(self) -> None:
        """Open every gate made by :meth:`gate` or queued in an answer: nothing waits any more."""
        with self._lock:
            gates = list(self._gates)
        for gate in gates:
            gate.open()

    @property
    def pending(self) -> int:
        """How many queued answers are still unused."""
        return len(self._queue)

    def check(self) -> None:
        """``AssertionError`` if a request found the queue empty or queued answers were never used (each listed)."""
        with self._lock:
            unscripted = list(self._unscripted)
            unused = [a.describe() for a in self._queue]
        problems = []
        if unscripted:
            problems.append(f"{len(unscripted)} request(s) found no answer queued:\n  " + "\n  ".join(unscripted))
        if unused:
            problems.append(f"{len(unused)} queued answer(s) were never used:\n  " + "\n  ".join(unused))
        if problems:
            raise AssertionError("ozwell_backend: " + "\n".join(problems))

    def _put(self, answer: _Answer) -> None:
        with self._lock:
            self._queue.append(answer)
            self._gates.extend(s for s in answer.steps if isinstance(s, Gate) and s not in self._gates)

    # -- serving --------------------------------------------------------------------------------------------------

    async def list_models(self) -> Sequence[ModelInfo]:
        return (
            *(ModelInfo(id=m, owned_by="ozwell-test") for m in self.models),
            *(ModelInfo(id=m, owned_by="ozwell-test", kind="embedding") for m in self.embedding_models),
        )

    async def stream_chat(self, request: ChatCompletionRequest, call: Call) -> AsyncIterator[ChatChunk]:
        with self._lock:
            self._count += 1
            if len(self.requests) < MAX_RECORDED:
                self.requests.append(request)
        answer = cast(AsyncGenerator[ChatChunk, None], self._function.stream_chat(request, call))
        async with aclosing(answer) as chunks:
            async for chunk in chunks:
                yield chunk

    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        with self._lock:
            if len(self.embedding_requests) < MAX_RECORDED:
                self.embedding_requests.append(request)
        return await self._embedder.embed(request, call)

    def _take(self, request: ChatCompletionRequest) -> _Answer:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            number = self._count
            if len(self._unscripted) < MAX_RECORDED:
                self._unscripted.append(f"request {number} (model {request.model!r})")
        raise OzwellError(
            f"ozwell_backend has no answer queued for request {number} (model {request.model!r}): queue one with "
            "ozwell_backend.reply(...), .tool_call(...) or .error(...) before the code under test calls the API.",
            code="ozwell_script_empty",
            headers=[("x-should-retry", "false")],
        )

    async def _next_answer(self, request: ChatCompletionRequest) -> Reply | AsyncGenerator[str, None]:
        answer = self._take(request)
        if isinstance(answer.end, Reply):
            for step in answer.steps:  # only the leading wait, for a whole Reply
                if not isinstance(step, str):
                    await _pause(step)
            return answer.end
        return self._stream(answer)

    @staticmethod
    async def _stream(answer: _Answer) -> AsyncGenerator[str, None]:
        for step in answer.steps:
            if isinstance(step, str):
                if step:
                    yield step
            else:
                await _pause(step)
        if isinstance(answer.end, OzwellError):
            raise answer.end
