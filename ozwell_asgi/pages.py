"""Pages of a list, as OpenAI pages them: ``limit`` items after (or before) a cursor id, newest or oldest first.

:func:`paginate` is the one in-memory implementation (the memory stores use it, and the contract suite holds every
other adapter to the same answers); :func:`list_body` builds the wire envelope once, for every list endpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from .types import Page, PageQuery

__all__ = ["list_body", "paginate"]

T = TypeVar("T")


def paginate(items: Sequence[T], query: PageQuery, id_of: Callable[[T], str]) -> Page[T]:
    """The page of ``items`` (sorted oldest first, by ``(created_at, id)``) that ``query`` asks for.

    ``after`` gives the items that follow the cursor in the listing's order, ``before`` those that precede it (the
    closest ``limit`` of them), both in the listing's order; an unknown cursor gives an empty page. ``has_more`` says
    whether more items lie beyond the page in the direction it was read.
    """
    limit = query.limit
    cursor = query.after if query.after is not None else query.before
    if cursor is None:
        ordered = items if query.order == "asc" else items[::-1]
        return Page(tuple(ordered[:limit]), len(ordered) > limit)
    index = next((i for i, item in enumerate(items) if id_of(item) == cursor), None)
    if index is None:
        return Page((), False)
    # In ascending terms: "later in the listing" is newer for asc and older for desc.
    newer = (query.after is not None and query.order == "asc") or (query.before is not None and query.order == "desc")
    if newer:
        chosen = items[index + 1 : index + 1 + limit]
        more = len(items) > index + 1 + limit
    else:
        start = max(0, index - limit)
        chosen = items[start:index]
        more = start > 0
    page = chosen if query.order == "asc" else chosen[::-1]
    return Page(tuple(page), more)


def list_body(data: Sequence[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list envelope: ``object``, ``data``, ``has_more``, ``first_id``, ``last_id``."""
    return {
        "object": "list",
        "data": list(data),
        "has_more": has_more,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }
