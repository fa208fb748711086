"""The Responses API through the official Python SDK (sync and async): create, the stream helpers, retrieve,
delete, input items, background runs and cancel, chaining by ``previous_response_id`` and ``conversation_id`` (the
backend receives the whole conversation), ``store: false``, owner isolation; every body and event checked against
OpenAI's schemas.

The tests that touch what a store keeps run over every ResponseStore adapter the ``response_store`` fixture yields
(memory, SQLite, PostgreSQL and Redis).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends.function import FunctionBackend, Reply
from ozwell_asgi.context import Settings
from ozwell_asgi.protocols import ResponseStore
from ozwell_asgi.ratelimit import LimitsRateLimiter
from ozwell_asgi.stores.memory import MemoryKeyStore, MemoryResponseStore
from ozwell_asgi.stores.urls import StorageOptions, Storages
from ozwell_asgi.types import (
    AssistantMessage,
    ChatChoice,
    ChatChunk,
    ChatResult,
    ModelInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
    UsageEvent,
)
from ozwell_asgi.wire.chat import ChatCompletionRequest
from tests.harness import async_openai, raw_client, sync_openai
from tests.openai_schema import validate
from tests.test_responsestore_contract import storage_url

__all__ = ["storage_url"]  # a fixture (every bundled storage, private to the test), used by name

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
NOW = 1_800_000_030.0

# OpenAI's spec gives no schema for the deletion object (only its example); this is that example's shape.
DELETED_SCHEMA_KEYS = {"id", "object", "deleted"}


def fixed_clock() -> float:
    return NOW


# --- the stores the adapter-facing tests run over: add an adapter here when it lands ----------------------------


@pytest.fixture
async def response_store(storage_url: str, redis_prefix: str) -> AsyncIterator[ResponseStore]:
    """Every bundled adapter, each made by its storage as the app makes it."""
    storages = Storages(StorageOptions(redis_prefix=redis_prefix))
    try:
        yield storages.response_store(storage_url)
    finally:
        await storages.aclose()


# --- a backend that records what it is sent ---------------------------------------------------------------------


class Recorder:
    """A chat backend (FunctionBackend) that records each request's messages and answers from a script."""

    def __init__(self) -> None:
        self.requests: list[ChatCompletionRequest] = []
        self.backend = FunctionBackend(self.reply, models=("rec",))

    async def reply(self, request: ChatCompletionRequest) -> str | Reply:
        self.requests.append(request)
        if request.tools and request.tool_choice == "required":
            return Reply(tool_calls=[ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')])
        last = request.messages[-1]
        text = last.content if isinstance(last.content, str) else json.dumps(last.model_dump(mode="json"))
        return f"reply {len(self.requests)} to {text}"

    def conversation(self, n: int = -1) -> list[tuple[str, Any]]:
        """(role, content or tool calls) of the ``n``-th request's messages."""
        out: list[tuple[str, Any]] = []
        for message in self.requests[n].messages:
            dumped = message.model_dump(mode="json", exclude_none=True)
            if dumped.get("tool_calls"):
                out.append((dumped["role"], [c["function"]["name"] for c in dumped["tool_calls"]]))
            else:
                out.append((dumped["role"], dumped.get("content")))
        return out


class World:
    """An app over ``store`` with a recording backend; keys: alice (two), bob."""

    def __init__(self, store: ResponseStore, **kwargs: Any) -> None:
        self.recorder = Recorder()
        self.usage: list[UsageEvent] = []
        self.store = store
        kwargs.setdefault("backend", self.recorder.backend)
        self.api = OzwellAPI(
            secret=SECRET,
            response_store=store,
            rate_limiter=LimitsRateLimiter("memory://", clock=fixed_clock),
            on_usage=self.usage.append,
            **kwargs,
        )

    async def billed(self) -> list[UsageEvent]:
        """The usage events of the billable calls (``POST /responses``) so far: every request emits one, delivered
        off the response path, so the queue is flushed first."""
        await self.api.usage.flush()
        return [e for e in self.usage if e.endpoint == "responses"]

    async def setup(self) -> World:
        _, self.alice = await self.api.keys.create(name="alice", owner="alice", rpm=1000)
        _, self.alice2 = await self.api.keys.create(name="alice 2", owner="alice", rpm=1000)
        _, self.bob = await self.api.keys.create(name="bob", owner="bob", rpm=1000)
        return self


@pytest.fixture
async def world(response_store: ResponseStore) -> AsyncIterator[World]:
    world = await World(response_store).setup()
    yield world
    await world.api.aclose()


def check_response(response: openai.types.responses.Response | dict[str, Any]) -> dict[str, Any]:
    body = response if isinstance(response, dict) else response.model_dump(mode="json", exclude_unset=True)
    validate("Response", body)
    return body


def event_schema(kind: str) -> str:
    """The schema of one event type: ``response.output_text.delta`` -> ``ResponseTextDeltaEvent``."""
    special = {
        "error": "ResponseErrorEvent",
        "response.output_text.delta": "ResponseTextDeltaEvent",
        "response.output_text.done": "ResponseTextDoneEvent",
    }
    if kind in special:
        return special[kind]
    words = kind.removeprefix("response.").replace(".", "_").split("_")
    return "Response" + "".join(w.capitalize() for w in words) + "Event"


def check_event(data: dict[str, Any]) -> None:
    """``data`` matches its own event schema and OpenAI's ResponseStreamEvent union."""
    validate(event_schema(data["type"]), data)
    validate("ResponseStreamEvent", data)


def parse_sse(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of every SSE message; each data must name the same type as its ``event:`` line."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip() or block.startswith(":"):
            continue
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        events.append((lines["event"], data))
    return events


# --- create, retrieve, delete, input items (async and sync SDK) --------------------------------------------------


async def test_create_retrieve_input_items_delete_async(world: World) -> None:
    client = async_openai(world.api, world.alice)
    created = await client.responses.create(
        model="rec", input="Hello, Ozwell!", instructions="Be brief.", metadata={"k": "v"}, temperature=0.5
    )
    body = check_response(created)
    assert created.id.startswith("resp_") and created.object == "response" and created.status == "completed"
    assert created.output_text == "reply 1 to Hello, Ozwell!"
    assert created.output[0].id.startswith("msg_") and created.output[0].type == "message"
    assert created.instructions == "Be brief." and created.metadata == {"k": "v"} and created.temperature == 0.5
    assert created.store is True and created.background is False and created.previous_response_id is None
    for field in ("error", "incomplete_details", "max_output_tokens", "tool_choice", "tools", "top_p", "truncation",
                  "usage", "reasoning", "text", "parallel_tool_calls", "created_at", "model"):  # fmt: skip
        assert field in body
    assert created.usage is not None
    assert created.usage.total_tokens == created.usage.input_tokens + created.usage.output_tokens
    assert created.usage.input_tokens_details.cached_tokens == 0
    assert created.usage.output_tokens_details.reasoning_tokens == 0
    # The backend got the instructions as a system message, then the input.
    assert world.recorder.conversation() == [("system", "Be brief."), ("user", "Hello, Ozwell!")]

    again = await client.responses.retrieve(created.id)
    assert check_response(again) == check_response(created)

    items = await client.responses.input_items.list(created.id)
    listed = items.model_dump(mode="json", exclude_unset=True)
    validate("ResponseItemList", listed)
    assert [(i["type"], i["role"], i["content"]) for i in listed["data"]] == [
        ("message", "user", [{"type": "input_text", "text": "Hello, Ozwell!"}])
    ]
    assert listed["data"][0]["id"].startswith("msg_")

    async with raw_client(world.api) as http:
        deleted = await http.delete(f"/responses/{created.id}", headers={"authorization": f"Bearer {world.alice}"})
    assert deleted.status_code == 200 and deleted.json() == {"id": created.id, "object": "response", "deleted": True}
    assert set(deleted.json()) == DELETED_SCHEMA_KEYS
    with pytest.raises(openai.NotFoundError) as caught:
        await client.responses.retrieve(created.id)
    assert caught.value.body["code"] == "response_not_found"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(created.id)
    await client.close()


def test_create_stream_retrieve_delete_sync() -> None:
    world = World(MemoryResponseStore())
    import anyio

    anyio.run(world.setup)
    with sync_openai(world.api, world.alice) as client:
        created = client.responses.create(model="rec", input="sync hello")
        check_response(created)
        assert created.output_text == "reply 1 to sync hello"
        with client.responses.stream(model="rec", input="streamed", previous_response_id=created.id) as stream:
            deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
            final = stream.get_final_response()
        assert "".join(deltas) == final.output_text == "reply 2 to streamed"
        assert final.previous_response_id == created.id
        assert client.responses.retrieve(final.id).output_text == final.output_text
        assert [i.type for i in client.responses.input_items.list(final.id)] == ["message"]
        client.responses.delete(final.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(final.id)
    assert world.recorder.conversation() == [
        ("user", "sync hello"),
        ("assistant", "reply 1 to sync hello"),
        ("user", "streamed"),
    ]


# --- streaming -----------------------------------------------------------------------------------------------------


async def test_stream_helpers_async_and_every_event_validates(world: World) -> None:
    client = async_openai(world.api, world.alice)
    async with client.responses.stream(model="rec", input="one two three") as stream:
        kinds, deltas = [], []
        async for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
                assert event.snapshot == "".join(deltas)
        final = await stream.get_final_response()
    assert final.output_text == "".join(deltas) == "reply 1 to one two three"
    assert final.status == "completed" and final.usage is not None and final.usage.output_tokens > 0
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    # The stream was stored as it ended.
    assert (await client.responses.retrieve(final.id)).output_text == final.output_text

    async with raw_client(world.api) as http:
        raw = await http.post(
            "/responses",
            json={"model": "rec", "input": "raw stream", "stream": True},
            headers={"authorization": f"Bearer {world.alice}"},
        )
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(raw.text)
    assert [e[1]["sequence_number"] for e in events] == list(range(len(events)))
    for _, data in events:
        check_event(data)
    created = events[0][1]["response"]
    assert created["status"] == "in_progress" and created["output"] == []
    completed = events[-1][1]["response"]
    check_response(completed)
    assert completed["output"][0]["content"][0]["text"] == "reply 2 to raw stream"
    await client.close()


async def test_function_calls_stream_and_chain_with_outputs(world: World) -> None:
    client = async_openai(world.api, world.alice)
    tools: list[Any] = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
            "strict": True,
        }
    ]
    async with client.responses.stream(
        model="rec", input="Weather in Paris?", tools=tools, tool_choice="required"
    ) as stream:
        argument_deltas = [e.delta async for e in stream if e.type == "response.function_call_arguments.delta"]
        final = await stream.get_final_response()
    check_response(final)
    call = final.output[0]
    assert call.type == "function_call" and call.id.startswith("fc_")  # type: ignore[union-attr]
    assert call.call_id == "call_1" and call.name == "get_weather"  # type: ignore[union-attr]
    assert "".join(argument_deltas) == call.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    assert final.tools[0].name == "get_weather" and final.tool_choice == "required"
    chat = world.recorder.requests[-1]
    assert chat.tools is not None and chat.tools[0].function.name == "get_weather"  # type: ignore[union-attr]

    second = await client.responses.create(
        model="rec",
        previous_response_id=final.id,
        input=[{"type": "function_call_output", "call_id": "call_1", "output": "18C and sunny"}],
    )
    assert world.recorder.conversation() == [
        ("user", "Weather in Paris?"),
        ("assistant", ["get_weather"]),
        ("tool", "18C and sunny"),
    ]
    assert world.recorder.requests[-1].messages[-1].tool_call_id == "call_1"  # type: ignore[union-attr]
    items = (await client.responses.input_items.list(second.id)).model_dump(mode="json", exclude_unset=True)
    validate("ResponseItemList", items)
    assert items["data"][0]["type"] == "function_call_output" and items["data"][0]["output"] == "18C and sunny"
    await client.close()


async def test_items_handed_back_carry_the_conversation_without_storage(world: World) -> None:
    """Input items of every kind a chat backend can take, handed back by the client (store: false)."""
    client = async_openai(world.api, world.alice)
    first = await client.responses.create(model="rec", input="first", store=False)
    assert first.store is False
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(first.id)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="rec", input="next", previous_response_id=first.id)
    assert caught.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert caught.value.body["code"] == "previous_response_not_found"  # type: ignore[index]

    handed_back: list[Any] = [
        {"role": "developer", "content": "Answer tersely."},
        {"role": "user", "content": [{"type": "input_text", "text": "first"}]},
        *[o.model_dump(exclude_none=True) for o in first.output],
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "thinking"}]},
        {"type": "function_call", "call_id": "c9", "name": "lookup", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c9", "output": "found"},
        {
            "type": "message",
            "role": "user",
            "content": [
                {"type": "input_text", "text": "and this"},
                {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "low"},
                {"type": "input_file", "file_id": "file-abc"},
            ],
        },
    ]
    second = await client.responses.create(model="rec", input=handed_back)
    conversation = world.recorder.conversation()
    assert conversation[:5] == [
        ("developer", "Answer tersely."),
        ("user", [{"type": "text", "text": "first"}]),
        ("assistant", ["lookup"]),  # the handed-back answer and the call it made, as one assistant message
        ("tool", "found"),
        ("user", conversation[4][1]),
    ]
    assistant = world.recorder.requests[-1].messages[2]
    assert assistant.content == "reply 1 to first"
    parts = conversation[4][1]
    assert [p["type"] for p in parts] == ["text", "image_url", "file"]
    assert parts[1]["image_url"] == {"url": "https://example.com/a.png", "detail": "low"}
    items = (await client.responses.input_items.list(second.id, order="asc")).model_dump(
        mode="json", exclude_unset=True
    )
    validate("ResponseItemList", items)
    assert [i["type"] for i in items["data"]] == [
        "message",
        "message",
        "message",
        "reasoning",
        "function_call",
        "function_call_output",
        "message",
    ]
    await client.close()


