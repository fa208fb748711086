"""LimitsRateLimiter on in-process memory and on the machine's real Redis, plus plans, quotas and headers.

Outage tests run a private ``redis-server`` on a free port and kill it mid-test.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import pytest

from ozwell_asgi.errors import RateLimitError, ServiceUnavailableError
from ozwell_asgi.ratelimit import (
    DEFAULT_PLANS,
    LimitsRateLimiter,
    Plan,
    format_duration,
    quota_for,
    rate_limit_header_bytes,
    rate_limit_headers,
    validate_plan,
)
from ozwell_asgi.types import Quota, RateLimitWindow, Reservation
from tests.redis_server import PrivateRedis, running_private_redis

# Ten seconds into a window (window 1000 of 60 s): far from any boundary, whatever the real time is.
T0 = 60_000.0 + 10.0

MakeLimiter = Callable[..., LimitsRateLimiter]


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["memory", "redis"])
def storage(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(storage URL, namespace): memory, or the machine's Redis with a namespace private to the test."""
    if request.param == "memory":
        return "memory://", "ozwell"
    url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    return url, prefix + "rl"


@pytest.fixture
async def make_limiter(storage: tuple[str, str]) -> AsyncIterator[MakeLimiter]:
    created: list[LimitsRateLimiter] = []

    def make(**kwargs: Any) -> LimitsRateLimiter:
        url, namespace = storage
        limiter = LimitsRateLimiter(url, namespace=namespace, **kwargs)
        created.append(limiter)
        return limiter

    yield make
    for limiter in created:
        await limiter.aclose()


def header(exc_or_headers: RateLimitError | list[tuple[str, str]], name: str) -> str | None:
    headers = exc_or_headers.headers if isinstance(exc_or_headers, RateLimitError) else exc_or_headers
    found = [v for k, v in headers if k.lower() == name.lower()]
    assert len(found) <= 1, f"duplicate header {name}"
    return found[0] if found else None


# ------------------------------------------------------------------------------------------------ admission


@pytest.mark.anyio
async def test_exact_admission_and_429(make_limiter: MakeLimiter) -> None:
    clock = FakeClock()
    limiter = make_limiter(clock=clock)
    quota = Quota(rpm=5, tpm=10_000)
    for i in range(5):
        res = await limiter.reserve("k1", quota, 10)
        assert res.requests == RateLimitWindow(5, 4 - i, 60_060.0)
        assert res.tokens == RateLimitWindow(10_000, 10_000 - 10 * (i + 1), 60_060.0)
        assert not res.degraded
    with pytest.raises(RateLimitError) as info:
        await limiter.reserve("k1", quota, 10)
    exc = info.value
    assert exc.status == 429
    assert exc.code == "rate_limit_exceeded"
    assert exc.message == "Rate limit exceeded. Please retry after 50 seconds."
    assert header(exc, "Retry-After") == "50"
    assert header(exc, "retry-after-ms") == "50000"
    assert header(exc, "x-ratelimit-limit-requests") == "5"
    assert header(exc, "x-ratelimit-remaining-requests") == "0"
    assert header(exc, "x-ratelimit-reset-requests") == "50s"
    assert header(exc, "x-ratelimit-limit-tokens") == "10000"
    assert header(exc, "x-ratelimit-remaining-tokens") == "9950"
    assert header(exc, "X-RateLimit-Limit") == "5"
    assert header(exc, "X-RateLimit-Remaining") == "0"
    assert header(exc, "X-RateLimit-Reset") == "60060"
    # The rejected request took nothing: its tokens are not counted either.
    clock.now += 0.5
    with pytest.raises(RateLimitError):
        await limiter.reserve("k1", quota, 0)
    # Another subject has its own budget.
    other = await limiter.reserve("k2", quota, 10)
    assert other.requests is not None
    assert other.requests.remaining == 4


