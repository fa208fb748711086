"""Mounted inside hosts: our routes answer in our envelope; the host's routes, middleware and handlers are untouched."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from fastapi.responses import JSONResponse as FastJSON
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from ozwell_asgi import OzwellAPI
from tests.harness import async_openai, raw_client

pytestmark = pytest.mark.anyio


@pytest.fixture
async def api_and_key() -> tuple[OzwellAPI, str]:
    api = OzwellAPI(secret="s" * 32)
    _, secret = await api.keys.create(name="test", owner="alice")
    return api, secret


def fastapi_host(api: OzwellAPI) -> FastAPI:
    host = FastAPI()

    @host.exception_handler(HTTPException)
    async def host_errors(request: Request, exc: HTTPException) -> FastJSON:
        return FastJSON({"host_error": exc.detail}, status_code=exc.status_code)

    @host.exception_handler(Exception)
    async def host_crash(request: Request, exc: Exception) -> FastJSON:
        return FastJSON({"host_crash": True}, status_code=500)

    @host.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @host.get("/boom")
    async def boom() -> None:
        raise HTTPException(418, "teapot")

    host.mount("/v1", api)
    return host


async def test_fastapi_mount(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    host = fastapi_host(api)
    client = async_openai(host, key, base_url="http://testserver/v1")
    completion = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "mounted"}])
    assert completion.choices[0].message.content == "mounted"
    models = await client.models.list()
    assert [m.id for m in models.data] == ["echo", "echo-embedding"]
    await client.close()

    async with raw_client(host) as http:
        assert (await http.get("/hello")).json() == {"hello": "world"}
        assert (await http.get("/boom")).json() == {"host_error": "teapot"}
        response = await http.get("/v1/nope")
        assert response.status_code == 404
        assert response.json()["error"]["message"] == "Invalid URL (GET /v1/nope)"
        response = await http.get("/v1/chat/completions", headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 405 and "error" in response.json()
        response = await http.post("/v1/chat/completions", content=b"{", headers={"authorization": f"Bearer {key}"})
        assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
        response = await http.post("/v1/chat/completions", json={"model": "echo"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"


async def test_starlette_mount_under_any_prefix(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse("home")

    host = Starlette(routes=[Route("/", home), Mount("/api/openai/v1", app=api)])
    client = async_openai(host, key, base_url="http://testserver/api/openai/v1")
    completion = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "deep"}])
    assert completion.choices[0].message.content == "deep"
    await client.close()
    async with raw_client(host) as http:
        assert (await http.get("/")).text == "home"
        response = await http.get("/api/openai/v1/missing")
        assert response.json()["error"]["message"] == "Invalid URL (GET /api/openai/v1/missing)"


async def test_path_router_like_django_asgi(api_and_key: tuple[OzwellAPI, str]) -> None:
    """A Django asgi.py sends /v1/* to us by setting root_path, the rest to Django."""
    api, key = api_and_key

    async def django_app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"django"})

    async def application(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            await api({**scope, "root_path": scope.get("root_path", "") + "/v1"}, receive, send)
        else:
            await django_app(scope, receive, send)

    client = async_openai(application, key, base_url="http://testserver/v1")
    completion = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "dj"}])
    assert completion.choices[0].message.content == "dj"
    await client.close()
    async with raw_client(application) as http:
        assert (await http.get("/admin/")).text == "django"


async def test_lifespan_when_standalone() -> None:
    from asgi_lifespan import LifespanManager

    api = OzwellAPI(secret="s" * 32)
    async with LifespanManager(api):
        assert api._started
