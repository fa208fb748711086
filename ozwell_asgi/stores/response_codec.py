"""How every bundled response store writes the JSON parts of a :class:`~ozwell_asgi.types.StoredResponse`.

One encoding for memory, SQL and Redis, so a record reads back the same from each: the ``response``, its
``input_items`` and its ``conversation`` as one JSON object (``{"response": ..., "input_items": [...],
"conversation": [...]}``), compact, UTF-8. Control characters (NUL included) are escaped by JSON, so the text holds
none and PostgreSQL's ``text`` takes it; a string with a lone surrogate (valid in a Python string and in JSON's
``\\ud800`` escapes, but not in UTF-8) makes the whole text ASCII-escaped instead. ``NaN`` and infinities are not
JSON: a record holding one is refused with ``ValueError``, as is any value that is not JSON-ready.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..types import StoredResponse

__all__ = ["dump_parts", "load_parts"]


def _dumps(parts: Any, ascii_only: bool) -> str:
    return json.dumps(parts, ensure_ascii=ascii_only, separators=(",", ":"), allow_nan=False)


def dump_parts(record: StoredResponse) -> str:
    """The JSON text of ``record``'s ``response``, ``input_items`` and ``conversation``; it always encodes to UTF-8.

    ``ValueError`` ("must be JSON-ready") if they are not."""
    parts = {
        "response": record.response,
        "input_items": record.input_items,
        "conversation": record.conversation,
    }
    try:
        text = _dumps(parts, False)
    except (TypeError, ValueError) as exc:  # a value JSON lacks, NaN or an infinity, a cycle
        raise ValueError(f"a stored response must be JSON-ready: {exc}") from None
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate: escape everything non-ASCII, which JSON reads back the same
        text = _dumps(parts, True)
    return text


def load_parts(head: StoredResponse, text: str | bytes) -> StoredResponse:
    """``head`` (a record's scalar fields) with the parts :func:`dump_parts` wrote in ``text``."""
    parts: dict[str, Any] = json.loads(text)
    return dataclasses.replace(
        head,
        response=parts["response"],
        input_items=tuple(parts["input_items"]),
        conversation=tuple(parts["conversation"]),
    )
