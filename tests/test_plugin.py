"""The pytest plugin (``ozwell_asgi.testing.plugin``, loaded by its ``pytest11`` entry point): a user's own test
file, in a pytest of its own with nothing but the installed package, drives chat (sync, async, streamed), scripted
tool calls, errors, gates and the loopback server through the official SDK and raw HTTP. Also what the plugin
checks when a test ends, and how the in-process transports behave when a client leaves early."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import anyio
import openai
import pytest

from ozwell_asgi import OzwellAPI, UsageEvent
from ozwell_asgi.testing import Gate, ScriptedBackend
from ozwell_asgi.testing.clients import async_openai, sync_openai

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent

USER_TESTS = '''
import json
import math

import anyio
import httpx
import openai
import pytest

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


@pytest.fixture
def anyio_backend():
    return "asyncio"


def texts(chunks):
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def test_sync_chat_records_the_request(ozwell_backend, openai_client):
    ozwell_backend.reply("Hi there, human.")
    answer = openai_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, temperature=0.25)
    assert answer.choices[0].message.content == "Hi there, human."
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.completion_tokens > 0
    (request,) = ozwell_backend.requests
    assert request.model == "gpt-4o-mini"
    assert [m.role for m in request.messages] == ["system", "user"]
    assert request.messages[1].content == "Hello?"
    assert request.temperature == 0.25
    assert ozwell_backend.pending == 0


def test_sync_stream_comes_in_pieces(ozwell_backend, openai_client):
    ozwell_backend.reply("one two  three")
    ozwell_backend.reply(["al", "pha"])
    with openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    ) as stream:
        chunks = list(stream)
    assert texts(chunks) == ["one", " two", "  three"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens > 0
    with openai_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True) as stream:
        assert texts(stream) == ["al", "pha"]
    assert [r.stream for r in ozwell_backend.requests] == [True, True]


@pytest.mark.anyio
async def test_async_chat_and_stream(ozwell_backend, async_openai_client):
    ozwell_backend.reply("first")
    ozwell_backend.reply("second answer")
    answer = await async_openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert answer.choices[0].message.content == "first"
    stream = await async_openai_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    assert texts([c async for c in stream]) == ["second", " answer"]
    assert [r.model for r in ozwell_backend.requests] == ["gpt-4o", "gpt-4o"]


def weather_agent(client, question):
    """The code under test: asks, runs the tool the model calls, asks again with its result."""
    messages = [{"role": "user", "content": question}]
    first = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]
    city = json.loads(call.function.arguments)["city"]
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        }
    )
    messages.append({"role": "tool", "tool_call_id": call.id, "content": f"Sunny in {city}"})
    final = client.chat.completions.create(model="gpt-4o-mini", messages=messages, tools=TOOLS)
    return first.choices[0].finish_reason, final.choices[0].message.content


def test_a_scripted_tool_call_round_trip(ozwell_backend, openai_client):
    ozwell_backend.tool_call("get_weather", {"city": "Paris"}, id="call_weather_1")
    ozwell_backend.reply("It is sunny in Paris.")
    assert weather_agent(openai_client, "Weather in Paris?") == ("tool_calls", "It is sunny in Paris.")
    first, second = ozwell_backend.requests
    assert [t.function.name for t in first.tools] == ["get_weather"]
    tool_message = second.messages[-1]
    assert tool_message.role == "tool"
    assert (tool_message.tool_call_id, tool_message.content) == ("call_weather_1", "Sunny in Paris")
    assert second.messages[1].tool_calls[0].function.arguments == '{"city": "Paris"}'


@pytest.mark.anyio
async def test_an_async_streamed_tool_call(ozwell_backend, async_openai_client):
    ozwell_backend.tool_call("get_weather", '{"city": "Oslo"}', content="Let me check.")
    stream = await async_openai_client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, stream=True
    )
    content, calls, finish = "", {}, []
    async for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or ():
            entry = calls.setdefault(call.index, {"id": call.id, "name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
        if chunk.choices[0].finish_reason:
            finish.append(chunk.choices[0].finish_reason)
    assert content == "Let me check."
    assert finish == ["tool_calls"]
    (call,) = calls.values()
    assert call["id"].startswith("call_")
    assert (call["name"], call["arguments"]) == ("get_weather", '{"city": "Oslo"}')


@pytest.mark.parametrize(
    ("status", "exception"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (404, openai.NotFoundError),
        (409, openai.ConflictError),
        (429, openai.RateLimitError),
        (503, openai.InternalServerError),
    ],
)
def test_a_queued_error_raises_its_sdk_exception(ozwell_backend, openai_client, status, exception):
    ozwell_backend.error(status, f"scripted failure {status}")
    with pytest.raises(exception) as caught:
        openai_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert isinstance(caught.value, openai.APIStatusError)
    assert caught.value.status_code == status
    assert caught.value.body["message"] == f"scripted failure {status}"


@pytest.mark.anyio
async def test_errors_before_and_during_a_stream(ozwell_backend, async_openai_client):
    ozwell_backend.error(429, "slow down", code="custom_code")
    ozwell_backend.error(502, "upstream fell over", after="partial answer")
    with pytest.raises(openai.RateLimitError) as before:
        await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    assert before.value.code == "custom_code"
    stream = await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
    seen = []
    with pytest.raises(openai.APIError) as during:
        async for chunk in stream:
            seen.extend(texts([chunk]))
    assert "".join(seen) == "partial answer"
    assert not isinstance(during.value, openai.APIStatusError)  # the response had started: 200, then the event
    assert (during.value.message, during.value.code) == ("upstream fell over", "upstream_error")


@pytest.mark.anyio
async def test_a_gate_holds_the_stream_until_the_test_opens_it(ozwell_backend, async_openai_client):
    gate = ozwell_backend.gate()
    ozwell_backend.reply(["Hello", gate, " world"])
    with anyio.fail_after(10):
        stream = await async_openai_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        chunks = stream.__aiter__()
        first = await chunks.__anext__()
        assert first.choices[0].delta.content == "Hello"  # delivered while the answer waits at the gate
        assert await anyio.to_thread.run_sync(gate.wait_reached)
        assert not gate.is_open
        gate.open()
        assert texts([c async for c in chunks]) == [" world"]


def test_a_held_answer_times_the_client_out(ozwell_backend, openai_client):
    gate = ozwell_backend.gate()
    ozwell_backend.reply("too late", wait=gate)
    with pytest.raises(openai.APITimeoutError):
        openai_client.with_options(timeout=0.2).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert gate.reached and not gate.is_open


def test_an_unscripted_request_is_a_clear_error_and_not_retried(ozwell_backend, openai_client):
    with pytest.raises(openai.InternalServerError) as caught:
        openai_client.with_options(max_retries=3).chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert caught.value.code == "ozwell_script_empty"
    assert "ozwell_backend.reply" in caught.value.message
    assert len(ozwell_backend.requests) == 1  # x-should-retry: false
    with pytest.raises(AssertionError, match="found no answer queued"):
        ozwell_backend.check()
    ozwell_backend.check_at_teardown = False


def test_each_choice_takes_an_answer(ozwell_backend, openai_client):
    ozwell_backend.reply("first")
    ozwell_backend.tool_call("get_weather", {"city": "Rome"})
    answer = openai_client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, tools=TOOLS, n=2)
    assert [c.message.content for c in answer.choices] == ["first", None]
    assert [c.finish_reason for c in answer.choices] == ["stop", "tool_calls"]
    assert len(ozwell_backend.requests) == 1


def test_models_and_embeddings(ozwell_backend, openai_client):
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="my-model", messages=MESSAGES)
    ozwell_backend.models.append("my-model")
    ozwell_backend.reply("mine")
    answer = openai_client.chat.completions.create(model="my-model", messages=MESSAGES)
    assert answer.choices[0].message.content == "mine"
    assert "my-model" in {m.id for m in openai_client.models.list()}
    vectors = openai_client.embeddings.create(model="text-embedding-3-small", input=["cat", "dog", "cat"]).data
    assert vectors[0].embedding == vectors[2].embedding != vectors[1].embedding
    assert math.isclose(sum(x * x for x in vectors[0].embedding), 1.0, rel_tol=1e-6)
    assert ozwell_backend.embedding_requests[0].input == ["cat", "dog", "cat"]


def test_the_loopback_server(ozwell_backend, ozwell_server, ozwell_api_key):
    assert ozwell_server.startswith("http://127.0.0.1:") and ozwell_server.endswith("/v1")
    gate = ozwell_backend.gate()
    ozwell_backend.reply("over a socket")
    ozwell_backend.reply(["before", gate, " after"])
    ozwell_backend.reply("from the SDK")
    headers = {"authorization": f"Bearer {ozwell_api_key}"}
    body = {"model": "gpt-4o-mini", "messages": MESSAGES}
    with httpx.Client(base_url=ozwell_server, headers=headers, timeout=10) as http:
        answer = http.post("/chat/completions", json=body)
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == "over a socket"
        with http.stream("POST", "/chat/completions", json={**body, "stream": True}) as response:
            events = (line[6:] for line in response.iter_lines() if line.startswith("data: "))
            assert json.loads(next(events))["choices"][0]["delta"]["content"] == "before"
            assert gate.wait_reached(5) and not gate.is_open
            gate.open()
            rest = list(events)
        assert json.loads(rest[0])["choices"][0]["delta"]["content"] == " after"
        assert rest[-1] == "[DONE]"
        refused = http.post("/chat/completions", json=body, headers={"authorization": "Bearer ozw_nope"})
        assert refused.status_code == 401
    with openai.OpenAI(base_url=ozwell_server, api_key=ozwell_api_key, max_retries=0) as client:
        assert client.chat.completions.create(**body).choices[0].message.content == "from the SDK"
'''

TEARDOWN_TESTS = """
import openai
import pytest


