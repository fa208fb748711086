"""The two ways we answer: JSON bytes (success or error envelope). Built on raw ASGI messages, no copies."""

from __future__ import annotations

from collections.abc import Sequence

from pydantic_core import to_json

from .errors import OzwellError, error_body
from .types import Receive, Scope, Send

__all__ = ["JSONResponse", "error_response"]

_JSON = (b"content-type", b"application/json")


class JSONResponse:
    """A complete JSON answer. ``content`` is serialised once with pydantic-core (or given as bytes)."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, content: object, status: int = 200, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        self.body = content if isinstance(content, bytes) else to_json(content)
        self.status = status
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [_JSON, (b"content-length", b"%d" % len(self.body)), *self.headers]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


def error_response(exc: OzwellError) -> JSONResponse:
    """The envelope for ``exc`` with its status and headers."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers]
    return JSONResponse(error_body(exc), exc.status, headers)
