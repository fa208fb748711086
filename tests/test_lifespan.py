"""The API's lifespan in hosts: ``FastAPI(lifespan=ozwell.lifespan)``, ``async with ozwell.lifespan()``,
``combine_lifespans`` with the host's own, the Django router answering the lifespan protocol itself, and a mounted
app whose host never runs a lifespan: it starts lazily and closes its pools when its event loop ends, without a
warning, even under ``-W error``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from asgi_lifespan import LifespanManager, LifespanNotSupported
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from ozwell_asgi import OzwellAPI
from ozwell_asgi.django import OzwellRouter, asgi_application
from ozwell_asgi.lifespan import combine_lifespans
from ozwell_asgi.stores.memory import MemoryStorage
from ozwell_asgi.stores.urls import register_storage
from tests.harness import async_openai, raw_client

ROOT = Path(__file__).resolve().parent.parent


def started(app: Any) -> LifespanManager:
    """asgi-lifespan's manager, patient: loading the tokenizer takes seconds on a busy machine."""
    return LifespanManager(app, startup_timeout=120, shutdown_timeout=60)


class CountingStorage(MemoryStorage):
    """``memory://`` that counts its closes (registered as ``closes-counted://``)."""

    made: list[CountingStorage] = []  # noqa: RUF012  (a registry of what the factory made, per test run)

    def __init__(self) -> None:
        super().__init__()
        self.closed = 0
        CountingStorage.made.append(self)

    async def aclose(self) -> None:
        self.closed += 1


register_storage("closes-counted", lambda url, options: CountingStorage())


def counted_api() -> tuple[OzwellAPI, CountingStorage]:
    api = OzwellAPI(key_store="closes-counted://", file_store="closes-counted://", secret="s" * 32)
    return api, CountingStorage.made[-1]