def test_leaves_an_answer_unused(ozwell_backend):
    ozwell_backend.reply("never asked for")


def test_makes_an_unscripted_call(ozwell_backend, openai_client):
    with pytest.raises(openai.InternalServerError):
        openai_client.chat.completions.create(model="gpt-4.1", messages=[{"role": "user", "content": "hi"}])


def test_opts_out(ozwell_backend):
    ozwell_backend.reply("unused on purpose")
    ozwell_backend.check_at_teardown = False


def test_fails_on_its_own(ozwell_backend):
    ozwell_backend.reply("unused because the test failed first")
    assert 1 + 1 == 3, "the test's own failure"
"""


def _run(pytester: pytest.Pytester, source: str) -> pytest.RunResult:
    """A pytest of its own on ``source``, in a scratch directory outside the project: only what is installed."""
    pytester.makepyfile(test_user=source)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning", timeout=300)


@pytest.mark.slow
def test_a_users_own_file_drives_the_sdk_with_only_the_plugin(pytester: pytest.Pytester) -> None:
    result = _run(pytester, USER_TESTS)
    result.assert_outcomes(passed=18)


@pytest.mark.slow
def test_the_plugin_fails_a_test_that_leaves_the_script_unfinished(pytester: pytest.Pytester) -> None:
    result = _run(pytester, TEARDOWN_TESTS)
    result.assert_outcomes(passed=3, failed=1, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaves_an_answer_unused*",
            "*1 queued answer(s) were never used:*",
            "*reply: 'never asked for'*",
            "*ERROR at teardown of test_makes_an_unscripted_call*",
            "*1 request(s) found no answer queued:*",
            "*request 1 (model 'gpt-4.1')*",
        ]
    )
    assert "unused on purpose" not in result.stdout.str()
    assert "ERROR at teardown of test_fails_on_its_own" not in result.stdout.str()  # its own failure says it all


def test_the_entry_point_loads_the_plugin_without_the_sdk() -> None:
    script = textwrap.dedent(
        """
        import importlib.metadata, json, sys
        (entry,) = [e for e in importlib.metadata.entry_points(group="pytest11") if e.name == "ozwell_asgi"]
        module = entry.load()
        print(json.dumps([entry.value, sorted({"openai", "httpx2", "uvicorn"} & set(sys.modules)),
                          sorted(n for n in dir(module) if n.startswith(("ozwell_", "openai_", "async_openai_")))]))
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd="/", timeout=60)
    assert out.returncode == 0, out.stderr
    value, heavy, fixtures = json.loads(out.stdout)
    assert value == "ozwell_asgi.testing.plugin"
    assert heavy == []  # the SDK, httpx2 and uvicorn load when a fixture needs them
    assert fixtures == [
        "async_openai_client",
        "openai_client",
        "ozwell_api_key",
        "ozwell_app",
        "ozwell_backend",
        "ozwell_server",
    ]


