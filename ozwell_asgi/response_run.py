"""One Response, built from the chat chunks of its backend call, with OpenAI's typed stream events on the way.

:class:`ResponseBuilder` turns chunks (:class:`~ozwell_asgi.types.ChatChunk`) into output items: the assistant's
text and refusal become a ``message`` item (``output_text`` and ``refusal`` parts), each tool call a
``function_call`` item, reasoning text a ``reasoning`` item. With ``emit`` it also gives the SSE frames of the
whole typed sequence, each ``event: <type>`` with an increasing ``sequence_number``:

    response.created, response.in_progress,
    per item: response.output_item.added, [response.content_part.added, <delta>..., <done>,
              response.content_part.done] | [response.function_call_arguments.delta..., .done],
              response.output_item.done,
    then response.completed | response.incomplete (``finish_reason: "length"``: max_output_tokens) |
         response.failed followed by an ``error`` event.

Items are closed in order: a chunk of another kind closes the item (or content part) before it, so at most one
item is open. The work per chunk is proportional to the chunk; nothing is re-rendered until the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any

from pydantic_core import to_json

from .errors import OzwellError, as_ozwell_error
from .tokens import Tokenizer, count_tool_call
from .turns import new_id
from .types import ChatChunk, ChatResult, ToolCallDelta, Usage

__all__ = ["ResponseBuilder", "named_event", "response_usage", "result_chunks"]

JSON = dict[str, Any]


def named_event(kind: str, payload: Mapping[str, Any]) -> bytes:
    """One SSE message with an ``event:`` name: ``event: <kind>\\ndata: <json>\\n\\n``."""
    return b"event: " + kind.encode() + b"\ndata: " + to_json(payload) + b"\n\n"


def response_usage(usage: Usage) -> JSON:
    """OpenAI's ``ResponseUsage`` from a chat usage (cached and reasoning tokens passed through when known)."""
    prompt_details = usage.prompt_tokens_details or {}
    completion_details = usage.completion_tokens_details or {}
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": int(prompt_details.get("cached_tokens") or 0),
            "cache_write_tokens": int(prompt_details.get("cache_write_tokens") or 0),
        },
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": int(completion_details.get("reasoning_tokens") or 0)},
        "total_tokens": usage.total_tokens,
    }


def result_chunks(result: ChatResult) -> Iterator[ChatChunk]:
    """A whole chat result (``complete_chat``) as the chunks of its first choice, so one builder serves both."""
    if result.choices:
        choice = result.choices[0]
        message = choice.message
        if message.reasoning_content:
            yield ChatChunk(reasoning_content=message.reasoning_content, model=result.model)
        if message.content:
            yield ChatChunk(content=message.content, model=result.model)
        if message.refusal:
            yield ChatChunk(refusal=message.refusal)
        for i, call in enumerate(message.tool_calls):
            yield ChatChunk(tool_calls=(ToolCallDelta(index=i, id=call.id, name=call.name, arguments=call.arguments),))
        yield ChatChunk(finish_reason=choice.finish_reason)
    if result.usage is not None:
        yield ChatChunk(usage=result.usage)


class _Open:
    """The item being built: its dict (in the response's output), its index, and the open part's pieces."""

    __slots__ = ("index", "item", "kind", "part", "pieces", "tool_index")

    def __init__(self, item: JSON, index: int, tool_index: int | None = None) -> None:
        self.item = item
        self.index = index
        self.kind: str | None = None  # the open part: "output_text", "refusal", "reasoning_text", or None
        self.part: JSON | None = None
        self.pieces: list[str] = []
        self.tool_index = tool_index


