"""One turn of the Responses API in chat form, and back.

A Responses request becomes one :class:`~ozwell_asgi.wire.chat.ChatCompletionRequest`, so every chat backend
serves ``/responses`` unchanged:

- :func:`turn_input` reads this turn's input (``input`` items, a string, or Ozwell's ``messages``) into the items
  ``GET /responses/{id}/input_items`` lists (OpenAI's ``ItemResource`` shapes, each with an id) and the chat
  messages the backend is sent;
- :func:`answer_message` is the chat message of a response's output (stored so the next turn carries it);
- :func:`tool_fields` maps function ``tools``, ``tool_choice`` and ``text.format`` to their chat fields.

Only what chat can carry is accepted; a part chat cannot take (an image by ``file_id``, a file by URL, an image in
a system message...) is a 400 naming it. Reasoning items handed back are listed but not sent: chat backends take
no reasoning input.
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequestError
from .wire.chat import ChatMessage
from .wire.responses import (
    AllowedToolsChoice,
    CreateResponseRequest,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionChoice,
    InputFile,
    InputImage,
    InputItem,
    InputText,
    MessageItem,
    OutputText,
    RefusalPart,
    TextFormatJSONObject,
    TextFormatJSONSchema,
)

__all__ = ["TurnInput", "answer_message", "new_id", "new_response_id", "tool_fields", "turn_input"]

JSON = dict[str, Any]


def new_id(prefix: str) -> str:
    """``<prefix>_`` and 128 random bits in hex: unique, not secret (``msg``, ``fc``...)."""
    return f"{prefix}_{random.getrandbits(128):032x}"


def new_response_id() -> str:
    """``resp_``, microseconds since the epoch, then 72 random bits, in hex: unique, not secret, and in creation
    order, so responses of the same second (``created_at``) still order as they were made (the store's
    ``last_in_conversation`` is the newest by ``created_at``, then ``id``)."""
    return f"resp_{time.time_ns() // 1000:014x}{random.getrandbits(72):018x}"


@dataclass(frozen=True, slots=True)
class TurnInput:
    """This turn's input: the items as listed (with ids) and the chat messages the backend is sent."""

    items: list[JSON]
    messages: list[JSON]


def _unsupported(param: str, what: str) -> InvalidRequestError:
    return InvalidRequestError(f"{what} is not supported on this server.", param=param, code="unsupported_value")


# --- input items ---------------------------------------------------------------------------------------------


def _user_part(part: Any, param: str, role: str) -> JSON:
    """A chat content part of a user message (system and developer messages take text alone)."""
    if isinstance(part, InputText | OutputText):
        return {"type": "text", "text": part.text}
    if role != "user":
        raise InvalidRequestError(
            f"A {role} message takes only text content.", param=f"{param}.type", code="invalid_value"
        )
    if isinstance(part, InputImage):
        if part.image_url is None:
            raise _unsupported(f"{param}.file_id" if part.file_id else f"{param}.image_url", "An image by file_id")
        detail = "high" if part.detail == "original" else part.detail
        return {"type": "image_url", "image_url": {"url": part.image_url, "detail": detail}}
    if isinstance(part, InputFile):
        if part.file_url is not None:
            raise _unsupported(f"{param}.file_url", "A file by URL")
        file = {"file_id": part.file_id, "filename": part.filename, "file_data": part.file_data}
        if part.file_id is None and part.file_data is None:
            raise InvalidRequestError(
                "An input_file needs file_id or file_data.", param=f"{param}.file_id", code="missing_required_parameter"
            )
        return {"type": "file", "file": {k: v for k, v in file.items() if v is not None}}
    raise InvalidRequestError(  # a refusal in a user message
        "A refusal part belongs to an assistant message.", param=f"{param}.type", code="invalid_value"
    )


def _listed_part(part: Any) -> JSON:
    if isinstance(part, OutputText):
        return {"type": "input_text", "text": part.text}
    dumped: JSON = part.model_dump(exclude_none=True)
    return dumped


def _message(item: MessageItem, param: str, items: list[JSON], messages: list[JSON]) -> None:
    content = item.content
    item_id = item.id or new_id("msg")
    if item.role == "assistant":
        texts: list[str] = []
        refusals: list[str] = []
        if isinstance(content, str):
            texts.append(content)
        else:
            for j, part in enumerate(content):
                if isinstance(part, OutputText | InputText):
                    texts.append(part.text)
                elif isinstance(part, RefusalPart):
                    refusals.append(part.refusal)
                else:
                    raise InvalidRequestError(
                        "An assistant message takes only text and refusal content.",
                        param=f"{param}.content[{j}].type",
                        code="invalid_value",
                    )
        listed: list[JSON] = [_output_text("".join(texts))] if texts or not refusals else []
        if refusals:
            listed.append({"type": "refusal", "refusal": "".join(refusals)})
        items.append({"id": item_id, "type": "message", "role": "assistant", "status": "completed", "content": listed})
        chat: JSON = {"role": "assistant", "content": "".join(texts) if texts else None}
        if refusals:
            chat["refusal"] = "".join(refusals)
        messages.append(chat)
        return
    if isinstance(content, str):
        parts: list[JSON] = [{"type": "input_text", "text": content}]
        chat_content: str | list[JSON] = content
    else:
        parts = [_listed_part(p) for p in content]
        chat_content = [_user_part(p, f"{param}.content[{j}]", item.role) for j, p in enumerate(content)]
    items.append({"id": item_id, "type": "message", "role": item.role, "status": "completed", "content": parts})
    messages.append({"role": item.role, "content": chat_content})


