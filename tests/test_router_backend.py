"""RouterBackend: routes by exact id and glob, aliases that rename (the caller's request untouched, the answer naming
the model that answered), ordered fallbacks on 5xx or timeout before the first chunk within the call's deadline, the
merged model list, capabilities per route, building from a router file, and the whole thing behind OzwellAPI with
the official SDK."""

from __future__ import annotations

import json
import tomllib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import anyio
import openai
import pytest
from trio.testing import MockClock

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends import capabilities
from ozwell_asgi.backends.echo import EchoBackend
from ozwell_asgi.backends.function import FunctionBackend
from ozwell_asgi.backends.router import Route, RouterBackend
from ozwell_asgi.errors import (
    BadGatewayError,
    GatewayTimeoutError,
    InvalidRequestError,
    NotFoundError,
    OzwellError,
    ServiceUnavailableError,
)
from ozwell_asgi.protocols import ChatBackend, CompletesChat, EmbeddingBackend
from ozwell_asgi.types import AssistantMessage as Message
from ozwell_asgi.types import Call, ChatChoice, ChatChunk, ChatResult, EmbeddingResult, ModelInfo, Principal, Quota
from ozwell_asgi.wire.chat import ChatCompletionRequest, message_text
from ozwell_asgi.wire.embeddings import EmbeddingRequest
from tests.harness import async_openai, raw_client

pytestmark = pytest.mark.anyio

SECRET = "s" * 32


def autojump() -> pytest.MarkDecorator:
    """Run the test on trio with a clock that jumps ahead whenever every task waits: timeouts without sleeping."""
    return pytest.mark.parametrize("anyio_backend", [("trio", {"clock": MockClock(autojump_threshold=0)})])


def make_call(deadline: float | None = None, endpoint: Any = "chat.completions") -> Call:
    principal = Principal(key_id="key_1", owner="alice", plan="free", quota=Quota(None, None))
    return Call(request_id="req_1", principal=principal, endpoint=endpoint, deadline=deadline)


def chat(model: str, text: str = "hi", **fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": model, "messages": [{"role": "user", "content": text}], **fields}
    )


def embedding(model: str) -> EmbeddingRequest:
    return EmbeddingRequest.model_validate({"model": model, "input": "hello"})


class Backend:
    """A scripted backend: answers ``"<name>:<model>"``, or waits ``delay`` seconds first, fails with ``fail``
    before its first chunk or with ``fail_after`` after it, or never answers (``hang``)."""

    def __init__(
        self,
        name: str,
        models: Sequence[str | ModelInfo] = (),
        *,
        fail: BaseException | None = None,
        fail_after: BaseException | None = None,
        delay: float = 0,
        hang: bool = False,
        answer_model: str | None = None,
    ) -> None:
        self.name = name
        self.models = tuple(m if isinstance(m, ModelInfo) else ModelInfo(id=m, owned_by=name) for m in models)
        self.fail = fail
        self.fail_after = fail_after
        self.delay = delay
        self.hang = hang
        self.answer_model = answer_model
        self.requests: list[Any] = []
        self.calls: list[Call] = []
        self.closed_streams = 0
        self.acloses = 0

    async def list_models(self) -> Sequence[ModelInfo]:
        return self.models

    async def _start(self, request: Any, call: Call) -> None:
        self.requests.append(request)
        self.calls.append(call)
        if self.hang:
            await anyio.sleep_forever()
        if self.delay:
            await anyio.sleep(self.delay)
        if self.fail is not None:
            raise self.fail

    async def aclose(self) -> None:
        self.acloses += 1


class Chat(Backend):
    async def stream_chat(self, request: ChatCompletionRequest, call: Call) -> AsyncIterator[ChatChunk]:
        try:
            await self._start(request, call)
            yield ChatChunk(role="assistant", content=f"{self.name}:{request.model}", model=self.answer_model)
            if self.fail_after is not None:
                raise self.fail_after
            yield ChatChunk(finish_reason="stop")
        finally:
            self.closed_streams += 1


class Completing(Chat):
    async def complete_chat(self, request: ChatCompletionRequest, call: Call) -> ChatResult:
        await self._start(request, call)
        message = Message(content=f"{self.name} completed {request.model}")
        return ChatResult(choices=(ChatChoice(0, message, "stop"),), model=self.answer_model)


