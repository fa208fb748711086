"""Usage events: exactly one per request (a metered call's when its meter settles, every other request's when it
ends), delivered to the host's hooks off the response path.

Hooks run on their own workers, so a test waits for delivery with ``await api.usage.flush()`` (no sleeps): before
usage hooks existed the sink was called on the request path, and the first three tests asserted right after the
answer; they now flush first.
"""

from __future__ import annotations

import asyncio
import logging
import threading

import openai
import pytest

from ozwell_asgi import LimitsRateLimiter, OzwellAPI, Settings, UsageEvent
from ozwell_asgi.usage import UsageHooks, endpoint_name
from tests.harness import async_openai, raw_client

pytestmark = pytest.mark.anyio


async def make(events: list[UsageEvent], **kwargs: object) -> tuple[OzwellAPI, str]:
    api = OzwellAPI(
        secret="s" * 32,
        rate_limiter=LimitsRateLimiter("memory://", clock=lambda: 1_800_000_030.0),
        on_usage=events.append,
        **kwargs,  # type: ignore[arg-type]
    )
    _, key = await api.keys.create(name="t", owner="acme", plan="pro")
    return api, key


def event(n: int = 0) -> UsageEvent:
    return UsageEvent(
        request_id=f"req_{n}",
        key_id="key_1",
        owner="acme",
        endpoint="chat.completions",
        model="echo",
        status=200,
        prompt_tokens=n,
        completion_tokens=0,
        charged=n,
        latency_ms=1.0,
    )


# -- what is emitted ------------------------------------------------------------------------------------------------


async def test_chat_stream_and_embeddings_each_emit_one_event() -> None:
    events: list[UsageEvent] = []
    api, key = await make(events)
    client = async_openai(api, key)
    completion = await client.chat.completions.with_raw_response.create(
        model="echo", messages=[{"role": "user", "content": "hello there"}]
    )
    usage = completion.parse().usage
    assert usage is not None
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "streamed"}], stream=True
    )
    [chunk async for chunk in stream]
    await client.embeddings.create(model="echo-embedding", input=["a b", "c"])
    await client.close()
    await api.usage.flush()
    assert [e.endpoint for e in events] == ["chat.completions", "chat.completions", "embeddings"]
    first = events[0]
    assert (first.key_id.startswith("key_"), first.owner, first.model, first.status) == (True, "acme", "echo", 200)
    assert (first.prompt_tokens, first.completion_tokens) == (usage.prompt_tokens, usage.completion_tokens)
    assert first.charged == usage.total_tokens
    assert first.request_id == completion.headers["x-request-id"]
    assert first.latency_ms >= 0
    assert events[1].completion_tokens > 0 and events[1].status == 200
    assert events[2].model == "echo-embedding" and events[2].completion_tokens == 0 and events[2].prompt_tokens > 0


async def test_failed_calls_emit_their_status_and_charge_nothing() -> None:
    events: list[UsageEvent] = []
    api, key = await make(events)
    async with raw_client(api) as http:
        headers = {"authorization": f"Bearer {key}"}
        unknown = await http.post("/chat/completions", json={"model": "nope", "messages": []}, headers=headers)
        assert unknown.status_code == 400  # messages must not be empty
        missing = await http.post(
            "/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}, headers=headers
        )
        assert missing.status_code == 404
    await api.usage.flush()
    assert [(e.status, e.charged) for e in events] == [(400, 0), (404, 0)]


async def test_a_failing_hook_never_breaks_an_answer() -> None:
    def broken(event: UsageEvent) -> None:
        raise RuntimeError("the metrics backend is down")

    api = OzwellAPI(secret="s" * 32, on_usage=broken)
    _, key = await api.keys.create(name="t", owner="acme")
    client = async_openai(api, key, max_retries=0)
    answer = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "still here"}])
    assert answer.choices[0].message.content == "still here"
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    await client.close()
    await api.usage.flush()
    assert (api.usage.failed, api.usage.delivered, api.usage.dropped) == (2, 0, 0)


