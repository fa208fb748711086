"""What the hot path's cheaper machinery must still guarantee (issue 11, item 6): the in-process limiter keeps its
memory bounded; the body's idle timer is pushed back by every piece and never turns another cancellation into a
408; a stream's disconnect watcher stops a stream whose client left, and leaves nothing behind when it ends.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends.echo import EchoBackend
from ozwell_asgi.context import Settings
from ozwell_asgi.errors import RateLimitError
from ozwell_asgi.ratelimit import LimitsRateLimiter
from ozwell_asgi.tokens import BPETokenizer
from ozwell_asgi.types import Call, ChatChunk, Message, Quota, Reservation
from ozwell_asgi.wire.chat import ChatCompletionRequest
from tests.test_admission import call_raw

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
CHAT = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hello there"}]}).encode()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------------------------------ the memory limiter


async def test_the_memory_limiter_keeps_only_the_current_and_previous_window() -> None:
    clock = Clock(600_030.0)
    limiter = LimitsRateLimiter("memory://", clock=clock)
    quota = Quota(rpm=10, tpm=1000)
    for _ in range(5):
        for subject in ("a", "b", "c"):
            reservation = await limiter.reserve(subject, quota, 100)
            await limiter.settle(reservation, 40)
        assert reservation.requests is not None and reservation.requests.remaining == 9
        assert reservation.tokens is not None and reservation.tokens.remaining == 900  # fresh in every window
        clock.now += 60
    kept = limiter._local._windows  # type: ignore[union-attr]
    assert sorted(kept) == [10_003, 10_004]
    assert kept[10_004] == ({"a": 1, "b": 1, "c": 1}, {"a": 40, "b": 40, "c": 40})


async def test_the_memory_limiter_refuses_without_counting() -> None:
    limiter = LimitsRateLimiter("memory://", clock=Clock(600_030.0))
    quota = Quota(rpm=2, tpm=100)
    held = await limiter.reserve("k", quota, 60)
    with pytest.raises(RateLimitError, match="Rate limit exceeded"):
        await limiter.reserve("k", quota, 41)  # over the tokens: the request is not counted either
    second = await limiter.reserve("k", quota, 40)
    assert second.requests is not None and second.requests.remaining == 0
    assert second.tokens is not None and second.tokens.remaining == 0
    with pytest.raises(RateLimitError, match="Rate limit exceeded"):
        await limiter.reserve("k", quota, 0)
    await limiter.settle(held, 10)
    await limiter.reserve_tokens(second, 50)  # the refund is there for the next tokens
    assert second.tokens is not None and second.tokens.remaining == 0


# --------------------------------------------------------------------------------------------- the idle timer


async def test_a_slow_body_that_keeps_arriving_is_read_whole() -> None:
    api = OzwellAPI(secret=SECRET, settings=Settings(body_idle_timeout=0.25))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    pieces = [CHAT[i : i + 4] for i in range(0, len(CHAT), 4)]  # 0.02 s apart: the whole body takes > 0.25 s

    async def trickle() -> Message:
        if not pieces:
            await anyio.sleep_forever()
        await anyio.sleep(0.02)
        piece = pieces.pop(0)
        return {"type": "http.request", "body": piece, "more_body": bool(pieces)}

    assert len(pieces) * 0.02 > 0.3
    status, _, body = await call_raw(api, key, trickle, len(CHAT))
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "hello there"


async def test_idle_timers_with_other_timeouts_share_one_loop() -> None:
    """One sweeper per loop watches every read: a short timeout registered while a long one is armed still fires
    on time, the sweeper re-arms for reads that come after it fired, and the long read is left alone."""
    patient = OzwellAPI(secret=SECRET, settings=Settings(body_idle_timeout=30))
    hasty = OzwellAPI(secret=SECRET, settings=Settings(body_idle_timeout=0.05))
    _, patient_key = await patient.keys.create(name="t", owner="o", plan="pro")
    _, hasty_key = await hasty.keys.create(name="t", owner="o", plan="pro")

    async def stalled() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    outcome: list[int] = []

    async def long_read() -> None:
        status, _, _ = await call_raw(patient, patient_key, stalled, 100)
        outcome.append(status)

    async with anyio.create_task_group() as group:
        group.start_soon(long_read)
        await anyio.sleep(0.01)  # the 30 s read is registered (and armed) first
        for _ in range(2):  # the second stall comes after the sweeper fired once
            with anyio.fail_after(2):
                status, _, body = await call_raw(hasty, hasty_key, stalled, 100)
            assert status == 408, body
            assert json.loads(body)["error"]["code"] == "request_timeout"
        assert outcome == []  # the long read is still waiting
        group.cancel_scope.cancel()


async def test_a_request_cancelled_while_its_body_is_read_stays_cancelled() -> None:
    api = OzwellAPI(secret=SECRET, settings=Settings(body_idle_timeout=30))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    sent: list[Any] = []

    async def stalled() -> Message:
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "method": "POST",
        "path": "/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-length", b"100")],
    }
    with anyio.move_on_after(0.05) as scope_:
        await api(scope, stalled, send)
    assert scope_.cancelled_caught
    assert sent == []  # no 408 (nor anything else) for a request its server cancelled


# ----------------------------------------------------------------------------------------- the stream's watcher


class Recorded(LimitsRateLimiter):
    """The memory limiter, noting every settlement."""

    def __init__(self) -> None:
        super().__init__("memory://")
        self.settled: list[int] = []

    async def settle(self, reservation: Reservation, used_tokens: int) -> None:
        self.settled.append(used_tokens)
        await super().settle(reservation, used_tokens)


class Waiting(EchoBackend):
    """Echo's first chunks, then waits (for the client to go away); notes when its stream is closed."""

    def __init__(self) -> None:
        super().__init__()
        self.closed = False

    async def stream_chat(self, request: ChatCompletionRequest, ctx: Call) -> AsyncIterator[ChatChunk]:
        try:
            yield ChatChunk(role="assistant", content="")
            yield ChatChunk(content="hello")
            await anyio.sleep_forever()
        finally:
            self.closed = True