class Embeds(Backend):
    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        await self._start(request, call)
        return EmbeddingResult(vectors=((1.0, 0.0),), prompt_tokens=1, extra={"by": self.name})


class ChatEmbeds(Chat, Embeds):
    pass


async def answer(router: RouterBackend, request: ChatCompletionRequest, call: Call | None = None) -> list[ChatChunk]:
    return [chunk async for chunk in router.stream_chat(request, call or make_call())]


def text(chunks: Sequence[ChatChunk]) -> str:
    return "".join(c.content or "" for c in chunks)


# -- routing ------------------------------------------------------------------------------------------------------


async def test_exact_names_first_then_patterns_in_order() -> None:
    a, b, c, d = Chat("a"), Chat("b"), Chat("c"), Chat("d")
    router = RouterBackend(routes=[Route("gpt-*", a), Route("gpt-4o-mini", b), Route("gpt-4*", c), Route("*", d)])
    assert text(await answer(router, chat("gpt-4o-mini"))) == "b:gpt-4o-mini"  # exact wins over an earlier pattern
    assert text(await answer(router, chat("gpt-4o"))) == "a:gpt-4o"  # the first pattern that matches
    assert text(await answer(router, chat("llama3"))) == "d:llama3"
    assert text(await answer(router, chat("GPT-4o"))) == "d:GPT-4o"  # patterns are case-sensitive


async def test_glob_classes_and_single_characters() -> None:
    a, b = Chat("a"), Chat("b")
    router = RouterBackend(routes=[Route("model-v[0-9]", a), Route("model-?", b)])
    assert text(await answer(router, chat("model-v7"))) == "a:model-v7"
    assert text(await answer(router, chat("model-x"))) == "b:model-x"
    with pytest.raises(NotFoundError) as caught:
        await answer(router, chat("model-v10"))
    assert (caught.value.status, caught.value.param, caught.value.code) == (404, "model", "model_not_found")


async def test_an_unrenamed_request_reaches_its_backend_as_is() -> None:
    a = Chat("a")
    router = RouterBackend(routes=[Route("*", a)])
    request = chat("m")
    await answer(router, request)
    assert a.requests[0] is request  # no copy on the hot path
    chunks = await answer(router, chat("m"))
    assert [c.model for c in chunks] == [None, None]  # nothing to say: the model asked for answered


async def test_an_alias_renames_a_copy_and_the_answer_says_which_model_answered() -> None:
    llama = Chat("b")
    router = RouterBackend(routes=[Route("gpt-*", Chat("a"))], aliases={"gpt-4": ("llama3:8b", llama)})
    request = chat("gpt-4", temperature=0.5)
    chunks = await answer(router, request)
    assert text(chunks) == "b:llama3:8b"
    assert [c.model for c in chunks] == ["llama3:8b", "llama3:8b"]  # every chunk
    assert request.model == "gpt-4"  # the caller's request is untouched
    seen = llama.requests[0]
    assert seen is not request and seen.model == "llama3:8b" and seen.temperature == 0.5


async def test_a_model_the_backend_names_is_kept() -> None:
    upstream = Chat("b", answer_model="llama3:8b-instruct-q4")
    router = RouterBackend(routes=[Route("x", Chat("a"))], aliases={"gpt-4": ("llama3:8b", upstream)})
    chunks = await answer(router, chat("gpt-4"))
    assert [c.model for c in chunks] == ["llama3:8b-instruct-q4", "llama3:8b"]


async def test_a_string_alias_is_routed_with_the_routes_fallbacks() -> None:
    down = Chat("a", fail=BadGatewayError("down"))
    spare = Chat("b")
    router = RouterBackend(routes=[Route("llama*", down, fallbacks=[spare])], aliases={"fast": "llama3:8b"})
    chunks = await answer(router, chat("fast"))
    assert text(chunks) == "b:llama3:8b"
    assert [r.model for r in down.requests] == ["llama3:8b"]
    assert {c.model for c in chunks} == {"llama3:8b"}


