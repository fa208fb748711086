"""Turn pydantic validation failures into OpenAI's single-error 400 (``param``, ``message``, ``code``).

Generic over every wire model (chat, embeddings, responses...): nothing here knows a field name. Pydantic puts
union member labels (``str``, ``list[...]``, ``function-after[...]``, ``tagged-union[...]``) and discriminator tag
values into an error's ``loc``; :func:`clean_loc` drops them by walking the ``loc`` along the request body actually
sent, keeping only the keys and indexes that exist in it, so ``('messages', 0, 'user', 'content', 'str')`` becomes
``messages.0.content``. OpenAI reports one error per request; :func:`pick_error` chooses the most specific one.
Messages follow OpenAI's wording and never contain pydantic internals (class names, union labels, doc URLs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails, from_json

from ..errors import InvalidRequestError

__all__ = [
    "INVALID_JSON_MESSAGE",
    "NOT_AN_OBJECT_MESSAGE",
    "WireError",
    "clean_loc",
    "describe_error",
    "invalid_request",
    "parse_json_body",
    "pick_error",
]

INVALID_JSON_MESSAGE = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)"
)
NOT_AN_OBJECT_MESSAGE = "The request body must be a JSON object."

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


def _repr(value: object) -> str:
    if isinstance(value, str):
        return repr(value) if len(value) <= 100 else repr(value[:100] + "...")
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


def clean_loc(loc: Sequence[int | str], root: object, *, keep_last: bool = False) -> list[str]:
    """The path of ``loc`` through ``root`` (the body sent), without pydantic's union labels and tag values.

    Keys and indexes that exist in the body are kept; anything else is a label and dropped, except the last
    element when ``keep_last`` (a missing or unknown field, which by nature is not in the body... or is).
    """
    parts: list[str] = []
    cur: object = root
    last = len(loc) - 1
    for i, item in enumerate(loc):
        if isinstance(cur, dict) and isinstance(item, str) and item in cur:
            parts.append(item)
            cur = cur[item]
        elif (
            isinstance(cur, list)
            and isinstance(item, int)
            and not isinstance(item, bool)
            and -len(cur) <= item < len(cur)
        ):
            parts.append(str(item))
            cur = cur[item]
        elif i == last and keep_last and isinstance(item, str) and isinstance(cur, dict):
            parts.append(item)
    return parts


def _param(err: ErrorDetails, root: object) -> list[str]:
    etype = err["type"]
    parts = clean_loc(err["loc"], root, keep_last=etype in ("missing", "extra_forbidden"))
    if etype in ("union_tag_invalid", "union_tag_not_found"):
        disc = str(err.get("ctx", {}).get("discriminator", "")).strip("'\"")
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


def pick_error(errors: Sequence[ErrorDetails], root: object) -> tuple[ErrorDetails, list[str], list[ErrorDetails]]:
    """The single most useful error: the deepest path into the body, a value error before a type mismatch.

    Returns the error, its cleaned path, and the other errors at the same path (for merging union alternatives).
    """
    best: tuple[int, int] | None = None
    chosen: ErrorDetails = errors[0]
    chosen_path: list[str] = []
    paths = [_param(e, root) for e in errors]
    for err, path in zip(errors, paths, strict=True):
        key = (len(path), _rank(err))
        if best is None or key > best:
            best, chosen, chosen_path = key, err, path
    siblings = [e for e, p in zip(errors, paths, strict=True) if p == chosen_path]
    return chosen, chosen_path, siblings


def describe_error(err: ErrorDetails, param: str | None, siblings: Sequence[ErrorDetails] = ()) -> WireError:
    """OpenAI's message and code for one (cleaned) pydantic error at ``param``."""
    etype = err["type"]
    ctx: dict[str, Any] = dict(err.get("ctx") or {})
    value = err.get("input")
    name = param if param is not None else "body"

    if etype == "missing" or etype == "union_tag_not_found":
        return WireError(param, f"Missing required parameter: '{name}'.", CODE_MISSING)
    if etype == "extra_forbidden":
        return WireError(param, f"Unrecognized request argument supplied: {name}", CODE_UNKNOWN)
    if _rank(err) == _TYPE_RANK:
        expected: list[str] = []
        for sib in (err, *siblings):
            if _rank(sib) != _TYPE_RANK:
                continue
            if sib["type"] in _VALUE_ERRORS_ON_SCALARS:
                exp = "a string" if "'" in str(sib.get("ctx", {}).get("expected", "")) else "a number"
            else:
                exp = _EXPECTED.get(sib["type"], "a valid value")
            if exp not in expected:
                expected.append(exp)
        if param is None and expected == ["an object"]:
            return WireError(None, NOT_AN_OBJECT_MESSAGE, CODE_INVALID_TYPE)
        if len(expected) > 1:
            want = "one of " + (", ".join(expected[:-1]) + " or " + expected[-1])
        else:
            want = expected[0] if expected else "a valid value"
        got = _json_kind(value)
        return WireError(
            param, f"Invalid type for '{name}': expected {want}, but got {got} instead.", CODE_INVALID_TYPE
        )
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
    if etype == "too_short":
        minimum = ctx.get("min_length")
        if isinstance(value, list) and not value:
            return WireError(
                param,
                f"Invalid '{name}': empty array. Expected an array with minimum length {minimum}, but got an empty "
                "array instead.",
                CODE_INVALID_VALUE,
            )
        return WireError(
            param,
            f"Invalid '{name}': array too short. Expected an array with minimum length {minimum}, but got an array "
            f"with length {ctx.get('actual_length')} instead.",
            CODE_INVALID_VALUE,
        )
    if etype == "too_long":
        return WireError(
            param,
            f"Invalid '{name}': array too long. Expected an array with maximum length {ctx.get('max_length')}, but "
            f"got an array with length {ctx.get('actual_length')} instead.",
            CODE_INVALID_VALUE,
        )
    if etype in ("string_too_long", "string_too_short"):
        size = "long" if etype == "string_too_long" else "short"
        limit_name = "maximum" if size == "long" else "minimum"
        limit = ctx.get("max_length" if size == "long" else "min_length")
        length = len(value) if isinstance(value, str) else "?"
        return WireError(
            param,
            f"Invalid '{name}': string too {size}. Expected a string with {limit_name} length {limit}, but got a "
            f"string with length {length} instead.",
            CODE_INVALID_VALUE,
        )
    if etype == "string_pattern_mismatch":
        return WireError(param, f"Invalid '{name}': string does not match pattern.", CODE_INVALID_VALUE)
    if etype in ("value_error", "assertion_error"):
        # Our own validators raise ValueError with a message meant for the client.
        reason = ctx.get("error")
        text = str(reason) if reason is not None else str(err.get("msg", ""))
        text = text.removeprefix("Value error, ").removeprefix("Assertion failed, ")
        return WireError(param, f"Invalid value for '{name}': {text}", CODE_INVALID_VALUE)
    return WireError(param, f"Invalid value for '{name}': {_repr(value)} is not supported.", CODE_INVALID_VALUE)


