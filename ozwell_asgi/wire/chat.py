"""The wire form of ``POST /v1/chat/completions``: OpenAI's whole ``CreateChatCompletionRequest``.

Field names, types and bounds follow OpenAI's OpenAPI spec (``CreateChatCompletionRequest`` and its refs), plus
the limits OpenAI documents in prose or enforces (``metadata``, ``logit_bias``, ``tools``, function names). Every
model tolerates unknown fields (``extra="allow"``, reachable through ``.model_extra``) so newer SDKs keep working;
the one exception is where the spec itself closes an object (``additionalProperties: false``). Validators are
built once, at import, by pydantic; :func:`parse_chat_request` validates the raw body bytes in one pass.

Every list and map whose items are validated is ``fail_fast`` and closed objects stop at their first unknown field,
so a hostile body yields a handful of validation errors, never one per item (see :mod:`ozwell_asgi.wire._errors`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

from ._errors import ClosedModel, parse_json_body

__all__ = [
    "AllowedTools",
    "AllowedToolsChoice",
    "AssistantContentPart",
    "AssistantMessage",
    "AssistantMessageAudio",
    "AudioContentPart",
    "AudioOutputParams",
    "ChatCompletionRequest",
    "ChatMessage",
    "CustomTool",
    "CustomToolCall",
    "CustomToolCallBody",
    "CustomToolDefinition",
    "CustomToolFormat",
    "CustomToolGrammar",
    "CustomToolGrammarFormat",
    "CustomToolTextFormat",
    "CustomVoice",
    "DeveloperMessage",
    "FileContentPart",
    "FileData",
    "FunctionCall",
    "FunctionCallOption",
    "FunctionDefinition",
    "FunctionMessage",
    "FunctionName",
    "FunctionTool",
    "FunctionToolCall",
    "ImageContentPart",
    "ImageURL",
    "InputAudio",
    "JSONSchemaFormat",
    "LogitBias",
    "Metadata",
    "ModerationConfig",
    "ModerationParams",
    "ModerationPolicy",
    "NamedCustomToolChoice",
    "NamedToolChoice",
    "NamedToolChoiceFunction",
    "PredictionContent",
    "PromptCacheBreakpoint",
    "PromptCacheOptions",
    "RefusalContentPart",
    "ResponseFormat",
    "ResponseFormatJSONObject",
    "ResponseFormatJSONSchema",
    "ResponseFormatText",
    "StreamOptions",
    "SystemMessage",
    "TextContentPart",
    "Tool",
    "ToolCall",
    "ToolChoice",
    "ToolMessage",
    "UserContentPart",
    "UserLocation",
    "UserMessage",
    "WebSearchLocation",
    "WebSearchOptions",
    "message_text",
    "parse_chat_request",
    "request_text",
]


class _Wire(BaseModel):
    """Base of every wire model: unknown fields pass through (``.model_extra``)."""

    model_config = ConfigDict(extra="allow")


_Closed = ClosedModel


# Function names (and ``response_format.json_schema.name``): "Must be a-z, A-Z, 0-9, or contain underscores and
# dashes, with a maximum length of 64" says the spec, in prose; OpenAI answers 400 on either.
FunctionName: TypeAlias = Annotated[str, Field(max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")]


# --- content parts -----------------------------------------------------------------------------------------------


class PromptCacheBreakpoint(_Wire):
    mode: Literal["explicit"] = "explicit"


class TextContentPart(_Wire):
    type: Literal["text"]
    text: str
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class ImageURL(_Wire):
    url: str
    detail: Literal["auto", "low", "high"] = "auto"


class ImageContentPart(_Wire):
    type: Literal["image_url"]
    image_url: ImageURL
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class InputAudio(_Wire):
    data: str
    format: Literal["wav", "mp3"]


class AudioContentPart(_Wire):
    type: Literal["input_audio"]
    input_audio: InputAudio
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class FileData(_Wire):
    filename: str | None = None
    file_data: str | None = None
    file_id: str | None = None


class FileContentPart(_Wire):
    type: Literal["file"]
    file: FileData
    prompt_cache_breakpoint: PromptCacheBreakpoint | None = None


class RefusalContentPart(_Wire):
    type: Literal["refusal"]
    refusal: str


UserContentPart: TypeAlias = Annotated[
    TextContentPart | ImageContentPart | AudioContentPart | FileContentPart, Field(discriminator="type")
]
AssistantContentPart: TypeAlias = Annotated[TextContentPart | RefusalContentPart, Field(discriminator="type")]
TextParts: TypeAlias = Annotated[list[TextContentPart], Field(min_length=1, fail_fast=True)]

# --- messages ----------------------------------------------------------------------------------------------------


class DeveloperMessage(_Wire):
    role: Literal["developer"]
    content: str | TextParts
    name: str | None = None


class SystemMessage(_Wire):
    role: Literal["system"]
    content: str | TextParts
    name: str | None = None


class UserMessage(_Wire):
    role: Literal["user"]
    content: str | Annotated[list[UserContentPart], Field(min_length=1, fail_fast=True)]
    name: str | None = None


class FunctionCall(_Wire):
    """A function call: in an assistant message's ``tool_calls`` and in the deprecated ``function_call``."""

    name: str
    arguments: str


