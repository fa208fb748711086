"""GET /health: 200 {"status": "ok"} when the stores and the limiter answer, else 503 naming the one that does not;
no key, never rate limited. Against the machine's real Redis and PostgreSQL, and dead URLs for the 503s."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount, Route

from ozwell_asgi import LimitsRateLimiter, OzwellAPI
from ozwell_asgi.app import PrefixedApp
from ozwell_asgi.cli import ServeConfig, build_app
from ozwell_asgi.health import Health, HealthReport
from ozwell_asgi.stores.memory import MemoryKeyStore, MemoryResponseStore
from ozwell_asgi.types import APIKey
from tests.harness import raw_client, uvicorn_server

pytestmark = pytest.mark.anyio

DEAD_REDIS = "redis://127.0.0.1:1/0"
DEAD_POSTGRES = "postgresql+asyncpg://postgres@127.0.0.1:1/test"

ALL_OK = {"key_store": "ok", "file_store": "ok", "response_store": "ok", "rate_limiter": "ok"}


def config(**kwargs: Any) -> ServeConfig:
    return ServeConfig(**{"store_url": "memory://", "secret": "s" * 32, **kwargs})


async def health_of(app: Any) -> tuple[int, dict[str, Any]]:
    async with raw_client(app) as http:
        answer = await http.get("/health")
    return answer.status_code, answer.json()


async def aclose(app: PrefixedApp) -> None:
    await app.api.aclose()
    await app.api.rate_limiter.aclose()  # type: ignore[attr-defined]  # serve closes it at lifespan shutdown


# -- what serve serves --------------------------------------------------------------------------------------------


async def test_memory_stores_are_healthy_with_no_key_and_any_number_of_calls() -> None:
    app = build_app(config())
    async with raw_client(app) as http:
        answers = [await http.get("/health") for _ in range(30)]  # no key, and no budget to spend
        head = await http.head("/health")
        post = await http.post("/health")
        api = await http.get("/v1/models")
    assert {a.status_code for a in answers} == {200}
    assert answers[0].json() == {"status": "ok"}
    assert answers[0].headers["content-type"] == "application/json"
    assert answers[0].headers["cache-control"] == "no-store"
    assert (head.status_code, head.content) == (200, b"")
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
    assert post.json()["error"] == {
        "message": "Invalid method for URL (POST /health)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert api.status_code == 401  # the API itself still wants a key
    report = await app.api.health.check()
    assert report.checks == ALL_OK


async def test_redis_and_postgresql_stores_and_a_redis_limiter_are_healthy(redis_url: str, postgres_url: str) -> None:
    for store in (redis_url, postgres_url):
        app = build_app(config(store_url=store, limiter_url=redis_url))
        try:
            assert await health_of(app) == (200, {"status": "ok"})
            report = await app.api.health.check()
            assert report.checks == ALL_OK
        finally:
            await aclose(app)


async def test_a_dead_limiter_is_named_in_a_503(redis_url: str) -> None:
    for policy in ("closed", "open"):  # failing open keeps serving, but /health still says the limiter is down
        app = build_app(config(store_url=redis_url, limiter_url=DEAD_REDIS, on_limiter_error=policy))
        try:
            status, body = await health_of(app)
        finally:
            await aclose(app)
        assert status == 503
        assert body["status"] == "unavailable"
        assert body["checks"] == {**ALL_OK, "rate_limiter": "error"}
        assert body["error"] == {
            "message": "Not ready: rate_limiter did not answer.",
            "type": "server_error",
            "param": None,
            "code": "unhealthy",
        }


async def test_dead_stores_are_named_in_a_503_without_their_urls(redis_url: str) -> None:
    for store in (DEAD_REDIS, DEAD_POSTGRES):
        app = build_app(config(store_url=store, limiter_url=redis_url))
        async with raw_client(app) as http:
            answer = await http.get("/health")
        await aclose(app)
        assert answer.status_code == 503
        body = answer.json()
        assert body["checks"] == {
            "key_store": "error",
            "file_store": "error",
            "response_store": "error",
            "rate_limiter": "ok",
        }
        assert "key_store, file_store, response_store" in body["error"]["message"]
        assert "127.0.0.1" not in answer.text and "postgres" not in answer.text  # no URL, no exception text


async def test_health_over_a_real_socket(redis_url: str) -> None:
    app = build_app(config(store_url=redis_url, limiter_url=redis_url))
    with uvicorn_server(app, lifespan="on") as base:
        async with httpx.AsyncClient(base_url=base) as http:
            ok = await http.get("/health")
            elsewhere = await http.get("/healthz")
    assert (ok.status_code, ok.json()) == (200, {"status": "ok"})
    assert elsewhere.status_code == 404  # only /health is served outside /v1


# -- the checker ----------------------------------------------------------------------------------------------------


class CountingStore(MemoryKeyStore):
    """A host's key store with a ping that counts calls and can be made to hang or fail."""

    def __init__(self) -> None:
        super().__init__()
        self.pings = 0
        self.hang = asyncio.Event()
        self.hanging = False
        self.failing = False

    async def ping(self) -> None:
        self.pings += 1
        if self.failing:
            raise OSError("disk on fire")
        if self.hanging:
            await self.hang.wait()