def _output_text(text: str) -> JSON:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _tool_output(item: FunctionCallOutputItem, param: str) -> str | list[JSON]:
    output = item.output
    if isinstance(output, str):
        return output
    parts: list[JSON] = []
    for j, part in enumerate(output):
        if not isinstance(part, InputText):
            raise _unsupported(f"{param}.output[{j}].type", "A function_call_output part other than input_text")
        parts.append({"type": "text", "text": part.text})
    return parts


def _add_tool_call(messages: list[JSON], call: JSON) -> None:
    """A function call joins the assistant message just before it (calls made in one answer), else starts one."""
    last = messages[-1] if messages else None
    if last is not None and last["role"] == "assistant":
        last.setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _items(input_items: Sequence[InputItem]) -> TurnInput:
    items: list[JSON] = []
    messages: list[JSON] = []
    for i, item in enumerate(input_items):
        param = f"input[{i}]"
        if isinstance(item, MessageItem):
            _message(item, param, items, messages)
        elif isinstance(item, FunctionCallItem):
            items.append(
                {
                    "id": item.id or new_id("fc"),
                    "type": "function_call",
                    "call_id": item.call_id,
                    "name": item.name,
                    "arguments": item.arguments,
                    "status": "completed",
                }
            )
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            _add_tool_call(messages, call)
        elif isinstance(item, FunctionCallOutputItem):
            content = _tool_output(item, param)
            listed_output = item.output if isinstance(item.output, str) else [p.model_dump() for p in item.output]
            items.append(
                {
                    "id": item.id or new_id("fco"),
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    "output": listed_output,
                    "status": "completed",
                }
            )
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": content})
        else:  # reasoning handed back: listed, not sent
            reasoning: JSON = {"id": item.id or new_id("rs"), "type": "reasoning", "summary": item.summary}
            if item.content is not None:
                reasoning["content"] = item.content
            if item.encrypted_content is not None:
                reasoning["encrypted_content"] = item.encrypted_content
            items.append(reasoning)
    return TurnInput(items, messages)


# --- Ozwell's ``messages`` --------------------------------------------------------------------------------------


def _chat_part_listed(part: Mapping[str, Any]) -> JSON:
    kind = part.get("type")
    if kind == "text":
        return {"type": "input_text", "text": part.get("text", "")}
    if kind == "image_url":
        image = part.get("image_url") or {}
        return {"type": "input_image", "image_url": image.get("url"), "detail": image.get("detail", "auto")}
    if kind == "file":
        file = part.get("file") or {}
        return {"type": "input_file", **{k: v for k, v in file.items() if k in ("file_id", "filename", "file_data")}}
    if kind == "input_audio":
        audio = part.get("input_audio") or {}
        return {"type": "input_file", "filename": f"audio.{audio.get('format', 'wav')}", "file_data": audio.get("data")}
    return {"type": "input_text", "text": str(part.get("refusal", ""))}


def _listed_message(role: str, content: list[JSON]) -> JSON:
    return {"id": new_id("msg"), "type": "message", "role": role, "status": "completed", "content": content}


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def _chat_messages(chat: Sequence[ChatMessage]) -> TurnInput:
    items: list[JSON] = []
    messages: list[JSON] = []
    for message in chat:
        dumped: JSON = message.model_dump(mode="json", exclude_none=True, by_alias=True)
        messages.append(dumped)
        role = dumped["role"]
        content = dumped.get("content")
        if role in ("user", "system", "developer"):
            parts = (
                [{"type": "input_text", "text": content}]
                if isinstance(content, str)
                else [_chat_part_listed(p) for p in content or ()]
            )
            items.append(
                {"id": new_id("msg"), "type": "message", "role": role, "status": "completed", "content": parts}
            )
        elif role == "assistant":
            text = _text_of(content)
            if text or dumped.get("refusal") or not dumped.get("tool_calls"):
                listed = [_output_text(text)]
                if dumped.get("refusal"):
                    listed.append({"type": "refusal", "refusal": dumped["refusal"]})
                items.append(
                    {
                        "id": new_id("msg"),
                        "type": "message",
                        "role": "assistant",
                        "status": "completed",
                        "content": listed,
                    }
                )
            for call in dumped.get("tool_calls") or ():
                body = call.get("function") or call.get("custom") or {}
                items.append(
                    {
                        "id": new_id("fc"),
                        "type": "function_call",
                        "call_id": call.get("id", ""),
                        "name": body.get("name", ""),
                        "arguments": body.get("arguments", body.get("input", "")),
                        "status": "completed",
                    }
                )
        else:  # tool (or the deprecated function) result
            items.append(
                {
                    "id": new_id("fco"),
                    "type": "function_call_output",
                    "call_id": dumped.get("tool_call_id") or dumped.get("name", ""),
                    "output": _text_of(content),
                    "status": "completed",
                }
            )
    return TurnInput(items, messages)