async def test_every_request_emits_exactly_one_event_refusals_included() -> None:
    events: list[UsageEvent] = []
    api, _ = await make(events)
    principal, key = await api.keys.create(name="one", owner="acme", plan="pro", rpm=2)
    async with raw_client(api) as http:
        auth = {"authorization": f"Bearer {key}"}
        body = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        answers = [
            await http.get("/models", headers=auth),  # a non-billable call: counted on the requests budget
            await http.post("/chat/completions", json=body, headers=auth),
            await http.post("/chat/completions", json=body, headers=auth),  # the rpm of 2 is spent: 429
            await http.post("/chat/completions", json=body),  # no key: 401
            await http.post("/chat/completions", json=body, headers={"authorization": "Bearer ozw_nope"}),
            await http.get("/nowhere", headers=auth),
            await http.delete("/models", headers=auth),  # 405
            await http.get(f"/api-keys/{principal.id}", headers=auth),  # an api-scope key: 403
        ]
    await api.usage.flush()
    statuses = [a.status_code for a in answers]
    assert statuses == [200, 200, 429, 401, 401, 404, 405, 403]
    assert [e.request_id for e in events] == [a.headers["x-request-id"] for a in answers]
    assert [(e.endpoint, e.status) for e in events] == [
        ("models.list", 200),
        ("chat.completions", 200),
        ("chat.completions", 429),
        ("chat.completions", 401),
        ("chat.completions", 401),
        ("unknown", 404),
        ("unknown", 405),
        ("api_keys.retrieve", 403),
    ]
    # The caller is named once its key is known (a refusal after authentication included); tokens only when metered.
    assert [e.key_id == principal.id for e in events] == [True, True, True, False, False, False, False, True]
    assert [e.owner for e in events][3:7] == ["", "", "", ""]
    assert events[1].model == "echo" and events[1].prompt_tokens > 0
    assert all((e.model, e.prompt_tokens, e.completion_tokens, e.charged) == (None, 0, 0, 0) for e in events[2:])
    assert all(e.latency_ms >= 0 for e in events)


def test_endpoint_names_follow_the_sdk_calls() -> None:
    assert [
        endpoint_name(path, method)
        for path, method in [
            ("/chat/completions", "POST"),
            ("/embeddings", "POST"),
            ("/responses", "POST"),
            ("/models", "GET"),
            ("/models/{model:path}", "GET"),
            ("/files", "POST"),
            ("/files/{file_id}", "DELETE"),
            ("/files/{file_id}/content", "GET"),
            ("/api-keys/{key_id}/rotate", "POST"),
            ("/responses/{response_id}/input_items", "GET"),
        ]
    ] == [
        "chat.completions",
        "embeddings",
        "responses",
        "models.list",
        "models.retrieve",
        "files",
        "files.delete",
        "files.content",
        "api_keys.rotate",
        "responses.input_items",
    ]


async def test_no_hook_no_event_then_add_usage_hook_and_several_hooks() -> None:
    api = OzwellAPI(secret="s" * 32)
    assert api.services.on_usage is None  # nothing is built per request without a hook
    _, key = await api.keys.create(name="t", owner="acme")
    client = async_openai(api, key)
    await client.models.list()
    first: list[UsageEvent] = []
    second: list[str] = []

    async def record(event: UsageEvent) -> None:
        second.append(event.endpoint)

    api.add_usage_hook(first.append)
    api.add_usage_hook(record)
    await client.models.retrieve("echo")
    await client.close()
    await api.usage.flush()
    assert [e.endpoint for e in first] == second == ["models.retrieve"]
    both = OzwellAPI(secret="s" * 32, on_usage=[first.append, record])
    assert len(both.usage) == 2


# -- off the response path -----------------------------------------------------------------------------------------


async def test_a_blocked_async_hook_delays_no_answer_and_another_hook_still_gets_every_event() -> None:
    gate = asyncio.Event()
    slow: list[str] = []
    fast: list[str] = []

    async def blocked(event: UsageEvent) -> None:
        await gate.wait()  # a metrics backend that does not answer
        slow.append(event.request_id)

    api = OzwellAPI(secret="s" * 32, on_usage=[blocked, lambda e: fast.append(e.request_id)])
    _, key = await api.keys.create(name="t", owner="acme")
    client = async_openai(api, key)
    ids = []
    for n in range(5):
        reply = await client.chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": f"n{n}"}]
        )
        assert reply.parse().choices[0].message.content == f"n{n}"
        ids.append(reply.headers["x-request-id"])
    await client.close()
    assert slow == []  # every answer came while the hook was stuck on the first event
    stats = api.usage.stats()
    assert (
        stats["test_a_blocked_async_hook_delays_no_answer_and_another_hook_still_gets_every_event.<locals>.blocked"][
            "pending"
        ]
        == 5
    )
    gate.set()
    await api.usage.flush()
    assert slow == fast == ids  # in order, once each
    assert (api.usage.delivered, api.usage.dropped, api.usage.failed) == (10, 0, 0)


async def test_a_blocking_sync_hook_runs_off_the_event_loop() -> None:
    release = threading.Event()
    threads: list[int] = []

    def blocking(event: UsageEvent) -> None:
        release.wait(30)  # blocks its thread, never the loop
        threads.append(threading.get_ident())

    api = OzwellAPI(secret="s" * 32, on_usage=blocking)
    _, key = await api.keys.create(name="t", owner="acme")
    client = async_openai(api, key)
    try:
        for n in range(3):
            reply = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": f"{n}"}])
            assert reply.choices[0].message.content == f"{n}"
        assert threads == []
    finally:
        release.set()
    await client.close()
    await api.usage.flush()
    assert len(threads) == 3 and threading.get_ident() not in threads


