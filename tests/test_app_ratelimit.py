"""Rate limits end to end through OzwellAPI: headers, 429s, the official SDK's retries, token reservation and
reconciliation, exact admission under concurrency, Redis shared by two apps ("workers"), Redis outages, the key
cache across apps, and a real uvicorn socket.

Windows are clock-aligned 60 s windows (2 s for the retry test) on an injected clock (:class:`WindowClock`): it runs
at real speed from just after a window's start, so the counts a test asserts never straddle two windows and no test
waits for a fresh one. The key cache's TTL is measured on an injected clock too.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import httpx2
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from ozwell_asgi.context import Settings
from ozwell_asgi.ratelimit import LimitsRateLimiter
from ozwell_asgi.stores.cache import CachedKeyStore
from ozwell_asgi.stores.redis import RedisKeyStore
from ozwell_asgi.tokens import count_chat_prompt
from ozwell_asgi.types import (
    AssistantMessage,
    Call,
    ChatChoice,
    ChatChunk,
    ChatResult,
    Message,
    ModelInfo,
    Receive,
    Scope,
    Send,
    Usage,
)
from ozwell_asgi.wire.chat import parse_chat_request
from tests.harness import async_openai, raw_client, sync_openai, uvicorn_server
from tests.redis_server import PrivateRedis

SECRET = "s" * 32
MESSAGES = [{"role": "user", "content": "How many tokens does this question take?"}]
WINDOW = 60
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
)
_DURATION_RE = re.compile(r"(?:(\d+)ms|(?:(\d+)h)?(?:(\d+)m)?(\d+)s)")


# ------------------------------------------------------------------------------------------------------ helpers


class WindowClock:
    """Epoch seconds at real speed, starting ``into`` seconds after the start of the current ``window``: the
    limiter's clock in these tests, so every request of a test falls in one window without waiting for one."""

    def __init__(self, window: int = WINDOW, into: float = 1.0) -> None:
        self.window = window
        self._start = time.time() // window * window + into
        self._began = time.monotonic()

    def __call__(self) -> float:
        return self._start + (time.monotonic() - self._began)

    def window_end(self) -> int:
        """The end of the current window (epoch s): what X-RateLimit-Reset says."""
        return int(self() // self.window + 1) * self.window

    def limiter(self, storage_url: str = "memory://", **options: Any) -> LimitsRateLimiter:
        """A limiter on this clock."""
        return LimitsRateLimiter(storage_url, clock=self, window_seconds=self.window, **options)


class SteppedClock:
    """A monotonic clock moved by hand (the key cache's TTL is measured on it, never waited for)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def duration_seconds(text: str) -> float:
    """Parse OpenAI's reset format (``13ms``, ``59s``, ``1m0s``, ``1h0m0s``), checking it is canonical."""
    match = _DURATION_RE.fullmatch(text)
    assert match is not None, f"not a duration: {text!r}"
    ms, hours, minutes, secs = match.groups()
    if ms is not None:
        assert 0 < int(ms) < 1000, text
        return int(ms) / 1000
    if hours is not None or minutes is not None:
        assert int(secs) < 60 and (hours is None or int(minutes or 0) < 60), text
    total = int(hours or 0) * 3600 + int(minutes or 0) * 60 + int(secs)
    assert total < 60 or "m" in text, f"{text!r}: a minute or more is written with minutes"
    return total


def prompt_tokens(api: OzwellAPI, body: dict[str, Any]) -> int:
    """What the app estimates for the prompt of ``body`` (the first part of every reservation)."""
    return count_chat_prompt(api.tokenizer, parse_chat_request(json.dumps(body)))


def check_rate_headers(
    headers: Any,
    *,
    rpm: int | None,
    tpm: int | None,
    remaining_requests: int | None,
    remaining_tokens: int | None,
    reset: int,
    clock: WindowClock,
) -> None:
    """Every rate-limit header with its exact value; resets agree with the window's end ``reset`` (epoch s)."""
    now = clock()
    for kind, limit, remaining in (("requests", rpm, remaining_requests), ("tokens", tpm, remaining_tokens)):
        if limit is None:
            for prefix in ("limit", "remaining", "reset"):
                assert f"x-ratelimit-{prefix}-{kind}" not in headers
            continue
        assert headers[f"x-ratelimit-limit-{kind}"] == str(limit)
        assert headers[f"x-ratelimit-remaining-{kind}"] == str(remaining)
        left = duration_seconds(headers[f"x-ratelimit-reset-{kind}"])
        assert 0 < left <= WINDOW
        assert abs(left - (reset - now)) <= 1.5, (headers[f"x-ratelimit-reset-{kind}"], reset - now)
    generic = (rpm, remaining_requests) if rpm is not None else (tpm, remaining_tokens)
    assert headers["x-ratelimit-limit"] == str(generic[0])
    assert headers["x-ratelimit-remaining"] == str(generic[1])
    assert re.fullmatch(r"\d+", headers["x-ratelimit-reset"]), headers["x-ratelimit-reset"]
    assert int(headers["x-ratelimit-reset"]) == reset
    assert reset > now


def assert_no_rate_headers(headers: Any) -> None:
    names = [name.lower() for name in headers]
    assert [n for n in names if n.startswith(("x-ratelimit", "retry-after"))] == []


def check_rate_limited(response: httpx2.Response, reset: int, clock: WindowClock) -> int:
    """A 429 ``rate_limit_exceeded`` in the exact envelope, with consistent retry headers; returns Retry-After."""
    assert response.status_code == 429, response.text
    retry_after = response.headers["retry-after"]
    assert re.fullmatch(r"\d+", retry_after), retry_after
    seconds = int(retry_after)
    assert seconds >= 1
    assert abs(seconds - (reset - clock())) <= 1.5
    retry_ms = int(response.headers["retry-after-ms"])
    assert math.ceil(retry_ms / 1000) == seconds
    assert response.json() == {
        "error": {
            "message": f"Rate limit exceeded. Please retry after {seconds} seconds.",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert response.headers["x-request-id"].startswith("req_")
    return seconds


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


class Recorder:
    """An ASGI wrapper recording the status and headers of every response (to see what the SDK really got)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.responses: list[tuple[int, dict[str, str], float]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def recording_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
                self.responses.append((message["status"], headers, time.monotonic()))
            await send(message)

        await self.app(scope, receive, recording_send)

    @property
    def statuses(self) -> list[int]:
        return [status for status, _, _ in self.responses]


ANSWER = "held answer"


class GatedBackend:
    """Serves the chat model ``gated``: every request is held inside the backend (after its reservation was taken)
    until ``release`` is set; each answer reports ``usage``, the "real" usage the limiter must charge."""

    def __init__(self, usage: Usage) -> None:
        self.usage = usage
        self.release = anyio.Event()
        self.inside = 0

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="gated"),)

    async def complete_chat(self, request: Any, call: Call) -> ChatResult:
        self.inside += 1
        await self.release.wait()
        choice = ChatChoice(index=0, message=AssistantMessage(content=ANSWER), finish_reason="stop")
        return ChatResult(choices=(choice,), usage=self.usage)

    async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[ChatChunk]:
        yield ChatChunk(role="assistant", content="")
        self.inside += 1
        await self.release.wait()
        yield ChatChunk(content=ANSWER)
        yield ChatChunk(finish_reason="stop")
        yield ChatChunk(usage=self.usage)


async def wait_until(condition: Any) -> None:
    """Poll ``condition`` (counters of the test's own backend) for up to 5 s."""
    with anyio.fail_after(5):
        while not condition():  # noqa: ASYNC110 (the conditions are plain counters, not events)
            await anyio.sleep(0.005)


# ------------------------------------------------------------------------------- 1, 2: headers on every response


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("plan", "rpm_override", "tpm_override", "rpm", "tpm"),
    [
        ("free", None, None, 20, 10_000),
        ("pro", None, None, 100, 100_000),
        ("enterprise", 30, 50_000, 30, 50_000),
        ("free", 7, 700_000, 7, 700_000),  # overrides win, even above the plan's own limits
        ("enterprise", None, 20_000, None, 20_000),  # unlimited requests: the generic headers follow tokens
    ],
    ids=["free", "pro", "enterprise-overrides", "free-overrides", "enterprise-tpm-only"],
)
async def test_headers_on_every_response_and_the_429(
    plan: str, rpm_override: int | None, tpm_override: int | None, rpm: int | None, tpm: int
) -> None:
    clock = WindowClock()
    api = OzwellAPI(secret=SECRET, rate_limiter=clock.limiter())
    _, key = await api.keys.create(name="t", owner="o", plan=plan, rpm=rpm_override, tpm=tpm_override)
    client = async_openai(api, key, max_retries=0)
    body = {"model": "echo", "messages": MESSAGES, "max_tokens": 50}
    cost = prompt_tokens(api, body) + 50
    reset = clock.window_end()

    def expect(headers: Any, sent: int, tokens_left: int) -> None:
        check_rate_headers(
            headers,
            rpm=rpm,
            tpm=tpm,
            remaining_requests=None if rpm is None else rpm - sent,
            remaining_tokens=tokens_left,
            reset=reset,
            clock=clock,
        )

    # Non-streaming chat: the reservation (prompt + max_tokens) shows; then the real usage is charged instead.
    raw = await client.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES, max_tokens=50)
    completion = raw.parse()
    expect(raw.headers, 1, tpm - cost)
    assert completion.usage is not None
    used = completion.usage.total_tokens
    assert used < cost

    # Streaming chat: the headers arrive with the stream, before the first event.
    raw_stream = await client.chat.completions.with_raw_response.create(
        model="echo", messages=MESSAGES, max_tokens=50, stream=True, stream_options={"include_usage": True}
    )
    assert raw_stream.headers["content-type"].startswith("text/event-stream")
    expect(raw_stream.headers, 2, tpm - used - cost)
    chunks = [chunk async for chunk in raw_stream.parse()]
    final_usage = chunks[-1].usage
    assert final_usage is not None
    used += final_usage.total_tokens

    # GET /models costs one request and no tokens; both chats are now charged their real usage.
    raw_models = await client.models.with_raw_response.list()
    assert [m.id for m in raw_models.parse().data] == ["echo", "echo-embedding"]
    expect(raw_models.headers, 3, tpm - used)

    async with raw_client(api) as http:
        if rpm is not None:
            for sent in range(4, rpm + 1):
                response = await http.get("/models", headers=auth(key))
                assert response.status_code == 200
                expect(response.headers, sent, tpm - used)
            response = await http.post("/chat/completions", json=body, headers=auth(key))
        else:  # one token more than what is left, yet less than the whole budget
            too_much = {**body, "max_tokens": tpm - used - prompt_tokens(api, body) + 1}
            response = await http.post("/chat/completions", json=too_much, headers=auth(key))
        check_rate_limited(response, reset, clock)
        # The 429 carries the state of the window, and took nothing from it.
        check_rate_headers(
            response.headers,
            rpm=rpm,
            tpm=tpm,
            remaining_requests=None if rpm is None else 0,
            remaining_tokens=tpm - used,
            reset=reset,
            clock=clock,
        )
        if rpm is None:
            response = await http.get("/models", headers=auth(key))
            expect(response.headers, 0, tpm - used)

    # The SDK without retries raises the 429 as RateLimitError.
    refused = (
        client.models.list()
        if rpm is not None
        else client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=tpm - used)
    )
    with pytest.raises(openai.RateLimitError) as info:
        await refused
    assert info.value.status_code == 429
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.type == "rate_limit_error"
    await client.close()


# ------------------------------------------------------------------------------------- 3: the SDK's own retries


def test_sdk_retry_honours_retry_after() -> None:
    clock = WindowClock(window=2, into=0.05)  # at the beginning of a 2 s window; the SDK's own wait moves it on
    api = OzwellAPI(secret=SECRET, rate_limiter=clock.limiter())
    _, key = anyio.run(lambda: api.keys.create(name="t", owner="o", rpm=2))
    app = Recorder(PrefixedApp(api))
    messages: Any = MESSAGES
    with sync_openai(app, key, max_retries=3) as client:
        for _ in range(2):
            client.chat.completions.create(model="echo", messages=messages)
        began = time.monotonic()
        completion = client.chat.completions.create(model="echo", messages=messages)
        elapsed = time.monotonic() - began
    assert completion.choices[0].message.content == MESSAGES[0]["content"]
    assert app.statuses == [200, 200, 429, 200]
    _, rejected, rejected_at = app.responses[2]
    retry_after, retry_ms = int(rejected["retry-after"]), int(rejected["retry-after-ms"])
    assert 1 <= retry_after <= 2
    assert 1 <= retry_ms <= 2000
    assert math.ceil(retry_ms / 1000) == retry_after
    # The SDK waited what retry-after-ms said (it prefers it to Retry-After), and the retry landed in the new
    # window: its headers show a fresh budget.
    assert elapsed >= retry_ms / 1000 - 0.02
    assert app.responses[3][2] - rejected_at >= retry_ms / 1000 - 0.02
    assert elapsed < retry_ms / 1000 + 1.5
    assert app.responses[3][1]["x-ratelimit-remaining-requests"] == "1"

    with sync_openai(app, key, max_retries=0) as client:
        client.chat.completions.create(model="echo", messages=messages)  # the second of this window
        began = time.monotonic()
        with pytest.raises(openai.RateLimitError) as info:
            client.chat.completions.create(model="echo", messages=messages)
        assert time.monotonic() - began < 0.5
    assert info.value.code == "rate_limit_exceeded"
    assert info.value.status_code == 429
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert app.statuses[-2:] == [200, 429]


# ------------------------------------------------------------------------- 4: reservation, then reconciliation


@pytest.mark.anyio
async def test_tokens_reserved_while_in_flight_then_reconciled_to_real_usage() -> None:
    tpm = 3000
    real = Usage(prompt_tokens=9, completion_tokens=5)  # what the backend reports: differs from every estimate
    backend = GatedBackend(real)
    clock = WindowClock()
    api = OzwellAPI(secret=SECRET, backend=backend, rate_limiter=clock.limiter())
    _, key = await api.keys.create(name="t", owner="o", plan="free", tpm=tpm)
    body = {"model": "gated", "messages": MESSAGES, "max_tokens": 2000}
    reserved = prompt_tokens(api, body) + 2000
    assert reserved <= tpm < 2 * reserved
    client = async_openai(api, key, max_retries=0)
    reset = clock.window_end()
    first: list[Any] = []

    async def first_request() -> None:
        first.append(
            await client.chat.completions.with_raw_response.create(model="gated", messages=MESSAGES, max_tokens=2000)
        )

    async with raw_client(api) as http, anyio.create_task_group() as tg:
        tg.start_soon(first_request)
        await wait_until(lambda: backend.inside == 1)
        # While the first is inside the backend its whole reservation is held: the same request is refused on
        # tokens. It was admitted before its body was read, so it counts as a request; its tokens are given back.
        response = await http.post("/chat/completions", json=body, headers=auth(key))
        check_rate_limited(response, reset, clock)
        check_rate_headers(
            response.headers,
            rpm=20,
            tpm=tpm,
            remaining_requests=18,
            remaining_tokens=tpm - reserved,
            reset=reset,
            clock=clock,
        )
        probe = await http.get("/models", headers=auth(key))
        check_rate_headers(
            probe.headers,
            rpm=20,
            tpm=tpm,
            remaining_requests=17,
            remaining_tokens=tpm - reserved,
            reset=reset,
            clock=clock,
        )
        backend.release.set()
    raw = first[0]
    check_rate_headers(
        raw.headers, rpm=20, tpm=tpm, remaining_requests=19, remaining_tokens=tpm - reserved, reset=reset, clock=clock
    )
    assert raw.parse().usage.total_tokens == real.total_tokens

    async with raw_client(api) as http:
        # After it completed, only its real usage is charged: the reserved rest was refunded.
        probe = await http.get("/models", headers=auth(key))
        check_rate_headers(
            probe.headers,
            rpm=20,
            tpm=tpm,
            remaining_requests=16,
            remaining_tokens=tpm - real.total_tokens,
            reset=reset,
            clock=clock,
        )
        response = await http.post("/chat/completions", json=body, headers=auth(key))
        assert response.status_code == 200, response.text
        check_rate_headers(
            response.headers,
            rpm=20,
            tpm=tpm,
            remaining_requests=15,
            remaining_tokens=tpm - real.total_tokens - reserved,
            reset=reset,
            clock=clock,
        )
        probe = await http.get("/models", headers=auth(key))
        assert probe.headers["x-ratelimit-remaining-tokens"] == str(tpm - 2 * real.total_tokens)
    await client.close()


@pytest.mark.anyio
async def test_stream_holds_its_reservation_and_settles_to_the_final_usage_chunk() -> None:
    tpm = 3000
    real = Usage(prompt_tokens=8, completion_tokens=13)
    backend = GatedBackend(real)
    clock = WindowClock()
    api = OzwellAPI(secret=SECRET, backend=backend, rate_limiter=clock.limiter())
    _, key = await api.keys.create(name="t", owner="o", plan="enterprise", rpm=50, tpm=tpm)
    body = {"model": "gated", "messages": MESSAGES, "max_tokens": 2000}
    reserved = prompt_tokens(api, body) + 2000
    client = async_openai(api, key, max_retries=0)
    reset = clock.window_end()
    streamed: dict[str, Any] = {}

    async def stream_request() -> None:
        raw = await client.chat.completions.with_raw_response.create(
            model="gated", messages=MESSAGES, max_tokens=2000, stream=True, stream_options={"include_usage": True}
        )
        streamed["headers"] = raw.headers
        streamed["chunks"] = [chunk async for chunk in raw.parse()]

    async with raw_client(api) as http, anyio.create_task_group() as tg:
        tg.start_soon(stream_request)
        await wait_until(lambda: backend.inside == 1)  # mid-stream: the role chunk was produced
        response = await http.post("/chat/completions", json={**body, "stream": True}, headers=auth(key))
        check_rate_limited(response, reset, clock)
        assert response.headers["x-ratelimit-remaining-tokens"] == str(tpm - reserved)
        backend.release.set()
    check_rate_headers(
        streamed["headers"],
        rpm=50,
        tpm=tpm,
        remaining_requests=49,
        remaining_tokens=tpm - reserved,
        reset=reset,
        clock=clock,
    )
    chunks = streamed["chunks"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ANSWER
    final = chunks[-1]
    assert final.choices == []
    assert final.usage is not None
    assert final.usage.total_tokens == real.total_tokens
    async with raw_client(api) as http:
        probe = await http.get("/models", headers=auth(key))
    check_rate_headers(
        probe.headers,
        rpm=50,
        tpm=tpm,
        remaining_requests=47,  # the stream, the refused request (admitted before its body) and this probe
        remaining_tokens=tpm - final.usage.total_tokens,
        reset=reset,
        clock=clock,
    )
    await client.close()


# --------------------------------------------------------------------------- 5: larger than the whole budget


@pytest.mark.anyio
async def test_request_larger_than_the_token_budget_is_never_retried() -> None:
    clock = WindowClock()
    api = OzwellAPI(secret=SECRET, rate_limiter=clock.limiter())
    _, key = await api.keys.create(name="t", owner="o", plan="free", tpm=1000)
    body = {"model": "echo", "messages": MESSAGES, "max_tokens": 5000}
    needed = prompt_tokens(api, body) + 5000
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json=body, headers=auth(key))
        assert response.status_code == 429
        assert response.headers["x-should-retry"] == "false"
        assert "retry-after" not in response.headers
        assert response.json() == {
            "error": {
                "message": f"Request too large: it needs {needed} tokens but this key's limit is 1000 tokens per"
                " minute. Reduce the prompt or max_tokens.",
                "type": "rate_limit_error",
                "param": None,
                "code": "request_too_large",
            }
        }

    app = Recorder(PrefixedApp(api))
    client = async_openai(app, key)  # the SDK's default retries (2)
    began = time.monotonic()
    with pytest.raises(openai.RateLimitError) as info:
        await client.chat.completions.create(model="echo", messages=MESSAGES, max_tokens=5000)
    assert time.monotonic() - began < 1.0
    assert info.value.code == "request_too_large"
    assert app.statuses == [429]  # one attempt, no retry
    await client.close()

    # Each refusal counted as a request (admitted before its body was read), and took no tokens.
    async with raw_client(api) as http:
        probe = await http.get("/models", headers=auth(key))
    assert probe.headers["x-ratelimit-remaining-requests"] == "17"
    assert probe.headers["x-ratelimit-remaining-tokens"] == "1000"


# ------------------------------------------------------------------------------ 6: concurrency never overshoots


async def _concurrent_chats(
    apps: Sequence[Any],
    key: str,
    n: int,
    body: dict[str, Any],
    ok: list[httpx2.Response] | None = None,
    limited: list[httpx2.Response] | None = None,
) -> tuple[list[httpx2.Response], list[httpx2.Response]]:
    """``n`` chat requests at once, spread over ``apps``; returns (200 responses, 429 responses), which are also
    appended to ``ok`` and ``limited`` as they arrive when given."""
    ok = [] if ok is None else ok
    limited = [] if limited is None else limited
    clients = [raw_client(app) for app in apps]

    async def one(i: int) -> None:
        response = await clients[i % len(clients)].post("/chat/completions", json=body, headers=auth(key))
        if response.status_code == 200:
            ok.append(response)
        else:
            assert response.status_code == 429, response.text
            assert response.json()["error"]["code"] == "rate_limit_exceeded"
            limited.append(response)

    try:
        async with anyio.create_task_group() as tg:
            for i in range(n):
                tg.start_soon(one, i)
    finally:
        for client in clients:
            await client.aclose()
    return ok, limited


@pytest.mark.anyio
async def test_concurrent_requests_admit_exactly_rpm() -> None:
    backend = GatedBackend(Usage(prompt_tokens=10, completion_tokens=2))
    api = OzwellAPI(secret=SECRET, backend=backend, rate_limiter=WindowClock().limiter())
    # A token budget that never binds: only the request count decides.
    _, key = await api.keys.create(name="t", owner="o", plan="free", rpm=10, tpm=1_000_000)
    ok: list[httpx2.Response] = []
    limited: list[httpx2.Response] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(_concurrent_chats, [api], key, 50, {"model": "gated", "messages": MESSAGES}, ok, limited)
        # The admitted requests stay in flight until all 50 were decided.
        await wait_until(lambda: backend.inside + len(limited) == 50)
        assert backend.inside == 10
        backend.release.set()
    assert (len(ok), len(limited)) == (10, 40)
    # Each admitted request saw its own count: remaining 9, 8, ... 0, each exactly once.
    assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(10))
    assert {r.headers["x-ratelimit-remaining-requests"] for r in limited} == {"0"}


