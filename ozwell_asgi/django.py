"""Django (or any ASGI app without lifespan support) with the API under a prefix, in one line of ``asgi.py``::

    application = asgi_application(get_asgi_application(), ozwell, prefix="/v1")

Django's ``ASGIHandler`` rejects the ASGI lifespan protocol, so servers report "lifespan unsupported" and
``asgi_lifespan.LifespanManager`` raises ``LifespanNotSupported``; the router answers it itself, with the API's
lifespan (and the host's own, if given), so ``uvicorn --lifespan on`` starts the API before the first request and
closes its pools at shutdown. Nothing here imports Django.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lifespan import Lifespan, combine_lifespans, serve_lifespan
from .types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from .app import OzwellAPI

__all__ = ["OzwellRouter", "asgi_application"]


class OzwellRouter:
    """Sends ``prefix`` and every path under it to ``api`` (as if mounted there: ``root_path`` gains the prefix)
    and every other HTTP or WebSocket request to ``app``, untouched; answers ``lifespan`` itself.

    Paths are matched on whole segments (``/v1`` and ``/v1/...``, never ``/v1beta``), after the server's own
    ``root_path``. ``lifespan``: the host's own lifespan (called with this router), started before the API's and
    closed after it.
    """

    def __init__(self, app: ASGIApp, api: OzwellAPI, *, prefix: str = "/v1", lifespan: Lifespan | None = None) -> None:
        prefix = "/" + prefix.strip("/")
        if prefix == "/":
            raise ValueError("prefix must name a path, such as /v1")
        self.app = app
        self.api = api
        self.prefix = prefix
        self.lifespan: Lifespan = api.lifespan if lifespan is None else combine_lifespans(lifespan, api.lifespan)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await serve_lifespan(self.lifespan, self, scope, receive, send)
            return
        if kind in ("http", "websocket"):
            path: str = scope["path"]
            root: str = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if path == self.prefix or path.startswith(self.prefix + "/"):
                # The server made this scope for this request alone: set the prefix in place, as Starlette's Mount does.
                scope["root_path"] = root + self.prefix
                await self.api(scope, receive, send)
                return
        await self.app(scope, receive, send)


def asgi_application(
    django_app: ASGIApp, ozwell: OzwellAPI, *, prefix: str = "/v1", lifespan: Lifespan | None = None
) -> OzwellRouter:
    """The ``application`` of a Django ``asgi.py``: ``ozwell`` under ``prefix``, Django's
    ``get_asgi_application()`` everywhere else, and the lifespan protocol answered (see :class:`OzwellRouter`)."""
    return OzwellRouter(django_app, ozwell, prefix=prefix, lifespan=lifespan)
