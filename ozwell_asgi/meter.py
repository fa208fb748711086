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

import anyio

from .protocols import RateLimiter
from .ratelimit import rate_limit_header_bytes
from .types import Principal, Reservation

__all__ = ["Meter"]

log = logging.getLogger("ozwell_asgi")

# What every billable call costs at least, reserved before its body is read: a call on a spent token budget is
# refused then. Any chat prompt counts more than this (3 tokens prime the reply).
TOKEN_FLOOR = 1


class Meter:
    """The reservation of one billable call. Build it with :meth:`admit` (``Services.meter`` does)."""

    __slots__ = ("_limiter", "_settled", "reservation")

    def __init__(self, limiter: RateLimiter, reservation: Reservation) -> None:
        self._limiter = limiter
        self._settled = False
        self.reservation = reservation

    @classmethod
    async def admit(cls, limiter: RateLimiter, principal: Principal, floor: int = TOKEN_FLOOR) -> Meter:
        """Take one request and ``floor`` tokens on ``principal``'s limits, or raise 429 (or 503) taking nothing."""
        return cls(limiter, await limiter.reserve(principal.key_id, principal.quota, floor))

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
        """The rate-limit headers as they stand now (ASGI pairs)."""
        return rate_limit_header_bytes(self.reservation)

    async def settle(self, used: int, *, shield: bool = True) -> None:
        """Charge ``used`` tokens (at most what was reserved) instead of the reservation; once; never raises.

        ``shield`` (the default) lets it finish while the call is being cancelled (a client gone mid-stream); the
        last step of a plain completion skips that cost."""
        if self._settled:
            return
        if shield:
            with anyio.CancelScope(shield=True):
                await self.settle(used, shield=False)
            return
        self._settled = True
        reservation = self.reservation
        try:
            await self._limiter.settle(reservation, min(max(used, 0), reservation.tokens_reserved))
        except Exception:  # settling must never turn an answer into an error
            log.exception("rate limiter settle failed")
