"""Server-sent events: async iterators of bytes sent as ``text/event-stream``, closed when the client goes away."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

import anyio

from .types import Receive, Scope, Send

__all__ = ["DONE", "PING", "SSEResponse", "event"]

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"  # a comment line: clients ignore it, intermediaries see traffic
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def event(data: bytes) -> bytes:
    """One SSE message carrying ``data`` (JSON, never containing a newline)."""
    return b"data: " + data + b"\n\n"


class SSEResponse:
    """Streams ``frames`` as they come. If the client disconnects, the iterator is closed (``aclose``) at once,
    so whatever produced it (a backend, an upstream request) is released; its ``finally`` blocks run."""

    __slots__ = ("frames", "headers")

    def __init__(self, frames: AsyncGenerator[bytes, None], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.frames = frames
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [*_HEADERS, *self.headers]})
        async with aclosing(self.frames) as frames, anyio.create_task_group() as tg:

            async def watch_disconnect() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        tg.cancel_scope.cancel()
                        return

            tg.start_soon(watch_disconnect)
            try:
                async for frame in frames:
                    await send({"type": "http.response.body", "body": frame, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away (ASGI 2.4 servers raise on send)
                pass
            finally:
                tg.cancel_scope.cancel()
