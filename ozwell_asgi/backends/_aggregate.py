"""Fold a chat chunk stream into one result: what the app answers to ``stream: false`` from a backend that only
streams."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, Literal, cast

from ..types import AssistantMessage, ChatChoice, ChatChunk, ChatResult, ToolCall, Usage

__all__ = ["collect_chat"]

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "function_call"]


class _Choice:
    __slots__ = ("calls", "content", "extra", "finish", "logprobs", "reasoning", "refusal")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] = []
        self.calls: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish = "stop"
        self.extra: dict[str, Any] = {}

    def add(self, chunk: ChatChunk) -> None:
        if chunk.content:
            self.content.append(chunk.content)
        if chunk.reasoning_content:
            self.reasoning.append(chunk.reasoning_content)
        if chunk.refusal:
            self.refusal.append(chunk.refusal)
        if chunk.extra:
            self.extra.update(chunk.extra)
        for delta in chunk.tool_calls:
            call = self.calls.setdefault(delta.index, {"id": "", "name": "", "arguments": [], "type": "function"})
            if delta.id:
                call["id"] = delta.id
            if delta.type:
                call["type"] = delta.type
            if delta.name:
                call["name"] += delta.name
            if delta.arguments:
                call["arguments"].append(delta.arguments)
        if chunk.logprobs:
            merged = self.logprobs if self.logprobs is not None else {}
            for key, value in chunk.logprobs.items():
                if isinstance(value, list):
                    merged.setdefault(key, []).extend(value)
            self.logprobs = merged
        if chunk.finish_reason is not None:
            self.finish = chunk.finish_reason

    def result(self, index: int) -> ChatChoice:
        calls = tuple(
            ToolCall(id=c["id"], name=c["name"], arguments="".join(c["arguments"]), type=c["type"])
            for _, c in sorted(self.calls.items())
        )
        message = AssistantMessage(
            content="".join(self.content) if self.content or not calls else None,
            tool_calls=calls,
            refusal="".join(self.refusal) if self.refusal else None,
            reasoning_content="".join(self.reasoning) if self.reasoning else None,
            extra=self.extra or None,
        )
        logprobs: dict[str, Any] | None = None
        if self.logprobs is not None:
            logprobs = {"content": None, "refusal": None, **self.logprobs}
        return ChatChoice(index, message, cast(FinishReason, self.finish), logprobs)


async def collect_chat(stream: AsyncIterator[ChatChunk]) -> ChatResult:
    """The whole completion a chunk stream makes: each choice's text, reasoning, refusal, tool calls (assembled from
    their deltas by index), logprobs and finish reason; the usage, model and system fingerprint it reported.
    The stream is closed when done or on error."""
    choices: dict[int, _Choice] = {}
    usage: Usage | None = None
    model: str | None = None
    fingerprint: str | None = None
    async with aclosing(stream) as chunks:  # type: ignore[type-var]
        async for chunk in chunks:
            if chunk.model is not None:
                model = chunk.model
            if chunk.system_fingerprint is not None:
                fingerprint = chunk.system_fingerprint
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.usage is not None and chunk.role is None and chunk.finish_reason is None and not chunk.content:
                continue
            choices.setdefault(chunk.index, _Choice()).add(chunk)
    if not choices:
        choices[0] = _Choice()
    return ChatResult(
        choices=tuple(choices[i].result(i) for i in sorted(choices)),
        usage=usage,
        model=model,
        system_fingerprint=fingerprint,
    )