# --- chaining ------------------------------------------------------------------------------------------------------


async def test_chaining_sends_the_whole_conversation(world: World) -> None:
    client = async_openai(world.api, world.alice)
    one = await client.responses.create(model="rec", input="one", instructions="first instructions")
    two = await client.responses.create(model="rec", input="two", previous_response_id=one.id)
    three = await client.responses.create(
        model="rec", input="three", previous_response_id=two.id, instructions="new instructions"
    )
    assert three.previous_response_id == two.id
    # Instructions are not carried over (as at OpenAI); every earlier turn is.
    assert world.recorder.conversation() == [
        ("system", "new instructions"),
        ("user", "one"),
        ("assistant", "reply 1 to one"),
        ("user", "two"),
        ("assistant", "reply 2 to two"),
        ("user", "three"),
    ]
    # Branching from an earlier turn sees only that turn's history; a second key of the same owner may chain.
    other = async_openai(world.api, world.alice2)
    await other.responses.create(model="rec", input="branch", previous_response_id=one.id)
    assert world.recorder.conversation() == [("user", "one"), ("assistant", "reply 1 to one"), ("user", "branch")]
    # Input items list this turn's input only.
    assert [i.content[0].text for i in (await client.responses.input_items.list(three.id)).data] == ["three"]  # type: ignore[union-attr]
    await client.close()
    await other.close()


