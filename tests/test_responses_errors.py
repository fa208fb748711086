"""The Responses API's edges: bad requests (the envelope and its ``param``), ``max_output_tokens`` (incomplete),
backend failures before and during a stream (``response.failed`` then ``error``), metering (charged like chat,
429 when spent), ``/responses/input_tokens``, truncation, and Ozwell's ``include_sources`` against a small
SourceFinder of this file's own.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx2
import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends.function import FunctionBackend
from ozwell_asgi.context import Settings
from ozwell_asgi.errors import BadGatewayError
from ozwell_asgi.ratelimit import LimitsRateLimiter
from ozwell_asgi.stores.memory import MemoryResponseStore
from ozwell_asgi.types import Call, Principal, Source, UsageEvent
from ozwell_asgi.wire.chat import ChatCompletionRequest
from tests.harness import async_openai, raw_client
from tests.openai_schema import validate
from tests.test_responses_api import check_event, check_response, parse_sse

pytestmark = pytest.mark.anyio

SECRET = "s" * 32


def fixed_clock() -> float:
    return 1_800_000_030.0


def make_api(**kwargs: Any) -> tuple[OzwellAPI, list[UsageEvent]]:
    usage: list[UsageEvent] = []
    kwargs.setdefault("rate_limiter", LimitsRateLimiter("memory://", clock=fixed_clock))
    api = OzwellAPI(secret=SECRET, response_store=MemoryResponseStore(), on_usage=usage.append, **kwargs)
    return api, usage


async def post(api: OzwellAPI, key: str, body: Any, path: str = "/responses") -> httpx2.Response:
    async with raw_client(api) as http:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return await http.post(
            path, content=content, headers={"authorization": f"Bearer {key}", "content-type": "application/json"}
        )


def envelope(response: httpx2.Response) -> dict[str, Any]:
    body = response.json()
    validate("ErrorResponse", body)
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# --- bad requests ------------------------------------------------------------------------------------------------

BAD: list[tuple[Any, str | None, str]] = [
    (b"{not json", None, "We could not parse the JSON body"),
    ([1, 2], None, "must be a JSON object"),
    ({"input": "x"}, "model", "Missing required parameter: 'model'."),
    ({"model": "echo"}, "input", "Missing required parameter: 'input'."),
    ({"model": "echo", "input": 5}, "input", "expected one of a string or array of objects"),
    ({"model": "echo", "input": []}, "input", "empty array"),
    ({"model": "echo", "input": [7]}, "input[0]", "expected an object"),
    ({"model": "echo", "input": [{"role": "bot", "content": "x"}]}, "input[0].role", "Invalid value: 'bot'"),
    (
        {"model": "echo", "input": [{"role": "user", "content": [{"type": "input_text", "text": 3}]}]},
        "input[0].content[0].text",
        "expected a string",
    ),
    (
        {"model": "echo", "input": [{"role": "user", "content": [{"type": "input_video"}]}]},
        "input[0].content[0].type",
        "Invalid value: 'input_video'",
    ),
    ({"model": "echo", "input": [{"type": "web_search_call", "id": "x"}]}, "input[0]", "'web_search_call'"),
    (
        {"model": "echo", "input": [{"type": "function_call", "call_id": "c", "name": "f"}]},
        "input[0].arguments",
        "Missing required parameter",
    ),
    (
        {"model": "echo", "input": [{"role": "user", "content": [{"type": "input_image", "file_id": "file-1"}]}]},
        "input[0].content[0].file_id",
        "not supported",
    ),
    (
        {"model": "echo", "input": [{"role": "system", "content": [{"type": "input_image", "image_url": "u"}]}]},
        "input[0].content[0].type",
        "only text",
    ),
    ({"model": "echo", "input": "x", "messages": [{"role": "user", "content": "y"}]}, "messages", "not both"),
    ({"model": "echo", "messages": [{"role": "robot", "content": "y"}]}, "messages[0].role", "'robot'"),
    (
        {"model": "echo", "input": "x", "previous_response_id": "resp_1", "conversation_id": "c"},
        "conversation_id",
        "not both",
    ),
    ({"model": "echo", "input": "x", "conversation_id": "has space"}, "conversation_id", "pattern"),
    ({"model": "echo", "input": "x", "conversation_id": "c" * 65}, "conversation_id", "pattern"),
    ({"model": "echo", "input": "x", "previous_response_id": "resp_nope"}, "previous_response_id", "not found"),
    ({"model": "echo", "input": "x", "max_output_tokens": 15}, "max_output_tokens", "Expected a value >= 16"),
    ({"model": "echo", "input": "x", "temperature": 3}, "temperature", "Expected a value <= 2"),
    ({"model": "echo", "input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type", "'web_search'"),
    ({"model": "echo", "input": "x", "tools": [{"type": "function", "name": "bad name"}]}, "tools[0].name", "pattern"),
    ({"model": "echo", "input": "x", "tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
    (
        {
            "model": "echo",
            "input": "x",
            "tools": [{"type": "function", "name": "f"}],
            "tool_choice": {"type": "function", "name": "g"},
        },
        "tool_choice.name",
        "not one of the given tools",
    ),
    (
        {"model": "echo", "input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}},
        "text.format.schema",
        "Missing required parameter",
    ),
    ({"model": "echo", "input": "x", "metadata": {"k": 1}}, "metadata.k", "expected a string"),
    ({"model": "echo", "input": "x", "conversation": "conv_1"}, "conversation", "conversation_id"),
    ({"model": "echo", "input": "x", "stream": True, "background": True}, "stream", "not supported"),
    ({"model": "echo", "input": "x", "include_sources": True}, "include_sources", "embedding model"),
]


@pytest.mark.parametrize(("body", "param", "message"), BAD)
async def test_bad_requests_get_the_envelope_with_their_param(body: Any, param: str | None, message: str) -> None:
    api, usage = make_api()
    _, key = await api.keys.create(name="k", owner="o", rpm=1000)
    answer = await post(api, key, body)
    assert answer.status_code == 400, answer.text
    error = envelope(answer)
    assert error["param"] == param and message in error["message"], error
    assert error["type"] == "invalid_request_error"
    await api.usage.flush()  # usage events reach hooks off the response path
    assert [e.status for e in usage] == [400] and usage[0].charged == 0  # the request counted, no tokens
    await api.aclose()


async def test_unknown_model_and_excluded_model() -> None:
    api, _ = make_api()
    _, key = await api.keys.create(name="k", owner="o", rpm=1000)
    client = async_openai(api, key)
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.create(model="nope", input="x")
    assert caught.value.body["code"] == "model_not_found"  # type: ignore[index]
    _, other = await api.keys.create(name="k2", owner="o", rpm=1000, models=("other",))
    with pytest.raises(openai.PermissionDeniedError):
        await async_openai(api, other).responses.create(model="echo", input="x")
    await client.close()
    await api.aclose()


async def test_routes_need_a_key_and_unknown_ids_are_404() -> None:
    api, _ = make_api()
    _, key = await api.keys.create(name="k", owner="o", rpm=1000)
    async with raw_client(api) as http:
        assert (await http.post("/responses", json={"model": "echo", "input": "x"})).status_code == 401
        for method, path in (
            ("GET", "/responses/resp_x"),
            ("DELETE", "/responses/resp_x"),
            ("GET", "/responses/resp_x/input_items"),
            ("POST", "/responses/resp_x/cancel"),
            ("GET", "/responses/" + "x" * 300),
        ):
            answer = await http.request(method, path, headers={"authorization": f"Bearer {key}"})
            assert answer.status_code == 404 and envelope(answer)["code"] == "response_not_found"
        answer = await http.get("/responses/resp_x/input_items?limit=0", headers={"authorization": f"Bearer {key}"})
        assert answer.status_code == 400 and envelope(answer)["param"] == "limit"
        assert (await http.put("/responses/resp_x")).status_code == 405
    await api.aclose()


async def test_no_routes_without_a_store_or_a_chat_backend() -> None:
    api = OzwellAPI(secret=SECRET, response_store=None)
    _, key = await api.keys.create(name="k", owner="o")
    answer = await post(api, key, {"model": "echo", "input": "x"})
    assert answer.status_code == 404
    await api.aclose()


# --- max_output_tokens -------------------------------------------------------------------------------------------


async def test_max_output_tokens_makes_the_response_incomplete() -> None:
    api, usage = make_api()
    _, key = await api.keys.create(name="k", owner="o", rpm=1000)
    client = async_openai(api, key)
    long_text = " ".join(f"word{i}" for i in range(60))
    cut = await client.responses.create(model="echo", input=long_text, max_output_tokens=16)
    check_response(cut)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert cut.usage is not None and cut.usage.output_tokens == 16
    await api.usage.flush()  # usage events reach hooks off the response path
    assert usage[-1].completion_tokens == 16

    answer = await post(api, key, {"model": "echo", "input": long_text, "max_output_tokens": 16, "stream": True})
    events = parse_sse(answer.text)
    for _, data in events:
        check_event(data)
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2][1]["item"]["status"] == "incomplete"
    await client.close()
    await api.aclose()


# --- backend failures --------------------------------------------------------------------------------------------


async def broken_midway(request: ChatCompletionRequest) -> AsyncIterator[str]:
    yield "partial answer"
    raise BadGatewayError("The upstream model server went away.")


async def broken_at_once(request: ChatCompletionRequest) -> AsyncIterator[str]:
    raise BadGatewayError("The upstream model server is down.")
    yield ""  # pragma: no cover


async def test_failure_mid_stream_is_response_failed_then_error() -> None:
    api, usage = make_api(backend=FunctionBackend(broken_midway, models=("broken",)))
    _, key = await api.keys.create(name="k", owner="o", rpm=1000)
    answer = await post(api, key, {"model": "broken", "input": "x", "stream": True})
    assert answer.status_code == 200
    events = parse_sse(answer.text)
    for _, data in events:
        check_event(data)
    assert [e[0] for e in events[-2:]] == ["response.failed", "error"]
    failed = events[-2][1]["response"]
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "server_error", "message": "The upstream model server went away."}
    assert failed["output"][0]["content"][0]["text"] == "partial answer"
    error = events[-1][1]
    assert error["code"] == "upstream_error" and error["message"] == "The upstream model server went away."
    await api.usage.flush()  # usage events reach hooks off the response path
    assert [e.status for e in usage] == [502] and usage[0].completion_tokens == 2  # what was generated
    # The SDK's stream helper sees both events; there is no completed response.
    client = async_openai(api, key)
    async with client.responses.stream(model="broken", input="x") as stream:
        kinds = [event.type async for event in stream]
        with pytest.raises(RuntimeError):
            await stream.get_final_response()
    assert kinds[-2:] == ["response.failed", "error"]
    # The failed response was stored as it ended.
    stored = await client.responses.retrieve(failed["id"])
    assert stored.status == "failed" and stored.error is not None
    await client.close()
    await api.aclose()


async def test_failure_before_the_first_chunk_keeps_its_status() -> None:
    api, usage = make_api(backend=FunctionBackend(broken_at_once, models=("down",)))
    _, key = await api.keys.create(name="k", owner="o", rpm=1000)
    client = async_openai(api, key, max_retries=0)
    for stream in (True, False):
        with pytest.raises(openai.APIStatusError) as caught:
            await client.responses.create(model="down", input="x", stream=stream)
        assert caught.value.status_code == 502
    await api.usage.flush()  # usage events reach hooks off the response path
    assert [e.status for e in usage] == [502, 502] and all(e.completion_tokens == 0 for e in usage)
    await client.close()
    await api.aclose()


# --- metering ----------------------------------------------------------------------------------------------------


async def test_metered_like_chat_and_refused_when_spent() -> None:
    api, usage = make_api()
    _, key = await api.keys.create(name="k", owner="o", rpm=1000, tpm=200)
    client = async_openai(api, key, max_retries=0)
    first = await client.responses.create(model="echo", input="count these words", max_output_tokens=16)
    assert first.usage is not None
    await api.usage.flush()  # usage events reach hooks off the response path
    [event] = usage
    assert event.endpoint == "responses" and event.model == "echo"
    assert (event.prompt_tokens, event.completion_tokens) == (first.usage.input_tokens, first.usage.output_tokens)
    assert event.charged == first.usage.total_tokens
    # The default bound (1024 tokens) cannot be reserved on a 200-token budget: 429 before the backend is called.
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="echo", input="again")
    for _ in range(20):  # each answer charges about 30 tokens: the budget is spent within 7
        try:
            await client.responses.create(model="echo", input="count these words", max_output_tokens=16)
        except openai.RateLimitError:
            break
    else:
        raise AssertionError("a 200-token budget was never spent")
    await api.usage.flush()  # usage events reach hooks off the response path
    charged = sum(e.charged for e in usage if e.status == 200)
    # Refused only when the next reservation (its prompt and the 16-token bound) would not fit.
    assert 200 - (event.prompt_tokens + 16) < charged <= 200
    assert all(e.charged == 0 for e in usage if e.status == 429)
    await client.close()
    await api.aclose()


async def test_input_tokens_counts_what_create_would_charge() -> None:
    api, usage = make_api()
    _, key = await api.keys.create(name="k", owner="o", rpm=1000)
    client = async_openai(api, key)
    tools: list[Any] = [{"type": "function", "name": "f", "parameters": {"type": "object"}, "strict": False}]
    counted = await client.responses.input_tokens.count(model="echo", input="How many tokens?", tools=tools)
    assert counted.object == "response.input_tokens"
    validate("TokenCountsResource", counted.model_dump(mode="json"))
    created = await client.responses.create(model="echo", input="How many tokens?", tools=tools)
    assert created.usage is not None and created.usage.input_tokens == counted.input_tokens
    # The model may be left out; a chained count includes the earlier turn.
    alone = await client.responses.input_tokens.count(input="How many tokens?", tools=tools)
    assert alone.input_tokens == counted.input_tokens
    chained = await client.responses.input_tokens.count(input="and now?", previous_response_id=created.id)
    assert chained.input_tokens > (await client.responses.input_tokens.count(input="and now?")).input_tokens
    await api.usage.flush()  # usage events reach hooks off the response path
    billed = [e.endpoint for e in usage if e.prompt_tokens or e.charged]
    assert billed == ["responses"]  # counting is not a billable call
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.input_tokens.count(input="x", previous_response_id="resp_nope")
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    await client.close()
    await api.aclose()


# --- caps and truncation -----------------------------------------------------------------------------------------


async def test_input_items_cap_and_truncation() -> None:
    api, _ = make_api(settings=Settings(max_input_items=3, max_messages=4))
    _, key = await api.keys.create(name="k", owner="o", rpm=1000)
    items = [{"role": "user", "content": str(i)} for i in range(4)]
    answer = await post(api, key, {"model": "echo", "input": items})
    assert answer.status_code == 400 and envelope(answer)["param"] == "input"
    client = async_openai(api, key)
    one = await client.responses.create(model="echo", input="one")
    two = await client.responses.create(model="echo", input="two", previous_response_id=one.id)
    # 4 earlier messages and this one exceed the 4 this server sends: refused, or cut with truncation "auto".
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="echo", input="three", previous_response_id=two.id)
    assert caught.value.body["code"] == "context_length_exceeded"  # type: ignore[index]
    three = await client.responses.create(model="echo", input="three", previous_response_id=two.id, truncation="auto")
    assert three.output_text == "three" and three.truncation == "auto"
    await client.close()
    await api.aclose()


# --- include_sources ---------------------------------------------------------------------------------------------


class Finder:
    """A SourceFinder over a fixed set of passages of one owner: those sharing a word with the query, best first."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.passages = [
            Source("file-1", "handbook.pdf", 3, "Holidays are booked through the portal.", 0.0),
            Source("file-2", "notes.txt", None, "The portal opens at nine.", 0.0),
            Source("file-3", "other.txt", None, "Unrelated text about boats.", 0.0),
        ]

    async def find(self, principal: Principal, query: str, call: Call, limit: int) -> Sequence[Source]:
        self.calls.append((principal.owner, query, limit))
        assert call.endpoint == "responses"
        if principal.owner != "alice":
            return []
        words = set(query.lower().replace("?", "").split())
        scored = []
        for source in self.passages:
            overlap = len(words & set(source.excerpt.lower().rstrip(".").split()))
            if overlap:
                scored.append(Source(source.file_id, source.filename, source.page, source.excerpt, overlap / 10))
        return sorted(scored, key=lambda s: -s.score)[:limit]


