"""POST /chat/completions: auth → admit (before the body) → read and parse → model → reserve → backend → JSON or
SSE → settle."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
import anyio.to_thread
from pydantic_core import to_json
from starlette.requests import Request

from ..backends._aggregate import collect_chat
from ..context import Services, Settings
from ..errors import InvalidRequestError, OzwellError, as_ozwell_error, error_body
from ..meter import Meter, status_of
from ..protocols import ChatBackend
from ..responses import JSONResponse
from ..sse import DONE, PING, FirstChunk, SSEResponse, aclose_stream, event, first_chunk
from ..tokens import count_chat_prompt, count_tool_call, remember_prompt
from ..types import SCOPE_API, ChatChunk, ChatResult, Principal, ToolCall, Usage
from ..wire.chat import ChatCompletionRequest, parse_chat_request

__all__ = ["create_chat_completion"]

log = logging.getLogger("ozwell_asgi")


_PROMPT_DETAILS = {"cached_tokens": 0, "audio_tokens": 0}
_COMPLETION_DETAILS = {
    "reasoning_tokens": 0,
    "audio_tokens": 0,
    "accepted_prediction_tokens": 0,
    "rejected_prediction_tokens": 0,
}


def usage_dict(usage: Usage) -> dict[str, Any]:
    """OpenAI's ``CompletionUsage``; a backend's own details (cached, reasoning tokens...) are passed through."""
    prompt_details = usage.prompt_tokens_details
    completion_details = usage.completion_tokens_details
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": _PROMPT_DETAILS if prompt_details is None else dict(prompt_details),
        "completion_tokens_details": _COMPLETION_DETAILS if completion_details is None else dict(completion_details),
    }


def _tool_call_dict(call: ToolCall) -> dict[str, Any]:
    if call.type == "custom":
        return {"id": call.id, "type": "custom", "custom": {"name": call.name, "input": call.arguments}}
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def render_completion(result: ChatResult, completion_id: str, created: int, model: str, usage: Usage) -> dict[str, Any]:
    choices = []
    for choice in result.choices:
        answer = choice.message
        message: dict[str, Any] = {**answer.extra} if answer.extra else {}
        message["role"] = "assistant"
        message["content"] = answer.content
        message["refusal"] = answer.refusal
        message["annotations"] = []
        if answer.reasoning_content is not None:
            message["reasoning_content"] = answer.reasoning_content
        if answer.tool_calls:
            message["tool_calls"] = [_tool_call_dict(c) for c in answer.tool_calls]
        choices.append(
            {
                "index": choice.index,
                "message": message,
                "logprobs": choice.logprobs,
                "finish_reason": choice.finish_reason,
            }
        )
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": result.model or model,
        "choices": choices,
        "usage": usage_dict(usage),
        "service_tier": "default",
        "system_fingerprint": result.system_fingerprint or "fp_ozwell",
    }


def _delta(chunk: ChatChunk) -> dict[str, Any]:
    delta: dict[str, Any] = dict(chunk.extra) if chunk.extra else {}
    if chunk.role is not None:
        delta["role"] = chunk.role
        delta["content"] = chunk.content
        delta["refusal"] = chunk.refusal
    else:
        if chunk.content is not None:
            delta["content"] = chunk.content
        if chunk.refusal is not None:
            delta["refusal"] = chunk.refusal
    if chunk.reasoning_content is not None:
        delta["reasoning_content"] = chunk.reasoning_content
    if chunk.tool_calls:
        calls = []
        for call in chunk.tool_calls:
            item: dict[str, Any] = {"index": call.index}
            if call.id is not None:
                item["id"] = call.id
                item["type"] = call.type or "function"
            body: dict[str, Any] = {}
            if call.name is not None:
                body["name"] = call.name
            if call.arguments is not None:
                body["input" if call.type == "custom" else "arguments"] = call.arguments
            item["custom" if call.type == "custom" else "function"] = body
            calls.append(item)
        delta["tool_calls"] = calls
    return delta


async def create_chat_completion(services: Services, request: Request) -> Any:
    started = time.time()
    principal = await services.authenticate(request, SCOPE_API)
    meter = await services.meter(principal, request, "chat.completions")  # a spent key is refused before its body
    try:
        chat, prompt_estimate = await _read_request(services, principal, request)
        # The reservation bounds the generation: a request without max tokens is generated to the default reserve.
        bound = chat.effective_max_tokens
        if bound is None:
            bound = chat.max_completion_tokens = services.settings.default_completion_reserve
        await meter.reserve(prompt_estimate + bound * chat.choice_count)
    except BaseException as exc:
        await meter.settle(0, status=status_of(exc))
        raise
    headers = meter.headers
    backend: ChatBackend = services.chat  # type: ignore[assignment]  # the route exists only if it chats
    model = chat.model
    completion_id = f"chatcmpl-{random.getrandbits(128):032x}"  # unique, not secret
    created = int(started)

    call = services.call(request, principal, "chat.completions", bound)
    if not chat.stream:
        try:
            if services.completes is not None:
                result = await services.completes.complete_chat(chat, call)
            else:
                result = await collect_chat(backend.stream_chat(chat, call))
        except BaseException as exc:
            await meter.settle(0, status=status_of(exc), model=model)
            raise
        usage = result.usage or _count_usage(services, chat, result, prompt_estimate)
        await meter.settle(usage.total_tokens, shield=False, usage=usage, model=result.model or model)
        return JSONResponse(render_completion(result, completion_id, created, model, usage), headers=headers)

    stream = backend.stream_chat(chat, call)
    # Failures before the first chunk get a real HTTP status. A backend slow to send it (an upstream's first token)
    # gets the response started after ``stream_keepalive`` seconds, with ": ping" comments until it comes.
    try:
        first = await first_chunk(stream, services.settings.stream_keepalive)
    except BaseException as exc:
        await aclose_stream(stream)
        await meter.settle(0, status=status_of(exc), model=model)
        raise
    frames = _frames(services, chat, stream, first, meter, completion_id, created, prompt_estimate)
    return SSEResponse(frames, headers)


async def _read_request(
    services: Services, principal: Principal, request: Request
) -> tuple[ChatCompletionRequest, int]:
    """Read, parse and check the body, resolve the model and count the prompt: the work done only for a request
    that was admitted. Bodies over ``Settings.offload_parse_above`` are parsed and counted in a worker thread."""
    settings = services.settings
    body = await services.read_json(request)
    offload = len(body) > settings.offload_parse_above
    chat = await anyio.to_thread.run_sync(parse_chat_request, body) if offload else parse_chat_request(body)
    _check_combinations(chat)
    _check_caps(chat, settings)
    await services.find_model(principal, chat.model, "chat")
    if offload:
        estimate = await anyio.to_thread.run_sync(count_chat_prompt, services.tokenizer, chat)
        remember_prompt(chat, estimate)  # the thread's context is a copy: share the count with the backend here
    else:
        estimate = count_chat_prompt(services.tokenizer, chat)
    return chat, estimate


def _check_caps(chat: ChatCompletionRequest, settings: Settings) -> None:
    """The settings' caps on what one request may ask for (docs/rate-limits.md)."""
    messages = chat.messages
    if len(messages) > settings.max_messages:
        raise InvalidRequestError(
            f"Invalid 'messages': array too long. Expected an array with maximum length {settings.max_messages}, "
            f"but got an array with length {len(messages)} instead.",
            param="messages",
            code="invalid_value",
        )
    if chat.choice_count > settings.max_choices:
        raise InvalidRequestError(
            f"Invalid 'n': integer above maximum value. Expected a value <= {settings.max_choices}, "
            f"but got {chat.choice_count} instead.",
            param="n",
            code="invalid_value",
        )
    parts = 0
    for message in messages:
        content = message.__dict__.get("content")
        if isinstance(content, list):
            parts += len(content)
    if parts > settings.max_content_parts:
        raise InvalidRequestError(
            f"Too many content parts: this request has {parts}, the limit is {settings.max_content_parts} "
            "summed over all messages.",
            param="messages",
            code="invalid_value",
        )