@pytest.mark.anyio
async def test_retry_after_is_at_least_one_second(make_limiter: MakeLimiter) -> None:
    clock = FakeClock(60_059.9995)
    limiter = make_limiter(clock=clock)
    await limiter.reserve("k", Quota(rpm=1, tpm=None), 0)
    with pytest.raises(RateLimitError) as info:
        await limiter.reserve("k", Quota(rpm=1, tpm=None), 0)
    assert header(info.value, "Retry-After") == "1"
    assert info.value.message == "Rate limit exceeded. Please retry after 1 seconds."
    assert int(header(info.value, "retry-after-ms") or "0") >= 1
    assert header(info.value, "x-ratelimit-reset-requests") == "1ms"
    assert header(info.value, "x-ratelimit-limit-tokens") is None


@pytest.mark.anyio
async def test_new_window_resets_budget(make_limiter: MakeLimiter) -> None:
    clock = FakeClock()
    limiter = make_limiter(clock=clock)
    quota = Quota(rpm=2, tpm=None)
    await limiter.reserve("k", quota, 0)
    await limiter.reserve("k", quota, 0)
    with pytest.raises(RateLimitError):
        await limiter.reserve("k", quota, 0)
    clock.now = 60_060.0  # the next window starts exactly on the minute
    res = await limiter.reserve("k", quota, 0)
    assert res.requests == RateLimitWindow(2, 1, 60_120.0)


@pytest.mark.anyio
async def test_token_budget_rejection_keeps_nothing(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=FakeClock())
    quota = Quota(rpm=10, tpm=1000)
    first = await limiter.reserve("k", quota, 800)
    assert first.tokens is not None
    assert first.tokens.remaining == 200
    with pytest.raises(RateLimitError) as info:
        await limiter.reserve("k", quota, 300)
    assert info.value.code == "rate_limit_exceeded"
    assert header(info.value, "x-ratelimit-remaining-tokens") == "200"
    assert header(info.value, "x-ratelimit-remaining-requests") == "9"
    assert header(info.value, "Retry-After") == "50"
    # Neither the request nor its 300 tokens were kept.
    after = await limiter.reserve("k", quota, 200)
    assert after.requests is not None
    assert after.requests.remaining == 8
    assert after.tokens is not None
    assert after.tokens.remaining == 0


@pytest.mark.anyio
async def test_request_larger_than_tpm_is_never_retryable(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=FakeClock())
    quota = Quota(rpm=10, tpm=1000)
    with pytest.raises(RateLimitError) as info:
        await limiter.reserve("k", quota, 1001)
    exc = info.value
    assert exc.status == 429
    assert exc.code == "request_too_large"
    assert "1001" in exc.message
    assert "1000" in exc.message
    assert header(exc, "x-should-retry") == "false"
    assert header(exc, "Retry-After") is None
    assert header(exc, "x-ratelimit-limit-tokens") == "1000"
    assert header(exc, "x-ratelimit-remaining-tokens") == "1000"
    assert header(exc, "x-ratelimit-remaining-requests") == "10"
    # Nothing was counted.
    res = await limiter.reserve("k", quota, 1000)
    assert res.requests is not None
    assert res.requests.remaining == 9
    assert res.tokens is not None
    assert res.tokens.remaining == 0


@pytest.mark.anyio
async def test_unlimited_budgets_are_not_counted(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=FakeClock())
    res = await limiter.reserve("k", Quota(rpm=None, tpm=None), 10**9)
    assert res.requests is None
    assert res.tokens is None
    assert not res.degraded
    assert rate_limit_headers(res) == []
    await limiter.settle(res, 5)
    assert res.settled

    only_requests = await limiter.reserve("k", Quota(rpm=3, tpm=None), 10**9)
    assert only_requests.tokens is None
    assert only_requests.requests == RateLimitWindow(3, 2, 60_060.0)

    only_tokens = await limiter.reserve("k", Quota(rpm=None, tpm=100), 40)
    assert only_tokens.requests is None
    assert only_tokens.tokens == RateLimitWindow(100, 60, 60_060.0)
    headers = dict(rate_limit_headers(only_tokens, now=T0))
    assert "x-ratelimit-limit-requests" not in headers
    assert headers["X-RateLimit-Limit"] == "100"
    assert headers["X-RateLimit-Remaining"] == "60"


