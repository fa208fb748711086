"""examples/prometheus_metrics.py: requests through the official SDK, then /metrics scraped and parsed."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import async_openai, raw_client

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.setenv("OZWELL_SECRET", "x" * 32)
    monkeypatch.setenv("OZWELL_STORE_URL", f"sqlite:///{tmp_path}/ozwell.db")
    sys.modules.pop("examples.prometheus_metrics", None)  # a fresh registry and app per test
    module = importlib.import_module("examples.prometheus_metrics")
    yield module
    sys.modules.pop("examples.prometheus_metrics", None)


async def test_the_metrics_count_what_the_sdk_did(example: ModuleType) -> None:
    from asgi_lifespan import LifespanManager

    async with LifespanManager(example.app):
        _, key = await example.ozwell.keys.create(name="t", owner="o")
        client = async_openai(example.app, key, base_url="http://testserver/v1", max_retries=0)
        first = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "one two"}])
        stream = await client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "three four five"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        streamed = [chunk async for chunk in stream][-1].usage
        embedded = await client.embeddings.create(model="echo-embedding", input="six seven")
        await client.models.list()
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        await client.close()
        anonymous = async_openai(example.app, "ozw_wrong", base_url="http://testserver/v1", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await anonymous.embeddings.create(model="echo-embedding", input="x")
        await anonymous.close()
        await example.ozwell.usage.flush()  # the hook runs off the response path: wait for it, no sleep
        async with raw_client(example.app) as http:
            scraped = await http.get("/metrics")
            health = await http.get("/health")
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert first.usage is not None and streamed is not None
    got = samples(scraped.text)

    def requests(endpoint: str, status: str, model: str) -> float:
        return got[("ozwell_requests_total", (("endpoint", endpoint), ("model", model), ("status", status)))]

    def tokens(kind: str, model: str) -> float:
        return got[("ozwell_tokens_total", (("kind", kind), ("model", model)))]

    assert requests("chat.completions", "200", "echo") == 2
    assert requests("embeddings", "200", "echo-embedding") == 1
    assert requests("models.list", "200", "") == 1
    assert requests("chat.completions", "404", "") == 1
    assert requests("embeddings", "401", "") == 1
    assert tokens("prompt", "echo") == first.usage.prompt_tokens + streamed.prompt_tokens
    assert tokens("completion", "echo") == first.usage.completion_tokens + streamed.completion_tokens
    assert tokens("prompt", "echo-embedding") == embedded.usage.prompt_tokens
    assert got[("ozwell_request_duration_seconds_count", (("endpoint", "chat.completions"),))] == 3
    assert got[("ozwell_request_duration_seconds_count", (("endpoint", "embeddings"),))] == 2
    assert got[("ozwell_usage_events_dropped_total", ())] == 0
    assert got[("ozwell_usage_hook_failures_total", ())] == 0
    # Scrapes and health checks are the host's routes, not API requests: nothing counts them.
    assert not any(labels and dict(labels).get("endpoint") in ("metrics", "health") for _, labels in got)
