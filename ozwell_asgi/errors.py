"""The one exception hierarchy and the one renderer of OpenAI's error envelope.

Every non-2xx answer of ozwell_asgi is ``{"error": {"message", "type", "param", "code"}}``. Routes, auth, the
limiter, backends and stores raise an :class:`OzwellError` (or let any other exception escape, which becomes a
500 with no internals); :func:`error_body` and :func:`error_response_parts` are the only places that build it.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic_core import to_json

__all__ = [
    "AuthenticationError",
    "BadGatewayError",
    "InternalServerError",
    "InvalidRequestError",
    "MethodNotAllowedError",
    "NotFoundError",
    "OzwellError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "RateLimitError",
    "RequestTimeoutError",
    "ServiceUnavailableError",
    "GatewayTimeoutError",
    "UnsupportedMediaTypeError",
    "error_body",
]

Headers = Sequence[tuple[str, str]]


class _Unset:
    pass


_UNSET: object = _Unset()


class OzwellError(Exception):
    """An error with its wire form: HTTP status, OpenAI ``type``, ``code`` and ``param``.

    ``headers`` are added to the error response (``Retry-After``, ``Allow``, rate-limit headers...).
    The message is sent to the client as is: never put internals in it.
    """

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | object | None = _UNSET,
        type: str | None = None,
        status: int | None = None,
        headers: Headers = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not _UNSET:
            self.code = code  # type: ignore[assignment]
        if type is not None:
            self.type = type
        if status is not None:
            self.status = status
        self.headers: Headers = headers

    def to_dict(self) -> dict[str, object]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(status={self.status}, code={self.code!r}, param={self.param!r}, message={self.message!r})"


class InvalidRequestError(OzwellError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(OzwellError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(OzwellError):
    status = 403
    type = "permission_error"
    code = "insufficient_permissions"


class NotFoundError(OzwellError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowedError(OzwellError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeoutError(OzwellError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLargeError(OzwellError):
    status = 413
    type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaTypeError(OzwellError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimitError(OzwellError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class InternalServerError(OzwellError):
    status = 500
    type = "server_error"
    code = "internal_error"


class BadGatewayError(OzwellError):
    status = 502
    type = "server_error"
    code = "upstream_error"


class ServiceUnavailableError(OzwellError):
    status = 503
    type = "server_error"
    code = "service_unavailable"


class GatewayTimeoutError(OzwellError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"


def internal_error() -> OzwellError:
    """The error any unexpected exception becomes: nothing of the original is sent."""
    return InternalServerError("The server had an error while processing your request. Sorry about that!")


def as_ozwell_error(exc: BaseException) -> OzwellError:
    """Map any exception to the error sent for it (unexpected ones to a bare 500)."""
    return exc if isinstance(exc, OzwellError) else internal_error()


def error_body(exc: OzwellError) -> bytes:
    """The JSON envelope of ``exc``, as sent in a response body or an SSE ``data:`` line."""
    return to_json(exc.to_dict())
