"""Plans, quotas and the bundled :class:`~ozwell_asgi.protocols.RateLimiter`: fixed, clock-aligned windows on the
``limits`` library's async storage (in-process memory, Redis, or anything else ``limits`` supports).

Guarantees of :class:`LimitsRateLimiter`:

- Admission is exact across every process sharing one storage: each budget is one counter per window, moved only
  by atomic increments (``INCRBY`` in a Lua script on Redis), and a reservation is admitted only if the value its
  own increment returned is within the limit. ``N`` processes admit exactly ``rpm`` requests per window, never more.
- Windows are aligned to the clock (window ``w = floor(now / window_seconds)``) and every counter key names its
  window, so a settlement can only ever touch the window its reservation was taken in: a refund can give back tokens
  of the current window, and can never credit a later one.
- A rejected reservation takes nothing: what it added is subtracted again before the 429 is raised.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, cast

import anyio

from .errors import RateLimitError, ServiceUnavailableError
from .types import Quota, RateLimitWindow, Reservation

__all__ = [
    "DEFAULT_PLANS",
    "LimitsRateLimiter",
    "Plan",
    "format_duration",
    "quota_for",
    "rate_limit_headers",
    "validate_plan",
]

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------- plans


@dataclass(frozen=True, slots=True)
class Plan:
    """A plan's per-minute budgets; ``None`` means unlimited unless the key sets its own limit."""

    name: str
    rpm: int | None
    tpm: int | None

    def __post_init__(self) -> None:
        for field_name in ("rpm", "tpm"):
            value = getattr(self, field_name)
            if value is not None and value < 0:
                raise ValueError(f"plan {self.name!r}: {field_name} must be >= 0 or None, got {value}")


DEFAULT_PLANS: Mapping[str, Plan] = MappingProxyType(
    {
        "free": Plan("free", rpm=20, tpm=10_000),
        "pro": Plan("pro", rpm=100, tpm=100_000),
        "enterprise": Plan("enterprise", rpm=None, tpm=None),
    }
)


def validate_plan(plan_name: str, plans: Mapping[str, Plan] = DEFAULT_PLANS) -> Plan:
    """The plan called ``plan_name``; ``ValueError`` if ``plans`` has no such plan (call it when creating a key)."""
    plan = plans.get(plan_name)
    if plan is None:
        known = ", ".join(sorted(plans)) or "none"
        raise ValueError(f"unknown plan {plan_name!r} (known plans: {known})")
    return plan


def quota_for(
    plan_name: str,
    rpm_override: int | None = None,
    tpm_override: int | None = None,
    plans: Mapping[str, Plan] = DEFAULT_PLANS,
) -> Quota:
    """The quota of a key on ``plan_name``: each override that is set replaces the plan's limit, on any plan.

    ``ValueError`` for an unknown plan or a negative override.
    """
    plan = validate_plan(plan_name, plans)
    for field_name, value in (("rpm", rpm_override), ("tpm", tpm_override)):
        if value is not None and value < 0:
            raise ValueError(f"{field_name} must be >= 0 or None, got {value}")
    return Quota(
        rpm=rpm_override if rpm_override is not None else plan.rpm,
        tpm=tpm_override if tpm_override is not None else plan.tpm,
    )


# ------------------------------------------------------------------------------------------------------- headers


