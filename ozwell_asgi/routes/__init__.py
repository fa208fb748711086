"""The route table, as data: one row per path and method. A handler takes the app's Services and the request,
raises OzwellError for anything a client should see, and returns an ASGI response callable. A row with a
capability (``"chat"``, ``"embeddings"``, ``"files"``, ``"responses"``) is served only when the app has it (a
backend that chats or embeds, a file store, a backend that chats and a response store). ``body`` is what the
handler reads: ``"json"`` (``Services.read_json``: 415 unless JSON), ``"multipart"`` (streamed,
:mod:`ozwell_asgi.multipart`) or ``"none"`` (never read: a stray ``Content-Type`` on a bodiless request is no error).
The app merges rows per path, so a wrong method gets 405 with every allowed one."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from starlette.requests import Request

from ..context import Services
from . import chat, embeddings, files, keys, models, responses

__all__ = ["ROUTES", "BodyKind", "Handler", "RouteRow"]

Handler = Callable[[Services, Request], Awaitable[Any]]
BodyKind = Literal["none", "json", "multipart"]


@dataclass(frozen=True, slots=True)
class RouteRow:
    """One method of one path. ``path`` uses Starlette's syntax (``{name}``, ``{name:path}``)."""

    path: str
    method: str
    handler: Handler
    capability: str | None = None
    body: BodyKind = "none"


ROUTES: tuple[RouteRow, ...] = (
    RouteRow("/chat/completions", "POST", chat.create_chat_completion, "chat", "json"),
    RouteRow("/embeddings", "POST", embeddings.create_embedding, "embeddings", "json"),
    RouteRow("/models", "GET", models.list_models),
    RouteRow("/models/{model:path}", "GET", models.retrieve_model),
    RouteRow("/api-keys", "GET", keys.list_keys),
    RouteRow("/api-keys", "POST", keys.create_key, body="json"),
    RouteRow("/api-keys/{key_id}", "GET", keys.retrieve_key),
    RouteRow("/api-keys/{key_id}", "DELETE", keys.delete_key),
    RouteRow("/api-keys/{key_id}/rotate", "POST", keys.rotate_key),  # any body is ignored
    RouteRow("/files", "GET", files.list_files, "files"),
    RouteRow("/files", "POST", files.create_file, "files", "multipart"),
    RouteRow("/files/{file_id}", "GET", files.retrieve_file, "files"),
    RouteRow("/files/{file_id}", "DELETE", files.delete_file, "files"),
    RouteRow("/files/{file_id}/content", "GET", files.download_file, "files"),
    RouteRow("/responses", "POST", responses.create_response, "responses", "json"),
    RouteRow("/responses/input_tokens", "POST", responses.count_input_tokens, "responses", "json"),
    RouteRow("/responses/{response_id}", "GET", responses.retrieve_response, "responses"),
    RouteRow("/responses/{response_id}", "DELETE", responses.delete_response, "responses"),
    RouteRow("/responses/{response_id}/input_items", "GET", responses.list_input_items, "responses"),
    RouteRow("/responses/{response_id}/cancel", "POST", responses.cancel_response, "responses"),  # body ignored
)
