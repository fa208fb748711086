"""What every bundled store does when its server is out of reach: a 503 the client may retry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ServiceUnavailableError

__all__ = ["unavailable_on"]


@contextmanager
def unavailable_on(*errors: type[BaseException], what: str = "API key store") -> Iterator[None]:
    """Turn ``errors`` (a lost connection, a timeout, a locked database) into ``ServiceUnavailableError`` naming
    ``what`` is unavailable."""
    try:
        yield
    except errors as exc:
        raise ServiceUnavailableError(f"The {what} is unavailable. Please retry shortly.") from exc