async def test_conversation_id_chains_to_the_latest_turn(world: World) -> None:
    async with raw_client(world.api) as http:
        headers = {"authorization": f"Bearer {world.alice}"}

        async def turn(text: str, **extra: Any) -> dict[str, Any]:
            answer = await http.post("/responses", json={"model": "rec", "input": text, **extra}, headers=headers)
            assert answer.status_code == 200, answer.text
            return check_response(answer.json())

        first = await turn("hi", conversation_id="chat-42")
        assert first["conversation_id"] == "chat-42"
        second = await turn("again", conversation_id="chat-42")
        assert world.recorder.conversation() == [("user", "hi"), ("assistant", "reply 1 to hi"), ("user", "again")]
        # A turn chained by id stays in its conversation; the next conversation_id turn follows it.
        third = await turn("by id", previous_response_id=second["id"])
        assert third["conversation_id"] == "chat-42"
        await turn("latest", conversation_id="chat-42")
        assert [m for m in world.recorder.conversation() if m[0] == "user"] == [
            ("user", "hi"),
            ("user", "again"),
            ("user", "by id"),
            ("user", "latest"),
        ]
        # Another conversation, and another owner's same conversation id, start fresh.
        await turn("fresh", conversation_id="chat-43")
        assert world.recorder.conversation() == [("user", "fresh")]
        bob = await http.post(
            "/responses",
            json={"model": "rec", "input": "bob here", "conversation_id": "chat-42"},
            headers={"authorization": f"Bearer {world.bob}"},
        )
        assert bob.status_code == 200
        assert world.recorder.conversation() == [("user", "bob here")]


