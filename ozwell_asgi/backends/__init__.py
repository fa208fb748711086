"""Model backends: what a backend must have, checked once when the app is built.

A backend is any object with ``async def list_models()`` and at least one capability (protocols.py): chat
(``stream_chat``, optionally ``complete_chat``) and embeddings (``embed``). :func:`capabilities` inspects it and
raises a clear ``TypeError`` for a backend the app could not serve (a sync ``list_models``, a missing method, the
pre-0.2 method names), instead of a 500 at request time.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import cast

from ..protocols import ChatBackend, CompletesChat, EmbeddingBackend, ModelCatalog

__all__ = ["Capabilities", "capabilities"]


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can serve: each is the backend itself, or ``None`` when it lacks that capability."""

    catalog: ModelCatalog
    chat: ChatBackend | None
    completes: CompletesChat | None
    embeddings: EmbeddingBackend | None


def _method(backend: object, name: str) -> object | None:
    method = getattr(backend, name, None)
    if method is not None and not callable(method):
        raise TypeError(f"{type(backend).__name__}.{name} must be a method")
    return method


def _require_async(backend: object, name: str, method: object) -> None:
    if not inspect.iscoroutinefunction(method):
        raise TypeError(f"{type(backend).__name__}.{name} must be an `async def` method")


def _require_arity(backend: object, name: str, method: object, expected: str) -> None:
    """The method must take the request and the call (extra parameters need defaults)."""
    try:
        signature = inspect.signature(method)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a builtin or C method: nothing to check
        return
    params = list(signature.parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if len(positional) < 2 or len(required) > 2:
        raise TypeError(f"{type(backend).__name__}.{name} must take (request, call): {expected}")


def capabilities(backend: object) -> Capabilities:
    """Check ``backend`` and say what it serves; ``TypeError`` if it cannot serve anything."""
    name = type(backend).__name__
    list_models = _method(backend, "list_models")
    if list_models is None:
        raise TypeError(f"{name} is not a model backend: it has no `async def list_models(self)`")
    _require_async(backend, "list_models", list_models)
    stream_chat = _method(backend, "stream_chat")
    legacy = [m for m in ("chat", "chat_stream") if getattr(backend, m, None) is not None]
    if stream_chat is None and legacy:
        raise TypeError(
            f"{name} has {' and '.join(legacy)}, the methods of ozwell-asgi 0.1: rename chat_stream(request) to "
            "stream_chat(request, call), and chat(request) to complete_chat(request, call) or drop it"
        )
    if stream_chat is not None and inspect.iscoroutinefunction(stream_chat):
        raise TypeError(
            f"{name}.stream_chat must return an async iterator (write it as an async generator: `async def` with "
            "`yield`), not be a coroutine"
        )
    complete_chat = _method(backend, "complete_chat")
    if complete_chat is not None:
        _require_async(backend, "complete_chat", complete_chat)
        if stream_chat is None:
            raise TypeError(f"{name} has complete_chat but no stream_chat: streaming is the one required chat method")
    embed = _method(backend, "embed")
    if embed is not None:
        _require_async(backend, "embed", embed)
        _require_arity(backend, "embed", embed, "embed(request, call)")
    for method_name, method in (("stream_chat", stream_chat), ("complete_chat", complete_chat)):
        if method is not None:
            _require_arity(backend, method_name, method, f"{method_name}(request, call)")
    if stream_chat is None and embed is None:
        raise TypeError(f"{name} serves nothing: it needs stream_chat (chat) or embed (embeddings)")
    return Capabilities(
        catalog=cast(ModelCatalog, backend),
        chat=cast(ChatBackend, backend) if stream_chat is not None else None,
        completes=cast(CompletesChat, backend) if complete_chat is not None else None,
        embeddings=cast(EmbeddingBackend, backend) if embed is not None else None,
    )
