"""Reading request bodies: the size cap (413), the idle timeout (408) and the JSON content type (415), before any
parsing."""

from __future__ import annotations

import asyncio

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
    """Cancels ``task`` once ``timeout`` seconds pass without :meth:`progress`: one timer handle per read, and
    progress only notes the time (the handle is re-armed when it fires early, never per piece of body)."""

    __slots__ = ("_cancelling", "_handle", "_last", "_loop", "_task", "_timeout", "fired")

    def __init__(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None  # an ASGI app always runs in a task
        self._loop, self._task, self._timeout = loop, task, timeout
        self._cancelling = task.cancelling()
        self._last = loop.time()
        self._handle = loop.call_at(self._last + timeout, self._check)
        self.fired = False

    def progress(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        deadline = self._last + self._timeout
        if self._loop.time() < deadline:  # something arrived since it was armed: wait for the rest
            self._handle = self._loop.call_at(deadline, self._check)
            return
        self.fired = True
        self._task.cancel()

    def expired(self) -> bool:
        """Whether the cancellation being handled is this timer's alone (as :func:`asyncio.timeout` decides)."""
        return self.fired and self._task.uncancel() <= self._cancelling

    def stop(self) -> None:
        self._handle.cancel()


async def read_json_body(request: Request, cap: int, idle_timeout: float = DEFAULT_IDLE_TIMEOUT) -> bytes:
    """The whole body, if it is JSON (or untyped) and at most ``cap`` bytes; 415/413 otherwise.

    A declared ``Content-Length`` over the cap is refused before reading; an undeclared one is counted as it
    arrives and refused as soon as it passes the cap, so memory stays bounded. A body that stops arriving for
    ``idle_timeout`` seconds is dropped with a 408 (one timer per request, pushed back as each piece arrives).
    """
    content_type = header(request, b"content-type")
    if content_type is not None:
        media = content_type.partition(";")[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            raise UnsupportedMediaTypeError(
                f"Invalid Content-Type header ({content_type}): this endpoint expects 'application/json'."
            )
    declared = header(request, b"content-length")
    if declared is not None:
        if not declared.isdigit():
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
