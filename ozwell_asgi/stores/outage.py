"""What every bundled store does when its server is out of reach: a 503 the client may retry."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import ServiceUnavailableError

__all__ = ["unavailable_on"]


@contextmanager
def unavailable_on(*errors: type[BaseException]) -> Iterator[None]:
    """Turn ``errors`` (a lost connection, a timeout, a locked database) into ``ServiceUnavailableError``."""
    try:
        yield
    except errors as exc:
        raise ServiceUnavailableError("The API key store is unavailable. Please retry shortly.") from exc
