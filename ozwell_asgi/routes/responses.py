"""/responses: OpenAI's Responses API on top of the chat backend seam.

``POST /responses`` becomes one chat request (:mod:`ozwell_asgi.turns`), metered like chat: admitted before its
body, the prompt plus the bound on the answer reserved (``max_output_tokens``, else
``Settings.default_completion_reserve``; the backend generates to that bound), settled exactly once with what was
used. A chained turn (``previous_response_id``, or Ozwell's ``conversation_id``) sends the backend the whole
conversation, read from the stored record of the turn before it. The answer is built by
:class:`~ozwell_asgi.response_run.ResponseBuilder`: JSON, the typed SSE sequence (``stream: true``), or a
background run (``background: true``) polled with ``GET`` and stopped with ``POST /responses/{id}/cancel``.

Records belong to the caller's owner: another owner's id is answered exactly as an unknown one (404). With
``store: false`` nothing is kept: such a response cannot be retrieved or chained to, as at OpenAI.

Cancelling across workers: the cancelling worker marks the stored record ``cancelled`` (or cancels the run itself
when it runs there). A run elsewhere looks at its record between chunks at most every
``Settings.background_cancel_check`` seconds and once more before recording its result: it stops its backend call
when it sees the mark (or the record deleted), is charged what it generated, and never overwrites the mark. A
backend that sends nothing for a while is therefore stopped only when its next chunk comes, within the call's
``Settings.call_timeout`` at worst.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import anyio
import anyio.to_thread
from pydantic import ValidationError
from starlette.requests import Request

from ..context import Services
from ..errors import InternalServerError, InvalidRequestError, NotFoundError, OzwellError
from ..meter import Meter, status_of
from ..pages import list_body, paginate
from ..protocols import ChatBackend, ResponseStore
from ..response_run import ResponseBuilder, result_chunks
from ..responses import JSONResponse
from ..sse import PING, FirstChunk, SSEResponse, aclose_stream, first_chunk
from ..tokens import count_chat_prompt
from ..turns import answer_message, new_response_id, tool_fields, turn_input
from ..types import SCOPE_API, Call, ChatChunk, Principal, Source, StoredResponse
from ..wire._errors import invalid_request
from ..wire.chat import ChatCompletionRequest
from ..wire.files import parse_list_query
from ..wire.responses import (
    AllowedToolsChoice,
    CreateResponseRequest,
    FunctionChoice,
    TextFormatJSONObject,
    TextFormatJSONSchema,
    parse_response_request,
)

__all__ = [
    "cancel_response",
    "count_input_tokens",
    "create_response",
    "delete_response",
    "list_input_items",
    "retrieve_response",
]

log = logging.getLogger("ozwell_asgi")

JSON = dict[str, Any]
MAX_RESPONSE_ID_LENGTH = 256  # longer ids are unknown without asking the store
# Fields of OpenAI's CreateResponse that a chat backend cannot serve: a 400 naming them, never silently ignored.
_UNSUPPORTED = {
    "conversation": "OpenAI's Conversations API ('conversation') is not supported; use Ozwell's 'conversation_id'.",
    "prompt": "Reusable prompts ('prompt') are not supported.",
    "context_management": "'context_management' is not supported.",
}
_TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})


# --- the turn ----------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Turn:
    """A request made ready: the chat request, the Response as it starts, and what its record will keep."""

    wire: CreateResponseRequest
    chat: ChatCompletionRequest
    response: JSON
    items: list[JSON]
    conversation: list[JSON]  # earlier turns and this turn's input, in chat form (no instructions, no sources)
    conversation_id: str | None
    prompt_tokens: int
    bound: int


async def _read(services: Services, request: Request) -> CreateResponseRequest:
    body = await services.read_json(request)
    if len(body) > services.settings.offload_parse_above:
        return await anyio.to_thread.run_sync(parse_response_request, body)
    return parse_response_request(body)


def _check(wire: CreateResponseRequest, services: Services, *, counting: bool) -> None:
    """Rules across fields, and what this server cannot do, as 400s with their ``param``."""
    for name, message in _UNSUPPORTED.items():
        if wire.model_extra and name in wire.model_extra:
            raise InvalidRequestError(message, param=name, code="unsupported_parameter")
    if wire.model is None and not counting:
        raise InvalidRequestError(
            "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
        )
    if wire.previous_response_id is not None and wire.conversation_id is not None:
        raise InvalidRequestError(
            "Give either 'previous_response_id' or 'conversation_id', not both.",
            param="conversation_id",
            code="invalid_value",
        )
    if counting:
        return
    if wire.background and wire.store is False:
        raise InvalidRequestError(
            "Background responses must be stored: 'background' requires 'store' to be true.",
            param="background",
            code="invalid_value",
        )
    if wire.background and wire.stream:
        raise InvalidRequestError(
            "Streaming a background response is not supported: create it, then poll GET /responses/{id}.",
            param="stream",
            code="unsupported_value",
        )
    if wire.include_sources and services.sources is None:
        raise InvalidRequestError(
            "'include_sources' needs an embedding model: this server has no source finder configured.",
            param="include_sources",
            code="unsupported_value",
        )


def _not_found(response_id: str, param: str = "response_id") -> OzwellError:
    shown = response_id if len(response_id) <= 100 else response_id[:100] + "..."
    if param == "previous_response_id":
        return InvalidRequestError(
            f"Previous response with id '{shown}' not found.", param=param, code="previous_response_not_found"
        )
    return NotFoundError(f"Response with id '{shown}' not found.", param=param, code="response_not_found")


async def _earlier(
    services: Services, principal: Principal, wire: CreateResponseRequest, store: ResponseStore
) -> tuple[list[JSON], str | None]:
    """The conversation before this turn (chat form) and the conversation id this turn belongs to."""
    if wire.previous_response_id is not None:
        response_id = wire.previous_response_id
        record = None
        if len(response_id) <= MAX_RESPONSE_ID_LENGTH:
            record = await store.get(principal.owner, response_id)
        if record is None:
            raise _not_found(response_id, "previous_response_id")
        if record.status not in _TERMINAL:
            raise InvalidRequestError(
                f"Previous response with id '{response_id}' is still {record.status}: wait for it to end.",
                param="previous_response_id",
                code="invalid_value",
            )
        return [dict(m) for m in record.conversation], record.conversation_id
    if wire.conversation_id is not None:
        record = await store.last_in_conversation(principal.owner, wire.conversation_id)
        if record is not None and record.status not in _TERMINAL:
            raise InvalidRequestError(
                f"The latest response of conversation '{wire.conversation_id}' is still {record.status}: wait for "
                "it to end.",
                param="conversation_id",
                code="invalid_value",
            )
        return ([dict(m) for m in record.conversation] if record is not None else []), wire.conversation_id
    return [], None


def _question(messages: Sequence[JSON]) -> str:
    """The text of this turn's last user message: what ``include_sources`` searches for."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, str):
                return content
            return " ".join(p.get("text", "") for p in content or () if p.get("type") == "text")
    return ""


