"""Plain data that crosses the seams (protocols.py): keys, principals, quotas, models, chat results.

Pydantic lives at the wire edge (``wire/``); everything passed inward and between our own layers is one of these
frozen dataclasses. ASGI aliases are re-exported from Starlette so the whole package shares one spelling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "APIKey",
    "Call",
    "FilePurpose",
    "Page",
    "PageQuery",
    "Source",
    "StoredFile",
    "StoredResponse",
    "UsageEvent",
    "ASGIApp",
    "AssistantMessage",
    "ChatChoice",
    "ChatChunk",
    "ChatResult",
    "EmbeddingResult",
    "Message",
    "ModelInfo",
    "Principal",
    "Quota",
    "RateLimitWindow",
    "Receive",
    "Reservation",
    "Scope",
    "Send",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
]

PlanName = str  # "free" | "pro" | "enterprise" | any plan the host configures

# Scopes a key can hold. "api" calls the model endpoints; "admin" manages the keys of its own owner;
# "admin:global" manages every owner's keys.
SCOPE_API = "api"
SCOPE_ADMIN = "admin"
SCOPE_ADMIN_GLOBAL = "admin:global"
DEFAULT_SCOPES: tuple[str, ...] = (SCOPE_API,)


@dataclass(frozen=True, slots=True)
class APIKey:
    """A stored API key. The secret itself is never stored: only ``key_hash`` (HMAC-SHA256, hex).

    ``models`` is ``None`` for "every model"; otherwise exact model ids or ``fnmatch`` patterns.
    ``rpm``/``tpm`` override the plan's limits when set. Times are epoch seconds.

    ``origins`` and ``endpoints`` make a *scoped* key (secret ``ozw_scoped_…``, meant for browsers): ``origins``
    the canonical browser origins it may be used from (``None``: any, with or without an ``Origin`` header),
    ``endpoints`` the endpoint groups it may call (``"chat.completions"``, ``"responses"``, ``"embeddings"``,
    ``"files"``, ``"models"``; ``None``: every one). See docs/keys.md.
    """

    id: str
    key_hash: str
    owner: str
    name: str
    plan: PlanName = "free"
    rpm: int | None = None
    tpm: int | None = None
    models: tuple[str, ...] | None = None
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    created_at: int = 0
    expires_at: int | None = None
    revoked_at: int | None = None
    # First characters of the secret ("ozw_AbCd"), shown in listings so people can tell keys apart.
    hint: str = ""
    origins: tuple[str, ...] | None = None
    endpoints: tuple[str, ...] | None = None

    @property
    def scoped(self) -> bool:
        """Whether this is a scoped key (it restricts origins or endpoints; its secret starts ``ozw_scoped_``)."""
        return self.origins is not None or self.endpoints is not None

    def is_active(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)

    def status(self, now: float) -> Literal["active", "revoked", "expired"]:
        """``"revoked"``, ``"expired"`` or ``"active"`` (revocation wins over expiry)."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and now >= self.expires_at:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class Quota:
    """Per-minute budgets; ``None`` means unlimited."""

    rpm: int | None
    tpm: int | None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: resolved from an API key, or by one of the host's authenticators (docs/authentication.md).

    ``models`` is ``None`` for "every model"; from :class:`~ozwell_asgi.auth.Authenticator` it is a compiled
    :class:`~ozwell_asgi.auth.ModelPatterns`, so matching a model costs a set lookup and at most one regex match.
    ``origins`` (canonical origins, compiled to an :class:`~ozwell_asgi.origins.OriginSet` by the authenticator)
    and ``endpoints`` restrict where from and what the caller may call; ``None``: no restriction. ``key_id`` is the
    subject of the rate limits (a host user's is ``user:<owner>`` unless the host says otherwise).
    """

    key_id: str
    owner: str
    plan: PlanName
    quota: Quota
    models: tuple[str, ...] | None = None
    scopes: frozenset[str] = frozenset(DEFAULT_SCOPES)
    expires_at: int | None = None  # the key's expiry (epoch seconds); None: never
    origins: tuple[str, ...] | None = None
    endpoints: frozenset[str] | None = None

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes


@dataclass(frozen=True, slots=True)
class RateLimitWindow:
    """State of one budget (requests or tokens) after a reservation, for the rate-limit headers."""

    limit: int
    remaining: int
    reset_at: float  # epoch seconds when the window ends


@dataclass(slots=True)
class Reservation:
    """What :meth:`RateLimiter.reserve` took; give it back to :meth:`RateLimiter.settle` exactly once.

    ``requests``/``tokens`` are ``None`` when that budget is unlimited or the limiter is failing open.
    """

    subject: str
    tokens_reserved: int
    window: int  # the fixed window the reservation was taken in
    requests: RateLimitWindow | None = None
    tokens: RateLimitWindow | None = None
    degraded: bool = False  # True when the limiter's storage is down and the policy is fail-open
    settled: bool = False


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model a backend serves. ``kind`` tells which routes accept it."""

    id: str
    owned_by: str = "ozwell"
    created: int = 0
    kind: Literal["chat", "embedding"] = "chat"


@dataclass(frozen=True, slots=True)
class Call:
    """Who and what a backend call is for: given to every backend method with the request.

    ``deadline`` is an ``anyio.current_time()`` instant by which the call must be answered (``None``: no deadline);
    a router stops trying fallbacks past it. ``max_tokens`` is the bound the call may generate per choice: the
    tokens reserved for it (also set as the request's ``max_completion_tokens`` when the client gave none).
    """

    request_id: str
    principal: Principal
    endpoint: Literal["chat.completions", "responses", "embeddings"]
    deadline: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token usage. The details are OpenAI's ``prompt_tokens_details`` / ``completion_tokens_details`` as a backend
    reports them (cached, reasoning, audio tokens...), passed through as given; ``None`` when it reports none."""

    prompt_tokens: int
    completion_tokens: int
    prompt_tokens_details: Mapping[str, Any] | None = None
    completion_tokens_details: Mapping[str, Any] | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ToolCall:
    """A whole tool call. For a ``custom`` tool, ``arguments`` is its free-form ``input``."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    type: Literal["function", "custom"] = "function"


@dataclass(frozen=True, slots=True)
class AssistantMessage:
    """The answer of one choice. ``extra`` holds message fields we do not model (sent as they came)."""

    content: str | None
    tool_calls: tuple[ToolCall, ...] = ()
    refusal: str | None = None
    reasoning_content: str | None = None
    extra: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ChatChoice:
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls", "content_filter", "function_call"]
    logprobs: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class ChatResult:
    """A whole chat completion. ``usage`` is ``None`` when the backend leaves counting to us."""

    choices: tuple[ChatChoice, ...]
    usage: Usage | None = None
    model: str | None = None  # the model that answered, when it differs from the one asked for
    system_fingerprint: str | None = None


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A streamed piece of a tool call: the first piece of a call carries its ``id``, ``type`` and ``name``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None
    type: Literal["function", "custom"] | None = None


@dataclass(frozen=True, slots=True)
class ChatChunk:
    """One streamed piece of one choice; or, with ``usage`` set and nothing else, the final usage.

    The first chunk of a choice carries ``role="assistant"``; its last carries ``finish_reason``. What an upstream
    sends is kept: ``model`` (the model that answered), ``system_fingerprint``, ``reasoning_content`` and, in
    ``extra``, delta fields we do not model (sent in the delta as they came).
    """

    index: int = 0
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: tuple[ToolCallDelta, ...] = ()
    refusal: str | None = None
    finish_reason: str | None = None
    logprobs: dict[str, Any] | None = None
    usage: Usage | None = None
    reasoning_content: str | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    extra: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class EmbeddingResult:
    """One vector per input, in order. ``model``: the model that answered, when it differs from the one asked."""

    vectors: Sequence[Sequence[float]]
    prompt_tokens: int
    model: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


# --- pages (every list endpoint) and files ----------------------------------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class PageQuery:
    """One page of a list, as OpenAI pages: ``limit`` items after the id ``after`` (or before ``before``), in
    ``order`` of creation (``desc``: newest first). Stores order by ``(created_at, id)``, so pages are stable under
    concurrent creates; ``after``/``before`` name an item of the caller's own list (unknown: an empty page)."""

    limit: int = 20
    after: str | None = None
    before: str | None = None
    order: Literal["asc", "desc"] = "desc"


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """The items of one page, in the query's order, and whether more follow in that direction."""

    data: tuple[T, ...]
    has_more: bool


FilePurpose = Literal["assistants", "batch", "fine-tune", "vision", "user_data", "evals"]


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file's metadata. ``owner`` scopes it: another owner's id behaves exactly like an unknown one. ``bytes`` is
    the content's size once stored; times are epoch seconds."""

    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int = 0
    created_at: int = 0
    expires_at: int | None = None
    content_type: str = "application/octet-stream"


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """What one request used: one event per request, to the app's usage hooks (``OzwellAPI(on_usage=...)``).

    A billable call's (chat, embeddings, responses) is emitted when its meter settles, with its ``model`` and
    tokens; every other request's (models, files, keys, and refusals such as 401, 404, 429) when it ends, with
    ``model`` ``None`` and no tokens. ``endpoint`` names the route as the SDKs name the call
    (:func:`ozwell_asgi.usage.endpoint_name`: ``chat.completions``, ``models.list``...; ``unknown`` when no route
    matched); ``key_id`` and ``owner`` are ``""`` until a key is recognised. ``status`` is the HTTP status answered
    (for a stream, the status of how it ended; 499 when the client went away first); ``charged`` the tokens taken
    from the key's budget (at most what was reserved); ``latency_ms`` from the request's arrival to its settlement
    (a stream's last byte) or end.
    """

    request_id: str
    key_id: str
    owner: str
    endpoint: str
    model: str | None
    status: int
    prompt_tokens: int
    completion_tokens: int
    charged: int
    latency_ms: float


# --- responses (the Responses API) -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """One stored response of the Responses API, as :class:`~ozwell_asgi.protocols.ResponseStore` keeps it.

    ``response`` is the rendered ``Response`` object as sent (JSON-ready: dicts, lists, strings, numbers, bools,
    ``None``); ``input_items`` this turn's input items as ``GET /responses/{id}/input_items`` lists them (each with
    its ``id``), oldest first; ``conversation`` the chat-form messages of the whole conversation through this turn,
    the answer included and ``instructions`` excluded (they are not carried over, as at OpenAI), so chaining a new
    turn never re-derives history. ``owner`` scopes it: another owner's id behaves exactly like an unknown one.
    ``status`` mirrors ``response["status"]`` (``queued``, ``in_progress``, ``completed``, ``incomplete``,
    ``failed``, ``cancelled``) so a store can answer it without parsing ``response``.
    """

    id: str
    owner: str
    created_at: int
    status: str
    response: Mapping[str, Any]
    input_items: tuple[Mapping[str, Any], ...] = ()
    conversation: tuple[Mapping[str, Any], ...] = ()
    conversation_id: str | None = None
    key_id: str = ""


@dataclass(frozen=True, slots=True)
class Source:
    """A passage of one of the caller's files that ``include_sources`` gave the model, as the Response lists it.
    ``page`` is the 1-based page of a paged document (a PDF), ``None`` for unpaged text; ``score`` the cosine
    similarity of the passage to the question, in [-1, 1]."""

    file_id: str
    filename: str
    page: int | None
    excerpt: str
    score: float
