"""OzwellAPI: the ASGI application. Construction wires the dependencies once; a request then goes

    __call__ (request id, timing, the one error renderer) → Router → route handler
        → Services.authenticate (auth.py) → Meter.admit (meter.py, before the body) → read_json_body (bodies.py)
        → wire model (wire/) → Meter.reserve → backend (backends/) → JSON or SSE → Meter.settle

Mount it anywhere (``app.mount("/v1", OzwellAPI(...))``) or run it on its own; every answer of ours, errors
included, is in OpenAI's shape even inside a host (FastAPI, Starlette, Django) with its own error handlers.
"""

from __future__ import annotations

import logging
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from types import MappingProxyType
from typing import Any

from starlette.convertors import Convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import compile_path

from .auth import Authenticator, KeyHasher, KeyManager
from .backends import capabilities
from .backends.echo import EchoBackend
from .background import BackgroundRuns
from .context import Services, Settings
from .cors import DEFAULT_MAX_AGE, CORSPolicy
from .errors import MethodNotAllowedError, NotFoundError, OzwellError, internal_error
from .health import Health
from .hostauth import HostAuth, HostAuthenticator
from .protocols import (
    ChatBackend,
    EmbeddingBackend,
    FileStore,
    KeyStore,
    PassageIndex,
    RateLimiter,
    ResponseStore,
    SourceFinder,
)
from .ratelimit import DEFAULT_PLANS, LimitsRateLimiter, Plan
from .responses import error_response
from .routes import ROUTES, Handler, RouteRow
from .sources import FileSources, SourceLimits
from .stores.cache import CachedKeyStore
from .stores.urls import Storage, Storages
from .tokens import Tokenizer, default_tokenizer
from .types import Receive, Scope, Send, UsageEvent
from .usage import UNKNOWN_ENDPOINT, UsageHook, UsageHooks, endpoint_name

__all__ = ["OzwellAPI"]

log = logging.getLogger("ozwell_asgi")


class _Endpoint:
    """Adapts a handler to an ASGI app that Starlette's Route calls directly (no per-request wrapping)."""

    __slots__ = ("handler", "name", "services")

    def __init__(self, handler: Handler, services: Services, name: str = UNKNOWN_ENDPOINT) -> None:
        self.handler = handler
        self.services = services
        self.name = name  # the endpoint of its usage events (usage.endpoint_name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = await self.handler(self.services, Request(scope, receive))
        await response(scope, receive, send)


class _RouteTable:
    """Finds the endpoint for a path and method: a dict lookup for fixed paths, compiled patterns (Starlette's
    path syntax and convertors) for the rest. Built once from route rows, merged per path (so a 405 lists every
    allowed method); HEAD is allowed wherever GET is.

    A second row for a path and method already taken, or a pattern that matches exactly the paths another one
    does under other parameter names, is a ``ValueError`` at construction: no row is ever silently unreachable.
    """

    def __init__(self, rows: Iterable[tuple[RouteRow, _Endpoint]]) -> None:
        self.fixed: dict[str, dict[str, _Endpoint]] = {}
        self.patterns: list[tuple[re.Pattern[str], dict[str, Convertor[Any]], dict[str, _Endpoint]]] = []
        by_shape: dict[str, tuple[str, dict[str, _Endpoint]]] = {}
        for row, endpoint in rows:
            shape = _PARAM.sub(lambda m: "{" + (m.group(2) or ":str") + "}", row.path)
            taken = by_shape.get(shape)
            if taken is None:
                by_method: dict[str, _Endpoint] = {}
                by_shape[shape] = (row.path, by_method)
                if "{" in row.path:
                    regex, _, convertors = compile_path(row.path)
                    self.patterns.append((regex, convertors, by_method))
                else:
                    self.fixed[row.path] = by_method
            else:
                path, by_method = taken
                if path != row.path:
                    raise ValueError(f"routes {path!r} and {row.path!r} match the same paths under other names")
            if row.method in by_method:
                raise ValueError(f"two routes for {row.method} {row.path}")
            by_method[row.method] = endpoint
        for _, by_method in by_shape.values():
            if "GET" in by_method:
                by_method.setdefault("HEAD", by_method["GET"])

    def find(self, path: str, method: str) -> tuple[_Endpoint | None, dict[str, Any], tuple[str, ...]]:
        """(endpoint, path params, allowed methods): endpoint is None when the path is unknown (no methods) or
        the method is not allowed (the allowed ones are given)."""
        by_method = self.fixed.get(path)
        params: dict[str, Any] = {}
        if by_method is None:
            for regex, convertors, candidate in self.patterns:
                match = regex.match(path)
                if match is not None:
                    params = {k: convertors[k].convert(v) for k, v in match.groupdict().items()}
                    by_method = candidate
                    break
            else:
                return None, params, ()
        endpoint = by_method.get(method)
        return endpoint, params, () if endpoint is not None else tuple(by_method)


