"""Every layer answers in OpenAI's envelope with the right status and param: routing, auth, bodies, validation."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.context import Settings
from tests.harness import async_openai, raw_client
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
        assert response.status_code == 400 and envelope(response)["param"] == "messages[1].role"

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


@pytest.fixture
async def roomy_api_and_key() -> tuple[OzwellAPI, str]:
    """The default body cap and an unlimited plan: room for bodies at and past OpenAI's limits."""
    api = OzwellAPI(secret="s" * 32)
    _, secret = await api.keys.create(name="test", owner="alice", plan="enterprise")
    return api, secret


def _tools(count: int, name: str = "f") -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f"{name}{i}"}} for i in range(count)]


# (case, extra body fields, param, code, message); each has a twin at the limit that is accepted.
OPENAI_LIMITS: list[tuple[str, dict[str, Any], str, str, str]] = [
    (
        "metadata pairs",
        {"metadata": {f"k{i}": "v" for i in range(17)}},
        "metadata",
        "invalid_value",
        "Invalid 'metadata': too many properties. "
        "Expected an object with at most 16 properties, but got an object with 17 properties instead.",
    ),
    (
        "metadata key length",
        {"metadata": {"k" * 65: "v"}},
        "metadata." + "k" * 65,
        "invalid_value",
        f"Invalid property name in 'metadata': '{'k' * 65}' is too long. "
        "Expected a string with maximum length 64, but got a string with length 65 instead.",
    ),
    (
        "metadata value length",
        {"metadata": {"note": "v" * 513}},
        "metadata.note",
        "invalid_value",
        "Invalid 'metadata.note': string too long. "
        "Expected a string with maximum length 512, but got a string with length 513 instead.",
    ),
    (
        "logit_bias entries",
        {"logit_bias": {str(i): -1 for i in range(301)}},
        "logit_bias",
        "invalid_value",
        "Invalid 'logit_bias': too many properties. "
        "Expected an object with at most 300 properties, but got an object with 301 properties instead.",
    ),
    (
        "tools",
        {"tools": _tools(129)},
        "tools",
        "invalid_value",
        "Invalid 'tools': array too long. "
        "Expected an array with maximum length 128, but got an array with length 129 instead.",
    ),
    (
        "stop sequences",
        {"stop": ["a", "b", "c", "d", "e"]},
        "stop",
        "invalid_value",
        "Invalid 'stop': array too long. "
        "Expected an array with maximum length 4, but got an array with length 5 instead.",
    ),
    (
        "n",
        {"n": 129},
        "n",
        "invalid_value",
        "Invalid 'n': integer above maximum value. Expected a value <= 128, but got 129 instead.",
    ),
    (
        "function name pattern",
        {"tools": [*_tools(1), {"type": "function", "function": {"name": "mcp.search"}}]},
        "tools[1].function.name",
        "invalid_value",
        "Invalid 'tools[1].function.name': string does not match pattern. "
        "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'.",
    ),
    (
        "function name length",
        {"functions": [{"name": "f" * 65}]},
        "functions[0].name",
        "invalid_value",
        "Invalid 'functions[0].name': string too long. "
        "Expected a string with maximum length 64, but got a string with length 65 instead.",
    ),
]

AT_THE_LIMITS: dict[str, Any] = {
    "metadata": {f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)},
    "logit_bias": {str(i): -1 for i in range(300)},
    "tools": _tools(128, name="f_-" + "x" * 56),
    "stop": ["a", "b", "c", "d"],
    "n": 128,
    "max_tokens": 1,
}


