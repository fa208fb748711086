"""``include_sources`` end to end: files uploaded with the official SDK, a question over the Responses API, the
passages that answer it given to the model as context and returned in ``sources`` (Ozwell's extension), for the
caller's owner alone; streamed and chained turns too; on the memory and the SQLite passage index."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import openai
import pytest

from ozwell_asgi import OzwellAPI
from ozwell_asgi.backends.function import FunctionBackend
from ozwell_asgi.types import Call, ChatChunk, EmbeddingResult, ModelInfo
from ozwell_asgi.wire.chat import ChatCompletionRequest
from ozwell_asgi.wire.embeddings import EmbeddingRequest
from tests.harness import async_openai
from tests.openai_schema import validate
from tests.test_sources import WordsBackend

pytestmark = pytest.mark.anyio

SECRET = "s" * 32
BOATS = "Boats float on water. A sailing boat uses the wind; a motor boat burns fuel."
BREAD = "Bread rises because yeast makes gas. Bakers knead the dough before baking bread."


class ChatAndWords:
    """Chats (recording every conversation it is sent) and embeds as bags of words, so texts sharing words are
    close: a backend with both capabilities, as a deployment's would be."""

    def __init__(self) -> None:
        self.words = WordsBackend()
        self.seen: list[list[dict[str, Any]]] = []
        self.chat = FunctionBackend(self.answer, models=("chatty",))

    def answer(self, request: ChatCompletionRequest) -> str:
        self.seen.append([m.model_dump(exclude_none=True) for m in request.messages])
        return "From your files: sailing boats use the wind."

    async def list_models(self) -> Sequence[ModelInfo]:
        return [ModelInfo("chatty"), ModelInfo("words", kind="embedding")]

    def stream_chat(self, request: ChatCompletionRequest, call: Call) -> AsyncIterator[ChatChunk]:
        return self.chat.stream_chat(request, call)

    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        return await self.words.embed(request, call)


@pytest.fixture(params=["memory", "sqlite"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[OzwellAPI, ChatAndWords]]:
    backend = ChatAndWords()
    store = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'ozwell.db'}"
    api = OzwellAPI(secret=SECRET, backend=backend, file_store=store, sources_model="words")  # type: ignore[arg-type]
    yield api, backend
    await api.aclose()


def system_text(conversation: list[dict[str, Any]]) -> str:
    return "\n".join(str(m["content"]) for m in conversation if m["role"] == "system")


async def test_the_passages_that_answer_go_to_the_model_and_come_back_in_sources(
    world: tuple[OzwellAPI, ChatAndWords],
) -> None:
    api, backend = world
    _, alice = await api.keys.create(name="alice", owner="alice")
    _, bob = await api.keys.create(name="bob", owner="bob")
    client = async_openai(api, alice, max_retries=0)
    boats = await client.files.create(file=("boats.txt", BOATS.encode()), purpose="user_data")
    await client.files.create(file=("bread.md", BREAD.encode()), purpose="user_data")

    response = await client.responses.create(
        model="chatty", input="How does a sailing boat move? Wind?", extra_body={"include_sources": True}
    )
    body = response.model_dump(mode="json", exclude_unset=True)  # as it came over the wire
    sources = body["sources"]
    assert sources[0]["file_id"] == boats.id and sources[0]["filename"] == "boats.txt"
    assert sources[0]["page"] is None and "sailing boat uses the wind" in sources[0]["excerpt"]
    assert all(-1.0 <= s["score"] <= 1.0 for s in sources)
    assert [s["score"] for s in sources] == sorted((s["score"] for s in sources), reverse=True)
    # The model was given the passages, tagged with their file, before the conversation.
    context = system_text(backend.seen[-1])
    assert "boats.txt" in context and "sailing boat uses the wind" in context
    # The Response stays one of OpenAI's (the SDKs ignore the extra field), and retrieving it keeps the sources.
    validate("Response", {k: v for k, v in body.items() if k != "sources"})
    again = await client.responses.retrieve(response.id)
    assert again.model_dump(mode="json")["sources"] == sources

    # Another owner's files are never searched: bob has none, so bob's model gets no passages.
    other = async_openai(api, bob, max_retries=0)
    theirs = await other.responses.create(
        model="chatty", input="How does a sailing boat move?", extra_body={"include_sources": True}
    )
    assert theirs.model_dump(mode="json")["sources"] == []
    assert "boats.txt" not in system_text(backend.seen[-1])
    for c in (client, other):
        await c.close()


async def test_streamed_and_chained_turns_search_the_new_question(world: tuple[OzwellAPI, ChatAndWords]) -> None:
    api, backend = world
    _, alice = await api.keys.create(name="alice", owner="alice")
    client = async_openai(api, alice, max_retries=0)
    bread = await client.files.create(file=("bread.md", BREAD.encode()), purpose="user_data")
    await client.files.create(file=("boats.txt", BOATS.encode()), purpose="user_data")
    first = await client.responses.create(model="chatty", input="Tell me about boats and wind.")
    async with client.responses.stream(
        model="chatty",
        input="Why does bread rise? Yeast?",
        previous_response_id=first.id,
        extra_body={"include_sources": True},
    ) as stream:
        final = await stream.get_final_response()
    sources = final.model_dump(mode="json")["sources"]
    assert sources[0]["file_id"] == bread.id  # the new question decides, not the earlier turn
    sent = backend.seen[-1]
    assert sent[0]["role"] == "system" and "bread.md" in sent[0]["content"]
    assert [m["content"] for m in sent if m["role"] == "user"] == [
        "Tell me about boats and wind.",
        "Why does bread rise? Yeast?",
    ]
    # The passages are context for that turn alone: the stored conversation a later turn chains to has none.
    await client.responses.create(model="chatty", input="Thanks.", previous_response_id=final.id)
    assert "bread.md" not in system_text(backend.seen[-1])
    await client.close()


async def test_without_a_sources_model_include_sources_is_a_400_naming_it() -> None:
    api = OzwellAPI(secret=SECRET)
    _, key = await api.keys.create(name="k", owner="o")
    client = async_openai(api, key, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.responses.create(model="echo", input="hi", extra_body={"include_sources": True})
    error = caught.value.body
    assert isinstance(error, dict) and error["param"] == "include_sources"
    assert "embedding model" in error["message"]
    await client.close()
    await api.aclose()