async def test_include_sources_gives_the_model_passages_and_lists_them() -> None:
    seen: list[ChatCompletionRequest] = []

    def reply(request: ChatCompletionRequest) -> str:
        seen.append(request)
        return "From the handbook: use the portal."

    api, _ = make_api(backend=FunctionBackend(reply, models=("m",)))
    finder = Finder()
    api.services.sources = finder
    _, key = await api.keys.create(name="k", owner="alice", rpm=1000)
    answer = await post(
        api, key, {"model": "m", "input": "How are holidays booked in the portal?", "include_sources": True}
    )
    assert answer.status_code == 200, answer.text
    body = check_response(answer.json())
    assert body["sources"] == [
        {
            "file_id": "file-1",
            "filename": "handbook.pdf",
            "page": 3,
            "excerpt": "Holidays are booked through the portal.",
            "score": 0.5,
        },
        {
            "file_id": "file-2",
            "filename": "notes.txt",
            "page": None,
            "excerpt": "The portal opens at nine.",
            "score": 0.2,
        },
    ]
    assert finder.calls == [("alice", "How are holidays booked in the portal?", 5)]
    context = seen[-1].messages[0]
    assert context.role == "system"
    assert "[1] handbook.pdf, page 3:\nHolidays are booked through the portal." in context.content  # type: ignore[operator]
    assert "[2] notes.txt:\nThe portal opens at nine." in context.content  # type: ignore[operator]
    assert seen[-1].messages[-1].content == "How are holidays booked in the portal?"
    # The passages are this turn's context: a chained turn does not carry them over.
    await post(api, key, {"model": "m", "input": "thanks", "previous_response_id": body["id"]})
    assert [m.role for m in seen[-1].messages] == ["user", "assistant", "user"]
    # Without include_sources nothing is searched and the Response has no sources.
    plain = (await post(api, key, {"model": "m", "input": "portal?"})).json()
    assert "sources" not in plain and len(finder.calls) == 1
    await api.aclose()