def django_like(seen: list[str]) -> Any:
    """Rejects lifespan as Django's ASGIHandler does; answers HTTP with the path it saw."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        seen.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"django " + scope["path"].encode()})

    return app


@pytest.mark.anyio
async def test_fastapi_wires_the_lifespan_in_one_line() -> None:
    api, storage = counted_api()
    host = FastAPI(lifespan=api.lifespan)
    host.mount("/v1", api)
    async with started(host):
        assert api._started  # started by the host's lifespan, before any request
        assert api._loop_end is None  # and so not left to the loop's end
        _, key = await api.keys.create(name="k", owner="o")
        client = async_openai(host, key, base_url="http://testserver/v1")
        reply = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "fa"}])
        assert reply.choices[0].message.content == "fa"
        await client.close()
        assert storage.closed == 0
    assert storage.closed == 1


@pytest.mark.anyio
async def test_async_with_lifespan_starts_and_closes() -> None:
    api, storage = counted_api()
    async with api.lifespan():
        assert api._started
        assert storage.closed == 0
    assert storage.closed == 1 and not api._started
    async with api.lifespan():  # closing again is safe: the adapters reopen on use and close again
        pass
    assert storage.closed == 2


def test_after_its_lifespan_a_request_on_another_loop_starts_it_lazily() -> None:
    api, storage = counted_api()

    async def with_lifespan() -> None:
        async with api.lifespan():
            pass

    async def request() -> int:
        _, key = await api.keys.create(name="k", owner="o")
        async with raw_client(Starlette(routes=[Mount("/v1", app=api)])) as http:
            response = await http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert storage.closed == 1 and api._loop_end is not None
        return response.status_code

    anyio.run(with_lifespan)
    assert storage.closed == 1
    assert anyio.run(request) == 200
    assert storage.closed == 2  # closed again when that loop ended


@pytest.mark.anyio
async def test_combine_lifespans_orders_start_and_close_and_merges_state() -> None:
    api, storage = counted_api()
    events: list[str] = []

    @asynccontextmanager
    async def host_lifespan(app: Any) -> AsyncIterator[dict[str, Any]]:
        events.append(f"host start ({api._started=})")
        yield {"db": "host-db", "shared": 1}
        events.append(f"host close ({storage.closed=})")

    @asynccontextmanager
    async def more(app: Any) -> AsyncIterator[dict[str, Any]]:
        yield {"shared": 2}

    async def state(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{request.state.db} {request.state.shared}")

    host = Starlette(
        routes=[Route("/state", state), Mount("/v1", app=api)],
        lifespan=combine_lifespans(host_lifespan, api.lifespan, more),
    )
    async with started(host) as manager, raw_client(manager.app) as http:
        assert api._started
        assert (await http.get("/state")).text == "host-db 2"
    # the host's started first (before the API), and closed last (after the API's pools)
    assert events == ["host start (api._started=False)", "host close (storage.closed=1)"]


@pytest.mark.anyio
async def test_combine_lifespans_closes_what_started_when_a_later_one_fails() -> None:
    api, storage = counted_api()

    @asynccontextmanager
    async def broken(app: Any) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield  # pragma: no cover

    with pytest.raises(RuntimeError, match="no database"):
        async with combine_lifespans(api.lifespan, broken)(None):
            pytest.fail("a failed start must not run the body")  # pragma: no cover
    assert storage.closed == 1


@pytest.mark.anyio
async def test_django_router_answers_lifespan_and_routes_by_whole_segment() -> None:
    api, storage = counted_api()
    seen: list[str] = []
    django_app = django_like(seen)
    with pytest.raises(LifespanNotSupported):  # the docs' old asgi.py: no lifespan at all
        async with LifespanManager(django_app):
            pass  # pragma: no cover

    application = asgi_application(django_app, api, prefix="/v1")
    async with started(application):
        assert api._started
        _, key = await api.keys.create(name="k", owner="o")
        client = async_openai(application, key, base_url="http://testserver/v1")
        listed = await client.models.list()
        assert [m.id for m in listed.data] == ["echo", "echo-embedding"]
        await client.close()
        async with raw_client(application) as http:
            assert (await http.get("/admin/")).text == "django /admin/"
            assert (await http.get("/v1beta/models")).text == "django /v1beta/models"  # not our prefix
            missing = await http.get("/v1/nope")
            assert missing.status_code == 404
            assert missing.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"
            assert (await http.get("/v1")).json()["error"]["type"] == "invalid_request_error"
        assert seen == ["/admin/", "/v1beta/models"]
        assert storage.closed == 0
    assert storage.closed == 1


@pytest.mark.anyio
async def test_django_router_under_a_server_root_path() -> None:
    api, _ = counted_api()
    seen: list[str] = []
    application = OzwellRouter(django_like(seen), api, prefix="v1/")
    _, key = await api.keys.create(name="k", owner="o")
    transport = httpx2.ASGITransport(app=application, root_path="/app")
    async with httpx2.AsyncClient(transport=transport, base_url="http://testserver") as http:
        response = await http.get("/app/v1/models", headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 200
        assert [m["id"] for m in response.json()["data"]] == ["echo", "echo-embedding"]
        assert (await http.get("/app/home")).text == "django /app/home"
    with pytest.raises(ValueError, match="prefix"):
        OzwellRouter(django_like(seen), api, prefix="/")


@pytest.mark.anyio
async def test_django_router_with_the_hosts_lifespan_and_a_failing_start() -> None:
    api, storage = counted_api()
    order: list[str] = []

    @asynccontextmanager
    async def host_lifespan(app: Any) -> AsyncIterator[None]:
        assert isinstance(app, OzwellRouter)
        order.append("host start")
        yield
        order.append(f"host close after the API's ({storage.closed})")

    async with started(asgi_application(django_like([]), api, lifespan=host_lifespan)):
        assert order == ["host start"]
    assert order == ["host start", "host close after the API's (1)"]

    @asynccontextmanager
    async def broken(app: Any) -> AsyncIterator[None]:
        raise RuntimeError("cache down")
        yield  # pragma: no cover

    with pytest.raises(Exception, match="cache down"):
        async with started(asgi_application(django_like([]), api, lifespan=broken)):
            pass  # pragma: no cover


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_a_mounted_app_closes_at_its_loops_end_and_again_on_the_next(backend: str) -> None:
    """No lifespan: the first request starts the API; the loop's end closes its pools; a request on a later loop
    starts it again, and that loop's end closes them again (asyncio, and trio through anyio)."""
    api, storage = counted_api()
    host = Starlette(routes=[Mount("/v1", app=api)])

    async def serve_once() -> int:
        _, key = await api.keys.create(name="k", owner="o")
        async with raw_client(host) as http:
            response = await http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert api._started and api._loop_end is not None
        assert storage.closed == closes_before  # not before the loop ends
        return response.status_code

    closes_before = 0
    assert anyio.run(serve_once, backend=backend) == 200
    assert storage.closed == 1 and not api._started and api._loop_end is None
    closes_before = 1
    assert anyio.run(serve_once, backend=backend) == 200
    assert storage.closed == 2