def _check_combinations(chat: ChatCompletionRequest) -> None:
    """Rules across fields that OpenAI enforces and a schema cannot say."""
    if chat.stream_options is not None and not chat.stream:
        raise InvalidRequestError(
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
            code="invalid_value",
        )
    if chat.tool_choice is not None and not chat.tools:
        raise InvalidRequestError(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
            param="tool_choice",
            code="invalid_value",
        )
    if chat.top_logprobs is not None and not chat.logprobs:
        raise InvalidRequestError(
            "Using 'top_logprobs' requires 'logprobs' to be true.", param="top_logprobs", code="invalid_value"
        )


def _count_usage(services: Services, chat: ChatCompletionRequest, result: ChatResult, prompt: int) -> Usage:
    completion = 0
    for choice in result.choices:
        completion += services.tokenizer.count(choice.message.content or "")
        for call in choice.message.tool_calls:
            completion += count_tool_call(services.tokenizer, call.name, call.arguments)
    return Usage(prompt, completion)


async def _frames(
    services: Services,
    chat: ChatCompletionRequest,
    stream: AsyncIterator[ChatChunk],
    first: FirstChunk,
    meter: Meter,
    completion_id: str,
    created: int,
    prompt_estimate: int,
) -> AsyncGenerator[bytes, None]:
    include_usage = chat.include_usage
    prefix: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": chat.model,
        "service_tier": "default",
        "system_fingerprint": "fp_ozwell",
    }
    usage: Usage | None = None
    counted = 0
    try:
        if isinstance(first, asyncio.Future):
            interval = services.settings.stream_keepalive
            while not first.done():
                yield PING
                await asyncio.wait((first,), timeout=interval)
            chunk = first.result()
        else:
            chunk = first
        while chunk is not None:
            # What the backend says of the answer holds from its chunk on (an upstream's model, its fingerprint).
            if chunk.model is not None and chunk.model != prefix["model"]:
                prefix = {**prefix, "model": chunk.model}
            if chunk.system_fingerprint is not None and chunk.system_fingerprint != prefix["system_fingerprint"]:
                prefix = {**prefix, "system_fingerprint": chunk.system_fingerprint}
            if (
                chunk.usage is not None
                and chunk.content is None
                and chunk.reasoning_content is None
                and not chunk.tool_calls
                and chunk.finish_reason is None
            ):
                usage = chunk.usage
            else:
                if chunk.content:
                    counted += services.tokenizer.count(chunk.content)
                if chunk.reasoning_content:
                    counted += services.tokenizer.count(chunk.reasoning_content)
                for call in chunk.tool_calls:
                    counted += count_tool_call(services.tokenizer, call.name, call.arguments)
                payload: dict[str, Any] = {
                    **prefix,
                    "choices": [
                        {
                            "index": chunk.index,
                            "delta": _delta(chunk),
                            "logprobs": chunk.logprobs,
                            "finish_reason": chunk.finish_reason,
                        }
                    ],
                }
                if include_usage:
                    payload["usage"] = None
                yield event(to_json(payload))
            chunk = await anext(stream, None)
        final = usage or Usage(prompt_estimate, counted)
        if include_usage:
            yield event(to_json({**prefix, "choices": [], "usage": usage_dict(final)}))
        yield DONE
        await meter.settle(final.total_tokens, usage=final, model=prefix["model"])
    except Exception as exc:
        if not isinstance(exc, OzwellError):
            log.exception("backend failed mid-stream")
        await meter.settle(
            prompt_estimate + counted,
            usage=Usage(prompt_estimate, counted),
            model=prefix["model"],
            status=status_of(exc),
        )
        yield event(error_body(as_ozwell_error(exc)))
    except BaseException:  # cancelled: the client went away
        spent = usage or Usage(prompt_estimate, counted)
        await meter.settle(spent.total_tokens, usage=spent, model=prefix["model"], status=499)
        raise
    finally:
        if isinstance(first, asyncio.Future) and not first.done():
            first.cancel()  # the client went away while the backend had not answered yet
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await first
        await aclose_stream(stream)