def invalid_request(exc: ValidationError, root: object) -> WireError:
    """The one OpenAI error for ``exc``, raised while validating ``root`` (the decoded body)."""
    errors = exc.errors(include_url=False)
    if not errors:  # pragma: no cover - pydantic never raises an empty ValidationError
        return WireError(None, "Invalid request.", CODE_INVALID_VALUE)
    err, path, siblings = pick_error(errors, root)
    return describe_error(err, ".".join(path) or None, [s for s in siblings if s is not err])


def parse_json_body(model: type[M], body: bytes | str) -> M:
    """Validate JSON ``body`` straight into ``model`` (strictly, as OpenAI does: no ``"1"`` for 1).

    Raises :class:`InvalidRequestError` with OpenAI's ``param``/``message``/``code`` on any failure.
    """
    try:
        return model.model_validate_json(body, strict=True)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise InvalidRequestError(INVALID_JSON_MESSAGE) from None
        try:
            root: object = from_json(body)
        except ValueError:  # pragma: no cover - pydantic already accepted it as JSON
            root = None
        if not isinstance(root, dict):
            raise InvalidRequestError(NOT_AN_OBJECT_MESSAGE, code=CODE_INVALID_TYPE) from None
        wire = invalid_request(exc, root)
        raise InvalidRequestError(wire.message, param=wire.param, code=wire.code) from None
