"""Server-sent events: async iterators of bytes sent as ``text/event-stream``, closed when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing

import anyio
import anyio.lowlevel

from .types import ChatChunk, Receive, Scope, Send

__all__ = ["DONE", "PING", "YIELD_EVERY", "FirstChunk", "SSEResponse", "aclose_stream", "event", "first_chunk"]

DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"  # a comment line: clients ignore it, intermediaries see traffic
# Frames sent between two checkpoints. A backend whose generator never awaits, sent to a server whose ``send`` does
# not block, would otherwise hold the event loop for its whole stream: no other request would be served, and the
# disconnect watcher could not run, so a gone client's stream would be generated (and charged) to its end.
YIELD_EVERY = 64
_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


FirstChunk = ChatChunk | asyncio.Future[ChatChunk | None] | None


async def first_chunk(stream: AsyncIterator[ChatChunk], keepalive: float) -> FirstChunk:
    """The backend's first chunk (``None``: an empty stream), awaited before a stream's response starts, so that a
    failure before it still gets a real HTTP status. A backend slower than ``keepalive`` seconds (an upstream's first
    token) gets the future that will hold it instead: the response starts then and sends ``: ping`` comments until
    the chunk comes (``keepalive`` 0: wait for the chunk however long it takes)."""
    if not keepalive:
        return await anext(stream, None)
    waiting = asyncio.ensure_future(anext(stream, None))
    try:
        await asyncio.wait((waiting,), timeout=keepalive)
    except BaseException:
        waiting.cancel()
        raise
    return waiting.result() if waiting.done() else waiting


async def aclose_stream(stream: AsyncIterator[ChatChunk]) -> None:
    """Close a backend's stream (its generator's ``finally`` runs: upstream connections released), shielded from
    the cancellation that may be why it is closed."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


def event(data: bytes) -> bytes:
    """One SSE message carrying ``data`` (JSON, never containing a newline)."""
    return b"data: " + data + b"\n\n"


class SSEResponse:
    """Streams ``frames`` as they come. If the client disconnects, the iterator is closed (``aclose``) at once,
    so whatever produced it (a backend, an upstream request) is released; its ``finally`` blocks run.

    Every :data:`YIELD_EVERY` frames the stream yields to the event loop, even if neither ``frames`` nor ``send``
    awaited anything: a stream never starves other requests, and a disconnect is seen within a few such steps."""

    __slots__ = ("frames", "headers")

    def __init__(self, frames: AsyncGenerator[bytes, None], headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.frames = frames
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [*_HEADERS, *self.headers]})
        finished = False
        # Cancelled only if the client goes away; a cancel scope, so shielded steps (settling) still finish.
        with anyio.CancelScope() as gone:

            async def watch_disconnect() -> None:
                try:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                except Exception:  # a server that cannot say: stop watching, the stream goes on
                    return
                if not finished:
                    gone.cancel()

            # A plain task, not a task group: it is cancelled when the stream ends and nothing waits for it.
            watcher = asyncio.get_running_loop().create_task(watch_disconnect())
            try:
                async with aclosing(self.frames) as frames:
                    sent = 0
                    async for frame in frames:
                        await send({"type": "http.response.body", "body": frame, "more_body": True})
                        sent += 1
                        if sent == YIELD_EVERY:
                            sent = 0
                            await anyio.lowlevel.checkpoint()
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # the client went away (ASGI 2.4 servers raise on send)
                pass
            finally:
                finished = True
                watcher.cancel()