class FunctionToolCall(_Wire):
    id: str
    type: Literal["function"]
    function: FunctionCall


class CustomToolCallBody(_Wire):
    name: str
    input: str


class CustomToolCall(_Wire):
    id: str
    type: Literal["custom"]
    custom: CustomToolCallBody


ToolCall: TypeAlias = Annotated[FunctionToolCall | CustomToolCall, Field(discriminator="type")]


class AssistantMessageAudio(_Wire):
    id: str


class AssistantMessage(_Wire):
    role: Literal["assistant"]
    content: str | Annotated[list[AssistantContentPart], Field(min_length=1, fail_fast=True)] | None = None
    refusal: str | None = None
    name: str | None = None
    audio: AssistantMessageAudio | None = None
    tool_calls: Annotated[list[ToolCall], Field(fail_fast=True)] | None = None
    function_call: FunctionCall | None = None


class ToolMessage(_Wire):
    role: Literal["tool"]
    content: str | TextParts
    tool_call_id: str


class FunctionMessage(_Wire):
    role: Literal["function"]
    content: str | None
    name: str


ChatMessage: TypeAlias = Annotated[
    DeveloperMessage | SystemMessage | UserMessage | AssistantMessage | ToolMessage | FunctionMessage,
    Field(discriminator="role"),
]

# --- tools -------------------------------------------------------------------------------------------------------


class FunctionDefinition(_Wire):
    """``FunctionObject`` (tools) and ``ChatCompletionFunctions`` (the deprecated ``functions``)."""

    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(_Wire):
    type: Literal["function"]
    function: FunctionDefinition


class CustomToolTextFormat(_Closed):
    type: Literal["text"]


class CustomToolGrammar(_Wire):
    definition: str
    syntax: Literal["lark", "regex"]


class CustomToolGrammarFormat(_Closed):
    type: Literal["grammar"]
    grammar: CustomToolGrammar


CustomToolFormat: TypeAlias = Annotated[CustomToolTextFormat | CustomToolGrammarFormat, Field(discriminator="type")]


class CustomToolDefinition(_Wire):
    name: str
    description: str | None = None
    format: CustomToolFormat | None = None


class CustomTool(_Wire):
    type: Literal["custom"]
    custom: CustomToolDefinition


Tool: TypeAlias = Annotated[FunctionTool | CustomTool, Field(discriminator="type")]


class NamedToolChoiceFunction(_Wire):
    name: str


class NamedToolChoice(_Wire):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class NamedCustomToolChoice(_Wire):
    type: Literal["custom"]
    custom: NamedToolChoiceFunction


class AllowedTools(_Wire):
    mode: Literal["auto", "required"]
    tools: Annotated[list[dict[str, Any]], Field(fail_fast=True)]


class AllowedToolsChoice(_Wire):
    type: Literal["allowed_tools"]
    allowed_tools: AllowedTools


ToolChoice: TypeAlias = (
    Literal["none", "auto", "required"]
    | Annotated[AllowedToolsChoice | NamedToolChoice | NamedCustomToolChoice, Field(discriminator="type")]
)


class FunctionCallOption(_Wire):
    name: str


# --- response format ---------------------------------------------------------------------------------------------


class ResponseFormatText(_Wire):
    type: Literal["text"]


class ResponseFormatJSONObject(_Wire):
    type: Literal["json_object"]


class JSONSchemaFormat(_Wire):
    model_config = ConfigDict(extra="allow", populate_by_name=True, serialize_by_alias=True)

    name: FunctionName
    description: str | None = None
    # ``schema`` would shadow a BaseModel attribute: stored as ``schema_``, spelled ``schema`` on the wire.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatJSONSchema(_Wire):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat


ResponseFormat: TypeAlias = Annotated[
    ResponseFormatText | ResponseFormatJSONSchema | ResponseFormatJSONObject, Field(discriminator="type")
]

# --- the other option objects ------------------------------------------------------------------------------------


class StreamOptions(_Wire):
    include_usage: bool | None = None
    include_obfuscation: bool | None = None


