"""Host authentication: a FastAPI host's session cookie signs its users in to the mounted API, no key needed; the
chain's order, limits per principal, failures as bare 500s, and the cross-origin guard on ambient credentials."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import httpx2
import openai
import pytest
from fastapi import FastAPI, Response
from starlette.requests import Request

from ozwell_asgi import AuthenticationError, OzwellAPI, Principal, UsageEvent, user_principal
from ozwell_asgi.ratelimit import Plan
from tests.harness import async_openai, uvicorn_server
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
SESSIONS = {"s-alice": "alice", "s-bob": "bob", "s-carol": "carol"}
USERS = {
    "alice": user_principal("alice", "pro", scopes=["api", "admin"]),
    "bob": user_principal("bob", "free", models=["echo"]),
    "carol": user_principal("carol", "free", rpm=2),
}
CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


def session_user(request: Request) -> Principal | None:
    """The host's own sign-in: a session cookie naming a user (what a real host reads from its session store)."""
    user = SESSIONS.get(request.cookies.get("session", ""))
    return None if user is None else USERS[user]


def host_with(api: OzwellAPI) -> FastAPI:
    host = FastAPI()

    @host.post("/login/{user}")
    async def login(user: str, response: Response) -> dict[str, str]:
        session = next(s for s, u in SESSIONS.items() if u == user)
        response.set_cookie("session", session, httponly=True, samesite="lax")
        return {"user": user}

    host.mount("/v1", api)
    return host


def raw(app: Any) -> httpx2.AsyncClient:
    return httpx2.AsyncClient(
        transport=httpx2.ASGITransport(app=app, raise_app_exceptions=False), base_url="http://testserver"
    )


def cookie(user: str) -> dict[str, str]:
    session = next(s for s, u in SESSIONS.items() if u == user)
    return {"cookie": f"session={session}"}