# -- fallbacks ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "failure",
    [
        BadGatewayError("upstream down"),
        ServiceUnavailableError("busy"),
        GatewayTimeoutError("slow"),
        OzwellError("boom"),
        TimeoutError(),
    ],
    ids=["502", "503", "504", "500", "TimeoutError"],
)
async def test_fallbacks_on_5xx_or_timeout_before_the_first_chunk(failure: BaseException) -> None:
    primary = Chat("a", fail=failure)
    spare = Chat("b")
    router = RouterBackend(routes=[Route("m", primary, fallbacks=[spare])])
    assert text(await answer(router, chat("m"))) == "b:m"
    assert len(primary.requests) == len(spare.requests) == 1
    assert primary.closed_streams == 1  # the failed stream was closed


async def test_fallbacks_go_in_order_and_may_rename() -> None:
    first = Chat("a", fail=BadGatewayError("a down"))
    second = Chat("b", fail=ServiceUnavailableError("b busy"))
    third = Chat("c")
    router = RouterBackend(routes=[Route("gpt-*", first, fallbacks=[second, ("llama3:8b", third)])])
    chunks = await answer(router, chat("gpt-4o"))
    assert text(chunks) == "c:llama3:8b"
    assert [c.model for c in chunks] == ["llama3:8b", "llama3:8b"]
    assert [r.model for r in second.requests] == ["gpt-4o"]


async def test_when_every_target_fails_the_last_failure_is_raised() -> None:
    router = RouterBackend(
        routes=[
            Route("m", Chat("a", fail=BadGatewayError("a")), fallbacks=[Chat("b", fail=ServiceUnavailableError("b"))])
        ]
    )
    with pytest.raises(ServiceUnavailableError, match="b"):
        await answer(router, chat("m"))


@pytest.mark.parametrize(
    "failure",
    [InvalidRequestError("bad", param="messages"), NotFoundError("no"), RuntimeError("a bug")],
    ids=["400", "404", "not-an-ozwell-error"],
)
async def test_client_errors_and_bugs_are_not_retried(failure: BaseException) -> None:
    spare = Chat("b")
    router = RouterBackend(routes=[Route("m", Chat("a", fail=failure), fallbacks=[spare])])
    with pytest.raises(type(failure)):
        await answer(router, chat("m"))
    assert spare.requests == []


async def test_no_fallback_once_a_chunk_was_sent() -> None:
    primary = Chat("a", fail_after=BadGatewayError("lost mid-stream"))
    spare = Chat("b")
    router = RouterBackend(routes=[Route("m", primary, fallbacks=[spare])])
    stream = router.stream_chat(chat("m"), make_call())
    assert (await anext(stream)).content == "a:m"
    with pytest.raises(BadGatewayError):
        await anext(stream)
    assert spare.requests == []


async def test_closing_the_router_stream_closes_the_backend_stream() -> None:
    primary = Chat("a")
    router = RouterBackend(routes=[Route("m", primary)])
    stream = router.stream_chat(chat("m"), make_call())
    await anext(stream)
    assert primary.closed_streams == 0
    await stream.aclose()  # type: ignore[attr-defined]
    assert primary.closed_streams == 1


@autojump()
async def test_a_route_timeout_moves_on_to_the_fallback() -> None:
    slow = Chat("a", hang=True)
    spare = Chat("b")
    router = RouterBackend(routes=[Route("m", slow, fallbacks=[spare], timeout=5)])
    started = anyio.current_time()
    assert text(await answer(router, chat("m"))) == "b:m"
    assert 5 <= anyio.current_time() - started < 5.1
    assert slow.closed_streams == 1


@autojump()
async def test_a_route_timeout_alone_is_a_504() -> None:
    router = RouterBackend(routes=[Route("m", Chat("a", hang=True), timeout=2)])
    with pytest.raises(GatewayTimeoutError) as caught:
        await answer(router, chat("m"))
    assert (caught.value.status, caught.value.code) == (504, "upstream_timeout")


@autojump()
async def test_fallbacks_are_tried_within_the_deadline() -> None:
    first = Chat("a", delay=3, fail=BadGatewayError("a"))
    second = Chat("b")
    router = RouterBackend(routes=[Route("m", first, fallbacks=[second])])
    started = anyio.current_time()
    assert text(await answer(router, chat("m"), make_call(deadline=started + 5))) == "b:m"


