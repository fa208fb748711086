"""CORS: which browser origins may call the API, the preflight answer, and the headers on every answer to them.

The policy is the app's ``cors_origins`` (``OzwellAPI(cors_origins=[...])``, ``serve --cors-origin``): exact
origins, ``https://*.example.com`` wildcards, or ``*`` for any origin. A preflight carries no key, so it is
decided by that list alone; a scoped key's own ``origins`` then decide, on the real request, whether the key may
be used from there (403 otherwise, readable by the page since that answer carries CORS headers too). So list the
origins of your scoped keys in ``cors_origins``, or use ``*`` and let each key decide (docs/authentication.md).

- A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) from an allowed origin is 204
  with ``Access-Control-Allow-Methods``, the requested headers it allows in ``Access-Control-Allow-Headers``
  (``Authorization``, ``Content-Type`` and the other headers the OpenAI SDKs send, every ``x-stainless-*``) and
  ``Access-Control-Max-Age``; from any other origin, or asking for another header, 403 with no CORS headers.
- Every other answer to an allowed origin, errors included, carries ``Access-Control-Allow-Origin`` (the origin
  itself), ``Vary: Origin`` and ``Access-Control-Expose-Headers`` (the request id and rate-limit headers).
  Answers to other origins carry no CORS headers, and a request without ``Origin`` costs nothing here.

Credentials (cookies) are never allowed cross-origin (no ``Access-Control-Allow-Credentials``): a host's session
works from its own origin; other origins use keys.
"""

from __future__ import annotations

from collections.abc import Iterable

from .errors import PermissionDeniedError
from .origins import ANY_ORIGIN, OriginSet, normalize_origin
from .types import Send

__all__ = ["ALLOWED_REQUEST_HEADERS", "DEFAULT_MAX_AGE", "EXPOSED_HEADERS", "CORSPolicy"]

DEFAULT_MAX_AGE = 600
#: Request headers a preflight may ask for, besides any ``x-stainless-*`` (the OpenAI SDKs' telemetry headers).
ALLOWED_REQUEST_HEADERS = frozenset(
    {
        "accept",
        "accept-language",
        "authorization",
        "content-language",
        "content-type",
        "idempotency-key",
        "openai-beta",
        "openai-organization",
        "openai-project",
        "range",
        "x-request-id",
    }
)
_ALLOWED_PREFIX = "x-stainless-"
#: Response headers a page may read: the request id, timing, and the rate-limit headers.
EXPOSED_HEADERS = (
    "x-request-id",
    "openai-processing-ms",
    "retry-after",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "content-disposition",
    "content-range",
)
_METHODS = b"GET, POST, DELETE"
#: Longest ``Access-Control-Request-Headers`` read, and most names in it; beyond either the preflight is refused.
MAX_REQUEST_HEADERS_LENGTH = 4096
MAX_REQUEST_HEADER_NAMES = 64


class CORSPolicy:
    """The app's allowed origins and the headers it answers them with; built once, at construction.

    ``ValueError`` for a bad origin (see :func:`~ozwell_asgi.origins.normalize_origin`) or a negative max age.
    """

    __slots__ = ("_expose", "_max_age", "origins", "trusted")

    def __init__(self, origins: Iterable[str] | str = (), *, max_age: int = DEFAULT_MAX_AGE) -> None:
        if isinstance(origins, str):
            origins = [origins]
        if max_age < 0:
            raise ValueError("cors_max_age must be >= 0")
        self.origins = OriginSet(normalize_origin(o, allow_any=True) for o in origins)
        #: The origins named explicitly (``*`` aside): those trusted for host-authenticated state changes.
        self.trusted = OriginSet(o for o in self.origins if o != ANY_ORIGIN)
        self._max_age = str(max_age).encode()
        self._expose = ", ".join(EXPOSED_HEADERS).encode()

    def headers_for(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """What an answer to a request from ``origin`` (the raw ``Origin`` header) carries: nothing unless allowed."""
        if not self.origins or not self.origins.allows(origin.decode("latin-1")):
            return []
        return [
            (b"access-control-allow-origin", origin),
            (b"vary", b"Origin"),
            (b"access-control-expose-headers", self._expose),
        ]

    async def preflight(self, origin: bytes, headers: dict[bytes, bytes], send: Send) -> None:
        """Answer a preflight: 204 for an allowed origin asking for allowed headers, else a 403 raised."""
        if not self.origins or not self.origins.allows(origin.decode("latin-1")):
            shown = origin[:100].decode("latin-1").encode("unicode_escape").decode()
            raise PermissionDeniedError(f"The origin '{shown}' is not allowed to call this API from a browser.")
        requested = headers.get(b"access-control-request-headers", b"")
        if len(requested) > MAX_REQUEST_HEADERS_LENGTH:
            raise PermissionDeniedError("Access-Control-Request-Headers is too long.")
        names = [n.strip().lower() for n in requested.split(b",") if n.strip()]
        if len(names) > MAX_REQUEST_HEADER_NAMES:
            raise PermissionDeniedError("Access-Control-Request-Headers names too many headers.")
        for name in names:
            text = name.decode("latin-1")
            if text not in ALLOWED_REQUEST_HEADERS and not text.startswith(_ALLOWED_PREFIX):
                shown = text[:100].encode("unicode_escape").decode()
                raise PermissionDeniedError(f"The request header '{shown}' is not allowed from a browser.")
        answer = [
            (b"access-control-allow-methods", _METHODS),
            (b"access-control-max-age", self._max_age),
            (b"content-length", b"0"),
        ]
        if names:
            answer.append((b"access-control-allow-headers", b", ".join(names)))
        await send({"type": "http.response.start", "status": 204, "headers": answer})
        await send({"type": "http.response.body", "body": b""})
