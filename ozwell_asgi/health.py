"""``GET /health``: whether the app's stores and rate limiter answer.

    report = await api.health.check()     # HealthReport: .ok, .checks {"key_store": "ok", ...}, .body()
    Route("/health", api.health)          # or serve it: an ASGI endpoint (``ozwell-asgi serve`` serves /health)

Each component is probed concurrently, each within ``timeout`` seconds: with its ``async def ping()`` when it has
one (every bundled store and :class:`~ozwell_asgi.ratelimit.LimitsRateLimiter` does), else with a lookup of an id
that cannot exist (a key store's ``get``, a file or response store's ``get``). A rate limiter without ``ping`` is
not probed (nothing it offers can be called without counting a request).

The answer is 200 ``{"status": "ok"}`` when every probe succeeds, else 503 with OpenAI's error envelope plus
``"status": "unavailable"`` and ``"checks"``, which says of each component ``"ok"``, ``"error"`` or ``"timeout"``
(never an exception's text: the endpoint needs no key). It is never rate limited. Checks are shared: concurrent
callers wait for one probe, and its report is reused for ``ttl`` seconds, so a flood of health checks costs the
stores at most one probe per component per ``ttl``. A component that starts failing is logged once (with the
exception), and once more when it recovers.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import MethodNotAllowedError, ServiceUnavailableError
from .types import Receive, Scope, Send

__all__ = ["DEFAULT_TIMEOUT", "Health", "HealthReport", "probe_for"]

log = logging.getLogger("ozwell_asgi")

DEFAULT_TIMEOUT = 2.0
Probe = Callable[[], Awaitable[Any]]

_FALLBACKS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "key_store": lambda store: store.get("key_health_probe"),
    "file_store": lambda store: store.get("", "file_health_probe"),
    "response_store": lambda store: store.get("", "resp_health_probe"),
}


def probe_for(name: str, component: object) -> Probe | None:
    """How to ask ``component`` (the app's ``name``) whether it answers: its ``ping``, else a lookup of an id that
    cannot exist for the kinds of store that have one; ``None``: it cannot be probed."""
    ping = getattr(component, "ping", None)
    if callable(ping):
        return ping  # type: ignore[no-any-return]
    fallback = _FALLBACKS.get(name)
    if fallback is None:
        return None
    return lambda: fallback(component)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """Each component's state: ``"ok"``, ``"error"`` (its probe raised) or ``"timeout"``."""

    checks: Mapping[str, str]

    @property
    def ok(self) -> bool:
        return all(state == "ok" for state in self.checks.values())

    @property
    def failing(self) -> tuple[str, ...]:
        return tuple(name for name, state in self.checks.items() if state != "ok")

    @property
    def status_code(self) -> int:
        return 200 if self.ok else 503

    def body(self) -> dict[str, Any]:
        """``{"status": "ok"}``, or the 503 envelope naming what does not answer."""
        if self.ok:
            return {"status": "ok"}
        names = ", ".join(self.failing)
        error = ServiceUnavailableError(f"Not ready: {names} did not answer.", code="unhealthy")
        return {**error.to_dict(), "status": "unavailable", "checks": dict(self.checks)}


class Health:
    """Probes the components ``components()`` names (read at each check, so stores added to the app later are
    included) and serves the report as an ASGI endpoint (``GET``/``HEAD``; other methods 405).

    ``timeout``: seconds each probe may take. ``ttl``: seconds a report is reused. ``clock``: monotonic seconds.
    """

    def __init__(
        self,
        components: Callable[[], Mapping[str, object]],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        ttl: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        self.components = components
        self.timeout = timeout
        self.ttl = ttl
        self.clock = clock
        self._report: HealthReport | None = None
        self._fresh_until = 0.0
        self._running: asyncio.Task[HealthReport] | None = None
        self._failing: set[str] = set()

    async def check(self) -> HealthReport:
        """The current report: a fresh one (at most ``timeout`` seconds), or the last one if under ``ttl`` old."""
        if self._report is not None and self.clock() < self._fresh_until:
            return self._report
        loop = asyncio.get_running_loop()
        running = self._running
        if running is None or running.done() or running.get_loop() is not loop:
            running = self._running = loop.create_task(self._probe_all())
        # Shielded: a caller that goes away does not cancel the probe the others wait for.
        return await asyncio.shield(running)

    async def _probe_all(self) -> HealthReport:
        probes = {name: probe_for(name, component) for name, component in self.components().items()}
        named = [(name, probe) for name, probe in probes.items() if probe is not None]
        states = await asyncio.gather(*(self._probe(name, probe) for name, probe in named))
        report = HealthReport(dict(zip((name for name, _ in named), states, strict=True)))
        self._report, self._fresh_until = report, self.clock() + self.ttl
        return report

    async def _probe(self, name: str, probe: Probe) -> str:
        try:
            async with asyncio.timeout(self.timeout):
                await probe()
        except TimeoutError:
            self._went_down(name, f"did not answer within {self.timeout:g} s", None)
            return "timeout"
        except Exception as exc:
            self._went_down(name, "failed", exc)
            return "error"
        if name in self._failing:
            self._failing.discard(name)
            log.warning("health: %s answers again", name)
        return "ok"

    def _went_down(self, name: str, how: str, exc: BaseException | None) -> None:
        if name not in self._failing:
            self._failing.add(name)
            log.warning("health: %s %s", name, how, exc_info=exc)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        method = scope.get("method", "GET")
        if method not in ("GET", "HEAD"):
            error = MethodNotAllowedError(f"Invalid method for URL ({method} {scope.get('path', '')})", code=None)
            status, body = error.status, error.to_dict()
            extra = [(b"allow", b"GET, HEAD")]
        else:
            report = await self.check()
            status, body, extra = report.status_code, report.body(), []
        payload = json.dumps(body, separators=(",", ":")).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"cache-control", b"no-store"),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else payload})