@autojump()
async def test_no_fallback_is_tried_past_the_deadline() -> None:
    first = Chat("a", delay=1, fail=BadGatewayError("a"))
    second = Chat("b", delay=5, fail=ServiceUnavailableError("b"))
    third = Chat("c")
    router = RouterBackend(routes=[Route("m", first, fallbacks=[second, third])])
    started = anyio.current_time()
    with pytest.raises(GatewayTimeoutError):  # the second was cut at the deadline
        await answer(router, chat("m"), make_call(deadline=started + 2.5))
    assert anyio.current_time() - started == pytest.approx(2.5)
    assert len(second.requests) == 1
    assert third.requests == []


@autojump()
async def test_a_call_already_past_its_deadline_tries_nothing_more() -> None:
    first = Chat("a", hang=True)
    second = Chat("b")
    router = RouterBackend(routes=[Route("m", first, fallbacks=[second])])
    started = anyio.current_time()
    with pytest.raises(GatewayTimeoutError):
        await answer(router, chat("m"), make_call(deadline=started - 1))
    assert anyio.current_time() == started
    assert second.requests == []


# -- non-stream chat and embeddings -------------------------------------------------------------------------------


async def test_complete_chat_uses_a_targets_own_or_folds_its_stream() -> None:
    completing = Completing("a")
    streaming = Chat("b")
    router = RouterBackend(routes=[Route("a*", completing), Route("b*", streaming)], aliases={"c": ("b-2", streaming)})
    assert isinstance(router, CompletesChat)
    result = await router.complete_chat(chat("a1"), make_call())
    assert result.choices[0].message.content == "a completed a1"
    result = await router.complete_chat(chat("b1"), make_call())
    assert (result.choices[0].message.content, result.model) == ("b:b1", None)
    result = await router.complete_chat(chat("c"), make_call())
    assert (result.choices[0].message.content, result.model) == ("b:b-2", "b-2")


async def test_complete_chat_falls_back() -> None:
    router = RouterBackend(
        routes=[Route("m", Completing("a", fail=BadGatewayError("x")), fallbacks=[("other", Completing("b"))])]
    )
    result = await router.complete_chat(chat("m"), make_call())
    assert (result.choices[0].message.content, result.model) == ("b completed other", "other")


async def test_capabilities_follow_the_targets() -> None:
    chat_only = RouterBackend(routes=[Route("*", Chat("a"))])
    assert isinstance(chat_only, ChatBackend)
    assert not isinstance(chat_only, CompletesChat)  # the app folds the stream itself
    assert not isinstance(chat_only, EmbeddingBackend)
    caps = capabilities(chat_only)
    assert (caps.chat, caps.completes, caps.embeddings) == (chat_only, None, None)
    embed_only = RouterBackend(routes=[Route("*", Embeds("e"))])
    assert not isinstance(embed_only, ChatBackend)
    assert isinstance(embed_only, EmbeddingBackend)
    assert capabilities(embed_only).chat is None


async def test_a_route_without_a_capability_is_skipped_for_it() -> None:
    embeds = Embeds("e")
    chats = Chat("c")
    both = ChatEmbeds("b")
    router = RouterBackend(
        routes=[Route("*", embeds), Route("text-*", chats, fallbacks=[embeds, both]), Route("*", both)]
    )
    assert text(await answer(router, chat("text-1"))) == "c:text-1"
    assert text(await answer(router, chat("other"))) == "b:other"
    result = await router.embed(embedding("text-embedding-3-small"), make_call(endpoint="embeddings"))
    assert result.extra == {"by": "e"}
    chats.fail = BadGatewayError("down")
    assert text(await answer(router, chat("text-1"))) == "b:text-1"  # the embed-only fallback is skipped for chat
    assert embeds.requests[-1].model == "text-embedding-3-small"  # and was never asked to chat


async def test_embeddings_route_alias_and_fall_back() -> None:
    down = Embeds("a", fail=BadGatewayError("down"))
    spare = Embeds("b")
    router = RouterBackend(
        routes=[Route("text-embedding-*", down, fallbacks=[spare])],
        aliases={"ada": ("nomic-embed-text", spare)},
    )
    request = embedding("text-embedding-3-small")
    result = await router.embed(request, make_call(endpoint="embeddings"))
    assert (result.extra, result.model) == ({"by": "b"}, None)
    assert spare.requests[-1] is request
    result = await router.embed(embedding("ada"), make_call(endpoint="embeddings"))
    assert (result.extra, result.model) == ({"by": "b"}, "nomic-embed-text")
    with pytest.raises(NotFoundError):
        await router.embed(embedding("other"), make_call(endpoint="embeddings"))