def _sources_message(sources: Sequence[Source]) -> JSON:
    """The passages as one system message before the conversation, each tagged with its file and page."""
    blocks = []
    for n, source in enumerate(sources, 1):
        page = f", page {source.page}" if source.page is not None else ""
        blocks.append(f"[{n}] {source.filename}{page}:\n{source.excerpt}")
    text = (
        "Passages from the user's files that may help answer; cite them by filename when you use them.\n\n"
        + "\n\n".join(blocks)
    )
    return {"role": "system", "content": text}


def _fit(
    head: list[JSON], history: list[JSON], current: list[JSON], wire: CreateResponseRequest, cap: int
) -> list[JSON]:
    """``history`` cut to fit the conversation in ``cap`` messages (``truncation: "auto"``: its oldest messages go,
    never leaving a tool result without its call); 400 when it cannot fit."""
    room = cap - len(head) - len(current)
    if len(history) <= room:
        return history
    if wire.truncation == "auto" and room >= 0:
        kept = history[len(history) - room :] if room else []
        while kept and kept[0].get("role") == "tool":
            kept = kept[1:]
        return kept
    raise InvalidRequestError(
        f"This conversation has {len(head) + len(history) + len(current)} messages, more than the {cap} this server "
        "sends a model; set 'truncation' to 'auto' to drop its oldest turns.",
        param="input",
        code="context_length_exceeded",
    )


def _count_parts(messages: Sequence[JSON]) -> int:
    return sum(len(m["content"]) for m in messages if isinstance(m.get("content"), list))


