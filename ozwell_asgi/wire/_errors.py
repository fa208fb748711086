"""Turn pydantic validation failures into OpenAI's single-error 400 (``param``, ``message``, ``code``).

Generic over every wire model (chat, embeddings, responses...): nothing here knows a field name. Pydantic puts
union member labels (``str``, ``list[...]``, ``function-after[...]``, ``tagged-union[...]``) and discriminator tag
values into an error's ``loc``; :func:`clean_loc` drops them by walking the ``loc`` along the request body actually
sent, keeping only the keys and indexes that exist in it, and :func:`format_param` spells the result as OpenAI
does, so ``('messages', 0, 'user', 'content', 'str')`` becomes ``messages[0].content``. OpenAI reports one error
per request; :func:`pick_error` chooses the most specific one. Messages follow OpenAI's wording and never contain
pydantic internals (class names, union labels, doc URLs).

Bounded work on hostile bodies: the mapper reads at most :data:`MAX_EXAMINED_ERRORS` errors, each in time linear in
its ``loc``; names and values echoed back are cut to 100 characters. Pydantic itself collects every error it finds,
so wire models keep that number small: lists and maps are ``fail_fast`` (stop at the first bad item) and closed
objects report only their first unknown field (:func:`unknown_field`), so no error count grows with the body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Self, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic_core import ErrorDetails, PydanticCustomError, from_json

from ..errors import InvalidRequestError

__all__ = [
    "ClosedModel",
    "INVALID_JSON_MESSAGE",
    "MAX_EXAMINED_ERRORS",
    "NOT_AN_OBJECT_MESSAGE",
    "TOO_DEEP_MESSAGE",
    "WireError",
    "clean_loc",
    "describe_error",
    "format_param",
    "invalid_request",
    "parse_json_body",
    "pick_error",
    "unknown_field",
]

INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)
NOT_AN_OBJECT_MESSAGE = "The request body must be a JSON object."
TOO_DEEP_MESSAGE = (
    "We could not parse the JSON body of your request: it nests arrays and objects more deeply than we accept."
)

CODE_MISSING = "missing_required_parameter"
CODE_INVALID_VALUE = "invalid_value"
CODE_INVALID_TYPE = "invalid_type"
CODE_UNKNOWN = "unknown_parameter"

M = TypeVar("M", bound=BaseModel)


class WireError(NamedTuple):
    """One request error as OpenAI reports it."""

    param: str | None
    message: str
    code: str | None


# What each pydantic type-mismatch error says was expected.
_EXPECTED: dict[str, str] = {
    "string_type": "a string",
    "string_unicode": "a string",
    "str_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a decimal",
    "float_parsing": "a decimal",
    "decimal_type": "a decimal",
    "decimal_parsing": "a decimal",
    "bool_type": "a boolean",
    "bool_parsing": "a boolean",
    "list_type": "an array",
    "tuple_type": "an array",
    "set_type": "an array",
    "frozen_set_type": "an array",
    "iterable_type": "an array",
    "dict_type": "an object",
    "mapping_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "dataclass_type": "an object",
    "dataclass_exact_type": "an object",
    "typed_dict_type": "an object",
    "none_required": "null",
    "bytes_type": "a string",
    "url_type": "a string",
}
_VALUE_ERRORS_ON_SCALARS = frozenset({"literal_error", "enum"})

_TYPE_RANK = 1  # a branch whose shape did not even match
_VALUE_RANK = 2  # right shape, wrong value or a missing member

MAX_EXAMINED_ERRORS = 100
"""Errors read to choose the one reported (pydantic lists them in document order; union branches are adjacent)."""

_MAX_ECHO = 100  # characters of a value or a body key echoed back in a message or a param

_KEY_LABEL = "[key]"  # pydantic's loc label for an error in a mapping's key rather than its value
_SEQUENCE_LABELS = ("list[", "tuple[", "set[", "frozenset[")

# What an array's items are, from the label pydantic gives a union's sequence member (``list[str]``...).
_ITEM_KINDS: dict[str, str] = {"str": "strings", "int": "integers", "float": "decimals", "bool": "booleans"}


def unknown_field(key: str) -> PydanticCustomError:
    """The error a closed wire model raises for its first unknown field ``key`` (reported at ``<object>.<key>``).

    Pydantic's own ``extra="forbid"`` reports every unknown field, one error each; a closed model instead allows
    extras and raises this once from an after-validator, so a body with a million unknown keys costs one error.
    """
    return PydanticCustomError("extra_forbidden", "Extra inputs are not permitted", {"key": key})


class ClosedModel(BaseModel):
    """A wire object that the spec (or we) close: an unknown field is a 400 naming the first one.

    Not ``extra="forbid"``: pydantic would report every unknown field, one error each, however many were sent.
    """

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="after")
    def _no_unknown_fields(self) -> Self:
        if self.__pydantic_extra__:
            raise unknown_field(next(iter(self.__pydantic_extra__)))
        return self


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "an unsupported value"


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_ECHO else text[:_MAX_ECHO] + "..."


def _repr(value: object) -> str:
    if isinstance(value, str):
        return repr(_clip(value))
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, int | float):
        return str(value)
    return _json_kind(value)


def _oxford(quoted: str) -> str:
    """``"'a', 'b' or 'c'"`` -> ``"'a', 'b', and 'c'"`` (OpenAI's spelling of a list of supported values)."""
    if " or " not in quoted:
        return quoted
    head, last = quoted.rsplit(" or ", 1)
    return f"{head}, and {last}" if "," in head else f"{head} and {last}"


def clean_loc(loc: Sequence[int | str], root: object, *, keep_last: bool = False) -> list[int | str]:
    """The path of ``loc`` through ``root`` (the body sent), without pydantic's union labels and tag values.

    Keys (``str``) and indexes (``int``) that exist in the body are kept; anything else is a label and dropped,
    except the last element when ``keep_last`` (a missing or unknown field, which by nature is not in the body...
    or is). Linear in ``len(loc)``: one dict lookup or index per element.
    """
    parts: list[int | str] = []
    cur: object = root
    last = len(loc) - 1
    for i, item in enumerate(loc):
        if isinstance(cur, dict):
            if isinstance(item, str) and item in cur:
                parts.append(item)
                cur = cur[item]
                continue
        elif (
            isinstance(cur, list)
            and isinstance(item, int)
            and not isinstance(item, bool)
            and -len(cur) <= item < len(cur)
        ):
            parts.append(item)
            cur = cur[item]
            continue
        if i == last and keep_last and isinstance(item, str) and isinstance(cur, dict):
            parts.append(item)
    return parts


def format_param(path: Sequence[int | str]) -> str | None:
    """OpenAI's spelling of a body path: ``messages[0].content``, ``metadata.key``; ``None`` for the body itself.

    A key longer than 100 characters is cut there and ends in ``...`` (a hostile key is not echoed whole).
    """
    out: list[str] = []
    for item in path:
        if isinstance(item, int):
            out.append(f"[{item}]")
        else:
            out.append(f".{_clip(item)}" if out else _clip(item))
    return "".join(out) or None


def _path(err: ErrorDetails, root: object) -> list[int | str]:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    if etype == "extra_forbidden" and isinstance(ctx.get("key"), str):  # unknown_field(): the key is in ctx
        return [*clean_loc(err["loc"], root), ctx["key"]]
    parts = clean_loc(err["loc"], root, keep_last=etype in ("missing", "extra_forbidden"))
    if etype in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(ctx.get("discriminator", "")).strip("'\"")
        if disc.isidentifier():
            parts.append(disc)
    return parts


def _rank(err: ErrorDetails) -> int:
    etype = err["type"]
    if etype in _VALUE_ERRORS_ON_SCALARS:
        # A literal branch handed a value of another JSON type (an object, a number for string literals...) is a
        # shape mismatch, not a bad value.
        value = err.get("input")
        if isinstance(value, dict | list):
            return _TYPE_RANK
        string_literals = "'" in str(err.get("ctx", {}).get("expected", ""))
        if string_literals != isinstance(value, str):
            return _TYPE_RANK
        return _VALUE_RANK
    if etype in _EXPECTED:
        return _TYPE_RANK
    return _VALUE_RANK


def pick_error(
    errors: Sequence[ErrorDetails], root: object
) -> tuple[ErrorDetails, list[int | str], list[ErrorDetails]]:
    """The single most useful error: the deepest path into the body, a value error before a type mismatch.

    Only the first :data:`MAX_EXAMINED_ERRORS` errors are read. Returns the error, its cleaned path, and the other
    errors read at the same path (for merging union alternatives).
    """
    examined = errors[:MAX_EXAMINED_ERRORS]
    paths = [_path(e, root) for e in examined]
    best = max(range(len(examined)), key=lambda i: (len(paths[i]), _rank(examined[i])))  # first of the best
    chosen, chosen_path = examined[best], paths[best]
    siblings = [e for e, p in zip(examined, paths, strict=True) if p == chosen_path]
    return chosen, chosen_path, siblings


def _sequence_item_kind(err: ErrorDetails) -> str | None:
    """``"objects"`` for a union member labelled ``list[TextContentPart]``, ``"strings"`` for ``list[str]``..."""
    label = err["loc"][-1] if err["loc"] else None
    if not isinstance(label, str) or not label.endswith("]"):
        return None
    prefix = next((p for p in _SEQUENCE_LABELS if label.startswith(p)), None)
    if prefix is None:
        return None
    inner = label[len(prefix) : -1]
    base = inner.split("[", 1)[0].removeprefix("constrained-")
    if base in _ITEM_KINDS:
        return _ITEM_KINDS[base]
    if base == "literal":
        return "strings" if inner.startswith("literal['") else None
    if inner.startswith(_SEQUENCE_LABELS):
        return "arrays"
    if base in ("dict", "tagged-union", "typed-dict", "model", "dataclass") or base[:1].isupper():
        return "objects"  # a model's label is its class name
    return None


def _expected(err: ErrorDetails) -> str:
    """What a type-mismatch error says was expected, as OpenAI words it (``a string``, ``array of objects``)."""
    etype = err["type"]
    if etype in _VALUE_ERRORS_ON_SCALARS:
        return "a string" if "'" in str(err.get("ctx", {}).get("expected", "")) else "a number"
    if etype in ("list_type", "tuple_type", "set_type", "frozen_set_type", "iterable_type"):
        items = _sequence_item_kind(err)
        if items is not None:
            return f"array of {items}"
    return _EXPECTED.get(etype, "a valid value")


def _at_key(err: ErrorDetails) -> bool:
    return bool(err["loc"]) and err["loc"][-1] == _KEY_LABEL


def describe_error(err: ErrorDetails, path: Sequence[int | str], siblings: Sequence[ErrorDetails] = ()) -> WireError:
    """OpenAI's message and code for one pydantic error at ``path`` (cleaned: keys and indexes of the body)."""
    etype = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    param = format_param(path)
    name = param if param is not None else "body"

    if etype == "missing" or etype == "union_tag_not_found":
        return WireError(param, f"Missing required parameter: '{name}'.", CODE_MISSING)
    if etype == "extra_forbidden":
        return WireError(param, f"Unrecognized request argument supplied: {name}", CODE_UNKNOWN)
    if _rank(err) == _TYPE_RANK:
        expected: list[str] = []
        for sib in (err, *siblings):
            if _rank(sib) == _TYPE_RANK and (exp := _expected(sib)) not in expected:
                expected.append(exp)
        if param is None and expected == ["an object"]:
            return WireError(None, NOT_AN_OBJECT_MESSAGE, CODE_INVALID_TYPE)
        want = f"one of {', '.join(expected[:-1])} or {expected[-1]}" if len(expected) > 1 else expected[0]
        got = _json_kind(value)
        return WireError(
            param, f"Invalid type for '{name}': expected {want}, but got {got} instead.", CODE_INVALID_TYPE
        )
    if _at_key(err) and etype in ("string_too_long", "string_too_short", "string_pattern_mismatch"):
        # A map's key (``metadata`` keys): OpenAI names the map and quotes the key.
        owner = format_param(path[:-1]) or "body"
        if etype == "string_pattern_mismatch":
            problem = f"does not match pattern. Expected a string that matches the pattern '{ctx.get('pattern')}'."
        else:
            size, limit_name = ("long", "maximum") if etype == "string_too_long" else ("short", "minimum")
            limit = ctx.get("max_length" if size == "long" else "min_length")
            length = len(value) if isinstance(value, str) else "?"
            problem = (
                f"is too {size}. Expected a string with {limit_name} length {limit}, but got a string with length "
                f"{length} instead."
            )
        return WireError(param, f"Invalid property name in '{owner}': {_repr(value)} {problem}", CODE_INVALID_VALUE)
    if etype in ("literal_error", "enum"):
        supported = _oxford(str(ctx.get("expected", "")))
        return WireError(
            param, f"Invalid value: {_repr(value)}. Supported values are: {supported}.", CODE_INVALID_VALUE
        )
    if etype == "union_tag_invalid":
        tags = str(ctx.get("expected_tags", ""))
        if ", " in tags:
            head, last = tags.rsplit(", ", 1)
            supported = f"{head}, and {last}"
        else:
            supported = tags
        tag = ctx.get("tag", value)
        disc = str(ctx.get("discriminator", "")).strip("'\"")
        if isinstance(value, dict) and disc in value:
            tag = value[disc]  # the value sent, not pydantic's str() of it
        return WireError(param, f"Invalid value: {_repr(tag)}. Supported values are: {supported}.", CODE_INVALID_VALUE)
    if etype in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        if etype.startswith("greater"):
            bound, op, where = ctx.get("ge", ctx.get("gt")), (">=" if etype == "greater_than_equal" else ">"), "below"
            what = "minimum"
        else:
            bound, op, where = ctx.get("le", ctx.get("lt")), ("<=" if etype == "less_than_equal" else "<"), "above"
            what = "maximum"
        # The field's type shows in its bound: pydantic hands float bounds for float fields.
        kind = "decimal" if isinstance(bound, float) or isinstance(value, float) else "integer"
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return WireError(
            param,
            f"Invalid '{name}': {kind} {where} {what} value. Expected a value {op} {bound}, but got {_repr(value)} "
            "instead.",
            CODE_INVALID_VALUE,
        )
    if etype in ("too_short", "too_long") and isinstance(value, dict):
        # A map (``metadata``, ``logit_bias``). Pydantic stops counting past the maximum: the length is the body's.
        if etype == "too_long":
            bound_text = f"at most {ctx.get('max_length')}"
            problem = "too many"
        else:
            bound_text = f"at least {ctx.get('min_length')}"
            problem = "too few"
        return WireError(
            param,
            f"Invalid '{name}': {problem} properties. Expected an object with {bound_text} properties, but got an "
            f"object with {len(value)} properties instead.",
            CODE_INVALID_VALUE,
        )
    if etype == "too_short":
        minimum = ctx.get("min_length")
        if isinstance(value, list) and not value:
            return WireError(
                param,
                f"Invalid '{name}': empty array. Expected an array with minimum length {minimum}, but got an empty "
                "array instead.",
                CODE_INVALID_VALUE,
            )
        length = _length(value)
        return WireError(
            param,
            f"Invalid '{name}': array too short. Expected an array with minimum length {minimum}, but got an array "
            f"with length {length} instead.",
            CODE_INVALID_VALUE,
        )
    if etype == "too_long":
        length = _length(value)
        return WireError(
            param,
            f"Invalid '{name}': array too long. Expected an array with maximum length {ctx.get('max_length')}, but "
            f"got an array with length {length} instead.",
            CODE_INVALID_VALUE,
        )
    if etype in ("string_too_long", "string_too_short"):
        size = "long" if etype == "string_too_long" else "short"
        limit_name = "maximum" if size == "long" else "minimum"
        limit = ctx.get("max_length" if size == "long" else "min_length")
        return WireError(
            param,
            f"Invalid '{name}': string too {size}. Expected a string with {limit_name} length {limit}, but got a "
            f"string with length {_length(value)} instead.",
            CODE_INVALID_VALUE,
        )
    if etype == "string_pattern_mismatch":
        return WireError(
            param,
            f"Invalid '{name}': string does not match pattern. Expected a string that matches the pattern "
            f"'{ctx.get('pattern')}'.",
            CODE_INVALID_VALUE,
        )
    if etype in ("value_error", "assertion_error"):
        # Our own validators raise ValueError with a message meant for the client.
        reason = ctx.get("error")
        text = str(reason) if reason is not None else str(err.get("msg", ""))
        text = text.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return WireError(param, f"Invalid value for '{name}': {text}", CODE_INVALID_VALUE)
    return WireError(param, f"Invalid value for '{name}': {_repr(value)} is not supported.", CODE_INVALID_VALUE)


def _length(value: object) -> int | str:
    """The length of what was sent (pydantic stops counting a too-long sequence or map at its maximum)."""
    return len(value) if isinstance(value, str | list | dict) else "?"


def _wire_error(errors: Sequence[ErrorDetails], root: object) -> WireError:
    if not errors:  # pragma: no cover - pydantic never raises an empty ValidationError
        return WireError(None, "Invalid request.", CODE_INVALID_VALUE)
    err, path, siblings = pick_error(errors, root)
    return describe_error(err, path, [s for s in siblings if s is not err])


def invalid_request(exc: ValidationError, root: object) -> WireError:
    """The one OpenAI error for ``exc``, raised while validating ``root`` (the decoded body)."""
    return _wire_error(exc.errors(include_url=False), root)


def parse_json_body(model: type[M], body: bytes | str) -> M:
    """Validate JSON ``body`` straight into ``model`` (strictly, as OpenAI does: no ``"1"`` for 1).

    Raises :class:`InvalidRequestError` with OpenAI's ``param``/``message``/``code`` on any failure.
    """
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if errors and errors[0]["type"] == "json_invalid":  # then it is the only error: nothing was validated
            # pydantic's parser has a fixed nesting limit (about 200 levels): valid JSON deeper than that is refused
            # here, in bounded time and without recursion of ours.
            too_deep = "recursion limit" in str((errors[0].get("ctx") or {}).get("error", ""))
            raise InvalidRequestError(TOO_DEEP_MESSAGE if too_deep else INVALID_JSON_MESSAGE) from None
        try:
            root: object = from_json(body)
        except ValueError:  # pragma: no cover - pydantic already accepted it as JSON
            root = None
        if not isinstance(root, dict):
            raise InvalidRequestError(NOT_AN_OBJECT_MESSAGE, code=CODE_INVALID_TYPE) from None
        wire = _wire_error(errors, root)
        raise InvalidRequestError(wire.message, param=wire.param, code=wire.code) from None