_PARAM = re.compile(r"{([^}:]+)(:[^}]+)?}")


def _new_request_id() -> bytes:
    # 128 random bits from the process's Mersenne Twister (seeded from the OS): unique, not secret, no syscall.
    return b"req_%032x" % random.getrandbits(128)


def _request_id(headers: dict[bytes, bytes]) -> bytes:
    value = headers.get(b"x-request-id")
    if value is not None and 0 < len(value) <= 200 and value.isascii() and value.decode().isprintable():
        return value
    return _new_request_id()


class _ReclosableStorages(Storages):
    """:class:`Storages` whose :meth:`aclose` closes every storage opened here each time it is called, not once:
    a closed engine or client reconnects when used again, so an app closed when one event loop ended and then
    served on another is closed again when that one ends."""

    def __init__(self) -> None:
        super().__init__()
        self._every: list[Storage] = []

    def open(self, url: str) -> Storage:
        storage = super().open(url)
        if not any(storage is seen for seen in self._every):
            self._every.append(storage)
        return storage

    async def aclose(self) -> None:
        for storage in reversed(self._every):
            await storage.aclose()


class PrefixedApp:
    """Serves ``api`` under ``prefix`` as the top-level application (what ``ozwell-asgi serve`` runs).

    Paths outside the prefix get our 404 envelope, but ``health`` (``/health``; ``None``: not served), which
    answers ``api.health`` (no key, never rate limited); lifespan events reach the API.
    """

    def __init__(self, api: OzwellAPI, prefix: str = "/v1", *, health: str | None = "/health") -> None:
        self.api = api
        self.prefix = prefix.rstrip("/")
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
            if path == self.health and scope["type"] == "http":
                await self.api.health(scope, receive, send)
                return
            # The server made this scope for this request alone: set the prefix in place, as Starlette's Mount does.
            if path == self.prefix or path.startswith(self.prefix + "/"):
                scope["root_path"] = scope.get("root_path", "") + self.prefix
            else:
                scope["ozwell.outside_prefix"] = True
        await self.api(scope, receive, send)