def format_duration(seconds: float) -> str:
    """A duration in OpenAI's header format, rounded up: ``"13ms"`` under a second, else ``"1s"``, ``"59s"``,
    ``"6m0s"``, ``"1h0m0s"``. Zero or negative is ``"0s"``."""
    if seconds <= 0:
        return "0s"
    ms = math.ceil(seconds * 1000 - 1e-6)  # tolerate float noise: 0.0130000001 s is 13ms
    if ms < 1000:
        return f"{max(ms, 1)}ms"
    total = math.ceil(ms / 1000)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def rate_limit_headers(res: Reservation, now: float | None = None) -> list[tuple[str, str]]:
    """The rate-limit headers for a reservation (sent on every response).

    Per budget that is limited: ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (reset as a duration,
    see :func:`format_duration`); then ``X-RateLimit-Limit``/``-Remaining``/``-Reset`` (reset as integer epoch
    seconds) for the request budget, or the token budget when requests are unlimited. Remaining is never negative.
    A degraded or wholly unlimited reservation has none.
    """
    req, tok = res.requests, res.tokens
    if res.degraded or (req is None and tok is None):
        return []
    if now is None:
        now = time.time()
    headers: list[tuple[str, str]] = []
    if req is not None:
        headers += (
            ("x-ratelimit-limit-requests", str(req.limit)),
            ("x-ratelimit-remaining-requests", str(max(req.remaining, 0))),
            ("x-ratelimit-reset-requests", format_duration(req.reset_at - now)),
        )
    if tok is not None:
        headers += (
            ("x-ratelimit-limit-tokens", str(tok.limit)),
            ("x-ratelimit-remaining-tokens", str(max(tok.remaining, 0))),
            ("x-ratelimit-reset-tokens", format_duration(tok.reset_at - now)),
        )
    generic = req if req is not None else cast(RateLimitWindow, tok)
    headers += (
        ("X-RateLimit-Limit", str(generic.limit)),
        ("X-RateLimit-Remaining", str(max(generic.remaining, 0))),
        ("X-RateLimit-Reset", str(math.ceil(generic.reset_at))),
    )
    return headers


_DURATION_BYTES: dict[int, bytes] = {}  # whole seconds (1 s and more) -> format_duration's text, filled as used
_DURATION_BYTES_MAX = 4096  # entries kept (a 60 s window needs 60); beyond that, formatted each time