# ----------------------------------------------------------------------------------------------- settlement


@pytest.mark.anyio
async def test_settle_refund_and_overage(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=FakeClock())
    quota = Quota(rpm=100, tpm=1000)
    res = await limiter.reserve("k", quota, 500)
    assert res.tokens is not None
    assert res.tokens.remaining == 500
    await limiter.settle(res, 100)  # refund 400
    assert res.settled
    await limiter.settle(res, 0)  # idempotent: no second refund
    probe = await limiter.reserve("k", quota, 0)
    assert probe.tokens is not None
    assert probe.tokens.remaining == 900

    res2 = await limiter.reserve("k", quota, 100)
    await limiter.settle(res2, 350)  # charge 250 more than reserved
    probe = await limiter.reserve("k", quota, 0)
    assert probe.tokens is not None
    assert probe.tokens.remaining == 1000 - 100 - 350


@pytest.mark.anyio
async def test_zero_token_request_passes_an_overspent_token_budget(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=FakeClock())
    quota = Quota(rpm=100, tpm=1000)
    res = await limiter.reserve("k", quota, 900)
    await limiter.settle(res, 1200)  # the answer ran 300 tokens over the whole budget
    probe = await limiter.reserve("k", quota, 0)  # e.g. GET /models: costs a request, no tokens
    assert probe.tokens is not None and probe.tokens.remaining == -200  # the header shows 0
    assert probe.requests is not None and probe.requests.remaining == 98
    with pytest.raises(RateLimitError):
        await limiter.reserve("k", quota, 1)


@pytest.mark.anyio
async def test_late_refund_never_credits_the_next_window(make_limiter: MakeLimiter) -> None:
    clock = FakeClock()
    limiter = make_limiter(clock=clock)
    quota = Quota(rpm=100, tpm=1000)
    old = await limiter.reserve("k", quota, 900)
    clock.now += 60  # the window rolled over before the request finished
    fresh = await limiter.reserve("k", quota, 600)
    assert fresh.tokens is not None
    assert fresh.tokens.remaining == 400
    await limiter.settle(old, 0)  # a 900-token refund, for the previous window
    probe = await limiter.reserve("k", quota, 0)
    assert probe.tokens is not None
    assert probe.tokens.remaining == 400
    with pytest.raises(RateLimitError):
        await limiter.reserve("k", quota, 401)


@pytest.mark.anyio
async def test_late_refund_real_clock(storage: tuple[str, str]) -> None:
    """Same rule with the real clock and one-second windows."""
    url, namespace = storage
    limiter = LimitsRateLimiter(url, namespace=namespace, window_seconds=1)
    try:
        quota = Quota(rpm=100, tpm=1000)
        old = await limiter.reserve("k", quota, 900)
        await anyio.sleep(max((old.window + 1) - time.time(), 0) + 0.05)
        fresh = await limiter.reserve("k", quota, 0)
        assert fresh.window == old.window + 1
        await limiter.settle(old, 0)
        probe = await limiter.reserve("k", quota, 0)
        if probe.window == fresh.window:  # unless this slow machine crossed another boundary
            assert probe.tokens is not None
            assert probe.tokens.remaining == 1000
            with pytest.raises(RateLimitError):
                await limiter.reserve("k", quota, 1001)
    finally:
        await limiter.aclose()


# ---------------------------------------------------------------------------------------------- concurrency


async def _hammer(limiters: list[LimitsRateLimiter], n: int, quota: Quota, tokens: int = 1) -> tuple[int, int]:
    admitted = rejected = 0

    async def one(limiter: LimitsRateLimiter) -> None:
        nonlocal admitted, rejected
        try:
            await limiter.reserve("shared", quota, tokens)
        except RateLimitError:
            rejected += 1
        else:
            admitted += 1

    async with anyio.create_task_group() as tg:
        for i in range(n):
            tg.start_soon(one, limiters[i % len(limiters)])
    return admitted, rejected


