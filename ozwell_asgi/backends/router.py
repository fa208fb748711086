"""One backend in front of several: routes by model id, aliases, and ordered fallbacks.

    router = RouterBackend(
        routes=[Route("gpt-*", openai, fallbacks=[("llama3:8b", ollama)]), Route("llama*", ollama)],
        aliases={"gpt-4": ("llama3:8b", ollama)},
    )

Routing: an alias first, then an exact route, then the first pattern route (``fnmatch`` globs, case-sensitive) in
the order given; patterns are compiled once. A route whose backend lacks a capability (``stream_chat`` for chat,
``embed`` for embeddings) is skipped for that capability, and so are such fallbacks.

Renaming: a request for an alias, or for a fallback given as ``(model, backend)``, reaches its backend as a copy
with that ``model`` (the caller's request is never changed), and the answer names the model that answered: the
result's ``model`` and every chunk's, unless the backend set its own.

Fallbacks: when a target fails with an :class:`~ozwell_asgi.errors.OzwellError` of status 500 or more, or a
timeout, before it produced anything (a stream: its first chunk), the next target is tried, until one answers,
none is left, or the call's deadline has passed; the last failure is raised then. Once a stream has sent a chunk,
its failures reach the client. A route's ``timeout`` bounds how long each target may take to start answering; every
attempt is also bounded by ``call.deadline``.

Models: :meth:`RouterBackend.list_models` fetches each routed backend's list concurrently and lists a model when
routing its id leads back to that backend, then each alias whose target is listed (with the target's kind);
duplicates keep their first entry. A backend whose list fails keeps its last good list (none before the first).
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import math
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeAlias, TypeVar, cast

import anyio

from ..errors import GatewayTimeoutError, NotFoundError, OzwellError
from ..protocols import ModelCatalog
from ..types import Call, ChatChunk, ChatResult, EmbeddingResult, ModelInfo
from ..wire.chat import ChatCompletionRequest
from ..wire.embeddings import EmbeddingRequest
from . import capabilities
from ._aggregate import collect_chat

__all__ = ["Route", "RouterBackend"]

log = logging.getLogger("ozwell_asgi")

Fallback: TypeAlias = "ModelCatalog | tuple[str, ModelCatalog]"
AliasTarget: TypeAlias = "str | tuple[str, ModelCatalog]"
R = TypeVar("R", ChatCompletionRequest, EmbeddingRequest)
T = TypeVar("T")

_GLOB_CHARS = frozenset("*?[")


def _is_pattern(model: str) -> bool:
    return not _GLOB_CHARS.isdisjoint(model)


def _chats(backend: object) -> bool:
    return capabilities(backend).chat is not None


def _embeds(backend: object) -> bool:
    return capabilities(backend).embeddings is not None


def _check_backend(backend: object, where: str) -> None:
    """The app's own check (:func:`ozwell_asgi.backends.capabilities`): a ``TypeError`` saying where, unless
    ``backend`` has an async ``list_models`` and a capability."""
    try:
        capabilities(backend)
    except TypeError as exc:
        raise TypeError(f"{where}: {exc}") from None


def _check_model(model: object, where: str) -> str:
    if not isinstance(model, str) or not model:
        raise ValueError(f"{where}: a model id is a non-empty string, not {model!r}")
    return model


def _fallback(item: object, where: str) -> tuple[str | None, ModelCatalog]:
    if isinstance(item, tuple):
        if len(item) != 2:
            raise ValueError(f"{where}: a (model, backend) pair has two items, not {len(item)}")
        model, backend = item
        _check_model(model, where)
        _check_backend(backend, where)
        return model, backend
    _check_backend(item, where)
    return None, cast(ModelCatalog, item)


@dataclass(frozen=True, slots=True)
class Route:
    """Requests for ``model`` (an exact id, or an ``fnmatch`` pattern such as ``"gpt-*"``) go to ``backend``.

    ``fallbacks`` are tried in order when the target before fails with a 5xx or a timeout before answering: a
    backend (asked for the same model) or a ``(model, backend)`` pair (asked for that model). ``timeout``: seconds
    each target may take to start answering (its first chunk, or its whole answer when not streaming) before the
    next is tried; ``None``: bounded only by the call's deadline.
    """

    model: str
    backend: ModelCatalog
    fallbacks: Sequence[Fallback] = ()
    timeout: float | None = None

    def __post_init__(self) -> None:
        where = f"Route({self.model!r})"
        _check_model(self.model, "Route.model")
        _check_backend(self.backend, f"{where}.backend")
        if isinstance(self.fallbacks, str | bytes) or not isinstance(self.fallbacks, Sequence):
            raise ValueError(f"{where}.fallbacks: a list of backends or (model, backend) pairs")
        for i, item in enumerate(self.fallbacks):
            _fallback(item, f"{where}.fallbacks[{i}]")
        object.__setattr__(self, "fallbacks", tuple(self.fallbacks))
        timeout = self.timeout
        if timeout is not None and (
            isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout < math.inf
        ):
            raise ValueError(f"{where}.timeout: a number of seconds > 0, not {timeout!r}")


@dataclass(frozen=True, slots=True)
class _Target:
    backend: Any
    model: str | None  # None: the model the request names


@dataclass(frozen=True, slots=True)
class _Plan:
    label: str  # the route's pattern or the alias, for logs
    targets: tuple[_Target, ...]
    timeout: float | None


class _Table:
    """The plans of one capability: aliases and exact ids in one dict, then the patterns in order."""

    __slots__ = ("exact", "patterns")

    def __init__(self) -> None:
        self.exact: dict[str, _Plan] = {}
        self.patterns: list[tuple[Callable[[str], object], _Plan]] = []

    def find(self, model: str) -> _Plan | None:
        plan = self.exact.get(model)
        if plan is not None:
            return plan
        for match, plan in self.patterns:
            if match(model):
                return plan
        return None

    def __bool__(self) -> bool:
        return bool(self.exact or self.patterns)


def _table(
    routes: Sequence[Route], aliases: Mapping[str, AliasTarget], capable: Callable[[object], bool]
) -> tuple[_Table, set[str], set[int]]:
    """The plans for one capability, the string aliases it serves, and the routes it can never reach (an earlier
    route with the same model serves it)."""
    table = _Table()
    seen: set[str] = set()
    shadowed: set[int] = set()
    for i, route in enumerate(routes):
        if not capable(route.backend):
            continue
        if route.model in seen:
            shadowed.add(i)
            continue
        seen.add(route.model)
        targets = [_Target(route.backend, None)]
        for item in route.fallbacks:
            model, backend = _fallback(item, "")
            if capable(backend):
                targets.append(_Target(backend, model))
        plan = _Plan(route.model, tuple(targets), route.timeout)
        if _is_pattern(route.model):
            table.patterns.append((re.compile(fnmatch.translate(route.model)).match, plan))
        else:
            table.exact[route.model] = plan
    served: set[str] = set()
    renamed: dict[str, _Plan] = {}
    for name, target in aliases.items():
        if isinstance(target, str):
            routed = table.find(target)
            if routed is None:
                continue
            served.add(name)
            moved = tuple(_Target(t.backend, t.model or target) for t in routed.targets)
            renamed[name] = _Plan(name, moved, routed.timeout)
        elif capable(target[1]):
            renamed[name] = _Plan(name, (_Target(target[1], target[0]),), None)
    table.exact.update(renamed)
    return table, served, shadowed


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _not_found(model: str) -> NotFoundError:
    return NotFoundError(
        f"The model `{model}` does not exist or you do not have access to it.", param="model", code="model_not_found"
    )


async def _aclose(stream: object) -> None:
    close = getattr(stream, "aclose", None)
    if close is not None:
        with anyio.CancelScope(shield=True):
            await close()


async def _open_stream(
    backend: Any, request: ChatCompletionRequest, call: Call
) -> tuple[AsyncIterator[ChatChunk], ChatChunk | None]:
    """The backend's stream and its first chunk (``None``: it ended at once); closed if that fails."""
    stream: AsyncIterator[ChatChunk] = backend.stream_chat(request, call)
    try:
        first = await anext(stream, None)
    except BaseException:
        await _aclose(stream)
        raise
    return stream, first