def _chat_request(wire: CreateResponseRequest, model: str, messages: list[JSON], bound: int) -> ChatCompletionRequest:
    body: JSON = {"model": model, "messages": messages, "max_completion_tokens": bound, "stream": bool(wire.stream)}
    for name in ("temperature", "top_p", "user", "safety_identifier", "prompt_cache_key"):
        value = getattr(wire, name)
        if value is not None:
            body[name] = value
    if wire.reasoning is not None and wire.reasoning.effort is not None:
        body["reasoning_effort"] = wire.reasoning.effort
    body.update(tool_fields(wire))
    try:
        return ChatCompletionRequest.model_validate(body)
    except ValidationError as exc:  # a turn our own items made: say what, never how
        error = invalid_request(exc, body)
        raise InvalidRequestError(
            f"The conversation cannot be sent to the model: {error.message}", param="input", code="invalid_value"
        ) from None


def _response_object(
    wire: CreateResponseRequest, response_id: str, created_at: int, conversation_id: str | None
) -> JSON:
    """The Response as it starts: every field of OpenAI's ``Response``, output empty, status ``in_progress``;
    ``usage`` is added when it is known (OpenAI's schema does not let it be null)."""
    tools = [
        {
            "type": "function",
            "name": t.name,
            "description": t.description,
            "parameters": t.parameters,
            "strict": t.strict,
        }
        for t in wire.tools or ()
    ]
    choice = wire.tool_choice
    tool_choice: Any = "auto" if choice is None else choice
    if isinstance(choice, FunctionChoice):
        tool_choice = {"type": "function", "name": choice.name}
    elif isinstance(choice, AllowedToolsChoice):
        tool_choice = {
            "type": "allowed_tools",
            "mode": choice.mode,
            "tools": [{"type": "function", "name": t.name} for t in choice.tools],
        }
    fmt = wire.text.format if wire.text is not None else None
    text_format: JSON = {"type": "text"}
    if isinstance(fmt, TextFormatJSONSchema):
        text_format = {"type": "json_schema", "name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
        if fmt.description is not None:
            text_format["description"] = fmt.description
    elif isinstance(fmt, TextFormatJSONObject):
        text_format = {"type": "json_object"}
    verbosity = wire.text.verbosity if wire.text is not None else None
    reasoning = wire.reasoning
    response: JSON = {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": bool(wire.background),
        "completed_at": None,
        "error": None,
        "incomplete_details": None,
        "instructions": wire.instructions,
        "max_output_tokens": wire.max_output_tokens,
        "max_tool_calls": None,
        "model": wire.model or "",
        "output": [],
        "parallel_tool_calls": wire.parallel_tool_calls if wire.parallel_tool_calls is not None else True,
        "previous_response_id": wire.previous_response_id,
        "prompt_cache_key": wire.prompt_cache_key,
        "reasoning": {
            "effort": reasoning.effort if reasoning is not None else None,
            "summary": reasoning.summary if reasoning is not None else None,
        },
        "safety_identifier": wire.safety_identifier,
        "service_tier": "default",
        "store": wire.store is not False,
        "temperature": wire.temperature if wire.temperature is not None else 1.0,
        "text": {"format": text_format, "verbosity": verbosity or "medium"},
        "tool_choice": tool_choice,
        "tools": tools,
        "top_logprobs": 0,
        "top_p": wire.top_p if wire.top_p is not None else 1.0,
        "truncation": wire.truncation or "disabled",
        "metadata": dict(wire.metadata) if wire.metadata is not None else {},
    }
    if wire.user is not None:  # OpenAI's schema types ``user`` as a string: absent rather than null
        response["user"] = wire.user
    if conversation_id is not None:
        response["conversation_id"] = conversation_id
    return response


async def _prepare(
    services: Services,
    principal: Principal,
    request: Request,
    wire: CreateResponseRequest,
    *,
    counting: bool = False,
) -> _Turn:
    """Check the request, resolve its model and the conversation before it, find its sources, and build the chat
    request and its count (``counting``: for ``/responses/input_tokens``, no model required, no sources)."""
    settings = services.settings
    _check(wire, services, counting=counting)
    if wire.model is not None:
        await services.find_model(principal, wire.model, "chat")
    current = turn_input(wire)
    if len(current.items) > settings.max_input_items:
        raise InvalidRequestError(
            f"Invalid 'input': array too long. Expected an array with maximum length {settings.max_input_items}, "
            f"but got an array with length {len(current.items)} instead.",
            param="messages" if wire.messages is not None else "input",
            code="invalid_value",
        )
    store = services.responses
    history: list[JSON] = []
    conversation_id = wire.conversation_id
    if store is not None:
        history, conversation_id = await _earlier(services, principal, wire, store)
    bound = wire.max_output_tokens or settings.default_completion_reserve
    head: list[JSON] = []
    if wire.instructions:
        head.append({"role": "system", "content": wire.instructions})
    sources: list[Source] = []
    if wire.include_sources and not counting and services.sources is not None:
        call = services.call(request, principal, "responses", bound)
        found = await services.sources.find(principal, _question(current.messages), call, settings.max_sources)
        sources = list(found)[: settings.max_sources]
        if sources:
            head.append(_sources_message(sources))
    history = _fit(head, history, current.messages, wire, settings.max_messages)
    messages = [*head, *history, *current.messages]
    if _count_parts(messages) > settings.max_content_parts:
        raise InvalidRequestError(
            f"Too many content parts: this conversation has {_count_parts(messages)}, the limit is "
            f"{settings.max_content_parts}.",
            param="input",
            code="invalid_value",
        )
    chat = _chat_request(wire, wire.model or "", messages, bound)
    if len(messages) > 64:  # a long conversation is counted off the event loop
        prompt = await anyio.to_thread.run_sync(count_chat_prompt, services.tokenizer, chat)
    else:
        prompt = count_chat_prompt(services.tokenizer, chat)
    response_id = new_response_id()
    response = _response_object(wire, response_id, int(time.time()), conversation_id)
    if wire.include_sources:
        response["sources"] = [
            {"file_id": s.file_id, "filename": s.filename, "page": s.page, "excerpt": s.excerpt, "score": s.score}
            for s in sources
        ]
    return _Turn(
        wire=wire,
        chat=chat,
        response=response,
        items=current.items,
        conversation=[*history, *current.messages],
        conversation_id=conversation_id,
        prompt_tokens=prompt,
        bound=bound,
    )


def _record(turn: _Turn, principal: Principal, response: JSON) -> StoredResponse:
    """The stored record of ``turn`` with ``response`` as it stands (the answer added to the conversation)."""
    conversation = list(turn.conversation)
    answer = answer_message(response["output"])
    if answer is not None:
        conversation.append(answer)
    return StoredResponse(
        id=response["id"],
        owner=principal.owner,
        created_at=response["created_at"],
        status=response["status"],
        response=response,
        input_items=tuple(turn.items),
        conversation=tuple(conversation),
        conversation_id=turn.conversation_id,
        key_id=principal.key_id,
    )


# --- POST /responses ---------------------------------------------------------------------------------------------


async def create_response(services: Services, request: Request) -> Any:
    """POST /responses: JSON, the typed event stream, or a queued background response."""
    principal = await services.authenticate(request, SCOPE_API)
    meter = await services.meter(principal, request, "responses")  # a spent key is refused before its body
    try:
        turn = await _prepare(services, principal, request, await _read(services, request))
        await meter.reserve(turn.prompt_tokens + turn.bound)
        if turn.wire.background:
            _background(services).check_room()
    except BaseException as exc:
        await meter.settle(0, status=status_of(exc))
        raise
    headers = meter.headers
    backend: ChatBackend = services.chat  # type: ignore[assignment]  # the route exists only if it chats
    store = services.responses if turn.wire.store is not False else None
    builder = ResponseBuilder(turn.response, services.tokenizer, turn.prompt_tokens, emit=bool(turn.wire.stream))
    call = services.call(request, principal, "responses", turn.bound)

    if turn.wire.background:
        runs = _background(services)
        queued = {**turn.response, "status": "queued"}
        record = _record(turn, principal, queued)
        try:
            await services.responses.put(record)  # type: ignore[union-attr]  # background requires a store
        except BaseException as exc:
            await meter.settle(0, status=status_of(exc))
            raise
        # The run outlives this request: its deadline is its own.
        runs.start(turn.response["id"], _run_background(services, turn, principal, builder, meter, call, backend))
        return JSONResponse(queued, headers=headers)

    if not turn.wire.stream:
        try:
            if services.completes is not None:
                result = await services.completes.complete_chat(turn.chat, call)
                for chunk in result_chunks(result):
                    builder.feed(chunk)
            else:
                await _consume(builder, backend.stream_chat(turn.chat, call))
        except BaseException as exc:
            spent = builder.spent
            await meter.settle(spent.total_tokens, usage=spent, model=turn.chat.model, status=status_of(exc))
            raise
        builder.finish()
        response = builder.response
        try:
            if store is not None:
                await store.put(_record(turn, principal, response))
        finally:
            spent = builder.spent
            await meter.settle(spent.total_tokens, usage=spent, model=response["model"])
        return JSONResponse(response, headers=headers)

    stream = backend.stream_chat(turn.chat, call)
    # As for chat: a failure before the first chunk gets a real HTTP status; a backend slow to send it gets the
    # stream started after ``stream_keepalive`` seconds, with ": ping" comments until it comes.
    try:
        first = await first_chunk(stream, services.settings.stream_keepalive)
    except BaseException as exc:
        await aclose_stream(stream)
        await meter.settle(0, status=status_of(exc), model=turn.chat.model)
        raise
    return SSEResponse(_frames(services, turn, principal, builder, stream, first, meter, store), headers)


def _background(services: Services) -> Any:
    runs = services.background
    if runs is None:  # pragma: no cover - the app makes one whenever it serves /responses
        raise InternalServerError("Background responses are not available.")
    return runs


async def _consume(builder: ResponseBuilder, stream: AsyncIterator[ChatChunk]) -> None:
    try:
        async for chunk in stream:
            builder.feed(chunk)
    finally:
        await aclose_stream(stream)


async def _frames(
    services: Services,
    turn: _Turn,
    principal: Principal,
    builder: ResponseBuilder,
    stream: AsyncIterator[ChatChunk],
    first: FirstChunk,
    meter: Meter,
    store: ResponseStore | None,
) -> AsyncGenerator[bytes, None]:
    try:
        for frame in builder.start():
            yield frame
        if isinstance(first, asyncio.Future):
            interval = services.settings.stream_keepalive
            while not first.done():
                yield PING
                await asyncio.wait((first,), timeout=interval)
            chunk = first.result()
        else:
            chunk = first
        while chunk is not None:
            for frame in builder.feed(chunk):
                yield frame
            chunk = await anext(stream, None)
        frames = builder.finish()
        if store is not None:
            await store.put(_record(turn, principal, builder.response))
        spent = builder.spent
        await meter.settle(spent.total_tokens, usage=spent, model=builder.response["model"])
        for frame in frames:
            yield frame
    except Exception as exc:
        if not isinstance(exc, OzwellError):
            log.exception("backend failed mid-stream")
        spent = builder.spent
        await meter.settle(spent.total_tokens, usage=spent, model=builder.response["model"], status=status_of(exc))
        frames = builder.fail(exc)
        if store is not None:
            with contextlib.suppress(Exception), anyio.CancelScope(shield=True):
                await store.put(_record(turn, principal, builder.response))
        for frame in frames:
            yield frame
    except BaseException:  # cancelled: the client went away; nothing is stored, what was generated is charged
        spent = builder.spent
        await meter.settle(spent.total_tokens, usage=spent, model=builder.response["model"], status=499)
        raise
    finally:
        if isinstance(first, asyncio.Future) and not first.done():
            first.cancel()
            with anyio.CancelScope(shield=True), contextlib.suppress(BaseException):
                await first
        await aclose_stream(stream)


# --- background runs ---------------------------------------------------------------------------------------------


async def _run_background(
    services: Services,
    turn: _Turn,
    principal: Principal,
    builder: ResponseBuilder,
    meter: Meter,
    call: Call,
    backend: ChatBackend,
) -> None:
    """One background run: ``in_progress`` in the store, the backend call, then its end recorded unless the record
    was cancelled or deleted meanwhile (by another worker: looked at every ``background_cancel_check`` seconds)."""
    store: ResponseStore = services.responses  # type: ignore[assignment]
    owner = principal.owner
    response_id = turn.response["id"]
    loop = asyncio.get_running_loop()
    check_every = services.settings.background_cancel_check
    call = replace(call, deadline=loop.time() + services.settings.call_timeout)
    status = 200

    async def still_wanted() -> bool:
        record = await store.get(owner, response_id)
        return record is not None and record.status != "cancelled"

    stream = backend.stream_chat(turn.chat, call)
    try:
        if not await still_wanted():
            raise asyncio.CancelledError
        await store.put(_record(turn, principal, {**builder.response, "output": []}))  # in_progress
        last_check = loop.time()
        async for chunk in stream:
            builder.feed(chunk)
            now = loop.time()
            if now - last_check >= check_every:
                last_check = now
                if not await still_wanted():
                    raise asyncio.CancelledError
        builder.finish()
    except asyncio.CancelledError:
        status = 499
        builder.cancel()
    except Exception as exc:
        if not isinstance(exc, OzwellError):
            log.exception("background response failed")
        status = status_of(exc)
        builder.fail(exc)
    finally:
        with anyio.CancelScope(shield=True):
            await aclose_stream(stream)
            spent = builder.spent
            await meter.settle(spent.total_tokens, usage=spent, model=builder.response["model"], status=status)
            try:
                if await still_wanted():
                    await store.put(_record(turn, principal, builder.response))
                elif builder.response["status"] == "cancelled":
                    # Cancelled elsewhere: record what was generated, under the mark the other worker made.
                    record = await store.get(owner, response_id)
                    if record is not None:
                        await store.put(_record(turn, principal, builder.response))
            except Exception:
                log.exception("recording background response %s failed", response_id)


# --- the other routes --------------------------------------------------------------------------------------------


async def _caller(services: Services, request: Request) -> tuple[Principal, ResponseStore, list[tuple[bytes, bytes]]]:
    principal = await services.authenticate(request, SCOPE_API)
    headers = await services.charge_request(principal)
    store = services.responses
    if store is None:  # pragma: no cover - the routes exist only with a response store
        raise InternalServerError("No response store is configured.")
    return principal, store, headers


async def _find(store: ResponseStore, principal: Principal, response_id: str) -> StoredResponse:
    record = None
    if len(response_id) <= MAX_RESPONSE_ID_LENGTH:
        record = await store.get(principal.owner, response_id)
    if record is None:
        raise _not_found(response_id)
    return record


async def retrieve_response(services: Services, request: Request) -> Any:
    """GET /responses/{response_id}: the Response as stored (a background one as it stands)."""
    principal, store, headers = await _caller(services, request)
    record = await _find(store, principal, request.path_params["response_id"])
    return JSONResponse(record.response, headers=headers)


async def delete_response(services: Services, request: Request) -> Any:
    """DELETE /responses/{response_id}: the record goes (a background run of it here is cancelled first)."""
    principal, store, headers = await _caller(services, request)
    response_id = request.path_params["response_id"]
    await _find(store, principal, response_id)
    runs = services.background
    if runs is not None and runs.running(response_id):
        await runs.cancel(response_id)
    if not await store.delete(principal.owner, response_id):
        raise _not_found(response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True}, headers=headers)


