"""A key never reaches beyond its own grant; a key's inputs are bounded and stored safely on every adapter.

The /api-keys API against stronger keys along each dimension (scopes, models, plan, rpm/tpm, expiry), the
defaults a create request gets from its creator, the caps on model patterns and their one-time compilation, NUL
characters on every key store (PostgreSQL included) with no key hash in any log line, duration parsing in our own
words, and an expiry that never comes early.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import random
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from ozwell_asgi import OzwellAPI, Settings
from ozwell_asgi.auth import (
    DEFAULT_MAX_MODEL_PATTERN_LENGTH,
    DEFAULT_MAX_MODEL_PATTERNS,
    Authenticator,
    Grant,
    KeyHasher,
    KeyManager,
    ModelPatterns,
    exceeds,
    model_allowed,
    models_within,
    parse_duration,
)
from ozwell_asgi.cli import main as cli_main
from ozwell_asgi.errors import InvalidRequestError
from ozwell_asgi.protocols import KeyStore
from ozwell_asgi.stores.memory import MemoryKeyStore
from ozwell_asgi.stores.sql import KeyStoreStatementError, SQLKeyStore
from ozwell_asgi.stores.urls import key_store_from_url
from ozwell_asgi.types import APIKey
from tests.harness import raw_client
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
DAY = 86400


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def envelope(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def not_found(key_id: str) -> dict[str, Any]:
    return {
        "message": f"No API key found with id '{key_id}'.",
        "type": "invalid_request_error",
        "param": None,
        "code": "api_key_not_found",
    }


def refused(response: httpx2.Response, param: str) -> str:
    """Assert a 403 ``insufficient_permissions`` naming ``param``; returns the message."""
    assert response.status_code == 403, response.text
    error = envelope(response)
    assert (error["type"], error["param"], error["code"]) == ("permission_error", param, "insufficient_permissions")
    return str(error["message"])


@pytest.fixture
async def api() -> AsyncIterator[OzwellAPI]:
    app = OzwellAPI(secret=SECRET)
    yield app
    await app.aclose()


async def assert_out_of_reach(
    http: httpx2.AsyncClient, api: OzwellAPI, admin: str, target: APIKey, secret: str
) -> None:
    """``target`` is invisible to ``admin`` on every /api-keys route and survives every attempt on it."""
    listing = await http.get("/api-keys", headers=auth(admin))
    assert listing.status_code == 200
    assert target.id not in {k["id"] for k in listing.json()["data"]}
    assert target.id not in listing.text
    for method, path in (
        ("GET", f"/api-keys/{target.id}"),
        ("DELETE", f"/api-keys/{target.id}"),
        ("POST", f"/api-keys/{target.id}/rotate"),
    ):
        response = await http.request(method, path, headers=auth(admin))
        assert response.status_code == 404, (method, path, response.text)
        assert envelope(response) == not_found(target.id), (method, path)  # exactly as for an unknown id
    # Neither revoked nor rotated: stored as it was, and its secret still authenticates.
    assert await api.keys.get(target.id) == target
    assert (await api.services.authenticator.authenticate(f"Bearer {secret}")).key_id == target.id


async def assert_in_reach(http: httpx2.AsyncClient, admin: str, target: APIKey) -> None:
    listing = await http.get("/api-keys", headers=auth(admin))
    assert target.id in {k["id"] for k in listing.json()["data"]}
    response = await http.get(f"/api-keys/{target.id}", headers=auth(admin))
    assert response.status_code == 200 and response.json()["id"] == target.id
    response = await http.post(f"/api-keys/{target.id}/rotate", headers=auth(admin))
    assert response.status_code == 200 and response.json()["secret"].startswith("ozw_")
    response = await http.delete(f"/api-keys/{target.id}", headers=auth(admin))
    assert response.status_code == 200 and response.json()["deleted"] is True


# ------------------------------------------------------------------------------------- the two reported attacks


async def test_plain_admin_cannot_rotate_or_revoke_a_global_key_of_its_owner(api: OzwellAPI) -> None:
    """`keys create` without --owner gives every key the owner "default": the out-of-the-box setup."""
    root_key, root = await api.keys.create(name="root", owner="default", scopes=["api", "admin:global"])
    plain_key, plain = await api.keys.create(name="ops", owner="default", scopes=["api", "admin"])
    bobs_key, _ = await api.keys.create(name="bob", owner="bob")
    async with raw_client(api) as http:
        await assert_out_of_reach(http, api, plain, root_key, root)
        # The global key is untouched: same hash, not revoked, and it still manages every owner's keys.
        assert await api.keys.get(root_key.id) == root_key
        listing = await http.get("/api-keys", headers=auth(root))
        assert {bobs_key.id, plain_key.id, root_key.id} <= {k["id"] for k in listing.json()["data"]}
        # What the plain admin may still do: manage itself.
        assert (await http.get(f"/api-keys/{plain_key.id}", headers=auth(plain))).status_code == 200


async def test_restricted_free_admin_cannot_mint_an_unlimited_key(api: OzwellAPI) -> None:
    """A free admin key limited to one model and one hour asked for an enterprise key with everything."""
    admin_key, admin = await api.keys.create(
        name="admin", owner="acme", scopes=["admin"], models=["echo-embedding"], expires_in=3600
    )
    attack = {
        "name": "escalated",
        "plan": "enterprise",
        "models": None,
        "scopes": ["api", "admin"],
        "expires_in": None,
        "rpm": 10**12,
        "tpm": 10**12,
    }
    async with raw_client(api) as http:
        refused(await http.post("/api-keys", json=attack, headers=auth(admin)), "models")
        for field, value in (
            ("plan", "enterprise"),
            ("models", None),
            ("expires_in", None),
            ("rpm", 10**12),
            ("tpm", 10**12),
        ):
            body = {"name": "escalated", field: value}
            message = refused(await http.post("/api-keys", json=body, headers=auth(admin)), field)
            assert "int()" not in message
    assert [k.id for k in await api.keys.list("acme")] == [admin_key.id]  # nothing was created


# --------------------------------------------------------------------------- every route, every dimension

WEAK = {"scopes": ["admin"], "plan": "free", "rpm": 1000, "tpm": 10_000, "models": ["echo", "gpt-*"]}

# (what makes the target stronger than WEAK, the create body asking for the same, the param named)
STRONGER: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "scope admin:global": ({"scopes": ["admin:global"]}, {"scopes": ["api", "admin:global"]}, "scopes"),
    "every model": ({"models": None}, {"models": None}, "models"),
    "another model": ({"models": ["echo", "o1"]}, {"models": ["o1"]}, "models"),
    "a narrower glob": ({"models": ["gpt-4o*"]}, {"models": ["gpt-4o*"]}, "models"),
    "plan pro": ({"plan": "pro", "rpm": None, "tpm": None}, {"plan": "pro"}, "plan"),
    "plan enterprise": ({"plan": "enterprise", "tpm": None}, {"plan": "enterprise", "rpm": 1000}, "plan"),
    "more rpm": ({"rpm": 1001}, {"rpm": 1001}, "rpm"),
    "more tpm": ({"tpm": 10_001}, {"tpm": 10_001}, "tpm"),
    "never expires": ({"expires_at": None}, {"expires_in": None}, "expires_in"),
    "expires later": ({"expires_at": +1}, {"expires_in": 2 * DAY}, "expires_in"),
}


async def weak_admin(api: OzwellAPI, owner: str = "acme") -> tuple[APIKey, str]:
    return await api.keys.create(name="weak", owner=owner, expires_in=DAY, **WEAK)


async def key_like_weak(api: OzwellAPI, weak: APIKey, owner: str = "acme", **changes: Any) -> tuple[APIKey, str]:
    """A key with ``weak``'s grant, changed by ``changes`` (``expires_at: +1`` means one second later)."""
    options: dict[str, Any] = {**WEAK, "expires_at": weak.expires_at, **changes}
    if options["expires_at"] == +1:
        assert weak.expires_at is not None
        options["expires_at"] = weak.expires_at + 1
    return await api.keys.create(name="target", owner=owner, **options)