class OzwellAPI:
    """The Ozwell /v1 API as an ASGI application.

    Dependencies are instances (any object satisfying the protocols in :mod:`ozwell_asgi.protocols`) or, for the
    bundled adapters, URLs: ``key_store`` and ``file_store`` ``memory://``, ``sqlite:///path.db``,
    ``postgresql://…``, ``redis://…`` (the same URL for both: one engine or client); ``rate_limiter``
    ``memory://`` or ``redis://…`` (any storage of the ``limits`` library). ``file_store=None``: no ``/files``.

    ``secret`` keys the HMAC under which API keys are stored; it is required for a persistent key store (a random
    one is made for ``memory://``). ``key_cache_ttl`` bounds how long another process may still accept a key
    revoked elsewhere (0 disables the cache). Adapters built here from URLs are closed by :meth:`aclose`.

    ``on_usage`` (one callable or several; more with :meth:`add_usage_hook`) receives a
    :class:`~ozwell_asgi.types.UsageEvent` for every request: key, owner, endpoint, model, status, tokens, latency,
    request id. Hooks (sync or async) run off the response path, each behind its own bounded queue
    (:class:`~ozwell_asgi.usage.UsageHooks`, ``self.usage``): a slow or failing hook never delays or breaks an answer;
    what a full queue drops is counted (``self.usage.dropped``), and so are failures (``self.usage.failed``).

    ``self.health`` answers whether the stores and the limiter do (:class:`~ozwell_asgi.health.Health`): ``await
    api.health.check()``, or serve it as an ASGI endpoint (``Route("/health", api.health)``).

    ``file_store`` keeps the files of ``/files`` (any :class:`~ozwell_asgi.protocols.FileStore`, or a URL); by default
    ``memory://``, a :class:`~ozwell_asgi.stores.memory.MemoryFileStore` (this process's memory, 1 GiB in all).

    ``response_store`` keeps the responses of ``/responses`` (any :class:`~ozwell_asgi.protocols.ResponseStore`, or a
    URL); by default ``memory://`` (this process's memory, the 10,000 most recently used). ``None``: no
    ``/responses`` routes (they are served only with a backend that chats). Background responses run in this
    process and are cancelled by :meth:`aclose`.

    ``authenticators`` are the host's own (docs/authentication.md): callables ``(request) -> Principal | None``
    (or awaitables of one), tried in order before the API key, so a user signed in to the host needs no key.
    ``cors_origins`` are the browser origins that may call the API (exact, ``https://*.example.com``, or ``*``):
    preflights are answered for them alone and every answer to them carries CORS headers; ``cors_max_age`` is how
    long a browser may cache a preflight (seconds).

    ``sources_model`` (an embedding model of ``backend``) turns on ``include_sources`` on /responses: the caller's
    owner's text files are embedded with it when first needed and searched (:class:`~ozwell_asgi.sources.FileSources`,
    within ``source_limits``; see docs/sources.md). It needs a backend that embeds and a file store (else
    ``ValueError``); the model itself is checked on first use. ``passage_index`` keeps the passages: an instance
    (:class:`~ozwell_asgi.protocols.PassageIndex`) or a storage URL (``memory://``, ``sqlite:///…``,
    ``postgresql://…``); by default the file store's storage when it was given as a SQL or memory URL, else this
    process's memory.
    """

    def __init__(
        self,
        *,
        backend: ChatBackend | EmbeddingBackend | None = None,
        key_store: KeyStore | str = "memory://",
        file_store: FileStore | str | None = "memory://",
        rate_limiter: RateLimiter | str = "memory://",
        secret: str | bytes | None = None,
        plans: Mapping[str, Plan] = DEFAULT_PLANS,
        key_cache_ttl: float = 5.0,
        on_limiter_error: str = "closed",
        settings: Settings | None = None,
        tokenizer: Tokenizer | None = None,
        response_store: ResponseStore | str | None = "memory://",
        authenticators: Iterable[HostAuthenticator] = (),
        cors_origins: Iterable[str] | str = (),
        cors_max_age: int = DEFAULT_MAX_AGE,
        on_usage: UsageHook | Iterable[UsageHook] | None = None,
        sources_model: str | None = None,
        passage_index: PassageIndex | str | None = None,
        source_limits: SourceLimits | None = None,
    ) -> None:
        if on_limiter_error not in ("closed", "open"):
            raise ValueError("on_limiter_error must be 'closed' or 'open'")
        plans = MappingProxyType(dict(plans))  # a snapshot: configuration is read once, here
        self._owned: list[Any] = []
        storages = _ReclosableStorages()  # one storage per URL, closed by aclose
        self._owned.append(storages)
        files_url = file_store if isinstance(file_store, str) else None
        if isinstance(file_store, str):
            file_store = storages.file_store(file_store)
        self.file_store: FileStore | None = file_store
        if isinstance(response_store, str):
            response_store = storages.response_store(response_store)
        self.response_store: ResponseStore | None = response_store
        if isinstance(key_store, str):
            url = key_store
            key_store = storages.key_store(url)
            if secret is None:
                if not url.startswith("memory:"):
                    raise ValueError("a secret is required to hash API keys in a persistent key store")
                secret = secrets.token_bytes(32)
        if secret is None:
            raise ValueError("a secret is required to hash API keys (pass secret=...)")
        if isinstance(rate_limiter, str):
            rate_limiter = LimitsRateLimiter(rate_limiter, on_storage_error=on_limiter_error)  # type: ignore[arg-type]
            self._owned.append(rate_limiter)
        hasher = KeyHasher(secret)
        cached = CachedKeyStore(key_store, ttl=key_cache_ttl) if key_cache_ttl > 0 else key_store
        self.tokenizer = tokenizer or default_tokenizer()
        self.backend = backend or EchoBackend(tokenizer=self.tokenizer)
        served = capabilities(self.backend)  # TypeError now for a backend we could not serve
        self.key_store: KeyStore = cached
        settings = settings or Settings()
        self.keys = KeyManager(
            cached,
            hasher,
            plans,
            max_model_patterns=settings.max_model_patterns,
            max_model_pattern_length=settings.max_model_pattern_length,
            max_key_origins=settings.max_key_origins,
        )
        self.cors = CORSPolicy(cors_origins, max_age=cors_max_age)
        host = HostAuth(authenticators, self.cors.trusted)
        self.rate_limiter = rate_limiter
        hooks = () if on_usage is None else (on_usage,) if callable(on_usage) else tuple(on_usage)
        self.usage = UsageHooks(hooks, max_queue=settings.usage_queue_size, drain_timeout=settings.usage_drain_timeout)
        self.services = Services(
            backend=served.catalog,
            chat=served.chat,
            completes=served.completes,
            embeddings=served.embeddings,
            authenticator=Authenticator(cached, hasher, plans),
            keys=self.keys,
            limiter=rate_limiter,
            tokenizer=self.tokenizer,
            settings=settings,
            plans=plans,
            files=file_store,
            on_usage=self.usage.emit if self.usage else None,
            responses=response_store,
            host=host if host.authenticators else None,
        )
        if response_store is not None and served.chat is not None:
            # Background runs are cancelled (their meters settled) before the stores close: _owned closes in reverse.
            self.services.background = BackgroundRuns(settings.max_background_responses)
            self._owned.append(self.services.background)
        self.health = Health(self._health_components(key_store))
        if sources_model is not None:
            self.services.sources = self._sources(
                sources_model, served.embeddings, file_store, passage_index, files_url, storages, source_limits
            )
        has = {
            "chat": served.chat is not None,
            "embeddings": served.embeddings is not None,
            "files": self.services.files is not None,
            "responses": served.chat is not None and response_store is not None,
        }
        self.routes = _RouteTable(
            (row, _Endpoint(row.handler, self.services, endpoint_name(row.path, row.method)))
            for row in ROUTES
            if row.capability is None or has[row.capability]
        )
        self._started = False
        self._loop_end: AsyncIterator[None] | None = None  # armed by the first request when no lifespan ran

    @staticmethod
    def _sources(
        model: str,
        embeddings: EmbeddingBackend | None,
        files: FileStore | None,
        index: PassageIndex | str | None,
        files_url: str | None,
        storages: Storages,
        limits: SourceLimits | None,
    ) -> SourceFinder:
        if embeddings is None:
            raise ValueError("sources_model needs a backend that serves embeddings")
        if files is None:
            raise ValueError("sources_model needs a file store (file_store=None serves no files to search)")
        found: PassageIndex | None = None
        if isinstance(index, str):
            make = getattr(storages.open(index), "passage_index", None)
            if make is None:
                raise ValueError("the passage_index storage keeps no passage index (use memory:// or a SQL URL)")
            found = make()
        elif index is not None:
            found = index
        elif files_url is not None:  # the file store's storage, if it keeps one; else this process's memory
            make = getattr(storages.open(files_url), "passage_index", None)
            found = make() if make is not None else None
        return FileSources(files, embeddings, model, found, limits=limits)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load what the first request would otherwise wait for (the tokenizer's tables), off the event loop.

        Runs on the ASGI lifespan when we are the top-level app, and lazily on the first request when mounted
        in a host that does not forward lifespan events. Idempotent.
        """
        if not self._started:
            await self.tokenizer.warm()
            self._started = True

    def add_usage_hook(self, hook: UsageHook) -> None:
        """Give ``hook`` (sync or async) every request's :class:`~ozwell_asgi.types.UsageEvent` from now on."""
        self.usage.add(hook)
        self.services.on_usage = self.usage.emit

    def _health_components(self, key_store: KeyStore) -> Callable[[], dict[str, object]]:
        services = self.services

        def components() -> dict[str, object]:
            found: dict[str, object] = {"key_store": key_store}  # the store itself, not the cache in front of it
            if services.files is not None:
                found["file_store"] = services.files
            if services.responses is not None:
                found["response_store"] = services.responses
            found["rate_limiter"] = services.limiter
            return found

        return components

    async def aclose(self) -> None:
        """Deliver the queued usage events (within ``Settings.usage_drain_timeout``), then close the adapters this
        app built from URLs (never instances the host passed in). Background responses are cancelled first, so the
        usage events of their settled meters are among those delivered. Safe to call again: the next request starts
        the app again as its first did, the adapters reconnect lazily, and the next call closes them again."""
        self._started = False
        if self.services.background is not None:
            await self.services.background.aclose()  # idempotent: closed again, doing nothing, with the rest
        await self.usage.aclose()
        for resource in reversed(self._owned):
            close = getattr(resource, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing %r failed", resource)

    def lifespan(self, app: object = None) -> AbstractAsyncContextManager[None]:
        """The app's lifespan as an async context manager: :meth:`startup` on entry, :meth:`aclose` on exit.

        A host wires it in one line, ``FastAPI(lifespan=ozwell.lifespan)`` or ``Starlette(lifespan=...)`` (they
        call it with themselves as ``app``, which is ignored); or ``async with ozwell.lifespan(): ...`` anywhere,
        such as inside the host's own lifespan (see :func:`ozwell_asgi.lifespan.combine_lifespans`).
        """
        return self._lifespan_context()

    @asynccontextmanager
    async def _lifespan_context(self) -> AsyncIterator[None]:
        await self.startup()
        try:
            yield
        finally:
            await self.aclose()

    async def _start_lazily(self) -> None:
        """The first request when no lifespan started us: start, and arrange to close at this event loop's end."""
        if self._loop_end is None:
            guard = self._close_when_loop_ends()
            await anext(guard)  # now the running loop's async-generator hooks track it
            self._loop_end = guard
        await self.startup()

    async def _close_when_loop_ends(self) -> AsyncIterator[None]:
        """Suspended until the event loop finalizes its async generators as it shuts down (``asyncio.run`` and
        uvicorn after the last task, trio at the end of ``trio.run``); then closes the pools, on that loop, and
        lets the next request (on another loop) start again."""
        try:
            yield
        finally:
            self._loop_end = None
            await self.aclose()

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # -- requests ---------------------------------------------------------------------------------------------

    @staticmethod
    def _not_found(scope: Scope) -> NotFoundError:
        return NotFoundError(f"Invalid URL ({scope['method']} {scope['path']})", code=None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            elif kind == "websocket":
                await send({"type": "websocket.close", "code": 1000})
            return
        if not self._started:
            await self._start_lazily()
        began = time.perf_counter()
        scope["ozwell.began"] = began
        headers = dict(scope["headers"])  # one pass; later duplicates win, which no header we read relies on
        scope["ozwell.headers"] = headers
        request_id = _request_id(headers)
        scope["ozwell.request_id"] = request_id
        response_started = False
        origin = headers.get(b"origin")
        cors = self.cors.headers_for(origin) if origin is not None else ()
        status = 499  # until a response starts: a request that ends before one did lost its client
        usage = self.services.on_usage
        name = UNKNOWN_ENDPOINT

        async def send_with_ids(message: Any) -> None:
            nonlocal response_started, status
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                elapsed = b"%d" % ((time.perf_counter() - began) * 1000)
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id),
                    (b"openai-processing-ms", elapsed),
                    *cors,
                ]  # a new list: the response may reuse its own
            await send(message)

        try:
            if origin is not None and scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
                await self.cors.preflight(origin, headers, send_with_ids)
                return
            path: str = scope["path"]
            root = scope.get("root_path", "")
            if root and path.startswith(root):
                path = path[len(root) :]
            if "ozwell.outside_prefix" in scope:
                raise self._not_found(scope)
            endpoint, params, allowed = self.routes.find(path, scope["method"])
            if endpoint is None:
                if not allowed:
                    raise self._not_found(scope)
                raise MethodNotAllowedError(
                    f"Invalid method for URL ({scope['method']} {scope['path']})",
                    code=None,
                    headers=[("Allow", ", ".join(allowed))],
                )
            scope["path_params"] = params
            name = endpoint.name
            await endpoint(scope, receive, send_with_ids)
        except Exception as exc:
            error = self._as_error(exc, request_id)
            if response_started:
                log.error("error after the response started (request %s): %r", request_id.decode(), error)
                return
            await error_response(error)(scope, receive, send_with_ids)
        finally:
            # Exactly one usage event per request: a metered call's meter emits it when it settles; the rest here.
            if usage is not None and "ozwell.metered" not in scope:
                _emit_unmetered(usage, scope, name, status, began, request_id)

    @staticmethod
    def _as_error(exc: Exception, request_id: bytes) -> OzwellError:
        if isinstance(exc, OzwellError):
            return exc
        if isinstance(exc, HTTPException):  # from a Starlette helper a handler may use
            headers = list((exc.headers or {}).items())
            return OzwellError(str(exc.detail), status=exc.status_code, type="invalid_request_error", headers=headers)
        log.exception("unhandled error (request %s)", request_id.decode())
        return internal_error()


def _emit_unmetered(
    sink: Callable[[UsageEvent], None], scope: Scope, endpoint: str, status: int, began: float, request_id: bytes
) -> None:
    """The usage event of a request no meter settled: its caller if it authenticated, no model, no tokens."""
    principal = scope.get("ozwell.principal")
    event = UsageEvent(
        request_id=request_id.decode(),
        key_id=principal.key_id if principal is not None else "",
        owner=principal.owner if principal is not None else "",
        endpoint=endpoint,
        model=None,
        status=status,
        prompt_tokens=0,
        completion_tokens=0,
        charged=0,
        latency_ms=(time.perf_counter() - began) * 1000,
    )
    try:
        sink(event)
    except Exception:  # a sink never breaks an answer (UsageHooks.emit never raises; a host's own sink might)
        log.exception("usage sink failed")
