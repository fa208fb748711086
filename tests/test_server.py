"""Over a real uvicorn socket: the official SDK (sync, async, streaming), raw HTTP, and client disconnects."""

from __future__ import annotations

import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import httpx2
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from ozwell_asgi.types import Call, ChatChunk, ModelInfo
from tests.harness import uvicorn_server

pytestmark = pytest.mark.slow


class SlowBackend:
    """Streams a word every 50 ms, forever; records when its stream is closed."""

    def __init__(self) -> None:
        self.closed = threading.Event()

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="slow"),)

    async def stream_chat(self, request: Any, call: Call) -> AsyncIterator[ChatChunk]:
        try:
            yield ChatChunk(role="assistant", content="")
            while True:
                await anyio.sleep(0.05)
                yield ChatChunk(content=" word")
        finally:
            self.closed.set()


def make_key(api: OzwellAPI, **kwargs: Any) -> str:
    async def create() -> str:
        return (await api.keys.create(name="t", owner="o", **kwargs))[1]

    return anyio.run(create)


def test_sdk_over_uvicorn() -> None:
    api = OzwellAPI(secret="s" * 32)
    key = make_key(api)
    with uvicorn_server(PrefixedApp(api)) as url:
        client = openai.OpenAI(api_key=key, base_url=url + "/v1")
        completion = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "over tcp"}])
        assert completion.choices[0].message.content == "over tcp"
        chunks = list(
            client.chat.completions.create(
                model="echo",
                messages=[{"role": "user", "content": "streamed over tcp"}],
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "streamed over tcp"
        assert chunks[-1].usage is not None
        raw = client.chat.completions.with_raw_response.create(
            model="echo", messages=[{"role": "user", "content": "h"}]
        )
        assert raw.headers["x-request-id"].startswith("req_")
        assert raw.headers["x-ratelimit-limit-requests"] == "20"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(api_key="ozw_" + "x" * 40, base_url=url + "/v1", max_retries=0).models.list()

        async def use_async() -> str | None:
            async_client = openai.AsyncOpenAI(api_key=key, base_url=url + "/v1")
            stream = await async_client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "async tcp"}], stream=True
            )
            text = "".join([c.choices[0].delta.content or "" async for c in stream])
            await async_client.close()
            return text

        assert anyio.run(use_async) == "async tcp"
        response = httpx2.get(url + "/v1/unknown")
        assert response.status_code == 404 and response.json()["error"]["type"] == "invalid_request_error"


def test_client_disconnect_closes_the_backend_stream() -> None:
    backend = SlowBackend()
    api = OzwellAPI(secret="s" * 32, backend=backend)
    key = make_key(api, plan="pro")
    with uvicorn_server(PrefixedApp(api)) as url:
        with httpx2.stream(
            "POST",
            url + "/v1/chat/completions",
            json={"model": "slow", "messages": [{"role": "user", "content": "x"}], "stream": True},
            headers={"authorization": f"Bearer {key}"},
            timeout=10,
        ) as response:
            lines = response.iter_lines()
            seen = [next(lines) for _ in range(6)]
            assert any("word" in line for line in seen)
        began = time.monotonic()
        assert backend.closed.wait(2.0), "the backend stream was not closed after the client went away"
        assert time.monotonic() - began < 1.5
