"""The meter's usage event: one per billable call, when it settles, with what it used and how it ended."""

from __future__ import annotations

import openai
import pytest

from ozwell_asgi import LimitsRateLimiter, OzwellAPI, UsageEvent
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