async def _complete(backend: Any, request: ChatCompletionRequest, call: Call) -> ChatResult:
    complete = getattr(backend, "complete_chat", None)
    if complete is not None:
        result: ChatResult = await complete(request, call)
        return result
    return await collect_chat(backend.stream_chat(request, call))


async def _embed(backend: Any, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
    result: EmbeddingResult = await backend.embed(request, call)
    return result


class RouterBackend:
    """Routes each call by its model id (see the module docstring). It has ``stream_chat`` when some route serves
    chat, ``complete_chat`` when one of those targets has it (the others' streams are folded), and ``embed`` when
    some route serves embeddings. ``aclose`` closes every backend it routes to, once each.

    ``aliases`` map a model id to another model: a string (routed by ``routes``, fallbacks included) or a
    ``(model, backend)`` pair (that backend alone).
    """

    stream_chat: Callable[[ChatCompletionRequest, Call], AsyncIterator[ChatChunk]]
    complete_chat: Callable[[ChatCompletionRequest, Call], Awaitable[ChatResult]]
    embed: Callable[[EmbeddingRequest, Call], Awaitable[EmbeddingResult]]

    def __init__(self, routes: Sequence[Route] = (), aliases: Mapping[str, AliasTarget] | None = None) -> None:
        routes = tuple(routes)
        aliases = dict(aliases or {})
        if not routes and not aliases:
            raise ValueError("RouterBackend needs at least one route or alias")
        for i, route in enumerate(routes):
            if not isinstance(route, Route):
                raise TypeError(f"routes[{i}]: a Route, not {type(route).__name__}")
        seen = {route.model for route in routes}
        for name, target in aliases.items():
            where = f"aliases[{name!r}]"
            _check_model(name, "an alias")
            if _is_pattern(name):
                raise ValueError(f"{where}: an alias is an exact model id, not a pattern")
            if name in seen:
                raise ValueError(f"{where}: {name!r} is both an alias and a route")
            if isinstance(target, str):
                _check_model(target, where)
                if target in aliases:
                    raise ValueError(f"{where}: aliases do not chain ({target!r} is an alias too)")
            elif isinstance(target, tuple) and len(target) == 2:
                _check_model(target[0], where)
                _check_backend(target[1], where)
            else:
                raise ValueError(f"{where}: a model id or a (model, backend) pair, not {target!r}")

        self._chat, chat_aliases, chat_shadowed = _table(routes, aliases, _chats)
        self._embedding, embedding_aliases, embedding_shadowed = _table(routes, aliases, _embeds)
        for i, route in enumerate(routes):
            chats, embeds = _chats(route.backend), _embeds(route.backend)
            if (not chats or i in chat_shadowed) and (not embeds or i in embedding_shadowed):
                raise ValueError(f"routes[{i}]: {route.model!r} is given twice: an earlier route serves all it could")
        for name, target in aliases.items():
            if isinstance(target, str) and name not in chat_aliases and name not in embedding_aliases:
                raise ValueError(f"aliases[{name!r}]: no route serves its target {target!r}")
        self._aliases = aliases

        # The backends whose lists make ours: routes' own backends and alias pairs' (in order, once each).
        sources: dict[int, Any] = {}
        everything: dict[int, Any] = {}
        for route in routes:
            sources.setdefault(id(route.backend), route.backend)
            everything.setdefault(id(route.backend), route.backend)
            for item in route.fallbacks:
                backend = _fallback(item, "")[1]
                everything.setdefault(id(backend), backend)
        for target in aliases.values():
            if isinstance(target, tuple):
                sources.setdefault(id(target[1]), target[1])
                everything.setdefault(id(target[1]), target[1])
        self._sources: tuple[Any, ...] = tuple(sources.values())
        self._backends: tuple[Any, ...] = tuple(everything.values())
        self._lists: list[Sequence[ModelInfo] | None] = [None] * len(self._sources)
        self._merged_from: tuple[Sequence[ModelInfo] | None, ...] = ()
        self._merged: tuple[ModelInfo, ...] = ()

        if self._chat:
            self.stream_chat = self._stream_chat
            plans = [*self._chat.exact.values(), *(plan for _, plan in self._chat.patterns)]
            if any(capabilities(t.backend).completes is not None for plan in plans for t in plan.targets):
                self.complete_chat = self._complete_chat
        if self._embedding:
            self.embed = self._embed

    # -- building from a router file --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: Mapping[str, Any], backends: Mapping[str, ModelCatalog]) -> RouterBackend:
        """A router from plain data (a JSON or TOML router file), its backends named by key in ``backends``::

            {"routes": [{"model": "gpt-*", "backend": "openai", "fallbacks": ["local", {"model": "llama3:8b",
                         "backend": "ollama"}], "timeout": 10}],
             "aliases": {"gpt-4": {"model": "llama3:8b", "backend": "ollama"}, "fast": "llama3:8b"}}

        A ``backends`` key in ``config`` (how the file names and builds its backends) is the caller's and is
        ignored here. Anything else that is wrong is a ``ValueError`` naming where.
        """
        return cls(**_Config(backends).parse(config))

    # -- models -----------------------------------------------------------------------------------------------

    async def list_models(self) -> Sequence[ModelInfo]:
        sources = self._sources
        if len(sources) == 1:
            await self._fetch(0, sources[0])
        elif _on_asyncio():  # a fifth of a task group's cost, on every request that names a model
            await asyncio.gather(*(self._fetch(i, backend) for i, backend in enumerate(sources)))
        else:
            async with anyio.create_task_group() as tg:
                for i, backend in enumerate(sources):
                    tg.start_soon(self._fetch, i, backend)
        lists = self._lists
        known = self._merged_from
        if len(known) == len(lists) and all(a is b for a, b in zip(known, lists, strict=True)):
            return self._merged  # every backend returned the very list it returned last time
        merged = self._merge(lists)
        self._merged_from = tuple(lists)
        self._merged = merged
        return merged

    async def _fetch(self, i: int, backend: Any) -> None:
        try:
            self._lists[i] = await backend.list_models()
        except Exception:
            log.warning("router: %s.list_models failed; keeping its last list", type(backend).__name__, exc_info=True)

    def _merge(self, lists: Sequence[Sequence[ModelInfo] | None]) -> tuple[ModelInfo, ...]:
        merged: dict[str, ModelInfo] = {}
        aliases = self._aliases
        by_backend: dict[int, Sequence[ModelInfo]] = {}
        for backend, infos in zip(self._sources, lists, strict=True):
            if infos is None:
                continue
            by_backend[id(backend)] = infos
            for info in infos:
                if info.id in merged or info.id in aliases:
                    continue
                plan = (self._embedding if info.kind == "embedding" else self._chat).find(info.id)
                if plan is not None and plan.targets[0].backend is backend:
                    merged[info.id] = info
        for name, target in aliases.items():
            if name in merged:
                continue
            if isinstance(target, str):
                found = merged.get(target)
            else:
                model, backend = target
                found = next((i for i in by_backend.get(id(backend), ()) if i.id == model), None)
            if found is not None:
                merged[name] = replace(found, id=name)
        return tuple(merged.values())

    # -- calls ------------------------------------------------------------------------------------------------

    async def _answer(
        self,
        plan: _Plan,
        request: R,
        call: Call,
        run: Callable[[Any, R, Call], Awaitable[T]],
    ) -> tuple[T, str | None]:
        """The first target's answer that comes without a 5xx or timeout, and the model it was asked for when
        that is not the request's own."""
        failure: OzwellError | None = None
        deadline = call.deadline
        for attempt, target in enumerate(plan.targets):
            if attempt:
                if deadline is not None and anyio.current_time() >= deadline:
                    break
                log.warning("router %r: %r; trying fallback %d", plan.label, failure, attempt)
            asked = request
            renamed = None
            if target.model is not None and target.model != request.model:
                renamed = target.model
                asked = request.model_copy(update={"model": renamed})
            limit = math.inf if plan.timeout is None else anyio.current_time() + plan.timeout
            if deadline is not None:
                limit = min(limit, deadline)
            try:
                with anyio.CancelScope(deadline=limit) as scope:
                    value = await run(target.backend, asked, call)
                if not scope.cancelled_caught:
                    return value, renamed
                failure = GatewayTimeoutError("The model did not start answering in time.")
            except OzwellError as exc:
                if exc.status < 500:
                    raise
                failure = exc
            except TimeoutError:
                failure = GatewayTimeoutError("The model did not start answering in time.")
        assert failure is not None  # a plan has at least one target
        raise failure

    async def _stream_chat(self, request: ChatCompletionRequest, call: Call) -> AsyncGenerator[ChatChunk, None]:
        plan = self._chat.find(request.model)
        if plan is None:
            raise _not_found(request.model)
        (stream, chunk), renamed = await self._answer(plan, request, call, _open_stream)
        ended = False
        try:
            while chunk is not None:
                if renamed is not None and chunk.model is None:
                    chunk = replace(chunk, model=renamed)
                yield chunk
                chunk = await anext(stream, None)
            ended = True
        finally:
            if not ended:  # an ended stream is closed already: spare the shielded close
                await _aclose(stream)

    async def _complete_chat(self, request: ChatCompletionRequest, call: Call) -> ChatResult:
        plan = self._chat.find(request.model)
        if plan is None:
            raise _not_found(request.model)
        result, renamed = await self._answer(plan, request, call, _complete)
        if renamed is not None and result.model is None:
            result = replace(result, model=renamed)
        return result

    async def _embed(self, request: EmbeddingRequest, call: Call) -> EmbeddingResult:
        plan = self._embedding.find(request.model)
        if plan is None:
            raise _not_found(request.model)
        result, renamed = await self._answer(plan, request, call, _embed)
        if renamed is not None and result.model is None:
            result = replace(result, model=renamed)
        return result

    async def aclose(self) -> None:
        """Close every backend routed to that has ``aclose``, once each; a failure is logged and the rest closed."""
        for backend in self._backends:
            close = getattr(backend, "aclose", None)
            if close is None:
                continue
            try:
                await close()
            except Exception:
                log.exception("router: closing %s failed", type(backend).__name__)


class _Config:
    """Turns router-file data into :class:`RouterBackend` arguments, or a ``ValueError`` saying where it is wrong."""

    _TOP = frozenset({"routes", "aliases", "backends"})
    _ROUTE = frozenset({"model", "backend", "fallbacks", "timeout"})
    _TARGET = frozenset({"model", "backend"})

    def __init__(self, backends: Mapping[str, ModelCatalog]) -> None:
        self.backends = backends

    def parse(self, config: object) -> dict[str, Any]:
        if not isinstance(config, Mapping):
            raise ValueError(f"router config: a mapping (JSON object, TOML table), not {type(config).__name__}")
        self._keys(config, self._TOP, "router config")
        routes = config.get("routes", [])
        if isinstance(routes, str | bytes) or not isinstance(routes, Sequence):
            raise ValueError("router config: routes is a list of route tables")
        aliases = config.get("aliases", {})
        if not isinstance(aliases, Mapping):
            raise ValueError("router config: aliases is a table of alias = model or {model, backend}")
        try:
            return {
                "routes": [self._route(item, f"routes[{i}]") for i, item in enumerate(routes)],
                "aliases": {name: self._alias(target, f"aliases[{name!r}]") for name, target in aliases.items()},
            }
        except ValueError as exc:
            raise ValueError(f"router config: {exc}") from None

    def _keys(self, item: Mapping[Any, Any], allowed: frozenset[str], where: str) -> None:
        unknown = sorted(map(str, set(item) - allowed))
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r} (expected {', '.join(sorted(allowed))})")

    def _backend(self, name: object, where: str) -> ModelCatalog:
        if not isinstance(name, str) or name not in self.backends:
            known = ", ".join(map(repr, self.backends)) or "none"
            raise ValueError(f"{where}: unknown backend {name!r} (known: {known})")
        return self.backends[name]

    def _model(self, model: object, where: str) -> str:
        if not isinstance(model, str) or not model:
            raise ValueError(f"{where}: a non-empty model id, not {model!r}")
        return model

    def _pair(self, item: object, where: str) -> tuple[str, ModelCatalog]:
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: a table with model and backend, not {item!r}")
        self._keys(item, self._TARGET, where)
        if "model" not in item or "backend" not in item:
            raise ValueError(f"{where}: needs both model and backend")
        return self._model(item["model"], f"{where}.model"), self._backend(item["backend"], f"{where}.backend")

    def _route(self, item: object, where: str) -> Route:
        if not isinstance(item, Mapping):
            raise ValueError(f"{where}: a table with model and backend, not {item!r}")
        self._keys(item, self._ROUTE, where)
        if "model" not in item or "backend" not in item:
            raise ValueError(f"{where}: needs model and backend")
        fallbacks = item.get("fallbacks", [])
        if isinstance(fallbacks, str | bytes) or not isinstance(fallbacks, Sequence):
            raise ValueError(f"{where}.fallbacks: a list of backend names or {{model, backend}} tables")
        targets: list[Fallback] = []
        for i, fallback in enumerate(fallbacks):
            at = f"{where}.fallbacks[{i}]"
            targets.append(self._backend(fallback, at) if isinstance(fallback, str) else self._pair(fallback, at))
        timeout = item.get("timeout")
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, int | float)):
            raise ValueError(f"{where}.timeout: a number of seconds, not {timeout!r}")
        return Route(
            self._model(item["model"], f"{where}.model"),
            self._backend(item["backend"], f"{where}.backend"),
            fallbacks=targets,
            timeout=timeout,
        )

    def _alias(self, target: object, where: str) -> AliasTarget:
        if isinstance(target, str):
            return self._model(target, where)
        return self._pair(target, where)