async def test_messages_extension(world: World) -> None:
    client = async_openai(world.api, world.alice)
    created = await client.responses.create(
        model="rec",
        input=openai.omit,
        extra_body={
            "messages": [
                {"role": "system", "content": "sys"},
                {"role": "user", "content": "chat-format hello"},
            ]
        },
    )
    assert created.output_text == "reply 1 to chat-format hello"
    assert world.recorder.conversation() == [("system", "sys"), ("user", "chat-format hello")]
    items = (await client.responses.input_items.list(created.id, order="asc")).model_dump(
        mode="json", exclude_unset=True
    )
    validate("ResponseItemList", items)
    assert [(i["role"], i["content"][0]["text"]) for i in items["data"]] == [
        ("system", "sys"),
        ("user", "chat-format hello"),
    ]
    # Chained like any other turn.
    await client.responses.create(
        model="rec",
        input=openai.omit,
        previous_response_id=created.id,
        extra_body={"messages": [{"role": "user", "content": "more"}]},
    )
    assert world.recorder.conversation()[-3:] == [
        ("user", "chat-format hello"),
        ("assistant", "reply 1 to chat-format hello"),
        ("user", "more"),
    ]
    await client.close()


# --- owners --------------------------------------------------------------------------------------------------------


async def test_another_owner_gets_404_everywhere(world: World) -> None:
    alice = async_openai(world.api, world.alice)
    bob = async_openai(world.api, world.bob)
    created = await alice.responses.create(model="rec", input="private", background=True)
    for call in (
        lambda: bob.responses.retrieve(created.id),
        lambda: bob.responses.delete(created.id),
        lambda: bob.responses.input_items.list(created.id),
        lambda: bob.responses.cancel(created.id),
    ):
        with pytest.raises(openai.NotFoundError) as caught:
            await call()
        assert caught.value.body == {  # exactly as for an id that does not exist
            "message": f"Response with id '{created.id}' not found.",
            "type": "invalid_request_error",
            "param": "response_id",
            "code": "response_not_found",
        }
    with pytest.raises(openai.BadRequestError) as chained:
        await bob.responses.create(model="rec", input="steal", previous_response_id=created.id)
    assert chained.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    # A second key of the owner sees it.
    alice2 = async_openai(world.api, world.alice2)
    assert (await alice2.responses.retrieve(created.id)).id == created.id
    for client in (alice, bob, alice2):
        await client.close()