@pytest.mark.anyio
async def test_concurrent_requests_admit_exactly_the_reservations_that_fit() -> None:
    real = Usage(prompt_tokens=10, completion_tokens=2)
    backend = GatedBackend(real)
    api = OzwellAPI(secret=SECRET, backend=backend, rate_limiter=WindowClock().limiter())
    body = {"model": "gated", "messages": MESSAGES, "max_tokens": 100}
    cost = prompt_tokens(api, body) + 100
    fits = 7
    tpm = fits * cost + cost - 1  # room for 7 reservations, one token short of an 8th
    _, key = await api.keys.create(name="t", owner="o", plan="enterprise", tpm=tpm)
    ok: list[httpx2.Response] = []
    limited: list[httpx2.Response] = []

    async with anyio.create_task_group() as tg:
        tg.start_soon(_concurrent_chats, [api], key, 50, body, ok, limited)
        # Every admitted request is held inside the backend until all 50 were decided, so no refund can make room
        # for another.
        await wait_until(lambda: backend.inside + len(limited) == 50)
        assert backend.inside == fits
        assert ok == []
        backend.release.set()
    assert (len(ok), len(limited)) == (fits, 50 - fits)
    assert sorted(int(r.headers["x-ratelimit-remaining-tokens"]) for r in ok) == [
        tpm - i * cost for i in range(fits, 0, -1)
    ]
    async with raw_client(api) as http:
        probe = await http.get("/models", headers=auth(key))
    assert probe.headers["x-ratelimit-remaining-tokens"] == str(tpm - fits * real.total_tokens)


