"""The embedded default backend: deterministic answers for demos and tests, no model needed.

``echo`` (chat) answers with the text of the last user message, streamed word by word. It honours ``n``,
``stop`` (the answer is cut before the first stop sequence), ``max_completion_tokens``/``max_tokens`` (cut at that
many tokens, then ``finish_reason: "length"``), ``logprobs``/``top_logprobs`` (every token certain: logprob 0),
``response_format`` (``json_object`` → ``{"echo": text}``; ``json_schema`` → an instance built from the schema)
and a forced tool call (``tool_choice`` naming a function, or ``"required"``: the first tool), whose arguments are
built from the function's parameter schema, string fields holding the echoed text.

Bounded: each choice is at most ``min(request bound, call.max_tokens, max_output_tokens)`` tokens, and no more than
``CHARS_PER_TOKEN`` characters per such token are ever built or tokenized, whatever the schema asks for (nested
``minItems`` are cut, not expanded). The parts of a schema echo reads are checked first: a malformed one is a
400 naming it (OpenAI's ``Invalid schema for ...`` error), never a 500.

``echo-embedding`` gives deterministic unit vectors (1536 dimensions, or ``dimensions``) seeded by the input.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from ..errors import InvalidRequestError
from ..tokens import Tokenizer, count_chat_prompt, default_tokenizer
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

__all__ = [
    "CHARS_PER_TOKEN",
    "MAX_OUTPUT_TOKENS",
    "MAX_SCHEMA_DEPTH",
    "MAX_SCHEMA_NODES",
    "EchoBackend",
]

_WORD_RE = re.compile(r"\s*\S+|\s+")
EMBEDDING_DIMENSIONS = 1536
_CREATED = 1_700_000_000

# Tokens one choice may hold when the request sets no bound, and the most it may hold whatever the bound (like a
# model's maximum output). ``EchoBackend(max_output_tokens=...)`` changes it per backend.
MAX_OUTPUT_TOKENS = 16_384
# Characters built (and tokenized) per token of the bound: an answer is built to at most ``bound * 16`` characters,
# then cut at ``bound`` tokens. Text averaging more than 16 characters a token (long runs of one character) can
# therefore end, with ``finish_reason: "length"``, before the bound.
CHARS_PER_TOKEN = 16
# A schema echo reads may nest at most this many subschemas deep, and hold at most this many subschemas, property,
# ``required`` and ``type`` names in all; beyond that it is refused (400).
MAX_SCHEMA_DEPTH = 32
MAX_SCHEMA_NODES = 10_000

_TYPES = ("array", "boolean", "integer", "null", "number", "object", "string")
_LARGEST = 1e308  # bounds on minimum/maximum: any finite float, and no integer a float cannot hold
_CONTEXT_CHARS = 64  # a property name longer than this is shortened in an error message


class _SchemaError(ValueError):
    """A part of a JSON schema that echo reads is malformed; ``context`` is the path to it, as OpenAI prints it."""

    def __init__(self, context: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.context = context
        self.message = message

    def describe(self) -> str:
        """``In context=('properties', 'tags'), 'minItems' must be a non-negative integer.``"""
        shown = tuple(p if isinstance(p, int) else _shorten(p) for p in self.context)
        return f"In context={shown!r}, {self.message}"


def _shorten(text: str) -> str:
    return text if len(text) <= _CONTEXT_CHARS else text[: _CONTEXT_CHARS - 3] + "..."


def _json_literal(value: Any) -> str | None:
    """``value`` as JSON text, or ``None`` if it is not a JSON value (NaN, infinity, a non-JSON object)."""
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError, RecursionError):
        return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and -_LARGEST <= value <= _LARGEST


def _check_schema(schema: Any) -> dict[int, str]:
    """Check every part of ``schema`` that echo reads, without recursion; raise :class:`_SchemaError` at the first
    malformed one. Returns the JSON text of each subschema's ``const`` (or first ``enum`` value), by ``id``.

    Read, and so checked: ``type`` (a JSON type name or an array of them), ``const`` (a JSON value), ``enum`` (an
    array), ``anyOf``/``oneOf`` (non-empty arrays of schemas), ``properties`` (an object of schemas), ``required``
    (an array of strings), ``items`` (a schema), ``minItems`` (a non-negative integer), ``minimum``/``maximum``
    (finite numbers). A schema is an object or a boolean; at most ``MAX_SCHEMA_DEPTH`` deep and
    ``MAX_SCHEMA_NODES`` subschemas, property names, ``required`` names and ``type`` names in all.
    """
    literals: dict[int, str] = {}
    stack: list[tuple[Any, tuple[str | int, ...], int]] = [(schema, (), 0)]
    nodes = 1

    def spend(context: tuple[str | int, ...], more: int) -> None:
        nonlocal nodes
        nodes += more
        if nodes > MAX_SCHEMA_NODES:
            raise _SchemaError(context, f"the schema holds more than {MAX_SCHEMA_NODES} subschemas and names.")

    while stack:
        node, context, depth = stack.pop()
        if isinstance(node, bool):
            continue
        if not isinstance(node, dict):
            raise _SchemaError(context, "a schema must be an object or a boolean.")
        if depth > MAX_SCHEMA_DEPTH:
            raise _SchemaError(context, f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels.")
        kind = node.get("type")
        if isinstance(kind, list):
            spend(context, len(kind))
        if kind is not None and not (
            kind in _TYPES
            if isinstance(kind, str)
            else isinstance(kind, list) and kind and all(isinstance(k, str) and k in _TYPES for k in kind)
        ):
            raise _SchemaError(context, f"'type' must be one of {', '.join(map(repr, _TYPES))}, or an array of them.")
        if "const" in node:
            literal = _json_literal(node["const"])
            if literal is None:
                raise _SchemaError(context, "'const' must be a JSON value.")
            literals[id(node)] = literal
        if "enum" in node:
            values = node["enum"]
            if not isinstance(values, list):
                raise _SchemaError(context, "'enum' must be an array.")
            if values and "const" not in node:
                literal = _json_literal(values[0])
                if literal is None:
                    raise _SchemaError(context, "'enum' values must be JSON values.")
                literals[id(node)] = literal
        for union in ("anyOf", "oneOf"):
            if union in node:
                members = node[union]
                if not isinstance(members, list) or not members:
                    raise _SchemaError(context, f"'{union}' must be a non-empty array of schemas.")
                spend(context, len(members))
                stack.extend((member, (*context, union, i), depth + 1) for i, member in enumerate(members))
        if "properties" in node:
            props = node["properties"]
            if not isinstance(props, dict):
                raise _SchemaError(context, "'properties' must be an object.")
            spend(context, len(props))
            stack.extend((sub, (*context, "properties", name), depth + 1) for name, sub in props.items())
        if "required" in node:
            required = node["required"]
            if not isinstance(required, list):
                raise _SchemaError(context, "'required' must be an array of strings.")
            spend(context, len(required))
            if not all(isinstance(name, str) for name in required):
                raise _SchemaError(context, "'required' must be an array of strings.")
        if "items" in node:
            spend(context, 1)
            stack.append((node["items"], (*context, "items"), depth + 1))
        if "minItems" in node:
            count = node["minItems"]
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise _SchemaError(context, "'minItems' must be a non-negative integer.")
        for bound in ("minimum", "maximum"):
            if bound in node and not _is_number(node[bound]):
                raise _SchemaError(context, f"'{bound}' must be a finite number.")
    return literals


class _Instance:
    """Renders the JSON text of an instance of a checked schema, building at most about ``room`` characters.

    ``render(schema, room)`` returns the whole text when it fits in ``room`` characters, else its first
    ``room + 1`` characters (callers see it did not fit). An array of ``minItems`` copies renders its item once and
    repeats only as many copies as fit; recursion is bounded by the checked depth.
    """

    __slots__ = ("literals", "text")

    def __init__(self, text: str, literals: dict[int, str]) -> None:
        self.text = text  # the echoed text as a JSON string (possibly only its opening, see _json_text)
        self.literals = literals

    def render(self, schema: Any, room: int) -> str:
        if not isinstance(schema, dict):
            out = self.text
        elif (literal := self.literals.get(id(schema))) is not None:
            out = literal
        else:
            for union in ("anyOf", "oneOf"):
                members = schema.get(union)
                if members:
                    return self.render(members[0], room)
            kind = schema.get("type")
            if isinstance(kind, list):
                kind = next((k for k in kind if k != "null"), "null")
            if kind == "object" or (kind is None and "properties" in schema):
                out = self._object(schema, room)
            elif kind == "array":
                out = self._array(schema, room)
            elif kind == "integer" or kind == "number":
                out = json.dumps(_number(schema, integer=kind == "integer"))
            elif kind == "boolean":
                out = "false"
            elif kind == "null":
                out = "null"
            else:
                out = self.text
        return out if len(out) <= room else out[: room + 1]

    def _object(self, schema: dict[str, Any], room: int) -> str:
        props = schema.get("properties") or {}
        parts = ["{"]
        used = 1
        for i, name in enumerate(dict.fromkeys(schema.get("required") or props)):
            key = (", " if i else "") + json.dumps(name) + ": "
            parts.append(key)
            used += len(key)
            if used > room:
                break
            value = self.render(props.get(name, True), room - used)
            parts.append(value)
            used += len(value)
            if used > room:
                break
        else:
            parts.append("}")
        return "".join(parts)

    def _array(self, schema: dict[str, Any], room: int) -> str:
        count = schema.get("minItems", 0)
        if not count:
            return "[]"
        item = self.render(schema.get("items", True), room - 1)
        if len(item) > room - 1:
            return "[" + item
        copies = min(count, (room + 1) // (len(item) + 2) + 1)  # enough to pass ``room`` if not all
        return "[" + ", ".join([item] * copies) + ("]" if copies == count else "")


def _number(schema: dict[str, Any], *, integer: bool) -> int | float:
    """The smallest value ``minimum`` allows, else 0 unless ``maximum`` is below it."""
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None:
        return math.ceil(low) if integer else float(low)
    if high is not None and high < 0:
        return math.floor(high) if integer else float(high)
    return 0 if integer else 0.0


def _json_text(text: str, room: int) -> str:
    """``json.dumps(text)``; when that cannot fit in ``room`` characters, only an opening of it longer than ``room``
    (so a huge message is never escaped whole)."""
    if len(text) <= room:
        return json.dumps(text)
    return json.dumps(text[:room])[:-1]  # escaping only lengthens: this opening is longer than ``room`` already


@dataclass(slots=True)  # private and short-lived: a mutable dataclass is built several times faster than a frozen one
class _Reply:
    """One choice's answer, the same for every choice of a request: built once, shared by all ``n``."""

    finish: Literal["stop", "length", "tool_calls"]
    tokens: int  # completion tokens of one choice
    content: str | None = None
    content_tokens: Sequence[int] = ()  # the ids of ``content``, when logprobs were asked for
    tool: tuple[str, str] | None = None  # (name, arguments)


