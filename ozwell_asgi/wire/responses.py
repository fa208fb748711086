"""The wire form of ``POST /v1/responses`` (and ``POST /v1/responses/input_tokens``): OpenAI's ``CreateResponse``
as far as a chat backend can serve it, plus Ozwell's extensions (``messages``, ``conversation_id``,
``include_sources``).

Input items are the ones a chat conversation can carry: messages (``input_text``, ``input_image``, ``input_file``
parts; an assistant's ``output_text`` and ``refusal`` parts handed back), ``function_call``,
``function_call_output`` and ``reasoning`` items handed back. Tools are function tools. Anything else OpenAI
defines (hosted tools, item references, ``conversation``, ``prompt``) is a 400 naming it, never silently ignored.
Unknown top-level fields pass through (``extra="allow"``), as on every wire model, so newer SDKs keep working.

Lists are ``fail_fast``: a hostile body yields a handful of validation errors (see :mod:`ozwell_asgi.wire._errors`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag

from ._errors import parse_json_body
from .chat import ChatMessage, FunctionName, JSONSchemaFormat, Metadata

__all__ = [
    "CONVERSATION_ID_PATTERN",
    "CreateResponseRequest",
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "FunctionToolParam",
    "InputFile",
    "InputImage",
    "InputItem",
    "InputText",
    "MessageItem",
    "OutputText",
    "ReasoningItemParam",
    "RefusalPart",
    "TextConfig",
    "parse_response_request",
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


# --- content parts -----------------------------------------------------------------------------------------------


class InputText(_Wire):
    type: Literal["input_text"]
    text: str


class InputImage(_Wire):
    type: Literal["input_image"]
    image_url: str | None = None
    file_id: str | None = None
    detail: Literal["auto", "low", "high", "original"] = "auto"


class InputFile(_Wire):
    type: Literal["input_file"]
    file_id: str | None = None
    filename: str | None = None
    file_data: str | None = None
    file_url: str | None = None


class OutputText(_Wire):
    """An assistant's text handed back (the ``output_text`` part of an earlier response's message)."""

    type: Literal["output_text"]
    text: str


class RefusalPart(_Wire):
    type: Literal["refusal"]
    refusal: str


MessagePart: TypeAlias = Annotated[
    InputText | InputImage | InputFile | OutputText | RefusalPart, Field(discriminator="type")
]
ToolOutputPart: TypeAlias = Annotated[InputText | InputImage | InputFile, Field(discriminator="type")]
ItemStatus: TypeAlias = Literal["in_progress", "completed", "incomplete"]

# --- input items -------------------------------------------------------------------------------------------------


class MessageItem(_Wire):
    """``EasyInputMessage`` / ``InputMessage`` / an ``OutputMessage`` handed back."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: str | Annotated[list[MessagePart], Field(fail_fast=True)]
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallItem(_Wire):
    type: Literal["function_call"]
    call_id: Annotated[str, Field(min_length=1, max_length=64)]
    name: str
    arguments: str
    id: str | None = None
    status: ItemStatus | None = None


class FunctionCallOutputItem(_Wire):
    type: Literal["function_call_output"]
    call_id: Annotated[str, Field(min_length=1, max_length=64)]
    output: str | Annotated[list[ToolOutputPart], Field(fail_fast=True)]
    id: str | None = None
    status: ItemStatus | None = None


class ReasoningItemParam(_Wire):
    """A reasoning item of an earlier response handed back: accepted and listed, not sent to the model (a chat
    backend takes no reasoning input)."""

    type: Literal["reasoning"]
    id: str | None = None
    summary: Annotated[list[dict[str, Any]], Field(fail_fast=True)] = []
    content: Annotated[list[dict[str, Any]], Field(fail_fast=True)] | None = None
    encrypted_content: str | None = None
    status: ItemStatus | None = None


def _item_type(value: Any) -> str | None:
    """The item's ``type``: a message may leave it out (``EasyInputMessage``)."""
    if isinstance(value, dict):
        kind = value.get("type", "message")
        return kind if isinstance(kind, str) else "message"  # the message branch reports the type error
    if isinstance(value, BaseModel):
        return getattr(value, "type", None)
    return "message"  # not an object: the message branch reports the type error


InputItem: TypeAlias = Annotated[
    Annotated[MessageItem, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItemParam, Tag("reasoning")],
    Discriminator(_item_type),
]

# --- tools, tool choice, text format -----------------------------------------------------------------------------


class FunctionToolParam(_Wire):
    type: Literal["function"]
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionChoice(_Wire):
    type: Literal["function"]
    name: str


class AllowedTool(_Wire):
    type: Literal["function"]
    name: str


class AllowedToolsChoice(_Wire):
    type: Literal["allowed_tools"]
    mode: Literal["auto", "required"]
    tools: Annotated[list[AllowedTool], Field(fail_fast=True, max_length=128)]


ToolChoice: TypeAlias = (
    Literal["none", "auto", "required"] | Annotated[FunctionChoice | AllowedToolsChoice, Field(discriminator="type")]
)


class TextFormatText(_Wire):
    type: Literal["text"]


class TextFormatJSONObject(_Wire):
    type: Literal["json_object"]


class TextFormatJSONSchema(JSONSchemaFormat):
    """``{"type": "json_schema", "name", "schema", "description", "strict"}`` (flat, unlike chat's)."""

    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


TextFormat: TypeAlias = Annotated[
    TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")
]


class TextConfig(_Wire):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(_Wire):
    effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


# Ozwell's ``conversation_id``: up to 64 url-safe characters.
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"

# --- the request -------------------------------------------------------------------------------------------------


class CreateResponseRequest(_Wire):
    """OpenAI's ``CreateResponse`` (function tools only) and Ozwell's extensions. ``model`` may be left out only on
    ``/responses/input_tokens`` (the route checks it)."""

    model: str | None = None
    input: Annotated[str, Field(max_length=10_485_760)] | Annotated[list[InputItem], Field(fail_fast=True)] | None = (
        None
    )
    instructions: str | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    background: bool | None = None
    stream: bool | None = None

    tools: Annotated[list[FunctionToolParam], Field(max_length=128, fail_fast=True)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None

    max_output_tokens: Annotated[int, Field(ge=16)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    truncation: Literal["auto", "disabled"] | None = None

    metadata: Metadata | None = None
    user: str | None = None
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None
    prompt_cache_key: str | None = None
    include: Annotated[list[str], Field(max_length=16, fail_fast=True)] | None = None

    # Ozwell's extensions (docs/responses.md)
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)] | None = None
    conversation_id: Annotated[str, Field(pattern=CONVERSATION_ID_PATTERN)] | None = None
    include_sources: bool | None = None


def parse_response_request(body: bytes | str) -> CreateResponseRequest:
    """Validate a JSON body into a :class:`CreateResponseRequest`; 400 with OpenAI's ``param``/``code`` if not."""
    return parse_json_body(CreateResponseRequest, body)