@pytest.mark.parametrize("case", list(STRONGER))
async def test_a_stronger_key_is_out_of_reach_on_every_route(api: OzwellAPI, case: str) -> None:
    changes, body, param = STRONGER[case]
    weak, weak_secret = await weak_admin(api)
    stronger, stronger_secret = await key_like_weak(api, weak, **changes)
    equal, _ = await key_like_weak(api, weak)  # the control: the same grant is in reach
    async with raw_client(api) as http:
        await assert_out_of_reach(http, api, weak_secret, stronger, stronger_secret)
        message = refused(await http.post("/api-keys", json={"name": "more"} | body, headers=auth(weak_secret)), param)
        assert "cannot" in message or "more" in message
        await assert_in_reach(http, weak_secret, equal)
    assert await api.keys.get(stronger.id) == stronger
    assert {k.name for k in await api.keys.list("acme")} == {"weak", "target"}


async def test_a_weaker_or_equal_key_is_in_reach_and_may_be_created(api: OzwellAPI) -> None:
    weak, weak_secret = await weak_admin(api)
    assert weak.expires_at is not None
    weaker = [
        {"scopes": ["api"]},
        {"models": ["echo"]},
        {"models": ["gpt-4o"]},  # an exact id the glob allows
        {"models": []},
        {"rpm": 10, "tpm": 10},
        {"plan": "free", "rpm": None},  # the plan's 20 requests/min is within 1000
        {"expires_at": weak.expires_at - 60},
    ]
    async with raw_client(api) as http:
        for changes in weaker:
            target, _ = await key_like_weak(api, weak, **changes)
            await assert_in_reach(http, weak_secret, target)
        for body in (
            {"scopes": ["admin"]},
            {"models": ["gpt-*"]},  # the very same glob
            {"models": ["gpt-4o-mini"]},
            {"plan": "enterprise", "rpm": 1000, "tpm": 10_000},  # a bigger plan, within by its overrides
            {"plan": "free", "expires_in": 60},
        ):
            response = await http.post("/api-keys", json={"name": "ok"} | body, headers=auth(weak_secret))
            assert response.status_code == 201, (body, response.text)
        # The weak admin may revoke and rotate itself.
        assert (await http.post(f"/api-keys/{weak.id}/rotate", headers=auth(weak_secret))).status_code == 200


