"""Scoped keys (``ozw_scoped_…``): made over HTTP and by the CLI with origins, endpoints and models; refused with
403 ``insufficient_permissions`` from another origin, without one, on another endpoint or model; within the
creator's grant; rotated as scoped keys; their fields persisted by every bundled store (and added to SQL tables
made before they existed)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import sqlalchemy as sa

from ozwell_asgi import OzwellAPI, user_principal
from ozwell_asgi.auth import Grant, exceeds
from ozwell_asgi.cli import main
from ozwell_asgi.origins import OriginSet, normalize_origin
from ozwell_asgi.stores.sql import SQLKeyStore
from ozwell_asgi.stores.urls import key_store_from_url
from tests.harness import async_openai, raw_client
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
APP = "https://app.example.com"


def auth(key: str, origin: str | None = APP) -> dict[str, str]:
    headers = {"authorization": f"Bearer {key}"}
    if origin is not None:
        headers["origin"] = origin
    return headers


def envelope(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    validate("ErrorResponse", body)
    return dict(body["error"])


def assert_denied(response: httpx2.Response, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == 403, response.text
    error = envelope(response)
    assert (error["type"], error["code"], error["param"]) == ("permission_error", "insufficient_permissions", param)
    return error


class World:
    def __init__(self, api: OzwellAPI, admin: str) -> None:
        self.api = api
        self.admin = admin

    async def scoped(self, **body: Any) -> dict[str, Any]:
        async with raw_client(self.api) as http:
            response = await http.post("/api-keys", json={"name": "widget", **body}, headers=auth(self.admin, None))
        assert response.status_code == 201, response.text
        created: dict[str, Any] = response.json()
        return created


@pytest.fixture
async def world() -> AsyncIterator[World]:
    api = OzwellAPI(secret=SECRET)
    _, admin = await api.keys.create(name="ops", owner="acme", scopes=["api", "admin"], plan="enterprise")
    yield World(api, admin)
    await api.aclose()


# ----------------------------------------------------------------------------------------------- made over HTTP


async def test_a_scoped_key_is_made_over_http_with_its_origins_endpoints_and_models(world: World) -> None:
    created = await world.scoped(
        origins=["HTTPS://App.Example.com:443/", "http://localhost:5173", "https://*.example.org"],
        endpoints=["chat.completions", "models", "chat.completions"],
        models=["echo"],
    )
    secret = created["secret"]
    assert secret.startswith("ozw_scoped_") and len(secret) == len("ozw_scoped_") + 43
    assert created["redacted_value"] == secret[:15] + "…"  # the prefix and four characters tell keys apart
    assert created["origins"] == [APP, "http://localhost:5173", "https://*.example.org"]  # canonical
    assert created["endpoints"] == ["chat.completions", "models"]
    assert (created["models"], created["scopes"]) == (["echo"], ["api"])
    async with raw_client(world.api) as http:
        listed = (await http.get(f"/api-keys/{created['id']}", headers=auth(world.admin, None))).json()
    assert (listed["origins"], listed["endpoints"]) == (created["origins"], created["endpoints"])


async def test_the_sdk_uses_a_scoped_key_from_its_origin(world: World) -> None:
    secret = (await world.scoped(origins=[APP], endpoints=["chat.completions", "models"], models=["echo"]))["secret"]
    client = async_openai(world.api, secret, default_headers={"Origin": APP})
    completion = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content == "hi"
    assert [m.id for m in (await client.models.list()).data] == ["echo"]
    with pytest.raises(openai.PermissionDeniedError) as info:  # embeddings: not one of its endpoints
        await client.embeddings.create(model="echo-embedding", input="x")
    assert info.value.code == "insufficient_permissions"
    await client.close()
    for origin in ("https://evil.example", None):
        headers = {"Origin": origin} if origin else {}
        other = async_openai(world.api, secret, default_headers=headers, max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as info:
            await other.models.list()
        assert info.value.status_code == 403 and info.value.code == "insufficient_permissions"
        await other.close()


async def test_another_origin_no_origin_another_endpoint_or_model_is_403(world: World) -> None:
    secret = (
        await world.scoped(
            origins=[APP, "https://*.example.org"], endpoints=["chat.completions", "models", "files"], models=["echo"]
        )
    )["secret"]
    chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
    async with raw_client(world.api) as http:
        for origin in (APP, "https://a.example.org", "https://a.b.example.org", "HTTPS://APP.EXAMPLE.COM"):
            response = await http.post("/chat/completions", json=chat, headers=auth(secret, origin))
            assert response.status_code == 200, (origin, response.text)
        for origin in (
            "https://evil.example",
            "http://app.example.com",  # another scheme
            "https://app.example.com:8443",  # another port
            "https://example.org",  # a wildcard covers subdomains only
            "https://evil.com/.example.org",  # not a host
            "https://evil.com?.example.org",
            "null",
            "https://app.example.com.evil.com",
            "x" * 400,
        ):
            error = assert_denied(await http.post("/chat/completions", json=chat, headers=auth(secret, origin)))
            assert "origin" in error["message"]
        error = assert_denied(await http.post("/chat/completions", json=chat, headers=auth(secret, None)))
        assert "no Origin header" in error["message"]
        # the endpoint: embeddings are not among the key's
        body = {"model": "echo-embedding", "input": "x"}
        error = assert_denied(await http.post("/embeddings", json=body, headers=auth(secret)))
        assert "'embeddings'" in error["message"]
        # the model: 403 naming it
        response = await http.post("/chat/completions", json={**chat, "model": "echo-embedding"}, headers=auth(secret))
        assert_denied(response, "model")
        assert (await http.get("/files", headers=auth(secret))).status_code == 200
        # admin routes: a scoped key holds only "api"
        assert_denied(await http.get("/api-keys", headers=auth(secret)))


async def test_endpoints_alone_restrict_without_an_origin_check(world: World) -> None:
    created = await world.scoped(endpoints=["models"])
    assert created["secret"].startswith("ozw_scoped_") and created["origins"] is None
    async with raw_client(world.api) as http:
        assert (await http.get("/models", headers=auth(created["secret"], None))).status_code == 200
        assert (await http.get("/models", headers=auth(created["secret"], "https://any.example"))).status_code == 200
        chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
        assert_denied(await http.post("/chat/completions", json=chat, headers=auth(created["secret"], None)))
        assert_denied(await http.get("/files", headers=auth(created["secret"], None)))


async def test_a_plain_key_ignores_the_origin(world: World) -> None:
    _, plain = await world.api.keys.create(name="server", owner="acme")
    assert plain.startswith("ozw_") and not plain.startswith("ozw_scoped_")
    async with raw_client(world.api) as http:
        for origin in (None, "https://evil.example"):
            assert (await http.get("/models", headers=auth(plain, origin))).status_code == 200


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"origins": ["https://a.example"], "scopes": ["api", "admin"]}, "scopes", "holds no scope but"),
        ({"endpoints": ["models"], "scopes": ["admin"]}, "scopes", "holds no scope but"),
        ({"origins": []}, "origins", "at least one"),
        ({"endpoints": []}, "endpoints", "at least one"),
        ({"origins": ["null"]}, "origins", "null"),
        ({"origins": ["*"]}, "origins", "not an origin"),
        ({"origins": ["https://a.example/path"]}, "origins", "no path"),
        ({"origins": ["https://user@a.example"]}, "origins", "no path"),
        ({"origins": ["app.example.com"]}, "origins", "scheme://host"),
        ({"origins": ["https://a.example:99999"]}, "origins", "port"),
        ({"origins": ["https://*.com"]}, "origins", "two labels"),
        ({"origins": ["https://a.*.example"]}, "origins", "wildcard"),
        ({"origins": ["https://bücher.example"]}, "origins", "punycode"),
        ({"origins": ["https://a.example\x00"]}, "origins", "punycode"),
        ({"origins": [f"https://a{i}.example" for i in range(65)]}, "origins", "at most 64"),
        ({"endpoints": ["chat"]}, "endpoints", "Unknown endpoint 'chat'"),
        ({"endpoints": ["models"] * 21}, "endpoints", "at most 20"),
        ({"origins": "https://a.example"}, "origins", None),
        ({"endpoints": [1]}, "endpoints[0]", None),
    ],
)
async def test_bad_scoped_fields_are_400_naming_the_param(
    world: World, body: dict[str, Any], param: str, words: str | None
) -> None:
    async with raw_client(world.api) as http:
        response = await http.post("/api-keys", json={"name": "w", **body}, headers=auth(world.admin, None))
    assert response.status_code == 400, response.text
    error = envelope(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    if words is not None:
        assert words in error["message"]
    assert [k.name for k in await world.api.keys.list()] == ["ops"]  # nothing stored


async def test_rotating_a_scoped_key_keeps_it_scoped(world: World) -> None:
    created = await world.scoped(origins=[APP])
    async with raw_client(world.api) as http:
        rotated = (await http.post(f"/api-keys/{created['id']}/rotate", headers=auth(world.admin, None))).json()
        assert rotated["secret"].startswith("ozw_scoped_") and rotated["secret"] != created["secret"]
        assert rotated["redacted_value"] == rotated["secret"][:15] + "…"
        assert rotated["origins"] == [APP]
        assert (await http.get("/models", headers=auth(created["secret"]))).status_code == 401
        assert (await http.get("/models", headers=auth(rotated["secret"]))).status_code == 200
        assert_denied(await http.get("/models", headers=auth(rotated["secret"], "https://evil.example")))


# ------------------------------------------------------------------------------------------ grants and origins


def test_grants_cover_origins_and_endpoints() -> None:
    def grant(origins: tuple[str, ...] | None, endpoints: set[str] | None) -> Grant:
        return Grant(
            frozenset({"api"}), None, 10, 10, None, origins, None if endpoints is None else frozenset(endpoints)
        )

    plain = grant(None, None)
    wide = grant(("https://*.example.com", APP), {"chat.completions", "models"})
    assert exceeds(wide, plain) is None  # a plain key holds every endpoint from anywhere
    assert exceeds(plain, wide) == "endpoints"
    assert exceeds(grant(None, {"models"}), wide) == "origins"  # no restriction is beyond a restricted holder
    assert exceeds(grant(("https://a.b.example.com",), {"models"}), wide) is None
    assert exceeds(grant(("https://*.b.example.com",), {"models"}), wide) is None  # a narrower wildcard
    assert exceeds(grant(("https://example.com",), {"models"}), wide) == "origins"
    exact = grant((APP,), {"models"})
    assert exceeds(grant(("https://*.app.example.com",), {"models"}), exact) == "origins"  # no subdomain of it
    assert exceeds(grant(("http://a.example.com",), {"models"}), wide) == "origins"
    assert exceeds(grant((APP,), {"files"}), wide) == "endpoints"


def test_origin_forms() -> None:
    assert normalize_origin(" HTTP://LocalHost:80/ ") == "http://localhost"
    assert normalize_origin("https://[::1]:8443") == "https://[::1]:8443"
    assert normalize_origin("chrome-extension://abcdefghijklmnop") == "chrome-extension://abcdefghijklmnop"
    assert normalize_origin("*", allow_any=True) == "*"
    allowed = OriginSet([APP, "https://*.example.org:8443"])
    assert allowed.allows("https://x.example.org:8443")
    assert not allowed.allows("https://x.example.org")
    assert not allowed.allows("https://-.example.org:8443")
    assert OriginSet(["*"]).allows("https://anything.example")


async def test_a_restricted_host_admin_grants_only_within_its_origins_and_endpoints() -> None:
    """A host principal may be an admin restricted to origins and endpoints; the keys it makes and sees stay
    within them, the same rule (``exceeds``) as for every other dimension."""
    boss = user_principal(
        "acme",
        "enterprise",
        scopes=["api", "admin"],
        origins=["https://*.example.com"],
        endpoints=["chat.completions", "models", "api-keys"],
    )
    api = OzwellAPI(secret=SECRET, authenticators=[lambda request: boss], cors_origins=[APP])
    plain, _ = await api.keys.create(name="server", owner="acme")
    try:
        async with raw_client(api) as http:
            headers = {"origin": APP}

            async def create(**body: Any) -> httpx2.Response:
                return await http.post("/api-keys", json={"name": "w", **body}, headers=headers)

            inherited = await create()
            assert inherited.status_code == 201, inherited.text
            made = inherited.json()
            assert made["secret"].startswith("ozw_scoped_")  # the holder's restriction makes a scoped key
            assert (made["origins"], made["endpoints"]) == (
                ["https://*.example.com"],
                ["chat.completions", "models"],
            )
            narrower = await create(origins=[APP], endpoints=["models"])
            assert narrower.status_code == 201, narrower.text
            assert_denied(await create(origins=None), "origins")
            assert_denied(await create(origins=["https://evil.example"]), "origins")
            assert_denied(await create(endpoints=None), "endpoints")
            assert_denied(await create(origins=[APP], endpoints=["files"]), "endpoints")
            # it sees the keys within its grant, and the plain key not at all
            listed = {k["id"] for k in (await http.get("/api-keys", headers=headers)).json()["data"]}
            assert listed == {made["id"], narrower.json()["id"]}
            assert (await http.get(f"/api-keys/{plain.id}", headers=headers)).status_code == 404
            # and calls nothing outside its own endpoints, nor from another origin
            assert_denied(await http.get("/files", headers=headers))
            assert_denied(await http.get("/models", headers={"origin": "https://evil.example"}))
    finally:
        await api.aclose()


# --------------------------------------------------------------------------------------------------- persistence


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services), "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    redis: str = request.getfixturevalue("redis_url")
    return redis


async def test_scoped_keys_persist_on_every_store(store_url: str, redis_prefix: str) -> None:
    """Made by one app, enforced by another on the same storage (as another process would), fields intact."""

    def app() -> OzwellAPI:
        store = key_store_from_url(store_url, redis_prefix=redis_prefix)
        return OzwellAPI(key_store=store, secret=SECRET, key_cache_ttl=0)

    first, second = app(), app()
    try:
        _, admin = await first.keys.create(name="ops", owner="acme", scopes=["admin"], plan="enterprise")
        async with raw_client(first) as http:
            body = {"name": "w", "origins": [APP, "https://*.example.org"], "endpoints": ["models"], "models": ["echo"]}
            created = (await http.post("/api-keys", json=body, headers=auth(admin, None))).json()
        stored = await second.keys.get(created["id"])
        assert stored is not None
        assert stored.origins == (APP, "https://*.example.org")
        assert stored.endpoints == ("models",)
        assert stored.models == ("echo",)
        assert stored.scoped and stored.hint == created["secret"][:15]
        async with raw_client(second) as http:
            response = await http.get("/models", headers=auth(created["secret"], "https://x.example.org"))
            assert [m["id"] for m in response.json()["data"]] == ["echo"]
            assert_denied(await http.get("/models", headers=auth(created["secret"], "https://evil.example")))
            chat = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}
            assert_denied(await http.post("/chat/completions", json=chat, headers=auth(created["secret"])))
    finally:
        for api in (first, second):
            await api.aclose()
            await api.key_store.aclose()  # type: ignore[attr-defined]


OLD_TABLE = """CREATE TABLE ozwell_api_keys (
    id VARCHAR(255) PRIMARY KEY, key_hash VARCHAR(255) NOT NULL UNIQUE, owner VARCHAR(255) NOT NULL,
    name TEXT NOT NULL, plan VARCHAR(255) NOT NULL, rpm BIGINT, tpm BIGINT, models TEXT, scopes TEXT NOT NULL,
    created_at BIGINT NOT NULL, expires_at BIGINT, revoked_at BIGINT, hint VARCHAR(255) NOT NULL)"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'old.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def test_a_key_table_from_before_scoped_keys_gets_the_new_columns(sql_url: str) -> None:
    url = sql_url
    old = SQLKeyStore.from_url(url)
    async with old.db.engine.begin() as conn:
        await conn.execute(sa.text(OLD_TABLE))
        await conn.execute(
            sa.text(
                "INSERT INTO ozwell_api_keys VALUES ('key_old', 'h', 'acme', 'old', 'free', NULL, NULL, NULL, "
                "'[\"api\"]', 1, NULL, NULL, 'ozw_Old1')"
            )
        )
    await old.aclose()
    stores = [SQLKeyStore.from_url(url) for _ in range(3)]  # processes starting at once all migrate safely
    try:
        import anyio

        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(store.db.ensure_tables)
        got = await stores[0].get("key_old")
        assert got is not None and (got.origins, got.endpoints, got.scoped) == (None, None, False)
        api = OzwellAPI(key_store=stores[1], secret=SECRET, key_cache_ttl=0)
        key, secret = await api.keys.create(name="w", owner="acme", origins=[APP], endpoints=["models"])
        assert await stores[2].get(key.id) == key
        async with raw_client(api) as http:
            assert (await http.get("/models", headers=auth(secret))).status_code == 200
            assert_denied(await http.get("/models", headers=auth(secret, None)))
    finally:
        for store in stores:
            await store.aclose()


# ------------------------------------------------------------------------------------------------------- the CLI


def test_keys_create_makes_a_scoped_key(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store, secret_file = f"sqlite:///{tmp_path / 'k.db'}", str(tmp_path / "s")
    common = ["--store", store, "--secret-file", secret_file]
    argv = ["keys", "create", "--name", "w", *common, "--origins", "https://App.example.com, https://*.example.org"]
    assert main([*argv, "--endpoints", "chat.completions,models", "--models", "echo"]) == 0
    out = capsys.readouterr().out
    secret = out.splitlines()[-1]
    assert secret.startswith("ozw_scoped_")
    assert "origins: https://app.example.com, https://*.example.org" in out
    assert "endpoints: chat.completions, models" in out
    assert main(["keys", "list", "--json", "--store", store]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert (row["origins"], row["endpoints"], row["hint"]) == (
        ["https://app.example.com", "https://*.example.org"],
        ["chat.completions", "models"],
        secret[:15],
    )
    for bad in (["--origins", "null"], ["--endpoints", "chat"], ["--origins", APP, "--scopes", "admin"]):
        assert main(["keys", "create", "--name", "x", *common, *bad]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "error" in err
    assert main(["keys", "list", "--json", "--store", store]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 1