def turn_input(request: CreateResponseRequest) -> TurnInput:
    """This turn's input items (listed) and chat messages; 400 if there is none, or both ``input`` and
    ``messages`` are given."""
    if request.messages is not None:
        if request.input is not None:
            raise InvalidRequestError(
                "Give either 'input' or 'messages' (Ozwell's chat-format input), not both.",
                param="messages",
                code="invalid_value",
            )
        return _chat_messages(request.messages)
    given = request.input
    if given is None:
        raise InvalidRequestError(
            "Missing required parameter: 'input'.", param="input", code="missing_required_parameter"
        )
    if isinstance(given, str):
        item: JSON = {"id": new_id("msg"), "type": "message", "role": "user", "status": "completed"}
        item["content"] = [{"type": "input_text", "text": given}]
        return TurnInput([item], [{"role": "user", "content": given}])
    if not given:
        raise InvalidRequestError(
            "Invalid 'input': empty array. Expected an array with minimum length 1, but got an empty array instead.",
            param="input",
            code="invalid_value",
        )
    return _items(given)


# --- the answer and the request's other fields ---------------------------------------------------------------


def answer_message(output: Sequence[Mapping[str, Any]]) -> JSON | None:
    """The chat message of a response's output items (text, refusal and function calls), or ``None`` if the
    output holds none of them."""
    texts: list[str] = []
    refusals: list[str] = []
    calls: list[JSON] = []
    for item in output:
        if item.get("type") == "message":
            for part in item.get("content", ()):
                if part.get("type") == "output_text":
                    texts.append(part.get("text", ""))
                elif part.get("type") == "refusal":
                    refusals.append(part.get("refusal", ""))
        elif item.get("type") == "function_call":
            calls.append(
                {
                    "id": item.get("call_id", ""),
                    "type": "function",
                    "function": {"name": item.get("name", ""), "arguments": item.get("arguments", "")},
                }
            )
    if not texts and not refusals and not calls:
        return None
    message: JSON = {"role": "assistant", "content": "".join(texts) if texts else None}
    if refusals:
        message["refusal"] = "".join(refusals)
    if calls:
        message["tool_calls"] = calls
    return message


def tool_fields(request: CreateResponseRequest) -> JSON:
    """The chat request's ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``response_format``."""
    fields: JSON = {}
    if request.tools:
        fields["tools"] = [
            {
                "type": "function",
                "function": {
                    k: v
                    for k, v in (
                        ("name", t.name),
                        ("description", t.description),
                        ("parameters", t.parameters),
                        ("strict", t.strict),
                    )
                    if v is not None
                },
            }
            for t in request.tools
        ]
        if request.parallel_tool_calls is not None:
            fields["parallel_tool_calls"] = request.parallel_tool_calls
    choice = request.tool_choice
    if choice is not None:
        if not request.tools:
            raise InvalidRequestError(
                "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are specified.",
                param="tool_choice",
                code="invalid_value",
            )
        if isinstance(choice, str):
            fields["tool_choice"] = choice
        elif isinstance(choice, FunctionChoice):
            if choice.name not in {t.name for t in request.tools}:
                raise InvalidRequestError(
                    f"Invalid value for 'tool_choice': function '{choice.name}' is not one of the given tools.",
                    param="tool_choice.name",
                    code="invalid_value",
                )
            fields["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
        elif isinstance(choice, AllowedToolsChoice):
            fields["tool_choice"] = {
                "type": "allowed_tools",
                "allowed_tools": {
                    "mode": choice.mode,
                    "tools": [{"type": "function", "function": {"name": t.name}} for t in choice.tools],
                },
            }
    text = request.text
    if text is not None:
        fmt = text.format
        if isinstance(fmt, TextFormatJSONSchema):
            schema: JSON = {"name": fmt.name, "schema": fmt.schema_}
            if fmt.description is not None:
                schema["description"] = fmt.description
            if fmt.strict is not None:
                schema["strict"] = fmt.strict
            fields["response_format"] = {"type": "json_schema", "json_schema": schema}
        elif isinstance(fmt, TextFormatJSONObject):
            fields["response_format"] = {"type": "json_object"}
        if text.verbosity is not None:
            fields["verbosity"] = text.verbosity
    return fields
