"""The meter: one billable call on the caller's rate limits, from admission to settlement.

    meter = await services.meter(principal)   # before the body: 429 if the request or token budget is spent
    ...                                       # read and parse the body, count the prompt
    await meter.reserve(tokens)               # what the parsed request needs: 429 (request_too_large) if over
    ... meter.headers ...                     # the rate-limit headers for the answer
    await meter.settle(used)                  # exactly once, whatever happened; shielded from cancellation

Guarantees: a request is admitted (its request counted, plus a floor of one token) before its body is read, so a
spent key is refused without reading, parsing or counting anything; ``settle`` runs at most once and never raises;
a call is never charged more than it reserved (the reservation is the bound on what it may generate).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import anyio

from .errors import OzwellError
from .protocols import RateLimiter
from .ratelimit import rate_limit_header_bytes
from .types import Principal, Reservation, Usage, UsageEvent

__all__ = ["Meter", "UsageSink", "status_of"]

UsageSink = Callable[[UsageEvent], None]


def status_of(exc: BaseException) -> int:
    """The status a call failing with ``exc`` answers: its error's, 499 when cancelled (the client left), else 500."""
    if isinstance(exc, OzwellError):
        return exc.status
    return 499 if isinstance(exc, anyio.get_cancelled_exc_class()) else 500


log = logging.getLogger("ozwell_asgi")

# What every billable call costs at least, reserved before its body is read: a call on a spent token budget is
# refused then. Any chat prompt counts more than this (3 tokens prime the reply).
TOKEN_FLOOR = 1


class Meter:
    """The reservation of one billable call. Build it with :meth:`admit` (``Services.meter`` does)."""

    __slots__ = ("_limiter", "_settled", "_sink", "_started", "endpoint", "principal", "request_id", "reservation")

    def __init__(
        self,
        limiter: RateLimiter,
        reservation: Reservation,
        principal: Principal,
        *,
        endpoint: str = "",
        request_id: str = "",
        sink: UsageSink | None = None,
        started: float | None = None,
    ) -> None:
        self._limiter = limiter
        self._settled = False
        self._sink = sink
        self._started = time.perf_counter() if started is None else started
        self.reservation = reservation
        self.principal = principal
        self.endpoint = endpoint
        self.request_id = request_id

    @classmethod
    async def admit(
        cls,
        limiter: RateLimiter,
        principal: Principal,
        floor: int = TOKEN_FLOOR,
        *,
        endpoint: str = "",
        request_id: str = "",
        sink: UsageSink | None = None,
        started: float | None = None,
    ) -> Meter:
        """Take one request and ``floor`` tokens on ``principal``'s limits, or raise 429 (or 503) taking nothing.

        ``started``: the ``time.perf_counter()`` instant the request arrived, from which the event's latency is
        measured (default: now)."""
        reservation = await limiter.reserve(principal.key_id, principal.quota, floor)
        return cls(
            limiter, reservation, principal, endpoint=endpoint, request_id=request_id, sink=sink, started=started
        )

    @property
    def reserved(self) -> int:
        return self.reservation.tokens_reserved

    async def reserve(self, tokens: int) -> None:
        """Reserve ``tokens`` in all (the floor included) for this call; 429 and nothing more taken if over.

        On any exception the caller still settles (the request stays counted, the tokens are refunded)."""
        extra = tokens - self.reservation.tokens_reserved
        if extra > 0:
            await self._limiter.reserve_tokens(self.reservation, extra)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The rate-limit headers as they stand now (ASGI pairs), by the limiter's clock if it has one."""
        now = getattr(self._limiter, "now", None)
        return rate_limit_header_bytes(self.reservation, None if now is None else now())

    async def settle(
        self,
        used: int,
        *,
        shield: bool = True,
        usage: Usage | None = None,
        model: str | None = None,
        status: int = 200,
    ) -> None:
        """Charge ``used`` tokens (at most what was reserved) instead of the reservation; once; never raises. Then
        the usage event (``usage`` split into prompt and completion when known) goes to the sink, if any (the app's
        :class:`~ozwell_asgi.usage.UsageHooks`: one append per hook, the hooks run later, off this path).

        ``shield`` (the default) lets it finish while the call is being cancelled (a client gone mid-stream); the
        last step of a plain completion skips that cost."""
        if self._settled:
            return
        if shield:
            with anyio.CancelScope(shield=True):
                await self.settle(used, shield=False, usage=usage, model=model, status=status)
            return
        self._settled = True
        reservation = self.reservation
        charged = min(max(used, 0), reservation.tokens_reserved)
        try:
            await self._limiter.settle(reservation, charged)
        except Exception:  # settling must never turn an answer into an error
            log.exception("rate limiter settle failed")
        if self._sink is not None:
            self._emit(used, usage, model, status, charged)

    def _emit(self, used: int, usage: Usage | None, model: str | None, status: int, charged: int) -> None:
        principal = self.principal
        event = UsageEvent(
            request_id=self.request_id,
            key_id=principal.key_id,
            owner=principal.owner,
            endpoint=self.endpoint,
            model=model,
            status=status,
            prompt_tokens=usage.prompt_tokens if usage is not None else max(used, 0),
            completion_tokens=usage.completion_tokens if usage is not None else 0,
            charged=charged,
            latency_ms=(time.perf_counter() - self._started) * 1000,
        )
        try:
            self._sink(event)  # type: ignore[misc]
        except Exception:  # a failing hook never breaks an answer
            log.exception("usage hook failed")