# --- background and cancel -----------------------------------------------------------------------------------------


async def poll(client: openai.AsyncOpenAI, response_id: str, until: frozenset[str]) -> Any:
    """Retrieve until the status is one of ``until`` (each round trip lets the run progress; bounded)."""
    for _ in range(1000):
        response = await client.responses.retrieve(response_id)
        if response.status in until:
            return response
        await asyncio.sleep(0)
    raise AssertionError(f"{response_id} never reached {sorted(until)}")


ENDED = frozenset({"completed", "incomplete", "failed", "cancelled"})


async def test_background_run_is_polled_to_completion(world: World) -> None:
    client = async_openai(world.api, world.alice)
    queued = await client.responses.create(model="rec", input="in the background", background=True)
    check_response(queued)
    assert queued.status == "queued" and queued.background is True
    done = await poll(client, queued.id, ENDED)
    check_response(done)
    assert done.status == "completed" and done.output_text == "reply 1 to in the background"
    billed = await world.billed()
    assert [e.status for e in billed] == [200]
    assert billed[0].endpoint == "responses" and billed[0].completion_tokens == done.usage.output_tokens
    # Cancelling an ended response answers it as it stands; a response not made in the background cannot be.
    assert (await client.responses.cancel(done.id)).status == "completed"
    plain = await client.responses.create(model="rec", input="foreground")
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(plain.id)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="rec", input="x", background=True, store=False)
    assert caught.value.body["param"] == "background"  # type: ignore[index]
    await client.close()


class Gate:
    """A reply that streams ``partial``, then waits for the test to open the gate."""

    def __init__(self) -> None:
        self.reached = asyncio.Event()
        self.gate = asyncio.Event()
        self.closed = False

    async def pieces(self) -> AsyncIterator[str]:
        try:
            yield "partial"
            self.reached.set()
            await self.gate.wait()
            yield " rest"
        finally:
            self.closed = True

    def reply(self, request: ChatCompletionRequest) -> AsyncIterator[str]:
        return self.pieces()