async def test_left_out_fields_default_to_the_creators_bounds(api: OzwellAPI) -> None:
    creator, secret = await api.keys.create(
        name="creator", owner="acme", scopes=["admin"], rpm=50, tpm=500, models=["echo"], expires_in=3600
    )
    async with raw_client(api) as http:
        response = await http.post("/api-keys", json={"name": "child"}, headers=auth(secret))
        assert response.status_code == 201, response.text
        child = response.json()
        assert (child["plan"], child["scopes"], child["models"]) == ("free", ["api"], ["echo"])
        assert child["rpm"] is None  # the free plan's 20 requests/min lie within 50
        assert child["tpm"] == 500  # the free plan's 10,000 tokens/min do not: capped at the creator's
        assert child["expires_at"] == creator.expires_at
        new = auth(child["secret"])
        assert [m["id"] for m in (await http.get("/models", headers=new)).json()["data"]] == ["echo"]

        # Given explicitly, within the grant: kept as asked.
        body = {"name": "explicit", "rpm": 7, "tpm": 400, "models": ["echo"], "expires_in": 60, "plan": "free"}
        response = await http.post("/api-keys", json=body, headers=auth(secret))
        assert response.status_code == 201, response.text
        explicit = response.json()
        assert (explicit["rpm"], explicit["tpm"], explicit["models"]) == (7, 400, ["echo"])
        assert explicit["expires_at"] - explicit["created_at"] == 60

        # The default plan named explicitly asks for its limits: refused, not lowered.
        refused(await http.post("/api-keys", json={"name": "x", "plan": "free"}, headers=auth(secret)), "plan")