def test_the_testing_extra_holds_what_the_plugin_imports() -> None:
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["testing"]
    names = {req.split(">")[0].split("=")[0].split("[")[0].strip() for req in extra}
    assert {"pytest", "openai", "httpx2"} <= names
    entry = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert entry == {"ozwell_asgi": "ozwell_asgi.testing.plugin"}


# -- the in-process transports when the client leaves early --------------------------------------------------------


def _app_with_key(backend: ScriptedBackend, events: list[UsageEvent]) -> tuple[OzwellAPI, str]:
    api = OzwellAPI(backend=backend, on_usage=events.append)

    async def create() -> str:
        return (await api.keys.create(name="t", owner="alice", plan="enterprise"))[1]

    return api, anyio.run(create)


def _held_backend() -> tuple[ScriptedBackend, Gate]:
    backend = ScriptedBackend()
    gate = backend.gate()
    backend.reply(["Hello", gate, " never sent"])
    return backend, gate


MESSAGES = [{"role": "user", "content": "hi"}]


def test_closing_a_sync_stream_early_disconnects_and_cancels_the_app() -> None:
    backend, gate = _held_backend()
    events: list[UsageEvent] = []
    api, key = _app_with_key(backend, events)
    with sync_openai(api, key, max_retries=0) as client:
        with client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True) as stream:
            first = next(iter(stream))
            assert first.choices[0].delta.content == "Hello"
            assert gate.wait_reached(5)
            assert events == []
        # closed with the answer still held: the app was cancelled and has settled the call as abandoned
        assert [e.status for e in delivered(events)] == [499]
    assert not gate.is_open
    backend.check()