async def test_cancel_stops_the_backend_call_and_settles_its_meter(response_store: ResponseStore) -> None:
    gate = Gate()
    world = await World(response_store, backend=FunctionBackend(gate.reply, models=("gated",))).setup()
    client = async_openai(world.api, world.alice)
    queued = await client.responses.create(model="gated", input="long task", background=True)
    await gate.reached.wait()
    running = await client.responses.retrieve(queued.id)
    assert running.status == "in_progress"
    cancelled = await client.responses.cancel(queued.id)
    check_response(cancelled)
    assert cancelled.status == "cancelled" and gate.closed  # the backend's generator was closed
    assert cancelled.output_text == "partial"  # what was generated stays
    assert (await client.responses.retrieve(queued.id)).status == "cancelled"
    [event] = await world.billed()
    assert event.status == 499 and event.completion_tokens == 1 and event.charged == event.prompt_tokens + 1
    assert (await client.responses.cancel(queued.id)).status == "cancelled"  # idempotent
    await client.close()
    await world.api.aclose()


async def test_cancel_from_another_worker_marks_the_record(response_store: ResponseStore) -> None:
    """Two apps (workers) share the stores: the one that did not start the run marks it cancelled; the runner sees
    the mark at its next chunk, stops, and never overwrites it."""
    gate = Gate()
    keys = MemoryKeyStore()
    settings = Settings(background_cancel_check=1e-9)  # look at the record at every chunk
    backend = FunctionBackend(gate.reply, models=("gated",))
    one = await World(response_store, backend=backend, key_store=keys, settings=settings).setup()
    two = World(response_store, backend=backend, key_store=keys, settings=settings)
    client_one = async_openai(one.api, one.alice)
    client_two = async_openai(two.api, one.alice)
    queued = await client_one.responses.create(model="gated", input="long task", background=True)
    await gate.reached.wait()
    marked = await client_two.responses.cancel(queued.id)
    assert marked.status == "cancelled"
    gate.gate.set()  # the runner's next chunk comes: it looks, sees the mark, stops
    final = await poll(client_one, queued.id, frozenset({"cancelled"}))
    assert final.status == "cancelled"
    for _ in range(1000):  # the run settles its meter on the worker that ran it, once its task ends
        if await one.billed():
            break
        await asyncio.sleep(0.005)
    [event] = await one.billed()
    assert event.status == 499 and await two.billed() == []
    assert (await client_two.responses.retrieve(queued.id)).status == "cancelled"
    for client in (client_one, client_two):
        await client.close()
    await one.api.aclose()
    await two.api.aclose()


async def test_closing_the_app_cancels_background_runs(response_store: ResponseStore) -> None:
    gate = Gate()
    world = await World(response_store, backend=FunctionBackend(gate.reply, models=("gated",))).setup()
    client = async_openai(world.api, world.alice)
    queued = await client.responses.create(model="gated", input="long task", background=True)
    await gate.reached.wait()
    await world.api.aclose()
    assert gate.closed
    record = await response_store.get("alice", queued.id)
    assert record is not None and record.status == "cancelled"
    assert [e.status for e in await world.billed()] == [499]
    await client.close()


async def test_background_cap(response_store: ResponseStore) -> None:
    gate = Gate()
    backend = FunctionBackend(gate.reply, models=("gated",))
    world = await World(response_store, backend=backend, settings=Settings(max_background_responses=1)).setup()
    client = async_openai(world.api, world.alice, max_retries=0)
    await client.responses.create(model="gated", input="first", background=True)
    with pytest.raises(openai.InternalServerError) as caught:
        await client.responses.create(model="gated", input="second", background=True)
    assert caught.value.status_code == 503
    billed = await world.billed()
    assert billed[-1].status == 503 and billed[-1].charged == 0
    gate.gate.set()
    await client.close()
    await world.api.aclose()


