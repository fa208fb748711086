"""The embedded default backend: deterministic answers for demos and tests, no model needed.

``echo`` (chat) answers with the text of the last user message, streamed word by word. It honours ``n``,
``stop`` (the answer is cut before the first stop sequence), ``max_completion_tokens``/``max_tokens`` (cut at that
many tokens, then ``finish_reason: "length"``), ``logprobs``/``top_logprobs`` (every token certain: logprob 0),
``response_format`` (``json_object`` → ``{"echo": text}``; ``json_schema`` → an instance built from the schema)
and a forced tool call (``tool_choice`` naming a function, or ``"required"``: the first tool), whose arguments are
built from the function's parameter schema, string fields holding the echoed text.

``echo-embedding`` gives deterministic unit vectors (1536 dimensions, or ``dimensions``) seeded by the input.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import InvalidRequestError
from ..tokens import Tokenizer, count_chat_prompt, count_tool_call, default_tokenizer
from ..types import (
    AssistantMessage,
    Call,
    ChatChoice,
    ChatChunk,
    ChatResult,
    EmbeddingResult,
    ModelInfo,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from ..wire.chat import message_text

if TYPE_CHECKING:
    from ..wire.chat import ChatCompletionRequest
    from ..wire.embeddings import EmbeddingRequest

__all__ = ["EchoBackend"]

_WORD_RE = re.compile(r"\s*\S+|\s+")
EMBEDDING_DIMENSIONS = 1536
_CREATED = 1_700_000_000


def _instance_of(schema: Any, text: str, depth: int = 0) -> Any:
    """A value valid for a (simple) JSON schema: strings hold ``text``; objects fill their required properties."""
    if not isinstance(schema, dict) or depth > 8:
        return text
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for union in ("anyOf", "oneOf"):
        if schema.get(union):
            return _instance_of(schema[union][0], text, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object" or (kind is None and "properties" in schema):
        props = schema.get("properties") or {}
        wanted = schema.get("required") or list(props)
        return {name: _instance_of(props.get(name, {}), text, depth + 1) for name in wanted}
    if kind == "array":
        return [_instance_of(schema.get("items", {}), text, depth + 1)] * int(schema.get("minItems", 0) or 0)
    if kind == "integer":
        return int(schema.get("minimum", 0))
    if kind == "number":
        return float(schema.get("minimum", 0))
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return text


class EchoBackend:
    """Deterministic chat (``echo``) and embeddings (``echo-embedding``) with real, offline token counts."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer | None = None,
        chat_models: Sequence[str] = ("echo",),
        embedding_models: Sequence[str] = ("echo-embedding",),
    ) -> None:
        self.tokenizer = tokenizer or default_tokenizer()
        self._models = tuple(
            ModelInfo(id=m, owned_by="ozwell", created=_CREATED, kind="chat") for m in chat_models
        ) + tuple(ModelInfo(id=m, owned_by="ozwell", created=_CREATED, kind="embedding") for m in embedding_models)

    async def list_models(self) -> Sequence[ModelInfo]:
        return self._models

    # -- chat -------------------------------------------------------------------------------------------------

    def _forced_tool(self, request: ChatCompletionRequest) -> tuple[str, dict[str, Any]] | None:
        tools = request.tools
        choice = request.tool_choice
        if not tools:
            return None
        functions: dict[str, dict[str, Any]] = {}
        for tool in tools:
            function = getattr(tool, "function", None)
            if function is not None:
                functions[function.name] = function.parameters or {}
        if isinstance(choice, str):
            if choice == "required" and functions:
                first = next(iter(functions))
                return first, functions[first]
            return None
        function = getattr(choice, "function", None)
        name = getattr(function, "name", None)
        if isinstance(name, str):
            if name not in functions:
                raise InvalidRequestError(
                    f"Invalid value for 'tool_choice': function '{name}' is not one of the given tools.",
                    param="tool_choice",
                    code="invalid_value",
                )
            return name, functions[name]
        return None

    def _answer_text(self, request: ChatCompletionRequest) -> str:
        text = ""
        for message in reversed(request.messages):
            if message.role == "user":
                text = message_text(message)
                break
        fmt = request.response_format
        kind = getattr(fmt, "type", None)
        if kind == "json_object":
            return json.dumps({"echo": text})
        if kind == "json_schema":
            spec = getattr(fmt, "json_schema", None)
            return json.dumps(_instance_of(getattr(spec, "schema_", None) or getattr(spec, "json_schema", None), text))
        return text

    def _limit(self, request: ChatCompletionRequest, text: str) -> tuple[str, str, list[int]]:
        """Apply ``stop`` then the token cap; returns (text, finish_reason, tokens)."""
        finish = "stop"
        cut = min((i for i in (text.find(s) for s in request.stop_sequences if s) if i >= 0), default=-1)
        if cut >= 0:
            text = text[:cut]
        tokens = self.tokenizer.encode(text)
        cap = request.effective_max_tokens
        if cap is not None and len(tokens) > cap:
            tokens = tokens[:cap]
            text = self.tokenizer.decode(tokens)
            finish = "length"
        return text, finish, tokens

    def _logprobs(self, request: ChatCompletionRequest, tokens: Sequence[int]) -> dict[str, Any] | None:
        if not request.logprobs:
            return None
        top = request.top_logprobs or 0
        content = []
        for token in tokens:
            raw = self.tokenizer.token_bytes(token)
            text = raw.decode("utf-8", errors="replace")
            entry = {"token": text, "logprob": 0.0, "bytes": list(raw)}
            content.append({**entry, "top_logprobs": [entry] if top else []})
        return {"content": content, "refusal": None}

    def _tool_call(self, request: ChatCompletionRequest, name: str, schema: dict[str, Any], choice: int) -> ToolCall:
        text = self._answer_text(request)
        arguments = json.dumps(_instance_of(schema or {"type": "object"}, text))
        digest = hashlib.sha256(f"{choice}:{name}:{arguments}".encode()).hexdigest()[:24]
        return ToolCall(id=f"call_{digest}", name=name, arguments=arguments)

    async def complete_chat(self, request: ChatCompletionRequest, ctx: Call) -> ChatResult:
        prompt = count_chat_prompt(self.tokenizer, request)
        forced = self._forced_tool(request)
        choices: list[ChatChoice] = []
        completion = 0
        for index in range(request.choice_count):
            if forced is not None:
                call = self._tool_call(request, forced[0], forced[1], index)
                completion += count_tool_call(self.tokenizer, call.name, call.arguments)
                finish = "tool_calls" if request.tool_choice == "required" else "stop"
                message = AssistantMessage(content=None, tool_calls=(call,))
                choices.append(ChatChoice(index=index, message=message, finish_reason=finish))  # type: ignore[arg-type]
                continue
            text, finish, tokens = self._limit(request, self._answer_text(request))
            completion += len(tokens)
            choices.append(
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content=text),
                    finish_reason=finish,  # type: ignore[arg-type]
                    logprobs=self._logprobs(request, tokens),
                )
            )
        return ChatResult(choices=tuple(choices), usage=Usage(prompt, completion), system_fingerprint="fp_ozwell_echo")

    async def stream_chat(self, request: ChatCompletionRequest, ctx: Call) -> AsyncIterator[ChatChunk]:
        prompt = count_chat_prompt(self.tokenizer, request)
        forced = self._forced_tool(request)
        completion = 0
        for index in range(request.choice_count):
            if forced is not None:
                call = self._tool_call(request, forced[0], forced[1], index)
                completion += count_tool_call(self.tokenizer, call.name, call.arguments)
                yield ChatChunk(
                    index=index,
                    role="assistant",
                    tool_calls=(ToolCallDelta(index=0, id=call.id, name=call.name, arguments=""),),
                )
                for piece in _WORD_RE.findall(call.arguments):
                    yield ChatChunk(index=index, tool_calls=(ToolCallDelta(index=0, arguments=piece),))
                finish = "tool_calls" if request.tool_choice == "required" else "stop"
                yield ChatChunk(index=index, finish_reason=finish)
                continue
            text, finish, tokens = self._limit(request, self._answer_text(request))
            completion += len(tokens)
            yield ChatChunk(index=index, role="assistant", content="")
            for piece in _WORD_RE.findall(text):
                piece_tokens = self.tokenizer.encode(piece) if request.logprobs else ()
                yield ChatChunk(index=index, content=piece, logprobs=self._logprobs(request, piece_tokens))
            yield ChatChunk(index=index, finish_reason=finish)
        yield ChatChunk(usage=Usage(prompt, completion))

    # -- embeddings -------------------------------------------------------------------------------------------

    async def embed(self, request: EmbeddingRequest, ctx: Call) -> EmbeddingResult:
        size = request.dimensions or EMBEDDING_DIMENSIONS
        vectors = []
        tokens = 0
        for item in request.inputs():
            if isinstance(item, str):
                seed = item.encode()
                tokens += self.tokenizer.count(item)
            else:
                seed = b"\x00tokens:" + ",".join(map(str, item)).encode()
                tokens += len(item)
            rng = random.Random(hashlib.sha256(seed).digest())
            raw = [rng.gauss(0.0, 1.0) for _ in range(size)]
            norm = math.sqrt(sum(x * x for x in raw)) or 1.0
            vectors.append(tuple(x / norm for x in raw))
        return EmbeddingResult(vectors=tuple(vectors), prompt_tokens=tokens)