async def test_concurrent_checks_share_one_probe_and_reuse_it_for_ttl() -> None:
    store = CountingStore()
    now = [0.0]
    api = OzwellAPI(key_store=store, secret="s" * 32)
    health = Health(api.health.components, ttl=1.0, clock=lambda: now[0])
    reports = await asyncio.gather(*(health.check() for _ in range(20)))
    assert store.pings == 1 and all(r.ok for r in reports)
    await health.check()
    assert store.pings == 1  # still fresh
    now[0] += 1.5
    store.failing = True
    report = await health.check()
    assert store.pings == 2 and report.checks["key_store"] == "error" and report.failing == ("key_store",)


async def test_a_probe_that_hangs_is_a_timeout(caplog: pytest.LogCaptureFixture) -> None:
    store = CountingStore()
    store.hanging = True
    api = OzwellAPI(key_store=store, secret="s" * 32)
    health = Health(api.health.components, timeout=0.001, ttl=0)
    report = await health.check()
    assert report.checks == {"key_store": "timeout", "file_store": "ok", "response_store": "ok", "rate_limiter": "ok"}
    assert report.status_code == 503
    await health.check()
    store.hanging = False
    assert (await health.check()).ok
    # Logged once when it went down, once when it came back: not once per probe.
    lines = [r.getMessage() for r in caplog.records if r.name == "ozwell_asgi"]
    assert lines == ["health: key_store did not answer within 0.001 s", "health: key_store answers again"]


async def test_a_store_without_ping_is_probed_with_a_lookup_and_responses_are_included() -> None:
    class NoPing:  # a host's key store: only the protocol's methods
        def __init__(self) -> None:
            self.inner = MemoryKeyStore()
            self.down = False

        async def get(self, key_id: str) -> APIKey | None:
            if self.down:
                raise ConnectionError("gone")
            return await self.inner.get(key_id)

        def __getattr__(self, name: str) -> Any:
            if name == "ping":
                raise AttributeError(name)
            return getattr(self.inner, name)

    store = NoPing()
    api = OzwellAPI(key_store=store, secret="s" * 32, file_store=None)  # type: ignore[arg-type]
    api.services.responses = MemoryResponseStore()  # filled in by the app once /responses lands
    api.health.ttl = 0
    assert (await api.health.check()).checks == {"key_store": "ok", "response_store": "ok", "rate_limiter": "ok"}
    store.down = True
    assert (await api.health.check()).checks["key_store"] == "error"


async def test_a_host_mounting_the_api_serves_health_itself() -> None:
    api = OzwellAPI(rate_limiter=LimitsRateLimiter("memory://"))
    host = Starlette(routes=[Route("/healthz", api.health), Mount("/v1", app=api)])
    async with raw_client(host) as http:
        answer = await http.get("/healthz")
    assert (answer.status_code, answer.json()) == (200, {"status": "ok"})
    report = await api.health.check()
    assert isinstance(report, HealthReport) and report.body() == {"status": "ok"}
