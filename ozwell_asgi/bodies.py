"""Reading request bodies: the size cap (413), the idle timeout (408) and the JSON content type (415), before any
parsing."""

from __future__ import annotations

import asyncio
import math
import weakref

from starlette.requests import Request

from .errors import InvalidRequestError, PayloadTooLargeError, RequestTimeoutError, UnsupportedMediaTypeError

__all__ = ["header", "read_json_body"]


def header(request: Request, name: bytes) -> str | None:
    """A request header (``name`` lower-case), from the one header dict the app builds per request."""
    headers: dict[bytes, bytes] | None = request.scope.get("ozwell.headers")
    if headers is None:
        value = request.headers.get(name.decode())
        return value
    raw = headers.get(name)
    return None if raw is None else raw.decode("latin-1")


def _too_large(cap: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"Request body too large: the limit is {cap} bytes.")


DEFAULT_IDLE_TIMEOUT = 15.0


class _IdleTimer:
    """Cancels the current task once ``timeout`` seconds pass without :meth:`progress`.

    Nothing is scheduled per read: a timer only notes its task and the time, and registers with its loop's one
    :class:`_Sweeper`, which holds a single timer handle for the earliest deadline of all the reads in flight and
    re-arms it for the next one when it fires. Progress only notes the time.
    """

    __slots__ = ("_cancelling", "_loop", "_sweeper", "_task", "fired", "last", "timeout")

    def __init__(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        assert task is not None  # an ASGI app always runs in a task
        self._loop, self._task, self.timeout = loop, task, timeout
        self._cancelling = task.cancelling()
        self.last = loop.time()
        self.fired = False
        sweeper = _sweepers.get(weakref.ref(loop))  # the loop's plain weak reference, made once and then reused
        if sweeper is None:
            sweeper = _sweepers[weakref.ref(loop, _forget_loop)] = _Sweeper()
        self._sweeper = sweeper
        sweeper.add(self, loop)

    def progress(self) -> None:
        self.last = self._loop.time()

    def fire(self) -> None:
        self.fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """Whether the cancellation being handled is this timer's alone (as :func:`asyncio.timeout` decides)."""
        return self.fired and self._task.uncancel() <= self._cancelling

    def stop(self) -> None:
        self._sweeper.reads.pop(self, None)


class _Sweeper:
    """The idle timers of one event loop: one armed timer handle (at ``armed``, the earliest deadline known when it
    was armed), re-armed at the earliest remaining deadline each time it fires. Under steady traffic, where reads
    end within microseconds, that is one handle per timeout period instead of one per request.

    A read whose deadline is earlier than the armed one (a shorter timeout) arms another handle; a handle that is
    no longer the armed one does nothing when it fires. Holds no reference to the loop (only the loop holds it).
    """

    __slots__ = ("armed", "reads")

    def __init__(self) -> None:
        self.reads: dict[_IdleTimer, None] = {}  # in flight, in registration order
        self.armed = math.inf

    def add(self, timer: _IdleTimer, loop: asyncio.AbstractEventLoop) -> None:
        self.reads[timer] = None
        deadline = timer.last + timer.timeout
        if deadline < self.armed:
            self.armed = deadline
            loop.call_at(deadline, self._sweep, deadline)

    def _sweep(self, armed: float) -> None:
        if armed != self.armed:  # superseded by an earlier handle, which re-armed (or found nothing to watch)
            return
        now = asyncio.get_running_loop().time()
        earliest = math.inf
        expired = []
        for timer in self.reads:
            deadline = timer.last + timer.timeout
            if deadline <= now:
                expired.append(timer)
            elif deadline < earliest:
                earliest = deadline
        for timer in expired:
            del self.reads[timer]
            timer.fire()
        self.armed = earliest
        if earliest != math.inf:
            asyncio.get_running_loop().call_at(earliest, self._sweep, earliest)


# Each loop's sweeper, under a weak reference to the loop that removes it when the loop is collected (what
# WeakKeyDictionary does, without a Python-level method call per request).
_sweepers: dict[weakref.ref[asyncio.AbstractEventLoop], _Sweeper] = {}


def _forget_loop(ref: weakref.ref[asyncio.AbstractEventLoop]) -> None:
    _sweepers.pop(ref, None)


async def read_json_body(request: Request, cap: int, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> bytes:
    """The whole body, if it is JSON (or untyped) and at most ``cap`` bytes; 415/413 otherwise.

    A declared ``Content-Length`` over the cap is refused before reading; an undeclared one is counted as it
    arrives and refused as soon as it passes the cap, so memory stays bounded. A body that stops arriving for
    ``idle_timeout`` seconds is dropped with a 408 (nothing scheduled per request: see :class:`_IdleTimer`).
    """
    content_type = header(request, b"content-type")
    if content_type is not None and content_type != "application/json":
        media = content_type.partition(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaTypeError(
                f"Invalid Content-Type header ({content_type}): this endpoint expects 'application/json'."
            )
    declared = header(request, b"content-length")
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()):  # ASCII digits only: int() refuses "²"
            raise InvalidRequestError("Invalid Content-Length header.")
        if int(declared) > cap:
            raise _too_large(cap)
    chunks: list[bytes] = []
    size = 0
    receive = request.receive
    idle = _IdleTimer(idle_timeout)
    try:
        while True:
            message = await receive()
            if message["type"] != "http.request":  # http.disconnect
                raise InvalidRequestError("The client disconnected before sending the whole request body.")
            chunk: bytes = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > cap:
                    raise _too_large(cap)
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
            idle.progress()
    except asyncio.CancelledError:
        if idle.expired():
            raise RequestTimeoutError(
                f"The request body stopped arriving: nothing was received for {idle_timeout:g} seconds."
            ) from None
        raise
    finally:
        idle.stop()
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
