"""The token-counting seam and its offline default.

Counts are made with OpenAI's ``o200k_base`` byte-pair encoding (the one GPT-4o and later use), from the
``bpe-openai`` package, which ships the encoding inside its wheel: nothing is downloaded at run time. Loading
the tables takes about half a second, so :meth:`BPETokenizer.warm` does it in a worker thread, once; until then
nothing on the event loop blocks on it.

Chat prompts are counted the way OpenAI documents for its chat models: 3 tokens per message, 1 more when a
message has a ``name``, the tokens of its text, and 3 that prime the reply.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import anyio.to_thread
from pydantic_core import to_json

if TYPE_CHECKING:
    from .wire.chat import ChatCompletionRequest

__all__ = [
    "BPETokenizer",
    "Tokenizer",
    "count_chat_prompt",
    "count_content",
    "count_tool_call",
    "default_tokenizer",
    "remember_prompt",
]


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


# Texts up to this many characters go straight to bpe-openai's Rust tokenizer: at most 200,000 UTF-8 bytes, so at
# most as many tokens, which is within every limit its Python wrapper checks (1,000,000 characters, 200,000 tokens).
_DIRECT_MAX_CHARS = 50_000


class BPETokenizer:
    """OpenAI's byte-pair encodings from ``bpe-openai`` (offline). Thread-safe; loads on :meth:`warm`.

    Texts of at most 50,000 characters are tokenized by the package's Rust tokenizer directly, skipping its
    wrapper's copy of the text, metrics and limit checks (which such texts cannot reach); the tokens are the
    same. Longer texts, and texts the UTF-8 codec refuses (lone surrogates), take the wrapper's path.
    """

    def __init__(self, encoding: str = "o200k_base") -> None:
        self.encoding_name = encoding
        self._enc: Any = None
        self._direct: Any = None
        self._lock = threading.Lock()
        self._last: tuple[str | None, int] = (None, 0)

    def _load(self) -> Any:
        with self._lock:
            if self._enc is None:
                with warnings.catch_warnings():
                    # bpe-openai reads its tables with importlib.resources.open_binary, deprecated since Python
                    # 3.11: in a host running with -W error that warning would fail the first request. Only that
                    # warning is silenced, and only while the package imports and its tables load (once).
                    warnings.filterwarnings("ignore", message=r"open_binary is deprecated", category=DeprecationWarning)
                    import bpe_openai

                    enc = bpe_openai.get_encoding(self.encoding_name)
                direct = getattr(enc, "_backend", None)
                if callable(getattr(direct, "encode", None)) and callable(getattr(direct, "count", None)):
                    self._direct = direct
                self._enc = enc
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
        direct = self._direct
        if direct is not None and len(text) <= _DIRECT_MAX_CHARS:
            try:
                return list(direct.encode(text))
            except UnicodeEncodeError:
                pass  # the wrapper replaces what UTF-8 cannot encode
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
        """The number of tokens of ``text``. The last text counted is remembered by identity (a string is immutable):
        counting the very same object again, as an answer that repeats its prompt does, is free (texts of up to
        50,000 characters)."""
        last = self._last
        if last[0] is text:
            return last[1]
        direct = self._direct
        if direct is not None and 0 < len(text) <= _DIRECT_MAX_CHARS:
            try:
                count = int(direct.count(text))
            except UnicodeEncodeError:
                count = len(self.encode(text))
            self._last = (text, count)  # one tuple, swapped whole: safe across threads; at most 50,000 characters
            return count
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
# Opaque data (base64 audio and file contents) is estimated by size: a token per this many characters.
DATA_CHARS_PER_TOKEN = 4


def _data_tokens(data: object) -> int:
    return -(-len(data) // DATA_CHARS_PER_TOKEN) if isinstance(data, str) else 0


def _text_tokens(tokenizer: Tokenizer, text: object) -> int:
    return tokenizer.count(text) if isinstance(text, str) and text else 0


def _json_tokens(tokenizer: Tokenizer, value: object) -> int:
    """Tokens of a structured value the model receives (schemas, tool definitions, unknown fields), as JSON."""
    if value is None:
        return 0
    return tokenizer.count(to_json(value, exclude_none=True, by_alias=True, fallback=str).decode())


def _part_tokens(tokenizer: Tokenizer, part: object) -> int:
    fields = getattr(part, "__dict__", None)
    if fields is None:
        return 0
    kind = fields.get("type")
    if kind == "text":
        total = _text_tokens(tokenizer, fields.get("text"))
    elif kind == "refusal":
        total = _text_tokens(tokenizer, fields.get("refusal"))
    elif kind == "image_url":
        total = IMAGE_TOKENS
    elif kind == "input_audio":
        total = _data_tokens(getattr(fields.get("input_audio"), "data", None))
    elif kind == "file":
        file = fields.get("file")
        total = (
            _data_tokens(getattr(file, "file_data", None))
            + _text_tokens(tokenizer, getattr(file, "filename", None))
            + _text_tokens(tokenizer, getattr(file, "file_id", None))
        )
    else:
        total = 0
    extra = getattr(part, "__pydantic_extra__", None)
    if extra:
        total += _json_tokens(tokenizer, extra)
    return total


def count_content(tokenizer: Tokenizer, content: object) -> int:
    """Tokens of a message's ``content``: a string, or a list of parts (text and refusal by their text, images
    85, audio and file data by size)."""
    if content is None:
        return 0
    if isinstance(content, str):
        return tokenizer.count(content)
    total = 0
    if isinstance(content, list | tuple):
        for part in content:
            total += _part_tokens(tokenizer, part)
    return total


def count_tool_call(tokenizer: Tokenizer, name: str | None, arguments: str | None) -> int:
    """Tokens of a tool call (or of a streamed piece of one): its function name and its JSON arguments."""
    return (tokenizer.count(name) if name else 0) + (tokenizer.count(arguments) if arguments else 0)


def _message_tokens(tokenizer: Tokenizer, message: object) -> int:
    fields = message.__dict__  # declared fields only: avoids pydantic's slow attribute fallback
    total = 3 + count_content(tokenizer, fields.get("content"))
    name = fields.get("name")
    if name:
        total += 1 + tokenizer.count(name)
    calls = fields.get("tool_calls")
    if calls:
        for call in calls:
            total += _text_tokens(tokenizer, call.id)
            function = getattr(call, "function", None)
            if function is not None:
                total += count_tool_call(tokenizer, function.name, function.arguments)
            custom = getattr(call, "custom", None)
            if custom is not None:
                total += count_tool_call(tokenizer, custom.name, custom.input)
    function_call = fields.get("function_call")
    if function_call is not None:
        total += count_tool_call(tokenizer, function_call.name, function_call.arguments)
    tool_call_id = fields.get("tool_call_id")
    if tool_call_id:
        total += tokenizer.count(tool_call_id)
    refusal = fields.get("refusal")
    if refusal:
        total += tokenizer.count(refusal)
    extra = getattr(message, "__pydantic_extra__", None)
    if extra:
        total += _json_tokens(tokenizer, extra)
    return total


# Request fields that reach the model as text beside the messages (everything else steers sampling or bookkeeping).
_STRUCTURED_INPUTS = ("tools", "functions", "response_format", "tool_choice", "function_call", "prediction")


def count_chat_prompt(tokenizer: Tokenizer, request: ChatCompletionRequest) -> int:
    """OpenAI's documented chat count (3 per message, 1 per name, 3 to prime the reply) over every field the model
    receives: message text, names, tool call ids and arguments, audio and file data (by size), tool and function
    definitions, response format schemas and unknown fields (as JSON).

    Remembered for the request being served (a context variable: one per task), so the limiter's estimate and the
    backend share one count.
    """
    last = _last_prompt.get()
    if last is not None and last[0] is request:
        return last[1]
    total = 3
    for message in request.messages:
        total += _message_tokens(tokenizer, message)
    fields = request.__dict__
    for name in _STRUCTURED_INPUTS:
        value = fields.get(name)
        if value is not None and not isinstance(value, str):
            total += _json_tokens(tokenizer, value)
    extra = request.__pydantic_extra__
    if extra:
        total += _json_tokens(tokenizer, extra)
    _last_prompt.set((request, total))
    return total


def remember_prompt(request: ChatCompletionRequest, count: int) -> None:
    """Record ``count`` as ``request``'s prompt count for this task (when it was counted in another context)."""
    _last_prompt.set((request, count))
