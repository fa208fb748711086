"""Test plumbing: the official openai SDK wired to an ASGI app in-process (sync and async), and a real uvicorn
server on a loopback port. Issue 7 turns these into the public pytest plugin."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anyio.from_thread
import httpx2
import openai
import uvicorn

BASE = "http://testserver/v1"


def _root_path(app: Any) -> str:
    """A bare OzwellAPI is served as if mounted at /v1 (what ``ozwell-asgi serve`` does)."""
    from ozwell_asgi import OzwellAPI

    return "/v1" if isinstance(app, OzwellAPI) else ""


class SyncASGITransport(httpx2.BaseTransport):
    """Runs an ASGI app for a sync httpx2 client, on an event loop in a helper thread."""

    def __init__(self, app: Any, portal: Any) -> None:
        self._inner = httpx2.ASGITransport(app=app, root_path=_root_path(app))
        self._portal = portal

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        body = request.read()
        copy = httpx2.Request(request.method, request.url, headers=request.headers, content=body)

        async def run() -> tuple[int, list[tuple[bytes, bytes]], bytes]:
            response = await self._inner.handle_async_request(copy)
            content = await response.aread()
            return response.status_code, list(response.headers.raw), content

        status, headers, content = self._portal.call(run)
        return httpx2.Response(status, headers=headers, content=content)


@contextmanager
def sync_openai(app: Any, api_key: str, base_url: str = BASE, **kwargs: Any) -> Iterator[openai.OpenAI]:
    with anyio.from_thread.start_blocking_portal() as portal:
        http = httpx2.Client(transport=SyncASGITransport(app, portal), base_url=base_url)
        client = openai.OpenAI(api_key=api_key, base_url=base_url, http_client=http, **kwargs)
        try:
            yield client
        finally:
            client.close()


def async_openai(app: Any, api_key: str, base_url: str = BASE, **kwargs: Any) -> openai.AsyncOpenAI:
    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app, root_path=_root_path(app)), base_url=base_url)
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url, http_client=http, **kwargs)


def raw_client(app: Any, base_url: str = "http://testserver") -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app, raise_app_exceptions=False), base_url=base_url)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def uvicorn_server(app: Any, **config: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free loopback port in a thread; yields ``http://127.0.0.1:PORT``."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