def stream_scope(key: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "method": "POST",
        "path": "/chat/completions",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"authorization", f"Bearer {key}".encode()), (b"content-type", b"application/json")],
    }


async def test_a_client_gone_mid_stream_closes_the_backend_and_settles_once() -> None:
    limiter = Recorded()
    backend = Waiting()
    api = OzwellAPI(secret=SECRET, backend=backend, rate_limiter=limiter)
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    frames: list[bytes] = []
    gone = anyio.Event()
    calls = 0

    async def receive() -> Message:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            frames.append(message.get("body", b""))
            if b"hello" in message.get("body", b""):
                gone.set()  # the client leaves once it has the first word

    with anyio.fail_after(5):
        await api(stream_scope(key), receive, send)
    assert backend.closed
    assert any(b"hello" in frame for frame in frames)
    assert b"data: [DONE]\n\n" not in frames
    assert len(limiter.settled) == 1
    await anyio.sleep(0.01)  # the request's task carries no stray cancellation


async def test_a_finished_stream_leaves_no_watcher_and_no_cancellation() -> None:
    api = OzwellAPI(secret=SECRET)
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    body = json.dumps({"model": "echo", "messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
    done = anyio.Event()
    frames: list[bytes] = []

    async def receive() -> Message:
        if not frames:
            return {"type": "http.request", "body": body, "more_body": False}
        await done.wait()  # like uvicorn: a disconnect only once the response is complete
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        if message["type"] == "http.response.body":
            frames.append(message.get("body", b""))
            if not message.get("more_body", False):
                done.set()
        else:
            frames.append(b"")

    before = set(asyncio.all_tasks())
    await api(stream_scope(key), receive, send)
    assert frames[-2] == b"data: [DONE]\n\n" and frames[-1] == b""
    await anyio.sleep(0.01)  # were the task cancelled by the watcher, this would raise
    assert set(asyncio.all_tasks()) <= before


# ------------------------------------------------------------------------------------------------ the tokenizer


def test_the_direct_tokenizer_path_agrees_with_the_wrapper() -> None:
    tokenizer = BPETokenizer()
    wrapper = tokenizer._load()
    assert tokenizer._direct is not None  # the path under test is taken
    rng = random.Random(11)
    alphabet = "abc XYZ  \n\t,.!?éü中文🎉0123456789'\"{}[]:<|>"
    texts = ["", " ", "Hello, Ozwell! How are you today?", "<|endoftext|>", "a\ud800b", "x" * 60_000, "🎉" * 50_000]
    texts += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(2000)]
    for text in texts:
        expected = wrapper.encode_ordinary(text) if text else []
        assert tokenizer.encode(text) == expected, text[:40]
        assert tokenizer.count(text) == len(expected), text[:40]
