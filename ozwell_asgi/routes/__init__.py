"""The route table, as data: (path, methods, handler). A handler takes the app's Services and the request,
raises OzwellError for anything a client should see, and returns an ASGI response callable."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request

from ..context import Services
from . import chat, keys, models

Handler = Callable[[Services, Request], Awaitable[Any]]

ROUTES: tuple[tuple[str, tuple[str, ...], Handler], ...] = (
    ("/chat/completions", ("POST",), chat.create_chat_completion),
    ("/models", ("GET",), models.list_models),
    ("/models/{model:path}", ("GET",), models.retrieve_model),
    ("/api-keys", ("GET", "POST"), keys.keys_collection),
    ("/api-keys/{key_id}", ("GET", "DELETE"), keys.key_item),
    ("/api-keys/{key_id}/rotate", ("POST",), keys.rotate_key),
)