def delivered(events: list[UsageEvent], count: int = 1) -> list[UsageEvent]:
    """``events`` once ``count`` have arrived: a sync hook gets them in a worker thread, off the response path."""
    for _ in range(1000):
        if len(events) >= count:
            break
        time.sleep(0.005)
    return events


@pytest.mark.anyio
async def test_closing_an_async_stream_early_disconnects_and_cancels_the_app() -> None:
    backend, gate = _held_backend()
    events: list[UsageEvent] = []
    api, key = await anyio.to_thread.run_sync(_app_with_key, backend, events)
    client = async_openai(api, key, max_retries=0)
    with anyio.fail_after(10):
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True)
        async for chunk in stream:
            assert chunk.choices[0].delta.content == "Hello"
            break
        assert await anyio.to_thread.run_sync(gate.wait_reached)
        assert events == []
        await stream.close()
    await api.usage.flush()  # usage events reach hooks off the response path
    assert [e.status for e in events] == [499]
    assert not gate.is_open


def test_a_sync_read_timeout_cancels_the_held_app() -> None:
    backend = ScriptedBackend()
    gate = backend.gate()
    backend.reply("late", wait=gate)
    events: list[UsageEvent] = []
    api, key = _app_with_key(backend, events)
    with sync_openai(api, key, max_retries=0, timeout=0.1) as client:
        with pytest.raises(openai.APITimeoutError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        assert [e.status for e in delivered(events)] == [499]
    assert gate.reached and not gate.is_open


def test_scripting_rejects_what_it_could_not_send() -> None:
    backend = ScriptedBackend()
    with pytest.raises(ValueError, match="between 400 and 599"):
        backend.error(200)
    with pytest.raises(ValueError, match="delay"):
        backend.reply(["a", 61.0])
    with pytest.raises(TypeError, match="steps"):
        backend.reply(["a", b"bytes"])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="function name"):
        backend.tool_call("")
    assert backend.pending == 0


def test_open_gates_opens_every_gate_it_was_given() -> None:
    backend = ScriptedBackend()
    made, loose, unrelated = backend.gate(), Gate(), Gate()
    backend.reply(["a", loose, "b"])
    backend.error(500, wait=loose)
    backend.open_gates()
    assert made.is_open and loose.is_open
    assert not unrelated.is_open