async def test_unlimited_creator_defaults_change_nothing(api: OzwellAPI) -> None:
    _, secret = await api.keys.create(name="root", owner="acme", scopes=["admin:global"], plan="enterprise")
    async with raw_client(api) as http:
        response = await http.post("/api-keys", json={"name": "child"}, headers=auth(secret))
    child = response.json()
    assert (child["plan"], child["rpm"], child["tpm"], child["models"], child["expires_at"]) == (
        "free",
        None,
        None,
        None,
        None,
    )


async def test_a_global_admin_is_bounded_by_its_grant_too(api: OzwellAPI) -> None:
    root_key, root = await api.keys.create(
        name="root", owner="ops", scopes=["admin:global"], plan="enterprise", models=["echo"]
    )
    bobs_all, bobs_all_secret = await api.keys.create(name="all models", owner="bob", plan="enterprise")
    bobs_echo, _ = await api.keys.create(name="echo only", owner="bob", models=["echo"])
    async with raw_client(api) as http:
        await assert_out_of_reach(http, api, root, bobs_all, bobs_all_secret)
        await assert_in_reach(http, root, bobs_echo)
        body = {"name": "x", "owner": "bob", "models": ["echo", "echo-embedding"]}
        refused(await http.post("/api-keys", json=body, headers=auth(root)), "models")
        response = await http.get("/api-keys", params={"owner": "bob"}, headers=auth(root))
        assert [k["id"] for k in response.json()["data"]] == [bobs_echo.id]
    assert root_key.models == ("echo",)


async def test_unknown_plan_on_a_stored_key_counts_as_unlimited(api: OzwellAPI) -> None:
    _, admin = await api.keys.create(name="admin", owner="acme", scopes=["admin"], plan="pro")
    legacy = APIKey(id="key_legacy", key_hash="0" * 64, owner="acme", name="legacy", plan="gold", hint="ozw_Lega")
    await api.key_store.create(legacy)
    async with raw_client(api) as http:
        response = await http.get("/api-keys/key_legacy", headers=auth(admin))
        assert envelope(response) == not_found("key_legacy")


# ------------------------------------------------------------------------------------ the rule, as a function


def grant(**changes: Any) -> Grant:
    base = Grant(frozenset({"admin"}), ("echo", "gpt-*"), 100, 1000, 5000)
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("changes", "dimension"),
    [
        ({}, None),
        ({"scopes": frozenset({"api", "admin"})}, None),
        ({"scopes": frozenset({"admin:global"})}, "scopes"),
        ({"scopes": frozenset({"custom"})}, "scopes"),
        ({"models": None}, "models"),
        ({"models": ("gpt-4o",)}, None),
        ({"models": ("gpt-4o*",)}, "models"),
        ({"rpm": 101}, "rpm"),
        ({"rpm": None}, "rpm"),
        ({"tpm": 1001}, "tpm"),
        ({"tpm": None}, "tpm"),
        ({"expires_at": 5001}, "expires_at"),
        ({"expires_at": None}, "expires_at"),
        ({"expires_at": 1, "rpm": 1, "tpm": 1, "models": ()}, None),
    ],
)
def test_exceeds_names_the_first_dimension_beyond(changes: dict[str, Any], dimension: str | None) -> None:
    assert exceeds(grant(**changes), grant()) == dimension
    unlimited = Grant(frozenset({"admin:global"}), None, None, None, None)
    unknown_scope = changes.get("scopes") == frozenset({"custom"})
    assert exceeds(grant(**changes), unlimited) == ("scopes" if unknown_scope else None)
    assert exceeds(unlimited, grant(**changes)) is not None


