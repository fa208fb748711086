"""Wrap your own model in a backend: here, a "model" that answers in upper case.

Run it:  python examples/custom_backend.py        (serves /v1 on http://127.0.0.1:8000 and prints a key)
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence

from ozwell_asgi import Call, ChatChunk, EchoBackend, EmbeddingResult, ModelInfo, OzwellAPI, Usage
from ozwell_asgi.wire.chat import ChatCompletionRequest, message_text
from ozwell_asgi.wire.embeddings import EmbeddingRequest


class ShoutingBackend:
    """Answers with the last user message in capitals. A backend is ``list_models`` plus its capabilities:
    ``stream_chat`` for chat (non-streamed requests are folded from it) and ``embed`` for embeddings."""

    def __init__(self) -> None:
        self.echo = EchoBackend()  # reuse the echo backend's deterministic embeddings

    async def list_models(self) -> Sequence[ModelInfo]:
        return (ModelInfo(id="shout-1", owned_by="acme"), ModelInfo(id="echo-embedding", kind="embedding"))

    async def stream_chat(self, request: ChatCompletionRequest, call: Call) -> AsyncIterator[ChatChunk]:
        text = message_text(request.messages[-1]).upper()
        words = re.findall(r"\s*\S+", text)[: call.max_tokens]  # the call's bound: never generate more
        yield ChatChunk(role="assistant", content="")
        for word in words:
            yield ChatChunk(content=word)
        yield ChatChunk(finish_reason="stop")
        # Optional: report usage when your model knows it; otherwise ozwell_asgi counts the tokens itself.
        yield ChatChunk(usage=Usage(prompt_tokens=len(request.messages), completion_tokens=len(words)))

    async def embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        return await self.echo.embed(request, call)


api = OzwellAPI(backend=ShoutingBackend())

if __name__ == "__main__":
    import anyio
    import uvicorn

    from ozwell_asgi.app import PrefixedApp

    _, secret = anyio.run(lambda: api.keys.create(name="demo", owner="me"))
    print(f"export OPENAI_BASE_URL=http://127.0.0.1:8000/v1 OPENAI_API_KEY={secret}")
    uvicorn.run(PrefixedApp(api), host="127.0.0.1", port=8000)