def error_of(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    validate("ErrorResponse", body)
    return dict(body["error"])


async def test_a_signed_in_user_calls_the_api_without_a_key() -> None:
    api = OzwellAPI(secret=SECRET, authenticators=[session_user])
    host = host_with(api)
    _, alice_key = await api.keys.create(name="alice's server", owner="alice")
    # The SDK needs some api_key; the host's session decides, before any key is looked at.
    alice = async_openai(host, "unused", base_url="http://testserver/v1", default_headers=cookie("alice"))
    completion = await alice.chat.completions.create(**CHAT)
    assert completion.choices[0].message.content == "hi"
    created = await alice.files.create(file=("notes.txt", b"mine"), purpose="user_data")
    # the user's files are the owner's: alice's key sees it, bob's session does not
    by_key = async_openai(host, alice_key, base_url="http://testserver/v1")
    assert [f.id for f in (await by_key.files.list()).data] == [created.id]
    bob = async_openai(host, "unused", base_url="http://testserver/v1", default_headers=cookie("bob"))
    assert (await bob.files.list()).data == []
    with pytest.raises(openai.NotFoundError):
        await bob.files.retrieve(created.id)
    with pytest.raises(openai.PermissionDeniedError):  # bob's principal allows echo only
        await bob.embeddings.create(model="echo-embedding", input="x")
    # no session: the key decides, and "unused" is no key
    anonymous = async_openai(host, "unused", base_url="http://testserver/v1", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        await anonymous.models.list()
    assert info.value.code == "invalid_api_key"
    for client in (alice, by_key, bob, anonymous):
        await client.close()
    await api.aclose()


async def test_a_user_signed_in_over_a_real_socket() -> None:
    api = OzwellAPI(secret=SECRET, authenticators=[session_user])
    with uvicorn_server(host_with(api)) as base:
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 401
            assert (await http.post("/login/alice")).json() == {"user": "alice"}  # sets the session cookie
            response = await http.post("/v1/chat/completions", json=CHAT)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "hi"
            # the browser's own page posting to its own origin passes the cross-origin guard
            same = await http.post("/v1/chat/completions", json=CHAT, headers={"origin": base})
            assert same.status_code == 200, same.text
            cross = await http.post("/v1/chat/completions", json=CHAT, headers={"origin": "https://evil.example"})
            assert cross.status_code == 403


async def test_limits_and_usage_are_per_principal() -> None:
    events: list[UsageEvent] = []
    api = OzwellAPI(secret=SECRET, authenticators=[session_user], on_usage=events.append)
    async with raw(host_with(api)) as http:
        statuses = [(await http.post("/v1/chat/completions", json=CHAT, headers=cookie("carol"))) for _ in range(3)]
        assert [r.status_code for r in statuses] == [200, 200, 429]
        assert statuses[0].headers["x-ratelimit-limit-requests"] == "2"
        assert error_of(statuses[2])["code"] == "rate_limit_exceeded"
        assert (await http.post("/v1/chat/completions", json=CHAT, headers=cookie("bob"))).status_code == 200
    await api.usage.flush()  # events reach hooks off the response path; every request emits one, refusals too
    assert [(e.key_id, e.owner, e.status) for e in events] == [
        ("user:carol", "carol", 200),
        ("user:carol", "carol", 200),
        ("user:carol", "carol", 429),
        ("user:bob", "bob", 200),
    ]
    await api.aclose()


async def test_the_chain_runs_in_order_sync_or_async_and_falls_back_to_keys() -> None:
    calls: list[str] = []

    async def by_header(request: Request) -> Principal | None:
        calls.append("header")
        user = request.headers.get("x-user")
        return None if user is None else user_principal(user, subject=f"header:{user}")

    def by_cookie(request: Request) -> Principal | None:
        calls.append("cookie")
        return session_user(request)

    def never(request: Request) -> Principal | None:
        calls.append("never")
        return None

    api = OzwellAPI(secret=SECRET, authenticators=[by_header, by_cookie, never])
    _, key = await api.keys.create(name="k", owner="dave")
    async with raw(host_with(api)) as http:
        response = await http.get("/v1/files", headers={"x-user": "erin", **cookie("alice")})
        assert response.status_code == 200 and calls == ["header"]
        calls.clear()
        assert (await http.get("/v1/files", headers=cookie("alice"))).status_code == 200
        assert calls == ["header", "cookie"]
        calls.clear()
        assert (await http.get("/v1/files", headers={"authorization": f"Bearer {key}"})).status_code == 200
        assert calls == ["header", "cookie", "never"]
        response = await http.get("/v1/files")
        assert (response.status_code, error_of(response)["code"]) == (401, "missing_api_key")


def failing(behaviour: str) -> Callable[[Request], Any]:
    def authenticator(request: Request) -> Any:
        if behaviour == "raise":
            raise RuntimeError("session store down: postgres://admin:hunter2@db")
        if behaviour == "ozwell":
            raise AuthenticationError("Your session has expired; sign in again.", code="session_expired")
        return "alice"  # not a Principal

    return authenticator


async def async_raiser(request: Request) -> Principal | None:
    raise KeyError("hunter2")


@pytest.mark.parametrize("authenticator", [failing("raise"), failing("wrong type"), async_raiser])
async def test_a_failing_authenticator_is_a_bare_500_and_logged(
    authenticator: Callable[[Request], Principal | Awaitable[Principal | None] | None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="ozwell_asgi")
    api = OzwellAPI(secret=SECRET, authenticators=[authenticator])
    async with raw(host_with(api)) as http:
        response = await http.post("/v1/chat/completions", json=CHAT, headers=cookie("alice"))
    assert response.status_code == 500
    error = error_of(response)
    assert (error["type"], error["code"], error["param"]) == ("server_error", "internal_error", None)
    assert "hunter2" not in response.text and "alice" not in response.text
    records = [r for r in caplog.records if "host authenticator" in r.getMessage()]
    assert len(records) == 1
    assert authenticator.__qualname__ in records[0].getMessage()


async def test_an_ozwell_error_from_the_host_is_sent_as_it_is() -> None:
    api = OzwellAPI(secret=SECRET, authenticators=[failing("ozwell")])
    async with raw(host_with(api)) as http:
        response = await http.get("/v1/models")
    assert response.status_code == 401
    assert error_of(response) == {
        "message": "Your session has expired; sign in again.",
        "type": "authentication_error",
        "param": None,
        "code": "session_expired",
    }


@pytest.mark.parametrize(
    ("headers", "cors_origins", "status"),
    [
        ({}, (), 200),  # no browser headers: not a browser
        ({"origin": "https://evil.example"}, (), 403),
        ({"origin": "https://evil.example", "sec-fetch-site": "cross-site"}, (), 403),
        ({"origin": "https://api.example.com", "sec-fetch-site": "same-site"}, (), 403),
        ({"sec-fetch-site": "cross-site"}, (), 403),
        ({"origin": "http://testserver"}, (), 200),  # Origin matches Host
        ({"origin": "http://testserver", "sec-fetch-site": "same-origin"}, (), 200),
        ({"sec-fetch-site": "none"}, (), 200),  # typed in the address bar, a bookmark
        ({"origin": "https://app.example.com", "sec-fetch-site": "cross-site"}, ("https://app.example.com",), 200),
        ({"origin": "https://x.example.com"}, ("https://*.example.com",), 200),
        ({"origin": "https://evil.example"}, ("*",), 403),  # any origin may call with keys, none with cookies
    ],
)
async def test_host_credentials_are_refused_cross_origin(
    headers: dict[str, str], cors_origins: tuple[str, ...], status: int
) -> None:
    api = OzwellAPI(secret=SECRET, authenticators=[session_user], cors_origins=cors_origins)
    async with raw(host_with(api)) as http:
        response = await http.post("/v1/chat/completions", json=CHAT, headers={**cookie("alice"), **headers})
        assert response.status_code == status, response.text
        if status == 403:
            error = error_of(response)
            assert (error["code"], error["param"]) == ("insufficient_permissions", None)
            assert "Cross-origin" in error["message"]
        # reading is not a state change: a cross-site GET passes (CORS keeps its answer from other pages)
        assert (await http.get("/v1/models", headers={**cookie("alice"), **headers})).status_code == 200


async def test_keys_are_not_ambient_so_they_pass_from_any_origin() -> None:
    api = OzwellAPI(secret=SECRET, authenticators=[session_user])
    _, key = await api.keys.create(name="k", owner="alice")
    async with raw(host_with(api)) as http:
        headers = {"authorization": f"Bearer {key}", "origin": "https://evil.example", "sec-fetch-site": "cross-site"}
        assert (await http.post("/v1/chat/completions", json=CHAT, headers=headers)).status_code == 200


async def test_a_signed_in_admin_makes_a_scoped_key_for_its_widget() -> None:
    api = OzwellAPI(secret=SECRET, authenticators=[session_user])
    async with raw(host_with(api)) as http:
        body = {"name": "widget", "origins": ["https://shop.example.com"], "endpoints": ["chat.completions"]}
        response = await http.post("/v1/api-keys", json=body, headers=cookie("alice"))
        assert response.status_code == 201, response.text
        created = response.json()
        assert (created["owner"], created["plan"], created["secret"][:11]) == ("alice", "free", "ozw_scoped_")
        # bob holds no admin scope
        response = await http.post("/v1/api-keys", json=body, headers=cookie("bob"))
        assert (response.status_code, error_of(response)["code"]) == (403, "insufficient_permissions")
        widget = {"authorization": f"Bearer {created['secret']}", "origin": "https://shop.example.com"}
        assert (await http.post("/v1/chat/completions", json=CHAT, headers=widget)).status_code == 200


def test_user_principal() -> None:
    carol = user_principal("carol", "pro", rpm=5, models=["echo", "gpt-*"], origins=["HTTPS://A.example.com"])
    assert (carol.key_id, carol.owner, carol.plan, carol.quota.rpm, carol.quota.tpm) == (
        "user:carol",
        "carol",
        "pro",
        5,
        100_000,
    )
    assert carol.models is not None and carol.origins == ("https://a.example.com",)
    assert carol.scopes == frozenset({"api"}) and carol.endpoints is None
    plans = {"team": Plan("team", rpm=7, tpm=None)}
    assert user_principal("x", "team", plans=plans, subject="team:1").quota.rpm == 7
    with pytest.raises(ValueError, match="platinum"):
        user_principal("x", "platinum")
    with pytest.raises(ValueError, match="unknown endpoints"):
        user_principal("x", endpoints=["chat"])
    with pytest.raises(ValueError, match="null"):
        user_principal("x", origins=["null"])
    with pytest.raises(ValueError, match="owner"):
        user_principal("")
    with pytest.raises(TypeError):
        OzwellAPI(secret=SECRET, authenticators=["not callable"])  # type: ignore[list-item]