class CustomVoice(_Closed):
    id: str


class AudioOutputParams(_Wire):
    voice: str | CustomVoice
    format: Literal["wav", "aac", "mp3", "flac", "opus", "pcm16"]


class PredictionContent(_Wire):
    type: Literal["content"]
    content: str | TextParts


class WebSearchLocation(_Wire):
    country: str | None = None
    region: str | None = None
    city: str | None = None
    timezone: str | None = None


class UserLocation(_Wire):
    type: Literal["approximate"]
    approximate: WebSearchLocation


class WebSearchOptions(_Wire):
    user_location: UserLocation | None = None
    search_context_size: Literal["low", "medium", "high"] | None = None


class PromptCacheOptions(_Wire):
    ttl: Literal["30m"] | None = None
    mode: Literal["implicit", "explicit"] | None = None


class ModerationConfig(_Wire):
    mode: Literal["score", "block"]


class ModerationPolicy(_Wire):
    input: ModerationConfig | None = None
    output: ModerationConfig | None = None


class ModerationParams(_Wire):
    model: str
    policy: ModerationPolicy | None = None


# --- the request -------------------------------------------------------------------------------------------------

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1
# OpenAI accepts at most 300 logit_bias entries: its documented cap (the OpenAPI spec carries no maxProperties).
LogitBias: TypeAlias = Annotated[
    dict[str, Annotated[int, Field(ge=-100, le=100)]], Field(max_length=300, fail_fast=True)
]
# The spec's ``Metadata``: at most 16 pairs, keys of at most 64 characters, values of at most 512 (stated in prose).
Metadata: TypeAlias = Annotated[
    dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
    Field(max_length=16, fail_fast=True),
]


class ChatCompletionRequest(_Wire):
    """OpenAI's ``CreateChatCompletionRequest``. Fields left out of the body are ``None`` (or their spec default)."""

    model: str
    messages: Annotated[list[ChatMessage], Field(min_length=1, fail_fast=True)]

    # sampling
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=128)] | None = None
    stop: str | Annotated[list[str], Field(min_length=1, max_length=4, fail_fast=True)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    logit_bias: LogitBias | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    seed: Annotated[int, Field(ge=_INT64_MIN, le=_INT64_MAX)] | None = None

    # streaming
    stream: bool | None = None
    stream_options: StreamOptions | None = None

    # tools and output shape
    # "A max of 128 functions are supported" (OpenAI's docs; not in the OpenAPI spec).
    tools: Annotated[list[Tool], Field(max_length=128, fail_fast=True)] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    functions: Annotated[list[FunctionDefinition], Field(min_length=1, max_length=128, fail_fast=True)] | None = None
    function_call: Literal["none", "auto"] | FunctionCallOption | None = None
    modalities: Annotated[list[Literal["text", "audio"]], Field(fail_fast=True)] | None = None
    audio: AudioOutputParams | None = None
    prediction: PredictionContent | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    web_search_options: WebSearchOptions | None = None
    moderation: ModerationParams | None = None

    # bookkeeping
    user: str | None = None
    safety_identifier: Annotated[str, Field(max_length=64)] | None = None
    metadata: Metadata | None = None
    store: bool | None = None
    service_tier: Literal["auto", "default", "flex", "scale", "priority", "fast"] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    prompt_cache_options: PromptCacheOptions | None = None

    @property
    def effective_max_tokens(self) -> int | None:
        """The completion budget asked for: ``max_completion_tokens`` wins over the deprecated ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def choice_count(self) -> int:
        """``n``, defaulting to 1."""
        return self.n if self.n is not None else 1

    @property
    def stop_sequences(self) -> list[str]:
        """``stop`` as a list (empty when not given)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a stream must end with a usage chunk (``stream_options.include_usage``)."""
        return bool(self.stream_options is not None and self.stream_options.include_usage)


def message_text(msg: ChatMessage) -> str:
    """The text of a message's content: the string, or its text parts concatenated (other parts ignored)."""
    content = msg.content
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(part.text for part in content if isinstance(part, TextContentPart))


def request_text(request: ChatCompletionRequest) -> str:
    """Every message's text, one message per line (a prompt estimate for token counting)."""
    return "\n".join(message_text(m) for m in request.messages)


def parse_chat_request(body: bytes | str) -> ChatCompletionRequest:
    """Validate a JSON body into a :class:`ChatCompletionRequest`.

    Raises :class:`ozwell_asgi.errors.InvalidRequestError` (400, OpenAI's ``param``/``code``) when it does not.
    """
    return parse_json_body(ChatCompletionRequest, body)
