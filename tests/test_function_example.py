"""examples/function_backend.py runs and prints its answers; the code in docs/backends.md's sections on function
backends and routing runs too (its Python in a fresh interpreter, its router file through from_config); and a
function backend behind the app keeps its promises through the official SDK."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends.echo import EchoBackend
from ozwell_asgi.backends.function import FunctionBackend, Reply
from ozwell_asgi.backends.router import RouterBackend
from ozwell_asgi.tokens import default_tokenizer
from ozwell_asgi.types import ToolCall
from ozwell_asgi.wire.chat import ChatCompletionRequest, message_text
from tests.harness import async_openai

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("Wrap a model in a function", "Routing, aliases and fallbacks")


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_example_runs_and_prints_its_answers(tmp_path: Path) -> None:
    out = run_python((ROOT / "examples" / "function_backend.py").read_text(), tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.splitlines() == [
        "We are open 9 to 5, Monday to Friday.",
        "We are open (length)",
        "Refunds take 5 working days.",
        'look_up_order {"order_id": "A-17"} tool_calls',
    ]


def section(title: str) -> str:
    page = (ROOT / "docs" / "backends.md").read_text()
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    assert match, f"docs/backends.md has no section {title!r}"
    return match.group(1)


def blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```$", text, re.S | re.M)


@pytest.mark.parametrize("title", SECTIONS)
def test_the_docs_section_runs(title: str, tmp_path: Path) -> None:
    code = blocks(section(title), "python")
    assert code, f"{title!r} opens with a Python example"
    for block in code:
        out = run_python(block, tmp_path)
        assert out.returncode == 0, f"{title!r}'s example failed:\n{out.stderr[-3000:]}"


@pytest.mark.anyio
async def test_the_docs_router_file_builds_and_routes() -> None:
    (toml,) = blocks(section("Routing, aliases and fallbacks"), "toml")
    config = tomllib.loads(toml)
    answered = FunctionBackend(lambda request: f"local {request.model}", models=("llama3:8b",))
    router = RouterBackend.from_config(config, {"openai": EchoBackend(chat_models=("gpt-4o",)), "local": answered})
    # echo-embedding is not listed: the only route that could take it ("*") leads to a chat-only backend
    assert [m.id for m in await router.list_models()] == ["gpt-4o", "llama3:8b", "gpt-4", "fast"]
    router = RouterBackend.from_config(json.loads(json.dumps(config)), {"openai": answered, "local": answered})
    assert {m.id for m in await router.list_models()} >= {"gpt-4", "fast"}
    typo = toml.replace('backend = "local" }]', 'backend = "locl" }]')
    with pytest.raises(ValueError, match=re.escape("routes[0].fallbacks[0].backend: unknown backend 'locl'")):
        RouterBackend.from_config(tomllib.loads(typo), {"openai": answered, "local": answered})


@pytest.mark.anyio
async def test_a_function_backend_behind_the_app() -> None:
    async def reply(request: ChatCompletionRequest) -> AsyncIterator[str]:
        text = message_text(request.messages[-1])
        if text == "weather":
            return
        first, *rest = text.split(" ")
        yield first
        for word in rest:
            yield " " + word

    async def tools(request: ChatCompletionRequest) -> Reply:
        if request.response_format is not None:
            return Reply(json={"city": "Oslo", "celsius": -3})
        return Reply(content="Checking.", tool_calls=[ToolCall(id="", name="weather", arguments='{"city": "Oslo"}')])

    router = RouterBackend.from_config(
        {"routes": [{"model": "words", "backend": "words"}, {"model": "tools", "backend": "tools"}]},
        {"words": FunctionBackend(reply, models=("words",)), "tools": FunctionBackend(tools, models=("tools",))},
    )
    api = OzwellAPI(secret="s" * 32, backend=router)
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    client = async_openai(api, key)
    messages = [{"role": "user", "content": "one two three four five six"}]

    completion = await client.chat.completions.create(model="words", messages=messages, n=2, stop=["four"])
    assert [c.message.content for c in completion.choices] == ["one two three "] * 2
    tokenizer = default_tokenizer()
    sent = sum(tokenizer.count(piece) for piece in ("one", " two", " three", " "))  # each piece counted alone
    assert completion.usage is not None and completion.usage.completion_tokens == 2 * sent

    stream = await client.chat.completions.create(
        model="words", messages=messages, max_completion_tokens=4, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == [
        "one",
        " two",
        " three",
        " four",
    ]  # one token each: the fifth is over the bound
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

    completion = await client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "x"}])
    choice = completion.choices[0]
    assert (choice.message.content, choice.finish_reason) == ("Checking.", "tool_calls")
    (call,) = choice.message.tool_calls or []
    assert call.id.startswith("call_")
    assert (call.function.name, call.function.arguments) == ("weather", '{"city": "Oslo"}')  # type: ignore[union-attr]

    completion = await client.chat.completions.create(
        model="tools", messages=[{"role": "user", "content": "x"}], response_format={"type": "json_object"}
    )
    assert json.loads(completion.choices[0].message.content or "") == {"city": "Oslo", "celsius": -3}
    await client.close()