# -- the model list -----------------------------------------------------------------------------------------------


async def test_the_model_list_merges_what_each_route_serves() -> None:
    openai_like = Chat("openai", ["gpt-4o", "gpt-4o-mini", "dall-e-3", "llama3:8b"])
    ollama = ChatEmbeds(
        "ollama", ["llama3:8b", "gpt-4o", "mistral", ModelInfo(id="nomic-embed-text", kind="embedding")]
    )
    router = RouterBackend(
        routes=[Route("gpt-*", openai_like, fallbacks=[ollama]), Route("*", ollama)],
        aliases={"gpt-4": ("llama3:8b", ollama), "embed": "nomic-embed-text", "mini": "gpt-4o-mini"},
    )
    models = await router.list_models()
    assert [(m.id, m.owned_by, m.kind) for m in models] == [
        ("gpt-4o", "openai", "chat"),
        ("gpt-4o-mini", "openai", "chat"),
        ("llama3:8b", "ollama", "chat"),  # dall-e-3 and openai's llama route elsewhere; ollama's gpt-4o too
        ("mistral", "ollama", "chat"),
        ("nomic-embed-text", "ozwell", "embedding"),
        ("gpt-4", "ollama", "chat"),
        ("embed", "ozwell", "embedding"),  # an alias takes its target's kind
        ("mini", "openai", "chat"),
    ]
    assert await router.list_models() is models  # unchanged lists: the merge is reused


async def test_an_alias_hides_a_model_of_the_same_id_and_an_unknown_target_is_not_listed() -> None:
    a = Chat("a", ["gpt-4", "x"])
    b = Chat("b", ["llama3:8b"])
    router = RouterBackend(routes=[Route("*", a)], aliases={"gpt-4": ("llama3:8b", b), "y": ("missing", b)})
    assert [(m.id, m.owned_by) for m in await router.list_models()] == [("x", "a"), ("gpt-4", "b")]


@autojump()
async def test_the_lists_are_fetched_concurrently() -> None:
    started = {"a": anyio.Event(), "b": anyio.Event()}

    class Waits(Chat):
        async def list_models(self) -> Sequence[ModelInfo]:
            started[self.name].set()
            await started["b" if self.name == "a" else "a"].wait()  # only returns if the other one runs meanwhile
            return self.models

    router = RouterBackend(routes=[Route("a*", Waits("a", ["a1"])), Route("b*", Waits("b", ["b1"]))])
    with anyio.fail_after(60):
        assert [m.id for m in await router.list_models()] == ["a1", "b1"]


async def test_a_failing_list_keeps_its_last_good_one() -> None:
    flaky = Chat("a", ["a1"])
    never = Chat("b")
    router = RouterBackend(routes=[Route("a*", flaky), Route("b*", never)])

    async def broken() -> Sequence[ModelInfo]:
        raise BadGatewayError("upstream down")

    never.list_models = broken  # type: ignore[method-assign]
    assert [m.id for m in await router.list_models()] == ["a1"]
    flaky.list_models = broken  # type: ignore[method-assign]
    assert [m.id for m in await router.list_models()] == ["a1"]


