"""What every route is given: the app's dependencies and settings, built once at construction."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from starlette.requests import Request

from .auth import Authenticator, KeyManager, model_allowed, require_scope
from .errors import NotFoundError, PermissionDeniedError
from .protocols import ModelBackend, RateLimiter
from .ratelimit import Plan, rate_limit_header_bytes
from .tokens import Tokenizer
from .types import ModelInfo, Principal

__all__ = ["Services", "Settings", "header"]


def header(request: Request, name: bytes) -> str | None:
    """A request header (``name`` lower-case), from the one header dict the app builds per request."""
    headers: dict[bytes, bytes] | None = request.scope.get("ozwell.headers")
    if headers is None:
        value = request.headers.get(name.decode())
        return value
    raw = headers.get(name)
    return None if raw is None else raw.decode("latin-1")


@dataclass(frozen=True, slots=True)
class Settings:
    """Tunables of the request path.

    ``max_body_size``: largest JSON body accepted (bytes), else 413.
    ``default_completion_reserve``: tokens reserved for the answer when a request sets no ``max_tokens``; the
    reservation is reconciled with the real usage afterwards, so this only bounds concurrency, not cost.
    ``max_model_patterns``: most model ids or globs a key's ``models`` may list (256), checked when a key is made.
    ``max_model_pattern_length``: longest model id or glob in a key's ``models``, in characters (256).
    """

    max_body_size: int = 32 * 1024 * 1024
    default_completion_reserve: int = 1024
    max_model_patterns: int = 256
    max_model_pattern_length: int = 256


@dataclass(slots=True)
class Services:
    backend: ModelBackend
    authenticator: Authenticator
    keys: KeyManager
    limiter: RateLimiter
    tokenizer: Tokenizer
    settings: Settings
    plans: Mapping[str, Plan]

    async def authenticate(self, request: Request, scope: str, *alternatives: str) -> Principal:
        """The caller, who must hold ``scope`` (or one of ``alternatives``); raises 401/403 in the envelope."""
        principal = await self.authenticator.authenticate(header(request, b"authorization"))
        require_scope(principal, scope, *alternatives)
        return principal

    async def charge_request(self, principal: Principal) -> list[tuple[bytes, bytes]]:
        """Take one request and no tokens on the caller's limits (429 if spent); the rate-limit headers to send."""
        reservation = await self.limiter.reserve(principal.key_id, principal.quota, 0)
        await self.limiter.settle(reservation, 0)
        return rate_limit_header_bytes(reservation)

    async def find_model(self, principal: Principal, model: str, kind: str) -> ModelInfo:
        """The backend's model ``model``, if ``principal`` may use it: 403 if the key excludes it, 404 if unknown."""
        if not model_allowed(principal.models, model):
            raise PermissionDeniedError(f"This API key is not allowed to use the model `{model}`.", param="model")
        for info in await self.backend.list_models():
            if info.id == model:
                if info.kind != kind:
                    raise NotFoundError(
                        f"The model `{model}` is not a {kind} model and cannot be used on this endpoint.",
                        param="model",
                        code="model_not_found",
                    )
                return info
        raise NotFoundError(
            f"The model `{model}` does not exist or you do not have access to it.",
            param="model",
            code="model_not_found",
        )