async def list_input_items(services: Services, request: Request) -> Any:
    """GET /responses/{response_id}/input_items: the turn's input items, paged like every list (newest first by
    default; ``limit`` 1-100, ``after``, ``before``, ``order``)."""
    principal, store, headers = await _caller(services, request)
    query, _ = parse_list_query(request.query_params)
    record = await _find(store, principal, request.path_params["response_id"])
    page = paginate(record.input_items, query, lambda item: str(item.get("id", "")))
    return JSONResponse(list_body([dict(i) for i in page.data], page.has_more), headers=headers)


async def cancel_response(services: Services, request: Request) -> Any:
    """POST /responses/{response_id}/cancel: stop a background response. A run here is cancelled and waited for;
    a run elsewhere is marked ``cancelled`` in the store (it stops when it next looks). A response that has ended
    is answered as it stands."""
    principal, store, headers = await _caller(services, request)
    response_id = request.path_params["response_id"]
    record = await _find(store, principal, response_id)
    if not record.response.get("background"):
        raise InvalidRequestError(
            "Only responses created with 'background' set to true can be cancelled.",
            param="response_id",
            code="invalid_value",
        )
    if record.status not in _TERMINAL:
        runs = services.background
        if runs is not None and await runs.cancel(response_id):
            record = await _find(store, principal, response_id)
        else:
            cancelled = {**record.response, "status": "cancelled"}
            record = replace(record, status="cancelled", response=cancelled)
            await store.put(record)
    return JSONResponse(record.response, headers=headers)


async def count_input_tokens(services: Services, request: Request) -> Any:
    """POST /responses/input_tokens: the input tokens a request would be charged for, without running it (one
    request and no tokens on the caller's limits)."""
    principal = await services.authenticate(request, SCOPE_API)
    headers = await services.charge_request(principal)
    turn = await _prepare(services, principal, request, await _read(services, request), counting=True)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": turn.prompt_tokens}, headers=headers)
