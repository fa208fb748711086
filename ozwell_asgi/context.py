"""What every route is given: the app's dependencies and settings, built once at construction."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from starlette.requests import Request

from .auth import Authenticator, KeyManager, model_allowed, require_reach, require_scope
from .background import BackgroundRuns
from .bodies import header, read_json_body
from .errors import NotFoundError, PermissionDeniedError
from .hostauth import HostAuth
from .meter import TOKEN_FLOOR, Meter, UsageSink
from .protocols import (
    ChatBackend,
    CompletesChat,
    EmbeddingBackend,
    FileStore,
    ModelCatalog,
    RateLimiter,
    ResponseStore,
    SourceFinder,
)
from .ratelimit import Plan, rate_limit_header_bytes
from .tokens import Tokenizer
from .types import Call, ModelInfo, Principal

__all__ = ["Services", "Settings", "header"]

CallEndpoint = Literal["chat.completions", "responses", "embeddings"]


@dataclass(frozen=True, slots=True)
class Settings:
    """Tunables of the request path, each a cap on what one request may make the server do.

    ``max_body_size``: largest JSON body accepted (bytes), else 413.
    ``body_idle_timeout``: seconds a body may stop arriving before the request is dropped with a 408.
    ``default_completion_reserve``: tokens reserved per choice for the answer when a request sets no
    ``max_tokens``/``max_completion_tokens``; it is also the bound the backend generates to (the reservation bounds
    the generation), and the reservation is reconciled with the real usage afterwards.
    ``max_messages``: messages in one chat request, else 400 (``param`` ``messages``).
    ``max_content_parts``: content parts summed over a chat request's messages, else 400.
    ``max_choices``: largest ``n`` (OpenAI's own limit is 128), else 400 (``param`` ``n``).
    ``call_timeout``: seconds a backend call may take; it is the call's ``deadline`` (a router stops trying
    fallbacks past it).
    ``stream_keepalive``: seconds a stream waits for the backend's first chunk before the response starts anyway,
    with ``: ping`` comments at this interval until the chunk comes, so intermediaries do not cut a slow stream
    (0: never; the client then waits for the first chunk, and a failure before it keeps its HTTP status).
    ``offload_parse_above``: bodies larger than this (bytes) are parsed and counted in a worker thread, so one large
    admitted request does not stall every other client on the event loop.
    ``max_model_patterns``: most model ids or globs a key's ``models`` may list (256), checked when a key is made.
    ``max_model_pattern_length``: longest model id or glob in a key's ``models``, in characters (256).
    ``max_key_origins``: most browser origins a scoped key's ``origins`` may list (64), checked when a key is made.
    ``max_file_size``: largest file ``POST /files`` accepts (bytes; 512 MiB, OpenAI's), else 413 as soon as the
    upload passes it (a larger ``Content-Length`` is refused before reading).
    ``max_input_items``: input items (or Ozwell's ``messages``) in one ``POST /responses``, else 400 (``param``
    ``input``); the whole conversation sent to the backend is held to ``max_messages`` too (``truncation: "auto"``
    drops its oldest turns instead).
    ``max_background_responses``: ``background: true`` responses in progress at once in one process, else 503.
    ``background_cancel_check``: seconds between a background run's looks at its stored record, between chunks, for
    a cancel or delete made by another worker (it also looks once before recording its result).
    ``max_sources``: passages ``include_sources`` asks the source finder for and gives the model.
    ``usage_queue_size``: usage events each usage hook's queue holds (10,000); past it new events are dropped for
    that hook and counted (``OzwellAPI.usage.dropped``).
    ``usage_drain_timeout``: seconds ``aclose`` (the lifespan's shutdown) waits for queued usage events to reach
    their hooks before dropping them (counted).
    """

    max_body_size: int = 32 * 1024 * 1024
    body_idle_timeout: float = 15.0
    default_completion_reserve: int = 1024
    max_messages: int = 2048
    max_content_parts: int = 4096
    max_choices: int = 128
    offload_parse_above: int = 1024 * 1024
    call_timeout: float = 600.0
    stream_keepalive: float = 15.0
    max_model_patterns: int = 256
    max_model_pattern_length: int = 256
    max_key_origins: int = 64
    max_file_size: int = 512 * 1024 * 1024
    max_input_items: int = 2048
    max_background_responses: int = 64
    background_cancel_check: float = 2.0
    max_sources: int = 5
    usage_queue_size: int = 10_000
    usage_drain_timeout: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "max_body_size",
            "default_completion_reserve",
            "max_messages",
            "max_content_parts",
            "max_choices",
            "max_model_patterns",
            "max_model_pattern_length",
            "max_key_origins",
            "max_file_size",
            "max_input_items",
            "max_background_responses",
            "max_sources",
            "usage_queue_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"Settings.{name} must be >= 1")
        if self.body_idle_timeout <= 0 or self.call_timeout <= 0:
            raise ValueError("Settings.body_idle_timeout and Settings.call_timeout must be > 0")
        if self.stream_keepalive < 0:
            raise ValueError("Settings.stream_keepalive must be >= 0")
        if self.background_cancel_check <= 0:
            raise ValueError("Settings.background_cancel_check must be > 0")
        if self.offload_parse_above < 0:
            raise ValueError("Settings.offload_parse_above must be >= 0")
        if self.usage_drain_timeout < 0:
            raise ValueError("Settings.usage_drain_timeout must be >= 0")


@dataclass(slots=True)
class Services:
    backend: ModelCatalog
    chat: ChatBackend | None
    completes: CompletesChat | None
    embeddings: EmbeddingBackend | None
    authenticator: Authenticator
    keys: KeyManager
    limiter: RateLimiter
    tokenizer: Tokenizer
    settings: Settings
    plans: Mapping[str, Plan]
    files: FileStore | None = None  # the owner-scoped file store; None: the app serves no /files routes
    on_usage: UsageSink | None = None  # takes each request's UsageEvent (the app's UsageHooks.emit); None: no hooks
    responses: ResponseStore | None = None  # stored responses of /responses; None: the app serves no /responses
    sources: SourceFinder | None = None  # include_sources on /responses; None: a 400 that says why
    background: BackgroundRuns | None = None  # background /responses runs of this process (with a response store)
    host: HostAuth | None = None  # the host's authenticators, tried before the API key; None: keys alone

    async def authenticate(self, request: Request, scope: str, *alternatives: str) -> Principal:
        """The caller, who must hold ``scope`` (or one of ``alternatives``); raises 401/403 in the envelope.

        The host's authenticators are asked first, then the API key. A principal restricted to origins or
        endpoints (a scoped key) must also be called from one of its origins and on one of its endpoints (403).
        """
        principal = None
        if self.host is not None:
            principal = await self.host.authenticate(request)
        if principal is None:
            principal = await self.authenticator.authenticate(header(request, b"authorization"))
        request.scope["ozwell.principal"] = principal  # the caller, for this request's usage event
        require_scope(principal, scope, *alternatives)
        if principal.origins is not None or principal.endpoints is not None:
            path: str = request.scope["path"]
            root: str = request.scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            require_reach(principal, header(request, b"origin"), path)
        return principal

    @staticmethod
    def request_id(request: Request) -> str:
        """The id of the request being served (the app sets it, or takes a valid ``x-request-id``)."""
        raw: bytes | None = request.scope.get("ozwell.request_id")
        return raw.decode() if raw is not None else ""

    def call(self, request: Request, principal: Principal, endpoint: CallEndpoint, max_tokens: int | None) -> Call:
        """The context of one backend call, with its deadline (``Settings.call_timeout`` from now)."""
        return Call(  # positional: request_id, principal, endpoint, deadline, max_tokens
            self.request_id(request),
            principal,
            endpoint,
            # anyio.current_time() on asyncio (the app's loop), without anyio's per-call backend lookup
            asyncio.get_running_loop().time() + self.settings.call_timeout,
            max_tokens,
        )

    async def meter(self, principal: Principal, request: Request, endpoint: CallEndpoint) -> Meter:
        """Admit one billable call for ``principal`` before its body is read (429 if its budgets are spent). The
        meter then emits the request's usage event when it settles (the app emits it for requests never metered)."""
        scope = request.scope
        limiter = self.limiter
        reservation = await limiter.reserve(principal.key_id, principal.quota, TOKEN_FLOOR)  # as Meter.admit does
        meter = Meter(
            limiter,
            reservation,
            principal,
            endpoint=endpoint,
            request_id=self.request_id(request),
            sink=self.on_usage,
            started=scope.get("ozwell.began"),
        )
        scope["ozwell.metered"] = True
        return meter

    async def read_json(self, request: Request, cap: int | None = None) -> bytes:
        """The request's JSON body within a size cap (413; the settings' ``max_body_size``, or a route's smaller
        ``cap``) and the idle timeout (408)."""
        settings = self.settings
        limit = settings.max_body_size if cap is None else min(cap, settings.max_body_size)
        return await read_json_body(request, limit, settings.body_idle_timeout)

    async def charge_request(self, principal: Principal) -> list[tuple[bytes, bytes]]:
        """Take one request and no tokens on the caller's limits (429 if spent); the rate-limit headers to send."""
        reservation = await self.limiter.reserve(principal.key_id, principal.quota, 0)
        await self.limiter.settle(reservation, 0)
        now = getattr(self.limiter, "now", None)  # the limiter's clock, if it has one, decides the reset headers
        return rate_limit_header_bytes(reservation, None if now is None else now())

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