async def test_a_full_queue_drops_and_counts() -> None:
    gate = asyncio.Event()
    seen: list[str] = []

    async def blocked(event: UsageEvent) -> None:
        await gate.wait()
        seen.append(event.request_id)

    api = OzwellAPI(secret="s" * 32, on_usage=blocked, settings=Settings(usage_queue_size=2))
    _, key = await api.keys.create(name="t", owner="acme")
    client = async_openai(api, key)
    for _ in range(6):
        await client.models.retrieve("echo")
    await client.close()
    # The hook holds at most one event, its queue two more: every other one was dropped, and counted.
    assert api.usage.pending <= 3
    assert api.usage.dropped == 6 - api.usage.pending >= 3
    gate.set()
    await api.usage.flush()
    assert len(seen) == api.usage.delivered and len(seen) + api.usage.dropped == 6


async def test_the_queue_bound_is_exact() -> None:
    hooks = UsageHooks([lambda e: None], max_queue=3)
    for n in range(10):  # no await in between: the worker cannot take any yet
        hooks.emit(event(n))
    assert (hooks.pending, hooks.dropped) == (3, 7)
    await hooks.flush()
    assert (hooks.pending, hooks.delivered, hooks.dropped) == (0, 3, 7)


async def test_failures_are_counted_and_logged_at_most_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]

    async def broken(event: UsageEvent) -> None:
        raise ValueError(f"bad event {event.request_id}")

    hooks = UsageHooks([broken], log_interval=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="ozwell_asgi"):
        for n in range(3):
            hooks.emit(event(n))
        await hooks.flush()
        assert hooks.failed == 3
        assert len(caplog.records) == 1 and "bad event req_0" in caplog.text
        now[0] += 61
        hooks.emit(event(3))
        await hooks.flush()
    assert hooks.failed == 4
    assert len(caplog.records) == 2 and "2 more failures" in caplog.records[1].getMessage()


async def test_aclose_drains_within_its_deadline_then_drops() -> None:
    got: list[str] = []
    hooks = UsageHooks([lambda e: got.append(e.request_id)])
    for n in range(4):
        hooks.emit(event(n))
    await hooks.aclose()
    assert got == ["req_0", "req_1", "req_2", "req_3"] and hooks.dropped == 0

    gate = asyncio.Event()

    async def stuck(event: UsageEvent) -> None:
        await gate.wait()

    stalled = UsageHooks([stuck])
    for n in range(4):
        stalled.emit(event(n))
    await stalled.aclose(drain_timeout=0)  # nothing can be delivered in no time: all four are dropped, counted
    assert (stalled.dropped, stalled.delivered, stalled.pending) == (4, 0, 0)
    stalled.emit(event(5))  # events after aclose start a worker again
    gate.set()
    await stalled.flush()
    assert stalled.delivered == 1


async def test_lifespan_shutdown_delivers_what_is_queued() -> None:
    from asgi_lifespan import LifespanManager

    got: list[str] = []

    async def record(event: UsageEvent) -> None:
        got.append(event.endpoint)

    api = OzwellAPI(secret="s" * 32, on_usage=record)
    _, key = await api.keys.create(name="t", owner="acme")
    async with LifespanManager(api), raw_client(api) as http:
        for _ in range(3):
            assert (await http.get("/models", headers={"authorization": f"Bearer {key}"})).status_code == 200
    assert got == ["models.list"] * 3


def test_queued_events_follow_the_app_to_a_new_loop() -> None:
    got: list[int] = []
    hooks = UsageHooks([lambda e: got.append(e.prompt_tokens)])

    async def emit(n: int) -> None:
        hooks.emit(event(n))

    asyncio.run(emit(1))  # this loop ends before its worker ran
    hooks.emit(event(2))  # no loop at all: queued

    async def deliver() -> None:
        hooks.emit(event(3))
        await hooks.flush()

    asyncio.run(deliver())
    assert got == [1, 2, 3]


async def test_a_hook_added_while_workers_run_gets_the_next_events() -> None:
    first: list[int] = []
    later: list[int] = []
    hooks = UsageHooks([lambda e: first.append(e.prompt_tokens)])
    hooks.emit(event(1))
    await hooks.flush()
    hooks.add(lambda e: later.append(e.prompt_tokens))
    hooks.emit(event(2))
    await hooks.flush()
    assert (first, later) == ([1, 2], [2])
