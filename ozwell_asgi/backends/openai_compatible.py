"""A backend that forwards to any OpenAI-compatible server: vLLM, Ollama, OpenAI, another ozwell-asgi.

    backend = OpenAICompatibleBackend("http://127.0.0.1:11434/v1")          # Ollama
    backend = OpenAICompatibleBackend("https://api.openai.com/v1", api_key=OPENAI_API_KEY)

Guarantees:

- One connection pool per backend, made on first use and closed by :meth:`aclose`: httpcore's HTTP/1.1
  connections (the transport under httpx), without httpx's per-request models; an ``httpx.AsyncClient`` instead when
  the host passes one (``client=``), when the environment names a proxy (``HTTP_PROXY``, ``HTTPS_PROXY``,
  ``ALL_PROXY``) or when ``base_url`` carries credentials. No cookies are kept.
- A stream is parsed as its bytes arrive and each upstream chunk is yielded at once; nothing is re-buffered. No
  SSE line and no event may exceed ``max_event_size``; no whole (non-stream) answer may exceed
  ``max_response_size``; error bodies are read up to 64 KiB. Past a cap the call fails with a 502.
- Closing the stream (``aclose``, which the app does when its client goes away) closes the upstream connection at
  once, so the upstream stops generating.
- Failures before the first byte of an answer (connection refused or reset, 502/503/504) are retried
  ``connect_retries`` times, ``backoff`` seconds apart and doubling, never past ``call.deadline``; nothing is
  retried once an answer has begun.
- Errors reach the client in our envelope: the upstream's 4xx with its status, message, ``param``, ``code`` and
  ``type``; its 401/403 (this server's credentials refused: the operator's misconfiguration), 404/405 on an
  endpoint (a wrong ``base_url``), 5xx, a connection failure or a malformed answer as 502 ``upstream_error``; a
  timeout (or the upstream's 408/504) as 504 ``upstream_timeout``. No message carries the upstream URL or key.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import fnmatch
import logging
import math
import select
import socket
import ssl
import struct
import time
import urllib.request
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from http.cookiejar import DefaultCookiePolicy
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import httpcore
import httpx
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import from_json, to_json

from ..errors import BadGatewayError, GatewayTimeoutError, InvalidRequestError, OzwellError
from ..tokens import default_tokenizer
from ..types import (
    AssistantMessage,
    Call,
    ChatChoice,
    ChatChunk,
    ChatResult,
    EmbeddingResult,
    ModelInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
)

if TYPE_CHECKING:
    from ..wire.chat import ChatCompletionRequest
    from ..wire.embeddings import EmbeddingRequest

__all__ = ["DEFAULT_TIMEOUT", "OpenAICompatibleBackend"]

log = logging.getLogger("ozwell_asgi")

# The official SDK's: a long read (a large non-streamed answer takes minutes), a short connect; and a bounded wait
# for a free connection when the pool is full.
DEFAULT_TIMEOUT = httpx.Timeout(600.0, connect=5.0, pool=30.0)
# Idle connections are dropped after 4 s: before the 5 s after which uvicorn and Node servers close them, so a
# request is not sent on a connection the server is closing.
DEFAULT_LIMITS = httpx.Limits(max_connections=512, max_keepalive_connections=128, keepalive_expiry=4.0)

MAX_EVENT_SIZE = 8 * 1024 * 1024  # one SSE line or event (a whole tool call arrives in one chunk from some servers)
MAX_RESPONSE_SIZE = 256 * 1024 * 1024  # a whole answer: 2,048 embeddings of 3,072 floats as JSON fit
MAX_ERROR_BODY = 64 * 1024  # what is read of an error answer
MAX_MESSAGE = 2000  # characters of an upstream error message passed on
MAX_MODELS = 10_000  # models kept from GET /models
MAX_BACKOFF = 8.0  # seconds: the longest wait between two attempts
MODELS_DEADLINE = 30.0  # seconds a model list fetch may take (requests wait for it)

_RETRY_STATUSES = frozenset({502, 503, 504})
_FINISH = frozenset({"stop", "length", "tool_calls", "content_filter", "function_call"})
_DONE = b"[DONE]"


# -- what an upstream sends (validated with pydantic, lax: servers differ in small ways) ---------------------------


class _In(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _UsageIn(_In):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class _FunctionIn(_In):
    name: str | None = None
    arguments: str | None = None


class _CustomIn(_In):
    name: str | None = None
    input: str | None = None


class _ToolCallIn(_In):
    index: int | None = None
    id: str | None = None
    type: str | None = None
    function: _FunctionIn | None = None
    custom: _CustomIn | None = None


class _MessageIn(BaseModel):
    """A delta or a whole message: fields we do not model stay in ``model_extra``."""

    model_config = ConfigDict(extra="allow")

    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[_ToolCallIn] | None = None


_NO_MESSAGE = _MessageIn()  # a choice with neither (read, never changed)


class _ChoiceIn(_In):
    index: int = 0
    delta: _MessageIn | None = None
    message: _MessageIn | None = None
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class _ChatIn(_In):
    """A chat.completion or a chat.completion.chunk; or an error (``{"error": …}``, or vLLM's older
    ``{"object": "error", "message": …}``)."""

    object: str | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    choices: list[_ChoiceIn] = []
    usage: _UsageIn | None = None
    error: Any = None
    message: Any = None


_validate_chat = _ChatIn.__pydantic_validator__.validate_json  # model_validate_json, one call less per chunk


class _EmbeddingIn(_In):
    index: int | None = None
    embedding: list[float] | str


class _EmbeddingUsageIn(_In):
    prompt_tokens: int = 0


class _EmbeddingsIn(_In):
    object: str | None = None
    data: list[_EmbeddingIn] = []
    model: str | None = None
    usage: _EmbeddingUsageIn | None = None
    error: Any = None
    message: Any = None


class _ModelIn(_In):
    id: str
    created: int | None = None
    owned_by: str | None = None


class _ModelsIn(_In):
    data: list[_ModelIn]


# -- SSE --------------------------------------------------------------------------------------------------------


class SSEDecoder:
    """Incremental server-sent events: :meth:`feed` bytes as they arrive, get the complete events' ``(event,
    data)`` back. Lines end with LF, CRLF or CR; comments, ``id`` and ``retry`` are skipped. Bounded: a line or an
    event over ``max_size`` bytes raises :class:`BadGatewayError`. Linear: the pieces of an unfinished line are
    joined once, when it ends."""

    __slots__ = ("_after_cr", "_data", "_event", "_partial", "_partial_size", "_size", "max_size")

    def __init__(self, max_size: int = MAX_EVENT_SIZE) -> None:
        self.max_size = max_size
        self._partial: list[bytes] = []  # the pieces of a line not ended yet
        self._partial_size = 0
        self._data: list[bytes] = []
        self._event = b""
        self._size = 0
        self._after_cr = False

    def feed(self, piece: bytes) -> list[tuple[bytes, bytes]]:
        if self._after_cr:  # the last piece ended with CR: an LF now is the same line end
            self._after_cr = False
            if piece[:1] == b"\n":
                piece = piece[1:]
        if b"\r" in piece:
            self._after_cr = piece[-1:] == b"\r"
            piece = piece.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        partial = self._partial
        if b"\n" not in piece:
            partial.append(piece)
            self._partial_size += len(piece)
            if self._partial_size > self.max_size:
                raise BadGatewayError("The upstream model server sent an over-long stream line.")
            return []
        if partial:
            partial.append(piece)
            piece = b"".join(partial)
            partial.clear()
        lines = piece.split(b"\n")
        rest = lines.pop()
        events: list[tuple[bytes, bytes]] = []
        for line in lines:
            if line[:5] == b"data:":  # the usual line, taken here rather than in _line
                value = line[6:] if line[5:6] == b" " else line[5:]
                self._size += len(value) + 1
                if self._size > self.max_size:
                    raise BadGatewayError("The upstream model server sent an over-long stream event.")
                self._data.append(value)
            else:
                self._line(line, events)
        self._partial_size = len(rest)
        if rest:
            if len(rest) > self.max_size:
                raise BadGatewayError("The upstream model server sent an over-long stream line.")
            partial.append(rest)
        return events

    def close(self) -> list[tuple[bytes, bytes]]:
        """The events still pending at the end of the stream (a last line or event with no terminator)."""
        events: list[tuple[bytes, bytes]] = []
        if self._partial:
            self._line(b"".join(self._partial), events)
            self._partial.clear()
            self._partial_size = 0
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[tuple[bytes, bytes]]) -> None:
        if not line:
            if self._data:
                events.append((self._event, b"\n".join(self._data)))
            self._data = []
            self._event = b""
            self._size = 0
            return
        if line[0] == 0x3A:  # ":" a comment (keep-alive)
            return
        field, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if field == b"data":
            self._size += len(value) + 1
            if self._size > self.max_size:
                raise BadGatewayError("The upstream model server sent an over-long stream event.")
            self._data.append(value)
        elif field == b"event":
            self._event = value


# -- mapping upstream shapes to ours ------------------------------------------------------------------------------


def _usage(usage: _UsageIn | None) -> Usage | None:
    if usage is None:
        return None
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        prompt_tokens_details=usage.prompt_tokens_details,
        completion_tokens_details=usage.completion_tokens_details,
    )


def _kind(call: _ToolCallIn) -> Literal["function", "custom"] | None:
    if call.type == "custom" or (call.type is None and call.custom is not None):
        return "custom"
    return "function" if call.type is not None else None


def _tool_call_delta(position: int, call: _ToolCallIn) -> ToolCallDelta:
    if call.custom is not None:
        name, arguments = call.custom.name, call.custom.input
    elif call.function is not None:
        name, arguments = call.function.name, call.function.arguments
    else:
        name = arguments = None
    return ToolCallDelta(
        index=call.index if call.index is not None else position,
        id=call.id,
        name=name,
        arguments=arguments,
        type=_kind(call),
    )


def _tool_call(call: _ToolCallIn) -> ToolCall:
    if call.custom is not None or call.type == "custom":
        custom = call.custom or _CustomIn()
        return ToolCall(id=call.id or "", name=custom.name or "", arguments=custom.input or "", type="custom")
    function = call.function or _FunctionIn()
    return ToolCall(id=call.id or "", name=function.name or "", arguments=function.arguments or "")


def _reasoning_and_extra(message: _MessageIn) -> tuple[str | None, dict[str, Any] | None]:
    """``reasoning_content`` (or ``reasoning``, its newer name), and the fields we do not model (``None`` values
    and empty ``annotations`` dropped)."""
    reasoning = message.reasoning_content if message.reasoning_content is not None else message.reasoning
    extra: dict[str, Any] | None = None
    raw = message.model_extra
    if raw:
        extra = {k: v for k, v in raw.items() if v is not None and not (k == "annotations" and v == [])} or None
    if message.reasoning is not None and message.reasoning_content not in (None, message.reasoning):
        extra = {**(extra or {}), "reasoning": message.reasoning}
    return reasoning, extra


def _chunks(chunk: _ChatIn) -> list[ChatChunk]:
    """One ChatChunk per choice of an upstream chunk (its usage is taken apart by the caller)."""
    chunks = []
    for choice in chunk.choices:
        delta = choice.delta or choice.message or _NO_MESSAGE
        if delta.model_extra or delta.reasoning_content is not None or delta.reasoning is not None:
            reasoning, extra = _reasoning_and_extra(delta)
        else:
            reasoning = extra = None
        calls = tuple(_tool_call_delta(i, c) for i, c in enumerate(delta.tool_calls)) if delta.tool_calls else ()
        if (
            delta.role is None
            and delta.content is None
            and not calls
            and delta.refusal is None
            and reasoning is None
            and extra is None
            and choice.finish_reason is None
            and choice.logprobs is None
        ):
            continue  # an empty delta: nothing to pass on
        chunks.append(
            ChatChunk(
                index=choice.index,
                role="assistant" if delta.role == "assistant" else None,
                content=delta.content,
                tool_calls=calls,
                refusal=delta.refusal,
                finish_reason=choice.finish_reason,
                logprobs=choice.logprobs,
                reasoning_content=reasoning,
                model=chunk.model,
                system_fingerprint=chunk.system_fingerprint,
                extra=extra,
            )
        )
    return chunks


def _result(answer: _ChatIn) -> ChatResult:
    choices = []
    for choice in answer.choices:
        message = choice.message or _MessageIn()
        reasoning, extra = _reasoning_and_extra(message)
        finish = choice.finish_reason if choice.finish_reason in _FINISH else "stop"
        choices.append(
            ChatChoice(
                index=choice.index,
                message=AssistantMessage(
                    content=message.content,
                    tool_calls=tuple(_tool_call(c) for c in message.tool_calls or ()),
                    refusal=message.refusal,
                    reasoning_content=reasoning,
                    extra=extra,
                ),
                finish_reason=finish,  # type: ignore[arg-type]
                logprobs=choice.logprobs,
            )
        )
    return ChatResult(
        choices=tuple(choices),
        usage=_usage(answer.usage),
        model=answer.model,
        system_fingerprint=answer.system_fingerprint,
    )


def _error_fields(body: object) -> tuple[str, str | None, str | None, str | None] | None:
    """(message, type, param, code) of an OpenAI error body (or vLLM's older flat form); None for anything else."""
    if not isinstance(body, dict):
        return None
    error = body.get("error")
    if isinstance(error, str) and error:
        return error, None, None, None
    if not isinstance(error, dict):
        if body.get("object") == "error":
            error = body
        else:
            return None
    message = error.get("message")
    if not isinstance(message, str) or not message:
        return None

    def text(key: str) -> str | None:
        value = error.get(key)
        return value if isinstance(value, str) and value else None

    return message, text("type"), text("param"), text("code")


class _StreamState:
    """What a stream has shown so far: the last usage, the choices not yet finished, whether it ended."""

    __slots__ = ("done", "open", "seen", "usage")

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.open: set[int] = set()
        self.seen = False
        self.done = False


async def _drain(pieces: AsyncIterator[bytes]) -> None:
    """Read what follows ``[DONE]`` (the end of the chunked body, usually at once) so the connection can be reused;
    more than ``MAX_ERROR_BODY`` bytes or a second's wait is left to the close."""
    size = 0
    with anyio.move_on_after(1.0), contextlib.suppress(*_FAILURES):  # the answer is complete already
        async for piece in pieces:
            size += len(piece)
            if size > MAX_ERROR_BODY:
                return


def _decode_vector(value: list[float] | str) -> list[float]:
    if isinstance(value, list):
        return value
    raw = base64.b64decode(value, validate=True)
    if len(raw) % 4:
        raise ValueError("not float32")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


# -- HTTP: requests on httpcore's connection pool, or through an httpx.AsyncClient ---------------------------------

_CONNECT_TIMEOUTS = (httpx.ConnectTimeout, httpcore.ConnectTimeout)
_TIMEOUTS = (httpx.TimeoutException, httpcore.TimeoutException)
# Failures that leave the request unanswered: another attempt may succeed.
_UNANSWERED = (
    httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError,
    httpcore.ConnectError, httpcore.RemoteProtocolError, httpcore.ReadError, httpcore.WriteError,
)  # fmt: skip
_DEFAULT_PORTS = {"http": 80, "https": 443}
_poll = getattr(select, "poll", None)  # select.select is limited to descriptors under 1024
_HOLD = 64 * 1024  # a write up to this size waits for the next (a request's head for its body)
_INFLATE_PIECE = 256 * 1024  # the most one piece of a compressed body may grow into before the caller's cap is checked


class _BrokenBody(Exception):
    """A compressed body that does not decompress."""


_FAILURES = (
    httpx.HTTPError, httpcore.NetworkError, httpcore.ProtocolError, httpcore.ProxyError, httpcore.UnsupportedProtocol,
    _BrokenBody,
)  # fmt: skip


class _Answer(Protocol):
    """An upstream response whose body is still unread."""

    status: int

    def header(self, name: str) -> str | None: ...

    def body(self) -> AsyncIterator[bytes]:
        """The body's pieces as they arrive, decompressed."""
        ...

    async def aclose(self) -> None: ...


class _Sender(Protocol):
    async def send(self, path: str, body: bytes | None, request_id: str | None, sse: bool) -> _Answer:
        """POST ``body`` (GET with none) to ``base_url + path``: the response once its headers arrived."""
        ...

    async def aclose(self) -> None: ...


async def _inflate(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A gzip or zlib body, decompressed as it arrives, no piece over ``_INFLATE_PIECE`` bytes (a small compressed
    piece may grow a thousandfold: the caller's cap is checked before more is made)."""
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, told by its header
    try:
        async for piece in pieces:
            while piece:
                out = inflater.decompress(piece, _INFLATE_PIECE)
                piece = inflater.unconsumed_tail
                if out:
                    yield out
        out = inflater.flush()
        if out:
            yield out
    except zlib.error:
        raise _BrokenBody from None


class _Stream(httpcore.AsyncNetworkStream):
    """A connection's byte stream that holds a small write back until the next write or read, so that a request's
    head and body leave in one send (httpcore writes them apart: two system calls, two segments on the wire), and
    that answers ``is_readable`` from the socket it keeps rather than through anyio's attribute table."""

    __slots__ = ("_held", "_held_timeout", "_inner", "_socket")

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._socket: socket.socket | None = inner.get_extra_info("socket")
        self._held = b""
        self._held_timeout: float | None = None

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:  # noqa: ASYNC109 (httpcore's)
        if not buffer:
            return
        held = self._held
        if held:
            self._held = b""
            if len(held) + len(buffer) <= _HOLD:
                buffer = held + buffer
            else:
                await self._inner.write(held, self._held_timeout)
        if len(buffer) <= _HOLD:
            self._held, self._held_timeout = buffer, timeout
        else:
            await self._inner.write(buffer, timeout)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:  # noqa: ASYNC109 (httpcore's)
        if self._held:
            held, self._held = self._held, b""
            with contextlib.suppress(httpcore.WriteError):  # as httpcore does: the server may have answered early
                await self._inner.write(held, self._held_timeout)
        return await self._inner.read(max_bytes, timeout)

    async def aclose(self) -> None:
        self._held = b""
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (httpcore's)
    ) -> httpcore.AsyncNetworkStream:
        return _Stream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # asked of an idle connection: True when the server closed it
            sock = self._socket
            if sock is None or sock.fileno() < 0:
                return True
            if _poll is None:  # Windows
                return bool(select.select([sock], [], [], 0)[0])
            poller = _poll()
            poller.register(sock, select.POLLIN)
            return bool(poller.poll(0))
        return self._inner.get_extra_info(info)


class _Connections:
    """HTTP/1.1 connections to one origin, each an ``httpcore.AsyncHTTP11Connection`` (h11 and its state machine),
    the most recently used taken first. Only the connection taken is checked (expired, or closed by the server):
    httpcore's own pool checks every connection on each request and on each response's close, which at 16
    connections costs more than the request itself. At most ``max_connections`` are open (a request waits up to the
    pool timeout for one); at most ``max_keepalive_connections`` stay idle, each for ``keepalive_expiry`` seconds."""

    def __init__(self, base: httpx.URL, limits: httpx.Limits, timeout: httpx.Timeout) -> None:
        self._origin = httpcore.Origin(base.raw_scheme, base.raw_host, base.port or _DEFAULT_PORTS[base.scheme])
        self._host = base.raw_host.decode("ascii")
        self._ssl_context: ssl.SSLContext | None = None
        if base.scheme == "https":
            self._ssl_context = httpx.create_ssl_context()
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        self._network = httpcore.AnyIOBackend()
        self._connect_timeout = timeout.connect
        self._pool_timeout = timeout.pool
        self._expiry = limits.keepalive_expiry
        self._max_idle = limits.max_keepalive_connections
        limit = limits.max_connections
        self._slots = anyio.Semaphore(limit) if limit is not None else None
        self._idle: collections.deque[tuple[float, httpcore.AsyncHTTP11Connection]] = collections.deque()
        self._open: set[httpcore.AsyncHTTP11Connection] = set()

    async def send(self, request: httpcore.Request) -> _CoreAnswer:
        slots = self._slots
        if slots is not None:
            try:
                slots.acquire_nowait()
            except anyio.WouldBlock:
                try:
                    with anyio.fail_after(self._pool_timeout):
                        await slots.acquire()
                except TimeoutError:
                    raise httpcore.PoolTimeout("No connection became free in time.") from None
        try:
            connection = await self._take()
            try:
                response = await connection.handle_async_request(request)
            except BaseException:
                self._open.discard(connection)  # closed by httpcore already
                raise
        except BaseException:
            if slots is not None:
                slots.release()
            raise
        return _CoreAnswer(response, self, connection)

    async def _take(self) -> httpcore.AsyncHTTP11Connection:
        idle = self._idle
        if idle:
            now = time.monotonic()
            while idle and idle[0][0] <= now:  # the oldest first: their time is up
                await self._close(idle.popleft()[1])
            while idle:
                connection = idle.pop()[1]
                if not connection.has_expired():  # expired, or the server closed it (its socket reads EOF)
                    return connection
                await self._close(connection)
        stream = await self._network.connect_tcp(self._host, self._origin.port, timeout=self._connect_timeout)
        if self._ssl_context is not None:
            try:
                stream = await stream.start_tls(self._ssl_context, self._host, timeout=self._connect_timeout)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await stream.aclose()
                raise
        connection = httpcore.AsyncHTTP11Connection(self._origin, _Stream(stream), keepalive_expiry=self._expiry)
        self._open.add(connection)
        return connection

    async def give_back(self, connection: httpcore.AsyncHTTP11Connection) -> None:
        """After its response was closed: kept for the next request, or closed."""
        if self._slots is not None:
            self._slots.release()
        if (
            connection.is_idle()
            and connection in self._open
            and (self._max_idle is None or len(self._idle) < self._max_idle)
        ):
            expiry = self._expiry
            self._idle.append((math.inf if expiry is None else time.monotonic() + expiry, connection))
        else:
            await self._close(connection)

    async def _close(self, connection: httpcore.AsyncHTTP11Connection) -> None:
        self._open.discard(connection)
        if not connection.is_closed():
            await connection.aclose()

    async def aclose(self) -> None:
        """Close every connection, idle or answering (a response still being read then fails)."""
        connections, self._open = self._open, set()
        self._idle.clear()
        for connection in connections:
            await connection.aclose()


class _CoreAnswer:
    __slots__ = ("_connection", "_pool", "_response", "status")

    def __init__(
        self, response: httpcore.Response, pool: _Connections, connection: httpcore.AsyncHTTP11Connection
    ) -> None:
        self._response = response
        self._pool: _Connections | None = pool
        self._connection = connection
        self.status = response.status

    def header(self, name: str) -> str | None:
        key = name.encode()
        for field, value in self._response.headers:
            if field.lower() == key:
                return value.decode("latin-1")
        return None

    def body(self) -> AsyncIterator[bytes]:
        pieces = self._response.aiter_stream()
        encoding = self.header("content-encoding")
        if encoding is not None and encoding.strip().lower() in ("gzip", "x-gzip", "deflate"):
            return _inflate(pieces)
        return pieces  # identity, or a coding we never ask for: left as it is (then it is malformed)

    async def aclose(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await self._response.aclose()  # the connection is idle again if the answer was read to its end
            finally:
                await pool.give_back(self._connection)


class _CoreSender:
    """Requests on httpcore's HTTP/1.1 connections (:class:`_Connections`): no Request/Response models of httpx, no
    URL merging, no cookies, no hooks; the URL and headers are built once. Sends ``accept-encoding: gzip, deflate``
    (identity for event streams) and decompresses what comes back, as httpx would."""

    def __init__(self, base: httpx.URL, timeout: httpx.Timeout, limits: httpx.Limits, headers: dict[str, str]) -> None:
        self._pool = _Connections(base, limits, timeout)
        self._base = base
        self._extensions = {"timeout": timeout.as_dict()}
        common = [(b"host", base.netloc), *((k.encode(), v.encode()) for k, v in headers.items())]
        self._plain = [*common, (b"accept", b"application/json"), (b"accept-encoding", b"gzip, deflate")]
        self._sse = [*common, (b"accept", b"text/event-stream"), (b"accept-encoding", b"identity")]
        self._urls: dict[str, httpcore.URL] = {}

    def _url(self, path: str) -> httpcore.URL:
        url = self._urls.get(path)
        if url is None:
            base = self._base
            url = self._urls[path] = httpcore.URL(
                scheme=base.raw_scheme, host=base.raw_host, port=base.port, target=base.raw_path + path.encode()
            )
        return url

    async def send(self, path: str, body: bytes | None, request_id: str | None, sse: bool) -> _Answer:
        headers = [*(self._sse if sse else self._plain)]
        if request_id is not None:
            headers.append((b"x-request-id", request_id.encode()))
        if body is not None:
            headers.append((b"content-length", str(len(body)).encode()))
        request = httpcore.Request(
            b"GET" if body is None else b"POST",
            self._url(path),
            headers=headers,
            content=body,
            extensions=self._extensions,
        )
        return await self._pool.send(request)

    async def aclose(self) -> None:
        await self._pool.aclose()


class _ClientAnswer:
    __slots__ = ("_response", "status")

    def __init__(self, response: httpx.Response) -> None:
        self._response = response
        self.status = response.status_code

    def header(self, name: str) -> str | None:
        value: str | None = self._response.headers.get(name)
        return value

    def body(self) -> AsyncIterator[bytes]:
        return self._response.aiter_bytes()

    async def aclose(self) -> None:
        await self._response.aclose()


class _ClientSender:
    """Requests through an ``httpx.AsyncClient``: the host's own (``client=``), or ours when the environment names a
    proxy or the URL carries credentials (httpx honours both)."""

    def __init__(self, client: httpx.AsyncClient, base: str, headers: dict[str, str], owned: bool) -> None:
        self._client = client
        self._base = base
        self._plain = headers
        self._sse = {**headers, "accept": "text/event-stream", "accept-encoding": "identity"}
        self._urls: dict[str, httpx.URL] = {}
        self.owned = owned

    async def send(self, path: str, body: bytes | None, request_id: str | None, sse: bool) -> _Answer:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self._base + path)
        headers = self._sse if sse else self._plain
        if request_id is not None:
            headers = {**headers, "x-request-id": request_id}
        client = self._client
        request = client.build_request("GET" if body is None else "POST", url, content=body, headers=headers)
        return _ClientAnswer(await client.send(request, stream=True))

    async def aclose(self) -> None:
        if self.owned:
            await self._client.aclose()


def _needs_httpx(url: httpx.URL) -> bool:
    """Whether the environment names a proxy for ``url``'s scheme, or ``url`` carries credentials."""
    proxies = urllib.request.getproxies()
    return bool(url.userinfo) or url.scheme in proxies or "all" in proxies


# -- the backend ------------------------------------------------------------------------------------------------


class OpenAICompatibleBackend:
    """Chat and embeddings from an OpenAI-compatible server at ``base_url`` (ending in ``/v1``, usually).

    ``token_param`` names the field that carries the completion bound upstream (``"max_tokens"`` for servers that
    predate ``max_completion_tokens``). ``embedding_models`` are ``fnmatch`` patterns of the upstream's model ids
    that are embedding models (every other id is a chat model). ``models_ttl`` is how long the model list is
    cached; ``clock`` measures it. ``client``: an ``httpx.AsyncClient`` of yours to use instead of ours (then
    ``timeout`` and ``limits`` are its own, and :meth:`aclose` leaves it open).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: httpx.Timeout = DEFAULT_TIMEOUT,
        limits: httpx.Limits = DEFAULT_LIMITS,
        connect_retries: int = 2,
        backoff: float = 0.25,
        models_ttl: float = 60.0,
        token_param: str = "max_completion_tokens",
        embedding_models: Sequence[str] = ("*embed*",),
        max_event_size: int = MAX_EVENT_SIZE,
        max_response_size: int = MAX_RESPONSE_SIZE,
        client: httpx.AsyncClient | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if connect_retries < 0 or backoff < 0 or models_ttl < 0:
            raise ValueError("connect_retries, backoff and models_ttl must not be negative")
        base = base_url.rstrip("/")
        parsed = httpx.URL(base)
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise ValueError("base_url must be an http:// or https:// URL")
        if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
            raise ValueError("api_key must be printable ASCII (it is sent in a header)")
        self.base_url = base
        self._base = parsed
        self._timeout = timeout
        self._limits = limits
        self._connect_retries = connect_retries
        self._backoff = backoff
        self._models_ttl = models_ttl
        self._token_param = token_param
        self._embedding_models = tuple(embedding_models)
        self._max_event_size = max_event_size
        self._max_response_size = max_response_size
        self._client = client
        self._sender: _Sender | None = None
        self._clock = clock
        headers = {"content-type": "application/json", "user-agent": "ozwell-asgi"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        self._headers = headers
        # What a message passed on from the upstream must not contain.
        netloc = parsed.netloc.decode()
        key = api_key if api_key and len(api_key) >= 8 else None  # a dummy key ("ollama") is no secret
        self._secrets = tuple(s for s in (key, base, f"{parsed.scheme}://{netloc}", netloc) if s)
        self._models: tuple[ModelInfo, ...] | None = None
        self._models_expire = 0.0
        self._models_lock: anyio.Lock | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------

    def _http(self) -> _Sender:
        sender = self._sender
        if sender is None:
            if self._client is not None:
                sender = _ClientSender(self._client, self.base_url, self._headers, owned=False)
            elif _needs_httpx(self._base):
                client = httpx.AsyncClient(timeout=self._timeout, limits=self._limits)
                client.cookies.jar.set_policy(DefaultCookiePolicy(allowed_domains=[]))  # callers share no cookies
                sender = _ClientSender(client, self.base_url, self._headers, owned=True)
            else:
                sender = _CoreSender(self._base, self._timeout, self._limits, self._headers)
            self._sender = sender
        return sender

    async def aclose(self) -> None:
        """Close the connection pool (a client passed in is left to its owner). The backend can be used again."""
        sender, self._sender = self._sender, None
        if sender is not None:
            await sender.aclose()

    # -- models -----------------------------------------------------------------------------------------------

    async def list_models(self) -> Sequence[ModelInfo]:
        """The upstream's models (GET /models), cached for ``models_ttl`` seconds; one fetch at a time. If a
        refresh fails while an older list is cached, the older list is served and the refresh retried 5 s later."""
        models = self._models
        if models is not None and self._clock() < self._models_expire:
            return models
        if self._models_lock is None:
            self._models_lock = anyio.Lock()
        async with self._models_lock:
            if self._models is not None and self._clock() < self._models_expire:
                return self._models
            try:
                models = await self._fetch_models()
            except OzwellError:
                if self._models is None:
                    raise
                log.warning("the upstream model list could not be refreshed; serving the cached one")
                self._models_expire = self._clock() + min(self._models_ttl, 5.0)
                return self._models
            self._models = models
            self._models_expire = self._clock() + self._models_ttl
            return models

    async def _fetch_models(self) -> tuple[ModelInfo, ...]:
        deadline = anyio.current_time() + MODELS_DEADLINE
        async with self._exchange("/models", None, None, deadline, whole=True) as response:
            body = await self._read(response)
        try:
            listing = _ModelsIn.model_validate_json(body)
        except ValidationError:
            raise BadGatewayError("The upstream model server sent a malformed model list.") from None
        models = []
        for item in listing.data[:MAX_MODELS]:
            kind: Literal["chat", "embedding"] = "chat"
            if any(fnmatch.fnmatchcase(item.id, p) for p in self._embedding_models):
                kind = "embedding"
            owner = item.owned_by or "upstream"
            models.append(ModelInfo(id=item.id, owned_by=owner, created=item.created or 0, kind=kind))
        return tuple(models)

    # -- chat -------------------------------------------------------------------------------------------------

    def _chat_body(self, request: ChatCompletionRequest, call: Call, stream: bool) -> bytes:
        payload = request.model_dump(mode="json", exclude_none=True, by_alias=True)
        bound = request.effective_max_tokens
        if call.max_tokens is not None:
            bound = call.max_tokens if bound is None else min(bound, call.max_tokens)
        if bound is not None:
            payload.pop("max_tokens", None)
            payload.pop("max_completion_tokens", None)
            payload[self._token_param] = bound
        payload["stream"] = stream
        if stream:
            payload["stream_options"] = {**payload.get("stream_options", {}), "include_usage": True}
        else:
            payload.pop("stream_options", None)
        return to_json(payload)

    async def stream_chat(self, request: ChatCompletionRequest, call: Call) -> AsyncIterator[ChatChunk]:
        """POST /chat/completions with ``stream: true``; a ChatChunk per choice of each upstream chunk, as it
        arrives, then the usage. An error frame from the upstream, a malformed or truncated stream: 502."""
        body = self._chat_body(request, call, stream=True)
        async with self._exchange("/chat/completions", body, call.request_id, call.deadline, sse=True) as response:
            content_type = response.header("content-type") or ""
            if not content_type.startswith("text/event-stream"):
                answer = self._parse_chat(await self._read(response))
                raise self._answer_error(answer) or BadGatewayError(
                    "The upstream model server did not stream its answer."
                )
            decoder = SSEDecoder(self._max_event_size)
            state = _StreamState()
            pieces = response.body()
            try:
                async for piece in pieces:
                    for chunk in self._take(decoder.feed(piece), state):
                        yield chunk
                    if state.done:
                        await _drain(pieces)  # so the connection goes back to the pool
                        break
                else:
                    for chunk in self._take(decoder.close(), state):
                        yield chunk
            except _TIMEOUTS:
                raise GatewayTimeoutError("The upstream model server stopped sending its answer.") from None
            except _FAILURES:
                raise BadGatewayError("The upstream model server's answer broke off.") from None
            # Ended without [DONE]: complete only if every choice finished.
            if not state.done and (not state.seen or state.open):
                raise BadGatewayError("The upstream model server's answer broke off.")
            if state.usage is not None:
                yield ChatChunk(usage=state.usage)

    def _take(self, events: list[tuple[bytes, bytes]], state: _StreamState) -> list[ChatChunk]:
        """The chunks of a batch of events, up to ``[DONE]``; the usage and open choices kept in ``state``."""
        chunks: list[ChatChunk] = []
        for kind, data in events:
            if data == _DONE:
                state.done = True
                break
            upstream = self._stream_event(kind, data)
            if upstream.usage is not None:
                state.usage = _usage(upstream.usage)
            for chunk in _chunks(upstream):
                state.seen = True
                if chunk.finish_reason is None:
                    state.open.add(chunk.index)
                else:
                    state.open.discard(chunk.index)
                chunks.append(chunk)
        return chunks

    def _stream_event(self, kind: bytes, data: bytes) -> _ChatIn:
        if kind == b"error":
            try:
                fields = _error_fields(from_json(data))
            except ValueError:
                fields = None
            raise BadGatewayError(self._clean(fields[0]) if fields else "The upstream model server failed.")
        try:
            chunk: _ChatIn = _validate_chat(data)
        except ValidationError:
            raise BadGatewayError("The upstream model server sent a malformed stream.") from None
        if chunk.error is not None or chunk.object == "error":
            raise self._answer_error(chunk) or BadGatewayError("The upstream model server failed.")
        return chunk

    def _answer_error(self, answer: _ChatIn | _EmbeddingsIn) -> OzwellError | None:
        """The error an answer carries instead of a result (``{"error": …}`` in a 200 or a stream frame)."""
        if answer.error is None and getattr(answer, "object", None) != "error":
            return None
        body = {"error": answer.error} if answer.error is not None else {"object": "error", "message": answer.message}
        fields = _error_fields(body)
        return BadGatewayError(self._clean(fields[0]) if fields else "The upstream model server failed.")

    def _parse_chat(self, body: bytes | bytearray) -> _ChatIn:
        try:
            return _ChatIn.model_validate_json(body)
        except ValidationError:
            raise BadGatewayError("The upstream model server sent a malformed answer.") from None

    async def complete_chat(self, request: ChatCompletionRequest, call: Call) -> ChatResult:
        """POST /chat/completions with ``stream: false``: the whole answer, read within ``max_response_size``."""
        body = self._chat_body(request, call, stream=False)
        async with self._exchange("/chat/completions", body, call.request_id, call.deadline, whole=True) as response:
            answer = self._parse_chat(await self._read(response))
        error = self._answer_error(answer)
        if error is not None:
            raise error
        if not answer.choices:
            raise BadGatewayError("The upstream model server sent an answer without choices.")
        return _result(answer)

    # -- embeddings -------------------------------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        """POST /embeddings asking for floats (the route encodes base64 itself); vectors in input order."""
        payload = request.model_dump(mode="json", exclude_none=True)
        payload["encoding_format"] = "float"
        async with self._exchange(
            "/embeddings", to_json(payload), call.request_id, call.deadline, whole=True
        ) as response:
            body = await self._read(response)
        try:
            answer = _EmbeddingsIn.model_validate_json(body)
        except ValidationError:
            raise BadGatewayError("The upstream model server sent malformed embeddings.") from None
        error = self._answer_error(answer)
        if error is not None:
            raise error
        inputs = request.inputs()
        if len(answer.data) != len(inputs):
            raise BadGatewayError("The upstream model server sent a wrong number of embeddings.")
        slots: list[list[float] | None] = [None] * len(inputs)
        try:
            for position, item in enumerate(answer.data):
                index = item.index if item.index is not None else position
                if not 0 <= index < len(inputs) or slots[index] is not None:
                    raise ValueError("bad index")
                slots[index] = _decode_vector(item.embedding)
        except (ValueError, struct.error):
            raise BadGatewayError("The upstream model server sent malformed embeddings.") from None
        vectors = [v for v in slots if v is not None]  # all of them: as many as inputs, each index once
        if request.dimensions is not None and any(len(v) != request.dimensions for v in vectors):
            raise InvalidRequestError(
                f"The model `{request.model}` does not support 'dimensions'.", param="dimensions", code=None
            )
        if answer.usage is not None:
            tokens = answer.usage.prompt_tokens
        else:
            tokenizer = default_tokenizer()
            tokens = sum(tokenizer.count(i) if isinstance(i, str) else len(i) for i in inputs)
        return EmbeddingResult(vectors=vectors, prompt_tokens=tokens, model=answer.model)

    # -- HTTP -------------------------------------------------------------------------------------------------

    @asynccontextmanager
    async def _exchange(
        self,
        path: str,
        body: bytes | None,
        request_id: str | None,
        deadline: float | None,
        *,
        sse: bool = False,
        whole: bool = False,
    ) -> AsyncIterator[_Answer]:
        """A 2xx response whose body is still unread, closed on exit. Failures before its first byte are retried;
        error statuses become our errors. ``deadline`` bounds getting the response (and, ``whole``, reading it)."""
        if deadline is None:
            response = await self._send(path, body, request_id, sse, None)
        else:
            with anyio.CancelScope(deadline=deadline) as scope:
                response = await self._send(path, body, request_id, sse, deadline)
            if scope.cancelled_caught:
                raise GatewayTimeoutError("The upstream model server did not answer in time.")
        try:
            if whole and deadline is not None:
                with anyio.CancelScope(deadline=deadline) as scope:
                    yield response
                if scope.cancelled_caught:
                    raise GatewayTimeoutError("The upstream model server did not answer in time.")
            else:
                yield response
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()

    async def _send(
        self, path: str, body: bytes | None, request_id: str | None, sse: bool, deadline: float | None
    ) -> _Answer:
        """The first 2xx response (body unread), retrying failures before its first byte; our error otherwise."""
        sender = self._http()
        attempt = 0
        while True:
            error: OzwellError
            try:
                response = await sender.send(path, body, request_id, sse)
            except _CONNECT_TIMEOUTS:
                error = GatewayTimeoutError("Connecting to the upstream model server timed out.")
            except _UNANSWERED:
                error = BadGatewayError("Could not reach the upstream model server.")
            except _TIMEOUTS:
                raise GatewayTimeoutError("The upstream model server did not answer in time.") from None
            except _FAILURES:
                raise BadGatewayError("Could not reach the upstream model server.") from None
            else:
                status = response.status
                if 200 <= status < 300:
                    return response
                try:
                    data = await self._read(response, MAX_ERROR_BODY, truncate=True)
                except OzwellError:
                    data = bytearray()
                finally:
                    with anyio.CancelScope(shield=True):
                        await response.aclose()
                error = self._status_error(status, data, response)
                if status not in _RETRY_STATUSES:
                    raise error
            if not await self._wait_to_retry(attempt, deadline):
                raise error
            attempt += 1

    async def _wait_to_retry(self, attempt: int, deadline: float | None) -> bool:
        if attempt >= self._connect_retries:
            return False
        delay = min(self._backoff * 2**attempt, MAX_BACKOFF)
        if deadline is not None and anyio.current_time() + delay >= deadline:
            return False
        await anyio.sleep(delay)
        return True

    async def _read(self, response: _Answer, cap: int | None = None, *, truncate: bool = False) -> bytearray:
        """The body, up to ``cap`` bytes (``max_response_size`` by default): past it, cut (``truncate``) or 502."""
        limit = self._max_response_size if cap is None else cap
        data = bytearray()
        try:
            async for piece in response.body():
                data += piece
                if len(data) > limit:
                    if truncate:
                        return data[:limit]
                    raise BadGatewayError("The upstream model server's answer is too large.")
        except _TIMEOUTS:
            raise GatewayTimeoutError("The upstream model server stopped sending its answer.") from None
        except _BrokenBody:
            raise BadGatewayError("The upstream model server sent a malformed answer.") from None
        except _FAILURES:
            raise BadGatewayError("The upstream model server's answer broke off.") from None
        return data

    def _clean(self, message: str) -> str:
        """An upstream message fit to pass on: bounded, with no trace of the upstream URL or key."""
        message = message[:MAX_MESSAGE]
        for secret in self._secrets:
            message = message.replace(secret, "[upstream]")
        return message

    def _status_error(self, status: int, body: bytes | bytearray, response: _Answer) -> OzwellError:
        """Our error for an upstream's non-2xx answer."""
        try:
            fields = _error_fields(from_json(body)) if body else None
        except ValueError:
            fields = None
        if status in (401, 403):
            return BadGatewayError(
                f"The upstream model server refused this server's credentials (HTTP {status}): the server's "
                "upstream API key is missing, wrong or lacks access. Only its operator can fix this."
            )
        if status in (408, 504):
            return GatewayTimeoutError(f"The upstream model server timed out (HTTP {status}).")
        if status >= 500 or status < 400:
            return BadGatewayError(f"The upstream model server failed (HTTP {status}).")
        if status == 429:
            # The message would describe this server's own account upstream: say less, keep the retry hints.
            hints = [(k, v) for k in ("retry-after", "retry-after-ms") if (v := response.header(k)) is not None]
            code = fields[3] if fields else None
            return OzwellError(
                "The upstream model server is refusing requests for now (rate limit or quota). Please retry later.",
                status=429,
                type="rate_limit_error",
                code=code or "rate_limit_exceeded",
                headers=hints,
            )
        if status in (404, 405) and not (fields and self._about_model(fields)):
            return BadGatewayError(f"The upstream model server has no such endpoint (HTTP {status}).")
        if fields is None:
            return OzwellError(
                f"The upstream model server rejected the request (HTTP {status}).",
                status=status,
                type="invalid_request_error",
                code=None,
            )
        message, kind, param, code = fields
        return OzwellError(
            self._clean(message), status=status, type=kind or "invalid_request_error", param=param, code=code
        )

    @staticmethod
    def _about_model(fields: tuple[str, str | None, str | None, str | None]) -> bool:
        message, _, param, code = fields
        return code == "model_not_found" or param == "model" or "model" in message.lower()
