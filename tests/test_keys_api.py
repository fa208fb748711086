"""The key management API (/api-keys): lifecycle, scopes and owner isolation, validation, exact shapes."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.ratelimit import DEFAULT_PLANS, Plan
from ozwell_asgi.types import APIKey
from tests.harness import raw_client
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

KEY_FIELDS = {
    "id",
    "object",
    "name",
    "owner",
    "plan",
    "rpm",
    "tpm",
    "models",
    "scopes",
    "origins",
    "endpoints",
    "created_at",
    "expires_at",
    "revoked_at",
    "status",
    "redacted_value",
}
ADMIN = ["api", "admin"]


def auth(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


def envelope(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def check_key_object(body: dict[str, Any], *, with_secret: bool = False) -> None:
    assert set(body) == KEY_FIELDS | ({"secret"} if with_secret else set())
    assert body["object"] == "api_key"
    assert body["id"].startswith("key_")
    assert body["status"] in ("active", "revoked", "expired")
    assert body["redacted_value"].startswith("ozw_") and body["redacted_value"].endswith("…")
    assert isinstance(body["created_at"], int)
    if with_secret:
        assert body["secret"].startswith("ozw_")
        assert body["redacted_value"] == body["secret"][:8] + "…"


class World:
    """One app and its first keys: admins of alice and bob, an api-only key of alice, a global admin.

    The admins are on the enterprise plan (unlimited tokens) with 10,000 requests/min, so they may create keys of
    any plan with a lower ``rpm``; tests/test_key_grants.py covers what weaker admins may do.
    """

    def __init__(self, api: OzwellAPI) -> None:
        self.api = api

    async def setup(self) -> World:
        keys = self.api.keys
        self.alice_admin_key, self.alice_admin = await keys.create(
            name="alice admin", owner="alice", scopes=ADMIN, plan="enterprise", rpm=10_000
        )
        self.alice_api_key, self.alice_api = await keys.create(name="alice app", owner="alice", rpm=10_000)
        self.bob_admin_key, self.bob_admin = await keys.create(
            name="bob admin", owner="bob", scopes=ADMIN, plan="enterprise", rpm=10_000
        )
        self.bob_api_key, self.bob_api = await keys.create(name="bob app", owner="bob", rpm=10_000)
        self.root_key, self.root = await keys.create(
            name="ops", owner="ops", scopes=["api", "admin:global"], plan="enterprise", rpm=10_000
        )
        return self


@pytest.fixture
async def world() -> AsyncIterator[World]:
    api = OzwellAPI(secret="s" * 32)
    yield await World(api).setup()
    await api.aclose()


async def run_lifecycle(api: OzwellAPI, admin: str) -> str:
    """create → use → list → get → rotate → delete; returns the id of the (revoked) key."""
    async with raw_client(api) as http:
        response = await http.post(
            "/api-keys",
            json={"name": "svc", "plan": "pro", "rpm": 50, "models": ["echo"], "expires_in": "30d"},
            headers=auth(admin),
        )
        assert response.status_code == 201, response.text
        assert response.headers["x-ratelimit-limit-requests"] == "10000"
        assert response.headers["x-request-id"]
        created = response.json()
        check_key_object(created, with_secret=True)
        secret, key_id = str(created["secret"]), str(created["id"])
        assert created | {"id": "", "secret": "", "redacted_value": "", "created_at": 0, "expires_at": 0} == {
            "id": "",
            "object": "api_key",
            "name": "svc",
            "owner": "alice",
            "plan": "pro",
            "rpm": 50,
            "tpm": None,
            "models": ["echo"],
            "scopes": ["api"],
            "origins": None,
            "endpoints": None,
            "created_at": 0,
            "expires_at": 0,
            "revoked_at": None,
            "status": "active",
            "redacted_value": "",
            "secret": "",
        }
        assert created["expires_at"] == created["created_at"] + 30 * 86400

        response = await http.get("/models", headers=auth(secret))
        assert response.status_code == 200
        assert [m["id"] for m in response.json()["data"]] == ["echo"]

        response = await http.get("/api-keys", headers=auth(admin))
        assert response.status_code == 200
        listing = response.json()
        assert set(listing) == {"object", "data", "has_more", "first_id", "last_id"}
        assert listing["object"] == "list" and listing["has_more"] is False
        assert listing["first_id"] == listing["data"][0]["id"] and listing["last_id"] == listing["data"][-1]["id"]
        for item in listing["data"]:
            check_key_object(item)
            assert item["owner"] == "alice"
        assert secret not in response.text and admin not in response.text
        stored = await api.keys.get(key_id)
        assert stored is not None and stored.key_hash not in response.text
        listed = {k["id"]: k for k in listing["data"]}[key_id]
        assert listed == {k: v for k, v in created.items() if k != "secret"}

        response = await http.get(f"/api-keys/{key_id}", headers=auth(admin))
        assert response.status_code == 200 and response.json() == listed
        assert "x-ratelimit-remaining-requests" in response.headers

        response = await http.post(f"/api-keys/{key_id}/rotate", headers=auth(admin))
        assert response.status_code == 200, response.text
        rotated = response.json()
        check_key_object(rotated, with_secret=True)
        new_secret = rotated["secret"]
        assert new_secret != secret
        assert {k: v for k, v in rotated.items() if k not in ("secret", "redacted_value")} == {
            k: v for k, v in listed.items() if k != "redacted_value"
        }
        response = await http.get("/models", headers=auth(secret))
        assert response.status_code == 401 and envelope(response)["code"] == "invalid_api_key"
        assert (await http.get("/models", headers=auth(new_secret))).status_code == 200

        response = await http.delete(f"/api-keys/{key_id}", headers=auth(admin))
        assert response.status_code == 200
        assert response.json() == {"id": key_id, "object": "api_key.deleted", "deleted": True}
        response = await http.get("/models", headers=auth(new_secret))
        assert response.status_code == 401 and envelope(response)["code"] == "invalid_api_key"

        response = await http.get(f"/api-keys/{key_id}", headers=auth(admin))
        revoked = response.json()
        assert revoked["status"] == "revoked" and isinstance(revoked["revoked_at"], int)

        # Revoking is idempotent; rotating a revoked key is a 400 that says so.
        response = await http.delete(f"/api-keys/{key_id}", headers=auth(admin))
        assert response.status_code == 200 and response.json()["deleted"] is True
        response = await http.post(f"/api-keys/{key_id}/rotate", headers=auth(admin))
        assert response.status_code == 400
        error = envelope(response)
        assert (error["type"], error["code"]) == ("invalid_request_error", "api_key_revoked")
        assert "revoked" in error["message"]
    return key_id


async def test_lifecycle(world: World) -> None:
    await run_lifecycle(world.api, world.alice_admin)


async def test_lifecycle_on_sqlite_persists(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/k.db"
    api = OzwellAPI(key_store=url, secret="s" * 32)
    try:
        _, admin = await api.keys.create(name="admin", owner="alice", scopes=ADMIN, plan="enterprise", rpm=10_000)
        key_id = await run_lifecycle(api, admin)
    finally:
        await api.aclose()

    again = OzwellAPI(key_store=url, secret="s" * 32)
    try:
        async with raw_client(again) as http:
            response = await http.get("/api-keys", headers=auth(admin))
            assert response.status_code == 200
            by_id = {k["id"]: k for k in response.json()["data"]}
            assert by_id[key_id]["status"] == "revoked" and by_id[key_id]["name"] == "svc"
            response = await http.post("/api-keys", json={"name": "later"}, headers=auth(admin))
            assert response.status_code == 201
            assert (await http.get("/models", headers=auth(response.json()["secret"]))).status_code == 200
    finally:
        await again.aclose()


async def test_without_admin_scope_every_route_is_refused(world: World) -> None:
    target = world.alice_api_key.id
    calls = [
        ("GET", "/api-keys", None),
        ("POST", "/api-keys", {"name": "x"}),
        ("GET", f"/api-keys/{target}", None),
        ("DELETE", f"/api-keys/{target}", None),
        ("POST", f"/api-keys/{target}/rotate", None),
    ]
    async with raw_client(world.api) as http:
        for method, path, body in calls:
            response = await http.request(method, path, json=body, headers=auth(world.alice_api))
            assert response.status_code == 403, (method, path)
            error = envelope(response)
            assert (error["type"], error["code"]) == ("permission_error", "insufficient_permissions")
            assert "admin" in error["message"]

            response = await http.request(method, path, json=body)
            assert response.status_code == 401, (method, path)
            assert envelope(response)["code"] == "missing_api_key"

            response = await http.request(method, path, json=body, headers=auth("ozw_" + "x" * 43))
            assert response.status_code == 401 and envelope(response)["code"] == "invalid_api_key"
        # Nothing was revoked or rotated, nothing created.
        assert (await http.get("/models", headers=auth(world.alice_api))).status_code == 200
    assert len(await world.api.keys.list("alice")) == 2


async def test_admin_sees_and_manages_only_its_owner(world: World) -> None:
    bobs = world.bob_api_key.id
    async with raw_client(world.api) as http:
        admin = auth(world.alice_admin)
        response = await http.get("/api-keys", headers=admin)
        assert {k["owner"] for k in response.json()["data"]} == {"alice"}
        assert {k["id"] for k in response.json()["data"]} == {world.alice_admin_key.id, world.alice_api_key.id}

        unknown = await http.get("/api-keys/key_doesnotexist", headers=admin)
        assert unknown.status_code == 404
        shape = envelope(unknown)
        assert (shape["type"], shape["param"], shape["code"]) == ("invalid_request_error", None, "api_key_not_found")
        for method, path in (
            ("GET", f"/api-keys/{bobs}"),
            ("DELETE", f"/api-keys/{bobs}"),
            ("POST", f"/api-keys/{bobs}/rotate"),
        ):
            response = await http.request(method, path, headers=admin)
            assert response.status_code == 404, (method, path)
            error = envelope(response)
            assert error | {"message": ""} == shape | {"message": ""}  # indistinguishable from an unknown id
        assert (await http.get("/models", headers=auth(world.bob_api))).status_code == 200

        response = await http.post("/api-keys", json={"name": "x", "owner": "bob"}, headers=admin)
        assert response.status_code == 403
        assert envelope(response) | {"message": ""} == {
            "message": "",
            "type": "permission_error",
            "param": "owner",
            "code": "insufficient_permissions",
        }
        response = await http.post("/api-keys", json={"name": "x", "scopes": ["api", "admin:global"]}, headers=admin)
        assert response.status_code == 403
        error = envelope(response)
        assert (error["param"], error["code"]) == ("scopes", "insufficient_permissions")
        assert "admin:global" in error["message"]
        response = await http.get("/api-keys", params={"owner": "bob"}, headers=admin)
        assert response.status_code == 403 and envelope(response)["param"] == "owner"
        assert len(await world.api.keys.list("bob")) == 2

        # Its own owner, explicitly, and an admin key of its own level are fine.
        response = await http.post("/api-keys", json={"name": "x", "owner": "alice", "scopes": ADMIN}, headers=admin)
        assert response.status_code == 201 and response.json()["scopes"] == ADMIN
        assert (await http.get("/api-keys", params={"owner": "alice"}, headers=admin)).status_code == 200


async def test_admin_only_key_can_mint_api_keys(world: World) -> None:
    _, manager = await world.api.keys.create(name="manager", owner="carol", scopes=["admin"])
    async with raw_client(world.api) as http:
        assert (await http.get("/models", headers=auth(manager))).status_code == 403
        response = await http.post("/api-keys", json={"name": "app"}, headers=auth(manager))
        assert response.status_code == 201
        assert response.json()["scopes"] == ["api"] and response.json()["owner"] == "carol"
        assert (await http.get("/models", headers=auth(response.json()["secret"]))).status_code == 200


async def test_global_admin_manages_every_owner(world: World) -> None:
    root = auth(world.root)
    async with raw_client(world.api) as http:
        response = await http.get("/api-keys", headers=root)
        assert {k["owner"] for k in response.json()["data"]} == {"alice", "bob", "ops"}
        response = await http.get("/api-keys", params={"owner": "bob"}, headers=root)
        assert {k["id"] for k in response.json()["data"]} == {world.bob_admin_key.id, world.bob_api_key.id}
        response = await http.get("/api-keys", params={"owner": "nobody"}, headers=root)
        assert response.json() == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}

        response = await http.post(
            "/api-keys", json={"name": "bob 2", "owner": "bob", "scopes": ["admin:global"]}, headers=root
        )
        assert response.status_code == 201
        assert (response.json()["owner"], response.json()["scopes"]) == ("bob", ["admin:global"])

        bobs = world.bob_api_key.id
        response = await http.get(f"/api-keys/{bobs}", headers=root)
        assert response.status_code == 200 and response.json()["owner"] == "bob"
        response = await http.post(f"/api-keys/{bobs}/rotate", headers=root)
        assert response.status_code == 200
        assert (await http.get("/models", headers=auth(world.bob_api))).status_code == 401
        assert (await http.get("/models", headers=auth(response.json()["secret"]))).status_code == 200
        response = await http.delete(f"/api-keys/{bobs}", headers=root)
        assert response.json() == {"id": bobs, "object": "api_key.deleted", "deleted": True}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "name", "missing_required_parameter"),
        ({"name": ""}, "name", None),
        ({"name": 5}, "name", "invalid_type"),
        ({"name": "x", "plan": "gold"}, "plan", None),
        ({"name": "x", "rpm": 0}, "rpm", "invalid_value"),
        ({"name": "x", "tpm": -1}, "tpm", "invalid_value"),
        ({"name": "x", "rpm": "5"}, "rpm", "invalid_type"),
        ({"name": "x", "rpm": 10**20}, "rpm", "invalid_value"),
        ({"name": "x", "expires_in": 0}, "expires_in", "invalid_value"),
        ({"name": "x", "expires_in": "soon"}, "expires_in", "invalid_value"),
        ({"name": "x", "expires_in": True}, "expires_in", "invalid_type"),
        ({"name": "x", "scopes": ["root"]}, "scopes", None),
        ({"name": "x", "scopes": "api"}, "scopes", "invalid_type"),
        ({"name": "x", "models": [1]}, "models[0]", "invalid_type"),
        ({"name": "x", "scope": ["api"]}, "scope", "unknown_parameter"),
        ([{"name": "x"}], None, "invalid_type"),
    ],
)
async def test_validation_errors_name_the_param(world: World, body: Any, param: str | None, code: str | None) -> None:
    async with raw_client(world.api) as http:
        response = await http.post("/api-keys", json=body, headers=auth(world.alice_admin))
    assert response.status_code == 400, response.text
    error = envelope(response)
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert len(await world.api.keys.list("alice")) == 2


async def test_global_admin_validation_of_owner(world: World) -> None:
    async with raw_client(world.api) as http:
        response = await http.post("/api-keys", json={"name": "x", "owner": ""}, headers=auth(world.root))
    assert response.status_code == 400 and envelope(response)["param"] == "owner"


async def test_bad_json_and_content_type(world: World) -> None:
    headers = auth(world.alice_admin)
    async with raw_client(world.api) as http:
        response = await http.post(
            "/api-keys", content=b"{nope", headers=headers | {"content-type": "application/json"}
        )
        assert response.status_code == 400
        error = envelope(response)
        assert (error["type"], error["param"]) == ("invalid_request_error", None)
        assert "could not parse the JSON body" in error["message"]

        response = await http.post(
            "/api-keys", content=b'{"name": "x"}', headers=headers | {"content-type": "text/plain"}
        )
        assert response.status_code == 415 and envelope(response)["code"] == "unsupported_media_type"

        response = await http.put("/api-keys", json={"name": "x"}, headers=headers)
        assert response.status_code == 405
        assert {m.strip() for m in response.headers["allow"].split(",")} >= {"GET", "POST"}
        response = await http.patch(f"/api-keys/{world.alice_api_key.id}", headers=headers)
        assert response.status_code == 405 and "DELETE" in response.headers["allow"]
        response = await http.get(f"/api-keys/{world.alice_api_key.id}/rotate", headers=headers)
        assert response.status_code == 405
    assert len(await world.api.keys.list("alice")) == 2


async def test_configured_plans_and_durations() -> None:
    plans = {**DEFAULT_PLANS, "team": Plan("team", rpm=500, tpm=None)}
    api = OzwellAPI(secret="s" * 32, plans=plans)
    _, admin = await api.keys.create(name="admin", owner="alice", scopes=ADMIN, plan="enterprise")
    async with raw_client(api) as http:
        response = await http.post(
            "/api-keys", json={"name": "t", "plan": "team", "expires_in": 3600, "models": None}, headers=auth(admin)
        )
        assert response.status_code == 201
        body = response.json()
        assert (body["plan"], body["models"], body["expires_at"] - body["created_at"]) == ("team", None, 3600)
        response = await http.post("/api-keys", json={"name": "t", "expires_in": "1w2d"}, headers=auth(admin))
        assert response.json()["expires_at"] - response.json()["created_at"] == 9 * 86400
        response = await http.post("/api-keys", json={"name": "t", "plan": "gold"}, headers=auth(admin))
        assert response.status_code == 400
        error = envelope(response)
        assert error["param"] == "plan" and "team" in error["message"]
    await api.aclose()


async def test_expired_key_status(world: World) -> None:
    now = int(time.time())
    old = APIKey(
        id="key_expired",
        key_hash="0" * 64,
        owner="alice",
        name="old",
        created_at=now - 100,
        expires_at=now - 10,
        hint="ozw_Old1",
    )
    await world.api.key_store.create(old)
    async with raw_client(world.api) as http:
        response = await http.get("/api-keys/key_expired", headers=auth(world.alice_admin))
        assert response.json() | {"created_at": 0} == {
            "id": "key_expired",
            "object": "api_key",
            "name": "old",
            "owner": "alice",
            "plan": "free",
            "rpm": None,
            "tpm": None,
            "models": None,
            "scopes": ["api"],
            "origins": None,
            "endpoints": None,
            "created_at": 0,
            "expires_at": now - 10,
            "revoked_at": None,
            "status": "expired",
            "redacted_value": "ozw_Old1…",
        }
        # Rotating an expired key is allowed (as KeyManager.rotate does), but the key stays expired.
        response = await http.post("/api-keys/key_expired/rotate", headers=auth(world.alice_admin))
        assert response.status_code == 200 and response.json()["status"] == "expired"
        assert (await http.get("/models", headers=auth(response.json()["secret"]))).status_code == 401


async def test_each_call_costs_one_request(world: World) -> None:
    _, admin = await world.api.keys.create(name="tight", owner="alice", scopes=ADMIN, rpm=3)
    async with raw_client(world.api) as http:
        seen = []
        for _ in range(3):
            response = await http.get("/api-keys", headers=auth(admin))
            assert response.status_code == 200
            assert response.headers["x-ratelimit-limit-requests"] == "3"
            assert "x-ratelimit-limit-tokens" in response.headers
            seen.append(int(response.headers["x-ratelimit-remaining-requests"]))
        assert seen == [2, 1, 0]
        response = await http.get("/api-keys", headers=auth(admin))
        assert response.status_code == 429 and envelope(response)["type"] == "rate_limit_error"


async def test_a_key_request_body_is_capped_at_one_mebibyte() -> None:
    from ozwell_asgi.routes.keys import MAX_KEY_REQUEST_BODY

    api = OzwellAPI(secret="s" * 32)
    _, admin = await api.keys.create(name="a", owner="o", scopes=["admin", "api"])
    body = '{"name": "x", "pad": "' + "y" * MAX_KEY_REQUEST_BODY + '"}'
    async with raw_client(api) as http:
        response = await http.post(
            "/api-keys", content=body, headers={"authorization": f"Bearer {admin}", "content-type": "application/json"}
        )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"


# --- paging ------------------------------------------------------------------------------------------------------


async def visible_to(api: OzwellAPI, secret: str, owner: str | None) -> list[str]:
    """The ids the caller of ``secret`` may list, oldest first (the store's order, filtered by the grant rule)."""
    principal = await api.services.authenticator.authenticate(f"Bearer {secret}")
    return [k.id for k in await api.keys.list(owner) if api.keys.manages(principal, k)]


async def test_list_pages_as_paginate_cuts(world: World) -> None:
    from ozwell_asgi.pages import paginate
    from ozwell_asgi.types import PageQuery

    for n in range(25):
        await world.api.keys.create(name=f"bulk {n}", owner="alice")
    ids = await visible_to(world.api, world.alice_admin, "alice")
    assert len(ids) == 27
    admin = auth(world.alice_admin)
    async with raw_client(world.api) as http:
        response = await http.get("/api-keys", headers=admin)
        listing = response.json()
        assert set(listing) == {"object", "data", "has_more", "first_id", "last_id"}
        assert [k["id"] for k in listing["data"]] == ids[:20]  # 20 by default, oldest first as OpenAI lists keys
        assert listing["has_more"] is True
        assert (listing["first_id"], listing["last_id"]) == (ids[0], ids[19])
        response = await http.get("/api-keys", params={"after": listing["last_id"]}, headers=admin)
        assert response.json() == {
            "object": "list",
            "data": response.json()["data"],
            "has_more": False,
            "first_id": ids[20],
            "last_id": ids[26],
        }
        assert [k["id"] for k in response.json()["data"]] == ids[20:]
        queries = [
            {"limit": "5", "order": "desc"},
            {"limit": "3", "before": ids[10]},
            {"limit": "3", "before": ids[10], "order": "desc"},
            {"limit": "100", "after": ids[2], "order": "asc"},
            {"limit": "1", "after": ids[26]},
            {"limit": "1", "before": ids[0]},
            {"after": "key_unknown"},
            {"after": world.bob_api_key.id},  # another owner's key: as unknown
            {"after": ""},  # an empty cursor: none
        ]
        for params in queries:
            response = await http.get("/api-keys", params=params, headers=admin)
            assert response.status_code == 200, params
            body = response.json()
            query = PageQuery(
                limit=int(params.get("limit", 20)),
                after=params.get("after") or None,
                before=params.get("before") or None,
                order="desc" if params.get("order") == "desc" else "asc",
            )
            expected = paginate(ids, query, lambda i: i)
            assert ([k["id"] for k in body["data"]], body["has_more"]) == (list(expected.data), expected.has_more)
            assert (body["first_id"], body["last_id"]) == (
                expected.data[0] if expected.data else None,
                expected.data[-1] if expected.data else None,
            )


async def test_pages_skip_keys_beyond_the_grant_and_say_has_more_exactly() -> None:
    """A pro admin pages through its owner's keys: stronger keys (enterprise plan, admin:global) interleaved with
    them are never listed, never count towards a page, and a cursor naming one gives an empty page."""
    api = OzwellAPI(secret="s" * 32)
    try:
        _, admin = await api.keys.create(name="pro admin", owner="acme", plan="pro", scopes=ADMIN)
        hidden = []
        for n in range(12):
            await api.keys.create(name=f"weak {n}", owner="acme", plan="free")
            key, _ = await api.keys.create(name=f"strong {n}", owner="acme", plan="enterprise")
            hidden.append(key.id)
        root, _ = await api.keys.create(name="root", owner="acme", scopes=["admin:global"], plan="free")
        hidden.append(root.id)
        await api.keys.create(name="other", owner="zeta", plan="free")
        ids = await visible_to(api, admin, "acme")
        assert len(ids) == 13 and not set(ids) & set(hidden)
        async with raw_client(api) as http:
            for order, listing in (("asc", ids), ("desc", ids[::-1])):
                seen: list[str] = []
                params: dict[str, str] = {"limit": "4", "order": order}
                pages = 0
                while True:
                    body = (await http.get("/api-keys", params=params, headers=auth(admin))).json()
                    seen += [k["id"] for k in body["data"]]
                    pages += 1
                    if not body["has_more"]:
                        break
                    params["after"] = body["last_id"]
                assert seen == listing
                assert pages == 4  # 4 + 4 + 4 + 1: the last page says no more, though hidden keys follow
            for cursor in (hidden[0], hidden[-1]):
                for direction in ("after", "before"):
                    body = (await http.get("/api-keys", params={direction: cursor}, headers=auth(admin))).json()
                    assert body == {"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None}
            body = (await http.get("/api-keys", params={"before": ids[5], "limit": "2"}, headers=auth(admin))).json()
            assert ([k["id"] for k in body["data"]], body["has_more"]) == (ids[3:5], True)
    finally:
        await api.aclose()


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"limit": "0"}, "limit"),
        ({"limit": "101"}, "limit"),
        ({"limit": "abc"}, "limit"),
        ({"limit": "1.5"}, "limit"),
        ({"limit": "-1"}, "limit"),
        ({"limit": " 5"}, "limit"),
        ({"limit": ""}, "limit"),
        ({"limit": "\uff11"}, "limit"),  # a full-width digit one: int() would take it
        ({"limit": "9" * 5000}, "limit"),
        ({"order": "sideways"}, "order"),
        ({"order": "ASC"}, "order"),
        ({"after": "key_a", "before": "key_b"}, "before"),
    ],
)
async def test_bad_page_parameters_are_400_naming_the_param(world: World, params: dict[str, str], param: str) -> None:
    async with raw_client(world.api) as http:
        response = await http.get("/api-keys", params=params, headers=auth(world.alice_admin))
    assert response.status_code == 400
    error = envelope(response)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert error["code"] in ("invalid_type", "invalid_value")
    assert len(error["message"]) < 200


async def test_the_official_sdk_auto_paginates_the_keys(world: World) -> None:
    import openai
    from openai.pagination import AsyncCursorPage

    from tests.harness import async_openai

    class Key(openai.BaseModel):
        id: str
        name: str

    for n in range(7):
        await world.api.keys.create(name=f"sdk {n}", owner="alice")
    ids = await visible_to(world.api, world.alice_admin, "alice")
    client = async_openai(world.api, world.alice_admin)
    try:
        pages = client.get_api_list("/api-keys", model=Key, page=AsyncCursorPage[Key], options={"params": {"limit": 2}})
        first = await pages
        assert len(first.data) == 2 and first.has_more
        assert [key.id async for key in pages] == ids  # every page, with after=<last id>, until has_more is false
    finally:
        await client.close()
