"""The token-counting seam and its offline default.

Counts are made with OpenAI's ``o200k_base`` byte-pair encoding (the one GPT-4o and later use), from the
``bpe-openai`` package, which ships the encoding inside its wheel: nothing is downloaded at run time. Loading
the tables takes about half a second, so :meth:`BPETokenizer.warm` does it in a worker thread, once; until then
nothing on the event loop blocks on it.

Chat prompts are counted the way OpenAI documents for its chat models: 3 tokens per message, 1 more when a
message has a ``name``, the tokens of its text, and 3 that prime the reply.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio.to_thread

if TYPE_CHECKING:
    from .wire.chat import ChatCompletionRequest

__all__ = ["BPETokenizer", "Tokenizer", "count_chat_prompt", "count_content", "count_tool_call", "default_tokenizer"]


@runtime_checkable
class Tokenizer(Protocol):
    """Turns text into token ids and back. Must be pure CPU and fast (it runs on the event loop)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, tokens: Sequence[int]) -> str: ...

    def token_bytes(self, token: int) -> bytes: ...

    def count(self, text: str) -> int: ...

    async def warm(self) -> None:
        """Load whatever the tokenizer needs, off the event loop. Idempotent."""
        ...


class BPETokenizer:
    """OpenAI's byte-pair encodings from ``bpe-openai`` (offline). Thread-safe; loads on :meth:`warm`."""

    def __init__(self, encoding: str = "o200k_base") -> None:
        self.encoding_name = encoding
        self._enc: Any = None
        self._lock = threading.Lock()

    def _load(self) -> Any:
        with self._lock:
            if self._enc is None:
                import bpe_openai

                self._enc = bpe_openai.get_encoding(self.encoding_name)
            return self._enc

    async def warm(self) -> None:
        if self._enc is None:
            await anyio.to_thread.run_sync(self._load)

    @property
    def _encoding(self) -> Any:
        enc = self._enc
        return enc if enc is not None else self._load()

    def encode(self, text: str) -> list[int]:
        if not text:
            return []
        try:
            tokens: list[int] = self._encoding.encode_ordinary(text)
        except ValueError:  # bpe-openai refuses pathological single chunks; count them in pieces
            tokens = []
            for start in range(0, len(text), 4096):
                tokens.extend(self._encoding.encode_ordinary(text[start : start + 4096]))
        return tokens

    def decode(self, tokens: Sequence[int]) -> str:
        text: str = self._encoding.decode(list(tokens))
        return text

    def token_bytes(self, token: int) -> bytes:
        data: bytes = self._encoding.decode_single_token_bytes(token)
        return data

    def count(self, text: str) -> int:
        return len(self.encode(text))


_default: BPETokenizer | None = None


def default_tokenizer() -> BPETokenizer:
    """The process-wide o200k_base tokenizer (shared so its tables are loaded once)."""
    global _default
    if _default is None:
        _default = BPETokenizer()
    return _default


_last_prompt: ContextVar[tuple[object, int] | None] = ContextVar("ozwell_last_prompt", default=None)

# Fixed cost OpenAI charges for a low-detail image; we count every image part at this rate.
IMAGE_TOKENS = 85


def count_content(tokenizer: Tokenizer, content: object) -> int:
    """Tokens of a message's ``content``: a string, or a list of parts (text and refusal counted, images 85)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return tokenizer.count(content)
    total = 0
    if isinstance(content, list | tuple):
        for part in content:
            text = getattr(part, "text", None) or getattr(part, "refusal", None)
            if isinstance(text, str):
                total += tokenizer.count(text)
            elif getattr(part, "type", None) == "image_url":
                total += IMAGE_TOKENS
    return total


def count_tool_call(tokenizer: Tokenizer, name: str | None, arguments: str | None) -> int:
    """Tokens of a tool call (or of a streamed piece of one): its function name and its JSON arguments."""
    return (tokenizer.count(name) if name else 0) + (tokenizer.count(arguments) if arguments else 0)


def count_chat_prompt(tokenizer: Tokenizer, request: ChatCompletionRequest) -> int:
    """OpenAI's documented chat count: 3 per message, 1 per name, the text, 3 to prime the reply; tools as JSON.

    Remembered for the request being served (a context variable: one per task), so the limiter's estimate and the
    backend share one count.
    """
    last = _last_prompt.get()
    if last is not None and last[0] is request:
        return last[1]
    total = 3
    for message in request.messages:
        fields = message.__dict__  # declared fields only: avoids pydantic's slow attribute fallback
        total += 3 + count_content(tokenizer, fields.get("content"))
        if fields.get("name"):
            total += 1
        for call in fields.get("tool_calls") or ():
            function = getattr(call, "function", None)
            if function is not None:
                total += count_tool_call(tokenizer, function.name, function.arguments)
    if request.tools:
        total += tokenizer.count(json.dumps([tool.model_dump(exclude_none=True) for tool in request.tools]))
    _last_prompt.set((request, total))
    return total
