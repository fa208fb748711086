"""The route table, as data: (path, methods, handler, capability). A handler takes the app's Services and the
request, raises OzwellError for anything a client should see, and returns an ASGI response callable. A row with a
capability (``"chat"``, ``"embeddings"``) is served only when the app's backend has it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request

from ..context import Services
from . import chat, embeddings, keys, models

Handler = Callable[[Services, Request], Awaitable[Any]]

ROUTES: tuple[tuple[str, tuple[str, ...], Handler, str | None], ...] = (
    ("/chat/completions", ("POST",), chat.create_chat_completion, "chat"),
    ("/embeddings", ("POST",), embeddings.create_embedding, "embeddings"),
    ("/models", ("GET",), models.list_models, None),
    ("/models/{model:path}", ("GET",), models.retrieve_model, None),
    ("/api-keys", ("GET", "POST"), keys.keys_collection, None),
    ("/api-keys/{key_id}", ("GET", "DELETE"), keys.key_item, None),
    ("/api-keys/{key_id}/rotate", ("POST",), keys.rotate_key, None),
)
