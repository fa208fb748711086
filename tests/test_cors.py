"""CORS: preflights answered for the app's cors_origins alone; answers to them (errors and streams included) carry
the CORS headers, answers to other origins none; in-process, mounted in FastAPI, over a real socket, and as
``serve --cors-origin`` builds it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import httpx2
import pytest
from fastapi import FastAPI

from ozwell_asgi import OzwellAPI
from ozwell_asgi.cli import ServeConfig, build_app
from ozwell_asgi.cors import EXPOSED_HEADERS
from tests.harness import async_openai, raw_client, uvicorn_server
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
APP = "https://app.example.com"
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
# What the OpenAI SDK in a browser (dangerouslyAllowBrowser) asks to send.
SDK_HEADERS = (
    "authorization, content-type, x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, "
    "x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout"
)


def preflight(origin: str, method: str = "POST", headers: str | None = SDK_HEADERS) -> dict[str, str]:
    sent = {"origin": origin, "access-control-request-method": method}
    if headers is not None:
        sent["access-control-request-headers"] = headers
    return sent


def cors_headers(response: httpx2.Response | httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k.startswith("access-control-") or k == "vary"}


def assert_cors_for(response: httpx2.Response | httpx.Response, origin: str) -> None:
    assert response.headers["access-control-allow-origin"] == origin
    assert "Origin" in response.headers.get_list("vary")
    exposed = [h.strip() for h in response.headers["access-control-expose-headers"].split(",")]
    assert set(exposed) == set(EXPOSED_HEADERS)
    assert "access-control-allow-credentials" not in response.headers


def error_of(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    validate("ErrorResponse", body)
    return dict(body["error"])


@pytest.fixture
async def api() -> AsyncIterator[OzwellAPI]:
    app = OzwellAPI(secret=SECRET, cors_origins=[APP, "https://*.example.org"])
    yield app
    await app.aclose()


async def test_a_preflight_from_an_allowed_origin_is_204(api: OzwellAPI) -> None:
    async with raw_client(api) as http:
        for origin in (APP, "https://a.b.example.org"):
            response = await http.options("/chat/completions", headers=preflight(origin))
            assert response.status_code == 204, response.text
            assert response.content == b""
            assert response.headers["access-control-allow-origin"] == origin
            assert set(response.headers["access-control-allow-methods"].split(", ")) == {"GET", "POST", "DELETE"}
            assert response.headers["access-control-allow-headers"] == SDK_HEADERS
            assert response.headers["access-control-max-age"] == "600"
            assert response.headers["x-request-id"]
        # a preflight naming no headers, and one for a path we do not serve (the real request then gets a 404
        # the page can read)
        response = await http.options("/files/f-1", headers=preflight(APP, "DELETE", None))
        assert response.status_code == 204 and "access-control-allow-headers" not in response.headers
        assert (await http.options("/nowhere", headers=preflight(APP))).status_code == 204


@pytest.mark.parametrize(
    "origin",
    ["https://evil.example", "http://app.example.com", "https://example.org", "null", "https://app.example.com.evil"],
)
async def test_a_preflight_from_another_origin_is_403_without_cors_headers(api: OzwellAPI, origin: str) -> None:
    async with raw_client(api) as http:
        response = await http.options("/chat/completions", headers=preflight(origin))
    assert response.status_code == 403
    error = error_of(response)
    assert (error["type"], error["code"], error["param"]) == ("permission_error", "insufficient_permissions", None)
    assert cors_headers(response) == {}


async def test_a_preflight_asking_for_another_header_is_refused(api: OzwellAPI) -> None:
    async with raw_client(api) as http:
        for asked in ("authorization, x-internal-admin", "cookie", ",".join(["x-stainless-a"] * 65), "a" * 5000):
            response = await http.options("/chat/completions", headers=preflight(APP, headers=asked))
            assert response.status_code == 403, asked[:50]
            assert "access-control-allow-headers" not in response.headers


async def test_without_cors_origins_no_preflight_is_answered() -> None:
    api = OzwellAPI(secret=SECRET)
    _, key = await api.keys.create(name="k", owner="o")
    async with raw_client(api) as http:
        assert (await http.options("/chat/completions", headers=preflight(APP))).status_code == 403
        response = await http.get("/models", headers={"authorization": f"Bearer {key}", "origin": APP})
        assert response.status_code == 200 and cors_headers(response) == {}
        # an OPTIONS request that is no preflight is routed as before
        assert (await http.options("/models", headers={"origin": APP})).status_code == 405
    await api.aclose()


async def test_answers_to_allowed_origins_carry_cors_headers_errors_included() -> None:
    api = OzwellAPI(secret=SECRET, cors_origins="*")  # any origin; scoped keys decide which may use them
    _, key = await api.keys.create(name="k", owner="o", rpm=2)
    _, widget = await api.keys.create(name="w", owner="o", origins=[APP])
    async with raw_client(api) as http:
        auth = {"authorization": f"Bearer {key}", "origin": "https://anyone.example"}
        ok = await http.post("/chat/completions", json=CHAT, headers=auth)
        assert ok.status_code == 200
        assert_cors_for(ok, "https://anyone.example")
        assert ok.headers["x-ratelimit-remaining-requests"] == "1"  # and exposed, so the page can read it
        statuses = {}
        statuses[401] = await http.get("/models", headers={**auth, "authorization": "Bearer ozw_" + "x" * 43})
        statuses[403] = await http.get(
            "/models", headers={"authorization": f"Bearer {widget}", "origin": "https://x.y"}
        )
        statuses[404] = await http.get("/nowhere", headers=auth)
        statuses[405] = await http.put("/models", headers=auth)
        await http.get("/models", headers=auth)
        statuses[429] = await http.get("/models", headers=auth)
        for status, response in statuses.items():
            assert response.status_code == status, response.text
            validate("ErrorResponse", response.json())
            assert_cors_for(response, response.request.headers["origin"])
        assert statuses[429].headers["retry-after"]
    await api.aclose()


async def test_answers_to_other_origins_or_no_origin_carry_none(api: OzwellAPI) -> None:
    _, key = await api.keys.create(name="k", owner="o")
    async with raw_client(api) as http:
        for headers in ({}, {"origin": "https://evil.example"}, {"origin": "null"}):
            response = await http.get("/models", headers={"authorization": f"Bearer {key}", **headers})
            assert response.status_code == 200
            assert cors_headers(response) == {}
            response = await http.get("/models", headers=headers)
            assert response.status_code == 401 and cors_headers(response) == {}


async def test_a_stream_carries_cors_headers(api: OzwellAPI) -> None:
    _, key = await api.keys.create(name="k", owner="o")
    async with raw_client(api) as http:
        headers = {"authorization": f"Bearer {key}", "origin": APP}
        async with http.stream("POST", "/chat/completions", json={**CHAT, "stream": True}, headers=headers) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert_cors_for(response, APP)
            body = b"".join([chunk async for chunk in response.aiter_bytes()])
    assert body.endswith(b"data: [DONE]\n\n")


async def test_the_sdk_sees_the_cors_headers(api: OzwellAPI) -> None:
    _, widget = await api.keys.create(name="w", owner="o", origins=[APP], endpoints=["chat.completions"])
    client = async_openai(api, widget, default_headers={"Origin": APP})
    raw = await client.chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["access-control-allow-origin"] == APP
    assert raw.parse().choices[0].message.content == "hi"
    await client.close()


async def test_cors_over_a_real_socket_and_mounted_in_fastapi() -> None:
    api = OzwellAPI(secret=SECRET, cors_origins=[APP], cors_max_age=7200)
    _, widget = await api.keys.create(name="w", owner="o", origins=[APP])
    host = FastAPI()

    @host.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    host.mount("/v1", api)
    with uvicorn_server(host) as base:
        async with httpx.AsyncClient(base_url=base) as http:
            response = await http.options("/v1/chat/completions", headers=preflight(APP))
            assert response.status_code == 204
            assert response.headers["access-control-max-age"] == "7200"
            headers = {"authorization": f"Bearer {widget}", "origin": APP}
            response = await http.post("/v1/chat/completions", json=CHAT, headers=headers)
            assert response.status_code == 200
            assert_cors_for(response, APP)
            # the host's own routes are untouched
            hello = await http.get("/hello", headers={"origin": APP})
            assert hello.json() == {"hello": "world"} and cors_headers(hello) == {}
            denied = await http.options("/v1/models", headers=preflight("https://evil.example", "GET"))
            assert denied.status_code == 403 and cors_headers(denied) == {}


async def test_serve_builds_the_app_with_its_cors_origins() -> None:
    config = ServeConfig(store_url="memory://", cors_origins=(APP, "https://*.example.org"), secret=SECRET)
    app = build_app(config)
    try:
        async with raw_client(app) as http:
            assert (
                await http.options("/v1/models", headers=preflight("https://a.example.org", "GET"))
            ).status_code == 204
            assert (
                await http.options("/v1/models", headers=preflight("https://evil.example", "GET"))
            ).status_code == 403
    finally:
        await app.api.aclose()
    plain = build_app(ServeConfig(store_url="memory://", secret=SECRET))
    try:
        async with raw_client(plain) as http:
            assert (await http.options("/v1/models", headers=preflight(APP, "GET"))).status_code == 403
    finally:
        await plain.api.aclose()


@pytest.mark.parametrize("origins", [["https://a.example/path"], ["null"], ["ftp//x"], [""]])
def test_bad_cors_origins_fail_at_construction(origins: list[str]) -> None:
    with pytest.raises(ValueError, match="origin"):
        OzwellAPI(cors_origins=origins)


def test_a_negative_max_age_fails_at_construction() -> None:
    with pytest.raises(ValueError, match="cors_max_age"):
        OzwellAPI(cors_origins=[APP], cors_max_age=-1)