@pytest.mark.parametrize(
    ("requested", "held", "within"),
    [
        (None, None, True),
        (("anything*",), None, True),
        (None, ("echo",), False),
        ((), ("echo",), True),
        (("echo",), ("echo",), True),
        (("echo",), ("ech*",), True),
        (("echo",), ("e[c]ho",), True),
        (("e[c]ho",), ("e[c]ho",), True),
        (("e[c]ho",), ("echo",), False),  # a glob is never judged by what it happens to match
        (("ech*",), ("echo",), False),
        (("echo-*",), ("echo*",), False),  # conservative: narrower globs are not proven within
        (("gpt-4o",), ("gpt-4?",), True),
        (("gpt-4o1",), ("gpt-4?",), False),
        (("GPT-4",), ("gpt-*",), False),  # case-sensitive
    ],
)
def test_models_within_is_conservative(
    requested: tuple[str, ...] | None, held: tuple[str, ...] | None, within: bool
) -> None:
    assert models_within(requested, held) is within
    assert models_within(requested, None if held is None else ModelPatterns(held)) is within


def test_compiled_patterns_match_exactly_like_fnmatch() -> None:
    rng = random.Random(7)
    alphabet = "ab-.*?[]!^"
    for _ in range(3000):
        patterns = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))) for _ in range(3))
        compiled = ModelPatterns(patterns)
        for _ in range(5):
            model = "".join(rng.choice("ab-.[]*?") for _ in range(rng.randint(0, 6)))
            expected = any(p == model or fnmatch.fnmatchcase(model, p) for p in patterns)
            assert compiled.allows(model) is expected, (patterns, model)
            assert model_allowed(patterns, model) is expected
    assert compiled == patterns and list(compiled) == list(patterns)


def test_globs_are_matched_against_bounded_model_ids() -> None:
    """A huge ``model`` costs no regex work: 256 ``*-mini`` globs against 32 MiB would take tens of seconds."""
    patterns = ModelPatterns(["*", "x" * 300, *(f"*-mini{i}" for i in range(255))])
    assert patterns.allows("a" * 256)
    assert not patterns.allows("a" * 257)
    assert patterns.allows("x" * 300)  # an exact entry matches at any length


# ------------------------------------------------------------------------------------- caps on model patterns


def test_settings_defaults_are_the_documented_caps() -> None:
    assert (Settings().max_model_patterns, Settings().max_model_pattern_length) == (256, 256)
    assert (DEFAULT_MAX_MODEL_PATTERNS, DEFAULT_MAX_MODEL_PATTERN_LENGTH) == (256, 256)


async def test_model_pattern_caps_on_the_api_and_key_manager(api: OzwellAPI) -> None:
    _, root = await api.keys.create(name="root", owner="acme", scopes=["admin:global"], plan="enterprise")
    longest = ["m" * 250 + f"{i:05d}*" for i in range(256)]  # 256 patterns of 256 characters: the most allowed
    assert {len(p) for p in longest} == {256}
    cases: list[tuple[list[str], int]] = [
        (longest, 201),
        ([f"m{i}" for i in range(257)], 400),
        (["x" * 257], 400),
        (["ok", "y" * 1_000_000], 400),
    ]
    async with raw_client(api) as http:
        for models, status in cases:
            response = await http.post("/api-keys", json={"name": "m", "models": models}, headers=auth(root))
            assert response.status_code == status, response.text[:300]
            if status == 400:
                error = envelope(response)
                assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "models", None)
                assert "256" in error["message"]
                with pytest.raises(InvalidRequestError) as caught:
                    await api.keys.create(name="m", owner="acme", models=models)
                assert caught.value.param == "models"
    assert len(await api.keys.list("acme")) == 2


