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
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from starlette.convertors import Convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import compile_path

from .auth import Authenticator, KeyHasher, KeyManager
from .backends import capabilities
from .backends.echo import EchoBackend
from .context import Services, Settings
from .errors import MethodNotAllowedError, NotFoundError, OzwellError, internal_error
from .meter import UsageSink
from .protocols import ChatBackend, EmbeddingBackend, FileStore, KeyStore, RateLimiter
from .ratelimit import DEFAULT_PLANS, LimitsRateLimiter, Plan
from .responses import error_response
from .routes import ROUTES, Handler, RouteRow
from .stores.cache import CachedKeyStore
from .stores.urls import Storages
from .tokens import Tokenizer, default_tokenizer
from .types import Receive, Scope, Send

__all__ = ["OzwellAPI"]

log = logging.getLogger("ozwell_asgi")


class _Endpoint:
    """Adapts a handler to an ASGI app that Starlette's Route calls directly (no per-request wrapping)."""

    __slots__ = ("handler", "services")

    def __init__(self, handler: Handler, services: Services) -> None:
        self.handler = handler
        self.services = services

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


class PrefixedApp:
    """Serves ``api`` under ``prefix`` as the top-level application (what ``ozwell-asgi serve`` runs).

    Paths outside the prefix get our 404 envelope; lifespan events reach the API.
    """

    def __init__(self, api: OzwellAPI, prefix: str = "/v1") -> None:
        self.api = api
        self.prefix = prefix.rstrip("/")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            path: str = scope["path"]
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

    ``on_usage`` is called with a :class:`~ozwell_asgi.types.UsageEvent` for every billable call (chat,
    embeddings) when its meter settles: key, owner, endpoint, model, status, tokens, latency. It runs on the request
    path, so it must be quick and must not block (append to a queue); an exception in it is logged, never sent.

    ``file_store`` keeps the files of ``/files`` (any :class:`~ozwell_asgi.protocols.FileStore`, or a URL); by default
    ``memory://``, a :class:`~ozwell_asgi.stores.memory.MemoryFileStore` (this process's memory, 1 GiB in all).
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
        on_usage: UsageSink | None = None,
    ) -> None:
        if on_limiter_error not in ("closed", "open"):
            raise ValueError("on_limiter_error must be 'closed' or 'open'")
        plans = MappingProxyType(dict(plans))  # a snapshot: configuration is read once, here
        self._owned: list[Any] = []
        storages = Storages()  # one storage per URL, closed by aclose
        self._owned.append(storages)
        if isinstance(file_store, str):
            file_store = storages.file_store(file_store)
        self.file_store: FileStore | None = file_store
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
        )
        self.rate_limiter = rate_limiter
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
            on_usage=on_usage,
        )
        has = {
            "chat": served.chat is not None,
            "embeddings": served.embeddings is not None,
            "files": self.services.files is not None,
        }
        self.routes = _RouteTable(
            (row, _Endpoint(row.handler, self.services))
            for row in ROUTES
            if row.capability is None or has[row.capability]
        )
        self._started = False

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Load what the first request would otherwise wait for (the tokenizer's tables), off the event loop.

        Runs on the ASGI lifespan when we are the top-level app, and lazily on the first request when mounted
        in a host that does not forward lifespan events. Idempotent.
        """
        if not self._started:
            await self.tokenizer.warm()
            self._started = True

    async def aclose(self) -> None:
        """Close the adapters this app built from URLs (never instances the host passed in)."""
        for resource in reversed(self._owned):
            close = getattr(resource, "aclose", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing %r failed", resource)
        self._owned.clear()

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
            await self.startup()
        began = time.perf_counter()
        headers = dict(scope["headers"])  # one pass; later duplicates win, which no header we read relies on
        scope["ozwell.headers"] = headers
        request_id = _request_id(headers)
        scope["ozwell.request_id"] = request_id
        response_started = False

        async def send_with_ids(message: Any) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
                elapsed = b"%d" % ((time.perf_counter() - began) * 1000)
                message["headers"] = [
                    *message["headers"],
                    (b"x-request-id", request_id),
                    (b"openai-processing-ms", elapsed),
                ]  # a new list: the response may reuse its own
            await send(message)

        try:
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
            await endpoint(scope, receive, send_with_ids)
        except Exception as exc:
            error = self._as_error(exc, request_id)
            if response_started:
                log.error("error after the response started (request %s): %r", request_id.decode(), error)
                return
            await error_response(error)(scope, receive, send_with_ids)

    @staticmethod
    def _as_error(exc: Exception, request_id: bytes) -> OzwellError:
        if isinstance(exc, OzwellError):
            return exc
        if isinstance(exc, HTTPException):  # from a Starlette helper a handler may use
            headers = list((exc.headers or {}).items())
            return OzwellError(str(exc.detail), status=exc.status_code, type="invalid_request_error", headers=headers)
        log.exception("unhandled error (request %s)", request_id.decode())
        return internal_error()
