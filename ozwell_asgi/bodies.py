"""Reading request bodies: the size cap (413) and the JSON content type (415), before any parsing."""

from __future__ import annotations

from starlette.requests import Request

from .context import header
from .errors import InvalidRequestError, PayloadTooLargeError, UnsupportedMediaTypeError

__all__ = ["read_json_body"]


def _too_large(cap: int) -> PayloadTooLargeError:
    return PayloadTooLargeError(f"Request body too large: the limit is {cap} bytes.")


async def read_json_body(request: Request, cap: int) -> bytes:
    """The whole body, if it is JSON (or untyped) and at most ``cap`` bytes; 415/413 otherwise.

    A declared ``Content-Length`` over the cap is refused before reading; an undeclared one is counted as it
    arrives and refused as soon as it passes the cap, so memory stays bounded.
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
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