async def test_model_pattern_caps_come_from_settings() -> None:
    api = OzwellAPI(secret=SECRET, settings=Settings(max_model_patterns=2, max_model_pattern_length=4))
    try:
        _, root = await api.keys.create(name="root", owner="acme", scopes=["admin"], plan="enterprise")
        async with raw_client(api) as http:
            for models, status in ((["echo", "e*"], 201), (["a", "b", "c"], 400), (["echos"], 400)):
                response = await http.post("/api-keys", json={"name": "m", "models": models}, headers=auth(root))
                assert response.status_code == status, response.text
        with pytest.raises(InvalidRequestError):
            await api.keys.create(name="m", owner="acme", models=["a", "b", "c"])
    finally:
        await api.aclose()
    with pytest.raises(ValueError, match="max_model_patterns"):
        KeyManager(MemoryKeyStore(), KeyHasher(SECRET), max_model_patterns=0)


def test_cli_refuses_too_many_model_patterns(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OZWELL_STORE_URL", raising=False)
    monkeypatch.delenv("OZWELL_SECRET", raising=False)
    store = f"sqlite:///{tmp_path / 'k.db'}"
    models = ",".join(f"m{i}" for i in range(257))
    argv = ["keys", "create", "--name", "x", "--models", models, "--store", store]
    code = cli_main([*argv, "--secret-file", str(tmp_path / "secret")])
    out, err = capsys.readouterr()
    assert code == 2 and "256" in err and "Traceback" not in out + err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "secret").exists()


async def test_patterns_are_compiled_once_per_principal(api: OzwellAPI, monkeypatch: pytest.MonkeyPatch) -> None:
    globs = [f"model-{i}-*" for i in range(255)]
    key, secret = await api.keys.create(name="many", owner="acme", models=[*globs, "echo"])
    principal = api.services.authenticator.principal_for(key)
    assert isinstance(principal.models, ModelPatterns) and principal.models == (*globs, "echo")
    assert api.services.authenticator.principal_for(key) is principal

    def no_translation(pattern: str) -> str:
        raise AssertionError("a pattern was translated on the request path")

    async with raw_client(api) as http:
        assert (await http.get("/models", headers=auth(secret))).status_code == 200  # compiled here, once
        monkeypatch.setattr(fnmatch, "translate", no_translation)
        monkeypatch.setattr(fnmatch, "fnmatchcase", no_translation)
        for _ in range(3):
            response = await http.get("/models", headers=auth(secret))
            assert [m["id"] for m in response.json()["data"]] == ["echo"]
            response = await http.post(
                "/chat/completions",
                json={"model": "model-7-x", "messages": [{"role": "user", "content": "hi"}]},
                headers=auth(secret),
            )
            assert response.status_code == 404 and envelope(response)["code"] == "model_not_found"
            response = await http.post(
                "/chat/completions",
                json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
                headers=auth(secret),
            )
            assert response.status_code == 403 and envelope(response)["param"] == "model"


# --------------------------------------------------------------------------- NUL characters on every adapter


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> KeyStore:
    """A key store on each bundled adapter, on real storage (the app's ``aclose`` does not close it)."""
    name: str = request.param
    if name == "memory":
        return MemoryKeyStore()
    if name == "sqlite":
        return key_store_from_url(f"sqlite:///{tmp_path / 'k.db'}")
    if name == "postgres":
        return key_store_from_url(request.getfixturevalue("postgres_url"))
    redis_url: str = request.getfixturevalue("redis_url")
    return key_store_from_url(redis_url, redis_prefix=request.getfixturevalue("redis_prefix"))


@pytest.fixture
async def any_store_api(any_store: KeyStore) -> AsyncIterator[OzwellAPI]:
    app = OzwellAPI(key_store=any_store, secret=SECRET)
    yield app
    await app.aclose()
    aclose = getattr(any_store, "aclose", None)
    if aclose is not None:
        await aclose()