@pytest.mark.anyio
async def test_concurrent_reserves_admit_exactly_rpm(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=FakeClock())
    admitted, rejected = await _hammer([limiter], 200, Quota(rpm=50, tpm=None))
    assert (admitted, rejected) == (50, 150)


@pytest.mark.anyio
async def test_concurrent_reserves_admit_exactly_tpm(make_limiter: MakeLimiter) -> None:
    limiter = make_limiter(clock=FakeClock())
    admitted, rejected = await _hammer([limiter], 200, Quota(rpm=1000, tpm=700), tokens=10)
    assert (admitted, rejected) == (70, 130)
    probe = await limiter.reserve("shared", Quota(rpm=1000, tpm=700), 0)
    assert probe.tokens is not None
    assert probe.tokens.remaining == 0
    assert probe.requests is not None
    assert probe.requests.remaining == 1000 - 71


@pytest.mark.anyio
async def test_two_limiters_share_one_redis_exactly(redis_url: str, redis_prefix: str) -> None:
    clock = FakeClock()
    # 200 concurrent reservations: a generous timeout, so a loaded test machine cannot turn the exactness check
    # into an outage check (outages have their own tests, with their own timeouts).
    a = LimitsRateLimiter(redis_url, namespace=redis_prefix, clock=clock, timeout=5.0)
    b = LimitsRateLimiter(redis_url, namespace=redis_prefix, clock=clock, timeout=5.0)
    try:
        admitted, rejected = await _hammer([a, b], 200, Quota(rpm=50, tpm=100_000))
        assert (admitted, rejected) == (50, 150)
        # A refund through one instance is seen by the other.
        res = await a.reserve("other", Quota(rpm=10, tpm=100), 100)
        await a.settle(res, 30)
        seen = await b.reserve("other", Quota(rpm=10, tpm=100), 70)
        assert seen.tokens is not None
        assert seen.tokens.remaining == 0
        assert seen.requests is not None
        assert seen.requests.remaining == 8
    finally:
        await a.aclose()
        await b.aclose()


@pytest.mark.slow
@pytest.mark.anyio
async def test_redis_reserves_in_one_round_trip() -> None:
    """On Redis a reservation is one script call; on a private server the command counts are exact."""
    import redis as redis_sync

    with running_private_redis() as server:
        limiter = LimitsRateLimiter(server.url, namespace="one-trip")
        client = redis_sync.Redis.from_url(server.url)
        try:
            await limiter.reserve("warm", Quota(rpm=10, tpm=1000), 1)  # loads the script

            def commands() -> int:  # script calls: limits' own increments are scripts too, one per counter
                stats = client.info("commandstats")
                return sum(int(stats.get(name, {}).get("calls", 0)) for name in ("cmdstat_evalsha", "cmdstat_eval"))

            before = commands()
            reservation = await limiter.reserve("k", Quota(rpm=10, tpm=1000), 5)
            assert commands() - before == 1
            assert reservation.requests is not None and reservation.requests.remaining == 9
            assert reservation.tokens is not None and reservation.tokens.remaining == 995
        finally:
            client.close()
            await limiter.aclose()


