"""Fold a chat chunk stream into one :class:`~ozwell_asgi.types.ChatResult` (for ``stream: false`` answered by a
backend that only streams).

Nothing a chunk carries is dropped: per choice, ``content``, ``refusal`` and ``reasoning_content`` are concatenated;
tool calls are assembled from their deltas by index (``id``, ``type`` and ``name`` from the first delta that has
them, ``arguments`` concatenated); ``logprobs`` lists (``content``, ``refusal``) are concatenated; the last
``finish_reason`` wins. ``usage`` is the last one sent, ``model`` and ``system_fingerprint`` the first. Delta fields
we do not model (``extra``) are merged as streamed pieces: strings and lists concatenated, mappings merged key by
key, anything else replaced by its later value.

Memory is that of the completion itself: pieces are kept in lists and joined once, at the end.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, cast

import anyio

from ..types import AssistantMessage, ChatChoice, ChatChunk, ChatResult, ToolCall, ToolCallDelta, Usage

__all__ = ["collect_chat"]

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if value is None:
            continue
        old = into.get(key)
        if isinstance(old, str) and isinstance(value, str):
            into[key] = old + value
        elif isinstance(old, list) and isinstance(value, list):
            old.extend(value)
        elif isinstance(old, dict) and isinstance(value, Mapping):
            _merge(old, value)
        elif isinstance(value, Mapping):
            fresh: dict[str, Any] = {}
            _merge(fresh, value)
            into[key] = fresh
        elif isinstance(value, list):
            into[key] = list(value)
        else:
            into[key] = value


class _ToolCallParts:
    __slots__ = ("arguments", "id", "name", "type")

    def __init__(self) -> None:
        self.id: str | None = None
        self.name: str | None = None
        self.type: Literal["function", "custom"] | None = None
        self.arguments: list[str] = []

    def add(self, delta: ToolCallDelta) -> None:
        if delta.id and not self.id:
            self.id = delta.id
        if delta.name and not self.name:
            self.name = delta.name
        if delta.type is not None and self.type is None:
            self.type = delta.type
        if delta.arguments:
            self.arguments.append(delta.arguments)

    def build(self) -> ToolCall:
        return ToolCall(
            id=self.id or "", name=self.name or "", arguments="".join(self.arguments), type=self.type or "function"
        )


class _ChoiceParts:
    __slots__ = ("content", "extra", "finish_reason", "logprobs", "reasoning", "refusal", "tool_calls")

    def __init__(self) -> None:
        self.content: list[str] | None = None
        self.refusal: list[str] | None = None
        self.reasoning: list[str] | None = None
        self.tool_calls: dict[int, _ToolCallParts] = {}
        self.logprobs: dict[str, Any] | None = None
        self.extra: dict[str, Any] | None = None
        self.finish_reason: str | None = None

    def add(self, chunk: ChatChunk) -> None:
        if chunk.content is not None:
            if self.content is None:
                self.content = []
            self.content.append(chunk.content)
        if chunk.refusal is not None:
            if self.refusal is None:
                self.refusal = []
            self.refusal.append(chunk.refusal)
        if chunk.reasoning_content is not None:
            if self.reasoning is None:
                self.reasoning = []
            self.reasoning.append(chunk.reasoning_content)
        for delta in chunk.tool_calls:
            parts = self.tool_calls.get(delta.index)
            if parts is None:
                parts = self.tool_calls[delta.index] = _ToolCallParts()
            parts.add(delta)
        if chunk.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = {}
            _merge(self.logprobs, chunk.logprobs)
        if chunk.extra:
            if self.extra is None:
                self.extra = {}
            _merge(self.extra, chunk.extra)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason

    def build(self, index: int) -> ChatChoice:
        calls = tuple(self.tool_calls[i].build() for i in sorted(self.tool_calls))
        content = "".join(self.content) if self.content is not None else None
        if calls and not content:
            content = None  # OpenAI's non-stream answer has ``content: null`` beside tool calls
        elif content is None and not calls and self.refusal is None:
            content = ""  # an empty text answer
        message = AssistantMessage(
            content=content,
            tool_calls=calls,
            refusal="".join(self.refusal) if self.refusal is not None else None,
            reasoning_content="".join(self.reasoning) if self.reasoning is not None else None,
            extra=self.extra,
        )
        # A stream that ended without a finish_reason stopped on its own; an upstream's reason is kept as sent.
        finish = cast(FinishReason, self.finish_reason or ("tool_calls" if calls else "stop"))
        logprobs = self.logprobs
        if logprobs is not None:  # both lists are in OpenAI's shape, null when none came
            logprobs = {"content": None, "refusal": None, **logprobs}
        return ChatChoice(index=index, message=message, finish_reason=finish, logprobs=logprobs)


def _carries_choice(chunk: ChatChunk) -> bool:
    return (
        chunk.role is not None
        or chunk.content is not None
        or bool(chunk.tool_calls)
        or chunk.refusal is not None
        or chunk.finish_reason is not None
        or chunk.logprobs is not None
        or chunk.reasoning_content is not None
        or bool(chunk.extra)
    )


async def collect_chat(stream: AsyncIterator[ChatChunk]) -> ChatResult:
    """The whole completion ``stream`` produces, choices ordered by index (one empty choice if it sent none).
    The stream is closed (``aclose``) when this returns or raises, cancellation included."""
    choices: dict[int, _ChoiceParts] = {}
    usage: Usage | None = None
    model: str | None = None
    fingerprint: str | None = None
    ended = False
    try:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if model is None:
                model = chunk.model
            if fingerprint is None:
                fingerprint = chunk.system_fingerprint
            if _carries_choice(chunk):
                parts = choices.get(chunk.index)
                if parts is None:
                    parts = choices[chunk.index] = _ChoiceParts()
                parts.add(chunk)
        ended = True
    finally:
        close = None if ended else getattr(stream, "aclose", None)  # an ended stream is closed already
        if close is not None:
            with anyio.CancelScope(shield=True):
                await close()
    if not choices:
        choices[0] = _ChoiceParts()  # a stream with no choice chunk answers one empty choice
    return ChatResult(
        choices=tuple(choices[i].build(i) for i in sorted(choices)),
        usage=usage,
        model=model,
        system_fingerprint=fingerprint,
    )