# ------------------------------------------------------------------------------- 7: Redis shared by two workers


@pytest.mark.services
@pytest.mark.anyio
async def test_two_apps_on_one_redis_admit_exactly_the_budget(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    namespace = redis_prefix + "rl"
    stores = [RedisKeyStore.from_url(redis_url, prefix=redis_prefix) for _ in range(2)]
    clock = WindowClock()  # one clock for both "workers", as NTP gives hosts
    limiters = [clock.limiter(redis_url, namespace=namespace, timeout=5.0) for _ in range(2)]
    real = Usage(prompt_tokens=10, completion_tokens=3)
    backends = [GatedBackend(real) for _ in range(2)]
    apps = [
        OzwellAPI(secret=SECRET, key_store=store, rate_limiter=limiter, backend=backend)
        for store, limiter, backend in zip(stores, limiters, backends, strict=True)
    ]
    inspector = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        rpm_key, rpm_secret = await apps[0].keys.create(name="rpm", owner="o", plan="free", rpm=10, tpm=1_000_000)
        body = {"model": "gated", "messages": MESSAGES, "max_tokens": 50}
        cost = prompt_tokens(apps[0], body) + 50
        fits = 5
        tpm = fits * cost + cost - 1
        tpm_key, tpm_secret = await apps[1].keys.create(name="tpm", owner="o", plan="enterprise", tpm=tpm)
        for backend in backends:
            backend.release.set()

        # Requests: worker A admits 6, then worker B only the 4 left of the same budget, even 20 at once.
        async with raw_client(apps[0]) as http:
            for left in range(9, 3, -1):
                response = await http.post("/chat/completions", json=body, headers=auth(rpm_secret))
                assert response.headers["x-ratelimit-remaining-requests"] == str(left)
        ok, limited = await _concurrent_chats(apps[1:], rpm_secret, 20, body)
        assert (len(ok), len(limited)) == (4, 16)
        assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == [0, 1, 2, 3]
        async with raw_client(apps[0]) as http:
            response = await http.get("/models", headers=auth(rpm_secret))
            assert response.status_code == 429
        # ... and 40 at once over both apps (a fresh key): 10 admitted in all, each count seen once.
        rpm_key2, rpm_secret2 = await apps[1].keys.create(name="rpm2", owner="o", plan="free", rpm=10, tpm=1_000_000)
        ok, limited = await _concurrent_chats(apps, rpm_secret2, 40, body)
        assert (len(ok), len(limited)) == (10, 30)
        assert sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in ok) == list(range(10))

        # Tokens: held inside both backends, exactly the reservations that fit are admitted over both apps.
        for backend in backends:
            backend.release = anyio.Event()
            backend.inside = 0
        ok, limited = [], []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_concurrent_chats, apps, tpm_secret, 30, body, ok, limited)
            await wait_until(lambda: sum(b.inside for b in backends) + len(limited) == 30)
            assert sum(b.inside for b in backends) == fits
            for backend in backends:
                backend.release.set()
        assert (len(ok), len(limited)) == (fits, 30 - fits)
        # Each admitted request saw the reservations before it, and at most the one-token floors that the 30
        # requests in flight take before their bodies are read.
        seen = sorted(int(r.headers["x-ratelimit-remaining-tokens"]) for r in ok)
        for remaining, expected in zip(seen, [tpm - i * cost for i in range(fits, 0, -1)], strict=True):
            assert expected - 30 <= remaining <= expected
        async with raw_client(apps[0]) as http:
            probe = await http.get("/models", headers=auth(tpm_secret))
        assert probe.headers["x-ratelimit-remaining-tokens"] == str(tpm - fits * real.total_tokens)

        # Every key the limiter wrote is under LIMITS:<redis_prefix>, with an expiry, so conftest removes it;
        # the key store's are under <redis_prefix>.
        for key in (rpm_key, rpm_key2, tpm_key):
            found = [k async for k in inspector.scan_iter(match=f"*{key.id}*")]
            limiter_keys = [k for k in found if k.startswith("LIMITS:")]
            assert limiter_keys, found
            assert all(k.startswith(f"LIMITS:{namespace}:") for k in limiter_keys), limiter_keys
            assert all(k.startswith(("LIMITS:" + redis_prefix, redis_prefix)) for k in found), found
            for k in limiter_keys:
                assert 0 < await inspector.ttl(k) <= WINDOW + 10
    finally:
        await inspector.aclose()
        for closeable in (*limiters, *stores):
            await closeable.aclose()