def test_background_and_cancel_sync() -> None:
    import anyio

    world = World(MemoryResponseStore())
    anyio.run(world.setup)
    with sync_openai(world.api, world.alice) as client:
        queued = client.responses.create(model="rec", input="sync background", background=True)
        assert queued.status == "queued"
        for _ in range(1000):
            done = client.responses.retrieve(queued.id)
            if done.status == "completed":
                break
        assert done.output_text == "reply 1 to sync background"
        assert client.responses.cancel(queued.id).status == "completed"


# --- every kind of output item, streamed and whole ---------------------------------------------------------------


class Scripted:
    """A backend streaming reasoning, text, a refusal and two tool calls (arguments in pieces), with usage; its
    ``complete_chat`` answers the same as one result when ``whole`` is set."""

    def __init__(self, whole: bool) -> None:
        if whole:
            self.complete_chat = self._complete

    async def list_models(self) -> list[ModelInfo]:
        return [ModelInfo(id="scripted")]

    async def stream_chat(self, request: ChatCompletionRequest, call: Any) -> AsyncIterator[ChatChunk]:
        yield ChatChunk(role="assistant", reasoning_content="Let me ")
        yield ChatChunk(reasoning_content="think.")
        yield ChatChunk(content="Here ")
        yield ChatChunk(content="it is.")
        yield ChatChunk(refusal="But not that.")
        yield ChatChunk(tool_calls=(ToolCallDelta(index=0, id="call_a", name="first", arguments='{"a"'),))
        yield ChatChunk(tool_calls=(ToolCallDelta(index=0, arguments=": 1}"),))
        yield ChatChunk(tool_calls=(ToolCallDelta(index=1, id="call_b", name="second", arguments="{}"),))
        yield ChatChunk(finish_reason="tool_calls")
        yield ChatChunk(usage=Usage(40, 12, completion_tokens_details={"reasoning_tokens": 3}))

    async def _complete(self, request: ChatCompletionRequest, call: Any) -> ChatResult:
        message = AssistantMessage(
            content="Here it is.",
            refusal="But not that.",
            reasoning_content="Let me think.",
            tool_calls=(ToolCall("call_a", "first", '{"a": 1}'), ToolCall("call_b", "second", "{}")),
        )
        return ChatResult((ChatChoice(0, message, "tool_calls"),), Usage(40, 12, None, {"reasoning_tokens": 3}))


def check_scripted_output(body: dict[str, Any]) -> None:
    output = body["output"]
    assert [item["type"] for item in output] == ["reasoning", "message", "function_call", "function_call"]
    assert output[0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]
    assert output[1]["content"] == [
        {"type": "output_text", "text": "Here it is.", "annotations": [], "logprobs": []},
        {"type": "refusal", "refusal": "But not that."},
    ]
    assert [(c["call_id"], c["name"], c["arguments"]) for c in output[2:]] == [
        ("call_a", "first", '{"a": 1}'),
        ("call_b", "second", "{}"),
    ]
    assert body["usage"]["output_tokens_details"] == {"reasoning_tokens": 3}
    assert (body["usage"]["input_tokens"], body["usage"]["output_tokens"]) == (40, 12)


@pytest.mark.parametrize("whole", [False, True], ids=["streamed", "complete_chat"])
async def test_every_output_item_kind(whole: bool) -> None:
    world = await World(MemoryResponseStore(), backend=Scripted(whole)).setup()
    async with raw_client(world.api) as http:
        headers = {"authorization": f"Bearer {world.alice}"}
        plain = await http.post("/responses", json={"model": "scripted", "input": "go"}, headers=headers)
        check_scripted_output(check_response(plain.json()))
        streamed = await http.post(
            "/responses", json={"model": "scripted", "input": "go", "stream": True}, headers=headers
        )
    events = parse_sse(streamed.text)
    for _, data in events:
        check_event(data)
    check_scripted_output(check_response(events[-1][1]["response"]))
    kinds = [kind for kind, _ in events]
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.content_part.added",
        "response.refusal.delta",
        "response.refusal.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    # The chained turn carries the answer's text, refusal and calls as one assistant message.
    record = await world.store.get("alice", events[-1][1]["response"]["id"])
    assert record is not None
    assert record.conversation[-1] == {
        "role": "assistant",
        "content": "Here it is.",
        "refusal": "But not that.",
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "first", "arguments": '{"a": 1}'}},
            {"id": "call_b", "type": "function", "function": {"name": "second", "arguments": "{}"}},
        ],
    }
    await world.api.aclose()