# -- building -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "error", "message"),
    [
        (lambda a: RouterBackend(), ValueError, "at least one route or alias"),
        (
            lambda a: RouterBackend(routes=[Route("m", a), Route("m", a)]),
            ValueError,
            r"routes\[1\]: 'm' is given twice",
        ),
        (
            lambda a: RouterBackend(routes=[Route("*", ChatEmbeds("e")), Route("*", Embeds("b"))]),
            ValueError,
            r"routes\[1\]: '\*' is given twice",
        ),
        (lambda a: RouterBackend(routes=["m"]), TypeError, "a Route"),  # type: ignore[list-item]
        (lambda a: Route("m", object()), TypeError, r"Route\('m'\).backend: object is not a model backend"),
        (lambda a: Route("m", EchoBackend(), fallbacks=[("only-a-model",)]), ValueError, "two items"),
        (lambda a: Route("m", a, fallbacks=a), ValueError, "a list of backends"),
        (lambda a: Route("m", a, fallbacks=[object()]), TypeError, r"fallbacks\[0\]"),
        (lambda a: Route("", a), ValueError, "non-empty"),
        (lambda a: Route("m", a, timeout=0), ValueError, "timeout"),
        (lambda a: Route("m", a, timeout=True), ValueError, "timeout"),
        (lambda a: RouterBackend(routes=[Route("m", a)], aliases={"g*": "m"}), ValueError, "not a pattern"),
        (lambda a: RouterBackend(routes=[Route("m", a)], aliases={"m": "m"}), ValueError, "both an alias and a route"),
        (lambda a: RouterBackend(routes=[Route("*", a)], aliases={"x": "y", "y": "m"}), ValueError, "do not chain"),
        (lambda a: RouterBackend(routes=[Route("m", a)], aliases={"x": "other"}), ValueError, "no route serves"),
        (lambda a: RouterBackend(aliases={"x": ("m", object())}), TypeError, "not a model backend"),
        (lambda a: RouterBackend(aliases={"x": 3}), ValueError, "a model id or a"),
    ],
)
def test_bad_routers_are_refused_when_built(build: Any, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        build(Chat("a"))


ROUTER_TOML = """
[[routes]]
model = "gpt-*"
backend = "openai"
fallbacks = ["local", { model = "llama3:8b", backend = "ollama" }]
timeout = 10

[[routes]]
model = "*"
backend = "ollama"

[aliases]
"gpt-4" = { model = "llama3:8b", backend = "ollama" }
fast = "llama3:8b"

[backends]
openai = "openai+https://api.openai.com/v1"
"""


async def test_from_a_router_file() -> None:
    backends = {"openai": Chat("openai", fail=BadGatewayError("x")), "local": Chat("local"), "ollama": Chat("ollama")}
    for config in (tomllib.loads(ROUTER_TOML), json.loads(json.dumps(tomllib.loads(ROUTER_TOML)))):
        router = RouterBackend.from_config(config, backends)
        assert text(await answer(router, chat("gpt-4o"))) == "local:gpt-4o"
        backends["local"].fail = BadGatewayError("y")
        assert text(await answer(router, chat("gpt-4o"))) == "ollama:llama3:8b"
        backends["local"].fail = None
        assert text(await answer(router, chat("gpt-4"))) == "ollama:llama3:8b"
        assert text(await answer(router, chat("fast"))) == "ollama:llama3:8b"
        assert text(await answer(router, chat("mistral"))) == "ollama:mistral"


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ([], "router config: a mapping"),
        ({"route": []}, "unknown key 'route'"),
        ({"routes": {"model": "m"}}, "routes is a list"),
        ({"routes": [{"model": "m"}]}, r"routes\[0\]: needs model and backend"),
        ({"routes": ["m"]}, r"routes\[0\]: a table"),
        ({"routes": [{"model": "m", "backend": "nope"}]}, r"routes\[0\].backend: unknown backend 'nope' \(known: 'a'"),
        ({"routes": [{"model": "m", "backend": "a", "extra": 1}]}, r"routes\[0\]: unknown key 'extra'"),
        ({"routes": [{"model": 3, "backend": "a"}]}, r"routes\[0\].model: a non-empty model id"),
        ({"routes": [{"model": "m", "backend": "a", "timeout": "10s"}]}, r"routes\[0\].timeout"),
        ({"routes": [{"model": "m", "backend": "a", "timeout": -1}]}, "timeout"),
        ({"routes": [{"model": "m", "backend": "a", "fallbacks": "b"}]}, r"routes\[0\].fallbacks: a list"),
        ({"routes": [{"model": "m", "backend": "a", "fallbacks": ["zz"]}]}, r"fallbacks\[0\]: unknown backend 'zz'"),
        ({"routes": [{"model": "m", "backend": "a", "fallbacks": [{"model": "x"}]}]}, "needs both model and backend"),
        ({"routes": [{"model": "m", "backend": "a"}], "aliases": ["x"]}, "aliases is a table"),
        ({"routes": [{"model": "m", "backend": "a"}], "aliases": {"x": 1}}, r"aliases\['x'\]: a table"),
        ({"routes": [{"model": "m", "backend": "a"}], "aliases": {"x": "nothing"}}, "no route serves"),
        ({}, "at least one route or alias"),
    ],
)
def test_a_bad_router_file_is_a_clear_value_error(config: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RouterBackend.from_config(config, {"a": Chat("a"), "b": Chat("b")})


async def test_aclose_closes_every_backend_once() -> None:
    a, b, c = Chat("a"), Chat("b"), Embeds("c")
    router = RouterBackend(routes=[Route("x", a, fallbacks=[b]), Route("y", b, fallbacks=[a])], aliases={"z": ("q", c)})
    await router.aclose()
    assert (a.acloses, b.acloses, c.acloses) == (1, 1, 1)


# -- behind the app, through the official SDK ---------------------------------------------------------------------


def reverse(request: ChatCompletionRequest) -> str:
    return message_text(request.messages[-1])[::-1]


@pytest.fixture
async def routed() -> tuple[OzwellAPI, str, dict[str, Any]]:
    echo = EchoBackend()
    rev = FunctionBackend(reverse, models=("reverse-1",))
    down = Chat("down", ["flaky-1"], fail=BadGatewayError("The upstream model server failed."))
    picky = Chat("picky", ["picky-1"], fail=InvalidRequestError("'temperature' is too high.", param="temperature"))
    router = RouterBackend(
        routes=[
            Route("echo*", echo),
            Route("reverse-*", rev),
            Route("flaky-*", down, fallbacks=[("reverse-1", rev)]),
            Route("picky-*", picky, fallbacks=[rev]),
        ],
        aliases={"gpt-4": ("reverse-1", rev), "ada": "echo-embedding"},
    )
    api = OzwellAPI(secret=SECRET, backend=router)
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    return api, key, {"down": down, "picky": picky}


async def test_the_sdk_through_a_router(routed: tuple[OzwellAPI, str, dict[str, Any]]) -> None:
    api, key, _ = routed
    client = async_openai(api, key)
    ids = [m.id for m in (await client.models.list()).data]
    assert ids == ["echo", "echo-embedding", "reverse-1", "flaky-1", "picky-1", "gpt-4", "ada"]

    completion = await client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "abc"}])
    assert (completion.model, completion.choices[0].message.content) == ("reverse-1", "cba")
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    stream = await client.chat.completions.create(
        model="gpt-4", messages=[{"role": "user", "content": "stream me"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert {c.model for c in chunks} == {"reverse-1"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "em maerts"

    completion = await client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "same"}])
    assert (completion.model, completion.choices[0].message.content) == ("echo", "same")

    vectors = await client.embeddings.create(model="ada", input=["one", "two"])
    direct = await client.embeddings.create(model="echo-embedding", input=["one", "two"])
    assert vectors.model == "echo-embedding"
    assert [d.embedding for d in vectors.data] == [d.embedding for d in direct.data]
    await client.close()


async def test_the_sdk_sees_a_fallback_answer_and_a_client_error(
    routed: tuple[OzwellAPI, str, dict[str, Any]],
) -> None:
    api, key, backends = routed
    client = async_openai(api, key, max_retries=0)
    completion = await client.chat.completions.create(model="flaky-1", messages=[{"role": "user", "content": "xy"}])
    assert (completion.model, completion.choices[0].message.content) == ("reverse-1", "yx")
    assert len(backends["down"].requests) == 1
    stream = await client.chat.completions.create(
        model="flaky-1", messages=[{"role": "user", "content": "xy"}], stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "yx"

    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="picky-1", messages=[{"role": "user", "content": "x"}])
    assert caught.value.body["param"] == "temperature"  # type: ignore[index]
    await client.close()

    async with raw_client(api) as http:
        response = await http.post(
            "/chat/completions",
            json={"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 404
    assert response.json()["error"]["param"] == "model"


async def test_every_target_down_is_a_502_in_the_envelope() -> None:
    down = Chat("down", ["m"], fail=BadGatewayError("The upstream model server failed."))
    api = OzwellAPI(secret=SECRET, backend=RouterBackend(routes=[Route("m", down, fallbacks=[down])]))
    _, key = await api.keys.create(name="t", owner="o", plan="pro")
    async with raw_client(api) as http:
        for stream in (False, True):
            response = await http.post(
                "/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": stream},
                headers={"authorization": f"Bearer {key}"},
            )
            assert response.status_code == 502
            assert response.json() == {
                "error": {
                    "message": "The upstream model server failed.",
                    "type": "server_error",
                    "param": None,
                    "code": "upstream_error",
                }
            }
    assert len(down.requests) == 4
