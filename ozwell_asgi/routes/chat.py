"""POST /chat/completions: auth → parse → model → reserve → backend → JSON or SSE → settle."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from pydantic_core import to_json
from starlette.requests import Request

from ..bodies import read_json_body
from ..context import Services
from ..errors import InvalidRequestError, OzwellError, as_ozwell_error, error_body
from ..ratelimit import rate_limit_header_bytes
from ..responses import JSONResponse
from ..sse import DONE, SSEResponse, event
from ..tokens import count_chat_prompt, count_tool_call
from ..types import SCOPE_API, ChatChunk, ChatResult, Reservation, ToolCall, Usage
from ..wire.chat import ChatCompletionRequest, parse_chat_request

__all__ = ["create_chat_completion"]

log = logging.getLogger("ozwell_asgi")


def _usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _tool_call_dict(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def render_completion(result: ChatResult, completion_id: str, created: int, model: str, usage: Usage) -> dict[str, Any]:
    choices = []
    for choice in result.choices:
        message: dict[str, Any] = {
            "role": "assistant",
            "content": choice.message.content,
            "refusal": choice.message.refusal,
            "annotations": [],
        }
        if choice.message.tool_calls:
            message["tool_calls"] = [_tool_call_dict(c) for c in choice.message.tool_calls]
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
        "usage": _usage_dict(usage),
        "service_tier": "default",
        "system_fingerprint": result.system_fingerprint,
    }


def _delta(chunk: ChatChunk) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if chunk.role is not None:
        delta["role"] = chunk.role
        delta["content"] = chunk.content
        delta["refusal"] = chunk.refusal
    else:
        if chunk.content is not None:
            delta["content"] = chunk.content
        if chunk.refusal is not None:
            delta["refusal"] = chunk.refusal
    if chunk.tool_calls:
        calls = []
        for call in chunk.tool_calls:
            function: dict[str, Any] = {}
            if call.name is not None:
                function["name"] = call.name
            if call.arguments is not None:
                function["arguments"] = call.arguments
            item: dict[str, Any] = {"index": call.index}
            if call.id is not None:
                item["id"] = call.id
                item["type"] = "function"
            item["function"] = function
            calls.append(item)
        delta["tool_calls"] = calls
    return delta


async def create_chat_completion(services: Services, request: Request) -> Any:
    started = time.time()
    principal = await services.authenticate(request, SCOPE_API)
    body = await read_json_body(request, services.settings.max_body_size)
    chat = parse_chat_request(body)
    _check_combinations(chat)
    model = chat.model
    await services.find_model(principal, model, "chat")

    prompt_estimate = count_chat_prompt(services.tokenizer, chat)
    cap = chat.effective_max_tokens
    completion_reserve = (cap if cap is not None else services.settings.default_completion_reserve) * chat.choice_count
    reservation = await services.limiter.reserve(
        principal.key_id, principal.quota, prompt_estimate + completion_reserve
    )
    headers = rate_limit_header_bytes(reservation)
    completion_id = f"chatcmpl-{random.getrandbits(128):032x}"  # unique, not secret
    created = int(started)

    if not chat.stream:
        try:
            result = await services.backend.chat(chat)
        except BaseException:
            await _settle(services, reservation, 0)
            raise
        usage = result.usage or _count_usage(services, chat, result, prompt_estimate)
        await _settle(services, reservation, usage.total_tokens, shield=False)
        return JSONResponse(render_completion(result, completion_id, created, model, usage), headers=headers)

    stream = services.backend.chat_stream(chat)
    try:
        first = await anext(stream)  # failures before the first chunk get a real HTTP status
    except StopAsyncIteration:
        first = None
    except BaseException:
        await _aclose(stream)
        await _settle(services, reservation, 0)
        raise
    frames = _frames(services, chat, stream, first, reservation, completion_id, created, prompt_estimate)
    return SSEResponse(frames, headers)


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


async def _aclose(stream: AsyncIterator[ChatChunk]) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


async def _settle(services: Services, reservation: Reservation, used: int, *, shield: bool = True) -> None:
    """Reconcile the reservation; never raises. ``shield`` (the default) lets it finish while the request is being
    cancelled (a client gone mid-stream); a plain completion's last step skips that cost."""
    if shield:
        with anyio.CancelScope(shield=True):
            await _settle(services, reservation, used, shield=False)
        return
    try:
        await services.limiter.settle(reservation, used)
    except Exception:  # settling must never turn an answer into an error
        log.exception("rate limiter settle failed")


async def _frames(
    services: Services,
    chat: ChatCompletionRequest,
    stream: AsyncIterator[ChatChunk],
    first: ChatChunk | None,
    reservation: Reservation,
    completion_id: str,
    created: int,
    prompt_estimate: int,
) -> AsyncGenerator[bytes, None]:
    include_usage = chat.include_usage
    prefix = {
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
        chunk = first
        while chunk is not None:
            if (
                chunk.usage is not None
                and chunk.content is None
                and not chunk.tool_calls
                and chunk.finish_reason is None
            ):
                usage = chunk.usage
            else:
                if chunk.content:
                    counted += services.tokenizer.count(chunk.content)
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
            yield event(to_json({**prefix, "choices": [], "usage": _usage_dict(final)}))
        yield DONE
        await _settle(services, reservation, final.total_tokens)
    except Exception as exc:
        if not isinstance(exc, OzwellError):
            log.exception("backend failed mid-stream")
        await _settle(services, reservation, prompt_estimate + counted)
        yield event(error_body(as_ozwell_error(exc)))
    except BaseException:  # cancelled: the client went away
        await _settle(services, reservation, (usage.total_tokens if usage else prompt_estimate + counted))
        raise
    finally:
        await _aclose(stream)