async def test_nul_characters_are_400_or_404_on_every_store(
    any_store_api: OzwellAPI, caplog: pytest.LogCaptureFixture
) -> None:
    api = any_store_api
    caplog.set_level(logging.DEBUG)
    root_key, root = await api.keys.create(name="root", owner="acme", scopes=["admin:global"], plan="enterprise")
    async with raw_client(api) as http:
        for body, param in (
            ({"name": "a\x00b"}, "name"),
            ({"name": "x", "owner": "a\x00"}, "owner"),
            ({"name": "\x00"}, "name"),
        ):
            response = await http.post("/api-keys", json=body, headers=auth(root))
            assert response.status_code == 400, response.text
            error = envelope(response)
            assert (error["type"], error["param"]) == ("invalid_request_error", param)
            assert "NUL" in error["message"]
        response = await http.get("/api-keys", params={"owner": "ac\x00me"}, headers=auth(root))
        assert response.status_code == 400 and envelope(response)["param"] == "owner"
        for method, path in (
            ("GET", "/api-keys/key_%00"),
            ("DELETE", "/api-keys/key_%00"),
            ("POST", "/api-keys/key_%00/rotate"),
            ("GET", "/api-keys/%00"),
        ):
            response = await http.request(method, path, headers=auth(root))
            assert response.status_code == 404, (method, path, response.text)
            assert envelope(response)["code"] == "api_key_not_found"
        assert (await http.get("/api-keys", headers=auth(root))).status_code == 200
    assert [k.id for k in await api.keys.list()] == [root_key.id]
    assert not [logged_text(r) for r in caplog.records if r.levelno >= logging.WARNING]
    assert not [r for r in caplog.records if root_key.key_hash in logged_text(r)]


async def test_nul_characters_via_the_key_manager() -> None:
    keys = KeyManager(MemoryKeyStore(), KeyHasher(SECRET))
    for options, param in (({"name": "a\x00"}, "name"), ({"owner": "\x00"}, "owner")):
        with pytest.raises(InvalidRequestError) as caught:
            await keys.create(**({"name": "n", "owner": "o"} | options))
        assert caught.value.param == param
    with pytest.raises(InvalidRequestError) as caught:
        await keys.list("o\x00")
    assert caught.value.param == "owner"


async def test_postgres_failures_never_carry_parameters(postgres_url: str) -> None:
    """A host's own engine (no hide_parameters): a failed statement is raised without SQLAlchemy's text."""
    engine = create_async_engine(postgres_url)
    store = SQLKeyStore(engine)
    key = APIKey(id="key_x", key_hash="HASH_SHOULD_NEVER_BE_SEEN", owner="o" * 300, name="n", hint="ozw_Abcd")
    try:
        with pytest.raises(KeyStoreStatementError) as caught:
            await store.create(key)  # owner is VARCHAR(255): PostgreSQL refuses it
        shown = "".join(traceback.format_exception(caught.value))
        assert "HASH_SHOULD_NEVER_BE_SEEN" not in shown and "[parameters" not in shown, shown
        assert "SQLSTATE" in str(caught.value)
        with pytest.raises(ValueError, match="NUL"):
            await store.create(dataclasses.replace(key, owner="o", name="a\x00"))
        await store.create(dataclasses.replace(key, owner="o"))
        with pytest.raises(ValueError, match="already exists") as taken:
            await store.create(dataclasses.replace(key, id="key_y", owner="o"))
        shown = "".join(traceback.format_exception(taken.value))
        assert "HASH_SHOULD_NEVER_BE_SEEN" not in shown
    finally:
        await engine.dispose()
    url_store = SQLKeyStore.from_url(postgres_url)
    try:
        assert url_store.db.engine.sync_engine.hide_parameters is True
    finally:
        await url_store.aclose()