# --------------------------------------------------------------------------------------- 8: Redis outage policy


@pytest.mark.slow
@pytest.mark.anyio
async def test_outage_fails_closed_with_503(private_redis: PrivateRedis) -> None:
    limiter = LimitsRateLimiter(private_redis.url, namespace="t", on_storage_error="closed", timeout=0.5)
    api = OzwellAPI(secret=SECRET, rate_limiter=limiter)
    _, key = await api.keys.create(name="t", owner="o", plan="free")
    try:
        async with raw_client(api) as http:
            response = await http.post(
                "/chat/completions", json={"model": "echo", "messages": MESSAGES}, headers=auth(key)
            )
            assert response.status_code == 200
            assert response.headers["x-ratelimit-remaining-requests"] == "19"
            private_redis.stop()
            for method, path, body in (
                ("POST", "/chat/completions", {"model": "echo", "messages": MESSAGES}),
                ("POST", "/chat/completions", {"model": "echo", "messages": MESSAGES, "stream": True}),
                ("GET", "/models", None),
            ):
                began = time.monotonic()
                response = await http.request(method, path, json=body, headers={**auth(key), "x-request-id": "rid-1"})
                assert time.monotonic() - began < 3
                assert response.status_code == 503
                assert response.headers["content-type"] == "application/json"
                assert response.headers["x-request-id"] == "rid-1"
                assert_no_rate_headers(response.headers)
                assert response.json() == {
                    "error": {
                        "message": "Rate limiting is temporarily unavailable.",
                        "type": "server_error",
                        "param": None,
                        "code": "rate_limiter_unavailable",
                    }
                }
        client = async_openai(api, key, max_retries=0)
        began = time.monotonic()
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="echo", messages=MESSAGES)
        assert time.monotonic() - began < 3
        assert info.value.status_code == 503
        assert info.value.code == "rate_limiter_unavailable"
        await client.close()
    finally:
        await limiter.aclose()


