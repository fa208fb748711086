"""The chat request wire model, its OpenAI-shaped 400s, and the OpenAI schema validator the other tests rely on."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from ozwell_asgi.errors import InvalidRequestError
from ozwell_asgi.wire._errors import (
    INVALID_JSON_MESSAGE,
    MAX_EXAMINED_ERRORS,
    TOO_DEEP_MESSAGE,
    clean_loc,
    describe_error,
    format_param,
    invalid_request,
    pick_error,
)
from ozwell_asgi.wire.chat import (
    AssistantMessage,
    AudioContentPart,
    ChatCompletionRequest,
    CustomTool,
    FileContentPart,
    FunctionTool,
    FunctionToolCall,
    ImageContentPart,
    NamedToolChoice,
    ResponseFormatJSONSchema,
    SystemMessage,
    TextContentPart,
    ToolMessage,
    UserMessage,
    message_text,
    parse_chat_request,
    request_text,
)
from tests.openai_schema import SchemaValidationError, schema_names, validate

USER = {"role": "user", "content": "hi"}

RICH: dict[str, Any] = {
    "model": "echo",
    "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "Be terse."}]},
        {"role": "system", "content": "You are helpful.", "name": "sys"},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "What is in "},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "high"}},
                {"type": "text", "text": "this picture?"},
                {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
                {"type": "file", "file": {"file_id": "file-abc", "filename": "notes.pdf"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "refusal": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is "}, {"type": "refusal", "refusal": "no"}]},
        {"role": "function", "name": "legacy", "content": None},
    ],
    "tools": [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
                "strict": True,
            },
        },
        {
            "type": "custom",
            "custom": {"name": "sql", "format": {"type": "grammar", "grammar": {"definition": "x", "syntax": "lark"}}},
        },
    ],
    "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    "parallel_tool_calls": False,
    "response_format": {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "description": "An answer",
            "schema": {"type": "object", "properties": {"a": {"type": "string"}}},
            "strict": True,
        },
    },
    "stream": True,
    "stream_options": {"include_usage": True, "include_obfuscation": False},
    "n": 2,
    "stop": ["\n\n", "END"],
    "max_tokens": 50,
    "max_completion_tokens": 40,
    "temperature": 0.7,
    "top_p": 1,
    "presence_penalty": -1.5,
    "frequency_penalty": 2,
    "logit_bias": {"50256": -100},
    "logprobs": True,
    "top_logprobs": 5,
    "seed": 42,
    "user": "user-1",
    "metadata": {"k": "v"},
    "store": False,
    "modalities": ["text"],
    "audio": {"voice": {"id": "voice_1"}, "format": "mp3"},
    "prediction": {"type": "content", "content": "predicted"},
    "reasoning_effort": "low",
    "service_tier": "auto",
    "web_search_options": {
        "search_context_size": "low",
        "user_location": {"type": "approximate", "approximate": {"country": "NO", "city": "Oslo"}},
    },
    "verbosity": "low",
    "prompt_cache_key": "pck",
    "safety_identifier": "sid",
    "x_vendor_flag": {"keep": "me"},
}


def test_rich_request_parses_every_feature() -> None:
    req = parse_chat_request(json.dumps(RICH).encode())
    assert req.model == "echo"
    dev, system, user, assistant, tool, assistant2, function = req.messages
    assert isinstance(system, SystemMessage)
    assert system.name == "sys"
    assert isinstance(user, UserMessage)
    assert isinstance(user.content, list)
    kinds = [type(p) for p in user.content]
    assert kinds == [TextContentPart, ImageContentPart, TextContentPart, AudioContentPart, FileContentPart]
    image = user.content[1]
    assert isinstance(image, ImageContentPart)
    assert image.image_url.url == "https://example.com/cat.png"
    assert image.image_url.detail == "high"
    assert message_text(user) == "What is in this picture?"
    assert message_text(dev) == "Be terse."
    assert message_text(assistant) == ""
    assert message_text(assistant2) == "It is "  # refusal parts are not text
    assert message_text(function) == ""
    assert isinstance(assistant, AssistantMessage)
    assert assistant.tool_calls is not None
    call = assistant.tool_calls[0]
    assert isinstance(call, FunctionToolCall)
    assert call.function.arguments == '{"city":"Oslo"}'
    assert isinstance(tool, ToolMessage)
    assert tool.tool_call_id == "call_1"

    assert req.tools is not None
    fn, custom = req.tools
    assert isinstance(fn, FunctionTool)
    assert fn.function.strict is True
    assert fn.function.parameters is not None
    assert fn.function.parameters["required"] == ["city"]
    assert isinstance(custom, CustomTool)
    assert isinstance(req.tool_choice, NamedToolChoice)
    assert req.tool_choice.function.name == "get_weather"
    assert req.parallel_tool_calls is False

    fmt = req.response_format
    assert isinstance(fmt, ResponseFormatJSONSchema)
    assert fmt.json_schema.name == "answer"
    assert fmt.json_schema.schema_ == {"type": "object", "properties": {"a": {"type": "string"}}}
    assert fmt.json_schema.strict is True
    assert fmt.model_dump(exclude_none=True)["json_schema"]["schema"]["type"] == "object"

    assert req.stream is True
    assert req.include_usage is True
    assert req.stream_options is not None
    assert req.stream_options.include_obfuscation is False
    assert req.choice_count == 2
    assert req.stop_sequences == ["\n\n", "END"]
    assert req.effective_max_tokens == 40  # max_completion_tokens wins
    assert (req.temperature, req.top_p, req.presence_penalty, req.frequency_penalty) == (0.7, 1, -1.5, 2)
    assert req.logit_bias == {"50256": -100}
    assert (req.logprobs, req.top_logprobs, req.seed, req.user) == (True, 5, 42, "user-1")
    assert req.metadata == {"k": "v"}
    assert req.audio is not None
    assert req.audio.format == "mp3"
    assert req.web_search_options is not None
    assert req.web_search_options.user_location is not None
    assert req.web_search_options.user_location.approximate.city == "Oslo"
    assert (req.reasoning_effort, req.verbosity, req.service_tier) == ("low", "low", "auto")
    assert req.model_extra == {"x_vendor_flag": {"keep": "me"}}
    assert "What is in this picture?" in request_text(req)


def test_rich_request_is_valid_for_openai_schema_too() -> None:
    # Our fixture must itself be a request OpenAI accepts, apart from the vendor extra.
    body = {k: v for k, v in RICH.items() if k != "x_vendor_flag"}
    validate("CreateChatCompletionRequest", body)


def test_unknown_fields_are_kept_at_every_level() -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}], "mood": "happy"}],
        "future_option": [1, 2],
    }
    req = parse_chat_request(json.dumps(body))
    assert req.model_extra == {"future_option": [1, 2]}
    msg = req.messages[0]
    assert msg.model_extra == {"mood": "happy"}
    assert isinstance(msg.content, list)
    assert msg.content[0].model_extra == {"cache": 1}


def test_defaults_and_helpers_on_a_minimal_request() -> None:
    req = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 7}')
    assert req.effective_max_tokens == 7
    assert req.choice_count == 1
    assert req.stop_sequences == []
    assert req.include_usage is False
    assert req.stream is None
    assert req.model_extra == {}
    assert parse_chat_request(
        b'{"model": "m", "messages": [{"role": "user", "content": "a"}], "stop": "x"}'
    ).stop_sequences == ["x"]
    assert parse_chat_request(json.dumps({"model": "m", "messages": [USER]})).effective_max_tokens is None


def _body(**fields: Any) -> bytes:
    base: dict[str, Any] = {"model": "m", "messages": [USER]}
    base.update(fields)
    return json.dumps(base).encode()


BAD: list[tuple[str, bytes, str | None, str | None]] = [
    ("bad role", _body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "invalid_value"),
    ("missing role", _body(messages=[{"content": "x"}]), "messages[0].role", "missing_required_parameter"),
    ("temperature too high", _body(temperature=3), "temperature", "invalid_value"),
    ("temperature a string", _body(temperature="0.5"), "temperature", "invalid_type"),
    ("n zero", _body(n=0), "n", "invalid_value"),
    ("n too big", _body(n=129), "n", "invalid_value"),
    ("top_logprobs 21", _body(top_logprobs=21), "top_logprobs", "invalid_value"),
    ("stop five entries", _body(stop=["a", "b", "c", "d", "e"]), "stop", "invalid_value"),
    ("missing model", json.dumps({"messages": [USER]}).encode(), "model", "missing_required_parameter"),
    ("missing messages", b'{"model": "m"}', "messages", "missing_required_parameter"),
    ("empty messages", _body(messages=[]), "messages", "invalid_value"),
    ("messages not a list", _body(messages="hi"), "messages", "invalid_type"),
    (
        "content wrong type",
        _body(messages=[USER, {"role": "user", "content": 5}]),
        "messages[1].content",
        "invalid_type",
    ),
    (
        "text part without text",
        _body(messages=[{"role": "user", "content": [{"type": "text"}]}]),
        "messages[0].content[0].text",
        "missing_required_parameter",
    ),
    (
        "unknown part type",
        _body(messages=[{"role": "user", "content": [{"type": "video"}]}]),
        "messages[0].content[0].type",
        "invalid_value",
    ),
    (
        "bad image detail",
        _body(
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u", "detail": "max"}}]}]
        ),
        "messages[0].content[0].image_url.detail",
        "invalid_value",
    ),
    (
        "tool without function name",
        _body(tools=[{"type": "function", "function": {"parameters": {}}}]),
        "tools[0].function.name",
        "missing_required_parameter",
    ),
    (
        "tool function name not a string",
        _body(tools=[{"type": "function", "function": {"name": 1}}]),
        "tools[0].function.name",
        "invalid_type",
    ),
    ("tool_choice bad string", _body(tool_choice="always"), "tool_choice", "invalid_value"),
    ("tool_choice a number", _body(tool_choice=3), "tool_choice", "invalid_type"),
    (
        "tool_choice without name",
        _body(tool_choice={"type": "function", "function": {}}),
        "tool_choice.function.name",
        "missing_required_parameter",
    ),
    (
        "json_schema without name",
        _body(response_format={"type": "json_schema", "json_schema": {"schema": {}}}),
        "response_format.json_schema.name",
        "missing_required_parameter",
    ),
    ("unknown response_format", _body(response_format={"type": "yaml"}), "response_format.type", "invalid_value"),
    ("presence_penalty low", _body(presence_penalty=-2.5), "presence_penalty", "invalid_value"),
    ("top_p high", _body(top_p=1.5), "top_p", "invalid_value"),
    ("logit_bias out of range", _body(logit_bias={"1": 101}), "logit_bias.1", "invalid_value"),
    ("stream not bool", _body(stream="yes"), "stream", "invalid_type"),
    (
        "include_usage not bool",
        _body(stream_options={"include_usage": "yes"}),
        "stream_options.include_usage",
        "invalid_type",
    ),
    (
        "tool message without id",
        _body(messages=[{"role": "tool", "content": "x"}]),
        "messages[0].tool_call_id",
        "missing_required_parameter",
    ),
    ("max_tokens not int", _body(max_tokens=1.5), "max_tokens", "invalid_type"),
    (
        "tool_call function without arguments",
        _body(
            messages=[{"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]}]
        ),
        "messages[0].tool_calls[0].function.arguments",
        "missing_required_parameter",
    ),
    ("stop entry not a string", _body(stop=["a", 1]), "stop[1]", "invalid_type"),
    ("modalities bad entry", _body(modalities=["text", "video"]), "modalities[1]", "invalid_value"),
    # OpenAI's fixed limits
    ("metadata 17 pairs", _body(metadata={f"k{i}": "v" for i in range(17)}), "metadata", "invalid_value"),
    ("metadata value 513", _body(metadata={"k": "v" * 513}), "metadata.k", "invalid_value"),
    ("metadata value not a string", _body(metadata={"k": 1}), "metadata.k", "invalid_type"),
    ("metadata key 65", _body(metadata={"k" * 65: "v"}), "metadata." + "k" * 65, "invalid_value"),
    ("logit_bias 301 entries", _body(logit_bias={str(i): 1 for i in range(301)}), "logit_bias", "invalid_value"),
    (
        "tools 129",
        _body(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]),
        "tools",
        "invalid_value",
    ),
    (
        "tool name with a dot",
        _body(
            tools=[{"type": "function", "function": {"name": "ok"}}, {"type": "function", "function": {"name": "a.b"}}]
        ),
        "tools[1].function.name",
        "invalid_value",
    ),
    (
        "tool name 65",
        _body(tools=[{"type": "function", "function": {"name": "f" * 65}}]),
        "tools[0].function.name",
        "invalid_value",
    ),
    ("functions name with a space", _body(functions=[{"name": "a b"}]), "functions[0].name", "invalid_value"),
    (
        "json_schema name with a slash",
        _body(response_format={"type": "json_schema", "json_schema": {"name": "a/b"}}),
        "response_format.json_schema.name",
        "invalid_value",
    ),
    (
        "unknown field in a closed object",
        _body(audio={"voice": {"id": "v", "color": "blue", "size": 2}, "format": "mp3"}),
        "audio.voice.color",
        "unknown_parameter",
    ),
    (
        "unknown field in a closed custom tool format",
        _body(tools=[{"type": "custom", "custom": {"name": "x", "format": {"type": "text", "x": 1}}}]),
        "tools[0].custom.format.x",
        "unknown_parameter",
    ),
    ("malformed JSON", b'{"model": "m", "messages": [', None, None),
    ("empty body", b"", None, None),
    ("JSON array body", b'[{"model": "m"}]', None, "invalid_type"),
    ("JSON string body", b'"hello"', None, "invalid_type"),
]


@pytest.mark.parametrize(("body", "param", "code"), [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_requests_map_to_openai_errors(body: bytes, param: str | None, code: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body)
    err = info.value
    assert err.status == 400
    assert err.type == "invalid_request_error"
    assert (err.param, err.code) == (param, code)
    envelope = err.to_dict()["error"]
    assert isinstance(envelope, dict)
    assert set(envelope) == {"message", "type", "param", "code"}
    msg = err.message
    assert msg
    for leak in (
        "pydantic",
        "errors.pydantic.dev",
        "list[",
        "function-after",
        "tagged-union",
        "literal[",
        "Input should",
        "ChatCompletionRequest",
        "Message",
    ):
        assert leak not in msg, (leak, msg)
    if param is not None:
        assert (
            f"'{param}'" in msg
            or f"supplied: {param}" in msg
            or msg.startswith(("Invalid value:", "Invalid property name in"))
        ), msg
    validate("ErrorResponse", err.to_dict())


def test_exact_messages_for_the_common_cases() -> None:
    def message(body: bytes) -> str:
        with pytest.raises(InvalidRequestError) as info:
            parse_chat_request(body)
        return info.value.message

    assert message(b'{"model": "m"}') == "Missing required parameter: 'messages'."
    assert message(b"{oops") == INVALID_JSON_MESSAGE
    assert "help.openai.com" not in INVALID_JSON_MESSAGE
    assert message(_body(temperature=3)) == (
        "Invalid 'temperature': decimal above maximum value. Expected a value <= 2, but got 3 instead."
    )
    assert message(_body(n=0)) == "Invalid 'n': integer below minimum value. Expected a value >= 1, but got 0 instead."
    assert message(_body(messages=[{"role": "robot", "content": "x"}])) == (
        "Invalid value: 'robot'. Supported values are: "
        "'developer', 'system', 'user', 'assistant', 'tool', and 'function'."
    )
    assert message(_body(messages=[USER, {"role": "user", "content": 5}])) == (
        "Invalid type for 'messages[1].content': expected one of a string or array of objects, but got an integer "
        "instead."
    )
    assert message(_body(stop=["a"] * 5)) == (
        "Invalid 'stop': array too long. "
        "Expected an array with maximum length 4, but got an array with length 5 instead."
    )


def test_openai_limits_answer_in_openai_words() -> None:
    def message(body: bytes) -> str:
        with pytest.raises(InvalidRequestError) as info:
            parse_chat_request(body)
        return info.value.message

    assert message(_body(metadata={f"k{i}": "v" for i in range(17)})) == (
        "Invalid 'metadata': too many properties. "
        "Expected an object with at most 16 properties, but got an object with 17 properties instead."
    )
    assert message(_body(metadata={"actual": "v" * 695})) == (
        "Invalid 'metadata.actual': string too long. "
        "Expected a string with maximum length 512, but got a string with length 695 instead."
    )
    assert message(_body(metadata={"k" * 65: "v"})) == (
        f"Invalid property name in 'metadata': '{'k' * 65}' is too long. "
        "Expected a string with maximum length 64, but got a string with length 65 instead."
    )
    assert message(_body(logit_bias={str(i): 0 for i in range(1000)})) == (
        "Invalid 'logit_bias': too many properties. "
        "Expected an object with at most 300 properties, but got an object with 1000 properties instead."
    )
    assert message(_body(tools=[{"type": "function", "function": {"name": "f"}}] * 325)) == (
        "Invalid 'tools': array too long. "
        "Expected an array with maximum length 128, but got an array with length 325 instead."
    )
    assert message(_body(tools=[{"type": "function", "function": {"name": "mcp.search"}}])) == (
        "Invalid 'tools[0].function.name': string does not match pattern. "
        "Expected a string that matches the pattern '^[a-zA-Z0-9_-]+$'."
    )
    assert message(_body(tools=[{"type": "function", "function": {"name": "f" * 70}}])) == (
        "Invalid 'tools[0].function.name': string too long. "
        "Expected a string with maximum length 64, but got a string with length 70 instead."
    )
    assert message(_body(audio={"voice": {"id": "v", "color": "blue"}, "format": "mp3"})) == (
        "Unrecognized request argument supplied: audio.voice.color"
    )


def test_limits_accept_what_openai_accepts() -> None:
    at_the_limits = _body(
        metadata={f"{i:02d}" + "k" * 62: "v" * 512 for i in range(16)},
        logit_bias={str(i): 100 for i in range(300)},
        tools=[{"type": "function", "function": {"name": f"{i}-_" + "a" * 58}} for i in range(128)],
        functions=[{"name": "A-z_0-9"}] * 128,
        stop=["a", "b", "c", "d"],
        n=128,
        response_format={"type": "json_schema", "json_schema": {"name": "x" * 64}},
    )
    req = parse_chat_request(at_the_limits)
    assert req.metadata is not None and len(req.metadata) == 16
    assert req.logit_bias is not None and len(req.logit_bias) == 300
    assert req.tools is not None and len(req.tools) == 128
    assert all(len(key) == 64 for key in req.metadata)


def test_union_type_errors_list_the_member_kinds() -> None:
    def message(body: bytes) -> str:
        with pytest.raises(InvalidRequestError) as info:
            parse_chat_request(body)
        return info.value.message

    # The contract's own example.
    assert message(_body(messages=[{"role": "user", "content": {"type": "text", "text": "hi"}}])) == (
        "Invalid type for 'messages[0].content': expected one of a string or array of objects, but got an object "
        "instead."
    )
    for role in ("system", "developer", "tool", "assistant"):
        msg = {"role": role, "content": 7, "tool_call_id": "c"}
        assert "expected one of a string or array of objects, but got an integer" in message(_body(messages=[msg]))
    assert message(_body(stop=5)) == (
        "Invalid type for 'stop': expected one of a string or array of strings, but got an integer instead."
    )
    assert message(_body(tool_choice=3)) == (
        "Invalid type for 'tool_choice': expected one of a string or an object, but got an integer instead."
    )
    assert message(_body(audio={"voice": [], "format": "mp3"})) == (
        "Invalid type for 'audio.voice': expected one of a string or an object, but got an array instead."
    )
    # Not a union: one kind.
    assert message(_body(tools={"type": "function"})) == (
        "Invalid type for 'tools': expected an array, but got an object instead."
    )


def test_hostile_bodies_yield_a_handful_of_errors() -> None:
    # Pydantic reports every error it finds; the wire models stop at the first bad item of any list or map and at
    # the first unknown field of a closed object, so the error count never grows with the body.
    many = 20_000
    hostile = {
        "bad messages": _body(messages=[{"role": "robot"}] * many),
        "bad parts": _body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}] * many}]),
        "bad tool calls": _body(messages=[{"role": "assistant", "tool_calls": [{"id": 1}] * many}]),
        "bad stop": _body(stop=[1] * many),
        "bad tools": _body(tools=[{"type": "function", "function": {}}] * many),
        "bad functions": _body(functions=[{}] * many),
        "bad modalities": _body(modalities=["video"] * many),
        "bad metadata": _body(metadata={f"k{i}": i for i in range(many)}),
        "bad logit_bias": _body(logit_bias={str(i): 1000 for i in range(many)}),
        "bad allowed tools": _body(
            tool_choice={"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [1] * many}}
        ),
        "unknown fields of a closed object": _body(
            audio={"voice": {"id": "v"} | {f"x{i}": 1 for i in range(many)}, "format": "mp3"}
        ),
        "too many metadata pairs": _body(metadata={f"k{i}": "v" for i in range(many)}),
    }
    for name, body in hostile.items():
        with pytest.raises(ValidationError) as info:
            ChatCompletionRequest.model_validate_json(body, strict=True)
        assert info.value.error_count() <= 10, (name, info.value.error_count())
        with pytest.raises(InvalidRequestError) as mapped:
            parse_chat_request(body)
        assert mapped.value.param is not None and len(mapped.value.param) < 200, name


def test_the_mapper_reads_a_bounded_number_of_errors() -> None:
    # A model without fail_fast (a host's own, say) can hand over 50,000 errors: only the first ones are read, so
    # the deep error at the end is not the one reported, and no work is done per remaining error.
    from pydantic import BaseModel, Field

    class Loose(BaseModel):
        items: list[int | bool]
        deep: list[list[int]] = Field(default_factory=list)

    body = {"items": ["x"] * 50_000, "deep": [[1, "y"]]}
    with pytest.raises(ValidationError) as info:
        Loose.model_validate(body, strict=True)
    assert info.value.error_count() > 100_000
    errors = info.value.errors(include_url=False)
    err, path, siblings = pick_error(errors, body)
    assert path == ["items", 0]
    assert [e["type"] for e in siblings] == ["int_type", "bool_type"]  # both alternatives of items[0]
    assert errors.index(err) < MAX_EXAMINED_ERRORS
    assert describe_error(err, path, siblings[1:]).message == (
        "Invalid type for 'items[0]': expected one of an integer or a boolean, but got a string instead."
    )


def test_deep_json_is_refused_in_bounded_time() -> None:
    # Valid JSON nested a million levels deep, where the model accepts anything (a function's parameters).
    depth = 1_000_000
    tool = '{"type": "function", "function": {"name": "f", "parameters": {"a": ' + "[" * depth + "]" * depth + "}}}"
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [' + tool.encode() + b"]}"
    with pytest.raises(InvalidRequestError) as info:
        parse_chat_request(body)
    assert (info.value.status, info.value.param, info.value.message) == (400, None, TOO_DEEP_MESSAGE)
    shallow = '{"type": "function", "function": {"name": "f", "parameters": {"a": ' + "[" * 100 + "]" * 100 + "}}}"
    parse_chat_request(
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [' + shallow.encode() + b"]}"
    )


def test_error_cleaner_is_generic() -> None:
    # Labels pydantic adds (union members, discriminator tags) are dropped; body keys and indexes are kept.
    root = {"a": [{"b": {"c": 1}}]}
    assert clean_loc(("a", 0, "tag", "b", "list[str]", "c"), root) == ["a", 0, "b", "c"]
    assert clean_loc(("a", 0, "b", "missing"), root, keep_last=True) == ["a", 0, "b", "missing"]
    assert clean_loc(("a", 0, "b", "missing"), root) == ["a", 0, "b"]
    # OpenAI's spelling: indexes in brackets, keys after dots (a body key that looks like a number stays a key).
    assert format_param(["a", 0, "b", "c"]) == "a[0].b.c"
    assert format_param(["logit_bias", "50256"]) == "logit_bias.50256"
    assert format_param(["tools", 1, "function", "name"]) == "tools[1].function.name"
    assert format_param([]) is None
    assert format_param(["metadata", "k" * 500]) == "metadata." + "k" * 100 + "..."

    from pydantic import BaseModel, Field

    class Other(BaseModel):
        items: list[int | None] = Field(max_length=2)

    try:
        Other.model_validate({"items": [1, "x"]}, strict=True)
    except ValidationError as exc:
        wire = invalid_request(exc, {"items": [1, "x"]})
    else:  # pragma: no cover
        pytest.fail("expected a ValidationError")
    assert (wire.param, wire.code) == ("items[1]", "invalid_type")
    assert wire.message == "Invalid type for 'items[1]': expected an integer, but got a string instead."


def test_chat_request_model_is_fast_path_model_validate_json() -> None:
    # Python-side construction works too (routes and backends may build requests in code).
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": [USER]})
    assert isinstance(req.messages[0], UserMessage)


# --- the schema validator used by the endpoint tests ---------------------------------------------------------------

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "echo",
    "choices": [
        {
            "index": 0,
            "finish_reason": "stop",
            "logprobs": None,
            "message": {"role": "assistant", "content": "hi", "refusal": None},
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
}


def test_schema_validator_accepts_nullable_fields_set_to_null() -> None:
    validate("CreateChatCompletionResponse", COMPLETION)
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "echo",
        "choices": [
            {"index": 0, "delta": {"role": "assistant", "content": "hi"}, "finish_reason": None, "logprobs": None}
        ],
        "usage": None,
    }
    validate("CreateChatCompletionStreamResponse", chunk)
    validate("ErrorResponse", {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}})
    validate(
        "ListModelsResponse",
        {"object": "list", "data": [{"id": "echo", "object": "model", "created": 0, "owned_by": "ozwell"}]},
    )
    validate(
        "CreateChatCompletionRequest", {"model": "m", "messages": [USER], "stop": None, "n": None, "prediction": None}
    )


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda b: b.pop("choices"), id="missing choices"),
        pytest.param(lambda b: b.update(created="yesterday"), id="created not an integer"),
        pytest.param(lambda b: b.update(object="chat.completion.chunk"), id="wrong object"),
        pytest.param(lambda b: b["choices"][0].update(finish_reason="done"), id="bad finish_reason"),
        pytest.param(lambda b: b["choices"][0]["message"].pop("role"), id="message without role"),
        pytest.param(lambda b: b["choices"][0].update(logprobs=5), id="logprobs a number"),
        pytest.param(lambda b: b["choices"][0]["message"].update(content=None, refusal=7), id="refusal a number"),
    ],
)
def test_schema_validator_rejects_bad_bodies(mutate: Any) -> None:
    body = json.loads(json.dumps(COMPLETION))
    mutate(body)
    with pytest.raises(SchemaValidationError, match="CreateChatCompletionResponse"):
        validate("CreateChatCompletionResponse", body)


def test_schema_validator_rejects_bad_request_and_unknown_names() -> None:
    with pytest.raises(SchemaValidationError):
        validate("CreateChatCompletionRequest", {"model": "m", "messages": []})
    with pytest.raises(SchemaValidationError):
        validate("CreateChatCompletionRequest", {"model": "m", "messages": [USER], "temperature": 5})
    with pytest.raises(KeyError):
        validate("NoSuchSchema", {})


def test_extracted_schemas_cover_the_endpoints() -> None:
    names = set(schema_names())
    for wanted in (
        "CreateChatCompletionRequest",
        "CreateChatCompletionResponse",
        "CreateChatCompletionStreamResponse",
        "ListModelsResponse",
        "Model",
        "Error",
        "ErrorResponse",
        "OpenAIFile",
        "ListFilesResponse",
        "DeleteFileResponse",
        "CreateEmbeddingResponse",
        "Response",
        "ResponseStreamEvent",
    ):
        assert wanted in names
