"""Lifespans for hosts: run the API's start and close with the host's own.

``OzwellAPI.lifespan`` is a lifespan on its own (``FastAPI(lifespan=ozwell.lifespan)``); a host with a lifespan of
its own joins the two with :func:`combine_lifespans`, or enters ``ozwell.lifespan()`` inside its own.
:func:`serve_lifespan` answers the ASGI lifespan protocol with such a lifespan, for a wrapper that must answer it
itself (the Django router).
"""

from __future__ import annotations

import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from .types import Receive, Scope, Send

__all__ = ["Lifespan", "combine_lifespans", "serve_lifespan"]

Lifespan = Callable[[Any], AbstractAsyncContextManager[Any]]
"""What Starlette and FastAPI take as ``lifespan=``: called with the app, it gives an async context manager."""


def combine_lifespans(*lifespans: Lifespan) -> Lifespan:
    """One lifespan that enters ``lifespans`` in the order given (each called with the host app) and exits them in
    the reverse order, so the last one given starts last and closes first.

    If one fails to start, those already started are closed, and the failure is raised; if one fails to close, the
    others still close. The mappings they yield (Starlette's lifespan state) are merged, later ones winning, and
    yielded; ``None`` when none yields a mapping.
    """

    @asynccontextmanager
    async def combined(app: Any) -> AsyncIterator[dict[str, Any] | None]:
        state: dict[str, Any] | None = None
        async with AsyncExitStack() as stack:
            for lifespan in lifespans:
                value = await stack.enter_async_context(lifespan(app))
                if isinstance(value, Mapping):
                    state = {**(state or {}), **value}
            yield state

    return combined


async def serve_lifespan(lifespan: Lifespan, app: Any, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer one ASGI ``lifespan`` connection with ``lifespan(app)``: entered on ``lifespan.startup``, exited on
    ``lifespan.shutdown``. A failure is answered ``lifespan.startup.failed`` or ``lifespan.shutdown.failed``, its
    traceback the message (for the server's log: the server then stops, or reports it), and raised; state it yields
    goes to ``scope["state"]`` when the server supports lifespan state."""
    started = False
    message = await receive()
    if message["type"] != "lifespan.startup":  # pragma: no cover - the protocol always starts with it
        return
    try:
        async with lifespan(app) as state:
            if isinstance(state, Mapping) and isinstance(scope.get("state"), dict):
                scope["state"].update(state)
            await send({"type": "lifespan.startup.complete"})
            started = True
            await receive()  # lifespan.shutdown: the server sends nothing else
    except BaseException:
        phase = "shutdown" if started else "startup"
        await send({"type": f"lifespan.{phase}.failed", "message": traceback.format_exc()})
        raise  # as Starlette does: uvicorn reports the message; asgi-lifespan waits for the exception
    await send({"type": "lifespan.shutdown.complete"})
