"""Test plumbing: the official openai SDK wired to an ASGI app in-process (sync and async) and a real uvicorn
server on a loopback port, from the package's own :mod:`ozwell_asgi.testing.clients`; a raw httpx2 client."""

from __future__ import annotations

from typing import Any

import httpx2

from ozwell_asgi.testing.clients import (
    IN_PROCESS_BASE_URL as BASE,
)
from ozwell_asgi.testing.clients import (
    SyncASGITransport,
    async_openai,
    free_port,
    sync_openai,
)
from ozwell_asgi.testing.clients import (
    serve_in_thread as uvicorn_server,
)

__all__ = ["BASE", "SyncASGITransport", "async_openai", "free_port", "raw_client", "sync_openai", "uvicorn_server"]


def raw_client(app: Any, base_url: str = "http://testserver") -> httpx2.AsyncClient:
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=app, raise_app_exceptions=False), base_url=base_url)
