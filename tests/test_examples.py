"""Every example in examples/ runs here."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.app import PrefixedApp
from tests.harness import async_openai, uvicorn_server

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def test_every_example_is_tested() -> None:
    tested = {
        "custom_backend.py",
        "fastapi_app.py",
        "openai_sdk.py",
        "fleet.sh",
        "function_backend.py",
        "responses_chat.py",
    }
    tested.add("prometheus_metrics.py")  # tests/test_prometheus_example.py
    tested |= {"starlette_app.py", "production.py", "django_project"}  # tests/test_host_examples.py
    present = {p.name for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh") and p.name != "__init__.py"}
    present |= {p.name for p in EXAMPLES.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    assert present <= tested, f"untested examples: {present - tested}"


@pytest.mark.anyio
async def test_custom_backend_example() -> None:
    module = importlib.import_module("examples.custom_backend")
    api: OzwellAPI = module.api
    _, key = await api.keys.create(name="t", owner="o")
    client = async_openai(api, key)
    completion = await client.chat.completions.create(model="shout-1", messages=[{"role": "user", "content": "hi you"}])
    assert completion.choices[0].message.content == "HI YOU"
    stream = await client.chat.completions.create(
        model="shout-1", messages=[{"role": "user", "content": "quiet please"}], stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == "QUIET PLEASE"
    assert [m.id for m in (await client.models.list()).data] == ["shout-1", "echo-embedding"]
    embedded = await client.embeddings.create(model="echo-embedding", input=["a", "b"], dimensions=8)
    assert [len(e.embedding) for e in embedded.data] == [8, 8]
    await client.close()


@pytest.mark.slow
def test_openai_sdk_example() -> None:
    api = OzwellAPI(secret="s" * 32)
    key = anyio.run(lambda: api.keys.create(name="t", owner="o"))[1]
    with uvicorn_server(PrefixedApp(api)) as url:
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "openai_sdk.py")],
            env={**os.environ, "OZWELL_API_KEY": key, "OZWELL_BASE_URL": url + "/v1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["Hello, Ozwell!", "Tell me a story", "Hello from asyncio"]


@pytest.mark.slow
def test_responses_chat_example() -> None:
    """The conversation example over a real socket, against a backend that shows what it was sent: each answer
    lists the user messages the model saw, so the output proves the server carried the conversation."""
    from ozwell_asgi.backends.function import FunctionBackend
    from ozwell_asgi.wire.chat import ChatCompletionRequest

    def reply(request: ChatCompletionRequest) -> str:
        return " | ".join(str(m.content) for m in request.messages if m.role == "user")

    api = OzwellAPI(secret="s" * 32, backend=FunctionBackend(reply, models=("seen",)))
    key = anyio.run(lambda: api.keys.create(name="t", owner="o"))[1]
    with uvicorn_server(PrefixedApp(api)) as url:
        out = subprocess.run(
            [sys.executable, str(EXAMPLES / "responses_chat.py")],
            env={**os.environ, "OZWELL_API_KEY": key, "OZWELL_BASE_URL": url + "/v1", "OZWELL_MODEL": "seen"},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "My name is Ada.",
        "My name is Ada. | What is my name?",
        "['What is my name?']",
        "First question",
        "First question | Second question",
    ]