class EchoBackend:
    """Deterministic chat (``echo``) and embeddings (``echo-embedding``) with real, offline token counts.

    ``max_output_tokens`` caps every choice, whatever the request's bound (:data:`MAX_OUTPUT_TOKENS`).
    """

    def __init__(
        self,
        *,
        tokenizer: Tokenizer | None = None,
        chat_models: Sequence[str] = ("echo",),
        embedding_models: Sequence[str] = ("echo-embedding",),
        max_output_tokens: int = MAX_OUTPUT_TOKENS,
    ) -> None:
        if max_output_tokens < 1:
            raise ValueError("max_output_tokens must be at least 1")
        self.tokenizer = tokenizer or default_tokenizer()
        self.max_output_tokens = max_output_tokens
        self._models = tuple(
            ModelInfo(id=m, owned_by="ozwell", created=_CREATED, kind="chat") for m in chat_models
        ) + tuple(ModelInfo(id=m, owned_by="ozwell", created=_CREATED, kind="embedding") for m in embedding_models)

    async def list_models(self) -> Sequence[ModelInfo]:
        return self._models

    # -- chat -------------------------------------------------------------------------------------------------

    def _cap(self, request: ChatCompletionRequest, call: Call) -> int:
        """Tokens one choice may hold: the least of the request's bound, the call's and ``max_output_tokens``."""
        cap = self.max_output_tokens
        for bound in (request.effective_max_tokens, call.max_tokens):
            if bound is not None and bound < cap:
                cap = bound
        return cap

    def _forced_tool(self, request: ChatCompletionRequest) -> tuple[int, str, dict[str, Any]] | None:
        """(index in ``tools``, name, parameters) of the function echo must call, if any."""
        tools = request.tools
        choice = request.tool_choice
        if not tools:
            return None
        functions: dict[str, tuple[int, dict[str, Any]]] = {}
        for index, tool in enumerate(tools):
            function = getattr(tool, "function", None)
            if function is not None:
                functions[function.name] = (index, function.parameters or {})
        if isinstance(choice, str):
            if choice == "required" and functions:
                first = next(iter(functions))
                return functions[first][0], first, functions[first][1]
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
            return functions[name][0], name, functions[name][1]
        return None

    def _reply(self, request: ChatCompletionRequest, call: Call) -> _Reply:
        """Check the request's schemas, then build the answer within the cap (see the module docstring)."""
        cap = self._cap(request, call)
        room = cap * CHARS_PER_TOKEN
        fmt = request.response_format
        kind = getattr(fmt, "type", None)
        schema: Any = None
        literals: dict[int, str] = {}
        if kind == "json_schema":
            spec = getattr(fmt, "json_schema", None)
            schema = getattr(spec, "schema_", None)
            if schema is None:
                schema = True  # no schema: any JSON value (echo sends the text as a JSON string)
            try:
                literals = _check_schema(schema)
            except _SchemaError as exc:
                raise InvalidRequestError(
                    f"Invalid schema for response_format '{_shorten(str(getattr(spec, 'name', '')))}': "
                    f"{exc.describe()}",
                    param="response_format",
                    code="invalid_json_schema",
                ) from None
        forced = self._forced_tool(request)
        text = ""
        for message in reversed(request.messages):
            if message.role == "user":
                text = message_text(message)
                break

        if forced is not None:
            index, name, parameters = forced
            try:
                tool_literals = _check_schema(parameters)
            except _SchemaError as exc:
                raise InvalidRequestError(
                    f"Invalid schema for function '{_shorten(name)}': {exc.describe()}",
                    param=f"tools[{index}].function.parameters",
                    code="invalid_function_parameters",
                ) from None
            built = _Instance(_json_text(text, room), tool_literals).render(parameters or {"type": "object"}, room)
            arguments, complete = built[:room], len(built) <= room
            name_tokens = self.tokenizer.count(name)
            tokens = self.tokenizer.encode(arguments)
            room_tokens = max(cap - name_tokens, 0)
            if len(tokens) > room_tokens:
                tokens = tokens[:room_tokens]
                arguments = self.tokenizer.decode(tokens)
                complete = False
            finish: Literal["stop", "length", "tool_calls"] = (
                "length" if not complete else "tool_calls" if request.tool_choice == "required" else "stop"
            )
            return _Reply(finish=finish, tokens=name_tokens + len(tokens), tool=(name, arguments))

        if kind == "json_object":
            built = '{"echo": ' + _json_text(text, room) + "}"
        elif kind == "json_schema":
            built = _Instance(_json_text(text, room), literals).render(schema, room)
        else:
            built = text
        answer, complete = built[:room], len(built) <= room
        finish = "stop" if complete else "length"
        if request.stop:
            cut = min((i for i in (answer.find(s) for s in request.stop_sequences if s) if i >= 0), default=-1)
            if cut >= 0:
                answer = answer[:cut]
                finish = "stop"
        if not request.logprobs:  # the ids are not needed: count (the prompt's count, when the answer is its text)
            count = self.tokenizer.count(answer)
            if count <= cap:
                return _Reply(finish=finish, tokens=count, content=answer)
        tokens = self.tokenizer.encode(answer)
        if len(tokens) > cap:
            tokens = tokens[:cap]
            answer = self.tokenizer.decode(tokens)
            finish = "length"
        return _Reply(finish=finish, tokens=len(tokens), content=answer, content_tokens=tokens)

    def _logprobs(self, tokens: Sequence[int], top: int) -> dict[str, Any]:
        content = []
        for token in tokens:
            raw = self.tokenizer.token_bytes(token)
            text = raw.decode("utf-8", errors="replace")
            entry = {"token": text, "logprob": 0.0, "bytes": list(raw)}
            content.append({**entry, "top_logprobs": [entry] if top else []})
        return {"content": content, "refusal": None}

    @staticmethod
    def _tool_call(reply: _Reply, choice: int, seed: bytes) -> ToolCall:
        assert reply.tool is not None
        digest = hashlib.sha256(b"%d:" % choice + seed).hexdigest()[:24]
        return ToolCall(id=f"call_{digest}", name=reply.tool[0], arguments=reply.tool[1])

    @staticmethod
    def _seed(reply: _Reply) -> bytes:
        """What tool call ids are derived from (hashed once, however many choices)."""
        name, arguments = reply.tool or ("", "")
        return hashlib.sha256(f"{name}:{arguments}".encode()).digest()

    async def complete_chat(self, request: ChatCompletionRequest, ctx: Call) -> ChatResult:
        prompt = count_chat_prompt(self.tokenizer, request)
        reply = self._reply(request, ctx)
        count = request.choice_count
        if reply.tool is not None:
            seed = self._seed(reply)
            choices = tuple(
                ChatChoice(
                    index=index,
                    message=AssistantMessage(content=None, tool_calls=(self._tool_call(reply, index, seed),)),
                    finish_reason=reply.finish,
                )
                for index in range(count)
            )
        else:
            message = AssistantMessage(content=reply.content)
            logprobs = self._logprobs(reply.content_tokens, request.top_logprobs or 0) if request.logprobs else None
            if count == 1:
                choices = (ChatChoice(0, message, reply.finish, logprobs),)
            else:
                choices = tuple(
                    ChatChoice(index=index, message=message, finish_reason=reply.finish, logprobs=logprobs)
                    for index in range(count)
                )
        return ChatResult(
            choices=choices, usage=Usage(prompt, reply.tokens * count), system_fingerprint="fp_ozwell_echo"
        )

    async def stream_chat(self, request: ChatCompletionRequest, ctx: Call) -> AsyncIterator[ChatChunk]:
        prompt = count_chat_prompt(self.tokenizer, request)
        reply = self._reply(request, ctx)  # before the first chunk: a bad schema is a 400, not a broken stream
        count = request.choice_count
        if reply.tool is not None:
            seed = self._seed(reply)
            pieces = _WORD_RE.findall(reply.tool[1])
            for index in range(count):
                call = self._tool_call(reply, index, seed)
                yield ChatChunk(
                    index=index,
                    role="assistant",
                    tool_calls=(ToolCallDelta(index=0, id=call.id, name=call.name, arguments=""),),
                )
                for piece in pieces:
                    yield ChatChunk(index=index, tool_calls=(ToolCallDelta(index=0, arguments=piece),))
                yield ChatChunk(index=index, finish_reason=reply.finish)
        else:
            pieces = _WORD_RE.findall(reply.content or "")
            logprobs: list[dict[str, Any] | None] = [None] * len(pieces)
            if request.logprobs:
                top, left = request.top_logprobs or 0, reply.tokens  # never more entries than tokens
                for i, piece in enumerate(pieces):
                    piece_tokens = self.tokenizer.encode(piece)[:left]
                    left -= len(piece_tokens)
                    logprobs[i] = self._logprobs(piece_tokens, top)
            for index in range(count):
                yield ChatChunk(index=index, role="assistant", content="")
                for piece, piece_logprobs in zip(pieces, logprobs, strict=True):
                    yield ChatChunk(index=index, content=piece, logprobs=piece_logprobs)
                yield ChatChunk(index=index, finish_reason=reply.finish)
        yield ChatChunk(usage=Usage(prompt, reply.tokens * count))

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
