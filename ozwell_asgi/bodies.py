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
    clock = asyncio.get_running_loop().time
    try:
        async with asyncio.timeout_at(clock() + idle_timeout) as idle:
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
                idle.reschedule(clock() + idle_timeout)
    except TimeoutError:
        raise RequestTimeoutError(
            f"The request body stopped arriving: nothing was received for {idle_timeout:g} seconds."
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
