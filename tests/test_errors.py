"""Every layer answers in OpenAI's envelope with the right status and param: routing, auth, bodies, validation."""

from __future__ import annotations

import time
from typing import Any

import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.context import Settings
from tests.harness import raw_client
from tests.openai_schema import validate

pytestmark = pytest.mark.anyio

GOOD = {"model": "echo", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
async def api_and_key() -> tuple[OzwellAPI, str]:
    api = OzwellAPI(secret="s" * 32, settings=Settings(max_body_size=4096))
    _, secret = await api.keys.create(name="test", owner="alice")
    return api, secret


def envelope(response: Any) -> dict[str, Any]:
    body = response.json()
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers["x-request-id"]
    assert "openai-processing-ms" in response.headers
    return dict(body["error"])


async def test_missing_and_invalid_keys(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json=GOOD)
        assert response.status_code == 401
        assert envelope(response) | {"message": ""} == {
            "message": "",
            "type": "authentication_error",
            "param": None,
            "code": "missing_api_key",
        }
        for bad in ("Bearer ozw_short", "Bearer " + "x" * 40, "Basic abc", f"Bearer {key}x", "Bearer ozw_" + "a" * 43):
            response = await http.post("/chat/completions", json=GOOD, headers={"authorization": bad})
            assert response.status_code == 401, bad
            error = envelope(response)
            assert (error["type"], error["code"]) == (
                "authentication_error",
                "missing_api_key" if bad.startswith("Basic") else "invalid_api_key",
            )
            assert key not in response.text


async def test_revoked_expired_and_rotated_keys_stop_working(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    headers = {"authorization": f"Bearer {key}"}
    async with raw_client(api) as http:
        assert (await http.post("/chat/completions", json=GOOD, headers=headers)).status_code == 200
        record = (await api.keys.list("alice"))[0]
        rotated = await api.keys.rotate(record.id)
        assert rotated is not None
        response = await http.post("/chat/completions", json=GOOD, headers=headers)
        assert response.status_code == 401 and envelope(response)["code"] == "invalid_api_key"
        new_headers = {"authorization": f"Bearer {rotated[1]}"}
        assert (await http.post("/chat/completions", json=GOOD, headers=new_headers)).status_code == 200
        await api.keys.revoke(record.id)
        response = await http.post("/chat/completions", json=GOOD, headers=new_headers)
        assert response.status_code == 401 and envelope(response)["code"] == "invalid_api_key"

        _, short = await api.keys.create(name="short", owner="alice", expires_in=1)
        short_headers = {"authorization": f"Bearer {short}"}
        assert (await http.post("/chat/completions", json=GOOD, headers=short_headers)).status_code == 200
        # expires_at is rounded up: the key lives at least 1 s and under 2 s. Move the server's clock past it.
        api.services.authenticator.clock = lambda: time.time() + 2
        response = await http.post("/chat/completions", json=GOOD, headers=short_headers)
        assert response.status_code == 401 and envelope(response)["code"] == "invalid_api_key"


async def test_model_restricted_key_is_403_and_hidden_from_list(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, _ = api_and_key
    _, key = await api.keys.create(name="limited", owner="bob", models=["echo-embedding"])
    headers = {"authorization": f"Bearer {key}"}
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json=GOOD, headers=headers)
        assert response.status_code == 403
        assert envelope(response) | {"message": ""} == {
            "message": "",
            "type": "permission_error",
            "param": "model",
            "code": "insufficient_permissions",
        }
        models = (await http.get("/models", headers=headers)).json()
        assert [m["id"] for m in models["data"]] == ["echo-embedding"]
        response = await http.get("/models/echo", headers=headers)
        assert response.status_code == 404 and envelope(response)["code"] == "model_not_found"


async def test_key_without_api_scope_is_403(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, _ = api_and_key
    _, key = await api.keys.create(name="admin-only", owner="bob", scopes=["admin"])
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json=GOOD, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 403 and envelope(response)["code"] == "insufficient_permissions"


async def test_routing_errors(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    headers = {"authorization": f"Bearer {key}"}
    async with raw_client(api) as http:
        response = await http.post("/chat/completion", json=GOOD, headers=headers)
        assert response.status_code == 404
        assert envelope(response) == {
            "message": "Invalid URL (POST /chat/completion)",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
        response = await http.get("/chat/completions", headers=headers)
        assert response.status_code == 405
        assert envelope(response)["message"] == "Invalid method for URL (GET /chat/completions)"
        assert "POST" in response.headers["allow"]
        response = await http.delete("/models", headers=headers)
        assert response.status_code == 405


async def test_body_errors(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    auth = {"authorization": f"Bearer {key}"}
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions", content=b"{not json", headers=auth | {"content-type": "application/json"}
        )
        assert response.status_code == 400
        error = envelope(response)
        assert error["type"] == "invalid_request_error" and error["param"] is None
        assert "could not parse the JSON body" in error["message"]

        response = await http.post(
            "/chat/completions",
            content=b"model=echo",
            headers=auth | {"content-type": "application/x-www-form-urlencoded"},
        )
        assert response.status_code == 415 and envelope(response)["type"] == "invalid_request_error"

        big = {"model": "echo", "messages": [{"role": "user", "content": "x" * 5000}]}
        response = await http.post("/chat/completions", json=big, headers=auth)
        assert response.status_code == 413 and envelope(response)["code"] == "payload_too_large"

        async def chunked() -> Any:
            for _ in range(10):
                yield b" " * 1000

        response = await http.post(
            "/chat/completions", content=chunked(), headers=auth | {"content-type": "application/json"}
        )
        assert response.status_code == 413

        bad = {"model": "echo", "messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}
        response = await http.post("/chat/completions", json=bad, headers=auth)
        assert response.status_code == 400 and envelope(response)["param"] == "messages.1.role"

        response = await http.post(
            "/chat/completions", json={"model": "echo", "messages": [], "temperature": 1}, headers=auth
        )
        assert response.status_code == 400 and envelope(response)["param"] == "messages"

        response = await http.post("/chat/completions", json=GOOD | {"temperature": 9}, headers=auth)
        assert response.status_code == 400 and envelope(response)["param"] == "temperature"

        response = await http.post(
            "/chat/completions", json=GOOD | {"stream_options": {"include_usage": True}}, headers=auth
        )
        assert response.status_code == 400 and envelope(response)["param"] == "stream_options"

        response = await http.post("/chat/completions", json=GOOD | {"top_logprobs": 2}, headers=auth)
        assert response.status_code == 400 and envelope(response)["param"] == "top_logprobs"

        response = await http.post("/chat/completions", json=GOOD | {"tool_choice": "required"}, headers=auth)
        assert response.status_code == 400 and envelope(response)["param"] == "tool_choice"


async def test_request_id_is_echoed(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    async with raw_client(api) as http:
        response = await http.get("/models", headers={"authorization": f"Bearer {key}", "x-request-id": "trace-123"})
        assert response.headers["x-request-id"] == "trace-123"
        response = await http.get("/nowhere", headers={"x-request-id": "trace-404"})
        assert response.headers["x-request-id"] == "trace-404"


async def test_models_list_and_retrieve(api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = api_and_key
    async with raw_client(api) as http:
        headers = {"authorization": f"Bearer {key}"}
        listing = (await http.get("/models", headers=headers)).json()
        validate("ListModelsResponse", listing)
        assert [m["id"] for m in listing["data"]] == ["echo", "echo-embedding"]
        model = (await http.get("/models/echo", headers=headers)).json()
        validate("Model", model)
        assert model["id"] == "echo" and model["object"] == "model"
        response = await http.get("/models/org/some-model", headers=headers)
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


def test_key_hasher_is_hmac_sha256() -> None:
    import hashlib
    import hmac

    from ozwell_asgi.auth import KeyHasher

    for secret in (b"s" * 16, b"x" * 64, b"long" * 40):
        key = "ozw_" + "k" * 43
        assert KeyHasher(secret).hash(key) == hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()