@pytest.mark.parametrize(
    ("fields", "param", "code", "message"), [c[1:] for c in OPENAI_LIMITS], ids=[c[0] for c in OPENAI_LIMITS]
)
async def test_openai_limits_are_400s_in_openai_words(
    roomy_api_and_key: tuple[OzwellAPI, str], fields: dict[str, Any], param: str, code: str, message: str
) -> None:
    api, key = roomy_api_and_key
    async with raw_client(api) as http:
        response = await http.post("/chat/completions", json=GOOD | fields, headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 400
    assert envelope(response) == {"message": message, "type": "invalid_request_error", "param": param, "code": code}


async def test_requests_at_openai_limits_are_served(roomy_api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = roomy_api_and_key
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions", json=GOOD | AT_THE_LIMITS, headers={"authorization": f"Bearer {key}"}
        )
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 128


async def test_param_is_spelled_as_openai_does(roomy_api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = roomy_api_and_key
    auth = {"authorization": f"Bearer {key}"}
    user = {"role": "user", "content": "hi"}
    cases: list[tuple[dict[str, Any], str, str]] = [
        (
            {"messages": [{"role": "user", "content": {"type": "text", "text": "hi"}}]},
            "messages[0].content",
            "Invalid type for 'messages[0].content': expected one of a string or array of objects, but got an "
            "object instead.",
        ),
        (
            {"messages": [user, {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text"}]}]},
            "messages[1].content[1].text",
            "Missing required parameter: 'messages[1].content[1].text'.",
        ),
        (
            {"messages": [user], "tools": [*_tools(1), {"type": "function", "function": {"name": 5}}]},
            "tools[1].function.name",
            "Invalid type for 'tools[1].function.name': expected a string, but got an integer instead.",
        ),
        (
            {"messages": [user], "logit_bias": {"50256": 101}},
            "logit_bias.50256",
            "Invalid 'logit_bias.50256': integer above maximum value. Expected a value <= 100, but got 101 instead.",
        ),
        (
            {"messages": [user], "audio": {"voice": {"id": "v", "pitch": 2}, "format": "mp3"}},
            "audio.voice.pitch",
            "Unrecognized request argument supplied: audio.voice.pitch",
        ),
    ]
    async with raw_client(api) as http:
        for fields, param, message in cases:
            response = await http.post("/chat/completions", json={"model": "echo"} | fields, headers=auth)
            assert response.status_code == 400, param
            error = envelope(response)
            assert (error["param"], error["message"]) == (param, message)


async def test_hostile_bodies_are_answered_with_one_error(roomy_api_and_key: tuple[OzwellAPI, str]) -> None:
    # 100,000 bad messages, or a closed object with 300,000 unknown fields: one 400 naming the first, never a 5xx.
    api, key = roomy_api_and_key
    auth = {"authorization": f"Bearer {key}"}
    voice = {"id": "v"} | {f"x{i}": 1 for i in range(300_000)}
    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions", json={"model": "echo", "messages": [{"role": "robot"}] * 100_000}, headers=auth
        )
        assert response.status_code == 400 and envelope(response)["param"] == "messages[0].role"
        response = await http.post(
            "/chat/completions", json=GOOD | {"audio": {"voice": voice, "format": "mp3"}}, headers=auth
        )
        assert response.status_code == 400
        assert envelope(response)["message"] == "Unrecognized request argument supplied: audio.voice.x0"
        depth = 100_000
        deep = b'{"model": "echo", "messages": [{"role": "user", "content": "x"}], "x": ' + b"[" * depth + b"]" * depth
        response = await http.post("/chat/completions", content=deep + b"}", headers=auth)
        assert response.status_code == 400 and "more deeply than we accept" in envelope(response)["message"]


async def test_openai_sdk_sees_openai_params(roomy_api_and_key: tuple[OzwellAPI, str]) -> None:
    api, key = roomy_api_and_key
    client = async_openai(api, key, max_retries=0)
    try:
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "hi"}], metadata={f"k{i}": "v" for i in range(17)}
            )
        assert (info.value.status_code, info.value.param, info.value.code) == (400, "metadata", "invalid_value")
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="echo",
                messages=[{"role": "user", "content": "hi"}],
                tools=[{"type": "function", "function": {"name": "search the web"}}],
            )
        assert info.value.param == "tools[0].function.name"
        assert "string does not match pattern" in info.value.message
        with pytest.raises(openai.BadRequestError) as info:
            await client.chat.completions.create(
                model="echo",
                messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": 5}],  # type: ignore[list-item]
            )
        assert info.value.param == "messages[1].content"
        served = await client.chat.completions.create(
            model="echo",
            messages=[{"role": "user", "content": "hi"}],
            metadata={f"k{i}": "v" * 512 for i in range(16)},
            tools=[{"type": "function", "function": {"name": f"tool_{i}"}} for i in range(128)],
            logit_bias={str(i): 1 for i in range(300)},
        )
        assert served.choices[0].message.role == "assistant"
    finally:
        await client.close()


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