class ResponseBuilder:
    """Builds ``response`` (the Response object, output empty and status ``in_progress``) from chat chunks.

    ``prompt_tokens`` is the prompt's count, used when the backend reports no usage; output tokens are then counted
    as the app counts a chat stream. With ``emit`` false no frame is built (a background or whole-answer run).
    """

    def __init__(self, response: JSON, tokenizer: Tokenizer, prompt_tokens: int, *, emit: bool = True) -> None:
        self.response = response
        self.tokenizer = tokenizer
        self.prompt_tokens = prompt_tokens
        self.emit = emit
        self.sequence = 0
        self.counted = 0
        self.usage: Usage | None = None
        self.finish_reason: str | None = None
        self._open: _Open | None = None
        self._calls: dict[int, _Open] = {}  # tool call index -> its item (arguments may come late)

    # -- frames -------------------------------------------------------------------------------------------------

    def _event(self, frames: list[bytes], kind: str, payload: JSON) -> None:
        """Append the frame of one event (serialised at once: later changes to the objects it shows are not in
        it)."""
        if self.emit:
            frames.append(named_event(kind, {"type": kind, **payload, "sequence_number": self.sequence}))
        self.sequence += 1

    def _lifecycle(self, frames: list[bytes], kind: str) -> None:
        self._event(frames, kind, {"response": self.response})

    def start(self) -> list[bytes]:
        """``response.created`` and ``response.in_progress``."""
        frames: list[bytes] = []
        self._lifecycle(frames, "response.created")
        self._lifecycle(frames, "response.in_progress")
        return frames

    # -- items --------------------------------------------------------------------------------------------------

    def _add_item(self, frames: list[bytes], item: JSON, tool_index: int | None = None) -> _Open:
        self._close(frames)
        output: list[JSON] = self.response["output"]
        opened = _Open(item, len(output), tool_index)
        output.append(item)
        self._event(frames, "response.output_item.added", {"output_index": opened.index, "item": item})
        self._open = opened
        return opened

    def _open_part(self, frames: list[bytes], kind: str) -> _Open:
        """The open item with an open part of ``kind`` (a message's text or refusal, a reasoning item's text)."""
        opened = self._open
        wanted_item = "reasoning" if kind == "reasoning_text" else "message"
        if opened is None or opened.item["type"] != wanted_item:
            if wanted_item == "message":
                item = {
                    "id": new_id("msg"),
                    "type": "message",
                    "status": "in_progress",
                    "content": [],
                    "role": "assistant",
                }
            else:
                item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": []}
            opened = self._add_item(frames, item)
        if opened.kind != kind:
            self._close_part(frames, opened)
            part: JSON = {"type": kind, "refusal": ""} if kind == "refusal" else {"type": kind, "text": ""}
            if kind == "output_text":
                part["annotations"] = []
                part["logprobs"] = []
            opened.kind, opened.part, opened.pieces = kind, part, []
            opened.item["content"].append(part)
            self._event(
                frames,
                "response.content_part.added",
                {
                    "item_id": opened.item["id"],
                    "output_index": opened.index,
                    "content_index": len(opened.item["content"]) - 1,
                    "part": part,
                },
            )
        return opened

    def _delta(self, frames: list[bytes], kind: str, text: str) -> None:
        opened = self._open_part(frames, kind)
        opened.pieces.append(text)
        name = {
            "output_text": "response.output_text.delta",
            "refusal": "response.refusal.delta",
            "reasoning_text": "response.reasoning_text.delta",
        }[kind]
        payload: JSON = {
            "item_id": opened.item["id"],
            "output_index": opened.index,
            "content_index": len(opened.item["content"]) - 1,
            "delta": text,
        }
        if kind == "output_text":
            payload["logprobs"] = []
        self._event(frames, name, payload)

    def _close_part(self, frames: list[bytes], opened: _Open) -> None:
        part, kind = opened.part, opened.kind
        if part is None or kind is None:
            return
        text = "".join(opened.pieces)
        key = "refusal" if kind == "refusal" else "text"
        part[key] = text
        where = {
            "item_id": opened.item["id"],
            "output_index": opened.index,
            "content_index": len(opened.item["content"]) - 1,
        }
        done: JSON = {**where, key: text}
        if kind == "output_text":
            done["logprobs"] = []
        name = {"output_text": "response.output_text.done", "refusal": "response.refusal.done"}.get(
            kind, "response.reasoning_text.done"
        )
        self._event(frames, name, done)
        self._event(frames, "response.content_part.done", {**where, "part": part})
        opened.kind, opened.part, opened.pieces = None, None, []

    def _close(self, frames: list[bytes], status: str = "completed") -> None:
        opened = self._open
        if opened is None:
            return
        self._open = None
        item = opened.item
        if item["type"] == "function_call":
            arguments = "".join(opened.pieces)
            item["arguments"] = arguments
            self._event(
                frames,
                "response.function_call_arguments.done",
                {"item_id": item["id"], "output_index": opened.index, "name": item["name"], "arguments": arguments},
            )
        else:
            self._close_part(frames, opened)
        if item["type"] != "reasoning":
            item["status"] = status
        self._event(frames, "response.output_item.done", {"output_index": opened.index, "item": item})

    def _tool_call(self, frames: list[bytes], delta: ToolCallDelta) -> None:
        opened = self._calls.get(delta.index)
        if opened is None:
            item = {
                "id": new_id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "arguments": "",
                "call_id": delta.id or new_id("call"),
                "name": delta.name or "",
            }
            opened = self._calls[delta.index] = self._add_item(frames, item, delta.index)
        elif delta.name and not opened.item["name"]:
            opened.item["name"] = delta.name
        if delta.arguments:
            if opened is not self._open:  # a late piece of a call already closed: kept, not re-announced
                opened.item["arguments"] += delta.arguments
                return
            opened.pieces.append(delta.arguments)
            self._event(
                frames,
                "response.function_call_arguments.delta",
                {"item_id": opened.item["id"], "output_index": opened.index, "delta": delta.arguments},
            )

    # -- chunks -------------------------------------------------------------------------------------------------

    def feed(self, chunk: ChatChunk) -> list[bytes]:
        """The frames for one chunk (empty without ``emit``). Chunks of choices other than the first are ignored:
        a response has one answer."""
        frames: list[bytes] = []
        if chunk.model is not None and chunk.model != self.response["model"]:
            self.response["model"] = chunk.model
        if chunk.index != 0:
            return frames
        if chunk.usage is not None:
            self.usage = chunk.usage
        tokenizer = self.tokenizer
        if chunk.reasoning_content:
            self.counted += tokenizer.count(chunk.reasoning_content)
            self._delta(frames, "reasoning_text", chunk.reasoning_content)
        if chunk.content:
            self.counted += tokenizer.count(chunk.content)
            self._delta(frames, "output_text", chunk.content)
        if chunk.refusal:
            self.counted += tokenizer.count(chunk.refusal)
            self._delta(frames, "refusal", chunk.refusal)
        for call in chunk.tool_calls:
            self.counted += count_tool_call(tokenizer, call.name, call.arguments)
            self._tool_call(frames, call)
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
        return frames

    @property
    def spent(self) -> Usage:
        """What the call has used so far: the backend's usage, else the prompt and the output counted."""
        return self.usage or Usage(self.prompt_tokens, self.counted)

    def _settle_response(self, status: str) -> None:
        response = self.response
        response["status"] = status
        response["usage"] = response_usage(self.spent)
        if status in ("completed", "incomplete"):
            response["completed_at"] = int(time.time())

    def finish(self) -> list[bytes]:
        """Close every item and end the response: ``completed``, or ``incomplete`` when the answer was cut
        (``max_output_tokens``, a content filter); the final frame is ``response.completed`` or
        ``response.incomplete``."""
        frames: list[bytes] = []
        reason = {"length": "max_output_tokens", "content_filter": "content_filter"}.get(self.finish_reason or "")
        if not self.response["output"]:  # an empty answer is still a message, with empty text
            self._open_part(frames, "output_text")
        self._close(frames, "incomplete" if reason else "completed")
        if reason:
            self.response["incomplete_details"] = {"reason": reason}
            self._settle_response("incomplete")
            self._lifecycle(frames, "response.incomplete")
        else:
            self._settle_response("completed")
            self._lifecycle(frames, "response.completed")
        return frames

    def fail(self, exc: BaseException) -> list[bytes]:
        """End the response as ``failed`` with ``exc`` (any exception: unexpected ones say nothing of themselves):
        ``response.failed``, then an ``error`` event."""
        frames: list[bytes] = []
        self._close(frames, "incomplete")
        error = as_ozwell_error(exc)
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        self.response["error"] = {"code": code, "message": error.message}
        self._settle_response("failed")
        self._lifecycle(frames, "response.failed")
        self._event(frames, "error", _error_event(error))
        return frames

    def cancel(self) -> None:
        """End the response as ``cancelled`` (a background run stopped): what was generated stays in its output."""
        self._close([], "incomplete")
        self._settle_response("cancelled")


def _error_event(error: OzwellError) -> JSON:
    return {"code": error.code, "message": error.message, "param": error.param}