def logged_text(record: logging.LogRecord) -> str:
    """A log record as a handler would write it, traceback included."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += "\n" + "".join(traceback.format_exception(record.exc_info[1]))
    return text


async def test_an_unexpected_store_failure_logs_no_key_hash(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The 500 path logs its traceback: it must not hold the statement's parameters (a key hash)."""
    engine = create_async_engine(postgres_url)
    api = OzwellAPI(key_store=SQLKeyStore(engine), secret=SECRET, key_cache_ttl=0)
    caplog.set_level(logging.DEBUG)
    try:
        _, secret = await api.keys.create(name="n", owner="o")
        async with engine.begin() as conn:  # break the table behind the store's back
            await conn.exec_driver_sql("ALTER TABLE ozwell_api_keys ALTER COLUMN key_hash TYPE integer USING 0")
        digest = api.services.authenticator.hasher.hash(secret)
        async with raw_client(api) as http:
            response = await http.get("/models", headers=auth(secret))
        assert response.status_code == 500 and envelope(response)["code"] == "internal_error"
        logged = "\n".join(logged_text(r) for r in caplog.records)
        assert "unhandled error" in logged and "KeyStoreStatementError" in logged
        assert digest not in logged and "[parameters" not in logged
    finally:
        await api.aclose()
        await engine.dispose()


# ------------------------------------------------------------------------------------------ expires_in words


@pytest.mark.parametrize(
    "value",
    [
        "9" * 5000,
        "²",
        "1²",
        "٣",
        "1w²",
        "1d\x00",
        " ",
        "-5",
        "1.5h",
        "9" * 33,
        "1" + "0" * 31 + "w",
        "1" + "0" * 30 + "w",
    ],
)
async def test_bad_durations_are_told_in_our_words(api: OzwellAPI, value: str) -> None:
    _, root = await api.keys.create(name="root", owner="acme", scopes=["admin"], plan="enterprise")
    async with raw_client(api) as http:
        response = await http.post("/api-keys", json={"name": "x", "expires_in": value}, headers=auth(root))
    assert response.status_code == 400, response.text
    error = envelope(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "expires_in", "invalid_value")
    for python_words in ("int()", "sys.", "literal", "Exceeds the limit", "digits"):
        assert python_words not in error["message"]
    assert "duration" in error["message"]
    assert len(error["message"]) < 300


def test_parse_duration() -> None:
    assert [parse_duration(t) for t in ("3600", " 90m ", "12h", "30d", "1w2d", "0001s")] == [
        3600,
        5400,
        43200,
        2592000,
        9 * DAY,
        1,
    ]
    for bad in ("", "0", "0s", "²", "٣", "1x", "h1", "9" * 33):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


# ------------------------------------------------------------------------------------ expiry is never early


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 0.999])
async def test_a_key_lives_at_least_its_expires_in(fraction: float) -> None:
    now = [1_000_000 + fraction]
    store = MemoryKeyStore()
    hasher = KeyHasher(SECRET)
    keys = KeyManager(store, hasher, clock=lambda: now[0])
    authenticator = Authenticator(store, hasher, clock=lambda: now[0])
    key, secret = await keys.create(name="short", owner="o", expires_in=1)
    assert key.expires_at is not None and key.expires_at - key.created_at == 1
    assert key.expires_at - now[0] >= 1 and key.created_at >= now[0]
    for alive_at in (now[0], now[0] + 0.5, now[0] + 0.999999):
        now[0] = alive_at
        assert (await authenticator.authenticate(f"Bearer {secret}")).expires_at == key.expires_at
    now[0] = key.expires_at
    with pytest.raises(Exception, match="Incorrect API key"):
        await authenticator.authenticate(f"Bearer {secret}")


async def test_expires_in_one_over_http_is_alive_at_once(api: OzwellAPI) -> None:
    now = [2_000_000.9]
    api.keys.clock = api.services.authenticator.clock = lambda: now[0]
    _, root = await api.keys.create(name="root", owner="acme", scopes=["api", "admin"], plan="enterprise")
    async with raw_client(api) as http:
        response = await http.post("/api-keys", json={"name": "x", "expires_in": 1}, headers=auth(root))
        created = response.json()
        assert created["expires_at"] == 2_000_002 and created["created_at"] == 2_000_001
        now[0] = 2_000_001.85  # 0.95 s later: alive (rounding down made it dead at 2,000,001)
        assert (await http.get("/models", headers=auth(created["secret"]))).status_code == 200
        now[0] = 2_000_002
        assert (await http.get("/models", headers=auth(created["secret"]))).status_code == 401