@pytest.mark.slow
@pytest.mark.anyio
async def test_hung_storage_fails_closed_within_the_timeout(private_redis: PrivateRedis) -> None:
    """A Redis that accepts connections but never answers: the request still ends, with the 503, in bounded time."""
    limiter = LimitsRateLimiter(private_redis.url, namespace="t", timeout=0.3)
    api = OzwellAPI(secret=SECRET, rate_limiter=limiter)
    _, key = await api.keys.create(name="t", owner="o", plan="free")
    try:
        async with raw_client(api) as http:
            body = {"model": "echo", "messages": MESSAGES}
            assert (await http.post("/chat/completions", json=body, headers=auth(key))).status_code == 200
            private_redis.freeze()
            began = time.monotonic()
            with anyio.fail_after(5):
                response = await http.post("/chat/completions", json=body, headers=auth(key))
            assert time.monotonic() - began < 3
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "rate_limiter_unavailable"
            assert response.headers["x-request-id"].startswith("req_")
    finally:
        private_redis.stop()
        await limiter.aclose()


@pytest.mark.slow
@pytest.mark.anyio
async def test_outage_fails_open_without_headers_and_warns_once(
    private_redis: PrivateRedis, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ozwell_asgi")
    api = OzwellAPI(secret=SECRET, rate_limiter=private_redis.url, on_limiter_error="open")
    _, key = await api.keys.create(name="t", owner="o", plan="free", rpm=2)

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name.startswith("ozwell_asgi") and r.levelno >= logging.WARNING]

    try:
        async with raw_client(api) as http:
            response = await http.get("/models", headers=auth(key))
            assert response.headers["x-ratelimit-remaining-requests"] == "1"
            private_redis.stop()
            # More requests than the key's rpm: all admitted while the limiter is down, none with headers.
            for i in range(5):
                began = time.monotonic()
                if i % 2:
                    response = await http.post(
                        "/chat/completions",
                        json={"model": "echo", "messages": MESSAGES, "stream": True},
                        headers=auth(key),
                    )
                    assert response.text.endswith("data: [DONE]\n\n")
                else:
                    response = await http.post(
                        "/chat/completions", json={"model": "echo", "messages": MESSAGES}, headers=auth(key)
                    )
                    assert response.json()["choices"][0]["message"]["content"] == MESSAGES[0]["content"]
                assert time.monotonic() - began < 3
                assert response.status_code == 200
                assert_no_rate_headers(response.headers)
            response = await http.get("/models", headers=auth(key))
            assert response.status_code == 200
            assert_no_rate_headers(response.headers)
        assert len(warnings()) == 1, [r.getMessage() for r in warnings()]
        assert "rate-limit storage unavailable" in warnings()[0].getMessage()
    finally:
        await api.aclose()