@pytest.mark.anyio
async def test_keys_are_namespaced_and_expire(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aredis

    limiter = LimitsRateLimiter(redis_url, namespace=redis_prefix + "ns")
    client = aredis.Redis.from_url(redis_url)
    try:
        await limiter.reserve("subj", Quota(rpm=5, tpm=50), 5)
        keys = sorted([k.decode() async for k in client.scan_iter(match=f"*{redis_prefix}*")])
        assert len(keys) == 2
        for key in keys:
            assert key.startswith(f"LIMITS:{redis_prefix}ns:")
            ttl = await client.ttl(key)
            assert 0 < ttl <= 60 + 5
    finally:
        await client.aclose()
        await limiter.aclose()


# ------------------------------------------------------------------------------------------------- outages


@pytest.mark.slow
@pytest.mark.anyio
async def test_fail_closed_on_outage(private_redis: PrivateRedis) -> None:
    limiter = LimitsRateLimiter(private_redis.url, namespace="t", timeout=0.5)
    try:
        quota = Quota(rpm=10, tpm=1000)
        res = await limiter.reserve("k", quota, 10)
        assert not res.degraded
        private_redis.stop()
        for _ in range(2):
            start = time.monotonic()
            with pytest.raises(ServiceUnavailableError) as info:
                await limiter.reserve("k", quota, 10)
            assert time.monotonic() - start < 3
            assert info.value.status == 503
            assert info.value.code == "rate_limiter_unavailable"
            assert info.value.message == "Rate limiting is temporarily unavailable."
        start = time.monotonic()
        await limiter.settle(res, 1)  # never raises
        assert time.monotonic() - start < 3
    finally:
        await limiter.aclose()


@pytest.mark.slow
@pytest.mark.anyio
async def test_fail_closed_when_storage_hangs(private_redis: PrivateRedis) -> None:
    """A server that accepts but never answers is bounded by ``timeout``."""
    limiter = LimitsRateLimiter(private_redis.url, namespace="t", timeout=0.3)
    try:
        quota = Quota(rpm=10, tpm=1000)
        await limiter.reserve("k", quota, 10)
        private_redis.freeze()
        start = time.monotonic()
        with pytest.raises(ServiceUnavailableError):
            await limiter.reserve("k", quota, 10)
        assert time.monotonic() - start < 3
    finally:
        private_redis.stop()
        await limiter.aclose()


@pytest.mark.slow
@pytest.mark.anyio
async def test_fail_open_logs_once_and_recovers(private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ozwell_asgi.ratelimit")
    limiter = LimitsRateLimiter(private_redis.url, namespace="t", on_storage_error="open", timeout=0.5)

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == "ozwell_asgi.ratelimit" and r.levelno >= logging.WARNING]

    try:
        quota = Quota(rpm=3, tpm=1000)
        ok = await limiter.reserve("k", quota, 10)
        assert not ok.degraded
        private_redis.stop()
        degraded = []
        for _ in range(4):
            start = time.monotonic()
            res = await limiter.reserve("k", quota, 10)
            assert time.monotonic() - start < 3
            assert res.degraded
            assert res.requests is None
            assert res.tokens is None
            assert rate_limit_headers(res) == []
            degraded.append(res)
        for res in degraded:
            await limiter.settle(res, 0)
        await limiter.settle(ok, 0)  # a real reservation settled during the outage: swallowed, same outage
        assert len(warnings()) == 1

        private_redis.start()  # same port, empty data
        counted = [await limiter.reserve("k", quota, 10) for _ in range(3)]
        assert [r.degraded for r in counted] == [False, False, False]
        assert [r.requests.remaining for r in counted if r.requests] == [2, 1, 0]
        with pytest.raises(RateLimitError):
            await limiter.reserve("k", quota, 10)
        assert len(warnings()) == 1

        private_redis.stop()  # a second outage warns again, once
        assert (await limiter.reserve("k", quota, 10)).degraded
        assert (await limiter.reserve("k", quota, 10)).degraded
        assert len(warnings()) == 2
    finally:
        await limiter.aclose()


# ------------------------------------------------------------------------------------------ headers, plans


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (-3, "0s"),
        (0.0001, "1ms"),
        (0.013, "13ms"),
        (0.02, "20ms"),
        (0.999, "999ms"),
        (0.9999, "1s"),
        (1, "1s"),
        (1.2, "2s"),
        (59, "59s"),
        (60, "1m0s"),
        (61, "1m1s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3725, "1h2m5s"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


def test_rate_limit_headers_format() -> None:
    res = Reservation(
        subject="k",
        tokens_reserved=10,
        window=1,
        requests=RateLimitWindow(limit=20, remaining=19, reset_at=120.0),
        tokens=RateLimitWindow(limit=10_000, remaining=-5, reset_at=120.0),
    )
    assert rate_limit_headers(res, now=100.0) == [
        ("x-ratelimit-limit-requests", "20"),
        ("x-ratelimit-remaining-requests", "19"),
        ("x-ratelimit-reset-requests", "20s"),
        ("x-ratelimit-limit-tokens", "10000"),
        ("x-ratelimit-remaining-tokens", "0"),
        ("x-ratelimit-reset-tokens", "20s"),
        ("X-RateLimit-Limit", "20"),
        ("X-RateLimit-Remaining", "19"),
        ("X-RateLimit-Reset", "120"),
    ]
    res.degraded = True
    assert rate_limit_headers(res, now=100.0) == []


@pytest.mark.parametrize("now", [0.0, 59.0, 59.9995, 60.0, 100.0, 119.0, 119.2, 119.9999, 120.0, 130.0, 7300.0])
@pytest.mark.parametrize(
    ("requests", "tokens"),
    [
        (RateLimitWindow(20, 19, 120.0), RateLimitWindow(10_000, -5, 120.0)),
        (RateLimitWindow(20, -1, 120.0), None),
        (None, RateLimitWindow(10_000, 9_990, 120.0)),
        (RateLimitWindow(7, 3, 60.0), RateLimitWindow(50, 40, 7320.5)),  # budgets resetting at different times
    ],
)
def test_rate_limit_header_bytes_are_the_headers_as_bytes(
    now: float, requests: RateLimitWindow | None, tokens: RateLimitWindow | None
) -> None:
    res = Reservation(subject="k", tokens_reserved=1, window=1, requests=requests, tokens=tokens)
    expected = [(k.lower().encode(), v.encode()) for k, v in rate_limit_headers(res, now=now)]
    assert rate_limit_header_bytes(res, now=now) == expected
    assert rate_limit_header_bytes(res, now=now) == expected  # the memoised durations give the same text
    res.degraded = True
    assert rate_limit_header_bytes(res, now=now) == []


def test_quota_for_override_rules() -> None:
    assert quota_for("free", None, None) == Quota(rpm=20, tpm=10_000)
    assert quota_for("pro", None, None) == Quota(rpm=100, tpm=100_000)
    assert quota_for("enterprise", None, None) == Quota(rpm=None, tpm=None)
    assert quota_for("enterprise", 500, None) == Quota(rpm=500, tpm=None)
    assert quota_for("enterprise", None, 2_000_000) == Quota(rpm=None, tpm=2_000_000)
    assert quota_for("free", 5, None) == Quota(rpm=5, tpm=10_000)  # overrides win on any plan, up or down
    assert quota_for("free", 1000, 50_000) == Quota(rpm=1000, tpm=50_000)
    assert quota_for("pro", 0, None) == Quota(rpm=0, tpm=100_000)
    custom = {"team": Plan("team", rpm=7, tpm=None)}
    assert quota_for("team", None, 9, custom) == Quota(rpm=7, tpm=9)
    with pytest.raises(ValueError, match="unknown plan"):
        quota_for("platinum", None, None)
    with pytest.raises(ValueError, match="unknown plan"):
        quota_for("free", None, None, custom)
    with pytest.raises(ValueError, match="rpm"):
        quota_for("free", -1, None)


def test_plans() -> None:
    assert validate_plan("free") is DEFAULT_PLANS["free"]
    assert DEFAULT_PLANS["free"] == Plan("free", 20, 10_000)
    with pytest.raises(ValueError, match="unknown plan 'gold'"):
        validate_plan("gold")
    with pytest.raises(ValueError, match="tpm"):
        Plan("bad", rpm=1, tpm=-1)
    with pytest.raises(TypeError):
        DEFAULT_PLANS["x"] = Plan("x", 1, 1)  # type: ignore[index]


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="on_storage_error"):
        LimitsRateLimiter(on_storage_error="maybe")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="window_seconds"):
        LimitsRateLimiter(window_seconds=0)
    with pytest.raises(ValueError, match="scheme"):
        LimitsRateLimiter("127.0.0.1:6379")
    with pytest.raises(ValueError, match="unsupported rate-limit storage"):
        LimitsRateLimiter("nosuch://x")
