"""uvicorn's HTTP/1.1 protocols with the connection bounds ``ozwell-asgi serve`` needs and uvicorn lacks.

uvicorn (httptools and h11 alike) arms no timer on a connection until its first response has been sent: one that
sends half a request line and stops is held as long as the client likes, and httptools buffers request headers
without limit. The protocols here add, per connection:

- a header deadline: while no request of the connection is being answered (from the accept, or from the end of the
  previous response), the next request's headers must be complete within ``header_timeout`` seconds (two, at
  worst, after a response), else the connection is closed. This also bounds how long the unread rest of a body
  answered early is drained.
- a header size cap (httptools): a request whose headers pass ``max_header_size`` bytes is answered 431 and the
  connection closed; with h11, its own ``h11_max_incomplete_event_size`` (set to the same cap) answers 400.
- a concurrency limit: a request whose headers complete while ``limit_concurrency`` requests of this process are
  in progress is answered 503 (``Retry-After: 1``, ``Connection: close``) without reaching the app. Unlike
  uvicorn's own ``limit_concurrency``, idle and half-sent connections do not count, so they cannot crowd out
  requests; they are bounded by the deadline instead.

The 431 and the 503 are OpenAI's error envelope, with ``x-request-id`` and ``openai-processing-ms``.
"""

from __future__ import annotations

import asyncio
import functools
import random
from collections.abc import Callable
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from .errors import OzwellError, ServiceUnavailableError, error_body
from .responses import error_response
from .types import Receive, Scope, Send

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
    HttpToolsProtocol = None  # type: ignore[assignment,misc]

__all__ = ["GuardedH11Protocol", "GuardedHttpToolsProtocol", "guarded_protocol"]

OVERLOADED_MESSAGE = "The server is overloaded or not ready yet."
HEADERS_TOO_LARGE_MESSAGE = "Request header fields too large."


def _ids() -> list[tuple[str, str]]:
    return [("x-request-id", f"req_{random.getrandbits(128):032x}"), ("openai-processing-ms", "0")]


async def _overloaded(scope: Scope, receive: Receive, send: Send) -> None:
    """The app a request is given instead of ours when this process is at its concurrency limit."""
    headers = [("Retry-After", "1"), ("Connection", "close"), *_ids()]
    await error_response(ServiceUnavailableError(OVERLOADED_MESSAGE, headers=headers))(scope, receive, send)


def _raw_response(error: OzwellError) -> bytes:
    """``error`` as a whole HTTP/1.1 response that closes the connection, for answers made outside any request."""
    body = error_body(error)
    head = [
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in _ids()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


_BUSY = object()  # what a deadline check sees while one of the connection's requests is being answered


class _Guard(asyncio.Protocol):
    """The bounds shared by both protocols; mixed in before uvicorn's class, whose state it reads.

    The header deadline costs nothing per request: one timer per connection checks, every ``header_timeout``,
    whether the connection has stayed idle with the same last request since the previous check, and closes it if
    so. A new connection is closed at the first check; one idle after a response, at the first or second.
    """

    # uvicorn's protocol state this mixin reads
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    cycle: Any
    tasks: set[asyncio.Task[None]]
    app: Any

    def _init_guard(self, header_timeout: float, limit_concurrency: int | None) -> None:
        if header_timeout <= 0:
            raise ValueError("header_timeout must be > 0")
        self._header_timeout = header_timeout
        self._limit = limit_concurrency
        self._app = self.app
        self._seen: object = None  # at the last check: the idle connection's last request (None: none yet), or _BUSY
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._timer = self.loop.call_later(self._header_timeout, self._check_deadline)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def _check_deadline(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        cycle = self.cycle
        seen = cycle if cycle is None or cycle.response_complete else _BUSY
        if seen is not _BUSY and seen is self._seen:
            self.transport.abort()  # nothing is owed to it; abort also frees a socket whose peer stopped reading
            return
        self._seen = seen
        self._timer = self.loop.call_later(self._header_timeout, self._check_deadline)

    def _admit(self) -> None:
        """Give the request about to start our app, or the 503 when this process is at its limit."""
        self.app = _overloaded if self._limit is not None and len(self.tasks) >= self._limit else self._app


class GuardedH11Protocol(_Guard, H11Protocol):
    """uvicorn's h11 protocol with the header deadline and the concurrency limit (h11 caps header size itself)."""

    def __init__(
        self,
        *args: Any,
        header_timeout: float,
        limit_concurrency: int | None,
        **kwargs: Any,
    ) -> None:
        H11Protocol.__init__(self, *args, **kwargs)
        self._init_guard(header_timeout, limit_concurrency)

    def handle_events(self) -> None:
        self._admit()
        super().handle_events()


if HttpToolsProtocol is not None:
    _data_received = HttpToolsProtocol.data_received  # called directly: these two run for every request
    _on_headers_complete = HttpToolsProtocol.on_headers_complete

    class GuardedHttpToolsProtocol(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with the header deadline, the header size cap and the concurrency limit."""

        def __init__(
            self,
            *args: Any,
            header_timeout: float,
            max_header_size: int,
            limit_concurrency: int | None,
            **kwargs: Any,
        ) -> None:
            HttpToolsProtocol.__init__(self, *args, **kwargs)
            self._init_guard(header_timeout, limit_concurrency)
            self._max_header_size = max_header_size
            self._header_bytes = 0

        def data_received(self, data: bytes) -> None:
            # uvicorn makes a request's scope when the request begins and gives it its "method" once the headers
            # are complete. A read is counted when it lay wholly within the headers still incomplete (same scope, or
            # the connection's first read with no request in it yet); the read in which a later request began is
            # not, so the count never exceeds the headers' size and the cap holds to within one read (<= 256 KiB).
            before = self.scope
            _data_received(self, data)
            scope = self.scope
            if scope is None or "method" in scope:
                return
            if scope is before:
                self._header_bytes += len(data)
            else:
                self._header_bytes = len(data) if before is None and self.cycle is None else 0
            if self._header_bytes > self._max_header_size and not self.transport.is_closing():
                self.transport.write(_raw_response(_headers_too_large()))
                self.transport.close()

        def on_headers_complete(self) -> None:
            self.app = _overloaded if self._limit is not None and len(self.tasks) >= self._limit else self._app
            _on_headers_complete(self)


def _headers_too_large() -> OzwellError:
    return OzwellError(
        HEADERS_TOO_LARGE_MESSAGE, status=431, type="invalid_request_error", code="request_header_fields_too_large"
    )


def guarded_protocol(
    *,
    header_timeout: float,
    max_header_size: int,
    limit_concurrency: int | None,
    http: str = "auto",
) -> Callable[..., asyncio.Protocol]:
    """What to pass as uvicorn's ``http``: httptools' guarded protocol (``auto``, if installed) or h11's.

    A picklable factory, so ``--workers`` hands it to every worker. With h11, also pass
    ``h11_max_incomplete_event_size=max_header_size`` to uvicorn.
    """
    if http not in ("auto", "httptools", "h11"):
        raise ValueError(f"http must be 'auto', 'httptools' or 'h11', got {http!r}")
    if http != "h11" and HttpToolsProtocol is not None:
        return functools.partial(
            GuardedHttpToolsProtocol,
            header_timeout=header_timeout,
            max_header_size=max_header_size,
            limit_concurrency=limit_concurrency,
        )
    if http == "httptools":
        raise ValueError("httptools is not installed")
    return functools.partial(GuardedH11Protocol, header_timeout=header_timeout, limit_concurrency=limit_concurrency)
