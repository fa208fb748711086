"""Wrap your own model in the ModelBackend protocol: here, a "model" that answers in upper case.

Run it:  python examples/custom_backend.py        (serves /v1 on http://127.0.0.1:8000 and prints a key)
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

from ozwell_asgi import ChatChoice, ChatChunk, ChatResult, EchoBackend, ModelInfo, OzwellAPI, Usage
from ozwell_asgi.types import AssistantMessage, EmbeddingResult
from ozwell_asgi.wire.chat import ChatCompletionRequest, message_text


class ShoutingBackend:
    """Answers with the last user message in capitals. Anything with these four methods is a backend."""

    def __init__(self) -> None:
        self.embeddings = EchoBackend()  # reuse the echo backend's deterministic embeddings

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="shout-1", owned_by="acme"),)

    def _answer(self, request: ChatCompletionRequest) -> str:
        return message_text(request.messages[-1]).upper()

    async def chat(self, request: ChatCompletionRequest) -> ChatResult:
        text = self._answer(request)
        # Leave usage as None and ozwell_asgi counts tokens itself; report it when your model knows better.
        return ChatResult(
            choices=(ChatChoice(index=0, message=AssistantMessage(content=text), finish_reason="stop"),),
            usage=Usage(prompt_tokens=len(request.messages), completion_tokens=len(text.split())),
        )

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncIterator[ChatChunk]:
        yield ChatChunk(role="assistant", content="")
        for word in re.findall(r"\s*\S+", self._answer(request)):
            yield ChatChunk(content=word)
        yield ChatChunk(finish_reason="stop")

    async def embed(self, model: str, inputs: Sequence[str | Sequence[int]], dimensions: int | None) -> EmbeddingResult:
        return await self.embeddings.embed(model, inputs, dimensions)


api = OzwellAPI(backend=ShoutingBackend())

if __name__ == "__main__":
    import anyio
    import uvicorn

    from ozwell_asgi.app import PrefixedApp

    _, secret = anyio.run(lambda: api.keys.create(name="demo", owner="me"))
    print(f"export OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY={secret}")
    uvicorn.run(PrefixedApp(api), host="127.0.0.1", port=8000)