# A host that never runs the API's lifespan (Starlette does not forward it to a Mount), under uvicorn, on real
# sockets; the official SDK calls it, then the server stops. Run with every warning an error.
HOST_SCRIPT = """
import asyncio, os, sys
import uvicorn
from openai import AsyncOpenAI
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from ozwell_asgi import OzwellAPI

api = OzwellAPI(key_store=os.environ["STORE"], file_store=os.environ["STORE"],
                rate_limiter=os.environ["LIMITER"], secret="s" * 32)
host = Starlette(routes=[Route("/", lambda request: PlainTextResponse("host")), Mount("/v1", app=api)])


async def main() -> None:
    server = uvicorn.Server(uvicorn.Config(host, port=int(sys.argv[1]), log_level="warning", ws="none"))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    _, key = await api.keys.create(name="k", owner="o")
    client = AsyncOpenAI(api_key=key, base_url=f"http://127.0.0.1:{sys.argv[1]}/v1")
    reply = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "mounted"}])
    stream = await client.chat.completions.create(
        model="echo", messages=[{"role": "user", "content": "streamed"}], stream=True
    )
    streamed = "".join([chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices])
    uploaded = await client.files.create(file=("a.jsonl", b"{}\\n"), purpose="batch")
    await client.close()
    print(reply.choices[0].message.content, streamed, uploaded.bytes, api._loop_end is not None, flush=True)
    server.should_exit = True
    await serving


asyncio.run(main())
print("exited", flush=True)
"""


def run_host(tmp_path: Path, store: str, limiter: str) -> subprocess.CompletedProcess[str]:
    from tests.harness import free_port

    script = tmp_path / "host.py"
    script.write_text(HOST_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "STORE": store, "LIMITER": limiter}
    flags = ["-X", "dev", "-W", "error", "-W", "ignore:open_binary is deprecated:DeprecationWarning"]
    return subprocess.run(
        [sys.executable, *flags, str(script), str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_clean_exit(out: subprocess.CompletedProcess[str]) -> None:
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == ["mounted streamed 3 True", "exited"]
    for trace in ("ResourceWarning", "Unclosed", "unclosed", "Exception ignored", "Traceback", "Warning"):
        assert trace not in out.stderr, out.stderr[-3000:]


@pytest.mark.slow
def test_a_host_without_lifespan_exits_cleanly_on_sqlite(tmp_path: Path) -> None:
    assert_clean_exit(run_host(tmp_path, f"sqlite:///{tmp_path / 'ozwell.db'}", "memory://"))


@pytest.mark.slow
@pytest.mark.services
@pytest.mark.anyio
async def test_a_host_without_lifespan_exits_cleanly_on_postgresql_and_redis(
    tmp_path: Path, postgres_url: str, redis_url: str
) -> None:
    import anyio.to_thread

    assert_clean_exit(await anyio.to_thread.run_sync(run_host, tmp_path, postgres_url, redis_url))