# ------------------------------------------------------------------------- 9: the key cache across two apps


@pytest.fixture(params=["redis", "postgres"])
def shared_key_store(request: pytest.FixtureRequest) -> Any:
    """A factory of key stores that all see one backing store (as two processes would)."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        return lambda: RedisKeyStore.from_url(url, prefix=prefix)
    postgres: str = request.getfixturevalue("postgres_url")
    return lambda: postgres  # a URL: each app builds (and closes) its own SQLKeyStore


@pytest.mark.services
@pytest.mark.anyio
@pytest.mark.parametrize("ttl", [1.0, 0.0])
async def test_revocation_reaches_another_app_within_the_cache_ttl(shared_key_store: Any, ttl: float) -> None:
    stores = [shared_key_store(), shared_key_store()]
    api_a, api_b = (OzwellAPI(secret=SECRET, key_store=store, key_cache_ttl=ttl) for store in stores)
    clock = SteppedClock()
    for api in (api_a, api_b):
        if ttl > 0:
            assert isinstance(api.key_store, CachedKeyStore)  # the app's own cache, its TTL on a clock we move
            api.key_store.clock = clock
        else:
            assert not isinstance(api.key_store, CachedKeyStore)
    try:
        key, secret = await api_a.keys.create(name="t", owner="o", plan="pro")
        async with raw_client(api_a) as http_a, raw_client(api_b) as http_b:

            async def status(http: httpx2.AsyncClient) -> int:
                response = await http.get("/models", headers=auth(secret))
                if response.status_code == 401:
                    assert response.json()["error"]["code"] == "invalid_api_key"
                return response.status_code

            assert await status(http_a) == 200
            assert await status(http_b) == 200  # B caches the key now, until now + ttl
            revoked = await api_a.keys.revoke(key.id)
            assert revoked is not None and revoked.revoked_at is not None
            assert await status(http_a) == 401  # the app that revoked sees it at once
            if ttl == 0:
                assert await status(http_b) == 401
                return
            clock.now += ttl - 0.001
            assert await status(http_b) == 200  # B's cache still holds the key, just within the TTL...
            clock.now += 0.001
            assert await status(http_b) == 401  # ... and no longer than the TTL
            assert await status(http_a) == 401
    finally:
        await api_a.aclose()
        await api_b.aclose()
        for store in stores:
            if not isinstance(store, str):
                await store.aclose()


# ------------------------------------------------------------------------------------------- 10: over uvicorn


@pytest.mark.slow
def test_rate_limits_over_a_real_socket() -> None:
    clock = WindowClock()
    api = OzwellAPI(secret=SECRET, rate_limiter=clock.limiter())
    _, key = anyio.run(lambda: api.keys.create(name="t", owner="o", plan="free", rpm=2))
    # No max_tokens: the reservation is the prompt plus the default completion reserve.
    stream_reserve = prompt_tokens(api, {"model": "echo", "messages": MESSAGES}) + Settings().default_completion_reserve
    reset = clock.window_end()
    with uvicorn_server(PrefixedApp(api)) as url:
        with httpx2.stream(
            "POST",
            url + "/v1/chat/completions",
            json={"model": "echo", "messages": MESSAGES, "stream": True},
            headers=auth(key),
            timeout=10,
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            check_rate_headers(
                response.headers,
                rpm=2,
                tpm=10_000,
                remaining_requests=1,
                remaining_tokens=10_000 - stream_reserve,
                reset=reset,
                clock=clock,
            )
            lines = [line for line in response.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        client = openai.OpenAI(api_key=key, base_url=url + "/v1", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(model="echo", messages=MESSAGES)  # type: ignore[arg-type]
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        response = httpx2.post(
            url + "/v1/chat/completions", json={"model": "echo", "messages": MESSAGES}, headers=auth(key), timeout=10
        )
        check_rate_limited(response, reset, clock)
        assert response.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as info:
            client.models.list()
        assert info.value.code == "rate_limit_exceeded"
        assert int(info.value.response.headers["retry-after"]) >= 1
        client.close()