def _duration_bytes(seconds: float) -> bytes:
    """:func:`format_duration` as bytes; whole seconds (what a reset over a second away shows) are memoised."""
    if seconds <= 0:
        return b"0s"
    ms = math.ceil(seconds * 1000 - 1e-6)
    if ms < 1000:
        return b"%dms" % max(ms, 1)
    total = -(-ms // 1000)
    text = _DURATION_BYTES.get(total)
    if text is None:
        text = format_duration(total).encode()
        if len(_DURATION_BYTES) < _DURATION_BYTES_MAX:
            _DURATION_BYTES[total] = text
    return text


def rate_limit_header_bytes(res: Reservation, now: float | None = None) -> list[tuple[bytes, bytes]]:
    """:func:`rate_limit_headers` as ASGI header pairs (lower-case names), for the response path: the same headers
    and values, formatted straight to bytes, each value once (the generic headers reuse the budget's)."""
    req, tok = res.requests, res.tokens
    if res.degraded or (req is None and tok is None):
        return []
    if now is None:
        now = time.time()
    headers: list[tuple[bytes, bytes]]
    if req is not None:
        limit = b"%d" % req.limit
        remaining = b"%d" % (req.remaining if req.remaining > 0 else 0)
        reset = _duration_bytes(req.reset_at - now)
        headers = [
            (b"x-ratelimit-limit-requests", limit),
            (b"x-ratelimit-remaining-requests", remaining),
            (b"x-ratelimit-reset-requests", reset),
        ]
        if tok is not None:
            headers += (
                (b"x-ratelimit-limit-tokens", b"%d" % tok.limit),
                (b"x-ratelimit-remaining-tokens", b"%d" % (tok.remaining if tok.remaining > 0 else 0)),
                (
                    b"x-ratelimit-reset-tokens",
                    reset if tok.reset_at == req.reset_at else _duration_bytes(tok.reset_at - now),
                ),
            )
        generic_reset = req.reset_at
    else:
        tok = cast(RateLimitWindow, tok)
        limit = b"%d" % tok.limit
        remaining = b"%d" % (tok.remaining if tok.remaining > 0 else 0)
        headers = [
            (b"x-ratelimit-limit-tokens", limit),
            (b"x-ratelimit-remaining-tokens", remaining),
            (b"x-ratelimit-reset-tokens", _duration_bytes(tok.reset_at - now)),
        ]
        generic_reset = tok.reset_at
    headers += (
        (b"x-ratelimit-limit", limit),
        (b"x-ratelimit-remaining", remaining),
        (b"x-ratelimit-reset", b"%d" % math.ceil(generic_reset)),
    )
    return headers


# ------------------------------------------------------------------------------------------------------- limiter

_REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+unix"})
_OTHER_REDIS_LIKE = frozenset({"redis+cluster", "redis+sentinel", "valkey", "valkeys", "valkey+unix"})
# Keys outlive their window by this much, so a settlement racing the window's end still finds its counter.
_EXPIRY_GRACE_SECONDS = 5
_REDIS_MAX_CONNECTIONS = 50


# One round trip for a whole reservation on Redis (what limits' per-key INCRBY script would need two or three for):
# take a request, then the tokens; undo and refuse if either is over. Atomic, so also never a transient over-count.
# KEYS: request counter, token counter. ARGV: expiry, rpm, tpm (-1 = unlimited), tokens.
# Returns {admitted 1|0, request count, token count} (the counts as they stand afterwards; -1 = not counted).
_RESERVE_LUA = """
local expiry, rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local req, tok = -1, -1
if rpm >= 0 then
  req = redis.call('incrby', KEYS[1], 1)
  if req == 1 then redis.call('expire', KEYS[1], expiry) end
  if req > rpm then
    redis.call('incrby', KEYS[1], -1)
    if tpm >= 0 then tok = tonumber(redis.call('get', KEYS[2]) or '0') end
    return {0, req - 1, tok}
  end
end
if tpm >= 0 then
  tok = redis.call('incrby', KEYS[2], tokens)
  if tok == tokens then redis.call('expire', KEYS[2], expiry) end
  if tok > tpm and tokens > 0 then
    redis.call('incrby', KEYS[2], -tokens)
    if rpm >= 0 then req = redis.call('incrby', KEYS[1], -1) end
    return {0, req, tok - tokens}
  end
end
return {1, req, tok}
"""


def _admitted(
    subject: str,
    tokens: int,
    window: int,
    reset_at: float,
    rpm: int | None,
    req_count: int | None,
    tpm: int | None,
    tok_count: int | None,
) -> Reservation:
    return Reservation(  # positional: subject, tokens_reserved, window, requests, tokens
        subject,
        tokens,
        window,
        None if rpm is None else RateLimitWindow(rpm, rpm - cast(int, req_count), reset_at),
        None if tpm is None else RateLimitWindow(tpm, tpm - cast(int, tok_count), reset_at),
    )


def _storage_config(storage_url: str) -> tuple[str, str]:
    """The ``limits`` async URL for ``storage_url`` (``memory://``, ``redis://``...) and its base scheme."""
    scheme = urllib.parse.urlsplit(storage_url).scheme.lower()
    if not scheme:
        raise ValueError("rate-limit storage URL has no scheme (expected e.g. memory:// or redis://host:6379/0)")
    base = scheme.removeprefix("async+")
    url = storage_url if scheme.startswith("async+") else f"async+{storage_url}"
    return url, base


def _storage_options(url: str, base: str, timeout: float) -> dict[str, Any]:
    """Constructor options for the ``limits`` storage: redis-py, bounded timeouts, a pool that waits when full."""
    options: dict[str, Any] = {}
    if base in _REDIS_SCHEMES or base in _OTHER_REDIS_LIKE:
        options.update(socket_timeout=timeout, socket_connect_timeout=timeout)
    if base in _REDIS_SCHEMES or base in ("redis+cluster", "redis+sentinel"):
        options["implementation"] = "redispy"
    if base in ("redis", "rediss"):
        from redis.asyncio import BlockingConnectionPool
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        # A bounded pool that queues callers (up to ``timeout``) instead of failing when a burst needs more
        # connections than it has; ``?max_connections=N`` in the URL overrides the size. No client-side retries:
        # an increment is applied at most once (a retried INCRBY whose reply was lost would count twice), and every
        # call stays within ``timeout``. Stale pooled connections are replaced on checkout.
        options["connection_pool"] = BlockingConnectionPool.from_url(
            url.removeprefix("async+"),
            max_connections=_REDIS_MAX_CONNECTIONS,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )
    return options


class _LocalCounters:
    """The counters of ``memory://``: this process's own, per window, moved by plain dict arithmetic.

    Each read-and-update runs with no ``await`` in between, so on the one event loop that uses it every step is
    atomic (what the storage's locks gave), at a fraction of the cost. Only the current window and the one before
    are kept: a settlement touches its own window only while it is current, so an older counter is never read.
    """

    __slots__ = ("_windows",)

    def __init__(self) -> None:
        self._windows: dict[int, tuple[dict[str, int], dict[str, int]]] = {}

    def window(self, window: int) -> tuple[dict[str, int], dict[str, int]]:
        """(requests, tokens) by subject in ``window``."""
        counters = self._windows.get(window)
        if counters is None:
            for old in [w for w in self._windows if w < window - 1]:
                del self._windows[old]
            counters = self._windows[window] = ({}, {})
        return counters


class LimitsRateLimiter:
    """Requests and tokens per window for each subject, on ``limits``' async storage.

    ``storage_url``: ``memory://`` (one process; asyncio only: counted in this process, with no storage calls) or
    ``redis://``/``rediss://`` (shared by every process using it, through redis-py), or any other storage ``limits``
    supports (``async+`` is added).
    ``namespace`` starts every key. ``on_storage_error``: ``"closed"`` raises ``ServiceUnavailableError`` when
    the storage is unreachable; ``"open"`` admits the request with a ``degraded`` reservation. Every storage call
    is bounded by ``timeout`` seconds. ``clock`` (epoch seconds) decides the window; tests may inject one.

    Guarantees: admission is exact across processes (see the module docstring); a reserve that raises 429 keeps
    nothing; a settlement only adjusts its own window's token counter, and only while that window is current (a
    refund arriving after the window ended is dropped: it can never credit the next window). An increment whose
    reply is lost to a timeout may or may not have been applied; that can only over-count (fail towards denying).
    """

    def __init__(
        self,
        storage_url: str = "memory://",
        *,
        namespace: str = "ozwell",
        on_storage_error: Literal["closed", "open"] = "closed",
        timeout: float = 0.5,
        window_seconds: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if on_storage_error not in ("closed", "open"):
            raise ValueError(f"on_storage_error must be 'closed' or 'open', got {on_storage_error!r}")
        if window_seconds < 1:
            raise ValueError("window_seconds must be >= 1")
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        self._url, self._base_scheme = _storage_config(storage_url)
        import limits.aio.storage  # noqa: F401  (registers the async schemes)
        from limits._storage_scheme import SCHEMES

        scheme = self._url.split("://", 1)[0]
        if scheme not in SCHEMES:
            raise ValueError(f"unsupported rate-limit storage {scheme!r}")
        self._require_driver()
        self._namespace = namespace
        self._fail_open = on_storage_error == "open"
        self._timeout = timeout
        self._window = window_seconds
        self._clock = clock
        self._storage: Any = None
        self._options: dict[str, Any] = {}
        self._storage_errors: tuple[type[BaseException], ...] = (OSError, TimeoutError)
        self._outage = False
        self._local = _LocalCounters() if self._base_scheme == "memory" else None
        self._reserve_script: Any = None  # the one-round-trip reservation, on plain Redis (see _RESERVE_LUA)
        self._prefixed: Callable[[str], str] = str

    def now(self) -> float:
        """The limiter's clock (epoch seconds): what decides windows, and what the rate-limit headers count from."""
        return self._clock()

    def _require_driver(self) -> None:
        """``ImportError`` naming the extra to install when the storage's driver is missing: at construction, so a
        server fails at startup rather than answering every request with a 500."""
        if self._base_scheme not in _REDIS_SCHEMES and self._base_scheme not in ("redis+cluster", "redis+sentinel"):
            return
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:
            from .stores.urls import missing_driver

            error = missing_driver(exc, f"the {self._base_scheme}:// rate limiter")
            if error is exc:
                raise
            raise error from exc

    # -- storage plumbing

    def _get_storage(self) -> Any:
        if self._storage is None:
            from limits.errors import StorageError
            from limits.storage import storage_from_string

            self._options = _storage_options(self._url, self._base_scheme, self._timeout)
            storage = storage_from_string(self._url, **self._options)
            base = storage.base_exceptions
            base_tuple = base if isinstance(base, tuple) else (base,)
            self._storage_errors = (OSError, TimeoutError, StorageError, *base_tuple)
            bridge: Any = getattr(storage, "bridge", None)
            if self._base_scheme in _REDIS_SCHEMES and hasattr(bridge, "get_connection"):
                # Same keys as limits' own calls (its prefix included), so settle's incr and this script agree.
                self._reserve_script = bridge.get_connection().register_script(_RESERVE_LUA)
                self._prefixed = bridge.prefixed_key
            self._storage = storage
        return self._storage

    async def _bounded(self, call: Awaitable[Any]) -> Any:
        """Await a storage call within ``timeout`` (``TimeoutError`` past it)."""
        # limits' async storages and redis-py run on asyncio only, so asyncio's own (cheaper) timeout is enough.
        async with asyncio.timeout(self._timeout):
            return await call

    async def _incr(self, key: str, expiry: int, amount: int) -> int:
        return int(await self._bounded(self._get_storage().incr(key, expiry, amount)))

    async def _peek(self, kind: str, window: int, subject: str) -> int | None:
        """The counter's value for the headers of a 429, or ``None`` if the storage does not answer."""
        if self._local is not None:
            return self._local.window(window)[kind == "tok"].get(subject, 0)
        try:
            return int(await self._bounded(self._get_storage().get(self._key(kind, window, subject))))
        except self._storage_errors as exc:
            self._storage_failed(exc)
            return None

    def _key(self, kind: str, window: int, subject: str) -> str:
        return f"{self._namespace}:{kind}:{self._window}:{window}:{subject}"

    def _storage_failed(self, exc: BaseException) -> None:
        if not self._outage:
            self._outage = True
            logger.warning(
                "rate-limit storage unavailable (%s: %s); %s until it recovers",
                type(exc).__name__,
                exc,
                "admitting requests unlimited" if self._fail_open else "refusing requests",
            )

    def _storage_ok(self) -> None:
        if self._outage:
            self._outage = False
            logger.info("rate-limit storage recovered; counting resumes")

    async def _undo(self, key: str, expiry: int, amount: int) -> None:
        """Best effort: give back ``amount``; a failure here only over-counts."""
        if amount == 0:
            return
        try:
            await self._incr(key, expiry, -amount)
        except self._storage_errors as exc:
            self._storage_failed(exc)

    # -- RateLimiter

    async def reserve(self, subject: str, quota: Quota, tokens: int) -> Reservation:
        """Take one request and ``tokens`` tokens in the current window, or raise and take nothing.

        Raises ``RateLimitError`` (429, ``rate_limit_exceeded``, with ``Retry-After``) when a budget is spent;
        ``RateLimitError`` with code ``request_too_large`` and ``x-should-retry: false`` when ``tokens`` exceeds the
        whole token budget (nothing is counted); ``ServiceUnavailableError`` on a storage outage when failing closed.
        On Redis one round trip (an atomic script over the same keys); on other storages two increments when both
        budgets are limited, one when one is; none when neither is.
        """
        tokens = max(int(tokens), 0)
        rpm, tpm = quota.rpm, quota.tpm
        if tpm is not None and tokens > tpm:
            raise await self._too_large(subject, rpm, tpm, tokens)
        now = self._clock()
        window = int(now // self._window)
        if rpm is None and tpm is None:
            return Reservation(subject=subject, tokens_reserved=tokens, window=window)
        reset_at = float((window + 1) * self._window)
        if self._local is not None:
            return self._reserve_local(subject, tokens, now, window, reset_at, rpm, tpm)
        expiry = math.ceil(reset_at - now) + _EXPIRY_GRACE_SECONDS
        req_key = self._key("req", window, subject)
        tok_key = self._key("tok", window, subject)
        req_count: int | None = None
        tok_count: int | None = None
        self._get_storage()
        if self._reserve_script is not None:
            return await self._reserve_in_one_trip(subject, tokens, now, window, reset_at, expiry, rpm, tpm)
        try:
            if rpm is not None:
                req_count = await self._incr(req_key, expiry, 1)
                self._storage_ok()
                if req_count > rpm:
                    await self._undo(req_key, expiry, 1)
                    req_count -= 1
                    if tpm is not None:
                        tok_count = await self._peek("tok", window, subject)
                    raise self._exceeded(now, reset_at, rpm, req_count, tpm, tok_count)
            if tpm is not None:
                try:
                    tok_count = await self._incr(tok_key, expiry, tokens)
                except self._storage_errors:
                    if req_count is not None:
                        await self._undo(req_key, expiry, 1)
                    raise
                self._storage_ok()
                if tok_count > tpm and tokens > 0:  # a request that takes no tokens is never refused on them
                    await self._undo(tok_key, expiry, tokens)
                    tok_count -= tokens
                    if req_count is not None:
                        await self._undo(req_key, expiry, 1)
                        req_count -= 1
                    raise self._exceeded(now, reset_at, rpm, req_count, tpm, tok_count)
        except self._storage_errors as exc:
            return self._outage_reservation(exc, subject, tokens, window)
        return _admitted(subject, tokens, window, reset_at, rpm, req_count, tpm, tok_count)

    def _reserve_local(
        self, subject: str, tokens: int, now: float, window: int, reset_at: float, rpm: int | None, tpm: int | None
    ) -> Reservation:
        """:meth:`reserve` on this process's counters: the same rules, with nothing to undo (nothing is written
        before both budgets are known to admit the call)."""
        requests, token_counts = self._local.window(window)  # type: ignore[union-attr]
        req_count: int | None = None
        tok_count: int | None = None
        if rpm is not None:
            req_count = requests.get(subject, 0) + 1
            if req_count > rpm:
                tok_count = None if tpm is None else token_counts.get(subject, 0)
                raise self._exceeded(now, reset_at, rpm, req_count - 1, tpm, tok_count)
        if tpm is not None:
            tok_count = token_counts.get(subject, 0) + tokens
            if tok_count > tpm and tokens > 0:  # a request that takes no tokens is never refused on them
                taken = None if req_count is None else req_count - 1
                raise self._exceeded(now, reset_at, rpm, taken, tpm, tok_count - tokens)
            token_counts[subject] = tok_count
        if req_count is not None:
            requests[subject] = req_count
        return _admitted(subject, tokens, window, reset_at, rpm, req_count, tpm, tok_count)

    def _outage_reservation(self, exc: BaseException, subject: str, tokens: int, window: int) -> Reservation:
        """The policy for an unreachable storage: a degraded reservation (fail open), or 503 (fail closed)."""
        self._storage_failed(exc)
        if self._fail_open:
            return Reservation(subject=subject, tokens_reserved=tokens, window=window, degraded=True)
        raise ServiceUnavailableError(
            "Rate limiting is temporarily unavailable.", code="rate_limiter_unavailable"
        ) from None

    async def _reserve_in_one_trip(
        self,
        subject: str,
        tokens: int,
        now: float,
        window: int,
        reset_at: float,
        expiry: int,
        rpm: int | None,
        tpm: int | None,
    ) -> Reservation:
        keys = [self._prefixed(self._key("req", window, subject)), self._prefixed(self._key("tok", window, subject))]
        args = [expiry, -1 if rpm is None else rpm, -1 if tpm is None else tpm, tokens]
        try:
            admitted, req_raw, tok_raw = await self._bounded(self._reserve_script(keys=keys, args=args))
        except self._storage_errors as exc:
            return self._outage_reservation(exc, subject, tokens, window)
        self._storage_ok()
        req_count = None if rpm is None else int(req_raw)
        tok_count = None if tpm is None or int(tok_raw) < 0 else int(tok_raw)
        if not int(admitted):
            raise self._exceeded(now, reset_at, rpm, req_count, tpm, tok_count)
        return _admitted(subject, tokens, window, reset_at, rpm, req_count, tpm, tok_count)

    async def reserve_tokens(self, reservation: Reservation, tokens: int) -> None:
        """Add ``tokens`` to an admitted reservation (its request is already counted), or raise and add nothing.

        The second step of a request whose size is known only after its body is read: ``reserve`` admitted the
        request (and a floor of tokens) before the body, this reserves what the parsed request needs. Raises
        ``RateLimitError`` (``rate_limit_exceeded``, or ``request_too_large`` when the reservation's total exceeds
        the whole budget); the request stays counted either way. If the window rolled over since ``reserve``, the
        tokens are taken in the current window and the reservation moves there (the old window's floor is left
        behind: it can never be refunded into the new one). On Redis one round trip.
        """
        tokens = max(int(tokens), 0)
        if reservation.settled:
            raise RuntimeError("reserve_tokens() on a settled reservation")
        budget = reservation.tokens
        if reservation.degraded or budget is None or tokens == 0:
            reservation.tokens_reserved += tokens
            return
        tpm = budget.limit
        now = self._clock()
        window = int(now // self._window)
        if window != reservation.window:
            reservation.window, reservation.tokens_reserved = window, 0
        if reservation.tokens_reserved + tokens > tpm:
            rpm = None if reservation.requests is None else reservation.requests.limit
            raise await self._too_large(reservation.subject, rpm, tpm, reservation.tokens_reserved + tokens)
        reset_at = float((window + 1) * self._window)
        admitted: bool | None
        if self._local is not None:
            token_counts = self._local.window(window)[1]
            tok_count = token_counts.get(reservation.subject, 0) + tokens
            admitted = tok_count <= tpm
            if admitted:
                token_counts[reservation.subject] = tok_count
            else:
                tok_count -= tokens
        else:
            tok_count, admitted = await self._reserve_tokens_in_storage(reservation, tokens, now, window, reset_at, tpm)
            if admitted is None:  # the storage failed and the policy is to fail open
                return
        if not admitted:  # the 429 shows the budget as it stands once the caller gives back what it holds
            requests = reservation.requests
            raise self._exceeded(
                now,
                reset_at,
                None if requests is None else requests.limit,
                None if requests is None else requests.limit - requests.remaining,
                tpm,
                tok_count - reservation.tokens_reserved,
            )
        reservation.tokens_reserved += tokens
        reservation.tokens = RateLimitWindow(tpm, tpm - tok_count, reset_at)

    async def _reserve_tokens_in_storage(
        self, reservation: Reservation, tokens: int, now: float, window: int, reset_at: float, tpm: int
    ) -> tuple[int, bool | None]:
        """Add ``tokens`` to the storage's token counter: (the counter as it stands, admitted). On a storage
        failure, 503 when failing closed; failing open, the reservation is degraded and ``admitted`` is None."""
        admitted: bool
        expiry = math.ceil(reset_at - now) + _EXPIRY_GRACE_SECONDS
        tok_key = self._key("tok", window, reservation.subject)
        self._get_storage()
        try:
            if self._reserve_script is not None:
                keys = [self._prefixed(self._key("req", window, reservation.subject)), self._prefixed(tok_key)]
                ok, _, raw = await self._bounded(self._reserve_script(keys=keys, args=[expiry, -1, tpm, tokens]))
                tok_count, admitted = int(raw), bool(int(ok))
            else:
                tok_count = await self._incr(tok_key, expiry, tokens)
                admitted = tok_count <= tpm
                if not admitted:
                    await self._undo(tok_key, expiry, tokens)
                    tok_count -= tokens
        except self._storage_errors as exc:
            self._outage_reservation(exc, reservation.subject, tokens, window)  # 503, or fail open:
            reservation.degraded = True
            reservation.tokens_reserved += tokens
            return 0, None
        self._storage_ok()
        return tok_count, admitted

    async def _too_large(self, subject: str, rpm: int | None, tpm: int, tokens: int) -> RateLimitError:
        """The error for a request that no window could ever admit; counts nothing, but reads the counters (best
        effort) so that this 429 carries the rate-limit headers too."""
        now = self._clock()
        window = int(now // self._window)
        reset_at = float((window + 1) * self._window)
        req_count = None if rpm is None else await self._peek("req", window, subject)
        tok_count = await self._peek("tok", window, subject)
        state = Reservation(
            subject=subject,
            tokens_reserved=0,
            window=window,
            requests=None if rpm is None or req_count is None else RateLimitWindow(rpm, rpm - req_count, reset_at),
            tokens=None if tok_count is None else RateLimitWindow(tpm, tpm - tok_count, reset_at),
        )
        return RateLimitError(
            f"Request too large: it needs {tokens} tokens but this key's limit is {tpm} tokens per minute."
            " Reduce the prompt or max_tokens.",
            code="request_too_large",
            headers=[("x-should-retry", "false"), *rate_limit_headers(state, now)],
        )

    @staticmethod
    def _exceeded(
        now: float, reset_at: float, rpm: int | None, req_count: int | None, tpm: int | None, tok_count: int | None
    ) -> RateLimitError:
        wait = max(reset_at - now, 0.001)
        seconds = max(math.ceil(wait), 1)
        state = Reservation(
            subject="",
            tokens_reserved=0,
            window=0,
            requests=None if rpm is None or req_count is None else RateLimitWindow(rpm, rpm - req_count, reset_at),
            tokens=None if tpm is None or tok_count is None else RateLimitWindow(tpm, tpm - tok_count, reset_at),
        )
        return RateLimitError(
            f"Rate limit exceeded. Please retry after {seconds} seconds.",
            headers=[
                ("Retry-After", str(seconds)),
                ("retry-after-ms", str(max(math.ceil(wait * 1000), 1))),
                *rate_limit_headers(state, now),
            ],
        )

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        """Charge ``used_tokens`` instead of what was reserved: refund the difference, or charge the overage.

        Idempotent (the second call is a no-op) and never raises on a storage failure (logged as a warning, once
        per outage). Only the reservation's own window is touched, and only while it is current: once that window
        has ended its counter no longer matters and a late refund is dropped rather than credited to a later window.
        Nothing to do for a degraded reservation or an unlimited token budget.
        """
        if reservation.settled:
            return
        reservation.settled = True
        if reservation.degraded or reservation.tokens is None:
            return
        delta = max(int(used_tokens), 0) - reservation.tokens_reserved
        if delta == 0:
            return
        now = self._clock()
        if int(now // self._window) != reservation.window:
            return
        if self._local is not None:
            token_counts = self._local.window(reservation.window)[1]
            token_counts[reservation.subject] = token_counts.get(reservation.subject, 0) + delta
            return
        reset_at = (reservation.window + 1) * self._window
        expiry = math.ceil(reset_at - now) + _EXPIRY_GRACE_SECONDS
        try:
            await self._incr(self._key("tok", reservation.window, reservation.subject), expiry, delta)
        except self._storage_errors as exc:
            self._storage_failed(exc)
            return
        self._storage_ok()

    async def aclose(self) -> None:
        """Close the storage's connections (Redis); the limiter reconnects if used again."""
        storage, self._storage = self._storage, None
        pool, self._options = self._options.get("connection_pool"), {}
        bridge = getattr(storage, "bridge", None)
        timer = getattr(storage, "timer", None)  # the memory storage's expiry task
        if timer is not None and not timer.done():
            timer.cancel()
        with anyio.move_on_after(self._timeout, shield=True):
            if bridge is not None:
                await bridge.get_connection().aclose()
            if pool is not None:
                await pool.disconnect()

    async def ping(self) -> None:
        """Raise unless the storage answers within ``timeout`` (``/health``), whatever ``on_storage_error`` says; the
        memory storage counts in this process and always answers. Nothing is counted."""
        if self._local is not None:
            return
        storage = self._get_storage()
        if self._reserve_script is not None:  # plain Redis: one PING on the limiter's own pool
            await self._bounded(storage.bridge.get_connection().ping())
        elif not await self._bounded(storage.check()):
            raise ConnectionError("the rate-limit storage does not answer")
